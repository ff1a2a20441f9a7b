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
SHAPE = ("d_model", *grid.TRAIN_KEYS, "seeds", "train_tokens", "n_fit_tokens", "n_eval_tokens", "seed")


def write_cache(folder: Path, d: int) -> None:
    """Training and held-out activations with the metadata notebook 01 leaves beside them."""
    from ablation import store

    gen = np.random.default_rng(0)
    for split, n in (("train", 60_000), ("heldout", 5_000)):
        path = folder / f"acts_{split}.npy"
        np.save(path, gen.standard_normal((n, d), dtype=np.float32) + 2.0)
        store.write_json_atomic(path.with_suffix(".json"), {"model_name": "bench", "split": split,
                                                            "shape": [n, d], "sha256": store.file_sha256(path)})


def jobs(prm: dict, cache: Path, run_dir: Path, steps: int) -> list[grid.CellJob]:
    """The four cells at the profile's settings, on one budget of ``steps`` steps (and its cooldown)."""
    tokens = steps * prm["sae_batch_size"]
    params = {**prm, "run_dir": str(cache), "sae_budget": tokens, "n_budgets": 1, "n_log_snapshots": 4,
              "snapshots_per_doubling": 4, "n_fit_tokens": 20_000, "n_eval_tokens": 2_000, "device": "cpu"}
    return grid.cell_jobs(params, CELLS, ["centered"], run_dir, [run_dir / "cells"])


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
        cache = Path(tmp)
        write_cache(cache, d)
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
