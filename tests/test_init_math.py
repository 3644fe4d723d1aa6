"""VIPAMIN per-layer math and the Xavier random prompts (spec: VIPAMIN.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vipamin_scale.init.random import xavier_prompts
from vipamin_scale.init.vipamin import (
    EmptyComplementError,
    LnAwareInfeasibleWarning,
    basis_from_svd,
    combine,
    ln_aware_orthogonal_prompts,
    match_prompts,
    orthogonal_prompts,
    rescale_to,
    row_space_basis,
    validate_vipamin_options,
    vipamin_layer,
)

F64 = torch.float64


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def rowspace_projector(S):
    """Orthogonal projector onto the row space of S (N_e, d), independent of row_space_basis."""
    return torch.linalg.pinv(S) @ S  # (d, d)


def energy_via_projector(V, Pi):
    """mean ||Pi v||^2 / ||v||^2 over rows of V."""
    return ((V @ Pi).pow(2).sum(1) / V.pow(2).sum(1)).mean().item()


def layer_case(d=12, N_e=5, P=6, seed=0, bias_scale=1.0):
    """A random, well-conditioned layer: S (N_e, d), W_V (d, d), b_V (d,), R (P, d)."""
    S = randn(N_e, d, seed=seed)
    W_V = torch.eye(d, dtype=F64) + 0.3 * randn(d, d, seed=seed + 1)
    b_V = bias_scale * 0.1 * randn(d, seed=seed + 2)
    R = randn(P, d, seed=seed + 3)
    return S, W_V, b_V, R


# ----------------------------------------------------------------------------- random


def test_xavier_bound_shape_and_determinism():
    R = xavier_prompts(3, 50, 768, (16, 16), seed=0)
    assert R.shape == (3, 50, 768) and R.dtype == F64
    v = 0.0625  # sqrt(6 / (3*16*16 + 768)) for ViT-B/16
    assert R.abs().max() <= v
    assert R.abs().max() > 0.99 * v  # fills the interval
    assert abs(R.var().item() - v * v / 3) < 0.02 * v * v  # uniform variance
    assert torch.equal(R, xavier_prompts(3, 50, 768, (16, 16), seed=0))
    assert not torch.equal(R, xavier_prompts(3, 50, 768, (16, 16), seed=1))
    R32 = xavier_prompts(3, 50, 768, (16, 16), seed=0, dtype=torch.float32)
    assert R32.dtype == torch.float32 and torch.equal(R32, R.float())


def test_xavier_bound_depends_on_patch_and_width():
    R = xavier_prompts(1, 200, 384, (14, 14), seed=3)
    v = math.sqrt(6 / (3 * 14 * 14 + 384))
    assert R.abs().max() <= v and R.abs().max() > 0.99 * v


# ----------------------------------------------------------------------------- matching


def test_match_hand_case():
    # prompt keys (1,0) and (0,1); patch keys chosen so the top-2 are known
    K = torch.tensor(
        [[1.0, 0.0], [0.0, 1.0],  # prompts
         [2.0, 0.0], [1.0, 1.0], [0.0, 3.0], [-1.0, 0.0]],  # patches 0..3
        dtype=torch.float32,
    )
    E = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 4.0], [8.0, 8.0, 8.0]])  # (N_p=4, d=3)
    p_match, idx = match_prompts(K, E, P=2, k=2)
    assert idx.tolist() == [[0, 1], [2, 1]]
    assert p_match.dtype == F64
    torch.testing.assert_close(p_match[0], torch.tensor([0.5, 1.0, 0.0], dtype=F64))
    torch.testing.assert_close(p_match[1], torch.tensor([0.0, 1.0, 2.0], dtype=F64))
    # k = 1: the single most similar patch, returned as is
    p1, idx1 = match_prompts(K, E, P=2, k=1)
    assert idx1.tolist() == [[0], [2]]
    torch.testing.assert_close(p1, E[[0, 2]].to(F64))


def test_match_ties_go_to_lower_index():
    # cos with prompt (1,0): patches 0, 2, 3 all 1.0 (3 with a different norm), 1 is 0
    K = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [5.0, 0.0]], dtype=F64)
    E = torch.arange(4 * 2, dtype=F64).reshape(4, 2)
    _, idx = match_prompts(K, E, P=1, k=2)
    assert idx.tolist() == [[0, 2]]
    _, idx = match_prompts(K, E, P=1, k=3)
    assert idx.tolist() == [[0, 2, 3]]
    # many exact ties: all patch keys identical, every prompt picks the first k patches
    N_p, k = 97, 7
    K = torch.cat([randn(3, 4, seed=5), torch.ones(N_p, 4, dtype=F64)])
    E = randn(N_p, 6, seed=6)
    p, idx = match_prompts(K, E, P=3, k=k)
    assert idx.tolist() == [list(range(k))] * 3
    torch.testing.assert_close(p, E[:k].mean(0).expand(3, 6))


@pytest.mark.parametrize("k", [0, 5, -1])
def test_match_k_out_of_range(k):
    K = randn(2 + 4, 3, seed=0)
    E = randn(4, 5, seed=1)
    with pytest.raises(ValueError, match=r"init\.k.*\[1, 4\]"):
        match_prompts(K, E, P=2, k=k)
    with pytest.raises(ValueError, match=r"init\.k"):
        validate_vipamin_options(k, 0.5, False, False, "match", N_p=4)


# ----------------------------------------------------------------------------- row space


def test_row_space_basis_spans_rows():
    S = randn(5, 12, seed=0)
    Q = row_space_basis(S)
    assert Q.shape == (12, 5) and Q.dtype == F64
    torch.testing.assert_close(Q.T @ Q, torch.eye(5, dtype=F64))
    torch.testing.assert_close(Q @ Q.T, rowspace_projector(S))


def test_row_space_basis_numerical_rank():
    S = randn(6, 2, seed=1) @ randn(2, 10, seed=2)  # rank 2
    Q = row_space_basis(S)
    assert Q.shape == (10, 2)
    torch.testing.assert_close(S - S @ Q @ Q.T, torch.zeros_like(S), atol=1e-12, rtol=0)


def test_energy_truncation_keeps_leading_directions():
    d = 9
    U, _ = torch.linalg.qr(randn(4, 4, seed=3))
    V, _ = torch.linalg.qr(randn(d, 4, seed=4))  # (d, 4) orthonormal
    s = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=F64)  # s^2: 9, 4, 1, .25 of 14.25
    S = U @ torch.diag(s) @ V.T
    assert row_space_basis(S).shape[1] == 4
    assert row_space_basis(S, energy=1.0).shape[1] == 4
    Q = row_space_basis(S, energy=0.9)  # 9/14.25 = .63 < .9 <= 13/14.25 = .91
    assert Q.shape == (d, 2)
    torch.testing.assert_close(Q @ Q.T, V[:, :2] @ V[:, :2].T)
    assert row_space_basis(S, energy=0.5).shape[1] == 1
    # boundary: equal singular values, energy exactly 1/2 of the total -> 2 of 4
    S_eq = U @ V.T
    assert row_space_basis(S_eq, energy=0.5).shape[1] == 2
    with pytest.raises(ValueError, match=r"init\.energy"):
        row_space_basis(S, energy=1.5)
    with pytest.raises(ValueError, match=r"init\.energy"):
        row_space_basis(S, energy=0.0)


def test_basis_from_svd_sorts_and_truncates():
    d = 7
    V, _ = torch.linalg.qr(randn(d, 3, seed=8))  # columns = right singular vectors
    svals = torch.tensor([1.0, 4.0, 2.0], dtype=F64)  # unsorted on purpose
    Q = basis_from_svd(svals, V, energy=0.7)  # 16/21 = .76 >= .7
    assert Q.shape == (d, 1)
    torch.testing.assert_close(Q @ Q.T, V[:, 1:2] @ V[:, 1:2].T)
    assert basis_from_svd(svals, V).shape == (d, 3)
    # a zero singular value is dropped from the numerical rank
    Q0 = basis_from_svd(torch.tensor([2.0, 0.0, 1.0], dtype=F64), V)
    torch.testing.assert_close(Q0 @ Q0.T, V[:, [0, 2]] @ V[:, [0, 2]].T)


# ----------------------------------------------------------------------------- orthogonal module


def test_orthogonal_prompts_value_energy_is_zero():
    S, W_V, b_V, R = layer_case()
    Q = row_space_basis(S)
    p = orthogonal_prompts(R, W_V, b_V, Q)
    assert p.shape == R.shape and p.dtype == F64
    value = p @ W_V.T + b_V  # W_V p + b_V in row form
    Pi = rowspace_projector(S)
    assert energy_via_projector(value, Pi) <= 1e-8
    # and the value is exactly the projected random value vector u_perp
    u = R @ W_V.T + b_V
    torch.testing.assert_close(value, u - u @ Pi, atol=1e-10, rtol=1e-10)
    # random prompts themselves are not orthogonal (the check is not vacuous)
    assert energy_via_projector(u, Pi) > 0.1


def test_official_compat_is_the_transposed_map():
    S, W_V, b_V, R = layer_case(seed=10)
    Q = row_space_basis(S)
    Pi = rowspace_projector(S)
    u = R @ W_V.T + b_V
    u_perp = u - u @ Pi
    reference = (u_perp - b_V) @ torch.linalg.pinv(W_V)  # the public code's line
    p_off = orthogonal_prompts(R, W_V, b_V, Q, official_compat=True)
    torch.testing.assert_close(p_off, reference, atol=1e-12, rtol=1e-12)
    p_def = orthogonal_prompts(R, W_V, b_V, Q)
    assert (p_off - p_def).abs().max() > 1e-3  # W_V is not symmetric: the maps differ
    # and the transposed map is not orthogonal in value space
    assert energy_via_projector(p_off @ W_V.T + b_V, Pi) > 1e-4


def test_orthogonal_prompts_accept_float32_inputs():
    S, W_V, b_V, R = layer_case(seed=20)
    p64 = orthogonal_prompts(R, W_V, b_V, row_space_basis(S))
    p32 = orthogonal_prompts(R.float(), W_V.float(), b_V.float(), row_space_basis(S.float()))
    assert p32.dtype == F64
    torch.testing.assert_close(p32, p64, atol=1e-4, rtol=1e-4)


def test_empty_complement_is_an_error_naming_the_layer():
    d = 8
    S, W_V, b_V, R = layer_case(d=d, N_e=20, seed=30)  # N_e >= d: full rank d
    Q = row_space_basis(S)
    assert Q.shape == (d, d)
    with pytest.raises(EmptyComplementError, match=r"layer 3\b"):
        orthogonal_prompts(R, W_V, b_V, Q, layer=3)
    E = randn(20 - 1, d, seed=31)
    K = randn(R.shape[0] + 19, 4, seed=32)
    common = dict(E=E, K=K, R=R, W_V=W_V, b_V=b_V, S=S, k=3, layer=5)
    with pytest.raises(EmptyComplementError, match=r"layer 5\b.*init\.energy"):
        vipamin_layer(**common, lam=0.5)
    # lam = 0 needs no orthogonal module
    out = vipamin_layer(**common, lam=0.0)
    assert out.info["orth_defined"] is False
    torch.testing.assert_close(out.prompts, out.match, rtol=0, atol=0)
    # energy < 1 truncates the basis and leaves room
    out = vipamin_layer(**common, lam=1.0, energy=0.9, orth_scale="raw")
    r = out.info["rank"]
    assert r < d
    Q_trunc = row_space_basis(S, energy=0.9)
    value = out.prompts @ W_V.T + b_V
    assert energy_via_projector(value, Q_trunc @ Q_trunc.T) <= 1e-8
    assert out.info["energy_raw"] <= 1e-8


# ----------------------------------------------------------------------------- ln_aware


def ln_case(d=16, N_e=4, P=6, seed=40):
    S, W_V, b_V, R = layer_case(d=d, N_e=N_e, P=P, seed=seed)
    gamma = 1.0 + 0.2 * randn(d, seed=seed + 7)
    beta = 0.05 * randn(d, seed=seed + 8)
    return S, W_V, b_V, R, gamma, beta


def test_ln_aware_energy_after_layernorm_is_zero():
    S, W_V, b_V, R, gamma, beta = ln_case()
    d = W_V.shape[0]
    Q = row_space_basis(S)
    p, energy, exact = ln_aware_orthogonal_prompts(R, W_V, b_V, Q, gamma, beta, layer=2)
    assert exact is True and p.shape == R.shape and p.dtype == F64
    Pi = rowspace_projector(S)
    for scale in (1.0, 0.37, 25.0):  # norm1 is scale invariant: any positive multiple works
        value = F.layer_norm(scale * p, (d,), gamma, beta, eps=1e-6) @ W_V.T + b_V
        assert energy_via_projector(value, Pi) <= 1e-8
    assert 0.0 <= energy <= 1e-8
    # y is on LayerNorm's sphere: zero mean, ||y||^2 = d
    torch.testing.assert_close(p.mean(1), torch.zeros(R.shape[0], dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(p.pow(2).sum(1), torch.full((R.shape[0],), float(d), dtype=F64))
    # each prompt keeps its own random direction: distinct prompts
    assert torch.cdist(p, p).add(torch.eye(R.shape[0], dtype=F64)).min() > 1e-3
    # the plain map is not orthogonal after norm1 (the check is not vacuous)
    p_plain = orthogonal_prompts(R, W_V, b_V, Q)
    value_plain = F.layer_norm(p_plain, (d,), gamma, beta, eps=1e-6) @ W_V.T + b_V
    assert energy_via_projector(value_plain, Pi) > 1e-4


def test_ln_aware_is_independent_of_the_basis_rotation():
    S, W_V, b_V, R, gamma, beta = ln_case(seed=50)
    Q = row_space_basis(S)
    O, _ = torch.linalg.qr(randn(Q.shape[1], Q.shape[1], seed=51))
    p1, _, _ = ln_aware_orthogonal_prompts(R, W_V, b_V, Q, gamma, beta, layer=0)
    p2, _, _ = ln_aware_orthogonal_prompts(R, W_V, b_V, Q @ O, gamma, beta, layer=0)
    torch.testing.assert_close(p1, p2, atol=1e-10, rtol=1e-10)


def test_ln_aware_infeasible_warns_once_and_normalizes():
    S, W_V, b_V, R, gamma, beta = ln_case(seed=60)
    d = W_V.shape[0]
    b_V = 200.0 * randn(d, seed=61)  # a huge bias: ||y0||^2 >> d
    Q = row_space_basis(S)
    with pytest.warns(LnAwareInfeasibleWarning, match=r"layer 7\b") as record:
        p, energy, exact = ln_aware_orthogonal_prompts(R, W_V, b_V, Q, gamma, beta, layer=7)
    assert len([w for w in record if issubclass(w.category, LnAwareInfeasibleWarning)]) == 1
    assert exact is False
    torch.testing.assert_close(p.pow(2).sum(1), torch.full((R.shape[0],), float(d), dtype=F64))
    torch.testing.assert_close(p.mean(1), torch.zeros(R.shape[0], dtype=F64), atol=1e-10, rtol=0)
    value = F.layer_norm(p, (d,), gamma, beta, eps=1e-6) @ W_V.T + b_V
    assert energy == pytest.approx(energy_via_projector(value, rowspace_projector(S)), rel=1e-9, abs=1e-12)


def test_ln_aware_empty_complement():
    d = 8
    S, W_V, b_V, R, gamma, beta = ln_case(d=d, N_e=d - 1, seed=70)  # r + 1 = d
    Q = row_space_basis(S)
    with pytest.raises(EmptyComplementError, match=r"layer 4\b"):
        ln_aware_orthogonal_prompts(R, W_V, b_V, Q, gamma, beta, layer=4)


# ----------------------------------------------------------------------------- scale, mix, layer


def test_combine_endpoints_and_mix():
    m = randn(5, 7, seed=80)
    o = 1e3 * randn(5, 7, seed=81)
    assert torch.equal(combine(m, o, 0.0), m)
    assert torch.equal(combine(m, o, 1), o)
    torch.testing.assert_close(combine(m, o, 0.3), 0.7 * m + 0.3 * o, rtol=0, atol=1e-12)
    for lam in (-0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match=r"init\.lam"):
            combine(m, o, lam)


def test_rescale_to_matches_norms_and_keeps_direction():
    m = randn(5, 7, seed=90)
    o = 1e3 * randn(5, 7, seed=91)
    s = rescale_to(o, m)
    torch.testing.assert_close(s.norm(dim=1), m.norm(dim=1))
    torch.testing.assert_close(F.cosine_similarity(s, o, dim=1), torch.ones(5, dtype=F64))


def full_layer_case(seed=100, d=12, N_p=9, P=4, d_h=3):
    S, W_V, b_V, R = layer_case(d=d, N_e=N_p + 1, P=P, seed=seed)
    E = randn(N_p, d, seed=seed + 20)
    K = randn(P + N_p, d_h, seed=seed + 21)
    gamma = 1.0 + 0.2 * randn(d, seed=seed + 22)
    beta = 0.05 * randn(d, seed=seed + 23)
    return dict(E=E, K=K, R=R, W_V=W_V, b_V=b_V, S=S, gamma=gamma, beta=beta)


def test_vipamin_layer_lambda_endpoints():
    case = full_layer_case()
    for kw in (dict(orth_scale="raw"), dict(orth_scale="match"), dict(orth_scale="match", ln_aware=True)):
        out0 = vipamin_layer(**case, k=3, lam=0.0, **kw)
        out1 = vipamin_layer(**case, k=3, lam=1.0, **kw)
        outh = vipamin_layer(**case, k=3, lam=0.25, **kw)
        p_match, _ = match_prompts(case["K"], case["E"], case["R"].shape[0], 3)
        assert torch.equal(out0.prompts, p_match) and torch.equal(out0.match, p_match)
        assert torch.equal(out1.prompts, out1.orth)
        torch.testing.assert_close(outh.prompts, 0.75 * outh.match + 0.25 * outh.orth, rtol=0, atol=1e-12)
        # the orthogonal part does not depend on lam
        torch.testing.assert_close(out0.orth, out1.orth, rtol=0, atol=0)


def test_vipamin_layer_orth_scale_match():
    case = full_layer_case(seed=110)
    raw = vipamin_layer(**case, k=2, lam=0.5, orth_scale="raw")
    out = vipamin_layer(**case, k=2, lam=0.5, orth_scale="match")
    torch.testing.assert_close(out.orth.norm(dim=1), out.match.norm(dim=1))
    torch.testing.assert_close(F.cosine_similarity(out.orth, raw.orth, dim=1), torch.ones(4, dtype=F64))
    torch.testing.assert_close(raw.orth, orthogonal_prompts(case["R"], case["W_V"], case["b_V"], row_space_basis(case["S"])))


def test_vipamin_layer_paths_and_info():
    case = full_layer_case(seed=120)
    Q = row_space_basis(case["S"])
    off = vipamin_layer(**case, k=2, lam=1.0, orth_scale="raw", official_compat=True)
    torch.testing.assert_close(off.prompts, orthogonal_prompts(case["R"], case["W_V"], case["b_V"], Q, official_compat=True))
    ln = vipamin_layer(**case, k=2, lam=1.0, ln_aware=True, orth_scale="match", layer=6)
    assert ln.info["layer"] == 6 and ln.info["rank"] == Q.shape[1]
    assert ln.info["ln_aware_exact"] is True and ln.info["energy_norm1"] <= 1e-8
    # a precomputed basis (tokens mode) gives the same result as S
    case_q = {key: v for key, v in case.items() if key != "S"}
    ln_q = vipamin_layer(**case_q, Q=Q, k=2, lam=1.0, ln_aware=True, orth_scale="match", layer=6)
    torch.testing.assert_close(ln_q.prompts, ln.prompts, rtol=0, atol=0)
    paper = vipamin_layer(**case, k=2, lam=1.0, orth_scale="raw")
    assert paper.info["energy_raw"] <= 1e-8
    assert paper.info["energy_norm1"] > 1e-4  # the paper's map is not orthogonal after norm1


def test_validate_options():
    validate_vipamin_options(5, 0.3, False, False, "match", N_p=196)
    validate_vipamin_options(5, 0.3, True, False, "raw", N_p=196)
    with pytest.raises(ValueError, match=r"init=vipamin_official"):
        validate_vipamin_options(5, 0.3, True, True, "raw", N_p=196)
    with pytest.raises(ValueError, match=r"init=vipamin_official"):
        validate_vipamin_options(5, 0.3, True, False, "match", N_p=196)
    with pytest.raises(ValueError, match=r"init\.orth_scale"):
        validate_vipamin_options(5, 0.3, False, False, "big", N_p=196)
    with pytest.raises(ValueError, match=r"init\.lam"):
        validate_vipamin_options(5, 2.0, False, False, "raw", N_p=196)
    with pytest.raises(ValueError, match=r"init\.k"):
        validate_vipamin_options(197, 0.3, False, False, "raw", N_p=196)
    # vipamin_layer validates before computing
    case = full_layer_case()
    with pytest.raises(ValueError, match=r"init=vipamin_official"):
        vipamin_layer(**case, k=2, lam=0.5, official_compat=True)
