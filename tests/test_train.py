"""The training loop and the CLI, end to end on a tiny ViT and the embedded digits."""
from __future__ import annotations

import json
import signal
import subprocess

import pytest
import torch
from conftest import TINY, cli, cli_env

from vipamin_scale import checkpoint as ckpt
from vipamin_scale.config import ConfigError, default_config, validate


def _run(tmp, *overrides, env=None, check=True):
    proc = subprocess.run(cli("train", *TINY, f"hydra.run.dir={tmp}", *overrides), env=env or cli_env(),
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def _records(run_dir, event):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def _final_trainable(run_dir):
    return ckpt.load(ckpt.latest(run_dir / "checkpoints"))["trainable"]["params"]


@pytest.mark.slow
def test_training_lowers_loss_and_writes_outputs(tmp_path, digits_root):
    run = tmp_path / "run"
    _run(run)
    train = _records(run, "train")
    assert len(train) == 3 * (256 // 32)
    first, last = sum(r["loss"] for r in train[:3]) / 3, sum(r["loss"] for r in train[-3:]) / 3
    assert last < 0.93 * first, (first, last)
    result = json.loads((run / "result.json").read_text())
    assert result["best_val"]["acc"] > 0.15  # chance is 0.10; 297 val images: 5 sigma above it
    assert result["test"]["count"] == 500 and result["final_eval"]["count"] == 297
    assert result["trainable_params"] == 2 * 4 * 64 + 2 * 64 + 64 * 10 + 10  # prompts, fc_norm, head
    assert (run / "tensorboard").is_dir() and (run / "config.resolved.yaml").is_file()
    assert len(ckpt.list_checkpoints(run / "checkpoints")) == 2  # train.keep_last


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted(tmp_path, digits_root):
    """SIGKILL mid-epoch 2 (after the epoch-1 checkpoint), resume: same prompts and head, bit for bit."""
    full, broken = tmp_path / "full", tmp_path / "broken"
    _run(full, "prompt.dropout=0.1")
    proc = _run(broken, "prompt.dropout=0.1", env=cli_env(VIPAMIN_SCALE_KILL_AT_STEP="11"), check=False)
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in ckpt.list_checkpoints(broken / "checkpoints")] == ["ckpt-00000008.safetensors"]
    _run(broken, "prompt.dropout=0.1", "train.resume=true")
    a, b = _final_trainable(full), _final_trainable(broken)
    assert a.keys() == b.keys() == {"prompt.prompts", "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _records(broken, "train")[-1]["step"] == 24


@pytest.mark.slow
def test_bpt_resume_after_kill_recomputes_the_same_whitening(tmp_path, digits_root):
    """BPT (frozen whitening W, a buffer not in the checkpoint) with VIPAMIN's prompts: the resumed run
    recomputes W from its backbone and the calibration images; it ends where the uninterrupted one does."""
    args = ("prompt=bpt", "prompt.length=4", "init=vipamin", "init.num_images=64")
    full, broken = tmp_path / "full", tmp_path / "broken"
    _run(full, *args)
    proc = _run(broken, *args, env=cli_env(VIPAMIN_SCALE_KILL_AT_STEP="11"), check=False)
    assert proc.returncode == -signal.SIGKILL
    _run(broken, *args, "train.resume=true")
    a, b = _final_trainable(full), _final_trainable(broken)
    assert a.keys() == b.keys() == {"prompt.Z", "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_bad_config_is_one_line_naming_the_field(tmp_path):
    proc = subprocess.run(cli("train", *TINY, f"hydra.run.dir={tmp_path}", "init.lam=1.5"), env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: init.lam: must lie in [0, 1]; got 1.5"
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("override, field", [
    ({"init.k": 0}, "init.k"), ({"model.pool": "max"}, "model.pool"), ({"engine.zero_stage": 3}, "engine.zero_stage"),
    ({"init.official_compat": True, "init.orth_scale": "match"}, "init.official_compat"),
    ({"data.std": [1.0, 0.0, 1.0]}, "data.std"), ({"model.checkpoint": "/nonexistent.pth"}, "model.checkpoint"),
])
def test_validate_names_field(override, field):
    cfg = default_config(**{k.replace(".", "__"): v for k, v in override.items()})
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        validate(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vpt", "bpt"])
def test_backbone_read_from_disk_once_per_run(tmp_path, digits_root, monkeypatch, kind):
    """init=vipamin (and, for BPT, its whitening pass) run on the backbone that is then trained:
    the checkpoint file is read once in a training run, not once per consumer."""
    from safetensors.torch import save_file

    import vipamin_scale.models.backbones as backbones
    from vipamin_scale.train import run_training

    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in backbones.build_backbone("vit_test_d64", init_seed=5).state_dict().items()},
              str(path))
    reads = []
    real_read = backbones.read_checkpoint
    monkeypatch.setattr(backbones, "read_checkpoint", lambda p: reads.append(p) or real_read(p))
    cfg = default_config(model__name="vit_test_d64", model__img_size=32, model__checkpoint=str(path),
                         prompt__kind=kind, prompt__length=4, init__method="vipamin", init__num_images=32,
                         init__batch_size=16, data__max_train_samples=64, train__epochs=1, train__progress=False,
                         train__loggers=["jsonl"], train__test_at_end=False, train__out_dir=str(tmp_path / "run"))
    result = run_training(cfg)
    assert (tmp_path / "run" / "prompts.safetensors").is_file()  # the initializer ran
    assert reads == [path]
    assert result["steps"] == 2
