"""`study.launcher=slurm`: the study's workers as the tasks of one Slurm job array, through submitit.

    run_on_slurm(cfg) -> the study's record (what study.json holds, written by worker 0)

This process submits `study.workers` array tasks (submitit's parameters: `study.slurm`), each running
`vipamin-scale study` with this command's overrides as worker RANK = its array index of WORLD_SIZE =
study.workers (`study/run.py`: every worker plans the same rounds and claims packs through the run directories'
locks; worker 0 writes the record), then waits, printing the study's progress line (status.json) every 30 s.
A task's output is its submitit log, `<study>/.submitit/<job>/<job>_<index>_log.out`.

Preemption: submitit's jobs get SIGUSR2 before their time limit; the worker in the task checkpoints its pack
(or stops between packs) and exits 75, and submitit requeues the task (`_Worker.checkpoint`), which continues
the study where its runs stopped. A task that ends with another error fails the command with its log's last
line.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from vipamin_scale.config import UserError

log = logging.getLogger(__name__)

LINE_S = 30.0


class _Worker:
    """One array task's body: the study command as worker SLURM_ARRAY_TASK_ID (picklable; submitit runs it)."""

    def __init__(self, argv: list[str], workers: int):
        self.argv, self.workers = argv, workers

    def __call__(self, rank: int) -> int:
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(self.workers), "LOCAL_RANK": "0"}
        code = subprocess.call(self.argv, env=env)
        if code != 0:
            raise RuntimeError(f"worker {rank}: `vipamin-scale study` exited {code}")
        return code

    def checkpoint(self, rank: int) -> Any:
        """submitit's hook on its preemption signal: run the same worker again (the study continues)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, rank)


def study_overrides_from_hydra() -> list[str]:
    """This command's own overrides, less the launcher's (study.launcher, study.workers, study.slurm) and hydra.*."""
    from hydra.core.hydra_config import HydraConfig

    out = []
    for item in HydraConfig.get().overrides.task:
        key = item.lstrip("+~").split("=", 1)[0]
        if key in ("study.launcher", "study.workers") or key.startswith(("study.slurm", "hydra.", "hydra/")):
            continue
        out.append(item)
    return out


def run_on_slurm(cfg: DictConfig, overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """The study's workers as a Slurm array (module docstring); its record once every task ended."""
    import submitit

    from vipamin_scale.study.execute import STATUS, Progress

    root = Path(cfg.train.out_dir).resolve()
    workers = int(cfg.study.workers)
    argv = [sys.executable, "-m", "vipamin_scale.cli", "study",
            *(study_overrides_from_hydra() if overrides is None else overrides), "study.launcher=local",
            "study.workers=1", f"hydra.run.dir={root}"]
    executor = submitit.AutoExecutor(folder=str(root / ".submitit" / "%j"))
    params = {k: v for k, v in OmegaConf.to_container(cfg.study.slurm, resolve=True).items() if v is not None}
    executor.update_parameters(**{"name": "vipamin-study", "slurm_array_parallelism": workers, **params})
    jobs = executor.map_array(_Worker(argv, workers), list(range(workers)))
    log.info("study: %d workers as Slurm array tasks %s; their logs under %s", workers,
             ", ".join(j.job_id for j in jobs), root / ".submitit")
    said, last = 0.0, None
    while not all(j.done() for j in jobs):
        if time.monotonic() - said >= LINE_S:
            said = time.monotonic()
            st = _read(root / STATUS)
            if st is not None and st != last:
                print(Progress.line(Progress.__new__(Progress), st), flush=True)
                last = st
        time.sleep(2.0)
    failed = []
    for rank, job in enumerate(jobs):
        try:
            job.result()
        except Exception as exc:  # its log says why; the study's other workers' runs are kept
            failed.append(f"worker {rank} (Slurm job {job.job_id}): {str(exc).strip().splitlines()[-1][:300]}")
    if failed:
        raise UserError(f"study.launcher=slurm: {'; '.join(failed)}; the same command continues the study")
    doc = _read(root / "study.json")
    if doc is None:
        raise UserError(f"study.launcher=slurm: every worker ended but {root / 'study.json'} is missing")
    return doc


def _read(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


__all__ = ["run_on_slurm", "study_overrides_from_hydra"]
