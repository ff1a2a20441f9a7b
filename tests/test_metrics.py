"""Distances between dictionaries and reconstruction metrics, on known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ablation import grid, metrics, stats, synthetic
from conftest import random_dict


def test_distances_vanish_for_a_permuted_copy():
    a = random_dict(50, 16, 0)
    b = a[torch.randperm(50, generator=torch.Generator().manual_seed(1))] * 3.0  # scale too
    assert metrics.mean_min_cosine_distance(a, b) == pytest.approx(0, abs=1e-12)
    assert metrics.hungarian_cosine_distance(a, b) == pytest.approx(0, abs=1e-12)
    assert metrics.matched_share(a, b) == 1.0
    assert metrics.hungarian_l2_distance(a, a[torch.randperm(50)]) == pytest.approx(0, abs=1e-12)


def test_random_dictionaries_sit_at_the_chance_level():
    a, b = random_dict(64, 64, 0), random_dict(64, 64, 1)
    mm = metrics.mean_min_cosine_distance(a, b)
    hung = metrics.hungarian_cosine_distance(a, b)
    assert 0.6 < mm < 0.8
    assert mm + 0.01 < hung < 0.9  # one-to-one matching cannot pick the best partner twice
    assert metrics.matched_share(a, b) == 0.0


def test_hungarian_is_never_below_mean_min():
    for seed in range(5):
        a, b = random_dict(30, 8, seed), random_dict(30, 8, seed + 100)
        b[:10] = a[:10] + 0.1 * b[:10]
        assert metrics.hungarian_cosine_distance(a, b) >= metrics.mean_min_cosine_distance(a, b) - 1e-12


def test_zero_atoms_count_as_maximally_distant_without_nan():
    a = random_dict(10, 6, 0)
    b = a.clone()
    b[7:] = 0.0  # three atoms that never left zero
    assert metrics.hungarian_cosine_distance(a, b) == pytest.approx(0.3, abs=1e-12)  # 3 of 10 at distance 1
    m = metrics.pair_matrices(torch.stack([a, b]))
    assert all(np.isfinite(v[0, 1]) for v in m.values())
    assert m["matched_share"][0, 1] == pytest.approx(0.7)


def test_fvu_punishes_a_mean_only_reconstruction_that_scalar_r2_rewards():
    toy = synthetic.galaxy_toy_data(4096, 64, 60.0, seed=0)  # |mu| large against the spread
    mean_only = toy.mean(0).expand_as(toy)
    assert metrics.fvu(toy, mean_only) == pytest.approx(1.0, abs=1e-12)
    assert metrics.scalar_mean_r2(toy, mean_only) > 0.9
    assert metrics.fvu(toy, toy) == 0.0
    assert float(grid.fvu_of_mse(toy.var(0, unbiased=False).mean(), toy)) == pytest.approx(1.0, rel=1e-5)


def test_activation_correlation_of_permuted_codes_is_one():
    codes = torch.rand(500, 20) * (torch.rand(500, 20) < 0.3)
    assert metrics.matched_activation_correlation(codes, codes[:, torch.randperm(20)]) == \
        pytest.approx(1.0, abs=1e-6)  # float32 products
    other = torch.rand(500, 20) * (torch.rand(500, 20) < 0.3)
    assert abs(metrics.matched_activation_correlation(codes, other)) < 0.25


def test_l0_dead_fraction_and_pairwise():
    codes = torch.zeros(10, 8)
    codes[:, :3] = 1.0
    assert metrics.l0(codes) == 3.0
    assert metrics.dead_fraction(codes) == pytest.approx(5 / 8)
    m = metrics.pair_matrices(torch.stack([random_dict(10, 4, s) for s in range(5)]))
    assert np.isnan(np.diag(m["mean_min"])).all() and (m["mean_min"][~np.eye(5, dtype=bool)] > 0).all()


def test_activation_correlation_of_runs_that_differ_only_by_dead_latents_is_one():
    gen = torch.Generator().manual_seed(3)
    codes = torch.rand(300, 20, generator=gen) * (torch.rand(300, 20, generator=gen) < 0.2)
    other = codes[:, torch.randperm(20, generator=gen)].clone()
    other[:, :5] = 0  # five latents of the second run never fire
    assert metrics.matched_activation_correlation(codes, other) == pytest.approx(1.0)
    # counted as correlation 0, the dead latents pull the all-latent version down by 5 / 20
    assert metrics.matched_activation_correlation(codes, other, alive_only=False) == \
        pytest.approx(0.75, abs=1e-6)
    assert np.isnan(metrics.matched_activation_correlation(codes, torch.zeros(300, 20)))


def test_two_runs_identical_but_for_their_dead_atoms_are_zero_apart_over_alive_atoms():
    from ablation import evaluation, starts

    x = torch.randn(3000, 16) + 4.0
    a = starts.make_sae("topk", "random", x, 24, 3, seed=0)
    b = starts.make_sae("topk", "random", x, 24, 3, seed=0)
    with torch.no_grad():  # latents 20-23 can never fire; in b their atoms point elsewhere
        for m in (a, b):
            m.b_enc[20:] = -1e6
        b.W_dec[20:] = torch.randn(4, 16)
    out = evaluation.evaluate_runs([a, b], x, x, x.mean(0))
    assert out["runs"]["dead_fraction"][0] >= 4 / 24
    assert out["pairs"]["hungarian_alive"][0, 1] == pytest.approx(0.0, abs=1e-6)
    assert out["pairs"]["hungarian"][0, 1] > 0.01  # over all atoms the dead ones count
    assert out["pairs"]["activation_corr"][0, 1] == pytest.approx(1.0, abs=1e-5)
    for m in evaluation.PAIR_METRICS:
        assert out["pairs"][m].shape == (2, 2) and np.isnan(out["pairs"][m][0, 0]), m
