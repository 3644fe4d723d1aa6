"""Import benchmark scripts (not a package) by path, and run their --quick mode."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from conftest import REPO, cli_env


def load_module(name: str, script: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_accuracy_module():
    return load_module("bench_accuracy", "accuracy.py")


def load_study_module():
    sys.path.insert(0, str(REPO / "benchmarks"))  # the study imports accuracy.py by name
    return load_module("prompt_length_study", "prompt_length_study.py")


def run_quick(script: str, tmp_path: Path, out: Path, timeout: int) -> tuple[list[str], subprocess.CompletedProcess]:
    """`benchmarks/<script> --quick --no-gate` with its work under tmp_path and its JSON at `out`; the
    command (for re-runs) and the finished process, asserted successful."""
    cmd = [sys.executable, str(REPO / "benchmarks" / script), "--quick", "--no-gate", "--work", str(tmp_path / "work"),
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cmd, proc
