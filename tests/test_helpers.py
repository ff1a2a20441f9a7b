"""Known-answer tests of helpers.py: metrics, models, kernels, the trainer and the decisions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import helpers as h


def random_dict(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def stacked(models, kind: str) -> dict:
    """Parameters (kind='parameters') or buffers of same-shape models, stacked over runs."""
    named = [dict(getattr(m, f"named_{kind}")()) for m in models]
    return {n: torch.stack([d[n].detach() for d in named]) for n in named[0]}


@pytest.fixture(scope="module")
def toy() -> torch.Tensor:
    return h.galaxy_toy_data(4096, 64, 20.0, seed=0)


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return h.galaxy_toy_data(4096, 16, 8.0, seed=3)


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


def test_zero_atoms_count_as_maximally_distant_without_nan():
    a = random_dict(10, 6, 0)
    b = a.clone()
    b[7:] = 0.0  # three atoms that never left zero
    assert h.hungarian_cosine_distance(a, b) == pytest.approx(0.3, abs=1e-12)  # 3 of 10 at distance 1
    m = h.pair_matrices(torch.stack([a, b]))
    assert all(np.isfinite(v[0, 1]) for v in m.values())
    assert m["matched_share"][0, 1] == pytest.approx(0.7)


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
    assert float(h.fvu_of_mse(toy.var(0, unbiased=False).mean(), toy)) == pytest.approx(1.0, rel=1e-5)


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
    m = h.pair_matrices(torch.stack([random_dict(10, 4, s) for s in range(5)]))
    assert np.isnan(np.diag(m["mean_min"])).all() and (m["mean_min"][~np.eye(5, dtype=bool)] > 0).all()


# ----------------------------------------------------------------------------- sparse kernels


def test_compiled_kernels_equal_the_torch_path(monkeypatch):
    if h.kernel_backend() != "C":
        pytest.skip("no C compiler: the torch path is the only one")
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(300, 96, generator=gen)
    idx = torch.randint(0, 50, (300, 6), generator=gen)
    w, w2 = torch.rand(300, 6, generator=gen), torch.randn(300, 6, generator=gen)
    rows, rows2, table = (torch.randn(300, 24, generator=gen), torch.randn(300, 24, generator=gen),
                          torch.randn(50, 24, generator=gen))
    mat = torch.rand(40, 30, generator=gen) - 0.3
    c = (h.topk_rows(pre, 7), h.gather_sum(idx, w, table), h.gather_dot(idx, rows, table),
         h.scatter_sum2(idx, 50, w, rows, w2, rows2))
    c_mat = mat.clone()
    h.project_archetypal_(c_mat, torch.zeros(40, 3), 1.0)
    monkeypatch.setattr(h, "_use_c", lambda *t: False)
    t = (h.topk_rows(pre, 7), h.gather_sum(idx, w, table), h.gather_dot(idx, rows, table),
         h.scatter_sum2(idx, 50, w, rows, w2, rows2))
    t_mat = mat.clone()
    h.project_archetypal_(t_mat, torch.zeros(40, 3), 1.0)
    assert torch.equal(c[0][1], t[0][1]) and torch.equal(c[0][0], t[0][0])  # same set, same order
    assert torch.equal(c[0][1], pre.topk(7, -1).indices.sort(-1).values)
    for a, b in ((c[1], t[1]), (c[2], t[2]), *zip(c[3], t[3]), (c_mat, t_mat)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert torch.allclose(c_mat.sum(-1), torch.ones(40)) and (c_mat >= 0).all()


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


def test_archetypal_atoms_start_on_the_candidates_and_past_them_at_zero():
    cand = torch.randn(12, 6) + 5
    assert torch.allclose(h.RelaxedArchetypalSAE(6, 10, 3, cand).dictionary(), cand[:10])
    wide = h.RelaxedArchetypalSAE(6, 20, 3, cand)  # the reference's W = eye(20, 12)
    assert torch.allclose(wide.dictionary()[:12], cand) and (wide.dictionary()[12:] == 0).all()
    x = torch.randn(300, 6) + 5
    topk = h.make_sae("topk", "kmeans-shared", x, 20, 3, 0, n_candidates=12, match_scale=False)
    assert (topk.W_dec[12:] == 0).all() and torch.allclose(topk.W_dec[:12].norm(dim=1), torch.ones(12))


def test_start_scale_matches_the_data_and_keeps_every_selected_latent(data):
    for arch in ("topk", "ra"):
        raw = h.make_sae(arch, "kmeans-independent" if arch == "ra" else "random", data, 24, 4, 0,
                         match_scale=False)
        scaled = h.make_sae(arch, "kmeans-independent" if arch == "ra" else "random", data, 24, 4, 0)
        (v0, i0), (v1, i1) = raw.encode(data), scaled.encode(data)
        assert torch.equal(i0, i1)
        assert torch.allclose(h.unit_rows(raw.dictionary()), h.unit_rows(scaled.dictionary()), atol=1e-6)
        if arch == "ra":  # the archetypal scale parameter carries it: exp(m) = alpha
            assert float(scaled.multiplier.detach()) < 0 and torch.equal(raw.W_enc, scaled.W_enc)
        recon = scaled.decode(v1, i1).detach() - (scaled.b_pre.detach() if arch == "topk" else 0)
        target = data - (scaled.b_pre.detach() if arch == "topk" else 0)
        assert float(recon.norm() / target.norm()) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("arch,kw", [("topk", {}), ("ra", {}), ("ra", {"center_encoder": True}),
                                     ("topk", {"pre_bias": False})])
def test_batched_gradients_equal_autograd(arch, kw):
    x = torch.randn(256, 16) * 2 + 3
    models = [h.make_sae(arch, "random", x, 32, 4, seed=s, **kw) for s in (1, 2)]
    xb = torch.stack([x[:64], x[64:128]])
    for m, xi in zip(models, xb):
        x_hat, _ = m(xi)
        (x_hat - xi).pow(2).mean().backward()  # the reference library's MSE
    _, grads, norms, _ = h.stacked_grads(arch, stacked(models, "parameters"),
                                         stacked(models, "buffers"), xb, 4)
    for n, _ in models[0].named_parameters():
        ref = torch.stack([getattr(m, n).grad for m in models])
        assert torch.allclose(grads[n], ref, rtol=1e-4, atol=1e-5 * ref.abs().max()), n
    ref_norms = [torch.nn.utils.get_total_norm([p.grad for p in m.parameters()]) for m in models]
    assert torch.allclose(norms, torch.stack(ref_norms), rtol=1e-4)


def test_dead_penalty_and_auxk_gradients_equal_autograd():
    x = torch.randn(8, 12) * 2 + 1  # 8 tokens x 3 slots: some of the 20 live latents stay silent
    sae = h.TopKSAE(12, 40, 3, seed=0)
    with torch.no_grad():
        sae.b_pre.copy_(x.mean(0))
        sae.b_enc[:20] -= 50.0  # latents 0..19 never fire: dead in the batch
    pre = (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc
    vals, idx = pre.topk(3, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, vals.clamp_min(0))
    err = z @ sae.W_dec + sae.b_pre - x
    dead = z.detach().eq(0).all(0)  # silent on the whole batch: 0..19 and others
    assert dead[:20].all() and dead[20:].any()
    aux_pre = pre.masked_fill(~dead, -math.inf)
    a_vals, a_idx = aux_pre.topk(8, dim=-1)
    z_aux = torch.zeros_like(pre).scatter(-1, a_idx, torch.nan_to_num(a_vals, neginf=0.0).clamp_min(0))
    loss = err.pow(2).mean() + (1 / 32) * (z_aux @ sae.W_dec + err.detach()).pow(2).mean() \
        - 0.1 * (pre * dead).mean()  # AuxK on the residual, and the authors' dead-latent term
    assert (z_aux > 0).any()  # some dead latents have positive pre-activations: AuxK acts
    loss.backward()
    params = stacked([sae], "parameters")
    _, grads, fired = h.sae_grads(x.unsqueeze(0), params["W_enc"], params["b_enc"], params["b_pre"],
                                  params["W_dec"], 3, dead_penalty=0.1, aux_dead=dead.unsqueeze(0),
                                  aux_k=8)
    assert torch.equal(fired[0] == 0, dead)
    for n, g in (("W_enc", grads["W_enc"]), ("b_enc", grads["b_enc"]), ("b_pre", grads["b_pre"]),
                 ("W_dec", grads["dictionary"])):
        ref = getattr(sae, n).grad
        assert torch.allclose(g[0], ref, rtol=1e-4, atol=1e-5 * ref.abs().max()), n
    assert (grads["b_enc"][0, :20] < 0).all()  # a dead latent's pre-activation is pushed up


# ----------------------------------------------------------------------------- training


def train(arch, init, data, seeds=(0, 1, 2), steps=12, lr=3e-3, **kw):
    train_kw = {k: kw.pop(k) for k in ("clip_grad", "lr_decay", "dead_penalty") if k in kw}
    models = [h.make_sae(arch, init, data, 24, 4, seed=s, **kw) for s in seeds]
    out = h.train_saes(models, data, list(seeds), 64 * steps, 64, lr=lr, progress=False,
                       device="cpu", **train_kw)
    return models, out


class ReferenceSAE(torch.nn.Module):
    """The authors' four models written out as their code builds them (overcomplete's TopKSAE with
    its linear encoder, and their trimmed RelaxedArchetypalDictionary): ``dictionary`` is "l2"
    (rows normalized in place at every forward), "identity" (free rows), "archetypal" (W and
    Relax projected in place at every forward, D = (W C + Relax) exp(m)) or "projection-off"
    (one parameter Relax = W C returned as is; the multiplier exists and gets no gradient)."""

    def __init__(self, w_enc, b_enc, dictionary, kind, k):
        super().__init__()
        self.kind, self.k = kind, k
        self.encoder = torch.nn.Linear(w_enc.shape[1], w_enc.shape[0])
        with torch.no_grad():
            self.encoder.weight.copy_(w_enc)
            self.encoder.bias.copy_(b_enc)
        if kind == "archetypal":
            self.register_buffer("C", dictionary.clone())
            self.W = torch.nn.Parameter(torch.eye(w_enc.shape[0], len(dictionary)))
            self.Relax = torch.nn.Parameter(torch.zeros(w_enc.shape[0], w_enc.shape[1]))
        else:
            self.Relax = torch.nn.Parameter(dictionary.clone())
        self.multiplier = torch.nn.Parameter(torch.tensor(0.0))

    def get_dictionary(self):
        if self.kind == "l2":
            with torch.no_grad():
                self.Relax.data = self.Relax / (torch.norm(self.Relax, p=2, dim=1, keepdim=True) + 1e-8)
        if self.kind != "archetypal":
            return self.Relax
        with torch.no_grad():
            w = torch.relu(self.W)
            w /= w.sum(dim=-1, keepdim=True) + 1e-8
            self.W.data = w
            self.Relax.data *= torch.clamp(0.1 / self.Relax.norm(dim=-1, keepdim=True), max=1)
        return (self.W @ self.C + self.Relax) * torch.exp(self.multiplier)

    def forward(self, x):
        pre_codes = self.encoder(x)
        codes = torch.relu(pre_codes)
        top = torch.topk(codes, self.k, dim=-1)
        z = torch.zeros_like(codes).scatter(-1, top.indices, top.values)
        return pre_codes, z, z @ self.get_dictionary()


@pytest.mark.parametrize("name,kind", [("topk-random", "l2"), ("ra-kmeans-shared", "archetypal"),
                                       ("ra-projection-off-free", "projection-off"),
                                       ("topk-kmeans-shared-free", "identity")])
def test_the_authors_four_conditions_take_the_reference_models_step(name, kind):
    """One step of each Table 3 condition on identical weights and batch equals one step of the
    model as the authors' code builds it: their loss with the dead-latent term, overcomplete's
    clipping at norm 1, Adam 5e-3 (atoms 13-24 start at zero, past the 12 shared centroids)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=gen) + 3 * torch.randn(16, generator=gen)  # a mean: clips
    arch, init, decoder = h.CONFIGURATIONS[name]
    centroids = h.kmeans_centroids(x, 12, 0)
    ours = h.make_sae(arch, init, x, 24, 3, 0, n_candidates=12, delta=0.1, decoder=decoder,
                      shared_points=centroids, match_scale=False, pre_bias=False)
    with torch.no_grad():
        ours.b_enc[:4] -= 100.0  # four latents silent on the batch: the dead-latent term acts
    start = centroids if kind == "archetypal" else ours.dictionary().detach()
    ref = ReferenceSAE(ours.W_enc.detach(), ours.b_enc.detach(), start, kind, 3)
    opt = torch.optim.Adam(ref.parameters(), lr=5e-3)
    pre_codes, codes, x_hat = ref(x)
    is_dead = ((codes > 0).sum(dim=0) == 0).float().detach()
    loss = (x - x_hat).square().mean() - 1e-3 * (pre_codes * is_dead[None, :]).mean()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    opt.step()
    arch_ = "topk" if isinstance(ours, h.TopKSAE) else "ra"
    _, grads, _, _ = h.stacked_grads(arch_, stacked([ours], "parameters"), stacked([ours], "buffers"),
                                     x.unsqueeze(0), 3, dead_penalty=1e-3, clip_grad=1.0)
    names = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "Relax", "W": "W",
             "Lambda": "Relax", "multiplier": "multiplier"}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert set(ref_grads) == {names[n] for n in grads}  # the same trained parameters
    for n, g in grads.items():  # the same clipped gradients, dead-latent term included
        assert torch.allclose(g[0], ref_grads[names[n]], atol=1e-6), n
    out = h.train_saes([ours], x, [0], 64, 64, lr=5e-3, clip_grad=1.0, dead_penalty=1e-3,
                       device="cpu", progress=False)
    assert norm > 1.0 and is_dead[:4].all() and out["clipped"] == [1.0]  # clip and term act
    assert torch.allclose(out["dictionaries"][-1, 0], ref.get_dictionary().detach(), atol=1e-5)
    assert torch.allclose(ours.W_enc, ref.encoder.weight, atol=1e-5)
    assert torch.allclose(ours.b_enc, ref.encoder.bias, atol=1e-5)
    assert not torch.allclose(out["dictionaries"][-1, 0], out["dictionaries"][0, 0], atol=1e-4)
    norms = out["dictionaries"][-1, 0].norm(dim=-1)
    if kind in ("identity", "projection-off"):  # free rows: not renormalized; zero atoms grow
        assert (norms[12:] > 0.01).any() and not torch.allclose(norms[:12], torch.ones(12), atol=1e-3)


@pytest.mark.parametrize("arch", ["topk", "ra"])
def test_clipped_multi_seed_training_equals_each_seed_trained_alone(data, arch):
    """train_saes with per-run clipping == each seed alone with clip_grad_norm_ and Adam."""
    seeds, steps, batch, lr, clip = [3, 7], 6, 64, 1e-2, 0.05
    make = lambda: [h.make_sae(arch, "kmeans-independent", data, 24, 4, s) for s in seeds]  # noqa: E731
    together = make()
    out = h.train_saes(together, data, seeds, batch * steps, batch, lr, snapshots=[],
                       clip_grad=clip, device="cpu", progress=False)
    assert min(out["clipped"]) == 1.0  # the clip is active, not vacuous
    for s, m in zip(seeds, make()):
        opt = torch.optim.Adam(m.parameters(), lr=lr)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(s))
        for step in range(steps):
            xb = data[order[step * batch:(step + 1) * batch].sort().values]
            x_hat, _ = m.train()(xb)
            opt.zero_grad()
            (x_hat - xb).pow(2).mean().backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            opt.step()
            with torch.no_grad():
                if arch == "topk":
                    m.W_dec.copy_(h.unit_rows(m.W_dec))
                else:
                    m.project_()
        alone = dict(m.named_parameters())
        for n, p in together[seeds.index(s)].named_parameters():
            assert torch.allclose(p, alone[n], rtol=1e-3, atol=1e-5), (arch, s, n)


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
    free, _ = train("ra", "kmeans-shared", data, decoder="unprojected", steps=30)
    assert (free[0].W.detach() < 0).any()  # projection off: W leaves the simplex


@pytest.mark.parametrize("arch,init,shared", [
    ("topk", "kmeans-shared", True), ("ra", "kmeans-shared", True),
    ("topk", "random", False), ("topk", "kmeans-independent", False),
    ("ra", "kmeans-independent", False), ("ra", "random-points", False), ("ra", "random", False)])
def test_step_zero_dictionaries_are_shared_only_under_kmeans_shared(data, arch, init, shared):
    _, out = train(arch, init, data, steps=2)
    step0 = out["dictionaries"][0]
    assert out["tokens"][0] == 0
    dist = [h.mean_min_cosine_distance(a, b) for a, b in itertools.combinations(step0, 2)]
    if shared:
        # the same atoms up to each run's own scale (an RA-SAE's exp(m) is matched per run)
        unit = step0 / step0.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        assert all(torch.allclose(unit[0], u, atol=1e-6) for u in unit) and max(dist) < 1e-6
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


def test_learning_rate_decay_freezes_the_last_step(data):
    models, _ = train("topk", "random", data, steps=10, lr_decay=0.1)  # the last step has lr 0
    before = [m.W_enc.detach().clone() for m in models]
    _, out = train("topk", "random", data, steps=9, lr_decay=0.0)
    assert len(out["loss"]) == 9 and all(torch.isfinite(b).all() for b in before)


def test_non_finite_data_stops_training_and_nothing_is_saved(data, tmp_path):
    bad = data.clone()
    bad[100:105] = float("nan")
    models = [h.make_sae("topk", "random", data, 24, 4, seed=s) for s in (0, 1)]
    path = tmp_path / "cell.safetensors"
    with pytest.raises(FloatingPointError, match="non-finite loss at step"):
        h.cached_result(path, {"k": 1}, lambda: h.train_saes(models, bad, [0, 1], 64 * 80, 64,
                                                             progress=False, device="cpu"))
    assert not list(tmp_path.iterdir())


def test_snapshot_schedule_is_log_dense_early_and_regular_later():
    steps = h.snapshot_steps(1000, n_log=12, n_linear=8)
    assert steps[0] == 0 and steps[-1] == 1000 and steps == sorted(set(steps))
    assert steps[1:4] == [1, 2, 4]
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
    (lambda x: h.make_sae("ra", "random-points", x, 8, 2, 0, n_candidates=500), "n_candidates=500"),
    (lambda x: h.resolve_device("tpu"), "device='tpu'"),
    (lambda x: h.check_seeds([0, 0, 1]), r"seeds=\[0, 0, 1\] repeats a seed"),
    (lambda x: h.check_seeds("0,1"), "seeds='0,1' must be a non-empty list"),
    (lambda x: h.check_seeds(3), "seeds=3 must be a non-empty list"),
])
def test_bad_parameters_fail_fast_with_a_clear_message(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(100, 8))


def test_cuda_without_a_gpu_names_the_parameter():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="device='cuda'.*no CUDA"):
        h.resolve_device("cuda")


@pytest.mark.parametrize("params,match", [
    ({"k": "4O"}, "k='4O' must be an integer >= 1"), ({"sae_lr": 0}, "sae_lr=0 must be a number > 0"),
    ({"device": "gpu"}, "device='gpu'"), ({"seeds": [0, 0]}, "seeds=.0, 0. must be"),
    ({"configurations": ["topk-randm"]}, "configurations=.*distinct names"),
    ({"lr_decay": 1.5}, r"lr_decay=1.5 must be a number in \[0, 1\]"),
    ({"drop_first": "yes"}, "drop_first='yes' must be true or false")])
def test_check_parameters_names_the_parameter_and_the_rule(params, match):
    with pytest.raises(ValueError, match=match):
        h.check_parameters(params)
    h.check_parameters({"k": 4, "clip_grad": None, "seeds": [0, 1], "unknown_to_helpers": object()})


def test_trainer_rejects_mismatched_inputs(data):
    models = [h.make_sae("topk", "random", data, 24, 4, seed=0)]
    with pytest.raises(ValueError, match="seeds"):
        h.train_saes(models, data, [0, 1], 640, 64, progress=False)
    with pytest.raises(ValueError, match="d_in"):
        h.train_saes(models, data[:, :8], [0], 640, 64, progress=False)
    with pytest.raises(ValueError, match="snapshots"):
        h.train_saes(models, data, [0], 640, 64, snapshots=[0, 99], progress=False)
    with pytest.raises(ValueError, match="clip_grad=0"):
        h.train_saes(models, data, [0], 640, 64, clip_grad=0, progress=False)


def test_a_request_beyond_the_corpus_fails_before_any_tokenizing():
    class NoTokenizing:
        def __call__(self, *a, **k):
            raise AssertionError("tokenized")

    with pytest.raises(ValueError, match="n_tokens=10,000,000,000 needs more train text"):
        h.text_tokens("stdlib", NoTokenizing(), "train", 10**10)


# ----------------------------------------------------------------------------- files


def test_json_refuses_nan_and_names_where(tmp_path):
    with pytest.raises(ValueError, match=r"endpoint.fvu\[1\]"):
        h.write_json_atomic(tmp_path / "a.json", {"endpoint": {"fvu": [0.1, float("nan")]}})
    assert not list(tmp_path.iterdir())


def test_results_round_trip_and_corruption_is_named_and_recomputed(tmp_path, capsys):
    calls = []
    result = {"dictionaries": torch.randn(3, 4, 5), "seeds": [0, 1, 2],
              "state_dicts": [{"W": torch.ones(2, 2)}, {"W": torch.zeros(2, 2)}]}
    compute = lambda: calls.append(1) or result  # noqa: E731
    path = tmp_path / "cell.safetensors"
    a = h.cached_result(path, {"k": 1}, compute)
    b = h.cached_result(path, {"k": 1}, compute)
    assert len(calls) == 1 and torch.equal(b["dictionaries"], result["dictionaries"])
    assert b["seeds"] == [0, 1, 2] and torch.equal(b["state_dicts"][1]["W"], torch.zeros(2, 2))
    h.cached_result(path, {"k": 2}, compute)  # other metadata: recomputed
    assert len(calls) == 2
    raw = bytearray(path.read_bytes())
    raw[-64:] = np.arange(16, dtype=np.float32).tobytes()  # finite garbage in the tensor data
    path.write_bytes(bytes(raw))
    assert h.load_result(path, {"k": 2}) is None
    err = capsys.readouterr().err
    assert f"{path}: checksum mismatch" in err
    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert h.load_result(path, {"k": 2}) is None
    import pickle

    path.write_bytes(pickle.dumps({"evil": 1}))  # a pickle in place of the tensors: never unpickled
    assert h.load_result(path, {"k": 2}) is None
    assert a["meta"] == {"k": 1}


def test_code_identity_follows_exactly_the_functions_used():
    train = h.code_sources(h.train_cell)
    assert {"train_saes", "make_sae", "kmeans_centroids", "sae_grads", "_KERNELS_C"} <= set(train)
    assert "fvu" not in train and "cell_trajectory" not in train
    assert "train_cell" not in h.code_sources(h.cell_trajectory)
    assert h.code_hash(h.train_cell) != h.code_hash(h.cell_trajectory)


def test_a_second_run_on_one_folder_is_refused_naming_the_lock(tmp_path):
    held = h.lock_run_dir(tmp_path)
    import subprocess
    import sys

    other = subprocess.run([sys.executable, "-c", f"import helpers as h; h.lock_run_dir({str(tmp_path)!r})"],
                           capture_output=True, text=True)
    assert other.returncode != 0 and ".lock is locked by pid" in other.stderr
    held.close()
    h.lock_run_dir(tmp_path).close()  # free again once the holder is gone


def test_cache_checksum_catches_modification(tmp_path):
    path = tmp_path / "acts.npy"
    np.save(path, np.ones((10, 4), dtype=np.float32))
    h.write_json_atomic(path.with_suffix(".json"), {"model_name": "m", "shape": [10, 4],
                                                    "sha256": h.file_sha256(path)})
    assert h.load_cache(path, {"model_name": "m"}) is not None
    arr = np.load(path, mmap_mode="r+")
    arr[3] = np.nan
    arr.flush()
    del arr
    assert h.load_cache(path, {"model_name": "m"}) is None
    with pytest.raises(FileNotFoundError, match="acts.npy does not match its recorded shape and checksum"):
        h.open_cache(path)


# ----------------------------------------------------------------------------- statistics and decisions


def pair_matrix(values: np.ndarray) -> np.ndarray:
    """A symmetric run-by-run matrix with NaN diagonal whose pair (i, j) is values[i] + values[j]."""
    m = values[:, None] + values[None, :]
    np.fill_diagonal(m, np.nan)
    return m


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


def test_comparison_outcomes_on_known_cases():
    near = pair_matrix(np.array([0.05, 0.06, 0.04, 0.05, 0.05]))
    far = pair_matrix(np.array([0.30, 0.31, 0.29, 0.30, 0.30]))
    assert h.compare_runs(near, far, 500, 0)["outcome"] == h.CLOSER
    assert h.compare_runs(far, near, 500, 0)["outcome"] == h.FURTHER
    assert h.compare_runs(near, near, 500, 0)["outcome"] == h.NO_DIFFERENCE
    assert h.compare_runs(far, near, 500, 0, agreement=True)["outcome"] == h.AGREES_MORE
    assert h.compare_runs(near, far, 500, 0, agreement=True)["outcome"] == h.AGREES_LESS
    res = h.compare_runs(near, far, 500, 0)
    assert res["difference"] == pytest.approx(-0.5) and res["lo"] <= res["difference"] <= res["hi"]


def test_flattening_tells_a_settled_trajectory_from_a_moving_one():
    base = pair_matrix(np.array([0.20, 0.21, 0.19, 0.20]))
    tokens = [0, 250, 500, 750, 800, 900, 1000]
    settled = np.stack([base + 0.3, base + 0.1, base, base, base, base + 0.001, base])
    moving = np.stack([base + 0.3 - 0.05 * i for i in range(7)])
    a = h.flattening(settled, tokens, 0.2, 0.01, 500, 0)
    b = h.flattening(moving, tokens, 0.2, 0.01, 500, 0)
    assert a["flat"] and a["from_tokens"] == 800 and abs(a["change"]) < 1e-12
    assert not b["flat"] and b["change"] == pytest.approx(-0.1)


def test_quality_gate_flags_what_did_not_learn_or_settle():
    flat = {"flat": True, "change": -0.001, "lo": -0.004, "hi": 0.002}
    assert h.quality_gate(0.12, flat, 0.4, 0.02) == []
    assert h.quality_gate(1.3, flat, 0.4, 0.02) == ["held-out FVU 1.30 > 0.4 (worse than predicting the mean)"]
    moving = {"flat": False, "change": -0.05, "lo": -0.07, "hi": -0.03}
    assert h.quality_gate(0.5, moving, 0.4, 0.02)[1].startswith("trajectory still moving (-0.050")
    noisy = {"flat": False, "change": 0.001, "lo": -0.022, "hi": 0.029}  # no drift, too wide to call flat
    assert h.quality_gate(0.2, noisy, 0.4, 0.02) == [
        "trajectory not shown flat (+0.001 over the last stretch of training, but its 95% interval "
        "[-0.022, +0.029] reaches beyond +-0.02)"]
    assert len(h.quality_gate(float("nan"), flat, 0.4, 0.02)) == 1  # a NaN FVU never passes


def test_tests_skip_excluded_cells_and_the_verdict_follows_them():
    steps = lambda start, end: np.stack([pair_matrix(np.full(4, v / 2)) for v in (start, end)])  # noqa: E731
    traj = {("topk-random", "raw"): {"mean_min": steps(0.7, 0.4), "hungarian": steps(0.7, 0.4)},
            ("ra-kmeans-independent", "raw"): {"mean_min": steps(0.05, 0.08), "hungarian": steps(0.05, 0.08)},
            ("ra-random-points", "raw"): {"mean_min": steps(0.3, 0.1), "hungarian": steps(0.3, 0.1)}}
    tests, skipped = h.falsification_tests(traj, ["raw"], {}, 200, 0)
    assert len(tests) == 4 and skipped == [] and all(t["outcome"] == h.CLOSER for t in tests)
    adv, _ = h.stabilization_tests(traj, ["raw"], {}, 200, 0)
    assert [t["stabilization_advantage"] for t in adv] == [False, False, False, False]
    assert "inherited, not found" in h.verdict(tests, adv)
    traj["ra-random-points", "raw"] = {"mean_min": steps(0.7, 0.1), "hungarian": steps(0.7, 0.1)}
    adv, _ = h.stabilization_tests(traj, ["raw"], {}, 200, 0)
    assert h.verdict(tests, adv).startswith("FALSIFIED")
    excluded = {("ra-random-points", "raw"): ["held-out FVU 1.20 > 0.4"]}
    tests, skipped = h.falsification_tests(traj, ["raw"], excluded, 200, 0)
    assert {t["challenger"] for t in tests} == {"ra-kmeans-independent"}
    assert skipped == ["ra-random-points vs topk-random, raw: excluded, ra-random-points (raw): "
                       "held-out FVU 1.20 > 0.4"]
    none, skipped = h.falsification_tests(traj, ["raw"], {("topk-random", "raw"): ["x"]}, 200, 0)
    assert none == [] and len(skipped) == 2 and h.verdict([], [], skipped).startswith("no test could run")
    assert h.verdict([], []).startswith("not tested: the grid has no archetypal configuration")
    far = [{"outcome": h.FURTHER}]
    assert h.verdict(far, []).startswith("not falsified")


def test_stability_table_tells_shared_starts_from_stabilizing_ones():
    shared = np.stack([pair_matrix(np.zeros(3)), pair_matrix(np.full(3, 0.05))])
    falls = np.stack([pair_matrix(np.full(3, 0.3)), pair_matrix(np.full(3, 0.1))])
    tab = h.stability_table({("a", "raw"): {"hungarian": shared}, ("b", "raw"): {"hungarian": falls}}, 200, 0)
    assert tab["a", "raw"]["shared_start"] and not tab["a", "raw"]["stabilizes"]
    assert tab["b", "raw"]["stabilizes"] and tab["b", "raw"]["end_minus_step0"] == pytest.approx(-0.4)


def test_the_authors_pattern_holds_on_their_own_numbers_and_not_on_its_opposite():
    assert all(h.authors_pattern(h.AUTHORS_TABLE3).values())
    flipped = {**h.AUTHORS_TABLE3, ("ra-kmeans-shared", "centered"): 0.05,
               ("topk-kmeans-shared-free", "raw"): 0.25}
    pattern = h.authors_pattern(flipped)
    assert not pattern["raw_shared_far_closer"] and not pattern["centering_pulls_ra_apart"]
    assert pattern["unconstrained_stay_close"]
    assert not any(h.authors_pattern({}).values())  # missing cells never count as holding


def test_ground_truth_summary_reads_its_numbers_either_way():
    agree = {"a": {"recovered": 0.9, "hungarian_between_runs": 0.1},
             "b": {"recovered": 0.2, "hungarian_between_runs": 0.5}}
    assert "also the most correct" in h.ground_truth_summary(agree)
    disagree = {"a": {"recovered": 0.9, "hungarian_between_runs": 0.4},
                "b": {"recovered": 0.2, "hungarian_between_runs": 0.01}}
    assert "Stability is not correctness: the most stable configuration recovers 20%" in \
        h.ground_truth_summary(disagree)


def test_synthetic_dictionary_is_recovered_by_itself_and_not_by_noise():
    x, true = h.sparse_synthetic_data(1000, 16, 32, 3, mean_norm=10.0, seed=0)
    assert x.shape == (1000, 16) and float(x.mean(0).norm()) > 5
    assert h.recovery(true, true) == 1.0
    assert h.recovery(random_dict(32, 16, 5), true) < 0.1


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
