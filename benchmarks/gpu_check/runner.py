"""The one runner: every section in its own process with its own time cap, gpu.json and RESULTS.md
rewritten after each, one line per failure."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from vipamin_scale.paths import portable, write_marked_section

from gpu_check.common import (BEGIN, BUDGET_S, CORRECTNESS, END, ENTRY, REPO, RESULTS_JSON, RESULTS_MD, SECTIONS,
                              Record, child_env, cuda, failure, kill_tree, last_line, one_line, sizes, write_json)
from gpu_check.report import results_section


# Fault injection for the tests (a declared option, like vipamin_scale/faults.py): GPU_CHECK_HANG=<section> makes
# that section's process hang before it starts, so the time cap's kill is tested without racing the clock.
HANG_ENV = "GPU_CHECK_HANG"


def section_function(name: str):
    """Section `name`'s `run(rec, ctx)`: module gpu_check/<name>.py (imported in the section's own process)."""
    import importlib

    return importlib.import_module(f"gpu_check.{name}").run


def run_section(name: str, cap: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run one section in its own process group, killed at `cap` seconds. Returns its record:
    status ok | failed | timeout, seconds, result (what the section wrote, partial if it died),
    error and where (one line each) when it did not finish."""
    result_file, log = work / f"{name}.json", work / f"{name}.log"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(ENTRY), "--child", name, "--work", str(work),
           "--cap", str(cap)] + (["--smoke"] if args.smoke else [])
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            rc = None
    rec: dict[str, Any] = {"seconds": round(time.perf_counter() - t, 1), "log": str(log)}
    try:
        rec["result"] = json.loads(result_file.read_text()) if result_file.is_file() else {}
    except ValueError as exc:
        rec["result"] = {}
        rec["result_error"] = one_line(exc)
    res = rec["result"]
    if rc is None:
        rec.update(status="timeout", error=f"timed out after {cap:.0f} s (killed); last log line: {last_line(log)}")
    elif rc != 0:
        rec.update(status="failed", error=res.get("error") or last_line(log) or f"exit {rc}", where=res.get("where", ""))
    else:
        rec["status"] = "ok"
        failed_items = [k for k, v in res.items() if isinstance(v, dict) and "error" in v and len(v) <= 2]
        if failed_items:
            rec["error"] = "; ".join(f"{k}: {res[k]['error']}" for k in failed_items)
        if res.get("skipped"):  # the section cannot run here (e.g. DALI not installed): said, not failed
            rec["error"] = f"skipped: {res['skipped']}"
        elif name in CORRECTNESS and not res.get("passed"):
            rec.update(status="failed", error=rec.get("error") or "a correctness comparison did not pass (see result)")
    return rec


def child(args: argparse.Namespace) -> int:
    import shutil

    work = Path(args.work)
    rec = Record(work / f"{args.child}.json")
    scratch = work / args.child  # this section's own, emptied first (a rerun must not append to old runs)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    ctx = {"smoke": args.smoke, "work": scratch, "cap": args.cap, "sizes": sizes(args.smoke)}
    if os.environ.get(HANG_ENV) == args.child:  # the tests' stand-in for a stuck collective: the cap must kill it
        print(f"gpu_check: {args.child} hangs ({HANG_ENV})", flush=True)
        while True:
            time.sleep(60)
    try:
        section_function(args.child)(rec, ctx)
    except Exception as exc:
        rec.data.update(failure(exc))
        rec.save()
        traceback.print_exc()
        return 1
    return 0


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the same code paths on the CPU with tiny sizes (< 3 min)")
    ap.add_argument("--out", type=Path, default=None,
                    help="directory for gpu.json and (with --smoke) RESULTS.md; default benchmarks/results, "
                         "with --smoke a new temporary directory")
    ap.add_argument("--results-md", type=Path, default=None,
                    help="markdown file whose gpu-check section is replaced; default benchmarks/RESULTS.md "
                         "(with --smoke: OUT/RESULTS.md)")
    ap.add_argument("--work", type=Path, default=None, help="scratch and per-section logs (default .cache/gpu_check; "
                    "with --smoke OUT/gpu_check_work)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"the whole run's time (default {BUDGET_S['gpu']:.0f} s, with --smoke {BUDGET_S['smoke']:.0f} s); "
                         "a section gets min(its cap, what is left)")
    ap.add_argument("--only", default=None, help="comma-separated sections to run (default: all, in order)")
    ap.add_argument("--child", choices=list(SECTIONS), help=argparse.SUPPRESS)
    ap.add_argument("--cap", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = BUDGET_S["smoke" if args.smoke else "gpu"]
    if args.only:
        unknown = sorted(set(args.only.split(",")) - set(SECTIONS))
        if unknown:
            ap.error(f"--only: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    if args.child:
        return child(args)
    if not args.smoke and not cuda():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, "
              "or pass --smoke for the CPU smoke run", file=sys.stderr)
        return 2
    committed = {RESULTS_JSON.parent.resolve(), RESULTS_MD.resolve()}
    if args.smoke:
        out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_smoke_"))
        md = args.results_md or out / "RESULTS.md"
        if out.resolve() in committed or md.resolve() in committed:
            print("gpu_check: --smoke writes tiny-size figures; it never replaces the committed "
                  "benchmarks/results/gpu.json or benchmarks/RESULTS.md (pick another --out / --results-md)",
                  file=sys.stderr)
            return 2
    else:
        out, md = args.out or RESULTS_JSON.parent, args.results_md or RESULTS_MD
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or (out / "gpu_check_work" if args.smoke else REPO / ".cache" / "gpu_check")
    work.mkdir(parents=True, exist_ok=True)
    json_path = out / "gpu.json"
    names = [n for n in SECTIONS if not args.only or n in args.only.split(",")]
    t0 = time.perf_counter()
    doc: dict[str, Any] = {"meta": {"command": " ".join(["python benchmarks/gpu_check.py", *(argv or sys.argv[1:])]),
                                    "smoke": args.smoke, "budget_s": args.budget_s,
                                    "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                           "sections": {}}
    if args.only and json_path.is_file():  # a partial run keeps the other sections' last figures
        try:
            before = json.loads(json_path.read_text())
        except ValueError:
            before = {}
        if before.get("meta", {}).get("smoke") == args.smoke:
            doc["sections"] = {n: s for n, s in before.get("sections", {}).items() if n in SECTIONS and n not in names}
            doc["meta"]["kept_from"] = before["meta"].get("started")
    for name in names:
        left = args.budget_s - (time.perf_counter() - t0)
        cap = min(SECTIONS[name][1 if args.smoke else 0], left)
        if cap < 5:
            doc["sections"][name] = {"status": "skipped", "seconds": 0.0, "result": {},
                                     "error": f"not run: the --budget-s of {args.budget_s:.0f} s was spent"}
        else:
            print(f"gpu_check: {name} (cap {cap:.0f} s) ...", file=sys.stderr, flush=True)
            doc["sections"][name] = run_section(name, cap, args, work)
            sec = doc["sections"][name]
            print(f"gpu_check: {name}: {sec['status']} in {sec['seconds']:.0f} s"
                  + (f" -- {sec['error']}" if sec.get("error") else ""), file=sys.stderr, flush=True)
        doc["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(json_path, portable(doc, {"WORK": Path(work).resolve(), "": REPO}))  # no path of this machine
        write_marked_section(md, BEGIN, END, results_section(doc))
    bad = [n for n in names if doc["sections"][n]["status"] != "ok"]
    print(f"gpu_check: wrote {json_path} and the gpu-check section of {md}; "
          + (f"not ok: {', '.join(bad)}" if bad else "every section ok"), file=sys.stderr)
    return 1 if bad else 0


