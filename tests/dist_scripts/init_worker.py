"""Run under torchrun: compute prompts for several initializer configs at this world size.

    python -m torch.distributed.run ... init_worker.py OUT_DIR CASES_JSON

CASES_JSON maps a case name to config overrides (`a__b` keys as in `default_config`); each case's
prompts file is written to OUT_DIR/<case>.safetensors by rank 0.
"""
import json
import sys
from pathlib import Path

from vipamin_scale import distributed as D
from vipamin_scale.config import default_config
from vipamin_scale.init.run import run_init


def main() -> None:
    out_dir, cases = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    for name, overrides in cases.items():
        run_init(default_config(**overrides), out_dir / f"{name}.safetensors")
    D.destroy()


if __name__ == "__main__":
    main()
