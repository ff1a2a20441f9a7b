"""Speed of the sparse kernels on the trainer's shapes: C (kernels.c) against torch and numba.

Torch runs each op in float32 and in bfloat16 (the C kernels take float32 only). A C kernel is
worth keeping when it beats the faster torch precision by KEEP_C_MARGIN; the JSON says which do.

Each kernel runs on the inputs one default-profile training step gives it (4 seeds stacked, 1024
tokens, 512 latents, k = 16, d = 128), best of ``--repeats`` timings, alternating the backends so
machine noise hits all of them. numba is timed when it is importable (it is not a dependency of
the report: this measurement is what decides whether it should be). The last line printed is
one JSON object.

    python benchmarks/bench_kernels.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ablation import kernels

KEEP_C_MARGIN = 1.2  # C stays where it is at least this many times faster than torch


def numba_kernels() -> dict | None:
    """The four kernels written for numba (parallel, fastmath as the C flags), or None."""
    try:
        import numba
    except ImportError:
        return None
    jit = numba.njit(parallel=True, fastmath=True, cache=False)

    @jit
    def topk_rows(x, k, vals, idx):
        for r in numba.prange(x.shape[0]):
            top = np.argsort(-x[r])[:k]
            top.sort()
            for s in range(k):
                idx[r, s] = top[s]
                vals[r, s] = x[r, top[s]]

    @jit
    def gather_sum(idx, w, table, out):
        for r in numba.prange(idx.shape[0]):
            out[r, :] = 0.0
            for s in range(idx.shape[1]):
                out[r, :] += w[r, s] * table[idx[r, s]]

    @jit
    def gather_dot(idx, a, table, out):
        for r in numba.prange(idx.shape[0]):
            for s in range(idx.shape[1]):
                out[r, s] = np.dot(a[r], table[idx[r, s]])

    @jit
    def scatter_sum2(idx, order, start, w1, a1, out1, w2, a2, out2):
        k = idx.shape[1]
        for i in numba.prange(out1.shape[0]):
            out1[i, :] = 0.0
            out2[i, :] = 0.0
            for q in range(start[i], start[i + 1]):
                e = order[q]
                r = e // k
                out1[i, :] += w1.flat[e] * a1[r]
                out2[i, :] += w2.flat[e] * a2[r]

    return {"topk_rows": topk_rows, "gather_sum": gather_sum, "gather_dot": gather_dot,
            "scatter_sum2": scatter_sum2}


def best_of(fn, repeats: int) -> float:
    """Fastest of repeats timings of fn(), in seconds."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    """Time every kernel with every available backend; print a table and a JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    s, b, n, k, d = 4, 1024, 512, 16, 128
    pre = torch.randn(s * b, n, generator=gen)
    idx = torch.randint(0, s * n, (s * b, k), generator=gen)
    w, w2 = torch.rand(s * b, k, generator=gen), torch.randn(s * b, k, generator=gen)
    rows, rows2 = torch.randn(s * b, d, generator=gen), torch.randn(s * b, d, generator=gen)
    table = torch.randn(s * n, d, generator=gen)
    codes = torch.rand(s * b, n, generator=gen)

    def kernel_calls(dt: torch.dtype) -> dict:
        """Each kernel on the step's inputs cast to dt."""
        p_, w_, w2_, r_, r2_, t_, c_ = (x.to(dt) for x in (pre, w, w2, rows, rows2, table, codes))
        return {"topk_rows": lambda: kernels.topk_rows(p_, k),
                "gather_sum": lambda: kernels.gather_sum(idx, w_, t_),
                "gather_dot": lambda: kernels.gather_dot(idx, r_, t_),
                "scatter_sum2": lambda: kernels.scatter_sum2(idx, s * n, w_, r_, w2_, r2_),
                "simplex_rows": lambda: kernels.simplex_rows_(c_.clone())}

    calls, bf16_calls = kernel_calls(torch.float32), kernel_calls(torch.bfloat16)
    out = {"shapes": {"rows": s * b, "n": n, "k": k, "d": d}, "threads": torch.get_num_threads(),
           "C": kernels.kernel_backend() == "C"}
    nb = numba_kernels()
    if nb is not None:
        np_ = {name: t.numpy() for name, t in
               dict(pre=pre, idx=idx, w=w, w2=w2, rows=rows, rows2=rows2, table=table).items()}
        flat = np_["idx"].reshape(-1)
        order = np.argsort(flat, kind="stable")
        start = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=s * n))])
        o1, o2 = np.empty((s * n, d), np.float32), np.empty((s * n, d), np.float32)
        vals_, idx_ = np.empty((s * b, k), np.float32), np.empty((s * b, k), np.int64)
        gs, gd = np.empty((s * b, d), np.float32), np.empty((s * b, k), np.float32)
        nb_calls = {
            "topk_rows": lambda: nb["topk_rows"](np_["pre"], k, vals_, idx_),
            "gather_sum": lambda: nb["gather_sum"](np_["idx"], np_["w"], np_["table"], gs),
            "gather_dot": lambda: nb["gather_dot"](np_["idx"], np_["rows"], np_["table"], gd),
            "scatter_sum2": lambda: nb["scatter_sum2"](np_["idx"], order, start, np_["w"],
                                                       np_["rows"], o1, np_["w2"], np_["rows2"], o2)}
        for fn in nb_calls.values():
            fn()  # compile
        assert np.allclose(gs, calls["gather_sum"]().numpy(), atol=1e-4)
        assert np.allclose(o1, calls["scatter_sum2"]()[0].numpy(), atol=1e-3)
    for name, call in calls.items():
        c_t, torch_t, bf_t, nb_t = [], [], [], []
        for _ in range(3):  # alternate the backends
            c_t.append(best_of(call, a.repeats))
            kernels._KERNELS[:] = [None]  # the torch path
            torch_t.append(best_of(call, a.repeats))
            bf_t.append(best_of(bf16_calls[name], a.repeats))
            kernels._KERNELS.clear()
            if nb is not None and name in nb_calls:
                nb_t.append(best_of(nb_calls[name], a.repeats))
        row = {"C_ms": 1e3 * min(c_t), "torch_ms": 1e3 * min(torch_t), "torch_bf16_ms": 1e3 * min(bf_t)}
        row["C_speedup"] = min(row["torch_ms"], row["torch_bf16_ms"]) / row["C_ms"]
        if nb_t:
            row["numba_ms"] = 1e3 * min(nb_t)
            row["numba_speed_vs_C"] = row["C_ms"] / row["numba_ms"]
        out[name] = row
        print(f"{name:>13}: " + ", ".join(f"{key} {v:.3f}" for key, v in row.items()))
    if nb is not None:
        out["numba_keeps_90_percent"] = all(out[n_]["numba_speed_vs_C"] >= 0.9 for n_ in nb_calls)
    out["keep_C"] = sorted(n_ for n_ in calls if out[n_]["C_speedup"] >= KEEP_C_MARGIN)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
