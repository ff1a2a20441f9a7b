"""Trust, but verify: retrain committed cells from scratch and set each number beside its record
and beside the spread of a second seed set (``make verify``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .configs import COMPARISONS
from .records import read_record, record_path, square

def _budget_hungarian(record: dict, i: int) -> np.ndarray:
    """The run-by-run Hungarian matrix of a record at budget i, after the cooldown."""
    return square(record["payload"]["branch_at_budget"][i]["pairs"]["hungarian"], record["payload"]["n_runs"])


def seed_set_spread(m: np.ndarray) -> float | None:
    """How far a second seed set moves a cell's mean distance: the first half of its runs against
    the second (None with fewer than four runs)."""
    n = len(m) // 2
    return None if n < 2 else abs(float(np.nanmean(m[:n, :n]) - np.nanmean(m[n:, n:])))


def cheapest_pair(cells_dir: str | os.PathLike, preprocessing: Sequence[str]) -> list[tuple[str, str]]:
    """The two cells of the comparison that decides a verdict at the least recorded training
    cost: among ``configs.COMPARISONS`` whose two records exist in cells_dir."""
    best, cost = None, float("inf")
    for _, c, ref in COMPARISONS:
        for prep in preprocessing:
            found = [read_record(record_path(cells_dir, n, prep)) for n in (c, ref)]
            if all(found):
                seconds = sum(r["made"]["seconds"]["train"] for r in found)
                if seconds < cost:
                    best, cost = [(c, prep), (ref, prep)], seconds
    if best is None:
        raise FileNotFoundError(f"no comparison has both its records in {cells_dir}: render the profile first")
    return best


def compare(committed: dict, fresh: dict) -> list[dict]:
    """Per budget: the committed and the retrained mean Hungarian distance, their difference, and
    the spread of a second seed set in the committed record."""
    rows = []
    for i, tokens in enumerate(committed["payload"]["budgets"]):
        a, b = _budget_hungarian(committed, i), _budget_hungarian(fresh, i)
        rows.append({"tokens": tokens, "committed": float(np.nanmean(a)), "retrained": float(np.nanmean(b)),
                     "difference": float(np.nanmean(b) - np.nanmean(a)), "seed_set_spread": seed_set_spread(a)})
    return rows


def pair_difference(committed: Sequence[dict], fresh: Sequence[dict]) -> dict:
    """The pair's difference (first cell minus second) at the largest budget, committed and
    retrained, beside how far a second seed set moves that difference in the committed records."""
    def diff(a: dict, b: dict, half: slice | None = None) -> float:
        x, y = _budget_hungarian(a, -1), _budget_hungarian(b, -1)
        if half is not None:
            x, y = x[half, half], y[half, half]
        return float(np.nanmean(x) - np.nanmean(y))

    n = committed[0]["payload"]["n_runs"] // 2
    spread = abs(diff(*committed, slice(0, n)) - diff(*committed, slice(n, None))) if n >= 2 else None
    return {"committed": diff(*committed), "retrained": diff(*fresh), "seed_set_spread": spread}


def report_lines(name: str, prep: str, rows: Sequence[dict], made: dict) -> list[str]:
    """What ``make verify`` prints for one cell."""
    lines = [f"{name} / {prep} (committed by {made['commit']} on {made['machine']}, {made['date'][:10]}):",
             f"  {'budget':>12}  {'committed':>9}  {'retrained':>9}  {'difference':>10}  {'seed-set spread':>15}"]
    for r in rows:
        spread = "-" if r["seed_set_spread"] is None else f"{r['seed_set_spread']:.4f}"
        lines.append(f"  {r['tokens']:>12,}  {r['committed']:>9.4f}  {r['retrained']:>9.4f}  "
                     f"{r['difference']:>+10.4f}  {spread:>15}")
    return lines
