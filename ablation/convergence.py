"""When a cell has stopped moving: the snapshot plan and the slope criterion at the full rate.

A learning rate that falls to 0 stops every trajectory, converged or not, so the criterion reads
only snapshots taken at the full rate: the slope of each run pair's Hungarian distance per
doubling of tokens, fitted by least squares over a doubling (several snapshots, so that jitter
between two of them cannot decide it), with a 95% bootstrap interval over runs. A cell has
converged when that whole interval lies within +-tolerance over each of the last two doublings:
a trajectory that rises and then turns has zero slope at its peak, and one window can call that
turning point converged; two consecutive windows cannot.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .bootstrap import bootstrap_runs


def full_rate_steps(min_steps: int, max_steps: int, n_log: int, per_doubling: int) -> list[int]:
    """Snapshot steps at the full rate: 0, n_log log-spaced steps up to min_steps / 4 (dense
    early), then per_doubling steps per doubling from min_steps / 4 on (dense late, so that the two
    doublings the criterion reads are dense at the first judgement), up to max_steps."""
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps={min_steps} <= max_steps={max_steps}")
    if per_doubling < 2:
        raise ValueError(f"per_doubling={per_doubling} must be >= 2 (a slope needs several snapshots)")
    early = np.geomspace(1, max(min_steps / 4, 1), n_log) if n_log > 0 else []
    late, i = [], -2 * per_doubling
    while (s := min_steps * 2 ** (i / per_doubling)) < max_steps:
        late.append(s)
        i += 1
    steps = {0, min_steps, max_steps, *(int(round(s)) for s in (*early, *late))}
    return sorted(s for s in steps if s <= max_steps)


def decay_steps(full_steps: int, lr_decay: float) -> int:
    """Steps of the final decay after full_steps at the full rate, so that the decay is the last
    ``lr_decay`` share of all steps (0: none)."""
    if not 0 <= lr_decay < 1:
        raise ValueError(f"lr_decay={lr_decay} must be in [0, 1) when training until converged")
    return int(round(full_steps * lr_decay / (1 - lr_decay)))


def at_full_rate(lrs: Sequence[float]) -> np.ndarray:
    """Which snapshots were taken at the full learning rate (the largest of a cell's rates)."""
    lrs = np.asarray(lrs, dtype=float)
    return lrs == lrs.max()


def slope_per_doubling(m: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    """Least-squares slope of each run pair's distance against log2(tokens): a pair matrix
    (NaN diagonal) from a trajectory of run-by-run matrices (snapshots x runs x runs)."""
    t = np.log2(np.asarray(tokens, dtype=float))
    t = t - t.mean()
    return np.tensordot(t, m - m.mean(0), axes=(0, 0)) / float(t @ t)


def _window_slope(m: np.ndarray, tokens: np.ndarray, lo: float, hi: float, n_boot: int,
                  seed: int) -> tuple[float, float, float, int]:
    """Slope per doubling over the snapshots with tokens in [lo, hi], its 95% interval over runs,
    and how many snapshots it rests on."""
    window = (tokens >= lo) & (tokens <= hi)
    return (*bootstrap_runs(slope_per_doubling(m[window], tokens[window]), n_boot, seed),
            int(window.sum()))


def convergence(m: np.ndarray, tokens: Sequence[int], lrs: Sequence[float], tolerance: float,
                min_points: int = 4, n_boot: int = 2000, seed: int = 0) -> dict:
    """Has a trajectory (snapshots x runs x runs) stopped moving at the full learning rate?

    Only the snapshots taken at the full rate (``lrs`` at its maximum) count; up to the last of
    them, T tokens, the slope per doubling of tokens is fitted over the last doubling (tokens in
    [T/2, T]) and over the doubling before it ([T/4, T/2]). Converged when both 95% intervals
    over runs lie within +-tolerance; with fewer than min_points snapshots in either window it
    is not judged (False)."""
    full = at_full_rate(lrs)
    m, tokens = np.asarray(m)[full], np.asarray(tokens, dtype=float)[full]
    end = tokens[-1]
    record = {"tokens": int(end), "from_tokens": int(end // 2), "lr": float(max(lrs)),
              "tolerance": tolerance}
    nan = float("nan")
    if end <= 0 or min(((tokens >= end / 2) & (tokens <= end)).sum(),
                       ((tokens >= end / 4) & (tokens <= end / 2)).sum()) < min_points:
        return {**record, "n_snapshots": int((tokens >= end / 2).sum()), "slope": nan, "lo": nan,
                "hi": nan, "slope_before": nan, "lo_before": nan, "hi_before": nan,
                "converged": False}
    slope, lo, hi, n = _window_slope(m, tokens, end / 2, end, n_boot, seed)
    before, lo_b, hi_b, _ = _window_slope(m, tokens, end / 4, end / 2, n_boot, seed)
    within = lambda a, b: -tolerance <= a and b <= tolerance  # noqa: E731
    return {**record, "n_snapshots": n, "slope": slope, "lo": lo, "hi": hi, "slope_before": before,
            "lo_before": lo_b, "hi_before": hi_b, "converged": bool(within(lo, hi) and within(lo_b, hi_b))}


def convergence_row(record: dict) -> dict:
    """A cell's convergence record as one row of a table."""
    return {"converged": record["converged"], "full-rate tokens": record["full_rate_tokens"],
            "slope per doubling": f"{record['slope']:+.4f} [{record['lo']:+.4f}, {record['hi']:+.4f}]",
            "the doubling before": f"{record['slope_before']:+.4f} [{record['lo_before']:+.4f}, "
                                   f"{record['hi_before']:+.4f}]",
            "decay tokens": record["decay_tokens"], "tokens trained": record["tokens_trained"]}
