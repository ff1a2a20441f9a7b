"""Known-answer tests of the SAE core: metrics, models, initializations and the trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import helpers as h


def random_dict(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def toy() -> torch.Tensor:
    return h.galaxy_toy_data(4096, 64, 20.0, seed=0)


# ----------------------------------------------------------------------------- metrics


def test_distances_vanish_for_a_permuted_copy():
    a = random_dict(50, 16, 0)
    b = a[torch.randperm(50, generator=torch.Generator().manual_seed(1))] * 3.0  # scale too
    assert h.mean_min_cosine_distance(a, b) == pytest.approx(0, abs=1e-12)
    assert h.hungarian_cosine_distance(a, b) == pytest.approx(0, abs=1e-12)
    assert h.matched_share(a, b) == 1.0
    assert h.hungarian_l2_distance(a, a[torch.randperm(50)]) == pytest.approx(0, abs=1e-12)


def test_random_dictionaries_sit_at_the_chance_level():
    a, b = random_dict(64, 64, 0), random_dict(64, 64, 1)
    mm = h.mean_min_cosine_distance(a, b)
    hung = h.hungarian_cosine_distance(a, b)
    assert 0.6 < mm < 0.8
    assert mm + 0.01 < hung < 0.9  # one-to-one matching cannot pick the best partner twice
    assert h.matched_share(a, b) == 0.0


def test_hungarian_is_never_below_mean_min():
    for seed in range(5):
        a, b = random_dict(30, 8, seed), random_dict(30, 8, seed + 100)
        b[:10] = a[:10] + 0.1 * b[:10]
        assert h.hungarian_cosine_distance(a, b) >= h.mean_min_cosine_distance(a, b) - 1e-12


def test_galaxy_far_away_toy_matches_the_brief(toy):
    """science.md: raw k-means dictionaries look ~0.02 apart, centered ~0.4, random ~0.7."""
    a = h.kmeans_centroids(toy, 64, seed=0)
    b = h.kmeans_centroids(toy, 64, seed=1)
    raw = h.mean_min_cosine_distance(a, b)
    centered = h.mean_min_cosine_distance(a, b, center=toy.mean(0))
    chance = h.mean_min_cosine_distance(random_dict(64, 64, 0), random_dict(64, 64, 1))
    assert 0.01 < raw < 0.04
    assert 0.3 < centered < 0.5
    assert raw < centered < chance


def test_fvu_punishes_a_mean_only_reconstruction_that_scalar_r2_rewards():
    toy = h.galaxy_toy_data(4096, 64, 60.0, seed=0)  # |mu| large against the spread
    mean_only = toy.mean(0).expand_as(toy)
    assert h.fvu(toy, mean_only) == pytest.approx(1.0, abs=1e-12)
    assert h.scalar_mean_r2(toy, mean_only) > 0.9
    assert h.fvu(toy, toy) == 0.0


def test_activation_correlation_of_permuted_codes_is_one():
    codes = torch.rand(500, 20) * (torch.rand(500, 20) < 0.3)
    assert h.matched_activation_correlation(codes, codes[:, torch.randperm(20)]) == \
        pytest.approx(1.0, abs=1e-9)
    other = torch.rand(500, 20) * (torch.rand(500, 20) < 0.3)
    assert abs(h.matched_activation_correlation(codes, other)) < 0.25


def test_l0_dead_fraction_and_pairwise():
    codes = torch.zeros(10, 8)
    codes[:, :3] = 1.0
    assert h.l0(codes) == 3.0
    assert h.dead_fraction(codes) == pytest.approx(5 / 8)
    dicts = [random_dict(10, 4, s) for s in range(5)]
    vals = h.pairwise(h.mean_min_cosine_distance, dicts)
    assert len(vals) == 10 and all(v > 0 for v in vals)


# ----------------------------------------------------------------------------- models


def test_topk_sae_keeps_exactly_k_latents():
    sae = h.TopKSAE(16, 64, 5, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: exactly k survive
    x_hat, codes = sae(torch.randn(200, 16))
    assert x_hat.shape == (200, 16)
    assert ((codes != 0).sum(-1) == 5).all()
    sae = h.TopKSAE(16, 64, 5, seed=0)
    _, codes = sae(torch.randn(200, 16))
    assert ((codes != 0).sum(-1) <= 5).all() and (codes >= 0).all()


def test_archetypal_atoms_start_on_the_candidates():
    cand = torch.randn(12, 6) + 5
    sae = h.RelaxedArchetypalSAE(6, 10, 3, cand)
    assert torch.allclose(sae.dictionary(), cand[:10])


@pytest.mark.parametrize("arch", ["topk", "ra"])
def test_batched_gradients_equal_autograd(arch):
    x = torch.randn(256, 16) * 2 + 3
    models = [h.make_sae(arch, "random", x, 32, 4, seed=s) for s in (1, 2)]
    xb = torch.stack([x[:64], x[64:128]])
    for m, xi in zip(models, xb):
        x_hat, _ = m(xi)
        (x_hat - xi).pow(2).sum(-1).mean().backward()
    names = [n for n, _ in models[0].named_parameters()]
    params = {n: torch.stack([getattr(m, n).detach() for m in models]) for n in names}
    cand = torch.stack([m.candidates for m in models]) if arch == "ra" else None
    _, grads = h.stacked_grads(arch, params, cand, xb, 4)
    for n in names:
        ref = torch.stack([getattr(m, n).grad for m in models])
        assert torch.allclose(grads[n], ref, rtol=1e-4, atol=1e-5 * ref.abs().max()), n


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return h.galaxy_toy_data(4096, 16, 8.0, seed=3)


def train(arch, init, data, seeds=(0, 1, 2), steps=12, **kw):
    models = [h.make_sae(arch, init, data, 24, 4, seed=s, **kw) for s in seeds]
    out = h.train_saes(models, data, list(seeds), 64 * steps, 64, lr=3e-3, progress=False,
                       device="cpu")
    return models, out


def test_topk_atoms_stay_unit_norm_and_loss_falls(data):
    models, out = train("topk", "random", data, steps=40)
    norms = out["dictionaries"][-1].norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert torch.equal(models[1].dictionary().detach(), out["dictionaries"][-1, 1])
    assert (out["loss"][-5:].mean(0) < 0.8 * out["loss"][:5].mean(0)).all()


def test_archetypal_constraints_hold_after_training(data):
    models, _ = train("ra", "kmeans-independent", data, delta=0.05, steps=30)
    for m in models:
        w = m.W.detach()
        assert (w >= 0).all()
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[0]), atol=1e-5)
        lam = m.Lambda.detach().norm(dim=-1)
        assert lam.max() <= 0.05 + 1e-6
        assert lam.max() > 0.049  # the clip is active, not vacuous
    free, _ = train("ra", "kmeans-shared", data, project=False, steps=30)
    assert (free[0].W.detach() < 0).any()  # projection off: W leaves the simplex


@pytest.mark.parametrize("arch,init,shared", [
    ("topk", "kmeans-shared", True), ("ra", "kmeans-shared", True),
    ("topk", "random", False), ("topk", "kmeans-independent", False),
    ("ra", "kmeans-independent", False), ("ra", "random-points", False), ("ra", "random", False)])
def test_step_zero_dictionaries_are_shared_only_under_kmeans_shared(data, arch, init, shared):
    _, out = train(arch, init, data, steps=2)
    step0 = out["dictionaries"][0]
    assert out["tokens"][0] == 0
    dist = h.pairwise(h.mean_min_cosine_distance, list(step0))
    if shared:
        assert all(torch.equal(step0[0], s) for s in step0) and max(dist) < 1e-12
    else:
        assert min(dist) > 1e-4


def test_training_is_deterministic_and_memmap_equals_tensor(data, tmp_path):
    _, a = train("ra", "random-points", data, steps=6)
    _, b = train("ra", "random-points", data, steps=6)
    assert torch.equal(a["dictionaries"], b["dictionaries"]) and torch.equal(a["loss"], b["loss"])
    path = tmp_path / "x.npy"
    np.save(path, data.numpy())
    mm = np.load(path, mmap_mode="r")
    models = [h.make_sae("ra", "random-points", data, 24, 4, seed=s) for s in (0, 1, 2)]
    c = h.train_saes(models, mm, [0, 1, 2], 64 * 6, 64, lr=3e-3, progress=False, device="cpu")
    assert torch.equal(a["dictionaries"], c["dictionaries"])


def test_snapshot_schedule_is_log_dense_early_and_regular_later():
    steps = h.snapshot_steps(1000, n_log=12, n_linear=8)
    assert steps[0] == 0 and steps[-1] == 1000 and steps == sorted(set(steps))
    assert steps[1:4] == [1, 2, 4] or steps[1] == 1
    assert {125, 250, 500, 750} <= set(steps)
    assert len([s for s in steps if s < 100]) >= 6  # dense early


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call,match", [
    (lambda x: h.TopKSAE(8, 4, 5), "k=5"),
    (lambda x: h.make_sae("topk", "kmeans-typo", x, 8, 2, 0), "init='kmeans-typo'.*kmeans-shared"),
    (lambda x: h.make_sae("topk", "random-points", x, 8, 2, 0), "init='random-points'"),
    (lambda x: h.make_sae("mlp", "random", x, 8, 2, 0), "arch='mlp'.*topk"),
    (lambda x: h.RelaxedArchetypalSAE(8, 4, 2, torch.randn(4, 8), delta=-1.0), "delta=-1.0"),
    (lambda x: h.make_sae("ra", "random", torch.where(x > 0, x, torch.nan), 8, 2, 0), "NaN"),
    (lambda x: h.make_sae("ra", "random", x, 8, 2, 0, n_candidates=4), "n_candidates=4"),
    (lambda x: h.resolve_device("tpu"), "device='tpu'"),
])
def test_bad_parameters_fail_fast_with_a_clear_message(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(100, 8))


def test_trainer_rejects_mismatched_inputs(data):
    models = [h.make_sae("topk", "random", data, 24, 4, seed=0)]
    with pytest.raises(ValueError, match="seeds"):
        h.train_saes(models, data, [0, 1], 640, 64, progress=False)
    with pytest.raises(ValueError, match="d_in"):
        h.train_saes(models, data[:, :8], [0], 640, 64, progress=False)
    with pytest.raises(ValueError, match="snapshots"):
        h.train_saes(models, data, [0], 640, 64, snapshots=[0, 99], progress=False)


# ----------------------------------------------------------------------------- grid statistics


def test_pair_matrices_agree_with_the_single_pair_metrics():
    dicts = torch.stack([random_dict(20, 6, s) for s in range(3)])
    m = h.pair_matrices(dicts)
    assert np.isnan(m["hungarian"][0, 0]) and m["hungarian"][0, 1] == m["hungarian"][1, 0]
    assert m["mean_min"][0, 2] == pytest.approx(h.mean_min_cosine_distance(dicts[0], dicts[2]))
    assert m["hungarian"][1, 2] == pytest.approx(h.hungarian_cosine_distance(dicts[1], dicts[2]))
    assert m["matched_share"][0, 1] == pytest.approx(h.matched_share(dicts[0], dicts[1]))
    same = h.pair_matrices(torch.stack([dicts[0]] * 3))
    assert np.nanmax(np.abs(same["hungarian"])) < 1e-12  # identical runs: distance 0


def test_bootstrap_over_runs_brackets_the_mean_and_detects_a_difference():
    rng = np.random.default_rng(0)
    m = rng.normal(0.5, 0.01, (6, 6))
    m = (m + m.T) / 2
    np.fill_diagonal(m, np.nan)
    mean, lo, hi = h.bootstrap_runs(m, 500, 0)
    assert lo <= mean <= hi and hi - lo < 0.05
    assert mean == pytest.approx(np.nanmean(m))
    diff, lo, hi = h.bootstrap_runs(m, 500, 0, other=m + 0.2)
    assert diff == pytest.approx(-0.2) and hi < 0
    v = h.bootstrap_mean([1.0, 2.0, 3.0], 500, 0)
    assert v[0] == 2.0 and 1.0 <= v[1] < 2.0 < v[2] <= 3.0


def test_synthetic_dictionary_is_recovered_by_itself_and_not_by_noise():
    x, true = h.sparse_synthetic_data(1000, 16, 32, 3, mean_norm=10.0, seed=0)
    assert x.shape == (1000, 16) and float(x.mean(0).norm()) > 5
    assert h.recovery(true, true) == 1.0
    assert h.recovery(random_dict(32, 16, 5), true) < 0.1


def test_verdict_follows_the_two_tests():
    assert h.verdict(None, None).startswith("the tests could not run")
    assert h.verdict(False, False).startswith("not falsified")
    assert h.verdict(True, True).startswith("FALSIFIED")
    assert "inherited" in h.verdict(True, False)


def test_cached_result_computes_once_and_recomputes_on_other_metadata(tmp_path):
    calls = []
    compute = lambda: calls.append(1) or {"value": torch.ones(2)}
    a = h.cached_result(tmp_path / "r.pt", {"k": 1}, compute)
    b = h.cached_result(tmp_path / "r.pt", {"k": 1}, compute)
    c = h.cached_result(tmp_path / "r.pt", {"k": 2}, compute)
    assert len(calls) == 2 and torch.equal(a["value"], b["value"]) and c["meta"] == {"k": 2}
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="configurations='nope'"):
        h.check_grid(["topk-random", "nope"], ["raw"])


def test_entropy_and_activation_statistics_on_known_cases():
    assert h.unigram_entropy(np.array([0, 1, 2, 3] * 10)) == pytest.approx(np.log(4))
    far = torch.randn(5000, 8) * 0.1 + 10.0  # a tight cloud far from the origin
    s = h.activation_stats(far)
    assert s["mean_norm"] == pytest.approx(10 * np.sqrt(8), rel=0.01)
    assert s["rms_from_mean"] == pytest.approx(0.1 * np.sqrt(8), rel=0.05)
    assert s["cos_raw"] > 0.99 and abs(s["cos_centered"]) < 0.05


def test_document_splits_are_disjoint_and_hub_loading_fails_clearly_offline():
    docs = [f"doc{i}" for i in range(45)]
    train = list(h.split_documents(docs, "train", 10))
    held = list(h.split_documents(docs, "heldout", 10))
    assert held == ["doc9", "doc19", "doc29", "doc39"] and len(train) == 41
    assert not set(train) & set(held)
    with pytest.raises(ValueError, match="split='test'"):
        list(h.split_documents(docs, "test", 10))
    with pytest.raises(RuntimeError, match="text_source='stdlib'"):  # HF_DATASETS_OFFLINE=1
        next(h.hub_texts("NeelNanda/pile-10k"))


def test_even_subset_keeps_the_ends():
    assert h.even_subset(5, 0) == [0, 1, 2, 3, 4] and h.even_subset(5, 9) == [0, 1, 2, 3, 4]
    sub = h.even_subset(22, 6)
    assert sub[0] == 0 and sub[-1] == 21 and len(sub) == 6 and sub == sorted(set(sub))
