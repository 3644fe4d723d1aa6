"""torchrun worker for tests/test_linalg.py: runs `vipamin_scale.linalg` on gloo (CPU).

    torchrun --nproc-per-node W tests/dist_scripts/linalg_worker.py OUT.pt [--mode all|raise]

`all`: every rank builds the same full inputs from fixed seeds, keeps its own rows under several
row splits (uneven, a rank with zero rows), runs the distributed functions, and rank 0 saves the
results (with the full inputs) to OUT.pt for the test to compare with single-process math.
`raise`: rank 1 raises at once while the other ranks wait; torchrun must stop them and exit
non-zero. That mode runs before `import torch`, so the check costs no more than the launcher.
"""
from __future__ import annotations

import os
import sys
import time

if __name__ == "__main__" and sys.argv[2:] == ["--mode", "raise"]:
    if os.environ["RANK"] == "1":
        raise RuntimeError("deliberate failure on rank 1")
    time.sleep(300)  # far past the test's timeout: only torchrun's teardown ends this rank
    sys.exit(0)

import argparse  # noqa: E402  (the cheap mode above must run before these imports)
import warnings  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from vipamin_scale.linalg import (  # noqa: E402
    LOCAL,
    StreamingTSQR,
    assign,
    distributed_rand_draw,
    kmeans,
    kmeans_pp_indices,
    tsqr,
    update,
)

F64 = torch.float64


def split_counts(n: int, world: int, kind: str) -> list[int]:
    """Rows per rank (rank-major) for a split kind; every kind covers all n rows."""
    if world == 1:
        return [n]
    if kind == "even":
        base, extra = divmod(n, world)
        return [base + (r < extra) for r in range(world)]
    if kind == "zero_first":  # rank 0 (the TSQR root) has no rows, rank 1 only 2
        counts = [0, min(2, n)] + [0] * (world - 2)
        rest = n - counts[1]
        for r in range(2, world):
            counts[r] = rest // (world - 2)
        counts[-1] += n - sum(counts)
        return counts
    if kind == "skew":  # 1 : 2 : 3 : … with the last rank empty
        weights = list(range(1, world)) + [0]
        counts = [n * w // sum(weights) for w in weights]
        counts[world - 2] += n - sum(counts)
        return counts
    raise ValueError(kind)


SPLITS = ("even", "zero_first", "skew")


def local_rows(X: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor:
    start = sum(counts[:rank])
    return X[start : start + counts[rank]].clone()


def tsqr_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    d = 12
    Q1, _ = torch.linalg.qr(torch.randn(300, d, generator=g, dtype=F64))
    Q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    spectrum = torch.logspace(2, -3, d, dtype=F64)  # well separated singular values
    return {
        "tall": torch.randn(240, d, generator=g, dtype=F64),
        "squareish": torch.randn(15, d, generator=g, dtype=F64),  # W=4: ranks with n_r < d
        "short": torch.randn(7, d, generator=g, dtype=F64),  # fewer rows than d
        "rank4": torch.randn(150, 4, generator=g, dtype=F64) @ torch.randn(4, d, generator=g, dtype=F64),
        "spectrum": (Q1 * spectrum) @ Q2.T,
        "float32": torch.randn(90, d, generator=g),
    }


def kmeans_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    centers = 6.0 * torch.randn(4, 6, generator=g, dtype=F64)
    blobs = torch.cat([c + 0.3 * torch.randn(60, 6, generator=g, dtype=F64) for c in centers])
    perm = torch.randperm(blobs.shape[0], generator=g)
    distinct = torch.randn(5, 4, generator=g, dtype=F64)
    dup_idx = torch.randint(0, 5, (40,), generator=g)
    return {
        "planted": blobs[perm],
        "planted_truth": (torch.arange(240) // 60)[perm],
        "planted_centers": centers,
        "random": torch.randn(157, 5, generator=g, dtype=F64),
        "dups": distinct[dup_idx],  # 5 distinct rows, k = 7 > 5
        "float32": torch.randn(101, 3, generator=g),
    }


KMEANS_RUNS = {  # name: (input, k, seed, iters, tol)
    "planted": ("planted", 4, 3, 50, 1e-3),
    "random_tol": ("random", 7, 1, 100, 1e-3),
    "random_full": ("random", 7, 2, 10, 0.0),  # tol 0: runs all iters
    "dups": ("dups", 7, 0, 20, 1e-3),
    "float32": ("float32", 5, 4, 40, 1e-3),
}
RAND_RUNS = {"p1": (1, 0), "p10": (10, 7), "all": (157, 3)}  # name: (P, seed) on "random"


def splits(world: int) -> tuple[str, ...]:
    return ("even",) if world == 1 else SPLITS  # with one rank every split is the same


def run_all(out: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    res: dict = {"world": world, "tsqr": {}, "stream": {}, "kmeans": {}, "pp": {}, "update": {},
                 "rand": {}, "local": {}}
    labels_local: dict = {}  # (run, kind) -> this rank's labels, concatenated over ranks below

    T = tsqr_inputs()
    res["tsqr_inputs"] = T
    for name, A in T.items():
        for kind in splits(world):
            counts = split_counts(A.shape[0], world, kind)
            A_r = local_rows(A, counts, rank)
            s, V = tsqr(A_r)
            res["tsqr"][name, kind] = (s, V, counts)
            acc = StreamingTSQR(A.shape[1])
            for b in range(0, A_r.shape[0], 5):  # blocks of 5 rows
                acc.update(A_r[b : b + 5])
            res["stream"][name, kind] = acc.finalize()

    K = kmeans_inputs()
    res["kmeans_inputs"] = K
    for run, (inp, k, seed, iters, tol) in KMEANS_RUNS.items():
        X = K[inp]
        for kind in splits(world):
            counts = split_counts(X.shape[0], world, kind)
            X_r = local_rows(X, counts, rank)
            r = kmeans(X_r, k, seed=seed, iters=iters, tol=tol)
            labels_local[run, kind] = r.labels
            res["kmeans"][run, kind] = {
                "centroids": r.centroids, "iterations": r.iterations, "converged": r.converged,
                "changed": r.changed, "reseeded": r.reseeded, "inertia": r.inertia,
            }
            idx = kmeans_pp_indices(X_r, k, seed=seed)
            res["pp"][run, kind] = idx
            # An assignment with empty clusters: two centroids far away from every row.
            C_bad = torch.cat([X[idx[: k - 2]].to(F64), torch.full((2, X.shape[1]), 1e3, dtype=F64)])
            lab, d2 = assign(X_r, C_bad)
            res["update"][run, kind] = update(X_r, lab, d2, k)
        # LOCAL inside a process group: every rank runs the single-process math on all rows.
        r = kmeans(X, k, seed=seed, iters=iters, tol=tol, group=LOCAL)
        res["local"][run] = (r.centroids, r.labels)

    X = K["random"]
    for run, (P, seed) in RAND_RUNS.items():
        for kind in splits(world):
            counts = split_counts(X.shape[0], world, kind)
            res["rand"][run, kind] = distributed_rand_draw(local_rows(X, counts, rank), P, seed)
    X32 = K["float32"]
    counts = split_counts(X32.shape[0], world, "skew")
    res["rand"]["float32", "skew"] = distributed_rand_draw(local_rows(X32, counts, rank), 9, 5)

    # One gather at the end: every rank's outputs, to check they are bitwise the same on all
    # ranks, and the labels, concatenated in rank order (the global row order).
    outputs = {sec: res[sec] for sec in ("tsqr", "stream", "kmeans", "pp", "update", "rand", "local")}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (outputs, labels_local))
    if rank == 0:
        res["identical"] = {
            (sec, key): all(_same(o[sec][key], outputs[sec][key]) for o, _ in everyone)
            for sec in outputs for key in outputs[sec]
        }
        for key in labels_local:
            res["kmeans"][key]["labels"] = torch.cat([lab[key] for _, lab in everyone])
        torch.save(res, out)


def _same(a, b) -> bool:
    """Bitwise equality of nested results (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    args = ap.parse_args()
    warnings.simplefilter("error")  # our code must be warning-free
    dist.init_process_group("gloo")
    try:
        run_all(args.out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
