"""Cells in parallel or one after another: Dask workers of one thread each against this process
with all the threads, on a profile's shapes.

Four cells (two TopK, two RA-SAE, the profile's runs per cell, random Gaussian activations of the
profile's width) train for a fixed budget through ``cluster.map_cells``, once with
``scheduler="serial"`` (one process, torch's threads = the CPU cores) and once with
``scheduler="local"`` (one single-thread worker process per core). The faster is the one the
``scheduler`` parameter should default to. The last line printed is one JSON object.

    python benchmarks/bench_scheduler.py [--profile default] [--steps 150] [--d 576 for smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ablation import cluster, grid, parameters

CELLS = ("topk-random", "topk-random-points", "ra-random-points", "ra-projection-off")
SHAPE = ("d_model", "n_latents", "k", "n_candidates", "seeds", "sae_batch_size", "sae_lr", "delta",
         "clip_grad", "dead_penalty", "lr_decay", "match_start_scale", "pre_bias", "center_encoder")


def jobs(prm: dict, cache: Path, run_dir: Path, steps: int) -> list[grid.CellJob]:
    """The four cells at the profile's settings, each judged converged at ``steps`` steps (then the decay)."""
    tokens = steps * prm["sae_batch_size"]
    train = {k: prm[k] for k in SHAPE if k not in ("d_model", "seeds")} | dict(
        min_sae_tokens=tokens, max_sae_tokens=2 * tokens, converge_tolerance=10.0, aux_k=0,
        aux_dead_tokens=100_000, kmeans_shared_seed=0, n_log_snapshots=4, snapshots_per_doubling=4,
        n_boot=200, seed=0, device="cpu", precision="float32")
    return [grid.CellJob(str(run_dir), n, "centered", str(cache), tuple(prm["seeds"]), {"cell": n},
                         train, n_fit_tokens=20_000) for n in CELLS]


def main() -> None:
    """Time both schedulers on the profile's shapes; print and return the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="default")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--d", type=int, default=None, help="activation width (default: the profile's "
                   "d_model; a hub or packaged model has its own, e.g. 576 for smollm2)")
    a = p.parse_args()
    prm = parameters.resolve_parameters({"profile": a.profile, **dict.fromkeys(SHAPE)})
    cores, d = os.cpu_count() or 1, a.d or prm["d_model"]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "acts.npy"
        gen = np.random.default_rng(0)
        np.save(cache, (gen.standard_normal((60_000, d), dtype=np.float32) + 2.0))
        times = {}
        for scheduler in ("serial", "local"):
            t = time.perf_counter()
            with cluster.cell_runner(scheduler, cores) as client:
                cluster.map_cells(jobs(prm, cache, Path(tmp) / scheduler, a.steps), client)
            times[scheduler] = time.perf_counter() - t
    out = {"profile": a.profile, "cores": cores, "threads_serial": torch.get_num_threads(),
           "cells": list(CELLS), "runs_per_cell": len(prm["seeds"]), "steps": a.steps,
           "d": d, "n_latents": prm["n_latents"], "seconds": times,
           "local_speedup": times["serial"] / times["local"],
           "faster": min(times, key=times.get)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
