"""Import benchmark scripts (not a package) by path."""
from __future__ import annotations

import importlib.util

from conftest import REPO


def load_accuracy_module():
    spec = importlib.util.spec_from_file_location("bench_accuracy", REPO / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
