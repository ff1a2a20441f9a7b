"""Statistics over runs: pair matrices, bootstrap intervals, trajectories, endpoints."""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .configs import CONFIGURATIONS
from .grid import sae_from_state
from .metrics import (
    _matched_cosines, _mean_min, dead_fraction, fvu, hungarian_l2_distance, l0,
    matched_activation_correlation,
)
from .sae import unit_rows


def even_subset(n: int, k: int) -> list[int]:
    """At most k evenly spaced indices of range(n), first and last included (all when k <= 0)."""
    if k <= 0 or k >= n:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, max(k, 2))})


def pair_matrices(dicts: torch.Tensor) -> dict[str, np.ndarray]:
    """Run-by-run matrices (NaN diagonal) of mean-min, Hungarian cosine distance and matched share.

    ``dicts`` is (n_runs, n_atoms, d); one cosine matrix per pair serves all three metrics.
    """
    s = len(dicts)
    out = {m: np.full((s, s), np.nan) for m in ("mean_min", "hungarian", "matched_share")}
    unit = unit_rows(torch.as_tensor(dicts).double())
    for i, j in itertools.combinations(range(s), 2):
        cos = unit[i] @ unit[j].T
        matched = _matched_cosines(cos)
        for name, v in (("mean_min", _mean_min(cos)), ("hungarian", float((1 - matched).mean())),
                        ("matched_share", float((matched >= 0.7).double().mean()))):
            out[name][i, j] = out[name][j, i] = v
    return out


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


def cell_trajectory(cell: dict, keep: Sequence[int]) -> dict[str, np.ndarray]:
    """Run-by-run matrices of the cosine metrics at the kept snapshots: (snapshots, runs, runs)."""
    mats = [pair_matrices(d) for d in tqdm(cell["dictionaries"][list(keep)], desc="snapshots",
                                           leave=False)]
    return {m: np.stack([x[m] for x in mats]) for m in mats[0]}


@torch.no_grad()
def cell_endpoint(cell: dict, x_eval: torch.Tensor, name: str) -> dict:
    """Held-out reconstruction (FVU, L0, dead share per run) and the geometry-free run-by-run
    matrices (Hungarian-matched L2 distance, activation correlation) at the end of training."""
    decoder = CONFIGURATIONS[name][2]
    xe = x_eval - cell["mean"] if cell["meta"]["preprocessing"] == "centered" else x_eval
    codes, per_run = [], {"fvu": [], "l0": [], "dead_fraction": []}
    for state in cell["state_dicts"]:
        x_hat, z = sae_from_state(state, cell["meta"], decoder)(xe)
        codes.append(z)
        for metric, fn in (("fvu", lambda: fvu(xe, x_hat)), ("l0", lambda: l0(z)),
                           ("dead_fraction", lambda: dead_fraction(z))):
            per_run[metric].append(fn())
    final, n = cell["dictionaries"][-1], len(codes)
    mats = {m: np.full((n, n), np.nan) for m in ("hungarian_l2", "activation_corr")}
    for i, j in itertools.combinations(range(n), 2):
        mats["hungarian_l2"][i, j] = mats["hungarian_l2"][j, i] = hungarian_l2_distance(final[i], final[j])
        mats["activation_corr"][i, j] = mats["activation_corr"][j, i] = \
            matched_activation_correlation(codes[i], codes[j])
    return {"per_run": per_run, "matrices": mats}


def trajectory_curves(traj: dict, tokens: Sequence[int], n_boot: int, seed: int) -> list[dict]:
    """Mean and 95% bootstrap band over runs of each cell's distance at every measured snapshot."""
    return [{"configuration": name, "preprocessing": prep, "metric": metric, "tokens": int(t),
             **dict(zip(("mean", "lo", "hi"), bootstrap_runs(m, n_boot, seed)))}
            for (name, prep), tr in traj.items() for metric in ("mean_min", "hungarian")
            for t, m in zip(tokens, tr[metric])]


def chance_levels(traj: dict, shape: tuple[int, int, int], preprocessing: Sequence[str],
                  seed: int) -> dict[tuple[str, str, str], float]:
    """Two references per preprocessing and metric: independent random Gaussian dictionaries of
    the grid's shape (runs, atoms, d), and independent k-means runs on the same data (the step-0
    dictionaries of ra-kmeans-independent, when that cell exists)."""
    rand = pair_matrices(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))
    out = {}
    for prep in preprocessing:
        for metric in ("mean_min", "hungarian"):
            out[prep, metric, "random"] = float(np.nanmean(rand[metric]))
            if ("ra-kmeans-independent", prep) in traj:
                out[prep, metric, "kmeans"] = float(np.nanmean(traj["ra-kmeans-independent", prep][metric][0]))
    return out


def endpoint_summary(traj_end: dict[str, np.ndarray], endpoint: dict, n_boot: int,
                     seed: int) -> dict[str, tuple[float, float, float]]:
    """Every endpoint metric of a cell as (mean, lo, hi) over runs: the run-pair metrics
    (cosine metrics at the last snapshot, L2, activation correlation) and the per-run ones."""
    mats = {**traj_end, **endpoint["matrices"]}
    return {**{m: bootstrap_runs(v, n_boot, seed) for m, v in mats.items()},
            **{m: bootstrap_mean(v, n_boot, seed) for m, v in endpoint["per_run"].items()}}


def stability_table(traj: dict, n_boot: int, seed: int) -> dict[tuple[str, str], dict]:
    """Per cell: Hungarian distance at step 0, at its peak and at the end, and end minus step 0.
    A cell whose runs start identical (distance 0) can only inherit its agreement; one that does
    not stabilizes if the interval of end minus step 0 lies below 0."""
    out = {}
    for key, tr in traj.items():
        m = tr["hungarian"]
        start, peak, end = (float(np.nanmean(v)) for v in
                            (m[0], m[np.nanargmax(np.nanmean(m, (1, 2)))], m[-1]))
        diff, lo, hi = bootstrap_runs(m[-1] - m[0], n_boot, seed)
        out[key] = {"step0": start, "peak": peak, "end": end, "end_minus_step0": diff, "lo": lo,
                    "hi": hi, "shared_start": start < 1e-9, "stabilizes": bool(start > 1e-9 and hi < 0)}
    return out
