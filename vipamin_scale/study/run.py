"""`vipamin-scale study`: the study itself, phase by phase, into one resumable directory.

    run_study(cfg) -> the study's record (what study.json holds)

Phases (each writes nothing a re-run must redo; every run is an ordinary run directory):
  1. the data: the few-shot draws (`draw_roots`) under <dir>/data/, the user's shards never rewritten;
  2. selection, per cell: every point of study.space scored by its mean val accuracy over draws
     0..select_draws-1 (few-shot; seed 0 on the full data), then the edge rounds (`tune.select.Selection`);
     all the cells' candidates of a round train together, as packs (`execute.train_runs`), and a round is
     a barrier; the linear probe's C the same way, in this process;
  3. the final runs: each cell's method at its selected point on every draw (seed); the selection's runs at
     that point ARE the final runs of their draws (same config, same directory: reused, not retrained);
  4. the cost of P: one solo few-shot run per (P, method), draw 0, one at a time in this process;
  5. the gate, the tables (`tables.publish`: study.json, study.md, plots).
Run directories: <dir>/runs/<cell>/<point>/draw<d> (few-shot) or seed<s> (full), <dir>/cost/<cell>/<point>;
each initialization is computed once for the study (<dir>/inits: runs that differ only in what the initializer
does not read, a cell's points and its methods' lrs, share it; `init/cache.py`), the cost runs excepted.

Resumable and exact: the directory records its protocol (protocol.json: `protocol.protocol_record`); a
re-run with the same protocol continues (ended runs reused after their identity is checked, interrupted
ones resume from their checkpoints, the selection recomputed from the same results), one with another is
refused before anything runs, naming the fields. More draws, shots, lengths or methods in the same
directory reuse what is there.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig

import vipamin_scale.distributed as D
import vipamin_scale.runs as runs
import vipamin_scale.stats as stats
from vipamin_scale.config import ConfigError, validate
import vipamin_scale.study.protocol as P
from vipamin_scale.study.execute import Progress, train_runs
from vipamin_scale.study.probe import LinearProbe, probe_result
from vipamin_scale.tune.halving import draw_score
from vipamin_scale.tune.search import val_score
from vipamin_scale.tune.select import Selection
from vipamin_scale.tune.space import check_point

log = logging.getLogger(__name__)

PROTOCOL = "protocol.json"
LEADER_WAIT_S = 600.0  # a worker waits this long for the leader's protocol.json


@dataclass
class CellState:
    """A cell's selection and final runs as the study goes."""

    cell: P.Cell
    sel: Optional[Selection] = None  # None: no selection (study.space null, or study.selected_from)
    fixed: Optional[dict[str, Any]] = None  # the point when there is no selection
    trials: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)  # (candidate, draw) -> result
    dirs: dict[tuple[int, int], str] = field(default_factory=dict)

    def point(self) -> Optional[dict[str, Any]]:
        if self.sel is None:
            return self.fixed
        c = self.sel.winner()
        return None if c is None else self.sel.points[c]


class Study:
    """One study's state: the config, its directory, data, cells and the runs' results."""

    def __init__(self, cfg: DictConfig, leader: bool = True):
        self.cfg, self.s, self.leader = cfg, cfg.study, leader
        self.root = Path(cfg.train.out_dir)
        self.methods = P.methods(cfg)
        self.cells = P.cells(cfg)
        self.state = {c: CellState(c) for c in self.cells}
        self.probe = LinearProbe()
        self.roots: dict[tuple[int, int], Path] = {}
        self.results: dict[P.Cell, list[dict[str, Any]]] = {}
        self.cost: dict[tuple[int, str], dict[str, Any]] = {}
        self.progress: Optional[Progress] = None

    # -- data -------------------------------------------------------------------------------------
    def data(self, cell: P.Cell, draw: int) -> dict[str, Any]:
        """The data a run of `cell` reads at draw (seed) `draw`: {name, root, train_split, max_train_samples, n}."""
        d = self.cfg.data
        if cell.regime == P.FEW:
            root = self.roots[(cell.shots, draw)]
            out = {"name": "shards", "root": str(root), "train_split": "train", "max_train_samples": None}
        else:
            out = {"name": d.name, "root": d.root, "train_split": d.train_split,
                   "max_train_samples": self.s.full_samples}
        view = copy.deepcopy(self.cfg.data)
        view.name, view.root, view.train_split, view.max_train_samples = (out["name"], out["root"], out["train_split"],
                                                                          out["max_train_samples"])
        return {**out, "n": P.train_count(view)}

    def working(self, phase: str, what: str) -> None:
        """Work outside the packs, named in the progress lines (when the study runs them: `run_study`)."""
        if self.progress is not None:
            self.progress.working(phase, what)

    def draw_roots(self) -> None:
        """The few-shot draws, written once under <dir>/data (digits: the embedded draws; shards: drawn from
        data.train_split of data.root, linked to its other splits)."""
        per = P.draws_per_shot(self.cfg)
        if not per:
            return
        most = max(per.values())
        self.working("the few-shot draws", f"{most} draw(s) of {', '.join(map(str, per))} shot(s) into "
                                                    f"{self.root / 'data'}")
        if self.cfg.data.name == "digits":
            from vipamin_scale.data.digits import digits_fewshot

            self.roots = digits_fewshot(list(per), most, cache_dir=self.root / "data")
            return
        from vipamin_scale.data import resolve_root
        from vipamin_scale.data.fewshot import fewshot_root

        source = resolve_root(self.cfg.data)
        for k in per:
            for d in range(most):
                self.roots[(k, d)] = fewshot_root(source, k, d, self.root / "data", split=self.cfg.data.train_split)

    # -- runs -------------------------------------------------------------------------------------
    def run_dir(self, cell: P.Cell, point: dict[str, Any], draw: int) -> Path:
        name = f"draw{draw}" if cell.regime == P.FEW else f"seed{draw}"
        return self.root / "runs" / cell.key / P.params_slug(point) / name

    def run_config(self, cell: P.Cell, point: dict[str, Any], draw: int) -> tuple[DictConfig, list[str]]:
        return P.run_config(self.cfg, cell, point, draw, self.data(cell, draw), self.run_dir(cell, point, draw),
                            init_cache=self.root / "inits")

    def selection_draws(self, cell: P.Cell) -> list[int]:
        return list(range(self.s.select_draws)) if cell.regime == P.FEW else [0]

    def train(self, phase: str, made: list[tuple[DictConfig, list[str]]]) -> list[dict[str, Any]]:
        """Train (or reuse) the runs `made` ((config, what sets it apart)); their results, in order."""
        return train_runs([c for c, _ in made], self.s.workers, self.s.pack_size, self.progress, phase,
                          overrides=[o for _, o in made])

    # -- 2. selection -----------------------------------------------------------------------------
    def start_selection(self, chosen: Optional[dict[str, dict[str, Any]]]) -> None:
        """A Selection per cell (or its fixed point), each candidate checked against the cell's run config."""
        for c, st in self.state.items():
            if chosen is not None:
                if c.key not in chosen:
                    raise ConfigError(f"study.selected_from: it holds no selection for the cell {c.label} "
                                      f"({c.key})")
                st.fixed = chosen[c.key]
                continue
            if self.methods[c.method].probe:
                st.sel = Selection({"C": P._plain(self.s.probe_C)}, self.s.extend_edges,
                                   rounds_field="study.extend_edges")
                continue
            if not self.s.space:
                st.fixed = {}
                continue
            sample, _ = self.run_config(c, {}, 0)

            def check(point: dict[str, Any], sample: DictConfig = sample) -> None:
                check_point(sample, point, field="study.space")

            try:
                st.sel = Selection(P._plain(self.s.space), self.s.extend_edges, check=check,
                                   rounds_field="study.extend_edges")
            except ConfigError as exc:
                raise ConfigError(str(exc).replace("tune.space", "study.space", 1)) from None
            for point in st.sel.points:  # before any compute: every candidate is a valid run
                check(point)

    def select(self) -> None:
        """Phase 2 (module docstring): rounds until no cell has a candidate left to score."""
        for st in self.state.values():  # the probe's selections, in this process (the leader's)
            if st.sel is not None and self.methods[st.cell.method].probe and self.leader:
                self._select_probe(st)
        prompt = [st for st in self.state.values() if st.sel is not None and not self.methods[st.cell.method].probe]
        rnd = 0
        while True:
            todo = [(st, c, d) for st in prompt for c in st.sel.pending() for d in self.selection_draws(st.cell)]
            if not todo:
                if not any([st.sel.advance() for st in prompt]):  # every cell's edge round, then train them together
                    return
                rnd += 1
                continue
            made = [self.run_config(st.cell, st.sel.points[c], d) for st, c, d in todo]
            phase = "selection" if rnd == 0 else f"selection, edge round {rnd}"
            for (st, c, d), (cfg, _), result in zip(todo, made, self.train(phase, made)):
                st.trials[(c, d)] = result
                st.dirs[(c, d)] = str(Path(cfg.train.out_dir).relative_to(self.root))
            for st in {id(st): st for st, _, _ in todo}.values():
                for c in st.sel.pending():
                    st.sel.record(c, draw_score([val_score(st.trials.get((c, d)))
                                                 for d in self.selection_draws(st.cell)]))

    def _select_probe(self, st: CellState) -> None:
        val = self.cfg.data.val_split
        self.working(f"selection of the linear probe's C ({st.cell.key})", "features and fits, in this process")
        while True:
            for c in st.sel.pending():
                scores = []
                for d in self.selection_draws(st.cell):
                    accs = self.probe.accuracy(self.probe_config(st.cell, d), st.sel.points[c]["C"], (val,))
                    st.trials[(c, d)] = probe_result(accs, val, self.cfg.data.test_split, st.sel.points[c]["C"])
                    scores.append(accs[val])
                st.sel.record(c, draw_score(scores))
            if not st.sel.advance():
                return

    def probe_config(self, cell: P.Cell, draw: int) -> DictConfig:
        cfg = P.base_config(self.cfg)
        data = self.data(cell, draw)
        for key in ("name", "root", "train_split", "max_train_samples"):
            cfg.data[key] = data[key]
        return cfg

    # -- 3. final runs ----------------------------------------------------------------------------
    def finals(self) -> None:
        todo = []
        for cell, st in self.state.items():
            point = st.point()
            if point is None:  # every candidate failed: the cell has no final runs
                self.results[cell] = [{"status": "failed", "error": "every candidate of its selection failed"}] * cell.n
                continue
            if self.methods[cell.method].probe:
                if not self.leader:
                    continue
                self.working(f"the linear probe's final fits ({cell.key})", "features and fits, in this process")
                self.results[cell] = [self._probe_final(cell, point, d) for d in range(cell.n)]
                continue
            todo += [(cell, d) for d in range(cell.n)]
        made = [self.run_config(cell, self.state[cell].point(), d) for cell, d in todo]
        got = self.train("final runs", made)
        for cell in {cell for cell, _ in todo}:
            self.results[cell] = [None] * cell.n
        for (cell, d), (cfg, _), result in zip(todo, made, got):
            self.results[cell][d] = {**result, "dir": str(Path(cfg.train.out_dir).relative_to(self.root)),
                                     "fingerprint": runs.fingerprint(runs.identity(cfg))}

    def _probe_final(self, cell: P.Cell, point: dict[str, Any], draw: int) -> dict[str, Any]:
        val, test = self.cfg.data.val_split, self.cfg.data.test_split
        return probe_result(self.probe.accuracy(self.probe_config(cell, draw), point["C"], (val, test)), val, test,
                            point["C"])

    # -- 4. the cost of P -------------------------------------------------------------------------
    def measure_cost(self) -> None:
        """A solo few-shot run per (P, method), draw 0, one at a time in this process: init time, time per
        optimizer step and, on a GPU, peak memory allocated; kept in the run's cost.json (a re-run reuses it;
        a run cut before writing it starts over: it is a measurement, not a result)."""
        import shutil

        import torch

        from vipamin_scale.packs import run_packed

        if not self.s.cost or not self.s.shots:
            return
        k = list(P.draws_per_shot(self.cfg))[0]
        for cell, st in self.state.items():
            point = st.point()
            if cell.regime != P.FEW or cell.shots != k or cell.length is None or point is None:
                continue
            where = self.root / "cost" / cell.key / P.params_slug(point)
            record = where / "cost.json"
            if record.is_file():
                self.cost[(cell.length, cell.method)] = json.loads(record.read_text())
                continue
            shutil.rmtree(where, ignore_errors=True)
            cfg, said = P.run_config(self.cfg, cell, point, 0, self.data(cell, 0), where)  # its own init: timed
            runs.write_overrides(where, ["regime=cost of P (solo)", *said[1:]])  # never paired with the finals
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            self.progress.begin(f"the cost of P (P={cell.length}, {cell.method})", [cfg], 0)
            result = run_packed([cfg], keep_going=True, events=self.progress)[0] or {}
            ok = result.get("status", "ok") == "ok" and result.get("steps")
            cost = {"init_time_s": result["init_time_s"] if ok else None,
                    "step_s": result["train_time_s"] / result["steps"] if ok else None,
                    "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if ok and cuda else None}
            if ok:
                runs.write_json(record, cost)
            self.cost[(cell.length, cell.method)] = cost

    # -- 5. the record ----------------------------------------------------------------------------
    def cell_record(self, cell: P.Cell) -> dict[str, Any]:
        st = self.state[cell]
        probe = self.methods[cell.method].probe
        final = self.results.get(cell, [])
        tests = [_test_acc(r) for r in final]
        out: dict[str, Any] = {"regime": cell.regime, "shots": cell.shots, "length": cell.length,
                               "method": cell.method, "key": cell.key, "n": cell.n,
                               "results": stats.summary(tests), "runs": [_run_entry(r, d) for d, r in enumerate(final)]}
        if st.sel is not None:
            winner = st.sel.winner()
            draws = self.selection_draws(cell)
            out["selected"] = {
                "params": st.point(), "val_acc": None if winner is None else st.sel.scores[winner],
                "at_edge": st.sel.at_edge(), "extensions": st.sel.extensions,
                "trials": [{"params": p, "val_acc": st.sel.scores.get(c),
                            "val_by_draw": [val_score(st.trials.get((c, d))) for d in draws] if not probe or
                            cell.regime == P.FEW else [], "dirs": [st.dirs.get((c, d)) for d in draws]}
                           for c, p in enumerate(st.sel.points)]}
        else:
            out["selected"] = {"params": st.point(), "given": True}
        return out


def find_runs(root: Path) -> list[Path]:
    """Every run directory of the study (its runs and its cost runs)."""
    return [d for sub in ("runs", "cost") for d in runs.find_run_dirs(root / sub) if (root / sub).is_dir()]


def _test_acc(result: Optional[dict[str, Any]]) -> Optional[float]:
    if not result or result.get("status", "ok") != "ok":
        return None
    return (result.get("test") or {}).get("acc")


def _run_entry(result: Optional[dict[str, Any]], draw: int) -> dict[str, Any]:
    r = result or {}
    return {"draw": draw, "dir": r.get("dir"), "fingerprint": r.get("fingerprint"),
            "status": r.get("status", "ok") if r else "missing", "val": val_score(r), "test": _test_acc(r),
            "error": (r.get("error") or "").splitlines()[0][:300] if r.get("error") else None,
            "steps": r.get("steps"), "train_time_s": r.get("train_time_s"), "init_time_s": r.get("init_time_s")}


# ----------------------------------------------------------------------------- the directory's protocol


def check_directory(root: Path, record: dict[str, Any], write: bool = True) -> None:
    """protocol.json: written by the first study into `root`; a later one must agree (`protocol_changes`),
    else one ConfigError naming every field, before anything runs. Methods recorded are extended by new ones.
    `write=False` (a worker other than the leader): waits for the leader's protocol.json, then checks it."""
    path = root / PROTOCOL
    waited = time.monotonic()
    while not write and not path.is_file():
        if time.monotonic() - waited > LEADER_WAIT_S:
            raise ConfigError(f"study: {path}: worker 0 did not write it within {LEADER_WAIT_S:.0f} s; is worker 0 "
                              f"running, with the same hydra.run.dir?")
        time.sleep(0.5)
    old = runs.read_json(path)
    if old is not None:
        diff = P.protocol_changes(old, record)
        if diff:
            raise ConfigError(f"study: {root} holds a study of another protocol ({'; '.join(diff)}); use the same "
                              f"settings to continue it, or another hydra.run.dir")
        record = {**record, "methods": {**old.get("methods", {}), **record["methods"]}}
    if write:
        runs.write_json(path, record)


def read_json_arg(value: str, what: str) -> dict[str, Any]:
    """A JSON a study field names: a path, or `package:<name>` (a file shipped in vipamin_scale)."""
    try:
        if value.startswith("package:"):
            return json.loads(resources.files("vipamin_scale").joinpath(value.split(":", 1)[1]).read_text())
        return json.loads(Path(value).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}: {value}: unreadable ({type(exc).__name__}: {exc})") from None


def selected_from(cfg: DictConfig) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """({cell key: selected point}, what to record of it) from another study's record (study.selected_from).
    Reused only where it selected under this study's schedules and the same methods (what their runs share but the
    selected fields: else one ConfigError naming the fields); on another backbone or data it is reused with a
    warning, recorded and said in study.md."""
    doc = read_json_arg(cfg.study.selected_from, "study.selected_from")
    theirs = doc.get("selection_protocol")
    if theirs is None or "cells" not in doc:
        raise ConfigError(f"study.selected_from: {cfg.study.selected_from}: not a study's record (no "
                          f"selection_protocol and cells)")
    ours = selection_protocol(cfg)
    diff = [f"study.{d}" for d in P.differences(theirs.get("schedule", {}), ours["schedule"])]
    other = theirs.get("methods", {})
    for name in [m for m in ours["methods"] if m in other]:
        diff += [f"(method {name}) {d}" for d in P.differences(other[name], ours["methods"][name])]
    missing = [m for m in ours["methods"] if m not in other]
    if missing:
        raise ConfigError(f"study.selected_from: {cfg.study.selected_from} selected no settings for "
                          f"{', '.join(missing)}")
    if diff:
        raise ConfigError(f"study.selected_from: {cfg.study.selected_from} selected under another protocol "
                          f"({'; '.join(diff)})")
    subject = P.differences(theirs.get("subject", {}), ours["subject"])
    if subject:
        log.warning("study.selected_from: %s selected on another backbone or data (%s)", cfg.study.selected_from,
                    "; ".join(subject))
    chosen = {c["key"]: c["selected"]["params"] for c in doc["cells"] if c["selected"].get("params") is not None}
    return chosen, {"path": str(cfg.study.selected_from), "source": doc.get("source"), "subject_differs": subject}


SELECTABLE = ("train.lr", "train.weight_decay")  # what a selection chooses: never part of what it must agree on
SCHEDULE = ("min_steps", "warmup_fraction", "full_samples", "full_epochs", "full_batch")


def selection_protocol(cfg: DictConfig) -> dict[str, Any]:
    """What a cell's selected point depends on besides the selection's own settings: each method's runs (less
    what a selection chooses), the schedules, the backbone and data. A selection made by another study is
    reused only under the first two (`selected_from`)."""
    rec = P.protocol_record(cfg)
    return {"methods": {name: {k: v for k, v in ident.items() if k not in SELECTABLE and not P.in_subject(k)}
                        for name, ident in rec["methods"].items()},
            "schedule": {k: rec["study"][k] for k in SCHEDULE}, "subject": P.subject(cfg)}


def gate_from(cfg: DictConfig) -> dict[str, Any]:
    """The gate of another study's record (study.gate_from), when its gate ran this study's gate protocol."""
    doc = read_json_arg(cfg.study.gate_from, "study.gate_from")
    if not doc.get("gate") or "gate_protocol" not in doc:
        raise ConfigError(f"study.gate_from: {cfg.study.gate_from}: not a study's record with a gate")
    diff = P.differences(doc["gate_protocol"], gate_protocol(cfg))
    if diff:
        raise ConfigError(f"study.gate_from: {cfg.study.gate_from}: its gate ran another protocol ({'; '.join(diff)})")
    return {**doc["gate"], "from": str(cfg.study.gate_from)}


def gate_protocol(cfg: DictConfig) -> dict[str, Any]:
    """What fixes the gate: its prompt method's runs, the probe's backbone and data, the full-data schedule, the
    selection's settings and the gate's P."""
    ms = P.methods(cfg)
    baseline = ms[cfg.study.baselines[0]]
    probe = next((m for m in ms.values() if m.probe), P.Method(P.GATE_PROBE, {}, probe=True))
    return {"method": P.method_identity(cfg, baseline), "probe": P.method_identity(cfg, probe),
            "schedule": {k: P._plain(cfg.study[k]) for k in SCHEDULE}, "subject": P.subject(cfg),
            "selection": {k: P._plain(cfg.study[k]) for k in ("space", "extend_edges", "probe_C")},
            "length": P.gate_length(cfg)}


# ----------------------------------------------------------------------------- the whole study


def run_study(cfg: DictConfig) -> Optional[dict[str, Any]]:
    """The study (module docstring); returns its record, also written as <dir>/study.json with study.md and plots.
    Exit status: a failed gate (study.require_gate) raises GateFailed after writing study.json. Under torchrun or
    srun, every rank runs this as one of the study's workers (`worker`): worker 0 (the leader) holds the study's
    directory, runs the linear probe and the cost of P and writes the record; the others return None once the
    final runs have ended."""
    from vipamin_scale.study.tables import GateFailed, publish

    t0 = time.perf_counter()
    validate(cfg)
    P.check(cfg)
    rank, world = worker()
    if world > 1 and D.is_dist():
        raise ConfigError("study: its workers train alone; a process group is up in this process")
    if cfg.study.launcher == "slurm" and world == 1:  # the workers are Slurm array tasks; this process waits
        from vipamin_scale.study.slurm import run_on_slurm

        return run_on_slurm(cfg)
    study = Study(cfg, leader=rank == 0)
    chosen, given = selected_from(cfg) if cfg.study.selected_from else (None, None)
    reused_gate = gate_from(cfg) if cfg.study.gate_from else None
    with runs.hold(study.root) if study.leader else contextlib.nullcontext(), quiet_runs():
        check_directory(study.root, P.protocol_record(cfg), write=study.leader)
        study.progress = Progress(study.root, echo=print if study.leader else log.debug, status=study.leader).start()
        if world > 1:
            log.info("study: worker %d of %d (%s)", rank, world, "writes the record and tables" if study.leader else
                     "trains the packs it claims; worker 0 writes the record and tables")
        try:
            study.draw_roots()
            study.start_selection(chosen)
            study.select()
            study.finals()
            if not study.leader:
                study.progress.close("finished")
                return None
            study.measure_cost()
        except BaseException:
            study.progress.close("stopped")
            raise
        study.progress.close("finished", runs_total=len(find_runs(study.root)))
        doc = record(study, reused_gate, time.perf_counter() - t0)
        doc["selected_from"] = given
        publish(doc, study.root)
    if doc["gate"] is not None and not doc["gate"]["passed"] and cfg.study.require_gate:
        raise GateFailed(doc)
    return doc


def worker() -> tuple[int, int]:
    """(this worker's number, how many): the ranks of a torchrun or srun job (RANK, WORLD_SIZE), each a worker that
    plans the same study and claims its packs (`packs.run_packed`); (0, 1) when started alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def quiet_runs() -> Iterator[None]:
    """The runs' own INFO lines (each run's model, epochs, packs) held back while a study runs: its progress
    lines say what runs; warnings and errors still show."""
    names = ("vipamin_scale.train", "vipamin_scale.packs", "vipamin_scale.models", "vipamin_scale.init",
             "vipamin_scale.data", "vipamin_scale.checkpoint", "vipamin_scale.runs")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def record(study: Study, reused_gate: Optional[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """study.json: the protocol, the cut, what it ran on, every cell (selection, runs, summary), the paired
    differences, the gate and the cost of P."""
    from vipamin_scale.study.tables import gate_record, paired_records

    cfg = study.cfg
    cells = [study.cell_record(c) for c in study.cells]
    doc = {"name": cfg.study.name, "note": cfg.study.note, "cut": P.cut(cfg), "subject": P.subject(cfg),
           "protocol": P.protocol_record(cfg), "selection_protocol": selection_protocol(cfg),
           "gate_protocol": gate_protocol(cfg), "study": P._plain(cfg.study),
           "schedules": schedules(study), "cells": cells, "baselines": list(cfg.study.baselines),
           "methods": list(study.methods), "lengths": list(cfg.study.lengths),
           "shots": {str(k): n for k, n in P.draws_per_shot(cfg).items()}, "seconds": seconds,
           "cost": [{"length": p, "method": m, **c} for (p, m), c in sorted(study.cost.items())]}
    # pack_size=auto: the K this process (worker 0) measured per phase; each worker measures its own device
    doc["pack_sizes"] = dict(study.progress.pack_sizes) if study.progress is not None else {}
    doc["paired"] = paired_records(doc)
    doc["gate"] = (reused_gate or gate_record(doc, cfg)) if cfg.study.gate else None
    return doc


def schedules(study: Study) -> dict[str, dict[str, Any]]:
    """Each regime's schedule ({k}-shot, full) as its runs train it."""
    out = {}
    seen = set()
    for cell in study.cells:
        name = f"{cell.shots}-shot" if cell.regime == P.FEW else "full"
        if name in seen or cell.length is None:
            continue
        seen.add(name)
        n = study.data(cell, 0)["n"]
        out[name] = {"n": n, **P.cell_schedule(study.cfg, cell, n)}
    return out
