"""The batched multi-seed trainer and its fast sparse gradients."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .kernels import gather_dot, gather_sum, scatter_sum2, topk_rows
from .parameters import check_precision, check_seeds, resolve_device
from .sae import (
    RelaxedArchetypalSAE, TopKSAE, archetypal_atoms, project_archetypal_, sparse_decode, topk_encode,
    unit_rows,
)


def snapshot_steps(n_steps: int, n_log: int = 12, n_linear: int = 8) -> list[int]:
    """Steps at which to snapshot: 0, n_log log-spaced steps (dense early), n_linear regular."""
    if n_steps < 1:
        raise ValueError(f"n_steps={n_steps} must be >= 1")
    log = np.geomspace(1, n_steps, n_log) if n_log > 0 else []
    lin = np.linspace(0, n_steps, n_linear + 1)
    return sorted({0, n_steps, *(int(round(s)) for s in log), *(int(round(s)) for s in lin)})


def _workspace(ws: dict | None, name: str, like: torch.Tensor, shape: tuple,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """A buffer of this shape (and like's dtype, or dtype) kept in ws across steps (a fresh large
    tensor costs page faults)."""
    dtype = dtype or like.dtype
    if ws is None:
        return torch.empty(shape, device=like.device, dtype=dtype)
    if name not in ws or ws[name].shape != shape or ws[name].dtype != dtype:
        ws[name] = torch.empty(shape, device=like.device, dtype=dtype)
    return ws[name]


def sae_grads(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor,
              b_pre: torch.Tensor | None, dic: torch.Tensor, k: int, dead_penalty: float = 0.0,
              aux_dead: torch.Tensor | None = None, aux_k: int = 0, aux_coef: float = 1 / 32,
              enc_shift: torch.Tensor | None = None, ws: dict | None = None,
              matmul_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Loss, gradients and firing counts of TopK SAEs stacked over seeds (x: S x B x d).

    The loss of a run is the reference library's MSE, the mean of (x - x_hat)^2 over the batch and
    the dimensions. Two optional terms enter the gradients, not the returned loss:
    ``dead_penalty``, the authors' term (minus dead_penalty times the mean, over tokens and all
    n latents, of the pre-activations masked to the latents that fired on no token of the batch:
    their ``(pre_codes * is_dead).mean()``); and AuxK (Gao et al.):
    aux_coef times the MSE with which the top ``aux_k`` latents among those marked in ``aux_dead``
    (S x n) reconstruct the main reconstruction's residual. Only the encoder's forward pass is a
    dense product; decoding and every gradient touch only the selected latents of each token.
    ``matmul_dtype`` is the encoder's precision (the dense product and the selection); the decode,
    the loss and every gradient stay in x's dtype. Returns the loss (S), the gradients and how
    many tokens each latent fired on (S x n).
    """
    s, b, d = x.shape
    n = dic.shape[1]
    offsets = torch.arange(s, device=x.device).view(s, 1, 1) * n
    xc = x if b_pre is None else x - b_pre.unsqueeze(1)
    xin = xc if enc_shift is None else xc - enc_shift.unsqueeze(1)  # what the encoder sees
    pre = _workspace(ws, "pre", x, (s, b, n), matmul_dtype)
    vals, idx = topk_encode(xin, w_enc, b_enc, k, out=pre, dtype=matmul_dtype)  # sae.py's encoder
    flat = (idx.view(s, b, k) + offsets).view(s * b, k)
    table = dic.reshape(s * n, d).contiguous()
    xc_flat = xc.reshape(s * b, d).contiguous()
    xin_flat = xc_flat if enc_shift is None else xin.reshape(s * b, d).contiguous()
    err = sparse_decode(vals, flat, table) - xc_flat  # the models' decoder (sae.py)
    loss = err.pow(2).mean(-1).view(s, b).mean(-1)
    g_out = err * (2.0 / (b * d))
    g_vals = gather_dot(flat, g_out, table) * (vals > 0)
    g_dic, g_wenc = scatter_sum2(flat, s * n, vals, g_out, g_vals, xin_flat)
    g_benc = torch.zeros(s * n, device=x.device).index_add_(0, flat.view(-1), g_vals.view(-1))
    fired = torch.zeros(s * n, device=x.device).index_add_(0, flat.view(-1),
                                                           (vals > 0).view(-1).float()).view(s, n)
    g_benc, g_wenc = g_benc.view(s, n), g_wenc.view(s, n, d)
    if aux_k and aux_dead is not None and bool(aux_dead.any()):
        pre.masked_fill_(~aux_dead.unsqueeze(1), -math.inf)  # only dead latents compete
        a_vals, a_idx = topk_rows(pre.view(s * b, n), min(aux_k, n))
        a_vals = torch.nan_to_num(a_vals.to(x.dtype), neginf=0.0).clamp_min(0)
        a_flat = (a_idx.view(s, b, -1) + offsets).view(s * b, -1)
        a_out = (gather_sum(a_flat, a_vals, table) + err) * (aux_coef * 2.0 / (b * d))
        a_gvals = gather_dot(a_flat, a_out, table) * (a_vals > 0)
        a_dic, a_wenc = scatter_sum2(a_flat, s * n, a_vals, a_out, a_gvals, xin_flat)
        g_dic += a_dic
        g_wenc += a_wenc.view(s, n, d)
        g_benc += torch.zeros(s * n, device=x.device).index_add_(
            0, a_flat.view(-1), a_gvals.view(-1)).view(s, n)
    if dead_penalty:
        dead = fired == 0
        push = -dead_penalty * dead / n  # d/d(pre) is -dead_penalty / (b n), summed over tokens
        g_benc = g_benc + push
        g_wenc = g_wenc + push.unsqueeze(-1) * xin.mean(1, keepdim=True)
    grads = {"W_enc": g_wenc, "b_enc": g_benc, "dictionary": g_dic.view(s, n, d)}
    if b_pre is not None:  # direct term of the reconstruction, and through the encoder's input
        grads["b_pre"] = g_out.view(s, b, d).sum(1) - torch.einsum("sn,snd->sd", g_benc, w_enc)
    return loss, grads, fired


def stacked_dictionary(arch: str, params: dict, buffers: dict) -> torch.Tensor:
    """Atoms of every run from stacked parameters: W_dec, or (W C + Lambda) * exp(m)."""
    if arch == "topk":
        return params["W_dec"]
    return archetypal_atoms(params["W"], buffers["candidates"], params["Lambda"],
                            params["multiplier"])


def stacked_grads(arch: str, params: dict, buffers: dict, x: torch.Tensor, k: int,
                  dead_penalty: float = 0.0, clip_grad: float | None = None,
                  aux_dead: torch.Tensor | None = None, aux_k: int = 0, ws: dict | None = None,
                  matmul_dtype: torch.dtype | None = None,
                  ) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """Per-seed loss, the gradient of every stacked parameter, each run's gradient norm and firing.

    The chain rule goes through D for RA-SAEs. With ``clip_grad``, each run's gradients are
    scaled as torch.nn.utils.clip_grad_norm_ scales one model's: times min(1, clip_grad /
    (norm + 1e-6)). The norm of the RA gradient of W, g C^T, comes from the identity
    |g C^T|^2 = <g^T g, C^T C> (two d x d matrices), and g is scaled before g C^T is formed.
    """
    dic = stacked_dictionary(arch, params, buffers)
    b_pre = params.get("b_pre")  # a TopK SAE without pre-bias holds a zero buffer instead
    loss, g, fired = sae_grads(x, params["W_enc"], params["b_enc"], b_pre, dic, k, dead_penalty,
                               aux_dead, aux_k, enc_shift=buffers.get("enc_shift"), ws=ws,
                               matmul_dtype=matmul_dtype)
    grads = {"W_enc": g["W_enc"], "b_enc": g["b_enc"]}
    sq = []  # squared norms of gradients that are not in grads yet
    if arch == "topk":
        grads["W_dec"] = g["dictionary"]
        if "b_pre" in params:
            grads["b_pre"] = g["b_pre"]
    else:
        cand = buffers["candidates"]
        g_inner = g["dictionary"] * params["multiplier"].exp().view(-1, 1, 1)
        grads.update(Lambda=g_inner, multiplier=(g["dictionary"] * dic).sum((1, 2)))
        gram = torch.bmm(g_inner.transpose(1, 2), g_inner).double()
        sq.append(torch.einsum("sde,sde->s", gram, _candidate_gram(cand, ws)).clamp_min(0).float())
    norms = torch.stack([v.reshape(len(v), -1).norm(dim=1).pow(2) for v in grads.values()] + sq,
                        1).sum(1).sqrt()
    if clip_grad is not None:
        coef = (clip_grad / (norms + 1e-6)).clamp(max=1.0)
        for v in grads.values():
            v.mul_(coef.view(-1, *[1] * (v.dim() - 1)))
    if arch == "ra":
        g_w = _workspace(ws, "W", params["W"], tuple(params["W"].shape))
        for i in range(len(g_w)):
            torch.mm(grads["Lambda"][i], cand[i].T, out=g_w[i])
        grads["W"] = g_w
    return loss, grads, norms, fired


def _candidate_gram(cand: torch.Tensor, ws: dict | None) -> torch.Tensor:
    """C^T C per run in float64, computed once per training run (the candidates never change)."""
    if ws is not None and "gram" in ws:
        return ws["gram"]
    gram = torch.bmm(cand.transpose(1, 2).double(), cand.double())
    if ws is not None:
        ws["gram"] = gram
    return gram


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
    shapes = {tuple((n, p.shape) for n, p in m.named_parameters()) for m in models}
    if len(shapes) != 1 or len({m.k for m in models}) != 1:
        raise ValueError("models must share d_in, n_latents, k (and n_candidates)")
    if isinstance(models[0], RelaxedArchetypalSAE) and \
            len({(m.project, m.delta) for m in models}) != 1:
        raise ValueError("RA-SAE models must share delta and project")
    if isinstance(models[0], TopKSAE) and len({m.decoder_norm for m in models}) != 1:
        raise ValueError("TopK SAE models must share decoder_norm")
    return "topk" if isinstance(models[0], TopKSAE) else "ra"


def take_rows(x: torch.Tensor | np.ndarray, idx: torch.Tensor) -> torch.Tensor:
    """Rows idx of an in-memory tensor or a numpy array / memmap, as a torch tensor."""
    if isinstance(x, torch.Tensor):
        return x[idx]
    return torch.from_numpy(np.ascontiguousarray(x[idx.numpy()]))


class SAETrainer:
    """Several runs of one configuration trained together, step by step, and resumable exactly.

    Each run keeps its own initialization (its model) and its own data order (a permutation of x
    per epoch, drawn from its seed); batch b of run s is x[perm_s[...]] - shift. Every step clips
    each run's gradient to global norm ``clip_grad`` as the reference library's ``train_sae``
    does (None or 0: no clipping), then takes an Adam step; Adam on the stacked parameters equals
    per-run Adam. ``dead_penalty`` is the authors' dead-latent term; ``aux_k`` > 0 adds Gao et
    al.'s AuxK loss over the latents that fired on none of the last ``aux_dead_tokens`` tokens
    (see sae_grads). ``precision`` is the encoder's matmul precision ('float32' or 'bfloat16');
    parameters, Adam's state, the decode, the loss and the gradients stay float32.
    ``state_dict`` holds everything that decides the next step (parameters,
    Adam's moments, the data order, the dead-latent clocks, the losses so far), so a trainer
    restored from it continues bit for bit as the uninterrupted one would.
    """

    def __init__(self, models: Sequence[nn.Module], x: torch.Tensor | np.ndarray,
                 seeds: Sequence[int], batch_size: int = 1024, lr: float = 5e-4,
                 shift: torch.Tensor | None = None, clip_grad: float | None = 1.0,
                 dead_penalty: float = 0.0, aux_k: int = 0, aux_dead_tokens: int = 100_000,
                 device: str = "auto", progress: bool = True, precision: str = "float32"):
        self.arch = _check_models(models)
        check_seeds(seeds)
        if len(seeds) != len(models):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(models)} models")
        if batch_size < 1 or len(x) < batch_size:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and at most the {len(x)} "
                             "training tokens")
        if x.shape[1] != models[0].W_enc.shape[1]:
            raise ValueError(f"x has d_in={x.shape[1]}, the models expect {models[0].W_enc.shape[1]}")
        if clip_grad is not None and not clip_grad >= 0:
            raise ValueError(f"clip_grad={clip_grad} must be > 0, or 0 or None (no clipping)")
        self.models, self.x, self.seeds, self.batch_size = models, x, list(seeds), batch_size
        self.clip_grad, self.dead_penalty, self.progress = clip_grad or None, dead_penalty, progress
        self.aux_k = aux_k if self.arch == "topk" else 0
        self.aux_dead_tokens = aux_dead_tokens
        self.device = resolve_device(device)
        self.k = models[0].k
        self.params = {n: _stack(models, n, self.device) for n, _ in models[0].named_parameters()}
        self.buffers = {n: _stack(models, n, self.device) for n, _ in models[0].named_buffers()}
        self.opt = torch.optim.Adam(list(self.params.values()), lr=lr,
                                    fused=self.device.type in ("cpu", "cuda"))
        self.shift = None if shift is None else torch.as_tensor(shift, dtype=torch.float32).to(self.device)
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.epoch_gen_states = [g.get_state() for g in self.gens]  # before this epoch's draw
        self.orders: list[torch.Tensor] = []
        self.per_epoch = len(x) // batch_size
        self.step = 0
        self.losses: list[torch.Tensor] = []
        self.clipped = torch.zeros(len(models))
        self.since_fired = torch.zeros(len(models), models[0].W_enc.shape[0], device=self.device)
        self.ws: dict = {}  # buffers reused across steps
        self.matmul_dtype = check_precision(precision, self.device)

    def _batch(self, step: int) -> torch.Tensor:
        """Step's batch of every run; a new epoch first draws every run's permutation of x."""
        start = (step % self.per_epoch) * self.batch_size
        if start == 0:
            self._draw_orders()
        xb = torch.stack([take_rows(self.x, o[start:start + self.batch_size].sort().values)
                          for o in self.orders]).float().to(self.device)
        return xb if self.shift is None else xb - self.shift

    def _draw_orders(self) -> None:
        """Every run's permutation of x for a new epoch, from its generator's current state."""
        self.epoch_gen_states = [g.get_state() for g in self.gens]
        self.orders = [torch.randperm(len(self.x), generator=g) for g in self.gens]

    def dictionaries(self) -> torch.Tensor:
        """Every run's current atoms (n_seeds x n_latents x d_in), CPU float32."""
        return stacked_dictionary(self.arch, self.params, self.buffers).float().cpu().clone()

    def advance(self, to_step: int, lr_at: Callable[[int], float]) -> None:
        """Train from the current step up to ``to_step``, step s at learning rate lr_at(s).

        Stops with a FloatingPointError at the first non-finite loss."""
        if to_step < self.step:
            raise ValueError(f"to_step={to_step} is behind the trainer's step {self.step}")
        arch, params = self.arch, self.params
        for step in tqdm(range(self.step, to_step), desc=f"train {arch} x{len(self.models)}",
                         disable=not self.progress, leave=False):
            xb = self._batch(step)
            loss, grads, norms, fired = stacked_grads(
                arch, params, self.buffers, xb, self.k, self.dead_penalty, self.clip_grad,
                self.since_fired >= self.aux_dead_tokens if self.aux_k else None, self.aux_k, self.ws,
                self.matmul_dtype)
            self.since_fired = torch.where(fired > 0, 0.0, self.since_fired + self.batch_size)
            if not bool(torch.isfinite(loss).all()):
                bad = [s for s, ok in zip(self.seeds, torch.isfinite(loss).tolist()) if not ok]
                cause = "the training data holds NaN or infinite values" if not bool(
                    torch.isfinite(xb).all()) else "the training diverged"
                raise FloatingPointError(f"non-finite loss at step {step} for seed(s) {bad}: "
                                         f"{cause}; nothing was saved")
            if self.clip_grad is not None:
                self.clipped += (norms > self.clip_grad).float().cpu()
            for n, p in params.items():
                p.grad = grads[n]
            self.opt.param_groups[0]["lr"] = lr_at(step)
            self.opt.step()
            with torch.no_grad():
                if arch == "topk":
                    if self.models[0].decoder_norm == "unit":
                        params["W_dec"].copy_(unit_rows(params["W_dec"]))
                elif self.models[0].project:
                    project_archetypal_(params["W"], params["Lambda"], self.models[0].delta)
            self.losses.append(loss.detach().cpu())
            self.step = step + 1

    def write_back(self) -> None:
        """Copy the trained parameters into the models."""
        with torch.no_grad():
            for i, m in enumerate(self.models):
                for n in self.params:
                    getattr(m, n).copy_(self.params[n][i].cpu())

    def state_dict(self) -> dict:
        """Everything the next step depends on, on the CPU."""
        return {"step": self.step, "params": {n: p.detach().cpu() for n, p in self.params.items()},
                "opt": self.opt.state_dict(), "epoch_gen_states": list(self.epoch_gen_states),
                "orders_drawn": bool(self.orders), "since_fired": self.since_fired.cpu(),
                "losses": torch.stack(self.losses) if self.losses else torch.zeros(0, len(self.models)),
                "clipped": self.clipped.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict of a trainer built with the same models' shapes and data."""
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["params"][n].to(self.device))
        self.opt.load_state_dict(state["opt"])
        for g, s in zip(self.gens, state["epoch_gen_states"]):
            g.set_state(s)
        self.epoch_gen_states, self.orders = list(state["epoch_gen_states"]), []
        if state["orders_drawn"]:
            self._draw_orders()  # the current epoch's permutations, drawn again from their states
        self.since_fired = state["since_fired"].to(self.device)
        self.losses = list(state["losses"])
        self.clipped = state["clipped"].clone()
        self.step = state["step"]


def decay_schedule(lr: float, end: int, decay_steps: float) -> Callable[[int], float]:
    """The learning rate at each step: lr, then falling linearly to 0 over the decay_steps
    before step ``end`` (the last step trains at lr / decay_steps)."""
    return lambda step: lr * min(1.0, (end - step) / max(decay_steps, 1e-9))


def train_saes(models: Sequence[nn.Module], x: torch.Tensor | np.ndarray, seeds: Sequence[int],
               n_tokens: int, batch_size: int = 1024, lr: float = 5e-4,
               snapshots: Sequence[int] | None = None, shift: torch.Tensor | None = None,
               clip_grad: float | None = 1.0, dead_penalty: float = 0.0, aux_k: int = 0,
               aux_dead_tokens: int = 100_000, lr_decay: float = 0.0, device: str = "auto",
               progress: bool = True, precision: str = "float32") -> dict:
    """Train several runs of one configuration together for a fixed budget (``SAETrainer``).

    ``lr_decay`` is the final share of the steps over which the learning rate falls linearly to
    0 (0: constant, as in the reference). Returns ``steps`` and ``tokens`` of the snapshots,
    ``dictionaries`` (n_snapshots x n_seeds x n_latents x d_in, CPU float32), ``loss`` (n_steps x
    n_seeds, the MSE) and ``clipped`` (the share of steps whose gradient was clipped, per run).
    The trained parameters are written back into ``models``.
    """
    if n_tokens < batch_size or batch_size < 1:
        raise ValueError(f"n_tokens={n_tokens} must be >= batch_size={batch_size} >= 1")
    trainer = SAETrainer(models, x, seeds, batch_size, lr, shift, clip_grad, dead_penalty, aux_k,
                         aux_dead_tokens, device, progress, precision)
    n_steps = n_tokens // batch_size
    snap = sorted(set(snapshots if snapshots is not None else snapshot_steps(n_steps)))
    if snap and (snap[0] < 0 or snap[-1] > n_steps):
        raise ValueError(f"snapshots must lie in 0..{n_steps} (the number of steps)")
    lr_at = decay_schedule(lr, n_steps, n_steps - n_steps * (1 - lr_decay))
    dicts = []
    for s in snap:
        trainer.advance(s, lr_at)
        dicts.append(trainer.dictionaries())
    trainer.advance(n_steps, lr_at)
    trainer.write_back()
    return {"steps": snap, "tokens": [s * batch_size for s in snap],
            "dictionaries": torch.stack(dicts) if dicts else torch.empty(0),
            "loss": torch.stack(trainer.losses),
            "clipped": (trainer.clipped / max(n_steps, 1)).tolist()}
