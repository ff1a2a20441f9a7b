"""Activation-caching throughput against a bare forward pass up to the same layer.

Both run in this process on the same model (the default profile's saved model when present,
else a random GPT-NeoX of the same size) and the same token windows. The cache path is
`helpers.cache_activations` (run_with_cache with a names filter, stop_at_layer, and writing a
memmap); the bare pass is `bridge(tokens, stop_at_layer=layer + 1)`. The last line is JSON.

    python benchmarks/bench_cache.py [--windows 512] [--layer 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import helpers as h


def main() -> None:
    """Time the bare forward and the cache path; print a table and a JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="runs/default/model")
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--windows", type=int, default=512)
    p.add_argument("--n-ctx", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.model_dir)
        if not (folder / "config.json").is_file():
            folder = Path(tmp) / "model"
            tok = h.train_bpe_tokenizer(h.take_chars(h.stdlib_texts("train"), 2_000_000), 4096)
            h.save_model(h.make_gptneox(len(tok), 128, 4, 4, a.n_ctx, 0), tok, folder, {})
        bridge = h.boot_model(str(folder), "cpu")
        windows = np.random.default_rng(0).integers(0, len(bridge.tokenizer),
                                                    (a.windows, a.n_ctx)).astype(np.int32)
        hook = f"blocks.{a.layer}.hook_resid_post"
        n_vec = a.windows * (a.n_ctx - 1)
        with torch.no_grad():
            bridge(torch.from_numpy(windows[:a.batch].astype(np.int64)), stop_at_layer=a.layer + 1)
            t = time.perf_counter()
            for i in range(0, a.windows, a.batch):
                bridge(torch.from_numpy(windows[i:i + a.batch].astype(np.int64)),
                       stop_at_layer=a.layer + 1)
            bare = time.perf_counter() - t
        t = time.perf_counter()
        h.cache_activations(bridge, windows, Path(tmp) / "acts.npy", {}, hook, n_vec, a.batch)
        cached = time.perf_counter() - t
    out = {"model_dir": str(folder) if folder == Path(a.model_dir) else "random GPT-NeoX",
           "layer": a.layer, "tokens": a.windows * a.n_ctx,
           "bare_tokens_per_s": a.windows * a.n_ctx / bare,
           "cache_tokens_per_s": a.windows * a.n_ctx / cached, "cache_over_bare": bare / cached}
    for key, val in out.items():
        print(f"{key:>20}: {val:,.3f}" if isinstance(val, float) else f"{key:>20}: {val}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
