"""SPT prompts: SPT/rand and pooling (spec: BASELINES.md). SPT/kmeans is `linalg.kmeans`: its
tests are in test_linalg.py."""

from __future__ import annotations

import pytest
import torch

from vipamin_scale.init.spt import pool_prompts, pool_windows, spt_rand
from vipamin_scale.linalg.kmeans import gather_rows_partial, global_row_draw

F64 = torch.float64


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


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
