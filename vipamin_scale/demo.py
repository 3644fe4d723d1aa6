"""`make demo`: `vipamin-scale study study=demo`, a cut of study=accuracy, and its table.

VIPAMIN's default initialization against VPT's random prompts on the demo backbone with 4 digit images per
class, 3 paired draws (within a draw every method trains on the same images with the same seed, and the
methods that start from random prompts start from the same random tensor), each method at the lr the
accuracy study selected for it on val (`vipamin_scale/demo_preset.json`, that study's record of its 4-shot
selection: `study.selected_from`; not re-selected here). It prints a progress line at least every 30 s,
then test accuracy per draw, mean ± 95 % half-width, and VIPAMIN's paired difference against random prompts
with its 95 % interval, saying what it resolves; study.md, study.json and the runs are in hydra.run.dir.
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Any

from omegaconf import DictConfig

from vipamin_scale.config import ConfigError

PRESET = "demo_preset.json"  # package data; benchmarks/results/demo_preset.json is its source


def load_preset() -> dict[str, Any]:
    """The recorded selection the demo reuses (the accuracy study's 4-shot cells)."""
    return json.loads(resources.files("vipamin_scale").joinpath(PRESET).read_text())


def run_demo(cfg: DictConfig) -> dict[str, Any]:
    from vipamin_scale.study import run_study
    from vipamin_scale.study.tables import summary_text

    if cfg.data.name != "digits":
        raise ConfigError("demo: runs on the embedded digits (data=digits), where the accuracy study selected its "
                          "settings; `vipamin-scale study` runs on your data")
    doc = run_study(cfg)
    print(summary_text(doc, cfg.train.out_dir), flush=True)
    return doc
