"""A run directory's integrity, driven through the CLI: identity on resume, a finished run kept, one
writer, non-finite training stops, strict JSON, and one line (exit 2) for every error a user can cause."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess

import pytest
import torch
from conftest import TINY, cli, cli_env

from vipamin_scale import checkpoint as ckpt


def _train(run_dir, *overrides, env=None, extra=()):
    return subprocess.run(cli("train", *TINY, f"hydra.run.dir={run_dir}", *extra, *overrides), env=env or cli_env(),
                          capture_output=True, text=True, timeout=600)


def _last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def _strict(text: str):
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _snapshot(path):
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.mark.slow
def test_resume_checks_identity_and_a_finished_run_is_kept(tmp_path, digits_root):
    run = tmp_path / "run"
    cut = _train(run, env=cli_env(VIPAMIN_SCALE_KILL_AT_STEP="11"))
    assert cut.returncode == -signal.SIGKILL
    ckpts = [p.name for p in ckpt.list_checkpoints(run / "checkpoints")]
    # the case: a cut random/mean-pool run resumed as VIPAMIN with CLS pooling
    other = _train(run, "train.resume=true", "model.pool=cls", "init=vipamin")
    assert other.returncode == 2, other.stderr[-3000:]
    line = _last_line(other)
    assert line.startswith(f"error: train.resume: {run} holds a run made under another config"), line
    assert "init.method: random -> vipamin" in line and "model.pool: mean -> cls" in line
    assert "Traceback" not in other.stderr
    assert "taking over the stale lock" in other.stdout + other.stderr  # the killed process's lock
    assert not (run / "run.lock").exists()
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ckpts
    assert not (run / "result.json").exists() and not (run / "prompts.safetensors").exists()

    # the same config without train.resume: refused, never trained over the cut run's checkpoints
    metrics = _snapshot(run / "metrics.jsonl")
    fresh = _train(run)
    assert fresh.returncode == 2 and _last_line(fresh) == (
        f"error: train.out_dir: {run} holds a run (unfinished: checkpoint {ckpts[-1]}); continue it with "
        "train.resume=true, start it over with train.overwrite=true, or use another directory"), fresh.stderr[-2000:]
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ckpts
    assert _snapshot(run / "metrics.jsonl") == metrics
    both = _train(run, "train.resume=true", "train.overwrite=true")
    assert both.returncode == 2 and _last_line(both).startswith("error: train.overwrite: starts the run over")

    # the same config resumes and finishes
    done = _train(run, "train.resume=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr and not (run / "run.lock").exists()
    result = _strict((run / "result.json").read_text())
    assert "status" not in result and result["steps"] == 24 and result["method"] == "random"
    record = _strict((run / "run.json").read_text())
    assert record["status"] == "finished" and record["identity"]["model.pool"] == "mean"
    assert "train.out_dir" not in record["identity"] and "train.resume" not in record["identity"]
    before = _snapshot(run / "result.json")

    # resume=true on the finished run (Slurm scripts always pass it): nothing rewritten, exit 0
    again = _train(run, "train.resume=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "holds a finished run; nothing to do" in again.stdout + again.stderr
    assert _snapshot(run / "result.json") == before

    # a failed start into the finished run's directory: one line, the result kept
    typo = _train(run, "train.lr=-1")
    assert typo.returncode == 2 and _last_line(typo) == "error: train.lr: must be >= 0; got -1.0"
    assert _snapshot(run / "result.json") == before
    fresh = _train(run, "init=vipamin")
    assert fresh.returncode == 2 and "holds a run (finished: checkpoint" in _last_line(fresh)
    assert _snapshot(run / "result.json") == before

    # train.overwrite=true starts it over, under another config: the earlier run's files are gone, not mixed in
    over = _train(run, "train.overwrite=true", "init=vipamin")
    assert over.returncode == 0, over.stderr[-3000:]
    assert f"train.overwrite: {run} held a run (finished: checkpoint" in over.stdout + over.stderr
    assert _strict((run / "result.json").read_text())["method"] == "vipamin"
    assert _strict((run / "run.json").read_text())["identity"]["init.method"] == "vipamin"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # one run's log, not two appended


@pytest.mark.slow
def test_one_writer_per_run_dir(tmp_path, digits_root):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / "run.lock"
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    lock.write_text(json.dumps(holder))  # this (live) test process writes into the directory
    second = _train(run, "train.epochs=1")
    assert second.returncode == 2, second.stderr[-3000:]
    assert _last_line(second).startswith(f"error: train.out_dir: {run} is in use by pid {os.getpid()} on host "
                                         f"{socket.gethostname()}")
    assert "Traceback" not in second.stderr
    assert json.loads(lock.read_text()) == holder
    assert not (run / "metrics.jsonl").exists() and not (run / "result.json").exists()
    assert not (run / "run.json").exists() and not (run / "checkpoints").exists()

    gone = subprocess.Popen(["true"])
    gone.wait()  # a dead pid on this host: a stale lock, taken over with a warning
    lock.write_text(json.dumps({**holder, "pid": gone.pid}))
    took = _train(run, "train.epochs=1")
    assert took.returncode == 0, took.stderr[-3000:]
    assert f"taking over the stale lock {lock} (pid {gone.pid} is gone)" in took.stdout + took.stderr
    assert not lock.exists() and _strict((run / "result.json").read_text())["steps"] == 256 // 32


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_with_strict_json(tmp_path, digits_root):
    run = tmp_path / "run"
    proc = _train(run, "train.lr=1e30", "train.epochs=2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _last_line(proc)
    assert re.match(r"error: train: the loss is (nan|inf|-inf) at step \d+ \(epoch 0\), lr \S+;", line), line
    assert "Traceback" not in proc.stderr
    step = int(line.split(" at step ")[1].split()[0])
    records = [_strict(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, step))
    result = _strict((run / "result.json").read_text())
    assert result["status"] == "failed" and "TrainingDiverged" in result["error"]
    assert _strict((run / "run.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("content, message", [
    ("nan", "the `prompts` tensor has 1 non-finite (NaN/Inf) or non-float values of 512"),
    ("garbage", "is not a readable safetensors file (Error while deserializing header: header too large)"),
])
@pytest.mark.slow
def test_bad_prompts_file_is_one_line_naming_it(tmp_path, content, message):
    path = tmp_path / "prompts.safetensors"
    if content == "nan":
        from safetensors.torch import save_file

        prompts = torch.zeros(2, 4, 64)  # (L_p, P, d) of TINY: deep, P=4, d=64
        prompts[1, 2, 3] = float("nan")
        save_file({"prompts": prompts}, str(path))
    else:
        path.write_bytes(b"\xff" * 64)
    proc = _train(tmp_path / "run", f"prompt.init_file={path}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _last_line(proc).startswith(f"error: prompt.init_file: {path}") and message in _last_line(proc)
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    if content == "garbage":  # the documented debug switch adds the traceback, same last line
        debug = _train(tmp_path / "run", f"prompt.init_file={path}", env=cli_env(VIPAMIN_SCALE_DEBUG="1"))
        assert debug.returncode == 2 and "Traceback" in debug.stderr and _last_line(debug) == _last_line(proc)


@pytest.mark.slow
def test_backbone_file_that_does_not_fit_is_one_line(tmp_path):
    """Before: models/backbones.py had its own CheckpointError, a RuntimeError: a traceback, exit 1."""
    from vipamin_scale.models.backbones import build_backbone

    weights = build_backbone("vit_test_d64").state_dict()
    del weights["norm.weight"]
    path = tmp_path / "w.pth"
    torch.save(weights, path)
    proc = _train(tmp_path / "run", f"model.checkpoint={path}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _last_line(proc).startswith(f"error: {path}: does not fit the model: missing norm.weight")
    assert "Traceback" not in proc.stderr


def _unwritable(tmp_path):
    """A directory this process cannot create files in (read-only for a user; /sys for root)."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro / "run"
    return "/sys/vipamin_scale_test_run"


@pytest.mark.slow
def test_unwritable_run_dir_is_one_line_naming_the_path(tmp_path):
    target = _unwritable(tmp_path)
    for extra in ([f"train.out_dir={target}"], []):
        run_dir = tmp_path / "hydra" if extra else target
        proc = _train(run_dir, "train.epochs=1", extra=extra)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert _last_line(proc).startswith(f"error: {target}: "), proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr


def test_identity_keeps_what_changes_a_result():
    from vipamin_scale.config import default_config
    from vipamin_scale.runs import differences, fingerprint, identity

    base = default_config(data__batch_size=32)
    same = default_config(data__batch_size=32, train__out_dir="elsewhere", train__resume=True, train__progress=False,
                          engine__name="deepspeed", engine__zero_stage=3, tune__eta=4)
    a, b = identity(base), identity(same)  # data.batch_size is the global batch: no world size in the identity
    assert a["data.batch_size"] == 32 and fingerprint(a) == fingerprint(b)
    other = identity(default_config(data__batch_size=16, prompt__length=8, init__lam=0.25))
    assert differences(a, other) == ["data.batch_size: 32 -> 16", "init.lam: 0.5 -> 0.25", "prompt.length: 10 -> 8"]


@pytest.mark.slow
def test_the_checkpoint_vouches_for_the_run_when_run_json_is_lost(tmp_path, digits_root, caplog):
    """Issue 25's hole: a run trained 2 of its 3 epochs as random at lr 0.5 (a real run, its last
    checkpoint removed: what a kill after epoch 2 leaves), its run.json deleted, resumed as VIPAMIN at
    lr 0.1. Before: it resumed silently and wrote a run.json saying vipamin at 0.1. Now the checkpoint's
    recorded config refuses it, naming the fields, and run.json is rewritten from the checkpoint (one
    warning). A garbled run.json with the same config: one warning, and the run finishes as it would."""
    import vipamin_scale
    from vipamin_scale import runs

    run = tmp_path / "run"
    base = [*TINY, "data.max_train_samples=64", "train.test_at_end=false", "train.loggers=[jsonl]",
            f"hydra.run.dir={run}"]  # 3 epochs of 2 steps
    vipamin_scale.train(vipamin_scale.compose(base))
    (run / "checkpoints" / "ckpt-00000006.safetensors").unlink()
    (run / "result.json").unlink()
    (run / "run.json").unlink()
    caplog.set_level("WARNING", logger="vipamin_scale")
    other = vipamin_scale.compose([*base, "train.resume=true", "init=vipamin", "train.lr=0.1"])
    with pytest.raises(runs.RunMismatch) as refused:
        vipamin_scale.train(other)
    line = str(refused.value)
    assert line.startswith(f"train.resume: {run} holds a run made under another config (")
    assert "init.method: random -> vipamin" in line and "train.lr: 0.5 -> 0.1" in line and "\n" not in line
    warned = [r.getMessage() for r in caplog.records if "run.json" in r.getMessage()]
    assert warned == [f"{run / 'run.json'} is missing; rewritten from the config recorded in "
                      f"{run / 'checkpoints' / 'ckpt-00000004.safetensors'}"]
    record = _strict((run / "run.json").read_text())  # from the checkpoint, never from the refused config
    assert record["status"] == "running" and record["identity"]["init.method"] == "random"
    assert record["identity"]["train.lr"] == 0.5 and record["fingerprint"] == runs.fingerprint(record["identity"])
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["ckpt-00000004.safetensors"]
    assert not (run / "result.json").exists() and not (run / "prompts.safetensors").exists()

    (run / "run.json").write_text("{garbled")
    caplog.clear()
    result = vipamin_scale.train(vipamin_scale.compose([*base, "train.resume=true"]))
    warned = [r.getMessage() for r in caplog.records if "run.json" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"{run / 'run.json'} is unreadable (")
    assert result["steps"] == 6 and result["method"] == "random"
    record = _strict((run / "run.json").read_text())
    assert record["status"] == "finished" and record["identity"]["train.lr"] == 0.5


def test_every_field_counts_in_the_identity_unless_it_says_it_does_not():
    """Identity and ranges are declared at the field: a field is in a run's identity unless the schema
    marks it `identity=False` (so a new field lands in it by default), and the derived lists are the ones
    kept by hand before (runs.IGNORED, config._POSITIVE / _NON_NEGATIVE / _UNIT_INTERVAL)."""
    import dataclasses

    from omegaconf import OmegaConf

    from vipamin_scale import config
    from vipamin_scale.runs import IGNORED, identity

    ident = identity(config.default_config())
    for name, f in config.schema_fields():
        listed = any(k == name or k.startswith(name + ".") for k in ident)
        assert listed == config.in_identity(name), name
        assert listed or f.metadata.get("identity") is False or not config.in_identity(name.split(".")[0]), name
    assert set(IGNORED) == {"train.out_dir", "train.resume", "train.overwrite", "train.progress", "train.log_every",
                            "train.keep_last", "data.root", "data.num_workers", "data.pin_memory", "init.batch_size", "out", "engine",
                            "tune", "study", "train.compile", "train.init_cache"}
    assert {k for k, r in config.RANGES.items() if r == "positive"} == {
        "model.img_size", "prompt.length", "prompt.bpt_rank", "init.num_images", "init.batch_size", "init.k",
        "init.kmeans_iters", "data.batch_size", "data.eval_batch_size", "train.eval_every", "train.keep_last",
        "train.log_every", "tune.min_epochs", "tune.workers", "tune.select_draws",
        "study.select_draws", "study.full_samples", "study.full_epochs", "study.full_batch", "study.workers"}
    assert config.PACK_SIZES == ("tune.pack_size", "study.pack_size")  # null | an int >= 1 | auto (test_pack_memory)
    assert {k for k, r in config.RANGES.items() if r == "non_negative"} == {
        "data.num_workers", "data.max_skip", "train.epochs", "train.lr", "train.weight_decay", "train.warmup_epochs",
        "init.bpt_eps", "data.shuffle_buffer", "tune.final_seeds", "study.min_steps", "study.full_seeds"}
    assert {k for k, r in config.RANGES.items() if r == "unit"} == {"init.lam", "prompt.dropout", "study.warmup_fraction"}
    says = {"positive": (0, "must be > 0"), "non_negative": (-1, "must be >= 0"), "unit": (1.5, "must lie in [0, 1]")}
    for key, kind in config.RANGES.items():  # each declared range is checked, with the same message as before
        bad, message = says[kind]
        cfg = config.default_config(**{key.replace(".", "__"): bad})
        with pytest.raises(config.ConfigError) as err:
            config.validate(cfg)
        assert str(err.value) == f"{key}: {message}; got {OmegaConf.select(cfg, key)!r}", key
    plain = dataclasses.field(default=1)  # an undeclared field: in the identity
    assert plain.metadata.get("identity", True) and config.positive(1).metadata["range"] == "positive"


def test_runs_are_read_back_through_their_records(tmp_path):
    """`find_run_dirs` / `run_status` / `run_config` / `run_overrides`: a Hydra job is described by
    Hydra's own files, a run made without Hydra (a tune's inline trial) by its run record alone."""
    from omegaconf import OmegaConf

    from vipamin_scale import runs
    from vipamin_scale.config import default_config
    from vipamin_scale.studies import find_runs

    root = tmp_path / "sweep"
    plain, failed, cut, hydra_job = root / "a", root / "b", root / "c", root / "d"
    for d, lr in ((plain, 0.1), (failed, 0.2), (cut, 0.3)):
        d.mkdir(parents=True)
        runs.begin(d, default_config(train__lr=lr, train__out_dir=str(d)))
    runs.finish(plain, {"final_eval": {"acc": 0.5}})
    assert runs.record_failure(failed, "RuntimeError: boom")
    (cut / "checkpoints" / "x").mkdir(parents=True)
    runs.write_json(cut / "checkpoints" / "x" / runs.RESULT, {})  # inside a run's checkpoints: not a run
    (hydra_job / ".hydra").mkdir(parents=True)
    (hydra_job / ".hydra" / "overrides.yaml").write_text("- train.lr=0.4\n")
    (hydra_job / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml({"train": {"lr": 0.4}}))
    runs.write_json(hydra_job / "result.rank1.json", {"status": "failed", "error": "rank 1 lost", "rank": 1})
    (root / "tune.json").write_text("{}")  # not a run directory

    assert runs.find_run_dirs(root) == [plain, failed, cut, hydra_job]
    assert [runs.run_status(d)[0] for d in (plain, failed, cut, hydra_job)] == ["ok", "failed", "incomplete", "failed"]
    assert runs.run_status(hydra_job)[1] == {"error": "rank 1 lost"}
    assert runs.has_ended(plain) and runs.has_ended(failed) and not runs.has_ended(cut)
    assert runs.run_config(plain)["train"]["lr"] == 0.1 and runs.run_config(hydra_job) == {"train": {"lr": 0.4}}
    assert runs.run_overrides(hydra_job) == ["train.lr=0.4"]
    assert "train.lr=0.1" in runs.run_overrides(plain) and "model.pool=cls" in runs.run_overrides(plain)
    assert not any(o.startswith("train.out_dir=") for o in runs.run_overrides(plain))  # identity only
    table = {r.name: r for r in find_runs(root)}
    assert list(table) == ["a", "b", "c", "d"] and table["c"].status == "incomplete"
    assert table["a"].value("train.lr") == 0.1 and table["d"].value("train.lr") == 0.4
