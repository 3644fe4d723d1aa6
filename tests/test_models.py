"""Backbone loading and the prompted model, on tiny ViTs."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vipamin_scale.models.backbones import CheckpointError, build_backbone, load_checkpoint
from vipamin_scale.models.prompted import PromptedViT, VPTPrompts, load_prompts_file

NAME = "vit_test_d64"


def _model(deep: bool, P: int = 3, pool: str = "cls", seed: int = 0) -> PromptedViT:
    torch.manual_seed(seed)
    backbone = build_backbone(NAME)
    return PromptedViT(backbone, num_classes=5, prompt_length=P, deep=deep, pool=pool, seed=seed)


def _hand_forward(model: PromptedViT, x: torch.Tensor) -> torch.Tensor:
    """The VPT forward written out by hand over the same timm modules."""
    bb = model.backbone
    prompts = model.prompt()
    P = model.num_prompts
    t = bb.patch_embed(x)
    t = torch.cat([bb.cls_token.expand(x.shape[0], -1, -1), t], dim=1) + bb.pos_embed
    t = torch.cat([t[:, :1], prompts[0].expand(x.shape[0], -1, -1), t[:, 1:]], dim=1)
    for l, blk in enumerate(bb.blocks):
        if model.deep and l > 0:
            t = torch.cat([t[:, :1], prompts[l].expand(x.shape[0], -1, -1), t[:, 1 + P:]], dim=1)
        t = blk(t)
    return model.head(bb.norm(t)[:, 0])


@pytest.mark.parametrize("deep", [False, True])
def test_forward_matches_hand_assembled(deep):
    model = _model(deep).eval()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x), _hand_forward(model, x), rtol=0, atol=1e-6)
    assert model.prompt().shape == ((2 if deep else 1), 3, 64)


def test_deep_prompts_replace_block_inputs():
    """Deep: layer 1's prompt is what block 1 sees at positions 1..P, whatever block 0 made there."""
    x = torch.randn(2, 3, 32, 32)
    model = _model(True).eval()
    seen = {}
    hook = model.backbone.blocks[1].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
    before = model(x)
    hook.remove()
    torch.testing.assert_close(seen["x"][:, 1:4], model.prompt()[1].expand(2, -1, -1))
    with torch.no_grad():
        model.prompt.prompts[1].add_(torch.randn(3, 64))  # (a constant shift would vanish in norm1)
    assert not torch.allclose(model(x), before)


@pytest.mark.parametrize("pool", ["cls", "mean", "img_mean", "prompt_mean"])
def test_pools(pool):
    model = _model(True, pool=pool).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_tokens(x)
    P = model.num_prompts
    normed = model.backbone.norm(tokens)
    expected = {"cls": normed[:, 0], "img_mean": normed[:, 1 + P:].mean(1), "prompt_mean": normed[:, 1:1 + P].mean(1),
                "mean": model.fc_norm(tokens[:, 1:].mean(1))}[pool]
    torch.testing.assert_close(model.pool_tokens(tokens), expected)


def test_train_step_changes_only_prompts_and_head():
    model = _model(True, pool="cls")
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable_before) == {"prompt.prompts", "head.weight", "head.bias"}
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    model.train()
    assert not model.backbone.training and all(not m.training for m in model.backbone.modules())
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())  # no weight gradients for the frozen part
    opt.step()
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone_before[k]), k
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, trainable_before[n]), n


def test_prompt_dropout_only_in_train_mode():
    torch.manual_seed(0)
    model = PromptedViT(build_backbone(NAME), 5, 4, True, dropout=0.5)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


# -- checkpoints --------------------------------------------------------------------------------

def _reference_backbone():
    return build_backbone(NAME, init_seed=123)


def _fresh_equal(path, fmt="auto"):
    fresh = build_backbone(NAME, init_seed=7)
    load_checkpoint(fresh, path, fmt)
    return fresh


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_timm_safetensors_and_pth(tmp_path):
    ref = _reference_backbone()
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    _assert_same_weights(_fresh_equal(tmp_path / "w.safetensors"), ref)
    _assert_same_weights(_fresh_equal(tmp_path / "w.pth"), ref)


def test_mae_format_drops_decoder(tmp_path):
    ref = _reference_backbone()
    sd = dict(ref.state_dict())
    sd["mask_token"] = torch.zeros(1, 1, 64)
    sd["decoder_embed.weight"] = torch.zeros(32, 64)
    sd["decoder_pos_embed"] = torch.zeros(1, 17, 32)
    torch.save({"model": sd, "epoch": 799}, tmp_path / "mae.pth")
    _assert_same_weights(_fresh_equal(tmp_path / "mae.pth"), ref)
    _assert_same_weights(_fresh_equal(tmp_path / "mae.pth", "mae"), ref)


def test_mocov3_format_keeps_base_encoder_only(tmp_path):
    ref = _reference_backbone()
    raw = {}
    for k, v in ref.state_dict().items():
        raw[f"module.base_encoder.{k}"] = v
        raw[f"module.momentum_encoder.{k}"] = torch.zeros_like(v)
    raw["module.predictor.0.weight"] = torch.zeros(8, 64)
    raw["module.base_encoder.head.0.weight"] = torch.zeros(8, 64)
    torch.save({"state_dict": raw, "arch": "vit"}, tmp_path / "moco.pth.tar")
    _assert_same_weights(_fresh_equal(tmp_path / "moco.pth.tar"), ref)


@pytest.mark.parametrize("name", ["w.pth", "w.safetensors"])
def test_unreadable_backbone_file_is_the_one_checkpoint_error(tmp_path, name):
    """One CheckpointError for every checkpoint file, a user error (one `error:` line at the CLI): a
    backbone's weights that do not parse name the file, as a training checkpoint's do."""
    from vipamin_scale import checkpoint
    from vipamin_scale.config import UserError

    assert CheckpointError is checkpoint.CheckpointError and issubclass(CheckpointError, UserError)
    path = tmp_path / name
    path.write_bytes(b"\x00not a checkpoint" * 4)
    with pytest.raises(CheckpointError) as err:
        _fresh_equal(path)
    assert str(err.value).startswith(f"model.checkpoint: {path} is not a readable checkpoint (")
    assert "\n" not in str(err.value)


def test_missing_key_is_named(tmp_path):
    sd = dict(_reference_backbone().state_dict())
    del sd["blocks.1.attn.qkv.weight"]
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"missing .*blocks\.1\.attn\.qkv\.weight"):
        _fresh_equal(tmp_path / "w.pth")


def test_wrong_prefix_fails_naming_keys(tmp_path):
    """The public VIPAMIN code's bug: a prefix that matches nothing must not load silently."""
    sd = {f"encoder.{k}": v for k, v in _reference_backbone().state_dict().items()}
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"missing .*blocks\.0\..*unexpected encoder\.blocks.*extra prefix 'encoder\.'"):
        _fresh_equal(tmp_path / "w.pth")


def test_misshaped_key_is_named(tmp_path):
    sd = dict(_reference_backbone().state_dict())
    sd["norm.weight"] = torch.ones(65)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"mis-shaped norm\.weight"):
        _fresh_equal(tmp_path / "w.pth")


def test_pos_embed_resampled_for_other_resolution(tmp_path):
    ref = _reference_backbone()  # 32 px, 4x4 grid
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    big = build_backbone(NAME, img_size=64)  # 8x8 grid
    load_checkpoint(big, tmp_path / "w.pth")
    assert big.pos_embed.shape == (1, 1 + 64, 64)
    torch.testing.assert_close(big.pos_embed[:, 0], ref.pos_embed[:, 0])  # CLS untouched
    torch.testing.assert_close(big.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)


def test_backbone_frozen_seeded_and_random_init_logged(caplog):
    torch.manual_seed(1)
    state = torch.get_rng_state()
    with caplog.at_level("INFO", logger="vipamin_scale.models.backbones"):
        bb = build_backbone(NAME)
    assert "randomly initialized" in caplog.text
    assert not any(p.requires_grad for p in bb.parameters())
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    torch.manual_seed(2)
    _assert_same_weights(build_backbone(NAME), bb)  # same on every rank / process
    assert not torch.equal(build_backbone(NAME, init_seed=1).pos_embed, bb.pos_embed)


# -- prompt files ---------------------------------------------------------------------------------

def test_prompts_file_roundtrip_and_shape_error(tmp_path):
    model = _model(True, P=3)
    good = torch.randn(2, 3, 64)
    save_file({"prompts": good}, str(tmp_path / "p.safetensors"))
    torch.testing.assert_close(load_prompts_file(tmp_path / "p.safetensors", model), good)
    save_file({"prompts": torch.randn(1, 3, 64)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"bad\.safetensors.*\(1, 3, 64\).*\(2, 3, 64\)"):
        load_prompts_file(tmp_path / "bad.safetensors", model)
    with pytest.raises(ValueError, match="do not fit"):
        PromptedViT(build_backbone(NAME), 5, 3, True, prompts=VPTPrompts(torch.randn(1, 3, 64)))


def test_models_import_nothing_from_init():
    """The model is a plain nn.Module built from ready tensors: `models/` never imports `init/` (the
    initializer and BPT's statistics, which read data and run collectives, import `models/`)."""
    import ast
    from pathlib import Path

    import vipamin_scale.models as models

    found = []
    for path in sorted(Path(models.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if (n + ".").startswith("vipamin_scale.init.")]
    assert found == []
