"""`vipamin-scale shards SOURCE OUT_DIR`: WebDataset shards from an image folder or a CSV."""
from __future__ import annotations

import argparse
import json
import sys

from vipamin_scale.data.shards import DataError, make_shards


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="vipamin-scale shards",
        description="Write train/val/test WebDataset shards (png/jpg + cls), classes.json and manifest.json. "
                    "SOURCE is an ImageFolder tree (root/<split>/<class>/img or root/<class>/img) "
                    "or a CSV with columns path,label[,split].")
    ap.add_argument("source")
    ap.add_argument("out_dir")
    ap.add_argument("--fractions", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                    help="seeded split when the source has no splits of its own")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--maxcount", type=int, help="samples per shard at most")
    ap.add_argument("--maxsize", type=float, help="bytes per shard at most")
    ap.add_argument("--overwrite", action="store_true", help="replace the shards already in OUT_DIR")
    args = ap.parse_args(argv)
    opts = {k: v for k, v in dict(fractions=args.fractions, seed=args.seed, maxcount=args.maxcount,
                                  maxsize=args.maxsize, overwrite=args.overwrite).items() if v is not None}
    try:
        manifest = make_shards(args.source, args.out_dir, **opts)
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = {split: info["count"] for split, info in manifest["splits"].items()}
    print(json.dumps({"out_dir": args.out_dir, "num_classes": manifest["num_classes"], "counts": counts}))
    return 0
