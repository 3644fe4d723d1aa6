"""Hydra's `hydra/launcher=packed` (vipamin_scale/configs/hydra/launcher/packed.yaml): a sweep's jobs trained
as packs of runs over one backbone per process (vipamin_scale/packs.py). Hydra finds launcher plugins only
in the `hydra_plugins` namespace package, hence this shim; the work is `vipamin_scale.packs.launch_sweep`."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from hydra.plugins.launcher import Launcher


class PackedLauncher(Launcher):
    def __init__(self, pack_size: Optional[int | str] = None) -> None:
        self.pack_size = pack_size
        self.config = self.hydra_context = self.task_function = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        from vipamin_scale.packs import launch_sweep

        return launch_sweep(self, job_overrides, initial_job_idx)
