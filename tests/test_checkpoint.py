"""Checkpoints a run directory can hold without risk: loading executes nothing, a damaged newest
one falls back to the previous, a wrong one is one line. Driven through the CLI as a user would
(`train.resume=true`), on one short tiny-ViT run (2 epochs x 2 steps, checkpoints at steps 2 and 4)."""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import cli, cli_env

from vipamin_scale import checkpoint as ckpt

SHORT = [
    "model=vit_test_d64", "data=digits", "data.max_train_samples=64", "data.batch_size=32",
    "data.eval_batch_size=128", "train.epochs=2", "train.lr=0.5", "train.warmup_epochs=0.5", "train.log_every=1",
    "train.progress=false", "prompt.length=4", "train.test_at_end=false", "prompt.dropout=0.1",
]


def _train(run_dir, *overrides, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli("train", *SHORT, f"hydra.run.dir={run_dir}", *overrides), env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def _steps(run_dir) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["event"] == "train"]


def _one_error_line(proc) -> str:
    """Exit 2 and a last stderr line `error: ...` (the CLI's user-error form)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint: "), proc.stderr[-3000:]
    return last


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_root):
    run = tmp_path_factory.mktemp("ckpt") / "run"
    _train(run)
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == \
        ["ckpt-00000002.safetensors", "ckpt-00000004.safetensors"]
    return run


def _copy(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "checkpoints", run / "checkpoints")
    return run


class _Payload:
    """What a crafted pickle can do on load: here, create a directory (the marker)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ckpt-00000004.pt", "ckpt-00000004.safetensors"])
def test_crafted_pickle_checkpoint_is_refused_and_runs_nothing(tmp_path, digits_root, name):
    """A pickle whose loading runs code, under the old (.pt) and the new checkpoint name: resume
    refuses it with one line naming the file, before any compute, and the code never runs."""
    marker, control = tmp_path / "pwned", tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))  # the payload is live: unpickling runs it
    assert control.is_dir()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    crafted = run / "checkpoints" / name
    torch.save({"trainable": _Payload(marker), "epoch": 1}, crafted)  # torch's own (zip + pickle) format
    line = _one_error_line(_train(run, "train.resume=true", check=False))
    assert not marker.exists()
    if name.endswith(".pt"):
        assert str(crafted) in line and "old pickle format" in line and "restart the run" in line
    else:
        assert f"no valid checkpoint in {run / 'checkpoints'}" in line and name in line
    assert not (run / "metrics.jsonl").exists() and not (run / "prompts.safetensors").exists()
    assert crafted.exists()  # nothing the user had is deleted


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_previous(trained, tmp_path):
    """The step-4 checkpoint truncated (a crash of the disk, not of our write): resume warns naming
    it, continues from step 2, and ends where the intact run ended (same prompts, bit for bit)."""
    run = _copy(trained, tmp_path)
    newest = run / "checkpoints" / "ckpt-00000004.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    proc = _train(run, "train.resume=true")
    log = proc.stdout + proc.stderr
    assert f"checkpoint: {newest} is not a readable checkpoint" in log and "trying the previous" in log
    assert _steps(run) == [3, 4]
    want = ckpt.load(trained / "checkpoints" / "ckpt-00000004.safetensors")["trainable"]
    got = ckpt.load(newest)["trainable"]
    for n in want["params"]:
        assert torch.equal(got["params"][n], want["params"][n]), n
        assert torch.equal(got["optimizer"][n]["exp_avg_sq"], want["optimizer"][n]["exp_avg_sq"]), n


@pytest.mark.slow
def test_no_valid_checkpoint_is_one_line(trained, tmp_path):
    run = _copy(trained, tmp_path)
    for p in ckpt.list_checkpoints(run / "checkpoints"):
        p.write_bytes(b"\x00garbage" * 3)
    line = _one_error_line(_train(run, "train.resume=true", check=False))
    assert "no valid checkpoint" in line and "ckpt-00000002.safetensors, ckpt-00000004.safetensors" in line
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.slow
def test_checkpoint_of_another_architecture_is_one_line(trained, tmp_path):
    """Tensors that do not fit the model. A checkpoint of another run is refused earlier, by the config it
    records (runs.check_same_run); here the recorded config says prompt.length=8 over (2, 4, 64) prompts."""
    run = _copy(trained, tmp_path)
    for path in ckpt.list_checkpoints(run / "checkpoints"):
        payload = ckpt.load(path)
        payload["config"]["prompt"]["length"] = 8
        path.write_bytes(ckpt.to_bytes(payload))
    line = _one_error_line(_train(run, "train.resume=true", "prompt.length=8", check=False))
    assert line == (f"error: checkpoint: {run / 'checkpoints' / 'ckpt-00000004.safetensors'} does not fit the "
                    f"model: parameter prompt.prompts has shape (2, 4, 64) there, (2, 8, 64) in the model "
                    f"(another model/prompt config?)")
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.slow
def test_failed_write_leaves_no_temp_file_and_keeps_the_previous(trained, tmp_path, monkeypatch):
    """A write that fails midway (here: fsync raises, as on a full disk) removes its temp file and
    leaves the directory as it was; the next resume still finds the previous checkpoint."""
    from vipamin_scale import paths

    directory = tmp_path / "checkpoints"
    shutil.copytree(trained / "checkpoints", directory)
    payload = ckpt.load(directory / "ckpt-00000004.safetensors")
    before = sorted(p.name for p in directory.iterdir())

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(paths.os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save(directory, payload, 6, keep_last=2)
    assert sorted(p.name for p in directory.iterdir()) == before
    path, _ = ckpt.load_latest(directory)
    assert path.name == "ckpt-00000004.safetensors"


@pytest.mark.slow
def test_checkpoint_file_is_safetensors_with_json_state(trained):
    """The format itself: tensors in safetensors, the rest plain JSON; RNG states round-trip."""
    from safetensors import safe_open

    path = trained / "checkpoints" / "ckpt-00000004.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["vipamin_scale.checkpoint"])
        keys = set(f.keys())
    assert {"trainable/params/prompt.prompts", "trainable/optimizer/head.weight/exp_avg", "rng/0/torch"} <= keys
    assert meta["global_step"] == 4 and meta["epoch"] == 2 and meta["engine"] == "ddp" and meta["world_size"] == 1
    assert meta["config"]["prompt"]["length"] == 4
    state = ckpt.load(path)
    assert state["rng"][0]["torch"].dtype == torch.uint8
    ckpt.set_rng_state(state["rng"][0])
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    ckpt.set_rng_state(state["rng"][0])
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


@pytest.mark.parametrize("meta, says", [
    (None, "not a vipamin_scale checkpoint"),
    ("{not json", "damaged metadata"),
    (json.dumps({"trainable": {"params": {}}, "rng": [], "epoch": "1"}),
     "missing or wrong type: epoch, step_in_epoch, global_step, trainable.optimizer, trainable.scheduler"),
    (json.dumps({"trainable": {"__tensor__": "nowhere"}}), "damaged metadata"),
])
def test_safetensors_file_with_wrong_state_is_one_error_naming_it(tmp_path, meta, says):
    """A well-formed safetensors file that is not (or no longer) one of our checkpoints."""
    from safetensors.torch import save_file

    path = tmp_path / "ckpt-00000002.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata=None if meta is None else {"vipamin_scale.checkpoint": meta})
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load(path)
    assert str(err.value).startswith(f"checkpoint: {path}") and says in str(err.value)
    assert "\n" not in str(err.value)


# -- digests: a checkpoint and a prompts file vouch for their bytes ---------------------------------------------------

def _flip_bit(path, tensor: str) -> None:
    """Flip the lowest bit of `tensor`'s first byte in a safetensors file (a float's last mantissa bit:
    a change no NaN check can see), in place."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    begin = json.loads(data[8:8 + n])[tensor]["data_offsets"][0]
    data[8 + n + begin] ^= 1
    path.write_bytes(bytes(data))


def _payload(step: int) -> dict:
    prompts = torch.linspace(-1, 1, 2 * 4 * 8).reshape(2, 4, 8)
    return {"trainable": {"params": {"prompt.prompts": prompts}, "optimizer": {}, "scheduler": {}},
            "rng": [ckpt.rng_state()], "epoch": step // 2, "step_in_epoch": 0, "global_step": step, "config": {}}


def test_a_flipped_bit_in_a_checkpoint_is_damage_and_the_previous_one_loads(tmp_path, caplog):
    for step in (2, 4):
        ckpt.save(tmp_path, _payload(step), step, keep_last=2)
    newest = tmp_path / "ckpt-00000004.safetensors"
    assert torch.equal(ckpt.load(newest)["trainable"]["params"]["prompt.prompts"], _payload(4)["trainable"]["params"]
                       ["prompt.prompts"])
    _flip_bit(newest, "trainable/params/prompt.prompts")
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load(newest)
    assert str(err.value) == (f"checkpoint: {newest} is damaged (its tensors or metadata do not match the SHA-256 "
                              f"recorded in it)")
    path, state = ckpt.load_latest(tmp_path)
    assert path.name == "ckpt-00000002.safetensors" and state["global_step"] == 2
    assert f"checkpoint: {newest} is damaged" in caplog.text and "trying the previous checkpoint" in caplog.text

    # the JSON metadata is covered too: the step counter changed in place (the header stays valid JSON)
    ckpt.save(tmp_path, _payload(4), 4, keep_last=2)
    data = newest.read_bytes()
    assert data.count(b'global_step\\": 4') == 1
    newest.write_bytes(data.replace(b'global_step\\": 4', b'global_step\\": 5'))
    with pytest.raises(ckpt.CheckpointError, match="is damaged"):
        ckpt.load(newest)


def test_a_checkpoint_written_before_digests_loads_unverified_with_a_warning(tmp_path, caplog):
    from safetensors.torch import save

    tensors: dict = {}
    meta = ckpt._split(_payload(2), "", tensors)
    path = tmp_path / "ckpt-00000002.safetensors"
    path.write_bytes(save(tensors, metadata={"vipamin_scale.checkpoint": json.dumps(meta)}))  # the format before
    assert ckpt.load(path)["global_step"] == 2
    assert f"checkpoint: {path} records no SHA-256 (written before checkpoints carried one): loaded unverified" \
        in caplog.text


def test_a_flipped_bit_in_a_prompts_file_is_one_error_naming_it(tmp_path):
    """`vipamin-scale init` (and training) write prompts files with a digest; a damaged one is one error
    line naming the file. A file without one (older, or the user's own) is read unverified (its shape
    and values are still checked: test_models, test_runs)."""
    from vipamin_scale.config import ConfigError
    from vipamin_scale.init.run import read_prompts_metadata, write_prompts_file
    from vipamin_scale.models.prompted import read_prompts_file

    path = tmp_path / "prompts.safetensors"
    prompts = torch.linspace(-1, 1, 2 * 4 * 64).reshape(2, 4, 64)
    write_prompts_file(path, {"prompts": prompts, "random": -prompts}, {"method": "random", "B": 0})
    assert torch.equal(read_prompts_file(path)["prompts"], prompts)
    assert read_prompts_metadata(path) == {"method": "random", "B": 0}  # the digest is not one of the fields
    _flip_bit(path, "random")  # any tensor of the file counts, not only `prompts`
    with pytest.raises(ConfigError) as err:
        read_prompts_file(path)
    assert str(err.value) == (f"prompt.init_file: {path} is damaged (its tensors or metadata do not match the "
                              f"SHA-256 recorded in it); write it again with `vipamin-scale init`")
