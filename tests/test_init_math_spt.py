"""SPT prompts: k-means, SPT/rand and pooling (spec: BASELINES.md)."""

from __future__ import annotations

import pytest
import torch

from vipamin_scale.init.spt import (
    assign,
    farthest_rows,
    gather_rows_partial,
    global_row_draw,
    kmeans,
    kmeans_pp_indices,
    kmeans_pp_init,
    lloyd,
    pool_prompts,
    pool_windows,
    spt_rand,
    update,
)

F64 = torch.float64


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def planted(n_per=60, P=5, d=8, seed=0, noise=0.1):
    centers = 10.0 * torch.eye(P, d, dtype=F64) + randn(P, d, seed=seed)  # well separated
    X = (centers[:, None, :] + noise * randn(P, n_per, d, seed=seed + 1)).reshape(-1, d)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed + 2))
    return X[perm], centers


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kmeans_recovers_planted_clusters(seed):
    X, centers = planted(seed=10 * seed)
    C = kmeans(X, 5, iters=50, seed=seed)
    assert C.shape == (5, 8) and C.dtype == F64
    D = torch.cdist(C, centers)  # (found, true)
    nearest = D.argmin(dim=1)
    assert sorted(nearest.tolist()) == [0, 1, 2, 3, 4]  # one-to-one
    assert D.min(dim=1).values.max() < 0.1  # each centroid sits on a planted center


def test_kmeans_is_deterministic_and_seed_dependent():
    X = randn(400, 6, seed=5)  # no structure: seeds matter
    a = kmeans(X, 7, iters=20, seed=11)
    assert torch.equal(a, kmeans(X, 7, iters=20, seed=11))
    assert not torch.equal(a, kmeans(X, 7, iters=20, seed=12))


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
    C = kmeans(X, 3, iters=5, seed=0)
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
    C = update(X, labels, d2, P=3)
    torch.testing.assert_close(C[0], X.mean(0))
    torch.testing.assert_close(C[1], X[2])  # farthest, lower index first
    torch.testing.assert_close(C[2], X[3])
    assert farthest_rows(d2, 3).tolist() == [2, 3, 1]


def test_lloyd_stops_and_iters_zero_returns_seeds():
    X, _ = planted(seed=30)
    C0 = kmeans_pp_init(X, 5, seed=1)
    C, labels, n_iter = lloyd(X, C0, iters=0)
    assert n_iter == 0 and torch.equal(C, C0)
    C, labels, n_iter = lloyd(X, C0, iters=100)
    assert 1 <= n_iter < 100  # converged long before the cap
    lab_again, _ = assign(X, C)
    assert torch.equal(labels, lab_again)
    with pytest.raises(ValueError, match=r"init\.kmeans_iters"):
        lloyd(X, C0, iters=-1)


def test_spt_rand_draws():
    X = randn(300, 4, seed=40)
    a = spt_rand(X, 10, seed=3)
    assert a.shape == (10, 4) and a.dtype == F64
    assert torch.equal(a, spt_rand(X, 10, seed=3))
    assert not torch.equal(a, spt_rand(X, 10, seed=4))
    idx = global_row_draw(300, 10, seed=3)
    assert idx.unique().numel() == 10  # without replacement
    torch.testing.assert_close(a, X[idx])
    with pytest.raises(ValueError):
        spt_rand(X[:5], 10, seed=0)


def test_spt_rand_is_uniform():
    n, P, trials = 20, 5, 4000
    counts = torch.zeros(n)
    for s in range(trials):
        counts[global_row_draw(n, P, seed=s)] += 1
    expected = trials * P / n  # 1000 per row
    assert (counts - expected).abs().max() < 0.15 * expected


def test_spt_rand_shards_reproduce_the_global_draw():
    X = randn(103, 5, seed=50)
    idx = global_row_draw(X.shape[0], 8, seed=9)
    for bounds in ([0, 103], [0, 40, 103], [0, 10, 11, 70, 103]):
        total = torch.zeros(8, 5, dtype=F64)
        owners = torch.zeros(8, dtype=torch.int64)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            rows, owned = gather_rows_partial(X[lo:hi], idx, row_offset=lo)
            total += rows
            owners += owned
        assert torch.equal(owners, torch.ones(8, dtype=torch.int64))
        torch.testing.assert_close(total, spt_rand(X, 8, seed=9), rtol=0, atol=0)


def test_pool_windows_hand_case():
    tokens = torch.arange(7, dtype=F64).reshape(1, 7, 1)  # N_p = 7, P = 4: windows of 2 + remainder 1
    mean = pool_windows(tokens, 4, "mean")
    assert mean.flatten().tolist() == [0.5, 2.5, 4.5, 6.0]
    mx = pool_windows(tokens, 4, "max")
    assert mx.flatten().tolist() == [1.0, 3.0, 5.0, 6.0]
    # no remainder: 6 tokens in 3 windows of 2
    six = torch.arange(6, dtype=F64).reshape(1, 6, 1)
    assert pool_windows(six, 4, "mean").flatten().tolist() == [0.5, 2.5, 4.5]
    # P = 1: the whole sequence
    assert pool_windows(tokens, 1, "mean").flatten().tolist() == [3.0]
    with pytest.raises(ValueError):
        pool_windows(torch.zeros(1, 2, 1), 5, "mean")
    with pytest.raises(ValueError):
        pool_windows(tokens, 4, "median")


def test_pool_prompts_draws_pooled_vectors():
    tokens = randn(3, 10, 4, seed=60)  # P = 4: 3 windows of 3 + remainder of 1 -> 4 per image
    out = pool_prompts(tokens, 4, "mean", seed=2)
    assert out.shape == (4, 4) and out.dtype == F64
    pooled = pool_windows(tokens, 4, "mean").reshape(-1, 4)  # (12, 4)
    hits = torch.cdist(out, pooled).min(dim=1).values
    assert hits.max() < 1e-12  # every prompt is one of the pooled vectors
    assert torch.cdist(out, pooled).argmin(dim=1).unique().numel() == 4  # distinct
    torch.testing.assert_close(pooled[0], tokens[0, :3].mean(0))
    torch.testing.assert_close(pooled[3], tokens[0, 9])
    assert torch.equal(out, pool_prompts(tokens, 4, "mean", seed=2))
    assert not torch.equal(out, pool_prompts(tokens, 4, "mean", seed=3))
    mx = pool_prompts(tokens, 4, "max", seed=2)
    torch.testing.assert_close(pool_windows(tokens, 4, "max")[1, 0], tokens[1, :3].amax(0))
    assert mx.shape == (4, 4)
