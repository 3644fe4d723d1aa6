"""`make gpu-check`: the entry of the GPU readiness run (the package benchmarks/gpu_check/; its docstring
says what each section measures).

    python benchmarks/gpu_check.py [--smoke] [--only env,step,...] [--budget-s S] [--out DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from gpu_check.runner import main  # noqa: E402  (the package gpu_check/, beside this file)

if __name__ == "__main__":
    sys.exit(main())
