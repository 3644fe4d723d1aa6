"""The DALI backend (data.backend=dali) against the webdataset one: same samples, same labels, images equal
within a stated tolerance, the same epoch partition, the same bad-data behaviour. Runs on CPU (device_id=None)
when there is no GPU.

Tolerance (pixel levels of 0..255, images normalized with mean 0, std 1 so that 1 level = 1/255):
* an image stored at model size is only normalized by both: equal within 1e-5 (float rounding);
* a resampled one (resize shorter side bicubic + center crop): |DALI - PIL| at most 16 levels anywhere and
  at most 1 level on average. PNG decodes to the same bytes; the difference is the resampling: PIL
  resamples in two passes, rounding to uint8 between them, DALI in float, and their antialiasing
  kernels differ slightly at image borders. Measured on these photo crops: max 7, mean <= 0.3.
"""
from __future__ import annotations

import functools
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_support import keys_of, loader_cfg, run_epoch

from vipamin_scale.data import DataError, build_loader, make_shards
from vipamin_scale.data.dali import DaliLoader, shard_index
from vipamin_scale.data.shards import read_dali_index, tar_samples, write_dataset

SIZE = 16
ZERO, ONE = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
MAX_LEVELS, MEAN_LEVELS = 16.0, 1.0


@functools.lru_cache(maxsize=1)
def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return load_sample_images().images  # two 427 x 640 RGB photographs


def _photo_crop(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A piece of one of scikit-learn's two sample photographs, scaled to `size` (w, h)."""
    a = _photos()[int(rng.integers(2))]
    y, x = rng.integers(0, 200, 2)
    return Image.fromarray(a[y:y + 220, x:x + 220]).resize(size, Image.BILINEAR)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """train 3 classes x 11 (33), val 3 x 3; a third of the images at model size, the rest larger, not square."""
    src = tmp_path_factory.mktemp("dali_src")
    rng = np.random.default_rng(0)
    for split, n in (("train", 11), ("val", 3)):
        for c in range(3):
            d = src / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                size = (SIZE, SIZE) if i % 3 == 0 else tuple(int(v) for v in rng.integers(SIZE + 1, 3 * SIZE, 2))
                _photo_crop(rng, size).save(d / f"{i:03d}.png")
    out = tmp_path_factory.mktemp("dali_shards")
    make_shards(src, out, maxcount=4, seed=3)  # train: 9 shards, the last with 1 sample
    return out


def _cfg(root: Path, backend: str = "dali", **data):
    return loader_cfg(root, backend, **{"num_workers": 1, **data})


_run, _keys = run_epoch, keys_of


def _stored_size(root: Path, key: str) -> tuple[int, int]:
    split = key.split("_")[0]
    for tar in sorted(root.glob(f"{split}-*.tar")):
        with tarfile.open(tar) as t:
            if f"{key}.png" in t.getnames():
                return Image.open(io.BytesIO(t.extractfile(f"{key}.png").read())).size
    raise KeyError(key)


# ----------------------------------------------------------------------------------- index files


def test_writer_writes_dali_index_like_wds2idx(shards, tmp_path):
    idx = shards / "train-000000.idx"
    samples = read_dali_index(idx)
    assert len(samples) == 4 and [c[0] for c in samples[0]] == ["cls", "png"]
    assert samples == tar_samples(shards / "train-000000.tar")[0]
    with open(shards / "train-000000.tar", "rb") as f:  # offsets point at the members' data
        f.seek(samples[2][0][1])
        assert f.read(samples[2][0][2]).decode().isdigit()
    wds2idx = pytest.importorskip("wds2idx")  # DALI's own tool, when installed: the same index
    if shutil.which("tar"):
        creator = wds2idx.IndexCreator(str(shards / "train-000000.tar"), str(tmp_path / "ref.idx"), verbose=False)
        creator.create_index()
        creator.close()
        assert read_dali_index(tmp_path / "ref.idx") == samples


def test_missing_index_is_built_into_the_cache(shards, tmp_path):
    root = tmp_path / "noidx"
    shutil.copytree(shards, root)
    for p in root.glob("*.idx"):
        p.unlink()
    samples, problem = shard_index(root / "val-000000.tar")
    assert problem is None and samples == read_dali_index(shards / "val-000000.idx")
    assert not list(root.glob("*.idx"))  # the shard directory is left alone
    loader = build_loader(_cfg(root), "val", train=False, img_size=SIZE, mean=ZERO, std=ONE)
    assert len(_keys(_run(loader))) == 9


# ----------------------------------------------------------------------------------- same samples


def test_eval_matches_webdataset_over_2_ranks(shards):
    all_keys = []
    for rank in range(2):
        kw = dict(train=False, img_size=SIZE, mean=ZERO, std=ONE, rank=rank, world_size=2)
        dali = build_loader(_cfg(shards), "train", **kw)
        ref = build_loader(_cfg(shards, "wds", num_workers=0), "train", **kw)
        assert isinstance(dali, DaliLoader) and (len(dali), dali.num_samples) == (len(ref), ref.num_samples)
        got, want = _run(dali), _run(ref)
        assert len(got) == len(dali)
        assert [k for _, _, k in got] == [k for _, _, k in want]  # same keys, same order, same batches
        assert all(len(k) == 5 for _, _, k in got[:-1]) and 1 <= len(got[-1][2]) <= 5
        for (x, y, keys), (rx, ry, _) in zip(got, want):
            assert x.dtype == torch.float32 and x.shape == rx.shape and torch.equal(y, ry)
            for image, ref_image, key in zip(x, rx, keys):
                if _stored_size(shards, key) == (SIZE, SIZE):
                    torch.testing.assert_close(image, ref_image, rtol=0, atol=1e-5)
                else:
                    levels = (image - ref_image).abs() * 255
                    assert levels.max() <= MAX_LEVELS and levels.mean() <= MEAN_LEVELS, \
                        (key, levels.max(), levels.mean())
        all_keys += _keys(got)
        assert _keys(_run(dali, epoch=3)) == _keys(got)  # eval order does not depend on the epoch
    assert sorted(all_keys) == [f"train_{i:08d}" for i in range(33)]  # every sample exactly once


def test_train_same_keys_per_rank_and_step_as_webdataset(shards):
    """One plan for both backends: every rank's batches hold the same keys in the same order, step by step."""
    kw = dict(train=True, img_size=SIZE, mean=ZERO, std=ONE, world_size=2, seed=11)
    for rank in range(2):
        dali = build_loader(_cfg(shards, batch_size=8, shuffle_buffer=16), "train", rank=rank, **kw)
        ref = build_loader(_cfg(shards, "wds", num_workers=2, batch_size=8, shuffle_buffer=16), "train", rank=rank,
                           **kw)
        for epoch in (0, 1):
            got, want = [k for _, _, k in _run(dali, epoch)], [k for _, _, k in _run(ref, epoch)]
            assert got == want and len(got) == 33 // 8


def test_train_partition_equal_batches_and_reproducible(shards):
    kw = dict(train=True, img_size=SIZE, mean=ZERO, std=ONE, world_size=2, seed=7)  # global batch 8: 4 a rank
    keys0 = []
    for rank in range(2):
        loader = build_loader(_cfg(shards, batch_size=8), "train", rank=rank, **kw)
        batches = _run(loader, 0)
        assert len(loader) == len(batches) == 33 // (2 * 4)  # floor(N / (world x B)) on every rank
        assert all(x.shape == (4, 3, SIZE, SIZE) for x, _, _ in batches)
        ref = build_loader(_cfg(shards, "wds", num_workers=2, batch_size=8), "train", rank=rank, **kw)
        assert sorted(_keys(batches)) == sorted(_keys(_run(ref, 0)))  # the same samples as webdataset's rank
        again = _run(loader, 0)
        assert _keys(again) == _keys(batches) and all(torch.equal(a[0], b[0]) for a, b in zip(again, batches))
        assert _keys(_run(loader, 1)) != _keys(batches)
        keys0 += _keys(batches)
    assert len(keys0) == len(set(keys0)) == 32 and keys0 != sorted(keys0)
    aug = build_loader(_cfg(shards, augment=True, batch_size=8), "train", rank=0, **kw)
    a, b = _run(aug, 2), _run(aug, 2)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b)) and a[0][0].shape == (4, 3, SIZE, SIZE)


# ----------------------------------------------------------------------------------- decoding parity


def _png16(a: np.ndarray) -> bytes:
    """A 16-bit PNG of uint16 (H, W, C), C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA (PIL cannot write 16-bit colour)."""
    import struct
    import zlib

    h, w, c = a.shape
    raw = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _encoded(im: Image.Image, fmt: str, **kw) -> tuple[bytes, str]:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue(), {"PNG": "png", "JPEG": "jpg"}[fmt]


def _mode_samples() -> list[tuple[str, object, tuple[int, int, int] | None]]:
    """(name, writer input, the 8-bit RGB pixel (0, 0) must read as, or None): one image of each mode, SIZE x SIZE
    (stored at model size: the loaders only normalize). Pixel (0, 0) is transparent where there is alpha
    (to_rgb's rule: alpha dropped, not composited) and 16-bit mid gray where there are 16 bits (-> 128)."""
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    rgb[0, 0] = (200, 100, 50)
    gray = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    gray[0, 0] = 90
    alpha = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    alpha[0, 0] = 0
    g16 = rng.integers(0, 65536, (SIZE, SIZE), dtype=np.uint16)
    g16[0, 0] = 32768
    rgb16 = rng.integers(0, 65536, (SIZE, SIZE, 3), dtype=np.uint16)
    rgb16[0, 0] = 32768
    palette = Image.fromarray(rgb).quantize(32)
    with_tr = palette.copy()
    with_tr.info["transparency"] = palette.getpixel((0, 0))
    cmyk = Image.frombytes("CMYK", (SIZE, SIZE), np.dstack([rgb, gray]).tobytes())
    return [
        ("RGB", Image.fromarray(rgb), (200, 100, 50)),
        ("L", Image.fromarray(gray), (90, 90, 90)),
        ("1", Image.fromarray(gray > 127), (0, 0, 0)),
        ("LA", Image.frombytes("LA", (SIZE, SIZE), np.dstack([gray, alpha]).tobytes()), (90, 90, 90)),
        ("RGBA", Image.fromarray(np.dstack([rgb, alpha])), (200, 100, 50)),
        ("P", palette, tuple(palette.convert("RGB").getpixel((0, 0)))),
        ("P+transparency", with_tr, tuple(palette.convert("RGB").getpixel((0, 0)))),
        ("I;16", Image.fromarray(g16), (128, 128, 128)),
        ("CMYK", cmyk, None),
        ("CMYK jpg", _encoded(cmyk, "JPEG", quality=95), None),
        ("L jpg", _encoded(Image.fromarray(gray), "JPEG", quality=95), None),
        ("RGB jpg", _encoded(Image.fromarray(rgb), "JPEG", quality=95), None),
        ("16-bit gray png", (_png16(g16[..., None]), "png"), (128, 128, 128)),
        ("16-bit gray+alpha png", (_png16(np.dstack([g16, g16[::-1]])), "png"), (128, 128, 128)),
        ("16-bit RGB png", (_png16(rgb16), "png"), (128, 128, 128)),
        ("16-bit RGBA png", (_png16(np.dstack([rgb16, g16 * 0])), "png"), (128, 128, 128)),
        ("P png with tRNS", _encoded(with_tr, "PNG", transparency=with_tr.info["transparency"]),
         tuple(palette.convert("RGB").getpixel((0, 0)))),
    ]


def test_every_image_mode_decodes_alike(tmp_path):
    """Both backends read every mode the writer accepts as the same pixels, within one level of 255 (16-bit
    colour: PIL keeps the high byte, DALI rounds), and as to_rgb's rule says (pixel (0, 0))."""
    cases = _mode_samples()
    write_dataset({"train": [(name, image, i % 2) for i, (name, image, _) in enumerate(cases)]}, ["a", "b"],
                  tmp_path / "modes", shuffle=False)
    with tarfile.open(tmp_path / "modes" / "train-000000.tar") as tar:
        stored = sorted(m.name for m in tar.getmembers() if not m.name.endswith(".cls"))
    cmyk_jpg = 9  # stored as the RGB PNG of to_rgb: DALI's GPU decoder is not known to convert CMYK as PIL does
    assert f"train_{cmyk_jpg:08d}.png" in stored and f"train_{cmyk_jpg + 1:08d}.jpg" in stored
    kw = dict(train=False, img_size=SIZE, mean=ZERO, std=ONE)
    got = {k: x for xs, _, keys in _run(build_loader(_cfg(tmp_path / "modes"), "train", **kw)) for x, k in zip(xs, keys)}
    ref = {k: x for xs, _, keys in _run(build_loader(_cfg(tmp_path / "modes", "wds", num_workers=0), "train", **kw))
           for x, k in zip(xs, keys)}
    assert sorted(got) == sorted(ref) == [f"train_{i:08d}" for i in range(len(cases))]
    for i, (name, _, pixel) in enumerate(cases):
        dali, pil = got[f"train_{i:08d}"].cpu(), ref[f"train_{i:08d}"]
        assert dali.shape == pil.shape == (3, SIZE, SIZE)
        levels = ((dali - pil).abs() * 255).max().item()
        assert levels <= 1 + 1e-3, (name, levels)
        if pixel is not None:
            for x, backend in ((dali, "dali"), (pil, "wds")):
                assert (x[:, 0, 0] * 255).round().tolist() == list(pixel), (name, backend, x[:, 0, 0] * 255)


def test_writer_refuses_pixels_without_an_8bit_reading(tmp_path):
    floats = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))
    with pytest.raises(DataError, match=r"^f\.tif: 32-bit float pixels \(mode F\) have no 8-bit reading"):
        write_dataset({"train": [("f.tif", floats, 0)]}, ["a", "b"], tmp_path / "f")
    wide = Image.fromarray(np.full((4, 4), 70000, dtype=np.int32))
    with pytest.raises(DataError, match=r"^w\.tif: 32-bit integer pixels in \[70000, 70000\], outside the 16-bit"):
        write_dataset({"train": [("w.tif", wide, 0)]}, ["a", "b"], tmp_path / "w")
    assert not (tmp_path / "f" / "manifest.json").exists() and not (tmp_path / "w" / "manifest.json").exists()
    in_range = Image.fromarray(np.full((SIZE, SIZE), 32768, dtype=np.int32))  # mode I within 16 bits: read as 16-bit
    write_dataset({"train": [("i.tif", in_range, 0)]}, ["a", "b"], tmp_path / "i")
    for backend in ("dali", "wds"):
        (x,), _, _ = _run(build_loader(_cfg(tmp_path / "i", backend), "train", train=False, img_size=SIZE,
                                       mean=ZERO, std=ONE))[0]
        assert (x.cpu() * 255).round().unique().tolist() == [128.0], backend


# ----------------------------------------------------------------------------------- bad data


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


def _corrupt_dir(tmp_path: Path, bad=(3,)) -> Path:
    samples = [(f"s{i}", Image.new("RGB", (SIZE, SIZE), (10 * i, 5, 7)), 0) for i in range(6)]
    for i in bad:
        samples[i] = (f"s{i}", (b"\x89PNG\r\n\x1a\n garbage", "png"), 0)
    write_dataset({"train": samples}, ["zero"], tmp_path / "bad", shuffle=False, verify=False, maxcount=4)
    return tmp_path / "bad"


def test_corrupt_image_named_or_skipped(tmp_path, caplog):
    root = _corrupt_dir(tmp_path)
    loader = build_loader(_cfg(root), "train", train=False, img_size=SIZE, mean=ZERO, std=ONE)
    with pytest.raises(DataError) as exc:
        _run(loader)
    assert "train-000000.tar: key train_00000003: cannot decode the png image" in _one_line(exc)
    skip = build_loader(_cfg(root, on_error="skip"), "train", train=False, img_size=SIZE, mean=ZERO, std=ONE)
    with caplog.at_level("WARNING", logger="vipamin_scale.data"):
        batches = _run(skip)
    assert _keys(batches) == [f"train_{i:08d}" for i in (0, 1, 2, 4, 5)]
    assert [len(k) for _, _, k in batches] == [4, 1]  # batch boundaries kept: the bad one shortens its batch
    assert "train_00000003" in caplog.text
    limited = build_loader(_cfg(root, on_error="skip", batch_size=2), "train", train=True, img_size=SIZE, mean=ZERO,
                           std=ONE)
    assert sorted(len(k) for _, _, k in _run(limited)) == [1, 2, 2]  # same batch count, one batch short
    two_bad = _corrupt_dir(tmp_path / "two", bad=(1, 4))
    capped = build_loader(_cfg(two_bad, on_error="skip", max_skip=1), "train", train=False, img_size=SIZE,
                          mean=ZERO, std=ONE)
    with pytest.raises(DataError, match=r"key train_00000004: cannot decode.*more than data.max_skip=1"):
        _run(capped)


def _edit_member(tar_path: Path, name: str, data: bytes | None) -> None:
    """Rewrite a shard with member `name` removed (data None) or replaced."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for m, old in members:
            if m.name == name and data is None:
                continue
            new = data if m.name == name else old
            m.size = len(new)
            tar.addfile(m, io.BytesIO(new))


def test_missing_and_bad_labels(shards, tmp_path, caplog):
    root = tmp_path / "labels"
    shutil.copytree(shards, root)
    _edit_member(root / "val-000000.tar", "val_00000002.cls", None)
    _edit_member(root / "val-000001.tar", "val_00000005.cls", b"99")
    loader = build_loader(_cfg(root), "val", train=False, img_size=SIZE, mean=ZERO, std=ONE)
    with pytest.raises(DataError) as exc:
        _run(loader)
    assert "val-000000.tar: key val_00000002: no label" in _one_line(exc)
    skip = build_loader(_cfg(root, on_error="skip"), "val", train=False, img_size=SIZE, mean=ZERO, std=ONE)
    keys = _keys(_run(skip))
    assert keys == [f"val_{i:08d}" for i in range(9) if i not in (2, 5)]
    _edit_member(root / "val-000000.tar", "val_00000001.cls", b"one")
    capped = build_loader(_cfg(root, on_error="skip", max_skip=2), "val", train=False, img_size=SIZE, mean=ZERO,
                          std=ONE)
    with caplog.at_level("WARNING", logger="vipamin_scale.data"):
        with pytest.raises(DataError, match=r"val-000001.tar: key val_00000005: label 99 outside \[0, 3\) \[3 bad .*"
                                            r"more than data.max_skip=2\]"):
            _run(capped)
    assert "val-000000.tar: key val_00000001: label b'one' is not an integer" in caplog.text


def test_absent_and_truncated_shards(shards, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(shards, root)
    (root / "train-000002.tar").unlink()
    with pytest.raises(DataError) as exc:
        build_loader(_cfg(root), "train", train=False, img_size=SIZE, mean=ZERO, std=ONE)
    assert "train-000002.tar: shard file missing" in _one_line(exc)
    skip = build_loader(_cfg(root, on_error="skip"), "train", train=False, img_size=SIZE, mean=ZERO, std=ONE)
    keys = _keys(_run(skip))
    assert keys == [f"train_{i:08d}" for i in range(33) if not 8 <= i < 12]  # shard 2 holds samples 8..11
    shutil.copy2(shards / "train-000002.tar", root)
    shard = root / "train-000004.tar"
    shard.write_bytes(shard.read_bytes()[:2500])  # newer than its .idx: the index is rebuilt from the cut tar
    loader = build_loader(_cfg(root), "train", train=False, img_size=SIZE, mean=ZERO, std=ONE, limit=8)  # shards 0, 1
    assert len(_keys(_run(loader))) == 8
    loader = build_loader(_cfg(root), "train", train=False, img_size=SIZE, mean=ZERO, std=ONE, limit=20)
    with pytest.raises(DataError) as exc:
        _run(loader)
    assert "train-000004.tar: unreadable at key train_00000016 (sample 0 of 4): ReadError" in _one_line(exc)
    shutil.copy2(shards / "train-000004.idx", root)  # an index that promises more than the file holds
    (root / "train-000004.idx").touch()
    loader = build_loader(_cfg(root), "train", train=False, img_size=SIZE, mean=ZERO, std=ONE, limit=20)
    with pytest.raises(DataError) as exc:
        _run(loader)
    msg = _one_line(exc)
    assert "train-000004.tar: unreadable at key train_00000016 (sample 0 of 4): the data ends at byte 2500" in msg
    skip = build_loader(_cfg(root, on_error="skip"), "train", train=False, img_size=SIZE, mean=ZERO, std=ONE, limit=20)
    assert _keys(_run(skip)) == [f"train_{i:08d}" for i in range(16)]
    for name in ("train-000004.tar", "train-000004.idx"):
        shutil.copy2(shards / name, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["count"] += 1
    manifest["splits"]["train"]["shard_counts"][-1] += 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as exc:  # a shard with fewer samples than the manifest lists
        _run(build_loader(_cfg(root), "train", train=False, img_size=SIZE, mean=ZERO, std=ONE))
    assert "train-000008.tar: ends before key train_00000033, after 1 of the 2 samples" in _one_line(exc)


def test_backend_is_checked(shards):
    with pytest.raises(ValueError, match="data.backend: must be wds or dali"):
        build_loader(_cfg(shards, "torch"), "val", train=False, img_size=SIZE, mean=ZERO, std=ONE)
