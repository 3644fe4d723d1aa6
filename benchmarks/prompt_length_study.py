"""The prompt-length study: `vipamin-scale study study=prompt_length` and its section of benchmarks/RESULTS.md.

    python benchmarks/prompt_length_study.py                         # the full protocol (a GPU machine:
                                                                     # benchmarks/device_studies.sh)
    python benchmarks/prompt_length_study.py study=prompt_length_digits   # the CPU cut RESULTS.md records (~90 min)
    python benchmarks/prompt_length_study.py study=prompt_length_quick --no-results-md   # a smoke run
    python benchmarks/prompt_length_study.py --render                # the copies and the section again from --work

The protocol is the preset's (vipamin_scale/configs/study/prompt_length.yaml): test accuracy against P per
method, each at its own lr selected per (regime, P) on val over 3 draws with up to 2 edge rounds, 10 paired
4-shot draws and 3 seeds on 1000 training images, the gate, paired differences against VPT random, the cost
of P. Writes benchmarks/results/<preset>.json (the study's record) and its plots, and the prompt-length section
of RESULTS.md. Other arguments: benchmarks/study_preset.py.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import study_preset  # noqa: E402

BEGIN, END = "<!-- prompt-length:begin -->", "<!-- prompt-length:end -->"


def main(argv: Optional[list[str]] = None) -> int:
    a = study_preset.parse("prompt_length_study.py", "prompt_length", argv, __doc__)
    doc, status = study_preset.run(a)
    study_preset.publish(a, {**doc, "command": a.command},
                         "## Prompt-length study: converged, paired (`vipamin-scale study study=prompt_length`)",
                         BEGIN, END)
    return status


if __name__ == "__main__":
    sys.exit(main())
