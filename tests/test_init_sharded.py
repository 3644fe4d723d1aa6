"""The sharded initializer on real torchrun processes (gloo): same prompts at any world size."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_env, free_port, torchrun
from safetensors.torch import load_file

from vipamin_scale.data.shards import write_dataset
from vipamin_scale.init.run import read_prompts_metadata

pytestmark = pytest.mark.slow  # torchrun and multi-node rendezvous

WORKER = str(Path(__file__).parent / "dist_scripts" / "init_worker.py")
BASE = dict(model__name="vit_test_d64", model__img_size=32, model__checkpoint=None, prompt__length=4,
            init__num_images=70, init__batch_size=16)  # 70 images: uneven blocks at world 4
CASES = {
    "vipamin_deep_mean": dict(init__method="vipamin", init__k=3, init__lam=0.5),
    "vipamin_shallow_tokens": dict(init__method="vipamin", prompt__deep=False, init__subspace="tokens",
                                   init__energy=0.9, init__lam=0.7),
    "vipamin_deep_tokens_ln": dict(init__method="vipamin", init__subspace="tokens", init__energy=0.95,
                                   init__ln_aware=True, init__lam=1.0),
    "spt_kmeans_deep": dict(init__method="spt", init__spt_mode="kmeans", init__kmeans_iters=20),
    "spt_rand_shallow": dict(init__method="spt", init__spt_mode="rand", prompt__deep=False),
    "spt_meanpool_deep": dict(init__method="spt", init__spt_mode="mean_pool", init__spt_source="pos_embedded"),
    # 20 images in batches of 16: at world 4 ranks 2 and 3 read nothing and must still take part
    "vipamin_few_images": dict(init__method="vipamin", init__num_images=20, init__k=2),
    "spt_kmeans_few_images": dict(init__method="spt", init__num_images=20, init__kmeans_iters=10),
}
WORLDS = (1, 2, 4)


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, digits_root):
    """Launch one torchrun job per world size, concurrently; each computes every case."""
    root = tmp_path_factory.mktemp("sharded")
    cases = root / "cases.json"
    cases.write_text(json.dumps({name: {**BASE, **over} for name, over in CASES.items()}))
    procs = {}
    for world in WORLDS:
        out = root / f"world{world}"
        out.mkdir()
        cmd = torchrun(world, str(out), str(cases), script=WORKER)
        procs[world] = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for world, proc in procs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"world {world} failed:\n{err[-4000:]}"
    return root


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_prompts_at_world_sizes_1_2_4(sharded_runs, case):
    files = {w: sharded_runs / f"world{w}" / f"{case}.safetensors" for w in WORLDS}
    ref = load_file(str(files[1]))
    deep = CASES[case].get("prompt__deep", True)
    assert ref["prompts"].shape == ((2 if deep else 1), 4, 64)
    for world in WORLDS[1:]:
        got = load_file(str(files[world]))
        assert got.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-5, msg=f"{case}/{name} at world {world}")
        meta, ref_meta = read_prompts_metadata(files[world]), read_prompts_metadata(files[1])
        assert meta["world_size"] == world and meta["B"] == {**BASE, **CASES[case]}["init__num_images"]
        assert meta["keys_sha256"] == ref_meta["keys_sha256"]


def test_two_node_rendezvous_gives_the_single_process_file(sharded_runs, tmp_path):
    """Two torchrun launchers (2 'nodes' x 1 process) meeting through c10d on localhost."""
    case = "vipamin_deep_mean"
    overrides = ["model=vit_test_d64", "prompt.length=4", "init=vipamin", "init.k=3", "init.lam=0.5",
                 "init.num_images=70", "init.batch_size=16", f"out={tmp_path / 'two_nodes.safetensors'}",
                 f"hydra.run.dir={tmp_path / 'run'}"]
    endpoint = f"127.0.0.1:{free_port()}"
    launchers = []
    for _node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=vipamin-test",
               "-m", "vipamin_scale.cli", "init", *overrides]
        launchers.append(subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in launchers:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
    got = load_file(str(tmp_path / "two_nodes.safetensors"))
    ref = load_file(str(sharded_runs / "world1" / f"{case}.safetensors"))
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-5)
    assert read_prompts_metadata(tmp_path / "two_nodes.safetensors")["world_size"] == 2


def test_failing_rank_fails_the_job_and_leaves_no_file(tmp_path):
    """Rank 1's half of the calibration images holds a corrupt image: the job exits non-zero with
    that rank's error (naming shard and key), and no prompts file is written."""
    from PIL import Image
    import io

    good = []
    for i in range(12):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (i * 20, 0, 0)).save(buf, format="PNG")
        good.append((f"img{i}", (buf.getvalue(), "png"), i % 2))
    samples = good + [("broken", (b"\x89PNG not really", "png"), 0)]
    write_dataset({"train": samples}, ["a", "b"], tmp_path / "shards", shuffle=False, verify=False)
    out = tmp_path / "p.safetensors"
    cmd = torchrun(2, "init", "model=vit_test_d64", "data=shards", f"data.root={tmp_path / 'shards'}",
                   "init=vipamin", "init.k=2", "init.num_images=13", "init.batch_size=4", f"out={out}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "train_00000012" in proc.stderr and "train-000000.tar" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".p.safetensors*"))


def test_launch_script_runs_init_on_two_ranks(sharded_runs, tmp_path):
    """`launch/torchrun.sh` (the documented entry) gives the single-process prompts at 2 ranks."""
    script = Path(__file__).resolve().parent.parent / "launch" / "torchrun.sh"
    out = tmp_path / "p.safetensors"
    env = cli_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), PYTHON=sys.executable)
    proc = subprocess.run([str(script), "init", "model=vit_test_d64", "prompt.length=4", "init=vipamin", "init.k=3",
                           "init.lam=0.5", "init.num_images=70", "init.batch_size=16", f"out={out}",
                           f"hydra.run.dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_prompts_metadata(out)["world_size"] == 2
    ref = load_file(str(sharded_runs / "world1" / "vipamin_deep_mean.safetensors"))
    torch.testing.assert_close(load_file(str(out))["prompts"], ref["prompts"], rtol=0, atol=1e-5)
