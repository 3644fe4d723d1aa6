"""Small statistics over runs: mean ± sample sd, and paired differences with a 95 % t-interval.

Used by `make demo` and benchmarks/accuracy.py. A value of None is a run that did not finish: it is
left out (of a pair: both sides are)."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence


def t_quantile(n: int, level: float = 0.95) -> float:
    """The (1 + level) / 2 quantile of Student's t with n - 1 degrees of freedom (n >= 2)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, n - 1))


def summary(values: Sequence[Optional[float]]) -> dict[str, Any]:
    """{mean, sd (n - 1), n, runs}; sd is 0 for one value, mean and sd None for none."""
    v = [x for x in values if x is not None]
    n = len(v)
    mean = sum(v) / n if n else None
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else (0.0 if n else None)
    return {"mean": mean, "sd": sd, "n": n, "runs": list(values)}


def interval(s: dict[str, Any], level: float = 0.95) -> tuple[Optional[float], Optional[float]]:
    """The t-interval of a summary's mean (None, None below two values)."""
    if s["n"] < 2:
        return None, None
    half = t_quantile(s["n"], level) * s["sd"] / math.sqrt(s["n"])
    return s["mean"] - half, s["mean"] + half


def paired(a: Sequence[Optional[float]], b: Sequence[Optional[float]], level: float = 0.95) -> dict[str, Any]:
    """a - b draw by draw (draws where both finished): summary + lo, hi, resolved (the interval excludes 0)."""
    s = summary([x - y for x, y in zip(a, b) if x is not None and y is not None])
    lo, hi = interval(s, level)
    return {**s, "lo": lo, "hi": hi, "resolved": lo is not None and (lo > 0 or hi < 0)}
