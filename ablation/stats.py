"""Statistics over runs: pair matrices, bootstrap intervals, trajectories, endpoints."""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch

from .configs import CONFIGURATIONS
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
    training activations too) and the geometry-free run-by-run matrices (Hungarian-matched L2
    distance, activation correlation) at the end of training."""
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
    mats = {m: np.full((n, n), np.nan) for m in ("hungarian_l2", "activation_corr")}
    for i, j in itertools.combinations(range(n), 2):
        mats["hungarian_l2"][i, j] = mats["hungarian_l2"][j, i] = hungarian_l2_distance(final[i], final[j])
        mats["activation_corr"][i, j] = mats["activation_corr"][j, i] = \
            matched_activation_correlation(codes[i], codes[j])
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
