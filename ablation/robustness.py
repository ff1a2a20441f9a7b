"""Notebook 04's tests recomputed on the records of one robustness variant (notebook 05)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .decisions import falsification_tests, quality_gate, tests_over_budgets, verdict_over_budgets
from .stats import cell_budgets, cell_trajectory, endpoint_summary


def variant_tests(records: Mapping[tuple[str, str], dict], reading: str, preprocessing: Sequence[str],
                  max_fvu: float, max_dead_share: float, margin: float, tolerance: float,
                  n_boot: int, seed: int) -> dict:
    """The falsification tests of a variant's cells through notebook 04's functions, read after
    the cooldown ('branch') or on the trunk ('trunk'): the quality gate, every comparison at the
    largest budget under the margin, and its verdict over budgets. Returns the test rows, the
    skipped comparisons, the verdict over budgets, and per cell its step-0 and final Hungarian
    distance (mean over run pairs), held-out FVU, budget and training seconds."""
    budgets = {k: {r: cell_budgets(rec, r) for r in ("branch", "trunk")} for k, rec in records.items()}
    if reading == "trunk":  # the variant's own reading stands where notebook 04 reads the branch
        budgets = {k: {"branch": b["trunk"], "trunk": b["trunk"]} for k, b in budgets.items()}
    ends = {k: b["branch"][-1] for k, b in budgets.items()}
    excluded, cells = {}, {}
    for k, end in ends.items():
        summary = endpoint_summary(end, n_boot, seed)
        excluded[k] = quality_gate(summary["fvu"][0], summary["dead_fraction"][0], max_fvu, max_dead_share)
        step0 = cell_trajectory(records[k])["hungarian"][0]
        cells["__".join(k)] = {"step0_hungarian": float(np.nanmean(step0)),
                               "end_hungarian": float(np.nanmean(end["pairs"]["hungarian"])),
                               "fvu": summary["fvu"][0], "tokens": int(end["tokens"]),
                               "flagged": "; ".join(excluded[k]),
                               "train_seconds": records[k]["made"]["seconds"]["train"]}
    tests, skipped = falsification_tests({k: e["pairs"] for k, e in ends.items()}, preprocessing,
                                         excluded, margin, n_boot, seed)
    over = tests_over_budgets(budgets, preprocessing, margin, n_boot, seed)
    return {"tests": tests, "skipped": skipped, "cells": cells,
            "over_budgets": verdict_over_budgets(over, budgets, tolerance, excluded)}
