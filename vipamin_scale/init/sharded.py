"""The distribution layer of the initializer: reduce statistics, spread layers, gather prompts.

    sums (this rank's)  ──all-reduce──▶  means over all B images (every rank)
    layer l's math      ──on rank l mod world──▶  (P, d) per layer
    per-layer results   ──all-gather──▶  (L_p, P, d) on every rank

With world size 1 and no process group every step is the identity, so the same code is the
single-process path. The math itself lives in `vipamin.py` / `spt.py` (pure) and `linalg/`.
"""
from __future__ import annotations

from typing import Callable

import torch

import vipamin_scale.distributed as D
from vipamin_scale.init.capture import LayerSums


def owner_of(layer_row: int, world: int) -> int:
    """Rank that computes prompt row `layer_row`."""
    return layer_row % world


def reduce_means(sums: LayerSums, tables: tuple[str, ...] = ("E", "K", "H", "T", "S", "X", "C")) -> tuple[int, dict]:
    """All-reduce every captured sum (float64) and the image count; return (B, {table: {l: mean}}).

    Tensors are flattened into one buffer per table, so a table costs one collective, not one per layer.
    """
    count = torch.tensor([sums.count], dtype=torch.float64)
    D.all_reduce_sum(count)
    B = int(count.item())
    if B == 0:
        raise ValueError("init.num_images: no calibration image was read (empty training split?)")
    means: dict[str, dict[int, torch.Tensor]] = {}
    for table in tables:
        store: dict[int, torch.Tensor] = getattr(sums, table)
        if not store:
            continue
        layers = sorted(store)
        flat = torch.cat([store[l].reshape(-1) for l in layers])
        D.all_reduce_sum(flat)
        out, offset = {}, 0
        for l in layers:
            n = store[l].numel()
            out[l] = (flat[offset:offset + n] / B).reshape(store[l].shape)
            offset += n
        means[table] = out
    return B, means


def map_layers(rows: list[int], compute: Callable[[int], dict[str, torch.Tensor]],
               shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, torch.Tensor], dict[int, dict]]:
    """Run `compute(row)` on the row's owner rank, then give every rank every row's results.

    `compute` returns named float64 tensors of the given per-row `shapes` plus an optional
    `"info"` dict (JSON-able) under that key. Returns ({name: (len(rows), *shape)}, {row: info}).
    The gather is an all-reduce of zero-padded buffers: each entry has one owner, so the sum
    adds only zeros and is exact.
    """
    world, me = D.world_size(), D.rank()
    out = {name: torch.zeros((len(rows), *shape), dtype=torch.float64) for name, shape in shapes.items()}
    infos: dict[int, dict] = {}
    for i, row in enumerate(rows):
        if owner_of(row, world) != me:
            continue
        result = compute(row)
        infos[row] = result.pop("info", {})
        for name, value in result.items():
            out[name][i] = value.to(torch.float64)
    for name in out:
        D.all_reduce_sum(out[name])
    return out, _gather_infos(infos)


def _gather_infos(infos: dict[int, dict]) -> dict[int, dict]:
    if not D.is_dist():
        return infos
    merged: dict[int, dict] = {}
    for part in D.all_gather_object(infos):
        merged.update(part)
    return dict(sorted(merged.items()))
