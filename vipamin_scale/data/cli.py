"""`vipamin-scale shards SOURCE OUT_DIR`: WebDataset shards from an image folder or a CSV, plain or by a
benchmark protocol (`--protocol vtab|fewshot`, see data/protocols.py); few-shot draws from a shard
directory too (data/fewshot.py)."""
from __future__ import annotations

import argparse
import json
import sys

from vipamin_scale.data.fewshot import is_shard_dir
from vipamin_scale.data.shards import DataError, ShardsExist, dataset_info, make_shards

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
           SOURCE may be a shard directory (manifest.json + classes.json, e.g. your data.root): the k
           images per class are drawn from its --split split (default train) by the same rule, their
           bytes copied as stored; its other splits are symlinks to its own files (never copied or
           rewritten). Such a draw is written once: asked again it is reused, and refused (one line)
           when the source changed since; remove the draw's directory to draw again.

examples:
  vipamin-scale shards /data/vtab-1k/dtd shards/dtd --protocol vtab --task dtd
  vipamin-scale shards /data/cub/images shards/cub --protocol fewshot --shots 1 2 4 8 16 --seed 0
  vipamin-scale shards /data/cub_shards draws/cub --protocol fewshot --shots 4 --seed 2   # from shards
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="vipamin-scale shards", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Write WebDataset shards (png/jpg + cls, with DALI index files), classes.json and manifest.json. "
                    "SOURCE is an ImageFolder tree (root/<split>/<class>/img or root/<class>/img) "
                    "or a CSV with columns path,label[,split]; with --protocol fewshot also a shard directory.")
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
    ap.add_argument("--split", help="fewshot from a shard directory: the split drawn from (default train)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--maxcount", type=int, help="samples per shard at most")
    ap.add_argument("--maxsize", type=float, help="bytes per shard at most")
    ap.add_argument("--overwrite", action="store_true", help="replace the shards already in OUT_DIR")
    args = ap.parse_args(argv)
    write = {k: v for k, v in dict(maxcount=args.maxcount, maxsize=args.maxsize, overwrite=args.overwrite).items()
             if v is not None}
    try:
        if is_shard_dir(args.source):
            return _draw_from_shards(args)
        if args.split is not None:
            raise DataError("--split: names the split of a shard directory SOURCE to draw from (--protocol fewshot)")
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
    _print(manifests)
    return 0


def _print(manifests: dict) -> None:
    for out_dir, manifest in manifests.items():
        counts = {split: info["count"] for split, info in manifest["splits"].items()}
        print(json.dumps({"out_dir": out_dir, "num_classes": manifest["num_classes"], "counts": counts}))


def _draw_from_shards(args: argparse.Namespace) -> int:
    """`--protocol fewshot` from a shard directory: `data.fewshot.fewshot_root` for each k of --shots."""
    from vipamin_scale.data.fewshot import fewshot_root
    from vipamin_scale.data.protocols import FEWSHOT_SHOTS

    if args.protocol != "fewshot":
        raise DataError(f"{args.source}: a shard directory; --protocol fewshot draws from one, --protocol "
                        f"{args.protocol} reads an image tree or a CSV")
    unused = [flag for flag, value in (("--overwrite", args.overwrite), ("--maxcount", args.maxcount),
                                       ("--maxsize", args.maxsize), ("--fractions", args.fractions)) if value]
    if unused:
        raise DataError(f"{unused[0]}: not used when SOURCE is a shard directory (a draw is written once and "
                        f"reused; remove its directory to draw again)")
    roots = [fewshot_root(args.source, k, args.seed, args.out_dir, split=args.split or "train")
             for k in sorted(set(args.shots or FEWSHOT_SHOTS))]
    _print({str(root): dataset_info(root)["manifest"] for root in roots})
    return 0
