"""`vipamin-scale shards SOURCE OUT_DIR`: WebDataset shards from an image folder or a CSV, plain or by a
benchmark protocol (`--protocol vtab|fewshot`, see data/protocols.py)."""
from __future__ import annotations

import argparse
import json
import sys

from vipamin_scale.data.shards import DataError, ShardsExist, make_shards

EPILOG = """protocols:
  plain    (default) the source's own train/val/test, or a seeded split by --fractions.
  vtab     VTAB-1k as in VPT: splits train800 (train[:800]), val200 (val[:200] when the source has a
           val split, else train[n90:n90+200] at the 90%% point n90), train800val200 (their union), test.
           SOURCE: root/<split>/<class>/ images, a CSV path,label,split (its row order is kept), or a
           task folder with train800.txt val200.txt train800val200.txt test.txt ("<path> <label>" lines).
           --task NAME checks the class count (one of the 19 VTAB tasks).
           Select hyper-parameters with data=vtab_select, run the final fit with data=vtab_final.
  fewshot  OUT_DIR/<k>shot_seed<seed>/ for each k of --shots: k training images per class drawn with
           --seed (nested in k), val and test kept; the manifest records the draw.

examples:
  vipamin-scale shards /data/vtab-1k/dtd shards/dtd --protocol vtab --task dtd
  vipamin-scale shards /data/cub/images shards/cub --protocol fewshot --shots 1 2 4 8 16 --seed 0
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="vipamin-scale shards", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Write WebDataset shards (png/jpg + cls, with DALI index files), classes.json and manifest.json. "
                    "SOURCE is an ImageFolder tree (root/<split>/<class>/img or root/<class>/img) "
                    "or a CSV with columns path,label[,split].")
    ap.add_argument("source")
    ap.add_argument("out_dir")
    ap.add_argument("--protocol", choices=("plain", "vtab", "fewshot"), default="plain",
                    help="how the splits are made (see below)")
    ap.add_argument("--task", help="vtab: the VTAB-1k task name (checks its class count)")
    ap.add_argument("--order", choices=("source", "shuffle"),
                    help="vtab: keep the train list's order or permute it with --seed first "
                         "(default: source for a CSV, shuffle for a tree)")
    ap.add_argument("--shots", type=int, nargs="+", help="fewshot: images per class, one shard directory each "
                                                         "(default 1 2 4 8 16)")
    ap.add_argument("--fractions", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                    help="plain: seeded split when the source has no splits of its own")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--maxcount", type=int, help="samples per shard at most")
    ap.add_argument("--maxsize", type=float, help="bytes per shard at most")
    ap.add_argument("--overwrite", action="store_true", help="replace the shards already in OUT_DIR")
    args = ap.parse_args(argv)
    write = {k: v for k, v in dict(maxcount=args.maxcount, maxsize=args.maxsize, overwrite=args.overwrite).items()
             if v is not None}
    try:
        if args.protocol == "vtab":
            from vipamin_scale.data.protocols import vtab_shards

            manifests = {args.out_dir: vtab_shards(args.source, args.out_dir, task=args.task, seed=args.seed,
                                                   order=args.order, **write)}
        elif args.protocol == "fewshot":
            from vipamin_scale.data.protocols import FEWSHOT_SHOTS, fewshot_shards

            made = fewshot_shards(args.source, args.out_dir, shots=args.shots or FEWSHOT_SHOTS, seed=args.seed, **write)
            manifests = {f"{args.out_dir}/{k}shot_seed{args.seed}": m for k, m in made.items()}
        else:
            opts = dict(write, seed=args.seed, **({"fractions": args.fractions} if args.fractions else {}))
            manifests = {args.out_dir: make_shards(args.source, args.out_dir, **opts)}
    except ShardsExist as exc:  # name the flag, not the Python keyword
        print(f"error: {exc.with_how('pass --overwrite')}", file=sys.stderr)
        return 2
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for out_dir, manifest in manifests.items():
        counts = {split: info["count"] for split, info in manifest["splits"].items()}
        print(json.dumps({"out_dir": out_dir, "num_classes": manifest["num_classes"], "counts": counts}))
    return 0
