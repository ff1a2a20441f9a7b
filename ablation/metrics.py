"""Distances between dictionaries and reconstruction metrics."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .sae import unit_rows


def _cosine(a: torch.Tensor, b: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    """Cosine-similarity matrix between rows of a and b, after subtracting center if given.

    A zero row (an atom that never left zero) has cosine 0 with every atom: it counts as
    maximally distant from everything and never as a match; no NaN arises.
    """
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if center is not None:
        c = torch.as_tensor(center).double()
        a, b = a - c, b - c
    return unit_rows(a) @ unit_rows(b).T


def _mean_min(cos: torch.Tensor) -> float:
    """Symmetric mean-min cosine distance from a cosine-similarity matrix."""
    return float(((1 - cos.max(1).values).mean() + (1 - cos.max(0).values).mean()) / 2)


def _hungarian(cost: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Optimal one-to-one assignment (scipy linear_sum_assignment) minimizing cost."""
    return linear_sum_assignment(cost.detach().cpu().numpy())


def _matched_cosines(cos: torch.Tensor) -> torch.Tensor:
    """Cosines of the one-to-one matching that maximizes total cosine."""
    r, c = _hungarian(-cos)
    return cos[r, c]


def mean_min_cosine_distance(a: torch.Tensor, b: torch.Tensor,
                             center: torch.Tensor | None = None) -> float:
    """Symmetric mean over atoms of the minimum cosine distance to the other dictionary."""
    return _mean_min(_cosine(a, b, center))


def hungarian_cosine_distance(a: torch.Tensor, b: torch.Tensor,
                              center: torch.Tensor | None = None) -> float:
    """Mean cosine distance over the optimal one-to-one matching of atoms (1 - PW-MCC)."""
    return float((1 - _matched_cosines(_cosine(a, b, center))).mean())


def matched_share(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.7,
                  center: torch.Tensor | None = None) -> float:
    """Share of Hungarian-matched atom pairs with cosine >= threshold (Paulo & Belrose)."""
    return float((_matched_cosines(_cosine(a, b, center)) >= threshold).double().mean())


def hungarian_l2_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean L2 distance over the optimal one-to-one matching of atoms (no angles involved)."""
    cost = torch.cdist(torch.as_tensor(a).double(), torch.as_tensor(b).double(),
                       compute_mode="donot_use_mm_for_euclid_dist")
    r, c = _hungarian(cost)
    return float(cost[r, c].mean())


def standardized_codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes (tokens x latents) with each latent centered and scaled to unit norm, float32: the
    product of two runs' standardized codes is their latents' Pearson correlation matrix (a latent
    that never fires stays a zero column, correlation 0 with everything)."""
    z = torch.as_tensor(codes).detach().double()
    z = z - z.mean(0)
    return (z / z.norm(dim=0).clamp_min(1e-12)).float()


def matched_correlations(std_a: torch.Tensor, std_b: torch.Tensor) -> tuple[float, float]:
    """Mean Pearson correlation of latents matched one-to-one by their activations, from two runs'
    standardized codes on the same tokens: (alive only, all latents). Alive only: the matching
    runs among the latents that fire in each run (min(alive_a, alive_b) pairs; NaN when a run has
    none), so two runs that differ only by dead latents score 1. All latents: every latent is
    matched and one that never fires counts as correlation 0, which makes the number partly a
    count of dead latents. One correlation matrix serves both (its alive sub-block)."""
    corr = (std_a.T @ std_b).double()
    r, c = _hungarian(-corr)
    every = float(corr[r, c].mean())
    alive_a, alive_b = std_a.ne(0).any(0), std_b.ne(0).any(0)
    if not alive_a.any() or not alive_b.any():
        return float("nan"), every
    sub = corr[alive_a][:, alive_b]
    r, c = _hungarian(-sub)
    return float(sub[r, c].mean()), every


def matched_activation_correlation(codes_a: torch.Tensor, codes_b: torch.Tensor,
                                   alive_only: bool = True) -> float:
    """Mean Pearson correlation of latents matched one-to-one by their activations on the same
    data (``matched_correlations``): among the latents alive in both runs, or over all latents."""
    alive, every = matched_correlations(standardized_codes(codes_a), standardized_codes(codes_b))
    return alive if alive_only else every


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained, sum |x - x_hat|^2 / sum |x - mean(x)|^2 (per-dim mean)."""
    x, x_hat = torch.as_tensor(x).double(), torch.as_tensor(x_hat).double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def scalar_mean_r2(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """The misleading R^2 some libraries report: 1 - SSE / sum |x - one scalar mean|^2."""
    x, x_hat = torch.as_tensor(x).double(), torch.as_tensor(x_hat).double()
    return float(1 - (x - x_hat).pow(2).sum() / (x - x.mean()).pow(2).sum())


def l0(codes: torch.Tensor) -> float:
    """Mean number of non-zero latents per token."""
    return float((torch.as_tensor(codes) != 0).double().sum(-1).mean())


def dead_fraction(codes: torch.Tensor) -> float:
    """Fraction of latents that never fire on the given tokens."""
    return float((torch.as_tensor(codes) != 0).sum(0).eq(0).double().mean())


def pair_matrices(dicts: torch.Tensor) -> dict[str, np.ndarray]:
    """Run-by-run matrices (NaN diagonal) of mean-min, Hungarian cosine distance and matched share.

    ``dicts`` is (n_runs, n_atoms, d); one cosine matrix per pair serves all three metrics.
    """
    s = len(dicts)
    out = {m: np.full((s, s), np.nan) for m in ("mean_min", "hungarian", "matched_share")}
    unit = unit_rows(torch.as_tensor(dicts).double())
    for i, j in itertools.combinations(range(s), 2):
        cos = unit[i] @ unit[j].T
        matched = _matched_cosines(cos)
        for name, v in (("mean_min", _mean_min(cos)), ("hungarian", float((1 - matched).mean())),
                        ("matched_share", float((matched >= 0.7).double().mean()))):
            out[name][i, j] = out[name][j, i] = v
    return out
