"""vipamin_scale: prompt tuning of frozen timm ViTs, with VIPAMIN, SPT and BPT prompt initialization.

The Python API is the CLI's commands, for notebooks and scripts:

    import vipamin_scale
    cfg = vipamin_scale.compose(["model=vit_test_d64", "train.epochs=1", "hydra.run.dir=runs/nb"])
    result = vipamin_scale.train(cfg)                  # the run's record (its result.json)
    results = vipamin_scale.train_pack([cfg_a, cfg_b])  # K runs over one backbone, each as if alone
    vipamin_scale.init_prompts(cfg, "prompts.safetensors")

`compose` is what `vipamin-scale train <overrides>` composes; `train` and `init_prompts` are what
`vipamin-scale train` and `vipamin-scale init` run. Importing the package is cheap: torch, timm and
Hydra are imported by the functions that need them.
"""
from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = ["__version__", "compose", "init_prompts", "train", "train_pack"]


def _version() -> str:
    """The installed distribution's version; in a source tree that is not installed, pyproject.toml's."""
    from importlib import metadata

    try:
        return metadata.version("vipamin-scale")
    except metadata.PackageNotFoundError:
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return found.group(1) if found else "0+unknown"


def __getattr__(name: str) -> Any:  # `__version__` on first use: reading package metadata costs ~0.1 s
    if name == "__version__":
        globals()["__version__"] = version = _version()
        return version
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def compose(overrides: Optional[list[str]] = None) -> "DictConfig":
    """The config `vipamin-scale train <overrides>` runs with: the package's config tree and the schema's
    defaults, Hydra's override grammar (`model=vit_h14`, `prompt.length=50`, `hydra.run.dir=DIR`).

    train.out_dir is the run directory the CLI would use (hydra.run.dir, default runs/<timestamp>)
    unless the overrides set train.out_dir. Nothing is validated here: `train` and `init_prompts` do."""
    from vipamin_scale.api import compose as _compose

    return _compose(overrides)


def train(cfg: "DictConfig") -> dict[str, Any]:
    """What `vipamin-scale train` runs: the configured initializer, then training, in cfg.train.out_dir.
    Returns the run's record (the content of its result.json: accuracies, timings, counts), no live objects."""
    from vipamin_scale.api import train as _train

    return _train(cfg)


def train_pack(cfgs: "list[DictConfig]") -> list[dict[str, Any]]:
    """K runs (full configs, each with its own train.out_dir) trained side by side in this process over one
    frozen backbone; each run's record equals its solo `train`'s (within float rounding). They may differ in
    train.lr, train.weight_decay, train.seed, init.*, data.root; anything else is one error naming the field.
    A run that fails (non-finite loss) is recorded as failed and the others go on."""
    from vipamin_scale.api import train_pack as _train_pack

    return _train_pack(cfgs)


def init_prompts(cfg: "DictConfig", out: Optional[str] = None) -> dict[str, Any]:
    """What `vipamin-scale init` runs: compute prompts with cfg.init and write them to `out` (default: cfg.out)
    as safetensors. Returns {"path", "prompts" (tensor, CPU), "meta"}."""
    from vipamin_scale.api import init_prompts as _init_prompts

    return _init_prompts(cfg, out)


class _Package(types.ModuleType):
    """`vipamin_scale.train` is the API function, also once the submodule `vipamin_scale.train` (the loop) is
    imported: the import system then sets the package attribute of that name to the submodule, which is kept
    out here. The submodule stays importable as always (`from vipamin_scale.train import run_training`)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
