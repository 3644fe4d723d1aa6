"""vipamin_scale.linalg: TSQR/SVD, k-means and the uniform draw, in-process and under torchrun.

In-process tests run with world size 1 and no process group. The distributed ones launch real
`torch.distributed.run` jobs on gloo (CPU) with 1, 2 and 4 processes, all at once in one
module-scoped fixture (tests/dist_scripts/linalg_worker.py, results in a .pt file), and compare
with single-process math: `torch.linalg.svd` of the gathered matrix, and the k-means contract
written out for one process (`kmeans_support.py`, the test oracle) and `init/spt.spt_rand` on the
concatenated rows.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import torch

import kmeans_support as reference
from conftest import torchrun
from vipamin_scale.init.spt import spt_rand
from vipamin_scale.linalg import (
    LOCAL,
    StreamingTSQR,
    assign,
    distributed_rand_draw,
    energy_rank,
    kmeans,
    kmeans_pp_indices,
    kmeans_pp_init,
    tsqr,
    update,
)
from vipamin_scale.linalg.kmeans import farthest_rows

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_scripts" / "linalg_worker.py"
WORLDS = (1, 2, 4)


def _load_worker_module():
    spec = importlib.util.spec_from_file_location("linalg_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


W = _load_worker_module()  # case definitions shared with the worker


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ----------------------------------------------------------------------------- reference checks


def numerical_rank(s: torch.Tensor) -> int:
    return int((s > s[0] * 1e-10).sum()) if s.numel() and s[0] > 0 else 0


def complement(V: torch.Tensor, r: int) -> torch.Tensor:
    """I − V_r V_r^T (d, d)."""
    Vr = V[:, :r]
    return torch.eye(V.shape[0], dtype=F64) - Vr @ Vr.T


def check_svd(A: torch.Tensor, svals: torch.Tensor, V: torch.Tensor, extra_ranks=()) -> None:
    """(svals, V) against torch.linalg.svd of the full matrix A (n, d)."""
    A = A.to(F64)
    d = A.shape[1]
    S = torch.linalg.svd(A, full_matrices=True)
    ref = torch.zeros(d, dtype=F64)
    ref[: S.S.numel()] = S.S
    assert svals.shape == (d,) and V.shape == (d, d) and svals.dtype == F64 and V.dtype == F64
    assert torch.all(svals[:-1] >= svals[1:])  # descending
    assert (svals - ref).abs().max() <= 1e-6 * ref[0]  # relative to the spectrum's scale
    big = ref > 1e-8 * ref[0]
    assert torch.allclose(svals[big], ref[big], rtol=1e-6, atol=0)
    torch.testing.assert_close(V.T @ V, torch.eye(d, dtype=F64), atol=1e-10, rtol=0)
    Vref = S.Vh.T
    for r in {numerical_rank(ref), *extra_ranks}:
        assert (complement(V, r) - complement(Vref, r)).abs().max() <= 1e-6, f"projector at r={r}"


# ----------------------------------------------------------------------------- in-process


def test_tsqr_single_process_matches_svd():
    cases = W.tsqr_inputs()
    for name, A in cases.items():
        svals, V = tsqr(A)
        check_svd(A, svals, V, extra_ranks=(6,) if name == "spectrum" else ())
        assert torch.equal(svals, tsqr(A, group=LOCAL)[0])


def test_tsqr_zero_rows_and_zero_matrix():
    svals, V = tsqr(torch.zeros((0, 5), dtype=F64))
    assert torch.equal(svals, torch.zeros(5, dtype=F64)) and torch.equal(V, torch.eye(5, dtype=F64))
    svals, V = tsqr(torch.zeros((8, 5)))
    assert torch.equal(svals, torch.zeros(5, dtype=F64)) and energy_rank(svals, 0.99) == 0


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="2-D"):
        tsqr(torch.zeros(3))
    with pytest.raises(ValueError, match="not initialized"):
        tsqr(torch.zeros(3, 2), group=object())  # a group without a process group
    with pytest.raises(ValueError, match="iters"):
        kmeans(torch.zeros(3, 2), 2, seed=0, iters=-1)


def test_streaming_tsqr_many_small_blocks():
    A = randn(500, 16, seed=3) @ torch.diag(torch.logspace(1, -2, 16, dtype=F64))
    sizes = torch.randint(0, 8, (400,), generator=torch.Generator().manual_seed(4)).tolist()
    acc, start = StreamingTSQR(16), 0
    for m in sizes:  # blocks of 0..7 rows, empty blocks included, most smaller than d
        acc.update(A[start : start + m])
        start += m
        if start >= A.shape[0]:
            break
    acc.update(A[start:].float())  # the rest, in float32 (promoted to float64 inside)
    assert acc.n_rows == A.shape[0] and acc.R.shape == (16, 16)
    A_seen = torch.cat([A[:start], A[start:].float().to(F64)])
    check_svd(A_seen, *acc.finalize(), extra_ranks=(4, 8, 12))


def test_streaming_tsqr_rank_deficient_and_bad_shape():
    A = randn(90, 3, seed=5) @ randn(3, 10, seed=6)  # rank 3
    acc = StreamingTSQR(10)
    for b in range(0, 90, 4):
        acc.update(A[b : b + 4])
    svals, V = acc.finalize()
    check_svd(A, svals, V)
    assert energy_rank(svals, 1.0) == 3
    with pytest.raises(ValueError, match="expects"):
        acc.update(torch.zeros(2, 9))


def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=F64)  # σ² = 9, 4, 1, 0 (total 14)
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 0.65) == 2
    assert energy_rank(s, 13 / 14) == 2
    assert energy_rank(s, 0.99) == 3
    assert energy_rank(s, 1.0) == 3
    assert energy_rank(torch.zeros(3), 0.5) == 0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="energy"):
            energy_rank(s, bad)


@pytest.mark.parametrize("run", list(W.KMEANS_RUNS))
def test_kmeans_single_process_is_spt_bit_for_bit(run):
    inp, k, seed, iters, tol = W.KMEANS_RUNS[run]
    X = W.kmeans_inputs()[inp]
    r = kmeans(X, k, seed=seed, iters=iters, tol=tol)
    C, labels, it = reference.lloyd(X, reference.kmeans_pp_init(X, k, seed), iters, tol)
    assert torch.equal(r.centroids, C) and torch.equal(r.labels, labels) and r.iterations == it
    assert torch.equal(r.centroids, reference.kmeans(X, k, iters, seed, tol))
    assert torch.equal(kmeans_pp_indices(X, k, seed), reference.kmeans_pp_indices(X, k, seed))
    assert torch.equal(kmeans_pp_init(X, k, seed), reference.kmeans_pp_init(X, k, seed))
    assert r.converged == (r.changed < tol * X.shape[0])
    torch.testing.assert_close(r.inertia, float(reference.assign(X, C)[1].sum()), rtol=1e-12, atol=0)


def test_update_reseeds_empty_clusters_like_spt():
    X = randn(60, 4, seed=8)
    C = torch.cat([X[:3], torch.full((3, 4), 50.0, dtype=F64)])  # clusters 3, 4, 5 end up empty
    labels, d2 = reference.assign(X, C)
    C1 = update(X, labels, d2, 6)
    assert torch.equal(C1, reference.update(X, labels, d2, 6))
    assert torch.equal(C1[3:], X[reference.farthest_rows(d2, 3)])


def test_kmeans_recovers_planted_clusters():
    K = W.kmeans_inputs()
    r = kmeans(K["planted"], 4, seed=3, iters=50)
    assert r.converged and r.iterations < 50
    D = torch.cdist(r.centroids, K["planted_centers"])  # (found, true)
    match = D.argmin(dim=1)
    assert sorted(match.tolist()) == [0, 1, 2, 3]
    assert D.min(dim=1).values.max() < 0.15
    assert torch.equal(match[r.labels], K["planted_truth"])  # every token in its planted cluster


def test_rand_draw_single_process():
    X = randn(40, 3, seed=9)
    rows = distributed_rand_draw(X, 7, seed=2)
    assert torch.equal(rows, spt_rand(X, 7, 2))
    assert torch.equal(rows, X[torch.randperm(40, generator=torch.Generator().manual_seed(2))[:7]])
    with pytest.raises(ValueError):
        distributed_rand_draw(X, 41, seed=0)
    with pytest.raises(ValueError, match="k <= number of rows"):
        kmeans(X, 41, seed=0)


# ----------------------------------------------------------------------------- k-means contract, one process
# (moved from test_init_math_spt.py, where they tested init/spt.py's single-process k-means)


def planted(n_per=60, P=5, d=8, seed=0, noise=0.1):
    centers = 10.0 * torch.eye(P, d, dtype=F64) + randn(P, d, seed=seed)  # well separated
    X = (centers[:, None, :] + noise * randn(P, n_per, d, seed=seed + 1)).reshape(-1, d)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed + 2))
    return X[perm], centers


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kmeans_recovers_planted_clusters_for_each_seed(seed):
    X, centers = planted(seed=10 * seed)
    C = kmeans(X, 5, iters=50, seed=seed).centroids
    assert C.shape == (5, 8) and C.dtype == F64
    D = torch.cdist(C, centers)  # (found, true)
    nearest = D.argmin(dim=1)
    assert sorted(nearest.tolist()) == [0, 1, 2, 3, 4]  # one-to-one
    assert D.min(dim=1).values.max() < 0.1  # each centroid sits on a planted center


def test_kmeans_is_deterministic_and_seed_dependent():
    X = randn(400, 6, seed=5)  # no structure: seeds matter
    a = kmeans(X, 7, iters=20, seed=11).centroids
    assert torch.equal(a, kmeans(X, 7, iters=20, seed=11).centroids)
    assert not torch.equal(a, kmeans(X, 7, iters=20, seed=12).centroids)


def test_kmeans_pp_seeds_are_distinct_rows_spread_out():
    X, centers = planted(seed=20)
    idx = kmeans_pp_indices(X, 5, seed=0)
    assert idx.unique().numel() == 5
    C0 = kmeans_pp_init(X, 5, seed=0)
    torch.testing.assert_close(C0, X[idx])
    # D^2 sampling over 5 far-apart clusters of 60 points picks one seed per cluster
    assert sorted(torch.cdist(C0, centers).argmin(dim=1).tolist()) == [0, 1, 2, 3, 4]


def test_kmeans_pp_with_duplicate_rows():
    X = torch.ones(10, 3, dtype=F64)  # one distinct point: all D^2 weights vanish
    C = kmeans(X, 3, iters=5, seed=0).centroids
    torch.testing.assert_close(C, torch.ones(3, 3, dtype=F64))


def test_assign_ties_to_lower_centroid():
    X = torch.tensor([[0.0], [1.0], [5.0]], dtype=F64)
    C = torch.tensor([[2.0], [0.0], [2.0], [-1.0]], dtype=F64)  # x=1 equidistant to 0, 1 and 2
    labels, d2 = assign(X, C)
    assert labels.tolist() == [1, 0, 0]
    torch.testing.assert_close(d2, torch.tensor([0.0, 1.0, 9.0], dtype=F64))


def test_update_means_and_empty_cluster_reseed():
    X = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [0.0, 4.0]], dtype=F64)
    labels = torch.tensor([0, 0, 0, 0])
    d2 = torch.tensor([1.0, 3.0, 50.0, 50.0], dtype=F64)  # rows 2 and 3 tie as farthest
    C = update(X, labels, d2, k=3)
    torch.testing.assert_close(C[0], X.mean(0))
    torch.testing.assert_close(C[1], X[2])  # farthest, lower index first
    torch.testing.assert_close(C[2], X[3])
    assert farthest_rows(d2, 3).tolist() == [2, 3, 1]


def test_lloyd_stops_and_iters_zero_returns_seeds():
    X, _ = planted(seed=30)
    C0 = kmeans_pp_init(X, 5, seed=1)
    r = kmeans(X, 5, seed=1, iters=0)
    assert r.iterations == 0 and torch.equal(r.centroids, C0)
    r = kmeans(X, 5, seed=1, iters=100)
    assert 1 <= r.iterations < 100  # converged long before the cap
    lab_again, _ = assign(X, r.centroids)
    assert torch.equal(r.labels, lab_again)
    with pytest.raises(ValueError, match=r"init\.kmeans_iters"):
        kmeans(X, 5, seed=1, iters=-1)


# ----------------------------------------------------------------------------- torchrun


def _launch(nproc: int, out: Path, *extra: str) -> subprocess.Popen:
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath)
    cmd = torchrun(nproc, str(out), *extra, script=WORKER)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> dict:
    """All torchrun jobs at once: {world: results} and {"raise": (returncode, output)}."""
    tmp = tmp_path_factory.mktemp("linalg_dist")
    procs = {w: _launch(w, tmp / f"w{w}.pt") for w in WORLDS}
    procs["raise"] = _launch(2, tmp / "raise.pt", "--mode", "raise")
    outputs = {}
    for key, p in procs.items():
        try:
            outputs[key] = (p.communicate(timeout=240)[0], p.returncode)
        except subprocess.TimeoutExpired:
            p.kill()
            outputs[key] = (p.communicate()[0], "timeout")
    res = {"raise": outputs.pop("raise")}
    for w, (log, rc) in outputs.items():
        assert rc == 0, f"torchrun with {w} processes failed (rc={rc}):\n{log[-4000:]}"
        res[w] = torch.load(tmp / f"w{w}.pt", weights_only=False)
        assert res[w]["world"] == w
    return res


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_dist_tsqr_matches_svd(launches, world):
    res = launches[world]
    for (name, kind), (svals, V, counts) in res["tsqr"].items():
        A = res["tsqr_inputs"][name]
        assert sum(counts) == A.shape[0] and len(counts) == world
        check_svd(A, svals, V, extra_ranks=(6,) if name == "spectrum" else ())
        s2, V2 = res["stream"][name, kind]  # the same rows streamed in blocks of 5 on each rank
        check_svd(A, s2, V2, extra_ranks=(6,) if name == "spectrum" else ())
    if world > 1:  # the splits really include a rank without rows and ranks with n_r < d
        all_counts = [c for (_, _, c) in res["tsqr"].values()]
        assert any(0 in c for c in all_counts)
        assert any(0 < min(c[1:]) < 12 for c in all_counts)


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_dist_results_identical_on_all_ranks(launches, world):
    flags = launches[world]["identical"]
    assert flags and all(flags.values()), [k for k, v in flags.items() if not v]


@functools.lru_cache(maxsize=None)
def reference_run(run: str) -> dict:
    """Single-process results of the oracle (`kmeans_support.py`) for a k-means run of the worker (computed once)."""
    inp, k, seed, iters, tol = W.KMEANS_RUNS[run]
    X = W.kmeans_inputs()[inp]
    C, labels, it = reference.lloyd(X, reference.kmeans_pp_init(X, k, seed), iters, tol)
    idx = reference.kmeans_pp_indices(X, k, seed)
    C_bad = torch.cat([X[idx[: k - 2]].to(F64), torch.full((2, X.shape[1]), 1e3, dtype=F64)])
    lab, d2 = reference.assign(X, C_bad)  # two clusters left empty
    return {"C": C, "labels": labels, "iterations": it, "pp": idx, "update": reference.update(X, lab, d2, k)}


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_dist_kmeans_matches_single_process(launches, world):
    res = launches[world]
    K = res["kmeans_inputs"]
    for (run, kind), got in res["kmeans"].items():
        ref = reference_run(run)
        ctx = f"{run}/{kind}/world {world}"
        torch.testing.assert_close(got["centroids"], ref["C"], rtol=0, atol=1e-10, msg=ctx)
        assert torch.equal(got["labels"], ref["labels"]), ctx
        assert got["iterations"] == ref["iterations"], ctx
        if world == 1:
            assert torch.equal(got["centroids"], ref["C"]), ctx
        # seeding: the same global rows whatever the split
        assert torch.equal(res["pp"][run, kind], ref["pp"]), ctx
        # update with two empty clusters: re-seeded with the same farthest rows
        torch.testing.assert_close(res["update"][run, kind], ref["update"], rtol=0, atol=1e-10, msg=ctx)
    for run, (C_loc, lab_loc) in res["local"].items():  # LOCAL inside the process group
        ref = reference_run(run)
        assert torch.equal(C_loc, ref["C"]) and torch.equal(lab_loc, ref["labels"]), run
    for (run, kind), got in res["kmeans"].items():  # planted clusters found on every split
        if run == "planted":
            D = torch.cdist(got["centroids"], K["planted_centers"])  # (found, true)
            assert got["converged"] and sorted(D.argmin(dim=1).tolist()) == [0, 1, 2, 3], kind
            assert torch.equal(D.argmin(dim=1)[got["labels"]], K["planted_truth"]), kind
    assert all(v["reseeded"] > 0 for (run, _), v in res["kmeans"].items() if run == "dups")


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_dist_rand_draw_matches_single_process(launches, world):
    res = launches[world]
    X = res["kmeans_inputs"]["random"]
    for (run, kind), rows in res["rand"].items():
        if run == "float32":
            X32 = res["kmeans_inputs"]["float32"]
            assert torch.equal(rows, spt_rand(X32, 9, 5))
            continue
        P, seed = W.RAND_RUNS[run]
        assert torch.equal(rows, spt_rand(X, P, seed)), f"{run}/{kind}/world {world}"


@pytest.mark.slow
def test_torchrun_exits_nonzero_when_a_rank_raises(launches):
    log, rc = launches["raise"]
    assert rc not in (0, "timeout"), log[-2000:]
    assert "deliberate failure on rank 1" in log
