"""The two models: shapes, sparsity, starts and the start scale."""

from __future__ import annotations

import pytest
import torch

from ablation import sae, starts


def test_topk_sae_keeps_exactly_k_latents():
    model = sae.TopKSAE(16, 64, 5, seed=0)
    with torch.no_grad():
        model.b_enc.fill_(10.0)  # every pre-activation positive: exactly k survive
    x_hat, codes = model(torch.randn(200, 16))
    assert x_hat.shape == (200, 16)
    assert ((codes != 0).sum(-1) == 5).all()
    model = sae.TopKSAE(16, 64, 5, seed=0)
    _, codes = model(torch.randn(200, 16))
    assert ((codes != 0).sum(-1) <= 5).all() and (codes >= 0).all()


def test_start_scale_matches_the_data_and_keeps_every_selected_latent(data):
    for arch in ("topk", "ra"):
        raw = starts.make_sae(arch, "kmeans-independent" if arch == "ra" else "random", data, 24, 4, 0,
                         match_scale=False)
        scaled = starts.make_sae(arch, "kmeans-independent" if arch == "ra" else "random", data, 24, 4, 0)
        (v0, i0), (v1, i1) = raw.encode(data), scaled.encode(data)
        assert torch.equal(i0, i1)
        assert torch.allclose(sae.unit_rows(raw.dictionary()), sae.unit_rows(scaled.dictionary()), atol=1e-6)
        if arch == "ra":  # the archetypal scale parameter carries it: exp(m) = alpha
            assert float(scaled.multiplier.detach()) < 0 and torch.equal(raw.W_enc, scaled.W_enc)
        recon = scaled.decode(v1, i1).detach() - (scaled.b_pre.detach() if arch == "topk" else 0)
        target = data - (scaled.b_pre.detach() if arch == "topk" else 0)
        assert float(recon.norm() / target.norm()) == pytest.approx(1.0, rel=1e-4)


def test_whether_atoms_carry_the_mean_is_read_from_the_model():
    x = torch.randn(200, 8) + 5
    build = lambda arch, init, decoder, pre_bias: starts.make_sae(  # noqa: E731
        arch, init, x, 8, 2, 0, 8, 1.0, decoder, pre_bias=pre_bias)
    assert sae.atoms_carry_mean(build("ra", "random-points", "projected", True))  # points, no bias
    assert sae.atoms_carry_mean(build("ra", "kmeans-shared", "relax", True))  # free rows, no bias
    assert sae.atoms_carry_mean(build("topk", "kmeans-shared", "free", False))
    assert not sae.atoms_carry_mean(build("topk", "kmeans-shared", "free", True))  # b_pre absorbs it
    assert not sae.atoms_carry_mean(build("topk", "random", "unit", False))  # unit directions
