"""Distributed linear algebra over `vipamin_scale.distributed`'s collectives only (no model, no file I/O).

- `tsqr`, `StreamingTSQR`, `energy_rank`: SVD of a row-sharded tall-skinny matrix
  (VIPAMIN `init.subspace = tokens`).
- `kmeans`, `kmeans_pp_init`, `kmeans_pp_indices`, `update`, `assign`: k-means over row-sharded
  tokens (SPT/kmeans), the package's one k-means (one process or many; its module docstring is
  the determinism contract).
- `distributed_rand_draw`: world-size-invariant uniform draw of token rows (SPT/rand).

Every function is collective over `group` (default: the default process group when one is
initialized, else a single process); `group=LOCAL` runs the single-process math inside a
process group. World size 1 without a process group always works. (`assign` and
`global_row_draw` are pure per-shard pieces, not collectives.)
"""
from vipamin_scale.distributed import LOCAL

from .kmeans import (KMeansResult, assign, distributed_rand_draw, global_row_draw, kmeans, kmeans_pp_indices,
                     kmeans_pp_init, update)
from .tsqr import StreamingTSQR, energy_rank, tsqr

__all__ = [
    "LOCAL",
    "KMeansResult",
    "StreamingTSQR",
    "assign",
    "distributed_rand_draw",
    "energy_rank",
    "global_row_draw",
    "kmeans",
    "kmeans_pp_indices",
    "kmeans_pp_init",
    "tsqr",
    "update",
]
