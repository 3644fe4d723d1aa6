"""Diagnostics: attention entropy, projection energy, value vectors, scale (spec: VIPAMIN.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vipamin_scale.init.diagnostics import attention_entropy, projection_energy, scale_ratio, value_vectors

F64 = torch.float64


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_uniform_attention_has_normalized_entropy_one():
    N = 10
    a = torch.full((2, 3, 5, N), 1.0 / N, dtype=F64)
    raw, norm = attention_entropy(a)
    assert raw.dtype == F64
    assert raw.item() == approx(math.log(N))
    assert norm.item() == approx(1.0)


def test_one_hot_and_mixed_attention():
    a = torch.zeros(4, 8)
    a[torch.arange(4), torch.tensor([0, 3, 7, 1])] = 1.0
    raw, norm = attention_entropy(a)
    assert raw.item() == 0.0 and norm.item() == 0.0
    # half the rows uniform over 2 of 8 keys (H = ln 2), half one-hot (H = 0)
    b = torch.zeros(2, 8)
    b[0, :2] = 0.5
    b[1, 5] = 1.0
    raw, norm = attention_entropy(b)
    assert raw.item() == approx(math.log(2) / 2)
    assert norm.item() == approx(math.log(2) / 2 / math.log(8))


def test_projection_energy_inside_outside_and_between():
    Q, _ = torch.linalg.qr(randn(9, 3, seed=0))  # (9, 3) orthonormal
    inside = randn(5, 3, seed=1) @ Q.T  # rows in span(Q)
    assert projection_energy(inside, Q).item() == approx(1.0)
    outside = randn(5, 9, seed=2)
    outside = outside - outside @ Q @ Q.T  # rows orthogonal to span(Q)
    assert projection_energy(outside, Q).item() < 1e-20
    # one row of each, of equal norm, plus a 45-degree row: (1 + 0 + 0.5) / 3
    a = inside[0] / inside[0].norm()
    b = outside[0] / outside[0].norm()
    U = torch.stack([a, b, a + b])
    assert projection_energy(U, Q).item() == approx(0.5)


def test_value_vectors_with_and_without_layernorm():
    d = 6
    p = randn(4, d, seed=3)
    W_V = randn(d, d, seed=4)
    b_V = randn(d, seed=5)
    gamma, beta = 1 + randn(d, seed=6), randn(d, seed=7)
    vv = value_vectors(p, W_V, b_V, norm=(gamma, beta, 1e-5))
    torch.testing.assert_close(vv.raw, (W_V @ p.T).T + b_V)
    ln = F.layer_norm(p, (d,), gamma, beta, eps=1e-5)
    torch.testing.assert_close(vv.norm1, (W_V @ ln.T).T + b_V)
    # a callable norm gives the same
    vc = value_vectors(p, W_V, b_V, norm=lambda x: F.layer_norm(x, (d,), gamma, beta, eps=1e-5))
    torch.testing.assert_close(vc.norm1, vv.norm1)
    assert value_vectors(p, W_V, b_V).norm1 is None


def test_scale_ratio():
    prompts = torch.zeros(3, 4)
    prompts[:, 0] = 2.0  # norm 2
    tokens = torch.zeros(5, 4)
    tokens[:, 1] = torch.tensor([1.0, 3.0, 5.0, 4.0, 7.0])  # mean norm 4
    assert scale_ratio(prompts, tokens).item() == approx(0.5)


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-12)
