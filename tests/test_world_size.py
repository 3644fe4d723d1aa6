"""The result does not depend on how many processes ran it: the same config trained by the CLI at
world size 1, 2 and 4 (torchrun, gloo, tiny ViT, prompt dropout off) ends with the same prompts,
and a run cut at world 2 and resumed at world 1 ends where the uninterrupted world-1 run ends.

data.batch_size=16 is the global batch (16, 8 or 4 a rank); 128 digits: 8 steps an epoch, 2 epochs.
The runs differ only in float summation order (the ranks' gradients are averaged): atol 1e-5, while
a different sample order moves the prompts by ~1e-2.
"""
from __future__ import annotations

import subprocess

import pytest
import torch
from conftest import TINY, cli, cli_env, torchrun

from vipamin_scale import checkpoint as ckpt

pytestmark = pytest.mark.slow  # torchrun at world 1, 2 and 4

SETTING = [*TINY, "data.max_train_samples=128", "data.batch_size=16", "train.epochs=2", "train.eval_every=2",
           "train.test_at_end=false", "prompt.dropout=0.0", "data.num_workers=1"]
STEPS = 2 * 128 // 16
KILL_STEP = 11  # mid epoch 2: the newest checkpoint is the end of epoch 1 (step 8)


def _launch(run_dir, world: int, *overrides: str, env=None) -> tuple[subprocess.Popen, object]:
    args = [*SETTING, f"hydra.run.dir={run_dir}", *overrides]
    cmd = torchrun(world, "train", *args) if world > 1 else cli("train", *args)
    log = open(f"{run_dir}.log", "w")
    return subprocess.Popen(cmd, env=env or cli_env(), stdout=log, stderr=subprocess.STDOUT, text=True), run_dir


def _wait(procs: dict, rc: dict | None = None) -> None:
    for name, (proc, run_dir) in procs.items():
        got, want = proc.wait(timeout=900), (rc or {}).get(name, 0)
        assert got == want, f"{name}: exit {got} (expected {want})\n{open(f'{run_dir}.log').read()[-5000:]}"


def _trainable(run_dir, step: int = STEPS) -> dict[str, torch.Tensor]:
    state = ckpt.load(ckpt.checkpoint_path(run_dir / "checkpoints", step))
    return state["trainable"]["params"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_root):
    root = tmp_path_factory.mktemp("world_size")
    procs = {f"world{w}": _launch(root / f"world{w}", w) for w in (1, 2, 4)}
    procs["cut_world2"] = _launch(root / "cut", 2, env=cli_env(VIPAMIN_SCALE_KILL_AT_STEP=str(KILL_STEP)))
    _wait(procs, rc={"cut_world2": 1})
    assert [p.name for p in ckpt.list_checkpoints(root / "cut" / "checkpoints")] == ["ckpt-00000008.safetensors"]
    _wait({"resumed_world1": _launch(root / "cut", 1, "train.resume=true")})
    return root


@pytest.mark.parametrize("world", [2, 4])
def test_same_prompts_at_world_1_2_4(runs, world):
    ref, got = _trainable(runs / "world1"), _trainable(runs / f"world{world}")
    assert ref.keys() == got.keys() and "prompt.prompts" in ref
    assert (ref["prompt.prompts"] - _trainable(runs / "world1", 8)["prompt.prompts"]).abs().max() > 1e-3  # it trains
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_cut_at_world_2_resumed_at_world_1_continues_the_same_sequence(runs):
    ref, got = _trainable(runs / "world1"), _trainable(runs / "cut")
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_global_batch_not_divisible_by_world_is_one_line_before_compute(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run(torchrun(2, "train", *SETTING, "data.batch_size=15", f"hydra.run.dir={run}"),
                          env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    line = next(ln for ln in done.stderr.splitlines() if ln.startswith("error: "))
    assert line.startswith("error: data.batch_size: the global training batch (15) must be a multiple of the world "
                           "size (2)"), done.stderr[-3000:]
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
