"""Successive halving and the selection rule, as pure functions of counts and scores.

Halving (`tune.mode=halving`, reduction factor eta): with n candidates there are
s = 1 + floor(log_eta n) rungs; rung i trains its candidates for max(min_epochs, round(R * eta^(i-s+1)))
epochs (R = tune.max_epochs, default train.epochs), ranks them by score at the end of that budget and
keeps the top floor(n_i / eta) for the next rung; ties go to the earlier candidate, a failed
candidate ranks last and is never promoted. `tune.mode=grid` is one rung of every candidate at R.

A candidate's score (`tune.select_draws` = D): its mean val accuracy over draws 0..D-1, None (failed)
when any draw failed: a learning rate that collapses one draw is not a safe choice, whatever the
others say.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import vipamin_scale.stats as stats


def rung_budgets(n: int, eta: int, max_epochs: int, min_epochs: int = 1, mode: str = "halving") -> list[tuple[int, int]]:
    """[(candidates in the rung, epochs)] for n candidates: survivors floor(n_i / eta) while >= 1."""
    if mode == "grid" or n == 1:
        return [(n, max_epochs)]
    sizes = [n]
    while sizes[-1] // eta >= 1:
        sizes.append(sizes[-1] // eta)
    s = len(sizes)
    budgets = [max(min_epochs, min(max_epochs, round(max_epochs * eta ** (i - s + 1)))) for i in range(s)]
    return list(zip(sizes, budgets))


def promote(scores: Sequence[Optional[float]], keep: int) -> list[int]:
    """Positions of the `keep` best scores (None = failed, never kept); ties go to the earlier position."""
    order = sorted((i for i, s in enumerate(scores) if s is not None and not math.isnan(s)),
                   key=lambda i: (-scores[i], i))
    return sorted(order[:keep])


def draw_score(scores: Sequence[Optional[float]]) -> Optional[float]:
    """A candidate's score from its draws' val accuracies: their mean; None when any draw failed (None or NaN)."""
    if not scores or any(s is None or math.isnan(s) for s in scores):
        return None
    return stats.mean(scores)
