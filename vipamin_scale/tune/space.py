"""The search space (`tune.space`): its grammar, its candidates, and a grid leaf's edges.

The space is nested like the config; each leaf is a list of values, `{log: [lo, hi], num: n}`
(geometric grid), `{range: [lo, hi], num: n}` (linear grid) or a fixed scalar. The candidates are the
grid's Cartesian product in declaration order (`tune.trials` samples that many of them, seeded).

Edges (`tune.extend_edges`): a candidate sits at an edge of a leaf when its value is the smallest or
the largest of the leaf's values (two or more numbers). A log/range leaf can be extended one step
beyond that edge: the step is the grid's own (a factor (hi/lo)^(1/(n-1)) for log, (hi-lo)/(n-1) for
range), the j-th extension on a side lies j steps beyond the original bound. A list leaf has no step:
its edge is reported, never extended.
"""
from __future__ import annotations

import copy
import itertools
import math
import random
from typing import Any, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from vipamin_scale.config import ConfigError, validate

_SPEC_KEYS = {"log", "range", "num"}


def _is_spec(node: Any) -> bool:
    return isinstance(node, Mapping) and bool(node) and set(node) <= _SPEC_KEYS and ("log" in node or "range" in node)


def _round(value: float) -> float:
    return float(f"{value:.4g}")  # readable run names; 4 digits is finer than any lr grid


def _bounds(key: str, spec: Mapping) -> tuple[str, float, float, int]:
    """(kind, lo, hi, num) of a log/range leaf, checked."""
    kind = "log" if "log" in spec else "range"
    bounds, num = spec[kind], spec.get("num")
    if not isinstance(bounds, Sequence) or len(bounds) != 2 or not isinstance(num, int) or num < 1:
        raise ConfigError(f"tune.space.{key}: a {kind} grid is {{{kind}: [lo, hi], num: n}} with n >= 1; got {dict(spec)}")
    lo, hi = float(bounds[0]), float(bounds[1])
    if kind == "log" and (lo <= 0 or hi <= 0):
        raise ConfigError(f"tune.space.{key}: log bounds must be > 0; got [{lo}, {hi}]")
    return kind, lo, hi, num


def _grid(key: str, spec: Mapping) -> list[Any]:
    kind, lo, hi, num = _bounds(key, spec)
    if num == 1:
        return [lo]
    ts = [i / (num - 1) for i in range(num)]
    if kind == "log":
        values = [math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo))) for t in ts]
    else:
        values = [lo + t * (hi - lo) for t in ts]
    return [_round(v) for v in values]


def _plain(space: Any) -> Any:
    return OmegaConf.to_container(space, resolve=True) if isinstance(space, DictConfig) else space


def _walk(space: Mapping[str, Any]):
    """(dotted field, leaf) pairs of the nested space, in declaration order."""
    def walk(node: Any, prefix: str):
        if isinstance(node, Mapping) and not _is_spec(node):
            if not node:
                raise ConfigError(f"tune.space.{prefix}: empty")
            for key, child in node.items():
                yield from walk(child, f"{prefix}.{key}" if prefix else str(key))
            return
        yield prefix, node

    space = _plain(space)
    if not space:
        raise ConfigError("tune.space: empty; pick a preset (tune=lr) or add fields (+tune.space.train.lr=[0.01,0.1])")
    yield from walk(space, "")


def parse_space(space: Mapping[str, Any]) -> list[tuple[str, list[Any]]]:
    """Flatten the nested space into [(dotted field, values)], in declaration order."""
    out: list[tuple[str, list[Any]]] = []
    for key, node in _walk(space):
        if _is_spec(node):
            values = _grid(key, node)
        elif isinstance(node, (list, tuple)):
            values = list(node)
        else:
            values = [node]
        if not values:
            raise ConfigError(f"tune.space.{key}: no values")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"tune.space.{key}: repeated values {values}")
        out.append((key, values))
    return out


def grid_leaves(space: Mapping[str, Any]) -> dict[str, tuple[str, float, float, int]]:
    """{dotted field: (kind, lo, hi, num)} of the space's log/range leaves of two or more values: the
    leaves an edge can extend."""
    out = {}
    for key, node in _walk(space):
        if _is_spec(node):
            kind, lo, hi, num = _bounds(key, node)
            if num >= 2:
                out[key] = (kind, min(lo, hi), max(lo, hi), num)
    return out


def candidates(space: Mapping[str, Any], trials: Optional[int] = None, seed: int = 0) -> list[dict[str, Any]]:
    """The grid's points, {dotted field: value}, in product order; `trials` of them sampled (seeded)
    without replacement, keeping product order, when given and smaller than the grid."""
    axes = parse_space(space)
    keys = [k for k, _ in axes]
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in axes))]
    if trials is not None and trials < len(points):
        keep = sorted(random.Random(f"vipamin_scale.tune/{seed}").sample(range(len(points)), trials))
        points = [points[i] for i in keep]
    return points


def edges(point: Mapping[str, Any], values: Mapping[str, Sequence[Any]]) -> list[tuple[str, str]]:
    """[(field, "low" | "high")] for every leaf of two or more numbers at whose smallest or largest
    value `point` sits, in the order of `values`."""
    out = []
    for key, vals in values.items():
        nums = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(nums) < 2 or len(nums) != len(vals) or key not in point:
            continue
        if point[key] == min(nums):
            out.append((key, "low"))
        elif point[key] == max(nums):
            out.append((key, "high"))
    return out


def step_beyond(leaf: tuple[str, float, float, int], side: str, times: int) -> float:
    """The value `times` grid steps beyond the leaf's bound on `side` (times >= 1), rounded as the grid is."""
    kind, lo, hi, num = leaf
    if kind == "log":
        factor = (hi / lo) ** (times / (num - 1))
        return _round(lo / factor if side == "low" else hi * factor)
    step = times * (hi - lo) / (num - 1)
    return _round(lo - step if side == "low" else hi + step)


def apply_point(cfg: DictConfig, point: Mapping[str, Any]) -> DictConfig:
    """A copy of `cfg` with the candidate's values set (still the typed schema: a wrong type raises)."""
    out = copy.deepcopy(cfg)
    for key, value in point.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


def check_point(cfg: DictConfig, point: Mapping[str, Any], field: str = "tune.space") -> None:
    """The candidate's fields exist, take its values and validate; else one ConfigError naming the field
    (`field`: where the point comes from, tune.space or study.space)."""
    for key in point:
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"{field}.{key}: no such config field")
    trial_cfg = copy.deepcopy(cfg)
    for key, value in point.items():
        try:
            OmegaConf.update(trial_cfg, key, value, merge=False)
        except Exception as exc:
            raise ConfigError(f"{field}.{key}: {value!r}: {str(exc).splitlines()[0]}") from None
    try:
        validate(trial_cfg)
    except ConfigError as exc:
        raise ConfigError(f"{field}: candidate {fmt_params(point)}: {exc}") from None


def check_space(cfg: DictConfig, points: list[dict[str, Any]]) -> None:
    """Every field exists and every candidate validates, before any training."""
    for point in points:
        check_point(cfg, point)


def hydra_value(value: Any) -> str:
    """A value as a Hydra override literal."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    if text and all(c.isalnum() or c in "_-./+:" for c in text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def fmt_params(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={hydra_value(v)}" for k, v in params.items())
