"""The Python API's bodies (`vipamin_scale.compose`, `train`, `train_pack`, `init_prompts`): the CLI's tasks, callable.

Kept out of `vipamin_scale/__init__.py` so that importing the package imports neither torch nor Hydra.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from vipamin_scale.config import CONFIG_DIR, ConfigError, hydra_args, register

_OUT_DIR_FROM_HYDRA = "${hydra:runtime.output_dir}"


def compose(overrides: Optional[list[str]] = None) -> DictConfig:
    """`vipamin-scale train <overrides>`'s config through Hydra's compose API (see `vipamin_scale.compose`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    overrides = list(overrides or [])
    overrides = hydra_args(overrides)
    outer = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    if outer is not None:  # called inside a Hydra app (or another compose): leave its state as it was
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR), job_name="vipamin_scale"):
            cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    finally:
        if outer is not None:
            GlobalHydra.instance().initialize(outer)
    run_dir = str(cfg.hydra.run.dir)  # hydra.run.dir as the CLI resolves it (runs/<timestamp> by default)
    with open_dict(cfg):  # the composed config is in struct mode
        del cfg["hydra"]
        if OmegaConf.to_container(cfg.train, resolve=False)["out_dir"] == _OUT_DIR_FROM_HYDRA:
            cfg.train.out_dir = run_dir
    return cfg


def train(cfg: DictConfig) -> dict[str, Any]:
    """`vipamin-scale train`'s task: the run's record, without live objects."""
    import vipamin_scale.distributed as D
    from vipamin_scale.runs import record_exception
    from vipamin_scale.train import run_training

    try:
        result = run_training(cfg)
    except Exception as exc:  # as the CLI: a failed run is recorded in its directory
        record_exception(cfg, exc)
        raise
    finally:
        D.destroy()
    return {k: v for k, v in result.items() if k != "model"}


def train_pack(cfgs: list[DictConfig]) -> list[dict[str, Any]]:
    """K runs trained as one pack over one backbone (`vipamin_scale.train.train_pack`): each run's record."""
    import vipamin_scale.distributed as D
    from vipamin_scale.train import train_pack as _train_pack

    try:
        return _train_pack(list(cfgs))
    finally:
        D.destroy()


def init_prompts(cfg: DictConfig, out: Optional[str] = None) -> dict[str, Any]:
    """`vipamin-scale init`'s task: prompts written to `out` (default cfg.out)."""
    import vipamin_scale.distributed as D
    from vipamin_scale.init.run import run_init

    path = out or cfg.out
    if not path:
        raise ConfigError("out: where to write the prompts file, e.g. out=prompts.safetensors")
    try:
        result = run_init(cfg, path)
    finally:
        D.destroy()
    return {"path": str(Path(path)), "prompts": result["prompts"], "meta": result["meta"]}
