"""The trainer: gradients equal autograd, clipping per run, constraints, determinism."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ablation import configs, metrics, parameters, sae, starts, store, train
from conftest import stacked, train_runs


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


@pytest.mark.parametrize("arch,kw", [("topk", {}), ("ra", {}), ("ra", {"center_encoder": True}),
                                     ("topk", {"pre_bias": False})])
def test_batched_gradients_equal_autograd(arch, kw):
    x = torch.randn(256, 16) * 2 + 3
    models = [starts.make_sae(arch, "random", x, 32, 4, seed=s, **kw) for s in (1, 2)]
    xb = torch.stack([x[:64], x[64:128]])
    for m, xi in zip(models, xb):
        x_hat, _ = m(xi)
        (x_hat - xi).pow(2).mean().backward()  # the reference library's MSE
    _, grads, norms, _ = train.stacked_grads(arch, stacked(models, "parameters"),
                                         stacked(models, "buffers"), xb, 4)
    for n, _ in models[0].named_parameters():
        ref = torch.stack([getattr(m, n).grad for m in models])
        assert torch.allclose(grads[n], ref, rtol=1e-4, atol=1e-5 * ref.abs().max()), n
    ref_norms = [torch.nn.utils.get_total_norm([p.grad for p in m.parameters()]) for m in models]
    assert torch.allclose(norms, torch.stack(ref_norms), rtol=1e-4)


def test_dead_penalty_and_auxk_gradients_equal_autograd():
    x = torch.randn(8, 12) * 2 + 1  # 8 tokens x 3 slots: some of the 20 live latents stay silent
    model = sae.TopKSAE(12, 40, 3, seed=0)
    with torch.no_grad():
        model.b_pre.copy_(x.mean(0))
        model.b_enc[:20] -= 50.0  # latents 0..19 never fire: dead in the batch
    pre = (x - model.b_pre) @ model.W_enc.T + model.b_enc
    vals, idx = pre.topk(3, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, vals.clamp_min(0))
    err = z @ model.W_dec + model.b_pre - x
    dead = z.detach().eq(0).all(0)  # silent on the whole batch: 0..19 and others
    assert dead[:20].all() and dead[20:].any()
    aux_pre = pre.masked_fill(~dead, -math.inf)
    a_vals, a_idx = aux_pre.topk(8, dim=-1)
    z_aux = torch.zeros_like(pre).scatter(-1, a_idx, torch.nan_to_num(a_vals, neginf=0.0).clamp_min(0))
    loss = err.pow(2).mean() + (1 / 32) * (z_aux @ model.W_dec + err.detach()).pow(2).mean() \
        - 0.1 * (pre * dead).mean()  # AuxK on the residual, and the authors' dead-latent term
    assert (z_aux > 0).any()  # some dead latents have positive pre-activations: AuxK acts
    loss.backward()
    params = stacked([model], "parameters")
    _, grads, fired = train.sae_grads(x.unsqueeze(0), params["W_enc"], params["b_enc"], params["b_pre"],
                                  params["W_dec"], 3, dead_penalty=0.1, aux_dead=dead.unsqueeze(0),
                                  aux_k=8)
    assert torch.equal(fired[0] == 0, dead)
    for n, g in (("W_enc", grads["W_enc"]), ("b_enc", grads["b_enc"]), ("b_pre", grads["b_pre"]),
                 ("W_dec", grads["dictionary"])):
        ref = getattr(model, n).grad
        assert torch.allclose(g[0], ref, rtol=1e-4, atol=1e-5 * ref.abs().max()), n
    assert (grads["b_enc"][0, :20] < 0).all()  # a dead latent's pre-activation is pushed up


@pytest.mark.parametrize("name,kind", [("topk-random", "l2"), ("ra-kmeans-shared", "archetypal"),
                                       ("ra-projection-off-free", "projection-off"),
                                       ("topk-kmeans-shared-free", "identity")])
def test_the_authors_four_conditions_take_the_reference_models_step(name, kind):
    """One step of each Table 3 condition on identical weights and batch equals one step of the
    model as the authors' code builds it: their loss with the dead-latent term, overcomplete's
    clipping at norm 1, Adam 5e-3 (atoms 13-24 start at zero, past the 12 shared centroids)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=gen) + 3 * torch.randn(16, generator=gen)  # a mean: clips
    arch, init, decoder = configs.CONFIGURATIONS[name]
    centroids = starts.kmeans_centroids(x, 12, 0)
    ours = starts.make_sae(arch, init, x, 24, 3, 0, n_candidates=12, delta=0.1, decoder=decoder,
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
    arch_ = "topk" if isinstance(ours, sae.TopKSAE) else "ra"
    _, grads, _, _ = train.stacked_grads(arch_, stacked([ours], "parameters"), stacked([ours], "buffers"),
                                     x.unsqueeze(0), 3, dead_penalty=1e-3, clip_grad=1.0)
    names = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "Relax", "W": "W",
             "Lambda": "Relax", "multiplier": "multiplier"}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert set(ref_grads) == {names[n] for n in grads}  # the same trained parameters
    for n, g in grads.items():  # the same clipped gradients, dead-latent term included
        assert torch.allclose(g[0], ref_grads[names[n]], atol=1e-6), n
    out = train.train_saes([ours], x, [0], 64, 64, lr=5e-3, clip_grad=1.0, dead_penalty=1e-3,
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
    make = lambda: [starts.make_sae(arch, "kmeans-independent", data, 24, 4, s) for s in seeds]  # noqa: E731
    together = make()
    out = train.train_saes(together, data, seeds, batch * steps, batch, lr, snapshots=[],
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
                    m.W_dec.copy_(sae.unit_rows(m.W_dec))
                else:
                    m.project_()
        alone = dict(m.named_parameters())
        for n, p in together[seeds.index(s)].named_parameters():
            assert torch.allclose(p, alone[n], rtol=1e-3, atol=1e-5), (arch, s, n)


def test_topk_atoms_stay_unit_norm_and_loss_falls(data):
    models, out = train_runs("topk", "random", data, steps=40)
    norms = out["dictionaries"][-1].norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert torch.equal(models[1].dictionary().detach(), out["dictionaries"][-1, 1])
    assert (out["loss"][-5:].mean(0) < 0.8 * out["loss"][:5].mean(0)).all()


def test_archetypal_constraints_hold_after_training(data):
    models, _ = train_runs("ra", "kmeans-independent", data, delta=0.05, steps=30)
    for m in models:
        w = m.W.detach()
        assert (w >= 0).all()
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[0]), atol=1e-5)
        lam = m.Lambda.detach().norm(dim=-1)
        assert lam.max() <= 0.05 + 1e-6
        assert lam.max() > 0.049  # the clip is active, not vacuous
    free, _ = train_runs("ra", "kmeans-shared", data, decoder="unprojected", steps=30)
    assert (free[0].W.detach() < 0).any()  # projection off: W leaves the simplex


@pytest.mark.parametrize("arch,init,shared", [
    ("topk", "kmeans-shared", True), ("ra", "kmeans-shared", True),
    ("topk", "random", False), ("topk", "kmeans-independent", False),
    ("ra", "kmeans-independent", False), ("ra", "random-points", False), ("ra", "random", False)])
def test_step_zero_dictionaries_are_shared_only_under_kmeans_shared(data, arch, init, shared):
    _, out = train_runs(arch, init, data, steps=2)
    step0 = out["dictionaries"][0]
    assert out["tokens"][0] == 0
    dist = [metrics.mean_min_cosine_distance(a, b) for a, b in itertools.combinations(step0, 2)]
    if shared:
        # the same atoms up to each run's own scale (an RA-SAE's exp(m) is matched per run)
        unit = step0 / step0.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        assert all(torch.allclose(unit[0], u, atol=1e-6) for u in unit) and max(dist) < 1e-6
    else:
        assert min(dist) > 1e-4


def test_training_is_deterministic_and_memmap_equals_tensor(data, tmp_path):
    _, a = train_runs("ra", "random-points", data, steps=6)
    _, b = train_runs("ra", "random-points", data, steps=6)
    assert torch.equal(a["dictionaries"], b["dictionaries"]) and torch.equal(a["loss"], b["loss"])
    path = tmp_path / "x.npy"
    np.save(path, data.numpy())
    mm = np.load(path, mmap_mode="r")
    models = [starts.make_sae("ra", "random-points", data, 24, 4, seed=s) for s in (0, 1, 2)]
    c = train.train_saes(models, mm, [0, 1, 2], 64 * 6, 64, lr=3e-3, progress=False, device="cpu")
    assert torch.equal(a["dictionaries"], c["dictionaries"])


def test_learning_rate_decay_freezes_the_last_step(data):
    models, _ = train_runs("topk", "random", data, steps=10, lr_decay=0.1)  # the last step has lr 0
    before = [m.W_enc.detach().clone() for m in models]
    _, out = train_runs("topk", "random", data, steps=9, lr_decay=0.0)
    assert len(out["loss"]) == 9 and all(torch.isfinite(b).all() for b in before)


def test_non_finite_data_stops_training_and_nothing_is_saved(data, tmp_path):
    bad = data.clone()
    bad[100:105] = float("nan")
    models = [starts.make_sae("topk", "random", data, 24, 4, seed=s) for s in (0, 1)]
    path = tmp_path / "cell.safetensors"
    with pytest.raises(FloatingPointError, match="non-finite loss at step"):
        store.cached_result(path, {"k": 1}, lambda: train.train_saes(models, bad, [0, 1], 64 * 80, 64,
                                                             progress=False, device="cpu"))
    assert not list(tmp_path.iterdir())


def test_snapshot_schedule_is_log_dense_early_and_regular_later():
    steps = train.snapshot_steps(1000, n_log=12, n_linear=8)
    assert steps[0] == 0 and steps[-1] == 1000 and steps == sorted(set(steps))
    assert steps[1:4] == [1, 2, 4]
    assert {125, 250, 500, 750} <= set(steps)
    assert len([s for s in steps if s < 100]) >= 6  # dense early


@pytest.mark.parametrize("arch", ["topk", "ra"])
def test_a_trainer_restored_from_its_state_continues_bit_for_bit(data, arch, tmp_path):
    def trainer():
        models = [starts.make_sae(arch, "random", data, 24, 4, seed=s) for s in (0, 1)]
        return train.SAETrainer(models, data, [0, 1], 64, 3e-3, dead_penalty=1e-3, progress=False,
                                device="cpu")
    lr_at = train.decay_schedule(3e-3, 150, 40)
    whole = trainer()
    whole.advance(150, lr_at)  # 64 steps per epoch: the interruption falls mid-epoch
    first = trainer()
    first.advance(70, lr_at)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = trainer()  # a fresh process would rebuild the same models, then load the state
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    resumed.advance(150, lr_at)
    for n in whole.params:
        assert torch.equal(whole.params[n], resumed.params[n]), n
    assert torch.equal(torch.stack(whole.losses), torch.stack(resumed.losses))
    assert torch.equal(whole.dictionaries(), resumed.dictionaries())


@pytest.mark.parametrize("arch,init", [("topk", "random"), ("ra", "random-points")])
def test_bfloat16_matmuls_train_as_well_reproducibly_and_keep_float32_state(data, arch, init):
    _, full = train_runs(arch, init, data, steps=40)
    models, half = train_runs(arch, init, data, steps=40, precision="bfloat16")
    _, again = train_runs(arch, init, data, steps=40, precision="bfloat16")
    assert torch.equal(half["loss"], again["loss"]) and torch.equal(half["dictionaries"], again["dictionaries"])
    assert not torch.equal(half["loss"], full["loss"])  # the matmuls did run in bfloat16
    assert all(p.dtype == torch.float32 for m in models for p in m.parameters())
    # same training, within the precision's noise: the final losses agree to a few percent
    assert torch.allclose(half["loss"][-5:].mean(0), full["loss"][-5:].mean(0), rtol=0.05)
    assert (half["loss"][-5:].mean(0) < 0.8 * half["loss"][:5].mean(0)).all()


def test_an_unknown_precision_is_refused_and_emulated_bfloat16_warns(monkeypatch):
    with pytest.raises(ValueError, match=r"precision='float16' is not allowed; choose one of \['float32', 'bfloat16'\]"):
        train.check_precision("float16", torch.device("cpu"))
    monkeypatch.setattr(parameters, "native_bf16", lambda device: False)
    with pytest.warns(UserWarning, match="no native bfloat16 matmul"):
        assert train.check_precision("bfloat16", torch.device("cpu")) == torch.bfloat16
