"""The SHA-256 digest our safetensors files carry (training checkpoints, prompts files): safetensors
itself has no checksum, so without it a flipped bit in a prompt or an optimizer moment loads silently.

    to_bytes(tensors, metadata) -> bytes   the safetensors file, its metadata holding `KEY: digest(...)`
    verify(tensors, metadata) -> bool|None True: intact; False: damaged; None: the file has no digest
                                           (written before digests existed, or by another tool)
    digest(tensors, metadata) -> hex       SHA-256 over the tensors in sorted order of their names, each as
                                           (name, dtype, shape, bytes), then the metadata entries in sorted
                                           order of their keys (the digest's own left out)

Every part is length-prefixed, so no two different contents hash alike by shifting bytes between
parts. The metadata is covered too (a checkpoint's position, RNG state and config live there).
Hashing reads the tensors' own buffers (no copy of a contiguous CPU tensor): about 0.2 s on a shared
CPU core for a ViT-H/14 prompts file (4 tensors of (32, 100, 1280) float32, 66 MB). What a caller does
with a damaged file is its own: a checkpoint falls back to the previous one, a prompts file is an
error naming it.
"""
from __future__ import annotations

import hashlib
from typing import Mapping, Optional

import torch

KEY = "vipamin_scale.sha256"


def _part(h: "hashlib._Hash", data: bytes | memoryview) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def digest(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> str:
    """The hex SHA-256 of `tensors` (names, dtypes, shapes, bytes) and `metadata` (minus `KEY`)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy()  # (numel * itemsize,): the tensor's own bytes, any dtype
        for part in (name.encode(), str(t.dtype).encode(), repr(tuple(t.shape)).encode()):
            _part(h, part)
        _part(h, memoryview(raw).cast("B"))
    for key in sorted(k for k in (metadata or {}) if k != KEY):
        _part(h, key.encode())
        _part(h, metadata[key].encode())
    return h.hexdigest()


def to_bytes(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """The safetensors bytes of `tensors`, with `metadata` and the digest of both under `KEY`."""
    from safetensors.torch import save

    tensors = dict(tensors)
    meta = {k: v for k, v in (metadata or {}).items() if k != KEY}
    return save(tensors, metadata={**meta, KEY: digest(tensors, meta)})


def verify(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]]) -> Optional[bool]:
    """Whether a file's tensors and metadata (as read) match the digest it records; None when it records none."""
    recorded = (metadata or {}).get(KEY)
    if recorded is None:
        return None
    return recorded == digest(tensors, metadata)
