"""Experiment tracking (`train.loggers`): wandb offline and an mlflow file store, driven through the
CLI under torchrun (world 2, so rank-0-only is visible), and the clear errors for a tracker that is
not installed or cannot open its store."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import cli, cli_env, torchrun

from vipamin_scale.config import ConfigError, default_config, validate

RUN = ["model=vit_test_d64", "model.pool=mean", "data=digits", "data.max_train_samples=64", "data.batch_size=32",
       "data.eval_batch_size=128", "train.epochs=1", "train.log_every=1", "train.progress=false",
       "prompt.length=4", "init.num_images=64", "train.test_at_end=false"]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, digits_root):
    """One world-2 run logging to all four loggers: wandb offline, mlflow to a file store in tmp."""
    root = tmp_path_factory.mktemp("tracking")
    run, store = root / "run", root / "mlruns"
    env = cli_env(WANDB_MODE="offline", MLFLOW_ALLOW_FILE_STORE="true", WANDB_DIR=str(root / "elsewhere"))
    proc = subprocess.run(torchrun(2, "train", *RUN, "train.loggers=[jsonl,tensorboard,wandb,mlflow]",
                                   f"train.mlflow_uri=file:{store}", "train.run_name=tiny", f"hydra.run.dir={run}"),
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"run": run, "store": store, "root": root, "stderr": proc.stderr}


def _jsonl(run, event):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


@pytest.mark.slow
def test_diagnostics_logged_at_start_equal_the_diagnose_command(tracked_run, tmp_path):
    """The record logged at start is `prompt_diagnostics` of the run's own (random) prompts over the
    calibration images, gathered from 2 ranks: the `diagnose` command at world 1 on the same
    images reports the same numbers (means of the same sums, round-off apart)."""
    from vipamin_scale.init.run import run_diagnose

    (diag,) = _jsonl(tracked_run["run"], "diagnostics")
    assert diag["layers"] == [0, 1] and diag["step"] == 0
    cfg = default_config(model__name="vit_test_d64", model__img_size=32, model__checkpoint=None, model__pool="mean", prompt__length=4,
                         init__num_images=64, train__out_dir=str(tmp_path))
    ref = run_diagnose(cfg)["methods"]["random"]
    for metric in ("entropy", "entropy_norm", "energy_norm1", "energy_raw", "scale"):
        assert diag[metric] == pytest.approx(ref[metric], rel=1e-6), metric
    assert all(0.0 < h <= 1.0 for h in diag["entropy_norm"])


@pytest.mark.slow
def test_mlflow_file_store_has_config_metrics_and_diagnostics(tracked_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{tracked_run['store']}")
    exp = client.get_experiment_by_name("vipamin-scale")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1  # rank 0 only
    r = runs[0]
    assert r.info.run_name == "tiny" and r.info.status == "FINISHED"
    assert r.data.params["model.name"] == "vit_test_d64" and r.data.params["data.batch_size"] == "32"
    assert r.data.params["train.loggers"] == '["jsonl", "tensorboard", "wandb", "mlflow"]'
    train = _jsonl(tracked_run["run"], "train")
    history = client.get_metric_history(r.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(t["step"], t["loss"]) for t in train]
    assert len(train) == 2  # 64 images / a global batch of 32 (16 a rank at world 2)
    (val,) = _jsonl(tracked_run["run"], "val")
    assert r.data.metrics["val/acc"] == val["acc"]
    (diag,) = _jsonl(tracked_run["run"], "diagnostics")
    energy = client.get_metric_history(r.info.run_id, "diagnostics/energy_norm1")
    assert [(m.step, m.value) for m in energy] == list(zip(diag["layers"], diag["energy_norm1"]))
    config = json.loads((tracked_run["store"] / exp.experiment_id / r.info.run_id / "artifacts" /
                         "config.resolved.json").read_text())
    assert config["train"]["out_dir"] == str(tracked_run["run"])


@pytest.mark.slow
def test_wandb_offline_run_under_out_dir_holds_config_metrics_and_diagnostics(tracked_run):
    """wandb writes its offline run under out_dir (not WANDB_DIR), once (rank 0). The .wandb file is
    wandb's own binary log: we check it carries the metric keys, the diagnostics keys and the config."""
    runs = list((tracked_run["run"] / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and not (tracked_run["root"] / "elsewhere").exists()
    (log,) = runs[0].glob("run-*.wandb")
    data = log.read_bytes()
    for key in (b"train/loss", b"val/acc", b"diagnostics/energy_norm1/layer_01", b"vit_test_d64",
                str(tracked_run["run"]).encode()):
        assert key in data, key
    ids = json.loads((tracked_run["run"] / "tracking.json").read_text())
    assert runs[0].name.endswith(ids["wandb"])


@pytest.mark.slow
def test_trackers_print_nothing(tracked_run):
    stderr = tracked_run["stderr"]
    assert "wandb:" not in stderr and "Warning" not in stderr and "mlflow" not in stderr.lower(), stderr[-3000:]


@pytest.mark.parametrize("module", ["wandb", "mlflow"])
def test_tracker_not_installed_is_one_config_error(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # what importlib sees when the package is absent
    cfg = default_config(train__loggers=["jsonl", module])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value) == (f"train.loggers: {module} is not installed; pip install 'vipamin-scale[track]' "
                              f"(or drop {module} from train.loggers)")


def test_unknown_logger_is_one_config_error():
    with pytest.raises(ConfigError, match=r"^train.loggers: each must be one of jsonl, tensorboard, wandb, mlflow; "
                                          r"got 'neptune'$"):
        validate(default_config(train__loggers=["jsonl", "neptune"]))


@pytest.mark.slow
def test_mlflow_store_that_cannot_open_fails_before_compute(tmp_path, digits_root):
    """mlflow >= 3.7 refuses a file: store unless MLFLOW_ALLOW_FILE_STORE=true: one line, exit 2,
    before the initializer or any training (no checkpoint, no metrics)."""
    env = cli_env(MLFLOW_ALLOW_FILE_STORE="false")
    proc = subprocess.run(cli("train", *RUN, "train.loggers=[jsonl,mlflow]", f"train.mlflow_uri=file:{tmp_path}/ml",
                              f"hydra.run.dir={tmp_path}/run"), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: train.mlflow_uri: mlflow cannot open file:{tmp_path}/ml: "), last
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
