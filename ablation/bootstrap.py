"""Bootstrap intervals over runs: pair matrices resample runs, not pairs."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _pair_mean(m: np.ndarray, idx: np.ndarray) -> float:
    """Mean of m over pairs of distinct runs among the (resampled) run indices idx."""
    sub = m[np.ix_(idx, idx)]
    keep = idx[:, None] != idx[None, :]
    return float(np.nanmean(sub[keep])) if keep.any() else float("nan")


def bootstrap_runs(m: np.ndarray, n_boot: int = 2000, seed: int = 0,
                   other: np.ndarray | None = None) -> tuple[float, float, float]:
    """Mean over run pairs of a pair matrix with a 95% bootstrap interval over runs.

    Runs (not pairs) are resampled, since pairs that share a run are not independent. With
    ``other``, the statistic is mean(m) - mean(other), each resampled independently.
    """
    rng = np.random.default_rng(seed)
    stat = lambda ia, ib: _pair_mean(m, ia) - (0.0 if other is None else _pair_mean(other, ib))
    full = stat(np.arange(len(m)), np.arange(len(other) if other is not None else 1))
    boots = [stat(rng.integers(0, len(m), len(m)),
                  rng.integers(0, len(other), len(other)) if other is not None else None)
             for _ in range(n_boot)]
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    return full, float(lo), float(hi)


def bootstrap_mean(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-run values with a 95% bootstrap interval over runs."""
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    boots = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(v.mean()), float(lo), float(hi)
