"""Studies: the front door for many runs (ARCHITECTURE.md, "Studies").

A study is methods x prompt lengths x shots on the user's backbone and data: each method's settings
selected on val over draws (with edge rounds), paired final draws, a convergence gate (a converged linear
probe on frozen features), the cost of P, and tables that say n, the interval and what they resolve.

    vipamin-scale study study=prompt_length model=vit_l16 model.checkpoint=... data=shards data.root=...
    vipamin-scale study --status DIR

    protocol.py   methods, cells, each run's config, what fixes the results (pure)
    run.py        the phases: draws, selection rounds, final runs, the cost of P, the record
    execute.py    runs reused or trained as packs (`packs.run_packed`), progress lines and status.json
    probe.py      the linear probe
    tables.py     study.json, study.md, plots (pure, from the record)
"""
from __future__ import annotations


def run_study(cfg):
    """`vipamin-scale study`'s task (vipamin_scale/study/run.py)."""
    from vipamin_scale.study.run import run_study as _run

    return _run(cfg)


def status_text(study_dir) -> str:
    """`vipamin-scale study --status DIR`."""
    from vipamin_scale.study.execute import status_text as _status

    return _status(study_dir)


__all__ = ["run_study", "status_text"]
