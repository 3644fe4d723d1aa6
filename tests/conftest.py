"""Shared test settings: one cache directory for the whole session (demo shards, converted weights)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("VIPAMIN_SCALE_CACHE", str(REPO / ".cache" / "tests"))

from vipamin_scale.launch import command as torchrun  # noqa: E402,F401  (the tests' torchrun and port helpers)
from vipamin_scale.launch import free_port  # noqa: E402,F401

# Small, fast and deterministic settings shared by the end-to-end tests. A random tiny ViT's
# features are weak (a fitted logistic probe on its CLS reaches ~0.28 on the digits, on raw pixels
# 0.96), so mean pooling (MAE's setting, more image signal) keeps learning visible in 24 steps.
TINY = [
    "model=vit_test_d64", "model.pool=mean", "data=digits", "data.max_train_samples=256", "data.batch_size=32",
    "data.eval_batch_size=128", "train.epochs=3", "train.lr=0.5", "train.warmup_epochs=0.5",
    "train.log_every=1", "train.progress=false", "prompt.length=4",
]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "error::UserWarning:vipamin_scale"})
    env.update(extra)
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vipamin_scale.cli", *args]


@contextlib.contextmanager
def held_elsewhere(run_dir: Path) -> Iterator[int]:
    """`run_dir`'s lock held by another live process (as a running command holds it); yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom vipamin_scale.runs import acquire\n"
                               "acquire(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(600)", str(run_dir)],
                              stdout=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        (Path(run_dir) / "run.lock").unlink(missing_ok=True)




@pytest.fixture(scope="session")
def digits_root():
    from vipamin_scale.data.digits import digits_root as build

    return build()
