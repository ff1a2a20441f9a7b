"""One cell of the grid: a configuration on one preprocessing, all its seeds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .activations import fit_sample
from .configs import CONFIGURATIONS
from .sae import RelaxedArchetypalSAE, TopKSAE, match_start_scale_
from .starts import make_sae
from .store import load_result
from .train import train_saes


def training_set(acts: np.ndarray, train_tokens: int, seed: int) -> np.ndarray | torch.Tensor:
    """The activations the SAEs train on: the whole cache (train_tokens=0), or a fixed set of
    train_tokens rows drawn with seed, held in memory and passed over in epochs."""
    if not train_tokens:
        return acts
    if train_tokens > len(acts):
        raise ValueError(f"train_tokens={train_tokens:,} exceeds the {len(acts):,} cached activations")
    return fit_sample(acts, train_tokens, seed)


def fvu_of_mse(mse: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    """A training MSE (mean over tokens and dimensions) as FVU against the data x's own spread."""
    return mse * x.shape[1] / float((x - x.mean(0)).pow(2).sum(1).mean())


def train_cell(name: str, prep: str, data: np.ndarray | torch.Tensor, sample: torch.Tensor,
               seeds: Sequence[int], *, n_latents: int, k: int, n_candidates: int, delta: float,
               sae_tokens: int, sae_batch_size: int, sae_lr: float, lr_decay: float,
               clip_grad: float | None, dead_penalty: float, aux_k: int, aux_dead_tokens: int,
               match_start_scale: bool, pre_bias: bool, center_encoder: bool,
               kmeans_shared_seed: int, snapshots: Sequence[int],
               shared_points: torch.Tensor | None = None, device: str = "auto") -> dict:
    """Train every seed of one configuration on one preprocessing: one cell of the grid.

    ``sample`` is the raw fit sample (k-means, candidates, the start scale, and the mean that
    'centered' subtracts); ``data`` what the runs train on. Returns the snapshots, losses, the
    share of clipped steps, the trained state of every run, the mean and each run's start scale.
    """
    arch, init, decoder = CONFIGURATIONS[name]
    mu = sample.mean(0)
    x = sample - mu if prep == "centered" else sample
    models = [make_sae(arch, init, x, n_latents, k, s, n_candidates, delta, decoder,
                       kmeans_shared_seed, shared_points, False, pre_bias, center_encoder)
              for s in seeds]
    scales = [match_start_scale_(m, x) if match_start_scale else 1.0 for m in models]
    out = train_saes(models, data, seeds, sae_tokens, sae_batch_size, sae_lr, snapshots,
                     shift=mu if prep == "centered" else None, clip_grad=clip_grad,
                     dead_penalty=dead_penalty, aux_k=aux_k if arch == "topk" else 0,
                     aux_dead_tokens=aux_dead_tokens, lr_decay=lr_decay, device=device)
    return {**out, "seeds": list(seeds), "state_dicts": [m.state_dict() for m in models],
            "mean": mu, "start_scale": scales}


def load_cell(run_dir: str | os.PathLike, name: str, prep: str) -> dict:
    """A cell saved by notebook 02, verified; a clear error when it is missing or corrupt."""
    path = Path(run_dir) / "saes" / f"{name}__{prep}.safetensors"
    cell = load_result(path, {})
    if cell is None:
        raise FileNotFoundError(f"{path} is missing or corrupt: run notebook 02 with "
                                f"configurations=[{name!r}] and preprocessing=[{prep!r}]")
    return cell


def sae_from_state(state: dict, meta: dict, decoder: str = "projected") -> nn.Module:
    """Rebuild a trained TopKSAE or RelaxedArchetypalSAE from its state_dict and cell meta;
    ``decoder`` is its configuration's (``CONFIGURATIONS``)."""
    n, d = state["W_enc"].shape
    if "candidates" in state:
        sae = RelaxedArchetypalSAE(d, n, meta["k"], state["candidates"], meta["delta"],
                                   decoder == "projected", encoder_shift=state.get("enc_shift"))
    else:
        sae = TopKSAE(d, n, meta["k"], pre_bias=meta.get("pre_bias", True) and decoder != "relax",
                      decoder_norm="unit" if decoder == "unit" else "free",
                      encoder_shift=state.get("enc_shift"))
    sae.load_state_dict(state)
    return sae.eval()


def start_scale_effect(configurations: Sequence[str], preprocessing: Sequence[str],
                       data: np.ndarray | torch.Tensor, sample: torch.Tensor, n_steps: int,
                       seed: int, shared: dict[str, torch.Tensor], **train: object) -> list[dict]:
    """Training FVU over the last tenth of the first n_steps, with and without the start scale.

    One run (``seed``) per configuration and preprocessing, trained as the grid trains it;
    ``shared`` holds each preprocessing's shared k-means centroids.
    """
    rows = []
    for name in configurations:
        for prep in preprocessing:
            x = sample - sample.mean(0) if prep == "centered" else sample
            row = {"configuration": name, "preprocessing": prep}
            for match in (False, True):
                cell = train_cell(name, prep, data, sample, [seed], **{
                    **train, "match_start_scale": match, "shared_points": shared.get(prep),
                    "sae_tokens": n_steps * train["sae_batch_size"], "snapshots": []})
                loss = cell["loss"][-max(1, n_steps // 10):].mean()
                row["scaled" if match else "reference"] = float(fvu_of_mse(loss, x))
            rows.append(row)
    return rows
