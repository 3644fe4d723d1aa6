"""Train packs of runs with `vipamin_scale.train.train_pack` (tests/test_pack.py; under torchrun or alone).

    python pack_worker.py SPEC.json     SPEC: [[[out_dir, override, ...], ...], ...]: a list of packs, each a
                                        list of runs (its out_dir and its overrides on top of conftest.TINY)
A pack of one is the solo run. Every rank calls train_pack for every pack, in order.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest.TINY

from conftest import TINY  # noqa: E402

import vipamin_scale  # noqa: E402
from vipamin_scale.train import train_pack  # noqa: E402


def main() -> None:
    packs = json.loads(Path(sys.argv[1]).read_text())
    for pack in packs:
        cfgs = [vipamin_scale.compose([*TINY, *overrides, f"train.out_dir={out_dir}"]) for out_dir, *overrides in pack]
        train_pack(cfgs)


if __name__ == "__main__":
    main()
