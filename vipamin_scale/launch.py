"""`python -m vipamin_scale.launch [torchrun options] -m vipamin_scale.cli COMMAND [overrides]`: torchrun
(the same options, `torch.distributed.run`) whose exit code is the root-cause rank's.

torchrun exits 1 whenever a rank fails, so a user error (exit 2 in one process) would read as a crash.
Here the job's first failure, as torchrun's own summary names it ("Root Cause", from the ranks' error
files, see `cli.root_cause`), gives the exit code: 2 for a user error, a rank's own code otherwise (1
for a signal). The summary is printed as torchrun prints it, without the launcher's own traceback; a
signal to the launcher itself (srun stopping a node, a cancelled job) is one line and exit 1, so that
srun, which exits with its tasks' highest code, keeps the failed node's.
launch/torchrun.sh and slurm/vith_vipamin.sh start ranks through this module.

`command(...)` is the one builder of a local torchrun command line and `free_port()` the one free-port
helper (the tests and the benchmarks start their torchrun jobs with them).
"""
from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Optional


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the OS picks it; another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def command(nproc: int, *args: str, nnodes: int = 1, node_rank: int = 0, port: Optional[int] = None,
            max_restarts: int = 0, script: Optional[str | Path] = None) -> list[str]:
    """`torchrun` (torch.distributed.run, this Python) at `nproc` ranks per node, static rendezvous at
    127.0.0.1:`port` (a free port by default), running `vipamin-scale ARGS`, or `script ARGS`."""
    target = [str(script)] if script is not None else ["-m", "vipamin_scale.cli"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            f"--node-rank={node_rank}", f"--max-restarts={max_restarts}", "--master-addr=127.0.0.1",
            f"--master-port={port or free_port()}", *target, *args]


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(list(sys.argv[1:] if argv is None else argv)))  # torchrun's main, less its @record
    except ChildFailedError as exc:
        print(exc.format_msg(), file=sys.stderr)
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as exc:  # srun stopping this node (another failed) or a cancelled job: no traceback
        print(f"error: torchrun stopped by {exc.sigval.name}; its ranks were stopped with it", file=sys.stderr)
        return 1  # not 128 + N: srun reports its tasks' highest code, which must stay the failed node's
    return 0


if __name__ == "__main__":
    sys.exit(main())
