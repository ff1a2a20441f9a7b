"""The two models: TopK SAE and relaxed archetypal SAE, stated once."""

from __future__ import annotations

import math

import torch
from torch import nn

from .configs import DECODERS
from .kernels import gather_sum, simplex_rows_, topk_rows
from .parameters import check_choice, check_finite, check_sae_sizes


def unit_rows(a: torch.Tensor) -> torch.Tensor:
    """Return a with every row (last axis) scaled to unit L2 norm; zero rows stay zero."""
    return a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def topk_encode(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
                out: torch.Tensor | None = None,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK(ReLU(x W_enc^T + b_enc)) as (values, ascending indices), the encoder of both models.

    One run: x is (batch, d_in). Runs stacked over seeds (the trainer): x is (seeds, batch, d_in)
    with one encoder per seed, rows come back seed-major, and the pre-activations are written to
    ``out`` (seeds, batch, n_latents) when given. ``dtype`` is the precision of the matmul and the
    selection (None: x's); the values come back in x's dtype.
    """
    dt = dtype or x.dtype
    xd, wd, bd = x.to(dt), w_enc.to(dt), b_enc.to(dt)  # no copies when dt is already theirs
    if x.dim() == 2:
        pre = torch.addmm(bd, xd, wd.T)
    else:
        pre = torch.empty(*x.shape[:2], w_enc.shape[1], dtype=dt, device=x.device) \
            if out is None else out
        for i in range(len(x)):  # a loop of addmm runs faster on the CPU than one baddbmm
            torch.addmm(bd[i], xd[i], wd[i].T, out=pre[i])
        pre = pre.view(-1, pre.shape[-1])
    vals, idx = topk_rows(pre.contiguous(), k)
    return vals.to(x.dtype).clamp_min(0), idx


def archetypal_atoms(w: torch.Tensor, candidates: torch.Tensor, lam: torch.Tensor,
                     multiplier: torch.Tensor) -> torch.Tensor:
    """The RA-SAE dictionary (W C + Lambda) exp(m), of one run (2-D W) or of runs stacked over
    seeds (3-D W, one m each; exp(m) is distributed into one addmm per run, faster than bmm)."""
    if w.dim() == 2:
        return (w @ candidates + lam) * multiplier.exp()
    out = torch.empty_like(lam)
    for i, scale in enumerate(multiplier.exp().tolist()):
        torch.addmm(lam[i], w[i], candidates[i], beta=scale, alpha=scale, out=out[i])
    return out


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    """Sum of vals-weighted dictionary rows idx, without forming dense codes."""
    return gather_sum(idx.contiguous(), vals.contiguous(), dictionary.contiguous())


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

    ``decoder_norm="unit"``: D starts unit-normalized and the trainer re-normalizes its rows after
    every step (zero rows stay zero), as overcomplete's default ``l2`` normalization; ``"free"``:
    D starts as given and its rows are never renormalized, as overcomplete's ``identity`` (zero
    rows can grow). The encoder is drawn from ``seed``; the decoder starts as ``init_dictionary``
    or as seeded Gaussian atoms. ``pre_bias=False`` fixes b_pre at zero (a buffer, not trained),
    as in the authors' vision notebooks; ``encoder_shift`` is subtracted from the encoder's input
    only, as an RA-SAE's.
    """

    def __init__(self, d_in: int, n_latents: int, k: int, seed: int = 0,
                 init_dictionary: torch.Tensor | None = None, pre_bias: bool = True,
                 decoder_norm: str = "unit", encoder_shift: torch.Tensor | None = None):
        super().__init__()
        check_sae_sizes(d_in, n_latents, k)
        check_choice("decoder_norm", decoder_norm, DECODERS["topk"])
        gen = torch.Generator().manual_seed(seed)
        if init_dictionary is None:
            init_dictionary = torch.randn(n_latents, d_in, generator=gen)
        if tuple(init_dictionary.shape) != (n_latents, d_in):
            raise ValueError(f"init_dictionary has shape {tuple(init_dictionary.shape)}, "
                             f"expected (n_latents, d_in)=({n_latents}, {d_in})")
        self.k, self.decoder_norm = k, decoder_norm
        self.W_enc = nn.Parameter(_encoder_init(n_latents, d_in, gen))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        if pre_bias:
            self.b_pre = nn.Parameter(torch.zeros(d_in))
        else:
            self.register_buffer("b_pre", torch.zeros(d_in))
        start = init_dictionary.float().clone()
        self.W_dec = nn.Parameter(unit_rows(start) if decoder_norm == "unit" else start)
        if encoder_shift is not None:
            self.register_buffer("enc_shift", encoder_shift.float().clone())

    def dictionary(self) -> torch.Tensor:
        """The current atoms, (n_latents, d_in)."""
        return self.W_dec

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK values and indices of the latents for a batch x."""
        shift = getattr(self, "enc_shift", None)
        x = x - self.b_pre
        return topk_encode(x if shift is None else x - shift, self.W_enc, self.b_enc, self.k)

    def decode(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x_hat from TopK values and indices."""
        return sparse_decode(vals, idx, self.W_dec) + self.b_pre

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map a batch x to (x_hat, dense codes)."""
        vals, idx = self.encode(x)
        return self.decode(vals, idx), dense_codes(vals, idx, self.W_dec.shape[0])


class RelaxedArchetypalSAE(nn.Module):
    """Relaxed archetypal SAE as in overcomplete 0.3.0's RelaxedArchetypalDictionary.

    D = (W C + Lambda) * exp(m): C the fixed candidates (a buffer), W initialized to
    eye(n_latents, n_candidates) (atoms past n_candidates start at zero), Lambda and m to zero. In
    training mode (and after every trainer step) W rows are projected onto the simplex by ReLU +
    normalize and each Lambda row is clipped to norm <= delta (absolute). ``project=False`` is the
    authors' "projection off" control. The encoder is linear + ReLU + TopK with no decoder bias.
    """

    def __init__(self, d_in: int, n_latents: int, k: int, candidates: torch.Tensor,
                 delta: float = 1.0, project: bool = True, seed: int = 0,
                 encoder_shift: torch.Tensor | None = None):
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
        if encoder_shift is not None:  # subtracted from the encoder's input only
            self.register_buffer("enc_shift", encoder_shift.float().clone())

    @torch.no_grad()
    def project_(self) -> None:
        """Project W rows onto the simplex and clip Lambda rows to norm <= delta, in place."""
        if self.project:
            project_archetypal_(self.W, self.Lambda, self.delta)

    def dictionary(self) -> torch.Tensor:
        """The current atoms (W C + Lambda) * exp(m), (n_latents, d_in)."""
        return archetypal_atoms(self.W, self.candidates, self.Lambda, self.multiplier)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK values and indices of the latents for a batch x."""
        shift = getattr(self, "enc_shift", None)
        return topk_encode(x if shift is None else x - shift, self.W_enc, self.b_enc, self.k)

    def decode(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x_hat from TopK values and indices."""
        return sparse_decode(vals, idx, self.dictionary())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map a batch x to (x_hat, dense codes), projecting first when training."""
        if self.training:
            self.project_()
        vals, idx = self.encode(x)
        return self.decode(vals, idx), dense_codes(vals, idx, self.W.shape[0])


def atoms_carry_mean(sae: nn.Module) -> bool:
    """Whether a model's atoms must carry the data mean themselves, decided by the model: True when
    it has no trained decoder bias to absorb the mean and its atoms are free in norm (points in
    data space, as an RA-SAE's or a free-row TopK SAE's without pre-bias); False for a model with a
    trained pre-bias, or with unit-norm atoms (directions, which cannot carry an offset)."""
    has_bias = isinstance(getattr(sae, "b_pre", None), nn.Parameter)
    return not has_bias and getattr(sae, "decoder_norm", "free") != "unit"


@torch.no_grad()
def project_archetypal_(w: torch.Tensor, lam: torch.Tensor, delta: float) -> None:
    """In place: W <- relu(W) / (row sums + 1e-8); Lambda rows clipped to norm <= delta."""
    simplex_rows_(w)
    lam.mul_((delta / lam.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0))


@torch.no_grad()
def match_start_scale_(sae: nn.Module, x: torch.Tensor) -> float:
    """Give the step-0 reconstruction of x the data's RMS norm; returns the factor alpha applied.

    An RA-SAE starts its own scale parameter there, exp(m) = alpha (Adam then moves m in log
    space, so no other parameter's scale changes). A TopK SAE, whose unit-norm atoms leave no
    scale parameter, gets it from its encoder: W_enc and b_enc times alpha, which keeps every
    selected latent (TopK(ReLU(.)) is positively homogeneous). No atom direction changes.
    """
    vals, idx = sae.encode(x)
    recon = sparse_decode(vals, idx, sae.dictionary())
    target = x - sae.b_pre if isinstance(sae, TopKSAE) else x
    alpha = float(target.norm() / recon.norm().clamp_min(1e-12))
    if isinstance(sae, RelaxedArchetypalSAE):
        sae.multiplier.add_(math.log(alpha))
    else:
        sae.W_enc.mul_(alpha)
        sae.b_enc.mul_(alpha)
    return alpha
