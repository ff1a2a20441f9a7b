"""Notebook 04's tests recomputed on the cells of one robustness variant (notebook 05)."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import torch

from .decisions import falsification_tests, quality_gate
from .grid import cell_timing, load_cell
from .stats import cell_endpoint, cell_trajectory, endpoint_summary


def variant_tests(folders: Mapping[str, str | os.PathLike], preprocessing: Sequence[str],
                  x_eval: torch.Tensor, x_train: torch.Tensor, max_fvu: float, margin: float,
                  n_boot: int, seed: int) -> dict:
    """The falsification tests of a variant's cells through notebook 04's functions: the quality
    gate, then every comparison under the margin. ``folders`` maps each configuration to the run
    folder whose saes/ hold its cells (the variant's own, or the profile's where the variant does
    not change them). Returns the test rows, the skipped comparisons, the flagged cells with why,
    and each cell's step-0 and final Hungarian distance (mean over run pairs), held-out FVU and
    training seconds (None if saved by older code; a resumed cell's counts its last process only)."""
    keys = [(n, p) for n in folders for p in preprocessing]
    cells = {k: load_cell(folders[k[0]], *k) for k in keys}
    traj = {k: cell_trajectory(c) for k, c in cells.items()}
    excluded, cell_rows = {}, {}
    for k, cell in cells.items():
        end = cell_endpoint(cell, x_eval, k[0], x_train)
        summary = endpoint_summary({m: traj[k][m][-1] for m in ("mean_min", "hungarian", "matched_share")},
                                   end, n_boot, seed)
        excluded[k] = quality_gate(summary["fvu"][0], cell["convergence"], max_fvu)
        cell_rows["__".join(k)] = {"step0_hungarian": float(np.nanmean(traj[k]["hungarian"][0])),
                                   "end_hungarian": float(np.nanmean(traj[k]["hungarian"][-1])),
                                   "fvu": summary["fvu"][0], "tokens": int(traj[k]["tokens"][-1]),
                                   "flagged": "; ".join(excluded[k]), **cell_timing(cell)}
    tests, skipped = falsification_tests(traj, preprocessing, excluded, margin, n_boot, seed)
    return {"tests": tests, "skipped": skipped, "cells": cell_rows}
