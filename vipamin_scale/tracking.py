"""Where a run's metrics go: `train.loggers`, a list of jsonl | tensorboard | wandb | mlflow.

    metrics = MetricsLog.from_config(cfg, out_dir, enabled=rank == 0)
    metrics.start(resolved_config, diagnostics)   # once, before the first step of a fresh run
    metrics.write({"event": "train", "step": 12, "epoch": 0, "loss": 2.1, "lr": 0.01})
    metrics.close()

Contracts:
- Rank 0 only: on other ranks (`enabled=False`) nothing is imported, opened or written.
- wandb and mlflow are optional extras (`pip install 'vipamin-scale[track]'`), imported only when
  named in `train.loggers`; `config.validate` already refused a named one that is not installed.
- A record is `{"event", "step", ...numbers}`; every logger gets the numbers as `<event>/<key>`
  at `step` (jsonl keeps the record as it is, one JSON object a line in `metrics.jsonl`).
- `start` logs the resolved config (TensorBoard: text; wandb: run config; mlflow: params, flattened
  to dotted keys, and `config.resolved.json` as an artifact) and, when given, the prompts'
  diagnostics per layer (`init.run.prompt_diagnostics`'s report): jsonl one `diagnostics` record
  per prompt set, TensorBoard/mlflow scalars `diagnostics/<metric>` with the layer as the step,
  wandb summary keys `diagnostics/<metric>/layer_<l>`.
- A resumed run (same out_dir) continues the same wandb run and mlflow run: their ids are kept in
  `<out_dir>/tracking.json`. `rewind=S` (train: the step it resumes from, -1 when it starts over)
  drops what the interrupted attempt logged after step S and its final test from metrics.jsonl, and
  TensorBoard purges from S + 1, so the log reads as the uninterrupted run's.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from vipamin_scale.config import ConfigError
from vipamin_scale.paths import atomic_write_bytes
from vipamin_scale.runs import finite_or_null

log = logging.getLogger(__name__)

DIAGNOSTIC_METRICS = ("entropy", "entropy_norm", "energy_norm1", "energy_raw", "scale")


def wants_diagnostics(train_cfg) -> bool:
    """`train.log_diagnostics`, or when unset: on when a tracker (wandb, mlflow) is among the loggers."""
    if train_cfg.log_diagnostics is not None:
        return bool(train_cfg.log_diagnostics)
    return bool({"wandb", "mlflow"} & set(train_cfg.loggers))


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    event = record.get("event", "train")
    return {f"{event}/{k}": float(v) for k, v in record.items()
            if k not in ("step", "epoch", "event") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, (list, type(None))) else str(tree)}


class _Jsonl:
    def __init__(self, out_dir: Path, rewind: Optional[int] = None, **_):
        self.path = out_dir / "metrics.jsonl"
        if rewind is not None and self.path.is_file():  # what the interrupted attempt logged past its checkpoint
            kept = [line for line in self.path.read_text().splitlines(keepends=True)
                    if _before_checkpoint(line, rewind)]
            atomic_write_bytes(self.path, "".join(kept).encode())

    def start(self, config: dict, diagnostics: Optional[dict]) -> None:
        for name, per in (diagnostics or {}).get("methods", {}).items():
            self.write({"event": "diagnostics", "step": 0, "prompts": name, "layers": diagnostics["layers"], **per})

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")  # strict JSON: NaN -> null

    def close(self) -> None:
        pass


def _before_checkpoint(line: str, step: int) -> bool:
    """A metrics.jsonl line a run resumed at `step` keeps: a complete record logged at a step <= `step`,
    but the final test (the resumed run's finish logs it)."""
    try:
        record = json.loads(line)
    except ValueError:  # a line cut by the kill
        return False
    return isinstance(record, dict) and record.get("event") != "test" and record.get("step", 0) <= step


class _TensorBoard:
    def __init__(self, out_dir: Path, rewind: Optional[int] = None, **_):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides what an interrupted attempt logged at or after it
        self.tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=None if rewind is None else rewind + 1)

    def start(self, config: dict, diagnostics: Optional[dict]) -> None:
        self.tb.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        for name, per in (diagnostics or {}).get("methods", {}).items():
            for metric in DIAGNOSTIC_METRICS:
                for layer, value in zip(diagnostics["layers"], per[metric]):
                    self.tb.add_scalar(f"diagnostics/{metric}", value, layer)

    def write(self, record: dict[str, Any]) -> None:
        for key, value in _numbers(record).items():
            self.tb.add_scalar(key, value, record.get("step", 0))

    def close(self) -> None:
        self.tb.close()


class _Wandb:
    """wandb under `<out_dir>/wandb`; WANDB_MODE (offline, disabled, online) is wandb's own switch."""

    def __init__(self, out_dir: Path, project: str, run_name: str, config: dict, ids: dict, **_):
        import wandb

        self.run = wandb.init(project=project, name=run_name, dir=str(out_dir), config=config,
                              id=ids.get("wandb"), resume="allow" if ids.get("wandb") else None,
                              settings=wandb.Settings(silent=True, console="off"))
        ids["wandb"] = self.run.id

    def start(self, config: dict, diagnostics: Optional[dict]) -> None:
        for name, per in (diagnostics or {}).get("methods", {}).items():
            for metric in DIAGNOSTIC_METRICS:
                for layer, value in zip(diagnostics["layers"], per[metric]):
                    self.run.summary[f"diagnostics/{metric}/layer_{layer:02d}"] = value

    def write(self, record: dict[str, Any]) -> None:
        self.run.log(_numbers(record), step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    """An mlflow run through `MlflowClient` (no global active run); `train.mlflow_uri` or mlflow's default."""

    def __init__(self, out_dir: Path, project: str, run_name: str, config: dict, ids: dict, uri: Optional[str], **_):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            self.client = MlflowClient(tracking_uri=uri)
        except MlflowException as exc:  # e.g. a file: store without MLFLOW_ALLOW_FILE_STORE=true (mlflow >= 3.7)
            raise ConfigError(f"train.mlflow_uri: mlflow cannot open {uri or 'its default tracking URI'}: "
                              f"{str(exc).splitlines()[0]}") from None
        if ids.get("mlflow"):
            self.run_id = ids["mlflow"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(project)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(project)
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            ids["mlflow"] = self.run_id

    def start(self, config: dict, diagnostics: Optional[dict]) -> None:
        from mlflow.entities import Metric, Param

        params = [Param(k, v[:6000]) for k, v in _flatten(config).items()]
        for i in range(0, len(params), 100):  # mlflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.resolved.json")
        metrics = [Metric(f"diagnostics/{metric}", value, 0, layer)
                   for per in (diagnostics or {}).get("methods", {}).values() for metric in DIAGNOSTIC_METRICS
                   for layer, value in zip(diagnostics["layers"], per[metric])]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def write(self, record: dict[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(record.get("step", 0))
        metrics = [Metric(k, v, now, step) for k, v in _numbers(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_LOGGERS = {"jsonl": _Jsonl, "tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}


class MetricsLog:
    """The loggers of `train.loggers`, fed the same records; rank 0 only (`enabled`)."""

    def __init__(self, out_dir: Path, enabled: bool, loggers: tuple[str, ...] = ("jsonl", "tensorboard"),
                 project: str = "vipamin-scale", run_name: Optional[str] = None, mlflow_uri: Optional[str] = None,
                 config: Optional[dict] = None, rewind: Optional[int] = None):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.sinks = []
        if not enabled:
            return
        ids_path = self.out_dir / "tracking.json"
        ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        for name in loggers:
            self.sinks.append(_LOGGERS[name](out_dir=self.out_dir, project=project,
                                             run_name=run_name or self.out_dir.name, config=config or {},
                                             ids=ids, uri=mlflow_uri, rewind=rewind))
        if ids:
            atomic_write_bytes(ids_path, json.dumps(ids).encode())

    @classmethod
    def from_config(cls, cfg, out_dir: Path, enabled: bool, rewind: Optional[int] = None) -> "MetricsLog":
        from omegaconf import OmegaConf

        t = cfg.train
        config = OmegaConf.to_container(cfg, resolve=True) if enabled else None
        return cls(out_dir, enabled, tuple(t.loggers), t.project, t.run_name, t.mlflow_uri, config, rewind)

    def start(self, config: dict, diagnostics: Optional[dict] = None) -> None:
        for sink in self.sinks:
            sink.start(config, diagnostics)

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


__all__ = ["MetricsLog", "wants_diagnostics", "DIAGNOSTIC_METRICS"]
