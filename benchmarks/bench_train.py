"""Throughput of the batched multi-seed trainer against a plain one-seed-at-a-time loop.

The plain loop is how the reference library (overcomplete's ``train_sae``) trains: autograd, dense
codes scattered from the TopK indices, a dense decode z @ D, the MSE, gradient clipping at norm 1
and Adam, one run after the other. Both train the same models on the same data in this process,
alternately (plain, batched in float32, batched in bfloat16, ...), so machine noise hits all; the
speed-up is the ratio of their median times. The machine's matmul rate is measured alongside, in
both precisions, and the batched trainer's encoder product is given as a share of it. The last
line printed is one JSON object.

    python benchmarks/bench_train.py [--steps 20] [--seeds 5] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import helpers as h


def matmul_gflops(n: int = 2048, repeats: int = 10, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> float:
    """Best-of GFLOP/s of an n x n x n matrix product in dtype on this device."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _sync(device: str) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def plain_loop(models: list, x: torch.Tensor, steps: int, batch: int, lr: float, device: str) -> float:
    """Seconds to train each model alone as the reference does (autograd, dense decode, clipping)."""
    _sync(device)
    t = time.perf_counter()
    for seed, m in enumerate(models):
        m.to(device).train()
        opt = torch.optim.Adam(m.parameters(), lr=lr)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        for step in range(steps):
            xb = x[order[step * batch:(step + 1) * batch]].to(device)
            if isinstance(m, h.RelaxedArchetypalSAE):
                m.project_()
            pre = torch.addmm(m.b_enc, xb - m.b_pre if isinstance(m, h.TopKSAE) else xb, m.W_enc.T)
            vals, idx = pre.topk(m.k, dim=-1)
            z = h.dense_codes(vals.clamp_min(0), idx, pre.shape[1])
            x_hat = z @ m.dictionary() + (m.b_pre if isinstance(m, h.TopKSAE) else 0)
            loss = (x_hat - xb).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            if isinstance(m, h.TopKSAE):
                with torch.no_grad():
                    m.W_dec.copy_(h.unit_rows(m.W_dec))
    _sync(device)
    return time.perf_counter() - t


def batched(models: list, x: torch.Tensor, steps: int, batch: int, lr: float, device: str,
            precision: str = "float32") -> float:
    """Seconds for train_saes to train all models together, the encoder in ``precision``."""
    _sync(device)
    t = time.perf_counter()
    h.train_saes(models, x, list(range(len(models))), batch * steps, batch, lr, snapshots=[],
                 device=device, progress=False, precision=precision)
    _sync(device)
    return time.perf_counter() - t


def main() -> None:
    """Time both trainers for TopK and RA-SAE and print a table and a JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--n-latents", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="alternating timings of each trainer")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(a.batch * (a.steps + 1), a.d) + 3.0
    seeds = list(range(a.seeds))
    tokens = a.seeds * a.batch * a.steps
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor()) if platform.system() == "Linux" else platform.processor()
    out = {"d": a.d, "n_latents": a.n_latents, "k": a.k, "batch": a.batch, "seeds": a.seeds,
           "steps": a.steps, "rounds": a.rounds, "device": a.device, "threads": torch.get_num_threads(),
           "cpu": cpu, "kernels": h.kernel_backend(), "torch": torch.__version__}
    if a.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
    precisions = ("float32", "bfloat16")
    for prec in precisions:
        out[f"matmul_gflops_{prec}"] = matmul_gflops(device=a.device, dtype=getattr(torch, prec))
    for arch in ("topk", "ra"):
        make = lambda: [h.make_sae(arch, "random", x[:4096], a.n_latents, a.k, s) for s in seeds]
        for prec in precisions:  # warm-up (and kernel compilation)
            batched(make(), x, 2, a.batch, 5e-4, a.device, prec)
        plain_loop(make()[:1], x, 2, a.batch, 5e-4, a.device)
        times = {"plain": [], **{prec: [] for prec in precisions}}
        for _ in range(a.rounds):
            times["plain"].append(plain_loop(make(), x, a.steps, a.batch, 5e-4, a.device))
            for prec in precisions:
                times[prec].append(batched(make(), x, a.steps, a.batch, 5e-4, a.device, prec))
        out[f"plain_{arch}_tokens_per_s"] = tokens / statistics.median(times["plain"])
        for prec in precisions:
            rate = tokens / statistics.median(times[prec])
            out[f"{arch}_{prec}_tokens_per_s"] = rate
            out[f"speedup_vs_plain_{arch}_{prec}"] = statistics.median(times["plain"]) / statistics.median(times[prec])
            # the one dense product a batched step cannot avoid: the encoder, 2 d n flops per token,
            # as a share of the machine's best matmul rate in the same precision
            out[f"encoder_share_of_matmul_{arch}_{prec}"] = \
                2 * a.d * a.n_latents * rate / 1e9 / out[f"matmul_gflops_{prec}"]
    for key, val in out.items():
        print(f"{key:>28}: {val:,.3f}" if isinstance(val, float) else f"{key:>28}: {val}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
