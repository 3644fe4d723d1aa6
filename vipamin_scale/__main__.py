"""`python -m vipamin_scale <command> ...`: the same as `vipamin-scale <command> ...`."""
import sys

from vipamin_scale.cli import main

sys.exit(main())
