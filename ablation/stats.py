"""Statistics over runs, read from cell records: trajectories, budgets, endpoints, bands."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .bootstrap import bootstrap_mean, bootstrap_runs
from .evaluation import PAIR_METRICS, RUN_METRICS
from .metrics import pair_matrices
from .records import square

TRUNK_METRICS = ("mean_min", "hungarian", "matched_share")  # measured at every trunk snapshot


def cell_trajectory(record: dict) -> dict[str, np.ndarray]:
    """A cell's trunk as its record holds it: tokens and the run-by-run matrices of every cosine
    metric at each snapshot (snapshots x runs x runs)."""
    p = record["payload"]
    n = p["n_runs"]
    return {"tokens": np.asarray(p["trunk"]["tokens"]),
            **{m: np.stack([square(t, n) for t in p["trunk"][m]]) for m in TRUNK_METRICS}}


def cell_budgets(record: dict, reading: str = "branch") -> list[dict]:
    """A cell at every budget, ascending, read after its cooldown ('branch') or on its trunk
    ('trunk'): {'tokens', 'pairs': {metric: runs x runs}, 'runs': {metric: per-run values}}."""
    p = record["payload"]
    n = p["n_runs"]
    return [{"tokens": t, "pairs": {m: square(e["pairs"][m], n) for m in PAIR_METRICS},
             "runs": {m: np.asarray(e["runs"][m], dtype=float) for m in RUN_METRICS}}
            for t, e in zip(p["budgets"], p[f"{reading}_at_budget"])]


def trajectory_curves(traj: dict, n_boot: int, seed: int) -> list[dict]:
    """Mean and 95% bootstrap band over runs of each cell's distance at each trunk snapshot."""
    return [{"configuration": name, "preprocessing": prep, "metric": metric, "tokens": int(t),
             **dict(zip(("mean", "lo", "hi"), bootstrap_runs(m, n_boot, seed)))}
            for (name, prep), tr in traj.items() for metric in ("mean_min", "hungarian")
            for t, m in zip(tr["tokens"], tr[metric])]


def budget_curves(budgets: dict, n_boot: int, seed: int) -> list[dict]:
    """Mean and 95% band over runs of each cell's Hungarian distance at each budget, after the
    cooldown and on the trunk (``budgets``: cell -> reading -> cell_budgets)."""
    return [{"configuration": name, "preprocessing": prep, "reading": reading, "tokens": int(b["tokens"]),
             **dict(zip(("mean", "lo", "hi"), bootstrap_runs(b["pairs"]["hungarian"], n_boot, seed)))}
            for (name, prep), readings in budgets.items() for reading, rows in readings.items() for b in rows]


def chance_levels(traj: dict, shape: tuple[int, int, int], preprocessing: Sequence[str],
                  seed: int) -> dict[tuple[str, str, str], float]:
    """Two references per preprocessing and metric: independent random Gaussian dictionaries of
    the grid's shape (runs, atoms, d), and the reproducibility of k-means across seeds on the same
    data (the step-0 dictionaries of ra-kmeans-independent, when that cell exists)."""
    rand = pair_matrices(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))
    out = {}
    for prep in preprocessing:
        for metric in ("mean_min", "hungarian"):
            out[prep, metric, "random"] = float(np.nanmean(rand[metric]))
            if ("ra-kmeans-independent", prep) in traj:
                out[prep, metric, "kmeans"] = float(np.nanmean(traj["ra-kmeans-independent", prep][metric][0]))
    return out


def endpoint_summary(end: dict, n_boot: int, seed: int) -> dict[str, tuple[float, float, float]]:
    """Every number of a cell at one budget as (mean, lo, hi) over runs: the run-pair metrics and
    the per-run ones (``end``: one entry of cell_budgets)."""
    return {**{m: bootstrap_runs(v, n_boot, seed) for m, v in end["pairs"].items()},
            **{m: bootstrap_mean(v, n_boot, seed) for m, v in end["runs"].items()}}


def stability_table(traj: dict, ends: dict, n_boot: int, seed: int) -> dict[tuple[str, str], dict]:
    """Per cell: Hungarian distance at step 0, at the trunk's peak and at the end (``ends``: the
    run-by-run matrix at the largest budget), and end minus step 0. A cell whose runs start
    identical (distance 0) can only inherit its agreement; one that does not stabilizes if the
    interval of end minus step 0 lies below 0."""
    out = {}
    for key, tr in traj.items():
        m, end = tr["hungarian"], ends[key]
        start, peak, last = (float(np.nanmean(v)) for v in
                             (m[0], m[np.nanargmax(np.nanmean(m, (1, 2)))], end))
        diff, lo, hi = bootstrap_runs(end - m[0], n_boot, seed)
        out[key] = {"step0": start, "peak": peak, "end": last, "end_minus_step0": diff, "lo": lo,
                    "hi": hi, "shared_start": start < 1e-9, "stabilizes": bool(start > 1e-9 and hi < 0)}
    return out


def cell_summary(record: dict, found: str | None = None) -> dict:
    """A record as one row of notebook 02's table: the largest budget, the trunk's final training
    FVU, the clipped share, the absolute delta, whether it was reused (and from where) and the
    seconds its training took where it was made."""
    p, made = record["payload"], record["made"]
    return {"budget": p["budgets"][-1], "train_fvu_end": p["training_fvu"]["value"][-1],
            "clipped": float(np.mean(p["clipped"])), "delta": p["delta"], "reused": found is not None,
            "found": found, "train_seconds": made["seconds"]["train"], "made": made}
