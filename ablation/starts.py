"""Initializations: k-means, candidate points, and building one SAE for a run."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .configs import ARCHITECTURES, DECODERS, INITS
from .parameters import check_choice, check_finite, check_sae_sizes
from .sae import RelaxedArchetypalSAE, TopKSAE, match_start_scale_


def kmeans_centroids(x: torch.Tensor | np.ndarray, n_centroids: int, seed: int,
                     max_iter: int = 300) -> torch.Tensor:
    """scikit-learn KMeans centroids as the reference fits them (k-means++ start, one init, Lloyd,
    scikit-learn's default max_iter and tol), deterministic per seed."""
    from sklearn.cluster import KMeans

    x = np.asarray(x, dtype=np.float32)
    check_finite("x", x)
    if not 1 <= n_centroids <= len(x):
        raise ValueError(f"n_centroids={n_centroids} must lie in 1..{len(x)} (number of points)")
    km = KMeans(n_clusters=n_centroids, n_init=1, max_iter=max_iter, random_state=seed)
    return torch.from_numpy(km.fit(x).cluster_centers_.astype(np.float32))


def initial_points(init: str, x: torch.Tensor, n_points: int, seed: int,
                   shared_seed: int = 0, shared_points: torch.Tensor | None = None) -> torch.Tensor:
    """The n_points starting points of one run: TopK decoder atoms or RA-SAE candidates.

    random: a seeded Gaussian cloud with the data's per-dimension mean and std; kmeans-shared:
    k-means with ``shared_seed`` (identical for every run; ``shared_points`` when precomputed);
    kmeans-independent: k-means with the run's own seed; random-points: activation vectors
    drawn with the run's own seed.
    """
    check_choice("init", init, INITS["ra"])
    gen = torch.Generator().manual_seed(seed)
    if init == "random":
        return x.mean(0) + torch.randn(n_points, x.shape[1], generator=gen) * x.std(0)
    if init == "random-points":
        if n_points > len(x):
            raise ValueError(f"n_candidates={n_points} exceeds the {len(x)} points of the fit sample")
        return x[torch.randperm(len(x), generator=gen)[:n_points]].clone()
    if init == "kmeans-shared" and shared_points is not None:
        if len(shared_points) != n_points:
            raise ValueError(f"shared_points has {len(shared_points)} rows, expected {n_points}")
        return shared_points.clone()
    return kmeans_centroids(x, n_points, shared_seed if init == "kmeans-shared" else seed)


def pad_rows(points: torch.Tensor, n: int) -> torch.Tensor:
    """The first n rows of points, zero rows appended when there are fewer: eye(n, len(points)) @ points."""
    pad = points.new_zeros(max(n - len(points), 0), points.shape[1])
    return torch.cat([points[:n], pad])


def make_sae(arch: str, init: str, x: torch.Tensor, n_latents: int, k: int, seed: int,
             n_candidates: int | None = None, delta: float = 1.0, decoder: str | None = None,
             shared_seed: int = 0, shared_points: torch.Tensor | None = None,
             match_scale: bool = True, pre_bias: bool = True,
             center_encoder: bool = False) -> nn.Module:
    """Build one TopK SAE or RA-SAE for a run, its decoder started by ``init`` on data x.

    x is the (already preprocessed) fit sample used for k-means, candidate points and the start
    scale. ``decoder`` is one of ``DECODERS[arch]`` (None: the first). A TopK SAE with
    ``init='random'`` starts with seeded unit Gaussian atoms; its other starts take n_candidates
    points (k-means centroids) as atoms, exactly as an RA-SAE starts with W = eye(n_latents,
    n_candidates): atoms past n_candidates start at zero. A TopK SAE starts with b_pre at the data
    mean (Gao et al. use the geometric median). The RA decoder ``"relax"`` is the reference's
    projection=False: a free-row TopK SAE with no pre-bias whose atoms start at W C, with the
    RA-SAE's encoder. ``match_scale`` sets the start scale (``match_start_scale_``) so the first
    reconstruction has the data's norm.
    """
    check_choice("arch", arch, ARCHITECTURES)
    check_choice("init", init, INITS[arch])
    decoder = decoder or DECODERS[arch][0]
    check_choice("decoder", decoder, DECODERS[arch])
    check_sae_sizes(x.shape[1], n_latents, k)
    check_finite("x", x)
    n_c = n_candidates or n_latents
    shift = x.mean(0) if center_encoder else None
    if arch == "topk":
        atoms = None if init == "random" else pad_rows(
            initial_points(init, x, n_c, seed, shared_seed, shared_points), n_latents)
        sae = TopKSAE(x.shape[1], n_latents, k, seed, atoms, pre_bias, decoder)
        if pre_bias:
            with torch.no_grad():
                sae.b_pre.copy_(x.mean(0))
    elif decoder == "relax":
        atoms = pad_rows(initial_points(init, x, n_c, seed, shared_seed, shared_points), n_latents)
        sae = TopKSAE(x.shape[1], n_latents, k, seed, atoms, False, "free", shift)
    else:
        candidates = initial_points(init, x, n_c, seed, shared_seed, shared_points)
        sae = RelaxedArchetypalSAE(x.shape[1], n_latents, k, candidates, delta,
                                   decoder == "projected", seed, shift)
    if match_scale:
        match_start_scale_(sae, x)
    return sae
