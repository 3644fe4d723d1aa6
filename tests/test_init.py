"""The initializer around the math: capture statistics, layer plumbing, the prompts file, diagnose."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import TINY, cli, cli_env
from safetensors import safe_open

from vipamin_scale.config import default_config
from vipamin_scale.init.capture import CaptureSpec, capture_layer_stats
from vipamin_scale.init.random import xavier_prompts
from vipamin_scale.init.run import read_prompts_metadata, run_init
from vipamin_scale.init.sharded import reduce_means
from vipamin_scale.models.backbones import build_backbone
from vipamin_scale.models.prompted import PromptedViT


def _model(deep=True, P=3, seed=0):
    torch.manual_seed(seed)
    return PromptedViT(build_backbone("vit_test_d64"), 2, P, deep).eval()


def _naive_stats(model, images, R):
    """Per-image recomputation by hand through the timm modules, averaged (float64)."""
    P, bb = model.num_prompts, model.backbone
    E, K, S = {}, {}, {}
    for img in images:
        x = img[None]
        # pass A: prompted
        t = model.embed(x)
        t = torch.cat([t[:, :1], R[0][None].float(), t[:, 1:]], dim=1)
        for l, blk in enumerate(bb.blocks):
            if model.deep and l > 0:
                t = torch.cat([t[:, :1], R[l][None].float(), t[:, 1 + P:]], dim=1)
            E[l] = E.get(l, 0) + t[0, 1 + P:].double()
            qkv = blk.attn.qkv(blk.norm1(t))[0]  # (N, 3d)
            d, h = model.dim, blk.attn.num_heads
            k = qkv[:, d:2 * d].reshape(-1, h, d // h).mean(dim=1)  # heads averaged
            K[l] = K.get(l, 0) + k[1:].double()
            t = blk(t)
        # pass B: no prompts
        t = model.embed(x)
        for l, blk in enumerate(bb.blocks):
            y = blk.norm1(t)
            qkv = blk.attn.qkv(y).reshape(1, y.shape[1], 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            a = (qkv[0] @ qkv[1].transpose(-1, -2) * blk.attn.scale).softmax(-1) @ qkv[2]  # (1, h, N, dh)
            S[l] = S.get(l, 0) + a.transpose(1, 2).reshape(y.shape[1], -1).double()
            t = blk(t)
    n = len(images)
    return {name: {l: v / n for l, v in table.items()} for name, table in (("E", E), ("K", K), ("S", S))}


@pytest.mark.parametrize("deep", [False, True])
def test_capture_equals_naive_recomputation(deep):
    model = _model(deep)
    images = torch.randn(5, 3, 32, 32)
    R = xavier_prompts(model.num_prompt_layers, 3, 64, (8, 8), seed=1)
    rows = list(range(model.num_prompt_layers))
    spec = CaptureSpec(layers=rows, match=True, attn_out=True)
    with torch.no_grad():
        B, got = reduce_means(capture_layer_stats(model, [images[:2], images[2:]], R.float(), spec))
        want = _naive_stats(model, images, R)
    assert B == 5
    for name in ("E", "K", "S"):
        assert sorted(got[name]) == rows
        for l in rows:
            torch.testing.assert_close(got[name][l], want[name][l], rtol=1e-5, atol=1e-5, msg=f"{name}[{l}]")


def test_capture_does_not_depend_on_batch_size():
    model = _model(True)
    images = torch.randn(7, 3, 32, 32)
    R = xavier_prompts(2, 3, 64, (8, 8), seed=1).float()
    spec = CaptureSpec(layers=[0, 1], match=True, attn_out=True, block_in=True)
    results = [reduce_means(capture_layer_stats(model, list(images.split(bs)), R, spec))[1] for bs in (1, 3, 7)]
    for other in results[1:]:
        for name in ("E", "K", "S", "X"):
            for l in (0, 1):
                torch.testing.assert_close(other[name][l], results[0][name][l], rtol=1e-5, atol=1e-6)


def test_shallow_capture_stops_after_block_0():
    model = _model(False)
    calls = []
    model.backbone.blocks[1].register_forward_pre_hook(lambda m, a: calls.append(1))
    capture_layer_stats(model, [torch.randn(2, 3, 32, 32)], xavier_prompts(1, 3, 64, (8, 8), 0).float(),
                        CaptureSpec(layers=[0], match=True, attn_out=True))
    assert calls == []


def _cfg(tmp_path, **over):
    base = dict(model__name="vit_test_d64", model__img_size=32, model__checkpoint=None, prompt__length=4,
                init__method="vipamin", init__num_images=64, init__batch_size=16, train__out_dir=str(tmp_path))
    base.update(over)
    return default_config(**base)


def test_layer_l_uses_block_l(tmp_path, digits_root):
    """Row l's orthogonal prompts come from block l's W_V: perturbing the last block's W_V changes
    only the last row (earlier blocks never see it); each row equals the math on that block's stats."""
    cfg = _cfg(tmp_path, init__lam=1.0)
    base = run_init(cfg, tmp_path / "a.safetensors")["tensors"]
    torch.manual_seed(0)
    bump = torch.randn(64, 64) * 0.05

    import vipamin_scale.init.run as run_mod

    real_load = run_mod.load_backbone

    def perturbed(*args, **kwargs):
        m = real_load(*args, **kwargs)
        with torch.no_grad():
            m.blocks[1].attn.qkv.weight[128:] += bump
        return m

    run_mod.load_backbone = perturbed
    try:
        other = run_init(cfg, tmp_path / "b.safetensors")["tensors"]
    finally:
        run_mod.load_backbone = real_load
    torch.testing.assert_close(other["orth"][0], base["orth"][0], rtol=0, atol=0)
    assert not torch.allclose(other["orth"][1], base["orth"][1])


def test_prompts_file_contents_and_metadata(tmp_path, digits_root):
    cfg = _cfg(tmp_path, init__k=3, init__lam=0.3)
    out = tmp_path / "p.safetensors"
    result = run_init(cfg, out)
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == {"prompts", "match", "orth", "random"}
        prompts, match, orth, R = (f.get_tensor(k) for k in ("prompts", "match", "orth", "random"))
    assert prompts.shape == (2, 4, 64) and prompts.dtype == torch.float32
    torch.testing.assert_close(prompts, (0.7 * match.double() + 0.3 * orth.double()).float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(R, xavier_prompts(2, 4, 64, (8, 8), 0).float())
    # orth_scale=match: each orthogonal prompt has its matched prompt's norm
    torch.testing.assert_close(orth.norm(dim=-1), match.norm(dim=-1), rtol=1e-5, atol=1e-6)
    meta = read_prompts_metadata(out)
    assert meta["method"] == "vipamin" and meta["k"] == 3 and meta["lam"] == 0.3 and meta["B"] == 64
    assert meta["world_size"] == 1 and len(meta["keys_sha256"]) == 16
    assert set(meta["wall_times"]) == {"capture_s", "allreduce_s", "math_s", "gather_s"}
    assert [int(l) for l in meta["layers"]] == [0, 1]
    assert all(0.0 <= info["energy_raw"] <= 1.0 for info in meta["layers"].values())
    torch.testing.assert_close(result["prompts"], prompts)


def test_paper_map_is_orthogonal_official_map_is_not(tmp_path, digits_root):
    """[P] With lam=1 and raw scale the prompts are the orthogonal module's output: the corrected
    pre-image has zero projection energy (W_V p + b_V), the public code's transposed map does not."""
    energies = {}
    for name, official in (("paper", False), ("official", True)):
        out = tmp_path / f"{name}.safetensors"
        run_init(_cfg(tmp_path, init__lam=1.0, init__orth_scale="raw", init__official_compat=official), out)
        energies[name] = [info["energy_raw"] for info in read_prompts_metadata(out)["layers"].values()]
    assert max(energies["paper"]) <= 1e-8, energies
    assert min(energies["official"]) > 1e-3, energies


def test_spt_and_random_methods(tmp_path, digits_root):
    rnd = run_init(_cfg(tmp_path, init__method="random"), tmp_path / "r.safetensors")["tensors"]
    torch.testing.assert_close(rnd["prompts"], rnd["random"])
    spt = run_init(_cfg(tmp_path, init__method="spt", init__spt_mode="rand"), tmp_path / "s.safetensors")["tensors"]
    assert spt["prompts"].shape == (2, 4, 64)
    again = run_init(_cfg(tmp_path, init__method="spt", init__spt_mode="rand"), tmp_path / "s2.safetensors")["tensors"]
    torch.testing.assert_close(spt["prompts"], again["prompts"], rtol=0, atol=0)


def test_k_out_of_range_fails_before_compute(tmp_path, digits_root):
    with pytest.raises(ValueError, match=r"init\.k"):
        run_init(_cfg(tmp_path, init__k=17), tmp_path / "x.safetensors")  # 16 patches
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_train_from_init_and_diagnose_cli(tmp_path, digits_root):
    """`train init=vipamin` runs the initializer first, then trains from its prompts; `diagnose`
    writes the table, JSON and PNG for a prompts file."""
    run = tmp_path / "run"
    proc = subprocess.run(cli("train", *TINY, "train.epochs=1", "init=vipamin", "init.num_images=64",
                              f"hydra.run.dir={run}"), env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "result.json").read_text())["method"] == "vipamin"
    assert read_prompts_metadata(run / "prompts.safetensors")["B"] == 64
    diag = tmp_path / "diag"
    proc = subprocess.run(cli("diagnose", *TINY, f"prompt.init_file={run / 'prompts.safetensors'}",
                              "init.num_images=32", f"hydra.run.dir={diag}"),
                          env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((diag / "diagnostics.json").read_text())
    assert set(report["methods"]) == {"prompts", "random"}
    for per in report["methods"].values():
        assert len(per["entropy_norm"]) == 2 and all(0 < h <= 1 for h in per["entropy_norm"])
        assert all(0 <= e <= 1 for e in per["energy_norm1"] + per["energy_raw"])
    assert (diag / "diagnostics.png").stat().st_size > 1000
    assert "| layer |" in proc.stdout


def test_no_room_for_orthogonal_is_a_config_error_before_compute(tmp_path, digits_root, monkeypatch):
    """96 px = 144 patches >= width 64: the row space of S fills the width, so lam > 0 needs energy < 1."""
    from vipamin_scale.config import ConfigError
    import vipamin_scale.init.run as run_mod

    def no_capture(*a, **k):
        raise AssertionError("capture ran before the configuration error")

    monkeypatch.setattr(run_mod, "capture_layer_stats", no_capture)
    with pytest.raises(ConfigError, match=r"^init\.energy: .*N_e = 145 .*d = 64"):
        run_init(_cfg(tmp_path, model__img_size=96), tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match=r"^init\.energy: .*subspace=tokens"):
        run_init(_cfg(tmp_path, init__subspace="tokens", init__energy=1.0), tmp_path / "x.safetensors")
    monkeypatch.undo()
    meta_out = tmp_path / "ok.safetensors"
    run_init(_cfg(tmp_path, init__subspace="tokens", init__num_images=16), meta_out)  # default energy 0.99
    assert read_prompts_metadata(meta_out)["energy"] == 0.99


@pytest.mark.parametrize("method", ["vipamin", "spt"])
def test_the_initializer_reads_no_global_rng_nor_train_fields(tmp_path, digits_root, method):
    """Runs that differ only in train.* (train.seed seeds the global RNG before a run's initializer) share one
    computed init (`config.init_key`, `init/cache.py`): so the initializer's prompts must not depend on the global
    RNG. Seeded differently and with the RNG drawn from in between, they are the same bits; the key leaves train.*
    (and the batch and eval settings) out and keeps what the initializer reads, the data it calibrates on included."""
    from vipamin_scale.config import init_key
    from vipamin_scale.train import seed_everything

    extra = {"init__method": method, **({"init__spt_mode": "kmeans", "init__kmeans_iters": 5} if method == "spt" else {})}
    out = []
    for seed in (0, 7):
        seed_everything(seed)
        torch.rand(seed + 3)
        out.append(run_init(_cfg(tmp_path, **extra), tmp_path / f"{seed}.safetensors")["tensors"])
    assert out[0].keys() == out[1].keys() and all(torch.equal(out[0][k], out[1][k]) for k in out[0])

    root = tmp_path / "data"
    key = init_key(_cfg(tmp_path, **extra), root)
    same = dict(train__seed=3, train__lr=0.5, train__epochs=9, train__warmup_epochs=0.1, train__weight_decay=0.1,
                data__batch_size=7, data__eval_batch_size=5, data__val_split="x", init__batch_size=3)
    assert init_key(_cfg(tmp_path, **extra, **same), root) == key
    for other in (dict(init__seed=1), dict(prompt__length=5), dict(model__img_size=48), dict(data__train_split="x"),
                  dict(init__num_images=32), dict(data__max_train_samples=10)):
        assert init_key(_cfg(tmp_path, **extra, **other), root) != key, other
    assert init_key(_cfg(tmp_path, **extra), tmp_path / "other") != key
