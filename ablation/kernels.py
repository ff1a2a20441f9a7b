"""Sparse CPU kernels: C (kernels.c) where it beats torch by a measured margin, torch elsewhere
and as the fallback (benchmarks/bench_kernels.py measures both)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch.nn import functional as F


KERNELS_C = Path(__file__).with_name("kernels.c")  # the C source, compiled on first use
_KERNELS: list = []  # [ctypes.CDLL or None], filled on first use


def _compiled_kernels():
    """The sparse C kernels, compiled once per machine with the system C compiler; None without one."""
    if _KERNELS:
        return _KERNELS[0]
    import ctypes
    import hashlib
    import platform
    import subprocess
    import tempfile

    lib = None
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else platform.processor()
    cpu_flags = next((l for l in cpu.splitlines() if l.startswith("flags")), cpu)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ablating-archetypes"
    flag_sets = (["-O3", "-march=native", "-ffinite-math-only", "-fno-signed-zeros", "-fopenmp"],
                 ["-O3", "-ffinite-math-only", "-fno-signed-zeros"])
    for flags in flag_sets if os.environ.get("SAE_KERNELS", "c") != "torch" else ():
        key = hashlib.sha256("\n".join([KERNELS_C.read_text(), *flags, platform.machine(), cpu_flags]).encode())
        so = cache / f"sae_kernels_{key.hexdigest()[:16]}.so"
        try:
            if not so.exists():
                cache.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=cache) as tmp:
                    (Path(tmp) / "k.c").write_text(KERNELS_C.read_text())
                    subprocess.run([os.environ.get("CC", "cc"), *flags, "-shared", "-fPIC", "k.c", "-o",
                                    "k.so"], cwd=tmp, check=True, capture_output=True, timeout=120)
                    os.replace(Path(tmp) / "k.so", so)
            lib = ctypes.CDLL(str(so))
            break
        except (OSError, subprocess.SubprocessError):
            continue
    _KERNELS.append(lib)
    return lib


def kernel_backend() -> str:
    """'C' when the compiled sparse kernels serve CPU tensors, else 'torch'."""
    return "C" if _compiled_kernels() is not None else "torch"


def _c_call(name: str, *args) -> None:
    """Call a compiled kernel with tensors (passed as pointers) and integers."""
    import ctypes

    conv = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int64(a)
            for a in args]
    getattr(_compiled_kernels(), name)(*conv, ctypes.c_int(torch.get_num_threads()))


def _check_sparse(op: str, idx: torch.Tensor, *dense: torch.Tensor) -> None:
    """Raise a TypeError or ValueError for arguments no kernel, C or torch, should be given."""
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: idx must be an int64 or int32 tensor, got "
                        f"{getattr(idx, 'dtype', type(idx).__name__)}")
    if idx.dim() != 2:
        raise ValueError(f"{op}: idx must be 2-D (rows, k), got shape {tuple(idx.shape)}")
    if any(not isinstance(t, torch.Tensor) or not t.is_floating_point() for t in dense):
        raise TypeError(f"{op}: the dense arguments must be floating-point tensors")
    if len({t.dtype for t in dense}) != 1:
        raise TypeError(f"{op}: the dense arguments must share one dtype, got "
                        f"{sorted(str(t.dtype) for t in dense)}")
    if len({t.device for t in (idx, *dense)}) != 1:
        raise ValueError(f"{op}: every argument must be on one device, got "
                         f"{sorted({str(t.device) for t in (idx, *dense)})}")


def _check_bounds(idx: torch.Tensor, table_rows: int) -> None:
    """Raise an IndexError when idx points outside 0..table_rows-1 (no kernel reads out of bounds)."""
    if idx.numel() and idx.device.type != "meta":
        lo, hi = (int(v) for v in torch.aminmax(idx))
        if lo < 0 or hi >= table_rows:
            raise IndexError(f"idx holds {lo if lo < 0 else hi}, outside 0..{table_rows - 1}")


def _use_c(*tensors: torch.Tensor, idx: torch.Tensor | None = None,
           dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """True when the compiled kernels can take these tensors exactly as they are: contiguous CPU
    tensors of one of ``dtypes`` needing no grad (and an int64 contiguous CPU idx)."""
    if _compiled_kernels() is None:
        return False
    ok = all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad
             and t.dtype in dtypes for t in tensors)
    if ok and idx is not None:
        ok = idx.device.type == "cpu" and idx.is_contiguous() and idx.dtype == torch.int64
    return ok


def topk_rows(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k values and indices of every row of a 2-D tensor, indices ascending within a row
    (float32 and bfloat16 rows: values come back float32 from the C kernel)."""
    if not isinstance(pre, torch.Tensor) or pre.dim() != 2 or not pre.is_floating_point():
        raise TypeError("topk_rows: pre must be a 2-D floating-point tensor")
    if not 1 <= k <= pre.shape[1]:
        raise ValueError(f"topk_rows: k={k} must lie in 1..{pre.shape[1]} (the row length)")
    if _use_c(pre, dtypes=(torch.float32, torch.bfloat16)):
        vals = torch.empty(len(pre), k)
        idx = torch.empty(len(pre), k, dtype=torch.int64)
        _c_call("topk_rows" if pre.dtype == torch.float32 else "topk_rows_bf16", pre, len(pre),
                pre.shape[1], k, vals, idx)
        return vals, idx
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    idx, order = idx.sort(dim=-1)
    return vals.gather(-1, order), idx


@torch.no_grad()
def simplex_rows_(w: torch.Tensor) -> None:
    """In place, every row (last axis): w <- relu(w) / (row sum + 1e-8)."""
    w.clamp_(min=0)
    w.div_(w.sum(-1, keepdim=True) + 1e-8)


def gather_sum(idx: torch.Tensor, w: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """out[r] = sum_s w[r, s] * table[idx[r, s]]: a sparse decode (torch's embedding_bag, which
    beats the C loop this project had: benchmarks/bench_kernels.py)."""
    _check_sparse("gather_sum", idx, w, table)
    if w.shape != idx.shape or table.dim() != 2:
        raise ValueError(f"gather_sum: w {tuple(w.shape)} must match idx {tuple(idx.shape)}, "
                         f"table must be 2-D, got {tuple(table.shape)}")
    _check_bounds(idx, len(table))
    return F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")


def gather_dot(idx: torch.Tensor, a: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """out[r, s] = <a[r], table[idx[r, s]]>: the gradient of a sparse decode's weights."""
    _check_sparse("gather_dot", idx, a, table)
    if table.dim() != 2 or a.shape != (len(idx), table.shape[1]):
        raise ValueError(f"gather_dot: a {tuple(a.shape)} must be (rows of idx, columns of table) "
                         f"= ({len(idx)}, {table.shape[-1]})")
    _check_bounds(idx, len(table))
    if _use_c(a, table, idx=idx):
        out = torch.empty(idx.shape)
        _c_call("gather_dot", idx, a, table, len(idx), idx.shape[1], table.shape[1], out)
        return out
    return torch.einsum("rd,rsd->rs", a, table[idx])


def scatter_sum2(idx: torch.Tensor, n_out: int, w1: torch.Tensor, a1: torch.Tensor,
                 w2: torch.Tensor, a2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For i < n_out: sum over (r, s) with idx[r, s] = i of w[r, s] * a[r], for two (w, a) pairs."""
    _check_sparse("scatter_sum2", idx, w1, a1, w2, a2)
    if w1.shape != idx.shape or w2.shape != idx.shape or a1.shape != a2.shape \
            or a1.dim() != 2 or len(a1) != len(idx):
        raise ValueError("scatter_sum2: w1 and w2 must match idx, a1 and a2 must be (rows of idx, d)")
    d = a1.shape[1]
    _check_bounds(idx, n_out)
    if _use_c(w1, a1, w2, a2, idx=idx):
        out1, out2 = torch.empty(n_out, d), torch.empty(n_out, d)
        _c_call("scatter_sum2", idx, len(idx), idx.shape[1], n_out, d, w1, a1, out1, w2, a2, out2)
        return out1, out2
    k, n = idx.shape[1], len(idx)
    coords = torch.stack([idx.reshape(-1).long(), torch.arange(n, device=idx.device).repeat_interleave(k)])
    return tuple(torch.sparse.mm(torch.sparse_coo_tensor(coords, w.reshape(-1), (n_out, n),
                                                         check_invariants=False), a)
                 for w, a in ((w1, a1), (w2, a2)))
