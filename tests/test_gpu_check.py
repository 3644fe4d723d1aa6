"""`benchmarks/gpu_check.py`: the GPU readiness script's CPU smoke run, so it cannot rot while no GPU is around."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, cli_env

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
SECTIONS = ["env", "step", "engines", "fewshot", "packed", "init_size", "dali", "data", "train", "init", "throughput"]
COMMITTED = [REPO / "benchmarks" / "results" / "gpu.json", REPO / "benchmarks" / "RESULTS.md"]


def _digest(paths) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None for p in paths}


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_smoke_run_records_every_section_and_the_comparisons_pass(tmp_path):
    before = _digest(COMMITTED)
    proc = _run("--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert list(doc["sections"]) == SECTIONS and doc["meta"]["smoke"] is True
    for name, sec in doc["sections"].items():
        assert sec["status"] == "ok" and sec["result"], (name, sec.get("error"))
    s = {name: sec["result"] for name, sec in doc["sections"].items()}
    assert s["env"]["torch"] == torch.__version__ and s["env"]["device"] == "cpu"
    # correctness on the (CPU) device: every engine x precision ran and followed the reference curve
    train = s["train"]
    assert train["passed"] and train["reference"] == "ddp_fp32"
    for run in ("ddp_bf16", "zero2_fp32", "zero2_bf16", "zero3_fp32_ac", "zero3_bf16_ac"):
        assert train[run]["passed"] and len(train[run]["losses"]) == 4 and train[run]["max_rel_diff"] <= train[run]["tol"]
    assert train["zero3_fp32_ac"]["max_rel_diff"] <= 1e-4  # fp32 ZeRO-3 + AC follows DDP to round-off
    init = s["init"]
    assert init["passed"] and init["backend_world2"] == "gloo"
    assert init["runs"]["w2_gloo"]["world_size"] == 2 and init["runs"]["w2_gloo"]["rel_max_diff"] <= 1e-5
    assert init["capture_on_device"]["passed"]
    assert init["world1_group"]["passed"] and init["world1_group"]["backend"] == "gloo"
    assert s["dali"]["passed"] and s["dali"]["eval_keys_equal_in_order"] and s["dali"]["eval_keys"] > 0
    # throughput: every variant measured; model FLOPs counted (attention included), MFU null on a CPU
    tp = s["throughput"]
    flops = tp["model_flops"]
    assert flops["flops_per_image"] > 0 and "aten.bmm" in flops["by_op"]
    for key in ("bare", "bare_ac", "ddp", "ddp_ac", "zero3", "zero3_ac"):
        assert tp[key]["images_per_s"] > 0 and tp[key]["largest_batch"] >= 2, (key, tp[key])
        assert tp[key]["mfu"] is None and "no peak" in tp[key]["mfu_note"]
    assert s["init_size"]["capture_s"] > 0 and s["init_size"]["forward_s"] > 0 and s["init_size"]["prompts_finite"]
    assert s["init_size"]["B"] == 16 and s["init_size"]["math_s"] > 0
    assert s["data"]["wds_pil"]["images_per_s"] > 0 and s["data"]["dali_cpu"]["images_per_s"] > 0
    # issue 24's targets: every variant measured on the CPU (compile is skipped in --smoke)
    for key in ("bare", "autocast", "bf16_stored"):
        assert s["step"][key]["images_per_s"] > 0, (key, s["step"][key])
    assert s["step"]["bf16_stored"]["speed_vs_bare"] > 0 and "skipped" in s["step"]["bf16_stored_compiled"]
    assert s["engines"]["backend"] == "gloo" and s["engines"]["world_size"] == 1
    for key in ("fsdp2", "fsdp2_bf16_stored", "zero3"):
        assert s["engines"][key]["speed_vs_ddp"] > 0, (key, s["engines"][key])
    for key in ("today", "fp32_no_sync", "autocast", "bf16_stored"):
        assert s["fewshot"][key]["steps_per_s"] > 0, (key, s["fewshot"][key])
    packed = s["packed"]  # issue 22: a pack of 2 in one process against the solo run, equal accuracies
    assert packed["k2"]["runs"] == 2 and packed["k2"]["gain"] > 0 and packed["k2"]["max_acc_diff"] <= 1e-5
    assert packed["solo"]["processes"] == 1 and "gpu_peak_mb_per_run" not in packed["solo"]
    assert packed["k2"]["step_s"] > 0 and packed["k2"]["images_per_s_per_process"] > 0  # the real loop's step
    auto = packed["auto"]  # pack_size=auto on a CPU: the stated default, a pack of it measured
    assert auto["k"] == 4 and auto["how"].startswith("the CPU default") and auto["peak_mb"] > 0
    assert "budget_mb" not in auto
    dev = s["init_size"]["math_on_device"]
    assert dev["passed"] and dev["max_abs_diff_vs_cpu"] == 0.0 and dev["device"] == "cpu"
    md = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- gpu-check:begin -->" in md and "| throughput | ok |" in md and "CPU smoke run" in md
    assert "| engines | zero3 |" in md and "| fewshot | today |" in md and "| k2 | 1 x 2 |" in md
    assert "pack_size=auto: K = 4 (the CPU default" in md
    assert _digest(COMMITTED) == before  # the committed figures are never touched by a smoke run


@pytest.mark.slow
def test_a_section_past_its_time_is_killed_and_recorded(tmp_path):
    """A section past its cap (here the whole --budget-s) is killed and recorded as a timeout in
    one line; the JSON and the RESULTS.md section are written all the same. The section hangs on
    purpose (GPU_CHECK_HANG), so the outcome does not depend on how fast this machine is."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--only", "train",
                           "--budget-s", "12"], cwd=REPO, env=dict(cli_env(), GPU_CHECK_HANG="train"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    sec = json.loads((tmp_path / "gpu.json").read_text())["sections"]["train"]
    assert sec["status"] == "timeout" and re.match(r"timed out after 1[12] s \(killed\)", sec["error"]), sec
    assert "hangs (GPU_CHECK_HANG)" in sec["error"]  # the last log line: the hook ran, not a slow section
    assert "\n" not in sec["error"] and 10 < sec["seconds"] < 60
    assert "| train | timeout |" in (tmp_path / "RESULTS.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_without_gpu_and_without_smoke_one_line_and_exit_2(tmp_path):
    proc = _run("--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--smoke" in lines[0]
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.slow
def test_smoke_never_writes_the_committed_results(tmp_path):
    before = _digest(COMMITTED)
    proc = _run("--smoke", "--out", str(REPO / "benchmarks" / "results"), timeout=120)
    assert proc.returncode == 2 and "never replaces the committed" in proc.stderr
    assert _digest(COMMITTED) == before


def _module():
    """The package benchmarks/gpu_check/ (the script's sections and helpers), imported as the script does."""
    import types

    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import common, measure

    return types.SimpleNamespace(largest_batch=measure.largest_batch, peak_bf16=common.peak_bf16)


def test_largest_batch_doubles_then_bisects_to_an_eighth():
    gc = _module()
    seen = []

    def step(images, labels):
        seen.append(images.shape[0])
        if images.shape[0] > 300:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    r = gc.largest_batch(step, img=2, device=torch.device("cpu"), start=8, limit=4096, cap_s=60)
    assert seen[:7] == [8, 16, 32, 64, 128, 256, 512]  # doubling up to the first OOM
    assert r["stopped_by"] == "oom" and r["first_oom"] > 300 >= r["largest_batch"] >= 256
    assert r["first_oom"] - r["largest_batch"] <= r["largest_batch"] // 8  # bisected to 1/8
    assert gc.largest_batch(step, 2, torch.device("cpu"), 8, 64, 60)["stopped_by"] == "limit"

    def broken(images, labels):
        raise RuntimeError("not a memory problem")

    with pytest.raises(RuntimeError, match="not a memory problem"):  # only OOM means "does not fit"
        gc.largest_batch(broken, 2, torch.device("cpu"), 8, 64, 60)


def test_mfu_peak_table_by_device_name():
    gc = _module()
    assert gc.peak_bf16("NVIDIA H200") == (989.4e12, None)
    peak, reason = gc.peak_bf16("Some New Accelerator")
    assert peak is None and "Some New Accelerator" in reason


def test_dist_backend_override(monkeypatch):
    from vipamin_scale import distributed as D

    monkeypatch.delenv(D.BACKEND_ENV, raising=False)
    assert D.backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    monkeypatch.setenv(D.BACKEND_ENV, "gloo")
    assert D.backend() == "gloo"
    monkeypatch.setenv(D.BACKEND_ENV, "mpi")
    with pytest.raises(ValueError, match="VIPAMIN_SCALE_DIST_BACKEND: must be nccl or gloo"):
        D.backend()


def test_nccl_more_ranks_than_gpus_is_one_config_error():
    """gpu-check on the H200 found NCCL's "Duplicate GPU detected" deep in the first collective when
    torchrun put 2 ranks on 1 GPU; now it is one ConfigError naming the fix, before the group forms."""
    from vipamin_scale import distributed as D
    from vipamin_scale.config import ConfigError

    D.check_ranks_per_gpu(8, 8)
    D.check_ranks_per_gpu(1, 4)
    with pytest.raises(ConfigError, match=r"2 ranks on this node see 1 CUDA device.*--nproc-per-node=1.*=gloo"):
        D.check_ranks_per_gpu(2, 1)


def test_the_packed_report_gives_auto_k_and_its_peak_against_the_budget():
    """gpu-check's packed section on a GPU: pack_size=auto's K, how it was chosen, the measured peak of a pack of K
    against the budget K was fitted to (rendered here from a recorded row: no GPU needed)."""
    _module()  # benchmarks/ on sys.path
    from gpu_check.report import _packed

    row = {"k": 30, "how": "measured: ...", "train_peak_mb": 60000.0, "eval_peak_mb": 50000.0, "peak_mb": 60000.0,
           "budget_mb": 69632.0, "within_budget": True}
    assert _packed({"auto": row}) == ["", "pack_size=auto: K = 30 (measured: ...); a pack of 30 measured: peak 60000 "
                                          "MB (training steps 60000, eval batch 50000), budget 69632 MB (within)."]
    assert _packed({"auto": {"error": "OutOfMemoryError: x"}})[-1] == "pack_size=auto: failed: OutOfMemoryError: x"
