"""A small prompt-length study, end to end as a user runs one: `slurm/prompt_length_sweep.sh` as a
Slurm job array on the private test cluster of `tests/slurm_support.py` (two 1-CPU nodes on this
machine), then `vipamin-scale report` on its sweep directory.

    python benchmarks/prompt_length_study.py            # ~25 min on 2 free cores; prints the commands

1. Data (under --work): the digits as an image tree, with val and test cut to their first
   --val-per-class / --test-per-class images of each class (the data config has no eval limit;
   the cut keeps the study's eval cost small; train keeps all 1000), then one 4-shot draw a seed
   with the user's command `vipamin-scale shards TREE OUT --protocol fewshot --shots 4 --seed S`.
2. `sbatch --array=0-N slurm/prompt_length_sweep.sh` with LENGTHS x INITS x SEEDS, the demo backbone
   (model=dinov2_s14_demo, 112 px), DATA_ROOT=.../4shot_seed{seed}: seed s trains both inits on
   draw s from the same random tensor (init.seed = train.seed = s). The array's order is the length
   slowest, so when the study is cut (scancel) the last lengths of LENGTHS are the ones missing.
3. `vipamin-scale report runs/prompt-length-<array id>`; the wall time of step 2 is printed; then the
   paired differences (first init of --inits minus the second, paired by seed, per length) with their
   95 % t interval over the seeds. `--report-only SWEEP_DIR` redoes step 3 alone.
The cluster is stopped at the end (or on Ctrl-C, which cancels the array).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def digits_tree(out: Path, val_per_class: int, test_per_class: int) -> Path:
    """`out/<split>/<class>/<index>.png`: the digits' train split whole, val and test cut per class."""
    from PIL import Image

    from vipamin_scale.data.digits import _split_indices, digits_images

    if (out / ".done").is_file():
        return out
    images, labels = digits_images()
    keep = {"train": None, "val": val_per_class, "test": test_per_class}
    for split, idx in _split_indices(labels).items():
        taken: dict[int, int] = {}
        for i in sorted(int(i) for i in idx):
            c = int(labels[i])
            if keep[split] is not None and taken.get(c, 0) >= keep[split]:
                continue
            taken[c] = taken.get(c, 0) + 1
            path = out / split / str(c) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(path)
    (out / ".done").write_text("ok\n")
    return out


def paired(sweep: Path, a: str, b: str) -> list[str]:
    """Markdown rows: per length, a - b test accuracy paired by seed, mean ± sd, 95 % t interval."""
    from scipy.stats import t

    acc: dict[tuple[str, int, str], float] = {}
    for path in sweep.glob("*/result.json"):
        m = re.fullmatch(r"(.+)-\w+-len(\d+)-seed(\w+)", path.parent.name)
        result = json.loads(path.read_text())
        if m and result.get("status", "ok") == "ok" and (result.get("test") or {}).get("acc") is not None:
            acc[(m[1], int(m[2]), m[3])] = float(result["test"]["acc"])
    rows = [f"| P | n | {a} - {b}, by seed | mean ± sd | 95 % CI | resolved |", "|---|---|---|---|---|---|"]
    for length in sorted({k[1] for k in acc}):
        seeds = sorted({k[2] for k in acc if k[1] == length and (a, length, k[2]) in acc and (b, length, k[2]) in acc})
        d = [acc[(a, length, s)] - acc[(b, length, s)] for s in seeds]
        if len(d) < 2:
            continue
        mean = sum(d) / len(d)
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
        half = float(t.ppf(0.975, len(d) - 1)) * sd / math.sqrt(len(d))
        rows.append(f"| {length} | {len(d)} | {' / '.join(f'{x:+.3f}' for x in d)} | {mean:+.3f} ± {sd:.3f} | "
                    f"[{mean - half:+.3f}, {mean + half:+.3f}] | {'yes' if abs(mean) > half else 'no'} |")
    return rows


def report(sweep: Path, inits: list[str]) -> int:
    cmd = [sys.executable, "-m", "vipamin_scale.cli", "report", str(sweep)]
    print("$", shlex.join(cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    if len(inits) == 2:
        print(f"\nPaired differences ({inits[0]} - {inits[1]}, test accuracy, same seed = same draw and tensor):\n")
        print("\n".join(paired(sweep, *inits)), flush=True)
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(REPO / "runs" / "prompt-length-data"))
    ap.add_argument("--lengths", default="1 10 50 5 20", help="LENGTHS, in the order they run")
    ap.add_argument("--inits", default="vipamin random")
    ap.add_argument("--seeds", default="0 1 2")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--val-per-class", type=int, default=10)
    ap.add_argument("--test-per-class", type=int, default=20)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--report-only", metavar="SWEEP_DIR", help="only report on a finished study's directory")
    args = ap.parse_args()
    if args.report_only:
        return report(Path(args.report_only), args.inits.split())

    work = Path(args.work).resolve()
    tree = digits_tree(work / "digits_tree", args.val_per_class, args.test_per_class)
    seeds = args.seeds.split()
    for s in seeds:
        if not (work / "fewshot" / f"{args.shots}shot_seed{s}" / "manifest.json").is_file():
            cmd = [sys.executable, "-m", "vipamin_scale.cli", "shards", str(tree), str(work / "fewshot"),
                   "--protocol", "fewshot", "--shots", str(args.shots), "--seed", s]
            print("$", shlex.join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

    sys.path.insert(0, str(REPO / "tests"))
    import slurm_support

    why = slurm_support.ensure_installed()
    if why:
        print(f"error: no local Slurm: {why}", file=sys.stderr)
        return 2
    n = len(args.lengths.split()) * len(args.inits.split()) * len(seeds)
    env = {"LENGTHS": args.lengths, "INITS": args.inits, "SEEDS": args.seeds, "MODEL": "dinov2_s14_demo",
           "ENGINE": "ddp", "DATA": "shards", "DATA_ROOT": f"{work}/fewshot/{args.shots}shot_seed{{seed}}",
           "BATCH": str(args.batch), "NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1",
           "VENV": os.environ.get("VENV", str(Path(sys.executable).parents[1]))}
    overrides = [f"train.epochs={args.epochs}", f"train.eval_every={args.epochs}", f"train.lr={args.lr}",
                 "train.warmup_epochs=1", "train.progress=false", "train.loggers=[jsonl]", "train.keep_last=1"]
    sbatch = ["sbatch", "--parsable", "--wait", f"--array=0-{n - 1}", "--gpus-per-node=0", "--cpus-per-task=1",
              "--time=60", f"--output={REPO}/runs/prompt-length-%A_%a.out", "slurm/prompt_length_sweep.sh", *overrides]
    print("$", " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(sbatch), flush=True)

    cluster = slurm_support.LocalSlurm(cpus_per_node=1)
    try:
        cluster.start()
        print(f"local Slurm up: SLURM_CONF={cluster.conf}", flush=True)
        t0 = time.monotonic()
        proc = subprocess.run(sbatch, cwd=REPO, env={**os.environ, **cluster.env, **env}, capture_output=True,
                              text=True)
        wall = time.monotonic() - t0
    finally:
        cluster.stop()
        shutil.rmtree(cluster.dir, ignore_errors=True)
    job = proc.stdout.strip().split(";")[0]
    print(f"sbatch exit {proc.returncode} (array {job}): wall {wall / 60:.1f} min{' ' + proc.stderr.strip() if proc.stderr.strip() else ''}",
          flush=True)
    return report(REPO / "runs" / f"prompt-length-{job}", args.inits.split()) or proc.returncode


if __name__ == "__main__":
    sys.exit(main())
