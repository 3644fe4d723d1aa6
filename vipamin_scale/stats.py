"""Small statistics over runs, the one place for them: mean, sample sd, the 95 % t-interval of a mean,
and paired differences.

Used by `make demo`, `vipamin-scale report` (vipamin_scale/studies.py), `vipamin-scale tune` and
benchmarks/accuracy.py. A value of None is a run that did not finish: it is left out (of a pair: both
sides are). One value has a mean but no sd and no interval (None): a spread cannot be read from one
run, and 0 would claim there is none."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence


def t_quantile(n: int, level: float = 0.95) -> float:
    """The (1 + level) / 2 quantile of Student's t with n - 1 degrees of freedom (n >= 2)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, n - 1))


def mean(values: Sequence[float]) -> Optional[float]:
    """The mean; None for no value."""
    return sum(values) / len(values) if values else None


def sample_sd(values: Sequence[float]) -> Optional[float]:
    """The sample standard deviation (n - 1); None below two values."""
    n = len(values)
    if n < 2:
        return None
    m = sum(values) / n
    return math.sqrt(sum((x - m) ** 2 for x in values) / (n - 1))


def half_width(sd: Optional[float], n: int, level: float = 0.95) -> Optional[float]:
    """Half the width of the t-interval of a mean of n values with sample sd `sd`; None below two values."""
    if sd is None or n < 2:
        return None
    return t_quantile(n, level) * sd / math.sqrt(n)


def summary(values: Sequence[Optional[float]]) -> dict[str, Any]:
    """{mean, sd (n - 1), n, runs} over the values that are not None (nor NaN); sd is None below two
    values, mean None for none. `runs` keeps every value as given (None where a run did not finish)."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    return {"mean": mean(v), "sd": sample_sd(v), "n": len(v), "runs": list(values)}


def interval(s: dict[str, Any], level: float = 0.95) -> tuple[Optional[float], Optional[float]]:
    """The t-interval of a summary's mean (None, None below two values)."""
    half = half_width(s["sd"], s["n"], level)
    if half is None:
        return None, None
    return s["mean"] - half, s["mean"] + half


def paired(a: Sequence[Optional[float]], b: Sequence[Optional[float]], level: float = 0.95) -> dict[str, Any]:
    """a - b draw by draw (draws where both finished): summary + lo, hi, resolved (the interval excludes 0)."""
    s = summary([x - y for x, y in zip(a, b) if x is not None and y is not None])
    lo, hi = interval(s, level)
    return {**s, "lo": lo, "hi": hi, "resolved": lo is not None and (lo > 0 or hi < 0)}
