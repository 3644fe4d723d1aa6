"""How many runs a pack holds: `pack_size=auto` (study.pack_size, tune.pack_size, hydra.launcher.pack_size).

    auto_pack_size(cfg) -> (K, how)          the largest pack of runs like `cfg` the device holds, and how it was
                                             chosen (one line, also logged)
    resolve_pack_size(value, cfgs, field)    a launcher's pack size as `packs.run_packed` takes it (auto: the
                                             smallest K of the compatible groups of `cfgs`)

On a GPU, a pack of K = 1 and one of K = 2 copies of the run are measured (`train.measure_pack_memory`: the CUDA
allocator's peak over the build and two training steps, then over one eval batch; random initial prompts, which never
change a step's memory; a temporary directory). Each phase's peak is base + K x per_run (the backbone and the
process's other tensors once; each run's prompts, head, moments and its share of the batch's activations per run),
so per_run = peak(2) - peak(1), base = peak(1) - per_run, and K = floor((MEMORY_FRACTION x device memory / processes
- base) / per_run) for the phase that allows fewer, at least 1 (1 when the measured pack itself runs out of memory).
The rest of the device (15 %) is for what the allocator's peak does not count: the CUDA context, the allocator's
cache and fragmentation, DALI's buffers. A pack that still runs out of memory is split in two
(`packs.train_or_split`). On a CPU nothing is measured: K = CPU_PACK_SIZE, as a CPU gains little from packs
(benchmarks/RESULTS.md "Packs": the demo workload's runs/hour 1.09x the solo runs' at K = 4, 0.87x at K = 16).
"""
from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

import vipamin_scale.distributed as D
from vipamin_scale.config import AUTO_PACK_SIZE, ConfigError, check_pack_size, pack_key

log = logging.getLogger(__name__)

MEMORY_FRACTION = 0.85  # of the device's memory, for the packs of `auto` (the rest: see the module docstring)
CPU_PACK_SIZE = 4  # `auto` on a CPU

# what a measured copy of a run changes: random prompts, no trackers, no shared init cache, a fresh directory
_MEASURED = {"init.method": "random", "train.resume": False, "train.overwrite": False, "train.loggers": ["jsonl"],
             "train.log_diagnostics": False, "train.progress": False, "train.init_cache": None}


def measured_copies(cfg: DictConfig, k: int, root: Path) -> list[DictConfig]:
    """`k` copies of `cfg` for a measured step, in run directories `root`/r0, r1, ... (`_MEASURED`)."""
    out = []
    for i in range(k):
        c = copy.deepcopy(cfg)
        for key, value in {**_MEASURED, "train.out_dir": str(root / f"r{i}")}.items():
            OmegaConf.update(c, key, value, merge=False)
        out.append(c)
    return out


def auto_pack_size(cfg: DictConfig, *, processes: int = 1,
                   measure: Optional[Callable[[list[DictConfig]], tuple[int, int]]] = None,
                   capacity: Optional[int] = None) -> tuple[int, str]:
    """(K, how): the largest pack of runs like `cfg` whose measured step and eval batch fit MEMORY_FRACTION of this
    process's device, shared by `processes` processes (each gets its part and holds its own base), and how it was
    chosen (one line, logged); CPU_PACK_SIZE on a CPU (module docstring). `measure` (a pack's configs -> its (train,
    eval) peak bytes) and `capacity` (the device's bytes) replace `train.measure_pack_memory` and the GPU's memory.
    Under a process group every rank measures (the pack's step is collective) and all get the smallest K."""
    device = D.device()
    if measure is None and device.type != "cuda":
        k, how = CPU_PACK_SIZE, "the CPU default: packs gain little on a CPU (benchmarks/RESULTS.md, Packs)"
    else:
        import torch

        from vipamin_scale.train import measure_pack_memory

        measure = measure or measure_pack_memory
        if capacity is None:
            capacity = torch.cuda.get_device_properties(device).total_memory
        with tempfile.TemporaryDirectory(prefix="vipamin-pack-size-") as tmp:
            one = _peaks(measure, measured_copies(cfg, 1, Path(tmp) / "k1"))
            two = _peaks(measure, measured_copies(cfg, 2, Path(tmp) / "k2")) if one is not None else None
        if two is None:
            k, how = 1, f"a pack of {1 if one is None else 2} ran out of device memory in the measurement: K=1"
        else:
            budget = Fraction(str(MEMORY_FRACTION)) * capacity / processes  # exact: 0.85 x 80 GiB is 68 GiB
            phases = [_fit(phase, a, b, budget) for phase, a, b in zip(("a step", "an eval batch"), one, two)]
            fits = min(n for n, _ in phases)
            k = max(1, fits)
            share = f" / {processes} processes" if processes > 1 else ""
            how = (f"measured: {'; '.join(said for _, said in phases)}; {MEMORY_FRACTION} x {_gib(capacity)} GiB"
                   f"{share} " + (f"holds K={fits}" if fits >= 1 else
                                  "holds no run: K=1, which may run out of memory as its solo run would"))
    if D.is_dist():
        k, how = min(D.all_gather_object((k, how)))
    log.info("pack_size=auto: K=%d (%s)", k, how)
    return k, how


def _fit(phase: str, one: int, two: int, budget: Fraction) -> tuple[int, str]:
    """(how many runs fit `budget`, in words) from a phase's peaks at K = 1 and 2: base + K x per_run."""
    per_run = max(two - one, 1)  # bytes; a measurement cannot make a run free
    base = one - per_run
    return (math.floor((budget - base) / per_run),
            f"{phase} {_gib(one)} GiB at K=1, {_gib(two)} GiB at K=2 (base {_gib(base)} + {_gib(per_run)} per run)")


def resolve_pack_size(pack_size: Any, cfgs: Sequence[DictConfig], field: str) -> Optional[int]:
    """`pack_size` (the value of `field`) as `packs.run_packed` takes it: None or an int as it is; auto: the smallest
    `auto_pack_size` of the compatible groups of `cfgs` (one measurement each), so that every pack fits. A bad value,
    or auto under torchrun without a process group (each rank plans its packs alone, from its own measurement, and
    their plans must agree: hydra/launcher=packed), is one ConfigError naming `field`."""
    check_pack_size(field, pack_size)
    if pack_size != AUTO_PACK_SIZE:
        return pack_size
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not D.is_dist():
        raise ConfigError(f"{field}: auto measures this rank's device, and under torchrun the ranks plan their packs "
                          f"alone, from their own measurements; give an int (or null) so that their plans agree")
    groups: dict[tuple, DictConfig] = {}
    for cfg in cfgs:
        groups.setdefault(pack_key(cfg), cfg)
    ks = [auto_pack_size(cfg)[0] for cfg in groups.values()]
    if len(ks) > 1:
        log.info("pack_size=auto: K=%d, the smallest of its %d compatible groups'", min(ks), len(ks))
    return min(ks, default=None)


def _peaks(measure: Callable[[list[DictConfig]], tuple[int, int]], cfgs: list[DictConfig]) -> Optional[tuple[int, int]]:
    """`measure(cfgs)`; None when the pack runs out of device memory (what it held released once its error is)."""
    import torch

    from vipamin_scale.train import free_device_memory

    try:
        return measure(cfgs)
    except torch.OutOfMemoryError:
        pass
    free_device_memory()
    return None


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f}"


__all__ = ["CPU_PACK_SIZE", "MEMORY_FRACTION", "auto_pack_size", "measured_copies", "resolve_pack_size"]
