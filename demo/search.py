"""Choosing a method's setting on the validation split: its grid, and the rule that grows it past an edge.

Every method gets a grid (config field -> candidate values) with the same number of combinations.
All of them are trained and scored on the validation split. If the best setting sits at the low or
high end of a numeric axis, that axis grows by one rung in that direction, and the new
combinations (the new value crossed with every value of the other axes) are trained too; this
repeats until the best setting is inside the grid on every numeric axis, or `max_extensions`
rungs have been added. The rung continues the ladder: past the top, `top * top / second`; below
the bottom, `bottom * bottom / second` (rounded to 3 significant digits), so a 1-3-10 ladder goes
on to 30 or down to 0.3. Axes of one value, of non-numeric values or of values <= 0 never grow.
The rule is the same for every method; how often it fired, and whether the final choice still
sits at an edge (the cap was reached), is reported.

    result = search({"learning_rate": [1e-3, 3e-3, 1e-2], "gamma": [1, 10, 100]}, score, max_extensions=2)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Setting = dict[str, Any]


def candidates(grid: dict[str, list[Any]]) -> list[Setting]:
    """Every combination of the grid, in `itertools.product` order (the config's order)."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def extendable(values: list[Any]) -> bool:
    """Whether an axis can grow: at least two distinct numbers, all > 0 (a ladder)."""
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return len(numbers) == len(values) and len(set(values)) >= 2 and min(numbers) > 0


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def next_rung(values: list[float], direction: str) -> float:
    """The value one rung past the `direction` ("up" or "down") end of a ladder."""
    ordered = sorted(set(values))
    if direction == "up":
        return _round(ordered[-1] * ordered[-1] / ordered[-2])
    if direction == "down":
        return _round(ordered[0] * ordered[0] / ordered[1])
    raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")


def edges(grid: dict[str, list[Any]], best: Setting) -> list[tuple[str, str]]:
    """(axis, direction) for every growable axis whose best value is at its low or high end."""
    found = []
    for axis, values in grid.items():
        if not extendable(values):
            continue
        if best[axis] == max(values):
            found.append((axis, "up"))
        elif best[axis] == min(values):
            found.append((axis, "down"))
    return found


@dataclass
class SearchResult:
    best: Setting
    best_score: float
    tried: list[tuple[Setting, float]]  # in the order trained
    grid: dict[str, list[Any]]  # the final grid, extensions included
    extensions: list[dict[str, Any]] = field(default_factory=list)  # {"axis", "direction", "value"} in order
    at_edge: list[tuple[str, str]] = field(default_factory=list)  # edges the final choice still sits on

    def record(self) -> dict[str, Any]:
        """A JSON-ready summary (results.json's "search")."""
        return {
            "settings_tried": len(self.tried),
            "extensions": self.extensions,
            "still_at_edge": [f"{axis} {direction}" for axis, direction in self.at_edge],
            "final_grid": self.grid,
        }


def search(
    grid: dict[str, list[Any]],
    score: Callable[[Setting], float],
    max_extensions: int = 0,
    on_new: Callable[[int], None] | None = None,
) -> SearchResult:
    """Score every setting of `grid`, then grow it past the edges the best one sits on (see the module
    docstring) up to `max_extensions` rungs in all. Ties go to the setting trained first.

    `score(setting)` trains and validates one setting; `on_new(n)` is told when n more settings are
    queued (for a progress bar).
    """
    grid = {k: list(v) for k, v in grid.items()}
    tried: list[tuple[Setting, float]] = []
    seen: list[Setting] = []

    def run(settings: list[Setting]) -> None:
        settings = [s for s in settings if s not in seen]
        if on_new and settings:
            on_new(len(settings))
        for setting in settings:
            seen.append(setting)
            tried.append((setting, score(setting)))

    run(candidates(grid))
    extensions: list[dict[str, Any]] = []
    while True:
        best, _ = max(tried, key=lambda t: t[1])
        found = edges(grid, best)
        if not found or len(extensions) >= max_extensions:
            break
        for axis, direction in found[: max_extensions - len(extensions)]:
            value = next_rung(grid[axis], direction)
            grid[axis] = [value, *grid[axis]] if direction == "down" else [*grid[axis], value]
            extensions.append({"axis": axis, "direction": direction, "value": value})
        run(candidates(grid))
    best, best_score = max(tried, key=lambda t: t[1])
    return SearchResult(best, best_score, tried, grid, extensions, edges(grid, best))
