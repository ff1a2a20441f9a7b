"""What a cell's record keeps of its runs at one budget: held-out reconstruction per run, and the
distances and agreements between every pair of runs."""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .metrics import (
    dead_fraction, fvu, hungarian_cosine_distance, hungarian_l2_distance, l0, matched_correlations,
    pair_matrices, standardized_codes,
)
from .sae import RelaxedArchetypalSAE, atoms_carry_mean

# the run-by-run matrices of a budget's evaluation; the first three are also measured at every
# trunk snapshot
PAIR_METRICS = ("mean_min", "hungarian", "matched_share", "hungarian_alive", "hungarian_read",
                "hungarian_l2", "activation_corr", "activation_corr_all", "dead_share")
RUN_METRICS = ("fvu", "fvu_train", "l0", "dead_fraction")


def read_atoms(sae: nn.Module, mean: torch.Tensor) -> torch.Tensor:
    """A model's atoms as recovery reads them, by a rule the model decides: where its atoms are
    points that must carry the data mean (``sae.atoms_carry_mean``), the point each atom is minus
    the mean (an RA-SAE's point is W C + Lambda, its atom before the scale exp(m)); unit-norm
    directions beside a bias that absorbs the mean, as they are."""
    atoms = sae.dictionary().detach().double()
    if not atoms_carry_mean(sae):
        return atoms
    if isinstance(sae, RelaxedArchetypalSAE):
        atoms = atoms / sae.multiplier.detach().double().exp()
    return atoms - mean.double()


@torch.no_grad()
def evaluate_runs(saes: Sequence[nn.Module], x_eval: torch.Tensor, x_train: torch.Tensor,
                  mean: torch.Tensor) -> dict:
    """Every number a record keeps of a cell's runs at one budget, on activations already
    preprocessed as the runs saw them (``mean``: the mean of that data).

    Per run: held-out FVU (per-dimension mean), FVU on as many training activations, L0 and the
    share of latents dead on the held-out tokens. Per pair of runs: mean-min and Hungarian cosine
    distance and the share matched at cosine >= 0.7 (all atoms); the Hungarian distance over the
    atoms alive in both runs (a dead atom stays near its start); the Hungarian distance of the
    atoms as read (``read_atoms``); the Hungarian-matched L2 distance; the activation correlation
    of matched latents alive in both runs and over all latents (dead ones count 0); and the
    pair's mean dead share. Returns {'runs': {metric: [value per run]}, 'pairs': {metric: matrix
    (runs x runs, NaN diagonal)}}.
    """
    runs = {m: [] for m in RUN_METRICS}
    codes = []
    for sae in saes:
        x_hat, z = sae(x_eval)
        codes.append(z)
        runs["fvu"].append(fvu(x_eval, x_hat))
        runs["fvu_train"].append(fvu(x_train, sae(x_train)[0]))
        runs["l0"].append(l0(z))
        runs["dead_fraction"].append(dead_fraction(z))
    atoms = torch.stack([sae.dictionary().detach() for sae in saes])
    read = [read_atoms(sae, mean) for sae in saes]
    alive = [z.ne(0).any(0) for z in codes]
    std = [standardized_codes(z) for z in codes]
    n = len(saes)
    pairs = {**pair_matrices(atoms), **{m: np.full((n, n), np.nan) for m in PAIR_METRICS[3:]}}
    for i, j in itertools.combinations(range(n), 2):
        both = alive[i].any() and alive[j].any()
        corr_alive, corr_all = matched_correlations(std[i], std[j])
        values = {
            "hungarian_alive": hungarian_cosine_distance(atoms[i][alive[i]], atoms[j][alive[j]])
            if both else float("nan"),
            "hungarian_read": hungarian_cosine_distance(read[i], read[j]),
            "hungarian_l2": hungarian_l2_distance(atoms[i], atoms[j]),
            "activation_corr": corr_alive,
            "activation_corr_all": corr_all,
            "dead_share": (runs["dead_fraction"][i] + runs["dead_fraction"][j]) / 2,
        }
        for m, v in values.items():
            pairs[m][i, j] = pairs[m][j, i] = v
    return {"runs": runs, "pairs": pairs}
