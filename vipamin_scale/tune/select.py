"""One selection over a grid with edge rounds: the rule every search of the project uses (`tune`, a study's
lr per cell, the linear probe's C).

    sel = Selection(space, extend_edges)            # the grid's points (space.candidates), all to score
    while todo := sel.pending():                     # candidates to score now (indices into sel.points)
        for c in todo:
            sel.record(c, score_of(sel.points[c]))   # None: failed (any draw of it failed)
        sel.advance()                                # an edge round, when the winner sits at an edge
    sel.winner(), sel.at_edge()

Rules. The winner has the best score among the candidates in the pool (the grid, or with `pool` the ones a
halving search scored at its full budget, then every candidate an edge round added); ties go to the earlier
candidate (grid product order; an edge round's candidates come after the grid's); a failed candidate (None,
NaN) never wins (`halving.promote`). Edges: once every pooled candidate is scored, when the winner sits at
the smallest or largest value of a log/range leaf (`space.edges`), that leaf gets the value one grid step
beyond (`space.step_beyond`), with the winner's other values, as a new candidate; `check(point)` may refuse
it (a ConfigError, e.g. init.lam beyond 1: the edge is the field's bound), which is recorded. At most
`extend_edges` rounds (the config field that set it: `rounds_field`). A winner still at an edge afterwards (or at the edge of a list leaf, which has no
step) is reported by `at_edge`, with why.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from vipamin_scale.config import ConfigError
from vipamin_scale.tune.halving import promote
from vipamin_scale.tune.space import candidates, edges, grid_leaves, parse_space, step_beyond

Point = dict[str, Any]


class Selection:
    """The state of one selection (module docstring): points, their scores, the edge rounds taken."""

    def __init__(self, space: Mapping[str, Any], extend_edges: int, points: Optional[Sequence[Point]] = None,
                 pool: Optional[Sequence[int]] = None, check: Optional[Callable[[Point], None]] = None,
                 rounds_field: str = "tune.extend_edges"):
        self.space, self.max_rounds, self.check, self.rounds_field = space, extend_edges, check, rounds_field
        self.points: list[Point] = [dict(p) for p in (candidates(space) if points is None else points)]
        self.pool: list[int] = list(range(len(self.points)) if pool is None else pool)
        self.scores: dict[int, Optional[float]] = {}
        self.leaves = grid_leaves(space)
        self.rounds = 0
        self.extensions: list[dict[str, Any]] = []  # every edge step taken or refused, in order
        self._times = {(key, side): 0 for key in self.leaves for side in ("low", "high")}

    def pending(self) -> list[int]:
        """The pooled candidates not scored yet."""
        return [c for c in self.pool if c not in self.scores]

    def record(self, candidate: int, score: Optional[float]) -> None:
        self.scores[candidate] = score

    def winner(self) -> Optional[int]:
        """The best scored candidate of the pool (ties: the earlier); None when every one failed."""
        order = sorted(c for c in self.pool if c in self.scores)
        best = promote([self.scores[c] for c in order], 1)
        return order[best[0]] if best else None

    def values(self) -> dict[str, list[Any]]:
        """Every leaf's values: the grid's, and the values edge rounds added."""
        values = {key: list(vals) for key, vals in parse_space(self.space)}
        for p in self.points:
            for key, v in p.items():
                if v not in values.setdefault(key, []):
                    values[key].append(v)
        return values

    def advance(self) -> list[int]:
        """After every pooled candidate is scored: the next edge round's new candidates (added to the points
        and the pool; [] when the selection is over)."""
        if self.pending():
            raise RuntimeError("Selection.advance: candidates are still unscored")
        winner = self.winner()
        if winner is None or self.rounds >= self.max_rounds:
            return []
        new = []
        for key, side in edges(self.points[winner], self.values()):
            if key not in self.leaves:
                continue
            value = step_beyond(self.leaves[key], side, self._times[(key, side)] + 1)
            point = {**self.points[winner], key: value}
            step = {"round": self.rounds + 1, "field": key, "side": side, "value": value}
            try:
                if self.check is not None:
                    self.check(point)
            except ConfigError as exc:
                self.extensions.append({**step, "candidate": None, "refused": str(exc)})
                continue
            self._times[(key, side)] += 1
            self.points.append(point)
            self.pool.append(len(self.points) - 1)
            new.append(len(self.points) - 1)
            self.extensions.append({**step, "candidate": new[-1]})
        if new:
            self.rounds += 1
        return new

    def at_edge(self) -> list[dict[str, Any]]:
        """Where the winner still sits at an edge, and why it was not extended further."""
        winner = self.winner()
        if winner is None:
            return []
        out = []
        for key, side in edges(self.points[winner], self.values()):
            refused = next((x["refused"] for x in reversed(self.extensions)
                            if x["field"] == key and x["side"] == side and x.get("refused")), None)
            why = ("a list leaf has no grid step" if key not in self.leaves else refused or
                   f"{self.rounds_field}={self.max_rounds} rounds")
            out.append({"field": key, "side": side, "value": self.points[winner][key], "why": why})
        return out
