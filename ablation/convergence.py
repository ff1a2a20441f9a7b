"""Is it still moving? A cell's slope over its last doubling (a diagnostic), and whether a
comparison's outcome is settled over the budgets (the rule the verdict uses).

A per-cell rule cannot decide a comparison: cells converge on different time scales, a trajectory
that rises and turns has zero slope at its peak, and a tolerance is a rate (moving just under it
for several doublings adds up). So the verdict judges the *difference* between two cells, at
equal budgets: settled at the largest budget when its outcome is the outcome one budget below,
it moved by less than the tolerance over that doubling, and moving as much again over one more
doubling would not change its outcome.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .bootstrap import bootstrap_runs


def slope_per_doubling(m: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    """Least-squares slope of each run pair's distance against log2(tokens): a pair matrix
    (NaN diagonal) from a trajectory of run-by-run matrices (snapshots x runs x runs)."""
    t = np.log2(np.asarray(tokens, dtype=float))
    t = t - t.mean()
    return np.tensordot(t, m - m.mean(0), axes=(0, 0)) / float(t @ t)


def last_doubling_slope(m: np.ndarray, tokens: Sequence[int], n_boot: int = 2000,
                        seed: int = 0) -> dict:
    """A cell's slope of the Hungarian distance per doubling of tokens over the trunk's last
    doubling (snapshots with tokens in [T/2, T]), with its 95% interval over runs: a diagnostic
    shown beside the cell, not a gate."""
    tokens = np.asarray(tokens, dtype=float)
    end = tokens[-1]
    window = (tokens >= end / 2) & (tokens <= end)
    slope, lo, hi = bootstrap_runs(slope_per_doubling(np.asarray(m)[window], tokens[window]), n_boot, seed)
    return {"from_tokens": int(end // 2), "tokens": int(end), "n_snapshots": int(window.sum()),
            "slope": slope, "lo": lo, "hi": hi}


def settled(rows: Sequence[dict], tolerance: float, decide) -> dict:
    """Whether a comparison's outcome is settled at the largest budget. ``rows`` are its rows at
    every budget, ascending (difference, lo, hi, outcome); ``decide(lo, hi)`` gives the outcome of
    an interval. Settled when the outcome equals the one a budget below, the difference moved by
    less than ``tolerance`` over that doubling, and the interval moved as much again would keep
    the outcome. Returns the flag, the move and the outcome after the projected move."""
    last = rows[-1]
    if len(rows) < 2:
        return {"settled": False, "moved": None, "projected_outcome": None,
                "why": "one budget only: nothing to compare with"}
    before = rows[-2]
    moved = last["difference"] - before["difference"]
    projected = decide(last["lo"] + moved, last["hi"] + moved)
    why = [w for w, bad in (
        (f"outcome changed from {before['outcome']!r} at the budget below", before["outcome"] != last["outcome"]),
        (f"moved {moved:+.3f} over the last doubling (tolerance {tolerance:g})", not abs(moved) < tolerance),
        (f"moving as much again would make it {projected!r}", projected != last["outcome"])) if bad]
    return {"settled": not why, "moved": float(moved), "projected_outcome": projected, "why": "; ".join(why)}
