"""How many runs a pack holds (issue 31, item 2): `pack_size=auto` from a measured step (vipamin_scale/pack_memory.py),
its config fields; a pack that runs out of device memory split in two down to solo runs (`packs.train_or_split`),
each run equal to the same pack trained whole."""
from __future__ import annotations

import json
import logging
import subprocess

import pytest
import torch
from conftest import cli, cli_env
from test_pack import _cfg, _same_run

from vipamin_scale import checkpoint as ckpt
from vipamin_scale import runs
from vipamin_scale.config import ConfigError, default_config, validate
from vipamin_scale.faults import OOM_ABOVE_K_ENV
from vipamin_scale.pack_memory import CPU_PACK_SIZE, auto_pack_size, resolve_pack_size
from vipamin_scale.packs import run_packed
from vipamin_scale.train import PackTrainer, measure_pack_memory

GiB = 2 ** 30


def test_auto_takes_the_largest_pack_whose_measured_step_fits(tmp_path):
    """Train-step peaks of 10 GiB at K = 1 and 12 GiB at K = 2 (measured on copies of the run: random prompts, fresh
    directories of their own) are a base of 8 GiB and 2 GiB per run: 0.85 of 80 GiB holds floor((68 - 8) / 2) = 30
    runs, half of it (two processes on the device) 13. An eval batch that grows faster binds instead; a device that
    does not hold one run, or a measured pack that runs out of memory, gives K = 1."""
    cfg = _cfg(tmp_path / "run", "init=vipamin", "train.loggers=[jsonl,tensorboard]")
    seen = []

    def measured(peaks):
        def measure(cfgs):
            seen.append(cfgs)
            return peaks[len(cfgs)]
        return measure

    measure = measured({1: (10 * GiB, 9 * GiB), 2: (12 * GiB, 9.5 * GiB)})
    k, how = auto_pack_size(cfg, measure=measure, capacity=80 * GiB)
    assert k == 30 and how == ("measured: a step 10.00 GiB at K=1, 12.00 GiB at K=2 (base 8.00 + 2.00 per run); an "
                               "eval batch 9.00 GiB at K=1, 9.50 GiB at K=2 (base 8.50 + 0.50 per run); 0.85 x 80.00 "
                               "GiB holds K=30")
    assert [len(c) for c in seen] == [1, 2]
    dirs = {c.train.out_dir for cfgs in seen for c in cfgs}
    assert len(dirs) == 3 and not any(d.startswith(str(tmp_path)) for d in dirs)
    assert {(c.init.method, tuple(c.train.loggers), c.train.resume) for cfgs in seen for c in cfgs} == {
        ("random", ("jsonl",), False)}
    assert auto_pack_size(cfg, measure=measure, capacity=80 * GiB, processes=2)[0] == 13  # floor((34 - 8) / 2)
    eval_binds = measured({1: (10 * GiB, 9 * GiB), 2: (12 * GiB, 13 * GiB)})  # floor((68 - 5) / 4)
    assert auto_pack_size(cfg, measure=eval_binds, capacity=80 * GiB)[0] == 15
    k, how = auto_pack_size(cfg, measure=measure, capacity=11 * GiB)
    assert k == 1 and how.endswith("holds no run: K=1, which may run out of memory as its solo run would")

    def out_of_memory_above(n):
        def measure(cfgs):
            if len(cfgs) > n:
                raise torch.OutOfMemoryError("CUDA out of memory (the test's)")
            return 10 * GiB, 10 * GiB
        return measure

    for n in (0, 1):  # the measured pack itself runs out of memory: K = 1
        assert auto_pack_size(cfg, measure=out_of_memory_above(n), capacity=80 * GiB) == (
            1, f"a pack of {n + 1} ran out of device memory in the measurement: K=1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU default")
def test_auto_on_a_cpu_is_the_stated_default_and_launchers_resolve_it(tmp_path, monkeypatch, caplog):
    cfgs = [_cfg(tmp_path / str(i), f"train.lr={0.1 * (i + 1)}", *(["prompt.length=3"] if i == 2 else []))
            for i in range(3)]
    with caplog.at_level(logging.INFO, logger="vipamin_scale.pack_memory"):
        assert auto_pack_size(cfgs[0]) == (CPU_PACK_SIZE, "the CPU default: packs gain little on a CPU "
                                                          "(benchmarks/RESULTS.md, Packs)") and CPU_PACK_SIZE == 4
    assert [r.getMessage() for r in caplog.records] == [
        "pack_size=auto: K=4 (the CPU default: packs gain little on a CPU (benchmarks/RESULTS.md, Packs))"]
    assert resolve_pack_size("auto", cfgs, "tune.pack_size") == 4  # two compatible groups, one K each, the smallest
    assert resolve_pack_size(None, cfgs, "tune.pack_size") is None and resolve_pack_size(3, cfgs, "tune.pack_size") == 3
    with pytest.raises(ConfigError, match=r"^hydra\.launcher\.pack_size: must be an int >= 1, auto .* got 'foo'$"):
        resolve_pack_size("foo", cfgs, "hydra.launcher.pack_size")
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun, no process group: the ranks plan alone
    with pytest.raises(ConfigError, match=r"^hydra\.launcher\.pack_size: auto measures this rank's device"):
        resolve_pack_size("auto", cfgs, "hydra.launcher.pack_size")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU default")
def test_the_tune_packed_launcher_resolves_auto_at_its_first_rung(tmp_path, monkeypatch, caplog):
    import vipamin_scale.packs as packs
    from vipamin_scale.tune.launchers import PackedLauncher, Trial

    sizes = []
    monkeypatch.setattr(packs, "run_packed", lambda cfgs, pack_size, keep_going: sizes.append(pack_size))
    base = _cfg(tmp_path / "tune", "tune.launcher=packed", "tune.pack_size=auto")
    launcher = PackedLauncher.from_config(base, [], None)
    with caplog.at_level(logging.INFO, logger="vipamin_scale.pack_memory"):
        for rung in range(2):
            launcher.run([Trial(f"rung{rung}/c{i}", tmp_path / f"rung{rung}" / f"c{i}", {}, {"train.lr": 0.1 * (i + 1)})
                          for i in range(3)])
    assert sizes == [4, 4] and len([r for r in caplog.records if r.name == "vipamin_scale.pack_memory"]) == 1


def test_pack_size_auto_is_accepted_and_a_bad_value_is_one_line_naming_the_field(tmp_path):
    for key in ("tune.pack_size", "study.pack_size"):
        for good in (None, 1, 7, "auto"):
            validate(default_config(**{key.replace(".", "__"): good}))
        for bad in ("foo", 0, 2.5, "4"):
            with pytest.raises(ConfigError) as err:
                validate(default_config(**{key.replace(".", "__"): bad}))
            assert str(err.value) == (f"{key}: must be an int >= 1, auto (as many runs as the device's memory holds) "
                                      f"or null (every compatible run); got {bad!r}")
    proc = subprocess.run(cli("train", "-m", "hydra/launcher=packed", "hydra.launcher.pack_size=foo",
                              f"hydra.sweep.dir={tmp_path / 'sweep'}"), env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "error: hydra.launcher.pack_size: must be an int >= 1, auto (as many runs as the device's memory holds) or "
        "null (every compatible run); got 'foo'"] and not (tmp_path / "sweep").exists()


def test_a_packs_step_and_eval_are_measured_through_the_trainer(tmp_path, digits_root):
    """`measure_pack_memory` builds the pack with the trainer, takes its steps and evaluates a batch (on a CPU: the
    CPU allocator's peaks): a second run adds to both; the caller's global RNG streams are as they were."""
    cfgs = [_cfg(tmp_path / f"r{i}", "init=random", f"train.lr={0.1 * (i + 1)}") for i in range(2)]
    rng = torch.get_rng_state()
    one, two = measure_pack_memory(cfgs[:1]), measure_pack_memory(cfgs)
    assert all(0 < a < b for a, b in zip(one, two)) and torch.equal(torch.get_rng_state(), rng), (one, two)
    assert not any((tmp_path / f"r{i}" / name).exists() for i in range(2) for name in (runs.RUN, runs.CHECKPOINTS))


def test_a_run_out_of_memory_alone_after_a_split_fails_alone(tmp_path, digits_root, monkeypatch):
    """VIPAMIN_SCALE_OOM_ABOVE_K=0: a pack of two splits, each run runs out of memory alone and is recorded failed
    (run_packed returns, the other run was tried); a pack of one given as such raises, as its solo run does."""
    monkeypatch.setenv(OOM_ABOVE_K_ENV, "0")
    cfgs = [_cfg(tmp_path / n, "init=random", f"train.lr={lr}") for n, lr in (("a", 0.1), ("b", 0.3))]
    results = run_packed(cfgs)
    for name, result in zip("ab", results):
        assert result["status"] == "failed" and result["error"].startswith(
            "OutOfMemoryError: CUDA out of memory (simulated: VIPAMIN_SCALE_OOM_ABOVE_K=0, K=1)")
        assert json.loads((tmp_path / name / runs.RUN).read_text())["status"] == "failed"
    with pytest.raises(torch.OutOfMemoryError):
        run_packed([_cfg(tmp_path / "c", "init=random")])


@pytest.mark.slow
def test_a_pack_out_of_memory_is_split_and_each_run_equals_the_whole_pack(tmp_path, digits_root, monkeypatch, caplog):
    """A pack of 4 runs (lrs, seeds) that runs out of memory at its first step (VIPAMIN_SCALE_OOM_ABOVE_K=1, after the
    build) is split 4 -> 2 + 2 -> 1 + 1 (one warning per split), each part trained from its start in the directories
    the failed attempts started (the study's overrides.json kept): every run equals the same pack trained whole, with
    one attempt's metrics. Packs of 2 that run out of memory after their first checkpoint (step 3): the attempt's
    checkpoints dropped, a fresh run starts over, a resuming run resumes where the pack started (here: step 0)."""
    grid = {f"r{i}": [f"train.lr={lr}", f"train.seed={s}", f"init.seed={s}"]
            for i, (lr, s) in enumerate([(0.1, 0), (0.3, 0), (0.2, 1), (0.5, 1)])}
    whole = run_packed([_cfg(tmp_path / "whole" / n, "init=random", *o) for n, o in grid.items()])
    assert [r["pack_size"] for r in whole] == [4] * 4
    for n, o in grid.items():
        runs.write_overrides(tmp_path / "split" / n, o)
    monkeypatch.setenv(OOM_ABOVE_K_ENV, "1")
    with caplog.at_level(logging.INFO):
        split = run_packed([_cfg(tmp_path / "split" / n, "init=random", *o) for n, o in grid.items()])
    lines = [r.getMessage() for r in caplog.records if "ran out of device memory" in r.getMessage()]
    d = tmp_path / "split"
    assert lines == [f"a pack of 4 runs ({d / 'r0'} ... {d / 'r3'}) ran out of device memory: split into packs of 2 "
                     "and 2, each trained from its start",
                     f"a pack of 2 runs ({d / 'r0'} ... {d / 'r1'}) ran out of device memory: split into packs of 1 "
                     "and 1, each trained from its start",
                     f"a pack of 2 runs ({d / 'r2'} ... {d / 'r3'}) ran out of device memory: split into packs of 1 "
                     "and 1, each trained from its start"]
    assert [r["pack_size"] for r in split] == [1] * 4
    for n, o in grid.items():
        _same_run(d / n, tmp_path / "whole" / n)
        _one_attempt(d / n, tmp_path / "whole" / n)
        assert runs.run_overrides(d / n) == o

    monkeypatch.delenv(OOM_ABOVE_K_ENV)
    real = PackTrainer.train_step

    def step(self, batches, live):
        if len(self.pack) > 1 and self.state.step == 2:  # epoch 0 (2 steps) ended: its checkpoints are written
            assert all(ckpt.latest(run.out_dir / runs.CHECKPOINTS) is not None for run in self.pack)
            raise torch.OutOfMemoryError("CUDA out of memory (the test's)")
        return real(self, batches, live)

    monkeypatch.setattr(PackTrainer, "train_step", step)
    caplog.clear()
    late = {"fresh": ("r0", "r1", []), "resumed": ("r2", "r3", ["train.resume=true"])}
    with caplog.at_level(logging.INFO):
        for kind, (a, b, extra) in late.items():
            results = run_packed([_cfg(tmp_path / kind / n, "init=random", *grid[n], *extra) for n in (a, b)])
            assert [r["pack_size"] for r in results] == [1, 1]
            for n in (a, b):
                _same_run(tmp_path / kind / n, tmp_path / "whole" / n)
                _one_attempt(tmp_path / kind / n, tmp_path / "whole" / n)
    assert not [r for r in caplog.records if r.getMessage().startswith("resumed from")]


def _one_attempt(run, whole) -> None:
    """The run's metrics hold as many records as the whole pack's run (no failed attempt's left beside them)."""
    records = [len((d / "metrics.jsonl").read_text().splitlines()) for d in (run, whole)]
    assert records[0] == records[1], records
