"""Statistics over runs on known cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ablation import bootstrap, metrics, stats
from conftest import random_dict, pair_matrix


def test_pair_matrices_agree_with_the_single_pair_metrics():
    dicts = torch.stack([random_dict(20, 6, s) for s in range(3)])
    m = metrics.pair_matrices(dicts)
    assert np.isnan(m["hungarian"][0, 0]) and m["hungarian"][0, 1] == m["hungarian"][1, 0]
    assert m["mean_min"][0, 2] == pytest.approx(metrics.mean_min_cosine_distance(dicts[0], dicts[2]))
    assert m["hungarian"][1, 2] == pytest.approx(metrics.hungarian_cosine_distance(dicts[1], dicts[2]))
    assert m["matched_share"][0, 1] == pytest.approx(metrics.matched_share(dicts[0], dicts[1]))
    same = metrics.pair_matrices(torch.stack([dicts[0]] * 3))
    assert np.nanmax(np.abs(same["hungarian"])) < 1e-12  # identical runs: distance 0


def test_bootstrap_over_runs_brackets_the_mean_and_detects_a_difference():
    rng = np.random.default_rng(0)
    m = rng.normal(0.5, 0.01, (6, 6))
    m = (m + m.T) / 2
    np.fill_diagonal(m, np.nan)
    mean, lo, hi = bootstrap.bootstrap_runs(m, 500, 0)
    assert lo <= mean <= hi and hi - lo < 0.05
    assert mean == pytest.approx(np.nanmean(m))
    diff, lo, hi = bootstrap.bootstrap_runs(m, 500, 0, other=m + 0.2)
    assert diff == pytest.approx(-0.2) and hi < 0
    v = bootstrap.bootstrap_mean([1.0, 2.0, 3.0], 500, 0)
    assert v[0] == 2.0 and 1.0 <= v[1] < 2.0 < v[2] <= 3.0


def test_stability_table_tells_shared_starts_from_stabilizing_ones():
    shared = np.stack([pair_matrix(np.zeros(3)), pair_matrix(np.full(3, 0.08))])
    falls = np.stack([pair_matrix(np.full(3, 0.3)), pair_matrix(np.full(3, 0.4))])  # peaks, then falls
    ends = {("a", "raw"): pair_matrix(np.full(3, 0.05)), ("b", "raw"): pair_matrix(np.full(3, 0.1))}
    tab = stats.stability_table({("a", "raw"): {"hungarian": shared}, ("b", "raw"): {"hungarian": falls}},
                                ends, 200, 0)
    assert tab["b", "raw"]["peak"] == pytest.approx(0.8) and tab["b", "raw"]["end"] == pytest.approx(0.2)
    assert tab["a", "raw"]["shared_start"] and not tab["a", "raw"]["stabilizes"]
    assert tab["b", "raw"]["stabilizes"] and tab["b", "raw"]["end_minus_step0"] == pytest.approx(-0.4)
