"""How a study's runs are trained, and what it says while they are: `train_runs` and `Progress`.

    train_runs(cfgs, study_cfg, progress, what) -> [result per run]
        every run that ended before (finished or failed) is reused when its directory holds the very same run
        (`runs.check_same_run`: else one RunMismatch line naming the fields, before anything trains); the
        rest go to `packs.run_packed` (the one packed launcher: compatible runs side by side over one
        backbone, each equal to its solo run, a failed run or pack recorded in its run directory) over
        study.workers processes; an interrupted run resumes from its checkpoint (train.resume=true).
    Progress(study_dir)
        a line at least every 30 s of work: the phase, runs done of the phase's total, the packs running and
        for how long, the time elapsed and an ETA; the same state in <study_dir>/status.json (atomic), which
        `vipamin-scale study --status DIR` reads (`status_text`), while the study runs or after it stopped.

The ETA counts work in optimizer steps (each run's schedule): the steps the packs that ended this session took
per second, applied to the steps the phase has left (later phases are not known yet).
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import DictConfig

import vipamin_scale.runs as runs
from vipamin_scale.config import pack_key
from vipamin_scale.packs import PackEvents, run_packed

log = logging.getLogger(__name__)

STATUS = "status.json"
EVERY_S = 30.0


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress(PackEvents):
    """The study's progress (module docstring); `start()` begins the lines, `close()` ends them."""

    def __init__(self, study_dir: Path, every_s: float = EVERY_S, echo: Callable[[str], None] = print,
                 status: bool = True):
        self.dir, self.every_s, self.echo, self.status = Path(study_dir), every_s, echo, status
        self.t0 = time.monotonic()
        self.started = datetime.datetime.now().isoformat(timespec="seconds")
        self.phase, self.total, self.runs_done, self.reused, self.steps_left = "starting", 0, 0, 0, 0
        self.labels: list[str] = []  # the plan's packs, described
        self.steps: list[int] = []  # the plan's packs' optimizer steps (summed over their runs)
        self.ended: set[int] = set()
        self._started_at: dict[int, float] = {}  # the packs running: plan index -> when it started
        self.workers = 1
        self.pack_sizes: dict[str, dict[str, Any]] = {}  # phase -> pack_size=auto's K and how it was chosen
        self.rate: Optional[float] = None  # steps a second, over the packs that ended this session
        self._trained_steps, self._trained_s, self._round_t0 = 0, 0.0, time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last = time.monotonic()

    # -- what the study tells it --------------------------------------------------------------------
    def begin(self, phase: str, cfgs: Sequence[DictConfig], reused: int) -> None:
        """A phase (or one round of it) starts: `cfgs` are its runs to train, `reused` its runs already ended."""
        with self._lock:
            self.phase, self.total, self.runs_done, self.reused = phase, len(cfgs) + reused, reused, reused
            self.labels, self.steps, self.ended, self._started_at = [], [], set(), {}
            self._cfgs = list(cfgs)
            self.steps_left = sum(_steps(c) for c in cfgs)
        self.tick(force=True)

    def working(self, phase: str, what: str) -> None:
        """Work outside the packs starts in this process (the draws, the linear probe): the lines name it."""
        with self._lock:
            self.phase, self.total, self.runs_done, self.reused, self.steps_left = phase, 0, 0, 0, 0
            self.labels, self.steps, self.ended, self._cfgs = [what], [0], set(), []
            self._started_at = {0: time.monotonic()}
        self.tick(force=True)

    def planned(self, plan: list[list[int]], workers: int) -> None:
        with self._lock:
            self.workers = workers
            self.labels = [_describe([self._cfgs[i] for i in pack]) for pack in plan]
            self.steps = [sum(_steps(self._cfgs[i]) for i in pack) for pack in plan]
            self._round_t0 = time.monotonic()
            self._started_at = {j: self._round_t0 for j in range(min(workers, len(plan)))}

    def done(self, j: int, results: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        with self._lock:
            self.ended.add(j)
            self.runs_done += len(results)
            self.steps_left -= self.steps[j]
            took = now - self._started_at.pop(j, self._round_t0)
            self._trained_steps += self.steps[j]
            self._trained_s += took
            self.rate = self._trained_steps / self._trained_s if self._trained_s > 0 else None
            self._next(now)
            failed = sum(r.get("status") == "failed" for r in results)
        if failed:
            log.warning("study: %s ended with %d failed run(s); their result.json say why", self.labels[j], failed)
        self.tick(force=True)

    def elsewhere(self, j: int) -> None:
        """Pack j is another worker's: not counted here until the round's barrier (`round_ended`)."""
        with self._lock:
            self.ended.add(j)
            self.steps_left -= self.steps[j]
            self._started_at.pop(j, None)
            self._next(time.monotonic())

    def _next(self, now: float) -> None:
        waiting = [k for k in range(len(self.labels)) if k not in self.ended and k not in self._started_at]
        if waiting:  # the workers of this process claim packs in plan order
            self._started_at[waiting[0]] = now

    def waiting(self, line: str) -> None:
        self.echo(f"study: {self.phase}: {line}")

    def round_ended(self) -> None:
        """Every run of the round has ended, here or at other workers."""
        with self._lock:
            self.runs_done, self.steps_left, self._started_at = self.total, 0, {}
        self.tick(force=True)

    # -- the lines --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            running = [{"pack": self.labels[j], "for_s": round(now - t)} for j, t in self._started_at.items()
                       if j not in self.ended]
            # the packs running have done about `rate` steps a second each since they started (the ETA falls
            # between the lines, not only when a pack ends)
            left = self.steps_left - sum(min(self.steps[j], self.rate * (now - t)) for j, t in self._started_at.items()
                                         if j not in self.ended and j < len(self.steps)) if self.rate else 0
            eta = (max(0.0, left) / self.rate / max(1, min(self.workers, len(running) or 1))
                   if self.rate and self.steps_left > 0 else None)
            return {"phase": self.phase, "runs_done": self.runs_done, "runs_total": self.total, "reused": self.reused,
                    "running": running, "elapsed_s": round(now - self.t0), "eta_s": None if eta is None else round(eta),
                    "started": self.started, "pid": os.getpid(), "host": socket.gethostname(),
                    "updated": datetime.datetime.now().isoformat(timespec="seconds")}

    def line(self, st: Optional[dict[str, Any]] = None) -> str:
        st = st or self.state()
        running = "; ".join(f"{r['pack']} ({_clock(r['for_s'])})" for r in st["running"]) or "none"
        eta = ("?" if st["eta_s"] is None else f"~{_clock(st['eta_s'])} for this phase") if st["runs_done"] < st["runs_total"] else "–"
        if not st["runs_total"] and st["running"]:  # work outside the packs (`working`)
            return f"study: {st['phase']}: {running}; elapsed {_clock(st['elapsed_s'])}"
        return (f"study: {st['phase']}: {st['runs_done']}/{st['runs_total']} runs done"
                + (f" ({st['reused']} reused)" if st["reused"] else "")
                + f"; running: {running}; elapsed {_clock(st['elapsed_s'])}, ETA {eta}")

    def tick(self, force: bool = False) -> None:
        """Print the line and write status.json, at most every `every_s` unless forced."""
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        st = self.state()
        self.echo(self.line(st))
        if self.status:
            runs.write_json(self.dir / STATUS, st)

    def start(self) -> "Progress":
        def beat() -> None:
            while not self._stop.wait(min(1.0, self.every_s / 2)):
                self.tick()

        self._thread = threading.Thread(target=beat, name="study-progress", daemon=True)
        self._thread.start()
        return self

    def close(self, phase: str = "finished", runs_total: Optional[int] = None) -> None:
        """The lines stop; status.json says `phase` (with `runs_total`: every run of the study, all done)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self.phase, self._started_at = phase, {}
            if runs_total is not None:
                self.total = self.runs_done = runs_total
                self.reused = self.steps_left = 0
        if self.status:
            runs.write_json(self.dir / STATUS, self.state())


def _steps(cfg: DictConfig) -> int:
    """A run's optimizer steps, from its schedule (the trainer drops the last partial batch of an epoch)."""
    from vipamin_scale.study.protocol import train_count

    n = train_count(cfg.data)
    return int(cfg.train.epochs) * max(1, n // int(cfg.data.batch_size))


def run_cost(cfg: DictConfig) -> float:
    """A study run's work for the plan (`packs.plan_packs`): its optimizer steps x the images of a step x the
    tokens of an image (the prompt's beside a ViT's patches: `packs.run_cost`)."""
    from vipamin_scale.packs import run_cost as tokens

    return _steps(cfg) * int(cfg.data.batch_size) * tokens(cfg) / float(cfg.train.epochs)


def _describe(cfgs: Sequence[DictConfig]) -> str:
    """`P10 x 18 runs` / `P10 VIPAMIN-like x 3`: what a pack holds, for the lines."""
    lengths = sorted({int(c.prompt.length) for c in cfgs})
    return f"P{'/'.join(map(str, lengths))} x {len(cfgs)} run{'s' if len(cfgs) != 1 else ''}"


def train_runs(cfgs: Sequence[DictConfig], workers: int, pack_size: Any, progress: Progress,
               phase: str, overrides: Optional[Sequence[list[str]]] = None) -> list[dict[str, Any]]:
    """Every run's result (module docstring), in order: its result.json, or the failure record its pack returned
    (a run whose directory another process holds has none written there). `overrides`: what sets each run
    apart, recorded in its directory (`runs.write_overrides`) before it trains."""
    cfgs = list(cfgs)
    for cfg in cfgs:  # before anything trains: only the very same run is reused or resumed
        runs.check_same_run(Path(cfg.train.out_dir), cfg, what="study")
    todo = [i for i, cfg in enumerate(cfgs) if not runs.has_ended(Path(cfg.train.out_dir))]
    for i in todo if overrides is not None else ():
        runs.write_overrides(Path(cfgs[i].train.out_dir), overrides[i])
    progress.begin(phase, [cfgs[i] for i in todo], len(cfgs) - len(todo))
    out = [None if i in set(todo) else runs.read_result(Path(cfg.train.out_dir)) for i, cfg in enumerate(cfgs)]
    if todo:
        if pack_size == "auto":  # each worker measures its own device: plans may differ, claims are per run
            from vipamin_scale.pack_memory import auto_pack_size

            groups = {pack_key(cfgs[i]): cfgs[i] for i in todo}
            chosen = [auto_pack_size(cfg) for cfg in groups.values()]
            pack_size = min(k for k, _ in chosen)
            progress.pack_sizes[phase] = {"k": pack_size, "how": [how for _, how in chosen]}
        got = run_packed([cfgs[i] for i in todo], pack_size, keep_going=True, workers=workers, events=progress,
                         cost=run_cost, wait=True)
        for i, result in zip(todo, got):
            out[i] = result
        progress.round_ended()
    return [r or {"status": "failed", "error": "no result (see the study's log)"} for r in out]


def status_text(study_dir: Path) -> str:
    """`vipamin-scale study --status DIR`: the state a running or stopped study left in status.json."""
    path = Path(study_dir) / STATUS
    st = runs.read_json(path)
    if st is None or "phase" not in st:
        from vipamin_scale.config import ConfigError

        raise ConfigError(f"study --status: {path}: no status; is {study_dir} a study directory?")
    alive = runs.is_held(Path(study_dir))
    said = Progress.line(Progress.__new__(Progress), st)
    state = ("running" if alive else "finished" if st["phase"] == "finished" else
             f"stopped (last update {st['updated']})")
    return f"{said}\nstudy {state}: {study_dir} (pid {st['pid']} on {st['host']}, started {st['started']})"
