"""Throughput of the batched multi-seed trainer against a plain one-seed-at-a-time loop.

The plain loop is how the reference libraries train: autograd, dense codes scattered from the
TopK indices and a dense decode z @ D, one run after the other. Both train the same models on
the same data in this process; the machine's fp32 matmul rate is measured alongside so the
numbers can be read against the hardware. The last line printed is one JSON object.

    python benchmarks/bench_train.py [--steps 40] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import helpers as h


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Best-of fp32 GFLOP/s of an n x n x n matrix product on this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def plain_loop(models: list, x: torch.Tensor, steps: int, batch: int, lr: float) -> float:
    """Seconds to train each model alone with autograd, dense scatter and dense decode."""
    t = time.perf_counter()
    for seed, m in enumerate(models):
        opt = torch.optim.Adam(m.parameters(), lr=lr)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        for step in range(steps):
            xb = x[order[step * batch:(step + 1) * batch]]
            if isinstance(m, h.RelaxedArchetypalSAE):
                m.project_()
                vals, idx = m.encode(xb)
                x_hat = h.dense_codes(vals, idx, m.W.shape[0]) @ m.dictionary()
            else:
                vals, idx = m.encode(xb)
                x_hat = h.dense_codes(vals, idx, m.W_dec.shape[0]) @ m.W_dec + m.b_pre
            loss = (x_hat - xb).pow(2).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if isinstance(m, h.TopKSAE):
                with torch.no_grad():
                    m.W_dec.copy_(h.unit_rows(m.W_dec))
    return time.perf_counter() - t


def main() -> None:
    """Time both trainers for TopK and RA-SAE and print a table and a JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--n-latents", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(a.batch * (a.steps + 1), a.d) + 3.0
    seeds = list(range(a.seeds))
    tokens = a.seeds * a.batch * a.steps
    out = {"d": a.d, "n_latents": a.n_latents, "k": a.k, "batch": a.batch, "seeds": a.seeds,
           "steps": a.steps, "threads": torch.get_num_threads()}
    for arch in ("topk", "ra"):
        make = lambda: [h.make_sae(arch, "random", x[:4096], a.n_latents, a.k, s) for s in seeds]
        h.train_saes(make(), x, seeds, a.batch * 2, a.batch, progress=False, device="cpu")  # warm-up
        t = time.perf_counter()
        h.train_saes(make(), x, seeds, a.batch * a.steps, a.batch, progress=False, device="cpu")
        fast = time.perf_counter() - t
        slow = plain_loop(make(), x, a.steps, a.batch, 5e-4)
        out[f"{arch}_tokens_per_s"] = tokens / fast
        out[f"plain_{arch}_tokens_per_s"] = tokens / slow
        out[f"speedup_vs_plain_{arch}"] = slow / fast
    out["matmul_gflops"] = matmul_gflops()
    # The one dense product the batched TopK step cannot avoid: the encoder, 2 * d * n per token.
    needed = 2 * a.d * a.n_latents * out["topk_tokens_per_s"] / 1e9
    out["fraction_of_peak"] = needed / out["matmul_gflops"]
    for key, val in out.items():
        print(f"{key:>28}: {val:,.3f}" if isinstance(val, float) else f"{key:>28}: {val}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
