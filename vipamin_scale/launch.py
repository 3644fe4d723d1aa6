"""`python -m vipamin_scale.launch [torchrun options] -m vipamin_scale.cli COMMAND [overrides]`: torchrun
(the same options, `torch.distributed.run`) whose exit code is the root-cause rank's.

torchrun exits 1 whenever a rank fails, so a user error (exit 2 in one process) would read as a crash.
Here the job's first failure, as torchrun's own summary names it ("Root Cause", from the ranks' error
files, see `cli.root_cause`), gives the exit code: 2 for a user error, a rank's own code otherwise (1
for a signal). The summary is printed as torchrun prints it, without the launcher's own traceback.
launch/torchrun.sh and slurm/vith_vipamin.sh start ranks through this module.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(list(sys.argv[1:] if argv is None else argv)))  # torchrun's main, less its @record
    except ChildFailedError as exc:
        print(exc.format_msg(), file=sys.stderr)
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
