"""Statistics over runs: pair matrices, bootstrap intervals, trajectories, endpoints."""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch

from .configs import CONFIGURATIONS
from .convergence import at_full_rate
from .grid import sae_from_state
from .bootstrap import bootstrap_mean, bootstrap_runs
from .metrics import (
    dead_fraction, fvu, hungarian_l2_distance, l0, matched_activation_correlation, pair_matrices,
)


def cell_trajectory(cell: dict) -> dict[str, np.ndarray]:
    """A cell's snapshots as notebook 02 measured them: tokens, learning rate, and the run-by-run
    matrices of every cosine metric (snapshots x runs x runs)."""
    return {"tokens": np.asarray(cell["tokens"]), "lr": np.asarray(cell["lr"]),
            **{m: np.asarray(v) for m, v in cell["distances"].items()}}


@torch.no_grad()
def cell_endpoint(cell: dict, x_eval: torch.Tensor, name: str,
                  x_train: torch.Tensor | None = None) -> dict:
    """Held-out reconstruction (FVU, L0, dead share per run; with x_train, the FVU on those
    training activations too) and the geometry-free run-by-run matrices at the end of training:
    Hungarian-matched L2 distance, the activation correlation of matched latents alive in both
    runs, the same over all latents (dead ones count 0), and the pair's mean dead share."""
    decoder = CONFIGURATIONS[name][2]
    shift = cell["mean"] if cell["meta"]["preprocessing"] == "centered" else 0
    xe = x_eval - shift
    codes, per_run = [], {"fvu": [], "l0": [], "dead_fraction": []}
    if x_train is not None:
        per_run["fvu_train"] = []
    for state in cell["state_dicts"]:
        sae = sae_from_state(state, cell["meta"], decoder)
        x_hat, z = sae(xe)
        codes.append(z)
        for metric, fn in (("fvu", lambda: fvu(xe, x_hat)), ("l0", lambda: l0(z)),
                           ("dead_fraction", lambda: dead_fraction(z))):
            per_run[metric].append(fn())
        if x_train is not None:
            per_run["fvu_train"].append(fvu(x_train - shift, sae(x_train - shift)[0]))
    final, n = cell["dictionaries"][-1], len(codes)
    pair = {"hungarian_l2": lambda a, b: hungarian_l2_distance(final[a], final[b]),
            "activation_corr": lambda a, b: matched_activation_correlation(codes[a], codes[b]),
            "activation_corr_all": lambda a, b: matched_activation_correlation(codes[a], codes[b],
                                                                               alive_only=False),
            # the share of each run's latents that the alive-only matching leaves out, averaged
            "dead_share": lambda a, b: (dead_fraction(codes[a]) + dead_fraction(codes[b])) / 2}
    mats = {m: np.full((n, n), np.nan) for m in pair}
    for i, j in itertools.combinations(range(n), 2):
        for m, fn in pair.items():
            mats[m][i, j] = mats[m][j, i] = fn(i, j)
    return {"per_run": per_run, "matrices": mats}


def trajectory_curves(traj: dict, n_boot: int, seed: int) -> list[dict]:
    """Mean and 95% bootstrap band over runs of each cell's distance at each of its snapshots."""
    return [{"configuration": name, "preprocessing": prep, "metric": metric, "tokens": int(t),
             "lr": float(lr), **dict(zip(("mean", "lo", "hi"), bootstrap_runs(m, n_boot, seed)))}
            for (name, prep), tr in traj.items() for metric in ("mean_min", "hungarian")
            for t, lr, m in zip(tr["tokens"], tr["lr"], tr[metric])]


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


def protocol_noise(traj: dict, tolerance: float) -> dict:
    """How far the protocol itself moves a cell's endpoint (Hungarian), the scale against which
    the margin is declared: the largest shift of the final decay (end against the last full-rate
    snapshot), the drift one more doubling may still bring at the convergence tolerance, and the
    largest shift between two disjoint seed sets (the first and second half of a cell's runs,
    each averaged over its own pairs; None with fewer than four runs), over the cells of ``traj``."""
    decay, halves = {}, {}
    for (name, prep), tr in traj.items():
        m, full = tr["hungarian"], np.flatnonzero(at_full_rate(tr["lr"]))
        decay[f"{name}__{prep}"] = abs(float(np.nanmean(m[-1]) - np.nanmean(m[full[-1]])))
        n = len(m[-1]) // 2
        if n >= 2:
            halves[f"{name}__{prep}"] = abs(float(np.nanmean(m[-1][:n, :n]) - np.nanmean(m[-1][n:, n:])))
    worst = lambda d: max(d.items(), key=lambda kv: kv[1]) if d else (None, None)  # noqa: E731
    return {"decay": dict(zip(("cell", "shift"), worst(decay))), "one_doubling": tolerance,
            "seed_sets": dict(zip(("cell", "shift"), worst(halves)))}
