"""A benchmark that is a study preset: run `vipamin-scale study study=<preset>` into a work directory, then copy its
record and plots into benchmarks/results/ and its tables into a marked section of benchmarks/RESULTS.md.

    python benchmarks/<script>.py [--work DIR] [--out JSON] [--results-md MD] [--render] [OVERRIDE ...]

Every OVERRIDE is a Hydra override of the study (`study=prompt_length_digits` picks another preset, e.g. a
recorded cut; `study.workers=14`, `study.note='...'`, `model=vit_l16 model.checkpoint=...`). The study itself is
the library's (`vipamin_scale.study`): resumable in --work (the same command again continues it), refused there
under another protocol. `--render` rewrites the copies and the section from --work's study.json, training nothing.
A study headed CUT VERSION (another protocol than its preset's) is said so in the section's heading.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vipamin_scale import runs  # noqa: E402
from vipamin_scale.paths import portable, write_marked_section  # noqa: E402


def parse(script: str, preset: str, argv: Optional[list[str]], doc: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--work", default=None, help="the study's directory (default .cache/<preset>)")
    ap.add_argument("--out", default=None, help="the record's copy (default benchmarks/results/<preset>.json)")
    ap.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--render", action="store_true", help="rewrite the copies and the section from --work's study.json")
    ap.add_argument("--no-results-md", action="store_true", help="write no section (a smoke run)")
    a, overrides = ap.parse_known_args(argv)
    flags = [o for o in overrides if o.startswith("-")]
    if flags:
        ap.error(f"unknown flags {flags}; everything else is a Hydra override of the study (study.workers=14)")
    chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("study=")]
    a.preset = chosen[-1] if chosen else preset
    a.overrides = [o for o in overrides if not o.startswith("study=")]
    a.work = Path(a.work or REPO / ".cache" / a.preset)
    a.out = Path(a.out or REPO / "benchmarks" / "results" / f"{a.preset}.json")
    a.command = shlex.join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])
    return a


def run(a: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """The study (or, with --render, its record), and the exit status: 1 when its gate failed."""
    if a.render:
        doc = runs.read_json(a.work / "study.json")
        if doc is None or "cells" not in doc:
            raise SystemExit(f"error: --render: {a.work / 'study.json'}: no study record there")
        return doc, 0
    from vipamin_scale import compose
    from vipamin_scale.study import run_study
    from vipamin_scale.study.tables import GateFailed, summary_text

    cfg = compose([f"study={a.preset}", *a.overrides, f"hydra.run.dir={a.work}"])
    try:
        doc = run_study(cfg)
    except GateFailed as exc:
        print(f"error: {exc}")
        return exc.doc, 1
    print(summary_text(doc, a.work))
    return doc, 0


def publish(a: argparse.Namespace, doc: dict[str, Any], heading: str, begin: str, end: str,
            extra: Callable[[dict[str, Any]], list[str]] = lambda doc: []) -> None:
    """The record (paths relative to --work: WORK/...) and plots beside --out, and the marked section."""
    from vipamin_scale.study.tables import markdown

    record = portable({**doc, "command": a.command}, {"WORK": a.work.resolve(), "": REPO})
    runs.write_json(a.out, record, nan_as_null=True)
    plots = {}
    for name in ("study_accuracy.png", "study_paired.png"):
        if (a.work / name).is_file():
            target = a.out.with_name(f"{a.out.stem}_{name.split('_', 1)[1]}")
            shutil.copyfile(a.work / name, target)
            plots[name] = str(Path("results") / target.name)
    if a.no_results_md:
        print(f"wrote {a.out}")
        return
    body = markdown(doc).split("\n", 1)[1]  # study.md without its heading
    for name, rel in plots.items():
        body = body.replace(f"]({name})", f"]({rel})")
    title = heading + (" — CUT VERSION (not the preset's protocol)" if doc["cut"] else "")
    if doc.get("gate") and not doc["gate"]["passed"]:
        title += " — UNDERTRAINED (the gate failed)"
    minutes = doc["seconds"] / 60
    section = "\n".join([begin, title, "", f"Command: `{a.command}` ({minutes:.0f} min in this invocation, "
                         f"{machine()}; the study's record: `{a.out.relative_to(REPO) if a.out.is_relative_to(REPO) else a.out.name}`).",
                         *extra(doc), body.rstrip(), end])
    write_marked_section(Path(a.results_md), begin, end, section)
    print(f"wrote {a.out}, {', '.join(plots.values())} and the section of {a.results_md}")


def machine() -> str:
    import os
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, no GPU"
