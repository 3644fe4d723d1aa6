"""The gpu-check section of benchmarks/RESULTS.md, from gpu.json."""
from __future__ import annotations

from typing import Any

from gpu_check.common import BEGIN, CORRECTNESS, END, SECTIONS


def fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def results_section(doc: dict) -> str:
    secs = doc["sections"]
    env = (secs.get("env") or {}).get("result") or {}
    lines = [BEGIN, "## GPU readiness (`make gpu-check`, benchmarks/gpu_check.py)", "",
             f"Device: **{env.get('device', '?')}** (driver {env.get('driver') or '?'}, {env.get('memory_gib', '?')} GiB); "
             f"torch {env.get('torch', '?')}, CUDA {env.get('cuda_build') or '–'}, cuDNN {env.get('cudnn') or '–'}, "
             f"NCCL {env.get('nccl') or '–'}; {env.get('deepspeed') or 'deepspeed ?'}, {env.get('dali') or 'DALI ?'}, "
             f"{env.get('timm') or 'timm ?'}.", "",
             f"Command: `{doc['meta']['command']}`, {doc['meta']['started']}, "
             f"{fmt(doc['meta'].get('seconds'), '.0f')} s{' (CPU smoke run: tiny sizes, figures not meaningful)' if doc['meta']['smoke'] else ''}.",
             "", "| section | status | s | passed | note |", "|---|---|---|---|---|"]
    for name in SECTIONS:
        sec = secs.get(name)
        if not sec:
            continue
        res = sec.get("result") or {}
        note = sec.get("error") or ""
        lines.append(f"| {name} | {sec['status']} | {fmt(sec.get('seconds'), '.0f')} | "
                     f"{fmt(res.get('passed')) if name in CORRECTNESS else ''} | {note.replace('|', '/')[:160]} |")
    train = (secs.get("train") or {}).get("result") or {}
    runs = [(k, v) for k, v in train.items() if isinstance(v, dict) and "passed" in v]
    if runs:
        lines += ["", f"Training runs (tiny ViT, 4 steps, on {train.get('device')}): max relative loss difference "
                  "against the reference curve: " + ", ".join(
                      f"{k} {fmt(v.get('max_rel_diff'), '.1e')} ({'ok' if v['passed'] else 'FAIL'})"
                      for k, v in runs if k != train.get("reference")) + "."]
    tr = (secs.get("throughput") or {}).get("result") or {}
    if tr:
        flops = (tr.get("model_flops") or {}).get("flops_per_image")
        lines += ["", f"Throughput: {tr.get('model')}, {tr.get('img_size')} px, bf16, batch {tr.get('batch')}; "
                  f"model FLOPs/image {fmt(flops)}; peak {fmt(tr.get('peak_bf16_flops'))} FLOP/s.", "",
                  "| step | act. ckpt | images/s | MFU | peak mem GiB | vs bare | largest batch | images/s there |",
                  "|---|---|---|---|---|---|---|---|"]
        for key in ("bare", "bare_ac", "ddp", "ddp_ac", "zero3", "zero3_ac"):
            r = tr.get(key)
            if not r:
                continue
            if "error" in r and "images_per_s" not in r:
                lines.append(f"| {key} | | failed: {r['error'][:120]} | | | | | |")
                continue
            vs = r.get("speed_vs_bare", r.get("speed_vs_bare_ac"))
            lines.append(f"| {r.get('step')} | {r.get('activation_checkpointing')} | {fmt(r.get('images_per_s'), '.1f')} | "
                         f"{fmt(r.get('mfu'), '.1%') if r.get('mfu') is not None else '–'} | {fmt(r.get('peak_mem_gib'), '.1f')} | "
                         f"{fmt(vs, '.2f')} | {r.get('largest_batch', '–')} ({r.get('stopped_by', '')}) | "
                         f"{fmt(r.get('images_per_s_at_largest'), '.1f')} |")
    lines += _targets(secs)
    lines += _packed((secs.get("packed") or {}).get("result") or {})
    ini = (secs.get("init_size") or {}).get("result") or {}
    if ini.get("capture_s") is not None:
        lines += ["", f"Initializer at size: {ini.get('model')}, B = {ini.get('B')} on {ini.get('device')}: capture "
                  f"{fmt(ini.get('capture_s'))} s vs plain forward {fmt(ini.get('forward_s'))} s "
                  f"({fmt(ini.get('capture_vs_forward'), '.2f')}x; peak {fmt(ini.get('capture_peak_mem_gib'))} vs "
                  f"{fmt(ini.get('forward_peak_mem_gib'))} GiB), math {fmt(ini.get('math_s'))} s "
                  f"({ini.get('math_device')})."]
        dev = ini.get("math_on_device") or {}
        if "math_s" in dev:
            lines[-1] += (f" On the device ({dev['device']}): math {fmt(dev['math_s'])} s = "
                          f"{fmt(dev.get('math_vs_capture'), '.2f')}x the capture (target <= 0.25), max |diff| vs CPU "
                          f"{fmt(dev.get('max_abs_diff_vs_cpu'), '.1e')} ({'ok' if dev.get('passed') else 'FAIL'}).")
    da = (secs.get("data") or {}).get("result") or {}
    rows = [(k, da[k]) for k in ("wds_pil", "dali_cpu", "dali_mixed") if isinstance(da.get(k), dict)]
    if rows:
        lines += ["", f"Loaders at 224 px ({da.get('images')} JPEGs, batch {da.get('batch')}, {da.get('threads')} "
                  "threads/workers, best epoch after the first): " + ", ".join(
                      f"{k} {fmt(v.get('images_per_s'), '.0f')} images/s" if "images_per_s" in v else f"{k} failed"
                      for k, v in rows) + "."]
        if da.get("dali_mixed_vs_wds_pil"):
            lines[-1] += f" DALI mixed / webdataset + PIL: {fmt(da['dali_mixed_vs_wds_pil'], '.2f')}x (target >= 2)."
    lines.append(END)
    return "\n".join(lines)



def _targets(secs: dict) -> list[str]:
    """Issue 24's step targets: one table row per variant of the step, engines and fewshot sections."""
    rows = []
    for name, metric, ratio in (("step", "images_per_s", "speed_vs_bare"), ("engines", "images_per_s", "speed_vs_ddp"),
                                ("fewshot", "steps_per_s", "speed_vs_today")):
        res = (secs.get(name) or {}).get("result") or {}
        for key, r in res.items():
            if not isinstance(r, dict) or key == "model_flops":
                continue
            value = r.get(metric)
            text = (fmt(value, ".1f") if value is not None else
                    f"skipped: {r['skipped'][:60]}" if "skipped" in r else f"failed: {str(r.get('error'))[:80]}")
            rows.append(f"| {name} | {key} | {text} | {fmt(r.get(ratio), '.2f')} | "
                        f"{fmt(r.get('mfu'), '.1%') if r.get('mfu') is not None else '–'} | "
                        f"{fmt(r.get('peak_mem_gib'), '.1f')} |")
    if not rows:
        return []
    return ["", "Issue 24's targets (step: ViT-H/14 batch 64 vs the bare loop, >= 1.4x and 45 % MFU; engines: >= 0.8x "
            "ddp; fewshot: demo shape, 112 px, batch 10, >= 3x today's steps/s):", "",
            "| section | variant | images/s (fewshot: steps/s) | ratio | MFU | peak mem GiB |", "|---|---|---|---|---|---|",
            *rows]


def _packed(res: dict) -> list[str]:
    """Issue 22's packed trials: one row per layout (the solo processes, then each K)."""
    rows = []
    for key in ("solo", *(f"k{k}" for k in res.get("ks") or [])):
        r = res.get(key)
        if not isinstance(r, dict):
            continue
        if "runs_per_hour" not in r:
            rows.append(f"| {key} | failed: {str(r.get('error'))[:100]} | | | | | | | |")
            continue
        step_ms = r["step_s"] * 1000 if r.get("step_s") is not None else None
        rows.append(f"| {key} | {r['processes']} x {r['runs'] // r['processes']} | {fmt(step_ms, '.1f')} | "
                    f"{fmt(r.get('images_per_s_per_process'), '.0f')} | {fmt(r['wall_s'], '.0f')} | "
                    f"{fmt(r['runs_per_hour'], '.0f')} | {fmt(r.get('gain', 1.0 if key == 'solo' else None), '.2f')} | "
                    f"{fmt(r.get('gpu_peak_mb_per_run'), '.0f')} | {fmt(r.get('max_acc_diff'), '.1e')} |")
    auto = res.get("auto")
    tail = ["", _auto_line(auto)] if isinstance(auto, dict) else []
    if not rows:
        return tail
    return ["", f"Packed trials (issues 22, 33; {res.get('target')}): {res.get('workload')}. Step: the real loop's "
            "(loader, one copy to the device, step), per process.", "",
            "| layout | processes x runs | step ms | images/s / process | wall s | runs/hour | gain | peak GPU MB / run | "
            "max acc diff vs solo |", "|---|---|---|---|---|---|---|---|---|", *rows, *tail]


def _auto_line(auto: dict) -> str:
    """`pack_size=auto` for the packed workload: its K, how it was chosen, the measured peak of a pack of K."""
    if "k" not in auto:
        return f"pack_size=auto: failed: {str(auto.get('error'))[:120]}"
    budget = (f", budget {fmt(auto['budget_mb'], '.0f')} MB ({'within' if auto['within_budget'] else 'OVER'})"
              if "budget_mb" in auto else "")
    return (f"pack_size=auto: K = {auto['k']} ({auto['how']}); a pack of {auto['k']} measured: peak "
            f"{fmt(auto['peak_mb'], '.0f')} MB (training steps {fmt(auto['train_peak_mb'], '.0f')}, eval batch "
            f"{fmt(auto['eval_peak_mb'], '.0f')}){budget}.")
