"""Does bfloat16 move the report's numbers? One default cell per architecture, both precisions,
three disjoint seed sets.

The two cells are a start-matched pair of the default grid on centered activations
(``ra-random-points`` and ``topk-random-points``), trained as notebook 02 builds them, for a fixed
budget (``--tokens`` at the full rate, then the profile's final decay). For each seed set and
precision it records each cell's endpoint (mean Hungarian distance over run pairs) and the
test difference (RA minus TopK). bfloat16 is adoptable when the largest change the precision
makes, over seed sets, is smaller than the spread of the same number over seed sets in float32.
It reads the default profile's activation cache (run ``make report`` first, or stages 00-01) and
writes ``report/precision_study.json``, which the README's generated block reads.

    python benchmarks/precision_study.py [--tokens 2000000] [--runs 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import helpers as h
from ablation.grid import build_cell
from ablation.metrics import pair_matrices
from ablation.parameters import native_bf16

CELLS = ("ra-random-points", "topk-random-points")  # the challenger first, then its TopK twin
PRECISIONS = ("float32", "bfloat16")


def endpoint(dicts: torch.Tensor) -> float:
    """Mean Hungarian cosine distance over every pair of runs of one cell."""
    return float(np.nanmean(pair_matrices(dicts)["hungarian"]))


def main() -> None:
    """Train both cells in both precisions over three seed sets; print and write the comparison."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2_000_000, help="tokens per run (with the decay)")
    p.add_argument("--runs", type=int, default=4, help="runs per cell and seed set")
    p.add_argument("--run-dir", default="runs/default")
    p.add_argument("--out", default="report/precision_study.json")
    a = p.parse_args()
    names = ("n_fit_tokens", "seed", "n_latents", "k", "n_candidates", "delta", "match_start_scale",
             "pre_bias", "center_encoder", "kmeans_shared_seed", "sae_batch_size", "sae_lr",
             "clip_grad", "dead_penalty", "lr_decay")
    prm = h.resolve_parameters({"profile": "default", **dict.fromkeys(names)})
    acts = h.open_cache(Path(a.run_dir) / "acts_train.npy")
    sample = h.fit_sample(acts, prm["n_fit_tokens"], prm["seed"])
    mu = sample.mean(0)
    build = {k: prm[k] for k in ("n_latents", "k", "n_candidates", "delta", "match_start_scale",
                                 "pre_bias", "center_encoder", "kmeans_shared_seed")}
    seed_sets = [list(range(i * a.runs, (i + 1) * a.runs)) for i in range(3)]
    rows = []
    for seeds in seed_sets:
        for prec in PRECISIONS:
            row = {"seeds": seeds, "precision": prec}
            for name in CELLS:
                models, _ = build_cell(name, "centered", sample, seeds, **build)
                t = time.perf_counter()
                out = h.train_saes(models, acts, seeds, a.tokens, prm["sae_batch_size"], prm["sae_lr"],
                                   [a.tokens // prm["sae_batch_size"]], shift=mu,
                                   clip_grad=prm["clip_grad"], dead_penalty=prm["dead_penalty"],
                                   lr_decay=prm["lr_decay"], progress=False, precision=prec)
                row[name] = endpoint(out["dictionaries"][-1])
                row[f"{name}_seconds"] = time.perf_counter() - t
            row["difference"] = row[CELLS[0]] - row[CELLS[1]]
            rows.append(row)
            print(json.dumps(row))
    summary = {}
    for key in (*CELLS, "difference"):
        by = {prec: np.array([r[key] for r in rows if r["precision"] == prec]) for prec in PRECISIONS}
        moved = float(np.abs(by["bfloat16"] - by["float32"]).max())
        spread = float(by["float32"].max() - by["float32"].min())
        summary[key] = {"precision_moves": moved, "seed_set_spread": spread, "within": moved < spread}
    speed = {prec: sum(r[f"{n}_seconds"] for r in rows if r["precision"] == prec for n in CELLS)
             for prec in PRECISIONS}
    result = {"cells": list(CELLS), "preprocessing": "centered", "tokens": a.tokens, "runs": a.runs,
              "seed_sets": seed_sets, "rows": rows, "summary": summary,
              "seconds": speed, "speedup_bfloat16": speed["float32"] / speed["bfloat16"],
              "adopt_bfloat16": all(s["within"] for s in summary.values()),
              "native_bf16": native_bf16(torch.device("cpu")), "threads": torch.get_num_threads()}
    h.write_json_atomic(a.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
