"""Initializations."""

from __future__ import annotations

import torch

from ablation import sae, starts


def test_archetypal_atoms_start_on_the_candidates_and_past_them_at_zero():
    cand = torch.randn(12, 6) + 5
    assert torch.allclose(sae.RelaxedArchetypalSAE(6, 10, 3, cand).dictionary(), cand[:10])
    wide = sae.RelaxedArchetypalSAE(6, 20, 3, cand)  # the reference's W = eye(20, 12)
    assert torch.allclose(wide.dictionary()[:12], cand) and (wide.dictionary()[12:] == 0).all()
    x = torch.randn(300, 6) + 5
    topk = starts.make_sae("topk", "kmeans-shared", x, 20, 3, 0, n_candidates=12, match_scale=False)
    assert (topk.W_dec[12:] == 0).all() and torch.allclose(topk.W_dec[:12].norm(dim=1), torch.ones(12))
