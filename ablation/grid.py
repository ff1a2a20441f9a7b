"""One cell of the grid: a configuration on one preprocessing, all its seeds."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .activations import fit_sample
from .configs import CONFIGURATIONS
from .convergence import convergence, decay_steps, full_rate_steps
from .memory import trim_heap_every
from .metrics import pair_matrices
from .sae import RelaxedArchetypalSAE, TopKSAE, match_start_scale_
from .starts import kmeans_centroids, make_sae
from .store import cached_result, cell_lock, code_hash, load_result, meta_matches, read_meta, temp_path
from .train import SAETrainer, decay_schedule, train_saes


def training_set(acts: np.ndarray, train_tokens: int, seed: int) -> np.ndarray | torch.Tensor:
    """The activations the SAEs train on: the whole cache (train_tokens=0), or a fixed set of
    train_tokens rows drawn with seed, held in memory and passed over in epochs."""
    if not train_tokens:
        return acts
    if train_tokens > len(acts):
        raise ValueError(f"train_tokens={train_tokens:,} exceeds the {len(acts):,} cached activations")
    return fit_sample(acts, train_tokens, seed)


def fvu_of_mse(mse: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    """A training MSE (mean over tokens and dimensions) as FVU against the data x's own spread."""
    return mse * x.shape[1] / float((x - x.mean(0)).pow(2).sum(1).mean())


def build_cell(name: str, prep: str, sample: torch.Tensor, seeds: Sequence[int], *,
               n_latents: int, k: int, n_candidates: int, delta: float, match_start_scale: bool,
               pre_bias: bool, center_encoder: bool, kmeans_shared_seed: int,
               shared_points: torch.Tensor | None = None) -> tuple[list[nn.Module], list[float]]:
    """Every seed's SAE of one configuration on one preprocessing, at its start (and its start
    scale): ``sample`` is the raw fit sample (k-means, candidates, the start scale, and the mean
    that 'centered' subtracts)."""
    arch, init, decoder = CONFIGURATIONS[name]
    x = sample - sample.mean(0) if prep == "centered" else sample
    models = [make_sae(arch, init, x, n_latents, k, s, n_candidates, delta, decoder,
                       kmeans_shared_seed, shared_points, False, pre_bias, center_encoder)
              for s in seeds]
    return models, [match_start_scale_(m, x) if match_start_scale else 1.0 for m in models]


def _save_checkpoint(path: Path, meta: dict, trainer: SAETrainer, taken: dict) -> None:
    """The trainer's state and the snapshots so far, written to a temporary name then renamed."""
    tmp = temp_path(path)
    torch.save({"meta": meta, "trainer": trainer.state_dict(), "taken": taken}, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path | None, meta: dict) -> dict | None:
    """A checkpoint written for exactly this meta, else None (missing, partial or another cell's)."""
    if path is None or not path.exists():
        return None
    try:
        found = torch.load(path, weights_only=True)
    except Exception:  # a file cut short is not a checkpoint
        return None
    return found if meta_matches(found.get("meta"), meta) else None


def train_cell(name: str, prep: str, data: np.ndarray | torch.Tensor, sample: torch.Tensor,
               seeds: Sequence[int], *, n_latents: int, k: int, n_candidates: int, delta: float,
               min_sae_tokens: int, max_sae_tokens: int, sae_batch_size: int, sae_lr: float,
               lr_decay: float, clip_grad: float | None, dead_penalty: float, aux_k: int,
               aux_dead_tokens: int, match_start_scale: bool, pre_bias: bool, center_encoder: bool,
               kmeans_shared_seed: int, n_log_snapshots: int, snapshots_per_doubling: int,
               converge_tolerance: float, n_boot: int = 2000, seed: int = 0,
               shared_points: torch.Tensor | None = None, checkpoint: str | os.PathLike | None = None,
               meta: dict | None = None, device: str = "auto", precision: str = "float32") -> dict:
    """Train every seed of one configuration on one preprocessing until it has converged: one
    cell of the grid.

    The runs train at the full rate ``sae_lr`` for at least ``min_sae_tokens``; from there, at
    every snapshot, the convergence criterion (``convergence.convergence``: the slope of the
    Hungarian distance per doubling of tokens over the last doubling, 95% interval over runs,
    within +-converge_tolerance) decides whether to go on, up to ``max_sae_tokens``. Then the
    rate falls linearly to 0 over the last ``lr_decay`` share of all steps. Every snapshot holds
    the run-by-run distances (``metrics.pair_matrices``). With ``checkpoint``, the state is saved
    at every doubling and before the decay, for this ``meta``, and a re-run resumes from it bit
    for bit. ``data`` is what the runs train on, ``sample`` the raw fit sample. Returns the
    snapshots (steps, tokens, learning rates, dictionaries, distances), the convergence record,
    losses, the share of clipped steps, every run's trained state, the mean and the start scales.
    """
    checkpoint = None if checkpoint is None else Path(checkpoint)
    meta = meta or {}
    mu = sample.mean(0)
    models, scales = build_cell(
        name, prep, sample, seeds, n_latents=n_latents, k=k, n_candidates=n_candidates,
        delta=delta, match_start_scale=match_start_scale, pre_bias=pre_bias,
        center_encoder=center_encoder, kmeans_shared_seed=kmeans_shared_seed,
        shared_points=shared_points)
    trainer = SAETrainer(models, data, seeds, sae_batch_size, sae_lr,
                         shift=mu if prep == "centered" else None, clip_grad=clip_grad,
                         dead_penalty=dead_penalty, aux_k=aux_k, aux_dead_tokens=aux_dead_tokens,
                         device=device, precision=precision)
    min_steps, max_steps = min_sae_tokens // sae_batch_size, max_sae_tokens // sae_batch_size
    plan = full_rate_steps(min_steps, max_steps, n_log_snapshots, snapshots_per_doubling)
    taken: dict = {"steps": [], "lr": [], "dictionaries": [], "distances": [], "record": None,
                   "saved_at": 0}
    found = _load_checkpoint(checkpoint, meta)
    if found is not None:
        trainer.load_state_dict(found["trainer"])
        taken = found["taken"]

    def take(lr: float) -> None:
        """Snapshot every run's dictionary and the run-by-run distances now."""
        dicts = trainer.dictionaries()
        taken["steps"].append(trainer.step)
        taken["lr"].append(lr)
        taken["dictionaries"].append(dicts)
        taken["distances"].append({m: torch.from_numpy(v) for m, v in pair_matrices(dicts).items()})

    full = lambda step: sae_lr  # noqa: E731
    while not (taken["record"] or {}).get("stop"):
        s = next(s for s in plan if s > (taken["steps"][-1] if taken["steps"] else -1))
        trainer.advance(s, full)
        take(sae_lr)
        if s >= min_steps:
            tokens = [t * sae_batch_size for t in taken["steps"]]
            hung = np.stack([d["hungarian"].numpy() for d in taken["distances"]])
            record = convergence(hung, tokens, taken["lr"], converge_tolerance, n_boot=n_boot,
                                 seed=seed)
            taken["record"] = {**record, "stop": record["converged"] or s >= max_steps}
        if checkpoint is not None and s >= min_steps and s >= 2 * taken["saved_at"]:
            taken["saved_at"] = s
            _save_checkpoint(checkpoint, meta, trainer, taken)
    full_steps = taken["record"]["tokens"] // sae_batch_size
    n_decay = decay_steps(full_steps, lr_decay)
    if n_decay and checkpoint is not None and taken["saved_at"] < full_steps:
        taken["saved_at"] = full_steps
        _save_checkpoint(checkpoint, meta, trainer, taken)
    lr_at = decay_schedule(sae_lr, full_steps + n_decay, n_decay)
    for q in (0.25, 0.5, 0.75, 1.0):
        s = full_steps + int(round(q * n_decay))
        if s > taken["steps"][-1]:
            trainer.advance(s, lr_at)
            take(lr_at(s - 1))
    trainer.write_back()
    record = {k_: v for k_, v in taken["record"].items() if k_ != "stop"}
    capped = not record["converged"]
    record.update(full_rate_tokens=full_steps * sae_batch_size, decay_tokens=n_decay * sae_batch_size,
                  tokens_trained=trainer.step * sae_batch_size, capped=capped,
                  max_tokens=max_steps * sae_batch_size)
    distances = {m: torch.stack([d[m] for d in taken["distances"]]) for m in taken["distances"][0]}
    return {"steps": taken["steps"], "tokens": [s * sae_batch_size for s in taken["steps"]],
            "lr": taken["lr"], "dictionaries": torch.stack(taken["dictionaries"]),
            "distances": distances, "convergence": record, "loss": torch.stack(trainer.losses),
            "clipped": (trainer.clipped / max(trainer.step, 1)).tolist(), "seeds": list(seeds),
            "state_dicts": [m.state_dict() for m in models], "mean": mu, "start_scale": scales}


@dataclass(frozen=True)
class CellJob:
    """Everything one process needs to train (or find saved) one cell of the grid."""

    run_dir: str  # the profile's run folder; the cell goes to run_dir/saes/
    name: str  # the configuration (configs.CONFIGURATIONS)
    prep: str  # "raw" or "centered"
    cache: str  # the training activations (.npy, verified by notebook 01), read by memory map
    seeds: tuple[int, ...]  # one run per seed
    meta: dict  # the cell's cache key: parameters, the activation cache's metadata, the code
    train: dict  # train_cell's keywords
    train_tokens: int = 0  # training_set's size (0: the whole cache)
    n_fit_tokens: int = 50_000  # the fit sample's size
    seed: int = 0  # the fit sample's and the training set's seed
    shared_points: torch.Tensor | None = field(default=None, compare=False)  # kmeans-shared starts
    threads: int = 0  # torch threads while this cell trains; 0: as the process has them


def cell_file(run_dir: str | os.PathLike, name: str, prep: str, suffix: str = ".safetensors") -> Path:
    """Where a cell (suffix .safetensors), its checkpoint (.ckpt) or its lock lives."""
    return Path(run_dir) / "saes" / f"{name}__{prep}{suffix}"


def cell_timing(cell: dict) -> dict:
    """A saved cell's training seconds (None if saved by older code) and whether it resumed."""
    return {"train_seconds": cell.get("train_seconds"), "resumed": bool(cell.get("resumed", False))}


def run_cell(job: CellJob) -> dict:
    """Train one cell, or load it when saved for job.meta, holding the cell's lock; return what
    notebook 02 tabulates: the loss curve, the clipped share, the convergence record, this call's
    seconds, whether the cell was reused, and its training seconds (None if saved by older code)."""
    started, before = time.perf_counter(), torch.get_num_threads()
    trim_heap_every()  # a worker process trims its heap as a notebook's does (memory.py)
    if job.threads:
        torch.set_num_threads(job.threads)
    path = cell_file(job.run_dir, job.name, job.prep)
    try:
        with cell_lock(path):
            data = training_set(np.load(job.cache, mmap_mode="r"), job.train_tokens, job.seed)
            sample = fit_sample(data, job.n_fit_tokens, job.seed)
            ckpt = cell_file(job.run_dir, job.name, job.prep, ".ckpt")  # resumed from if interrupted
            resumed, trained = ckpt.is_file(), []

            def train() -> dict:
                """Train the cell, recording its training seconds (this process's share if resumed)."""
                trained.append(time.perf_counter())
                out = train_cell(job.name, job.prep, data, sample, list(job.seeds),
                                 shared_points=job.shared_points, checkpoint=ckpt, meta=job.meta, **job.train)
                return {**out, "train_seconds": time.perf_counter() - trained[0], "resumed": resumed}

            res = cached_result(path, job.meta, train)
            ckpt.unlink(missing_ok=True)  # the cell is saved whole
    finally:
        torch.set_num_threads(before)
    return {"loss": res["loss"], "clipped": res["clipped"], "convergence": res["convergence"],
            "seconds": time.perf_counter() - started, "reused": not trained, **cell_timing(res)}


TRAIN_KEYS = ("n_latents", "k", "n_candidates", "delta", "min_sae_tokens", "max_sae_tokens",
              "sae_batch_size", "sae_lr", "lr_decay", "clip_grad", "dead_penalty", "aux_k",
              "aux_dead_tokens", "match_start_scale", "pre_bias", "center_encoder",
              "kmeans_shared_seed", "n_log_snapshots", "snapshots_per_doubling",
              "converge_tolerance", "n_boot", "seed", "device", "precision")  # train_cell's settings


def cell_meta(params: dict, cache_dir: str | os.PathLike) -> dict:
    """What every saved cell is keyed by besides its name, preprocessing and seeds: each setting
    that changes it (not the device), the activation cache's metadata and the training code."""
    return {**{k: params[k] for k in TRAIN_KEYS if k != "device"},
            "train_tokens": params["train_tokens"], "n_fit_tokens": params["n_fit_tokens"],
            "cache": read_meta(Path(cache_dir) / "acts_train.json"), "code": code_hash(train_cell)}


def shared_starts(params: dict, cache_dir: str | os.PathLike, run_dir: str | os.PathLike,
                  sample: torch.Tensor, preprocessing: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each preprocessing's k-means centroids that every kmeans-shared run starts from, fitted
    on the (centered) fit sample once and saved under run_dir/saes/."""
    meta = {**cell_meta(params, cache_dir), "code": code_hash(kmeans_centroids)}
    mu = sample.mean(0)
    return {p: cached_result(cell_file(run_dir, "kmeans-shared", p), {**meta, "preprocessing": p},
                             lambda: {"centroids": kmeans_centroids(sample - (mu if p == "centered" else 0),
                                                                    params["n_candidates"],
                                                                    params["kmeans_shared_seed"])})["centroids"]
            for p in preprocessing}


def cell_jobs(params: dict, cache_dir: str | os.PathLike, run_dir: str | os.PathLike,
              configurations: Sequence[str], preprocessing: Sequence[str],
              shared: dict[str, torch.Tensor]) -> list[CellJob]:
    """Every cell of a grid as a job: the profile's activations in cache_dir, the cells saved
    under run_dir/saes/ (a stage of its own may train its grid in a folder of its own)."""
    meta = cell_meta(params, cache_dir)
    return [CellJob(str(run_dir), name, prep, str(Path(cache_dir) / "acts_train.npy"),
                    tuple(params["seeds"]),
                    {**meta, "configuration": name, "preprocessing": prep, "seeds": list(params["seeds"])},
                    {k: params[k] for k in TRAIN_KEYS}, params["train_tokens"], params["n_fit_tokens"],
                    params["seed"], shared[prep] if CONFIGURATIONS[name][1] == "kmeans-shared" else None)
            for name in configurations for prep in preprocessing]


def load_cell(run_dir: str | os.PathLike, name: str, prep: str) -> dict:
    """A cell saved by notebook 02, verified; a clear error when it is missing or corrupt."""
    path = cell_file(run_dir, name, prep)
    cell = load_result(path, {})
    if cell is None:
        raise FileNotFoundError(f"{path} is missing or corrupt: run notebook 02 with "
                                f"configurations=[{name!r}] and preprocessing=[{prep!r}]")
    return cell


def sae_from_state(state: dict, meta: dict, decoder: str = "projected") -> nn.Module:
    """Rebuild a trained TopKSAE or RelaxedArchetypalSAE from its state_dict and cell meta;
    ``decoder`` is its configuration's (``CONFIGURATIONS``)."""
    n, d = state["W_enc"].shape
    if "candidates" in state:
        sae = RelaxedArchetypalSAE(d, n, meta["k"], state["candidates"], meta["delta"],
                                   decoder == "projected", encoder_shift=state.get("enc_shift"))
    else:
        sae = TopKSAE(d, n, meta["k"], pre_bias=meta.get("pre_bias", True) and decoder != "relax",
                      decoder_norm="unit" if decoder == "unit" else "free",
                      encoder_shift=state.get("enc_shift"))
    sae.load_state_dict(state)
    return sae.eval()


def start_scale_effect(configurations: Sequence[str], preprocessing: Sequence[str],
                       data: np.ndarray | torch.Tensor, sample: torch.Tensor, n_steps: int,
                       run_seed: int, shared: dict[str, torch.Tensor], **train: object) -> list[dict]:
    """Training FVU over the last tenth of the first n_steps at the full rate, with and without
    the start scale: one run (``run_seed``) per configuration and preprocessing, built and trained as
    the grid does (``train``: train_cell's keywords); ``shared`` holds each preprocessing's
    shared k-means centroids."""
    build = {k_: train[k_] for k_ in ("n_latents", "k", "n_candidates", "delta", "pre_bias",
                                      "center_encoder", "kmeans_shared_seed")}
    fit = {k_: train[k_] for k_ in ("clip_grad", "dead_penalty", "aux_k", "aux_dead_tokens", "device",
                                    "precision")}
    rows, mu = [], sample.mean(0)
    for name in configurations:
        for prep in preprocessing:
            x = sample - mu if prep == "centered" else sample
            row = {"configuration": name, "preprocessing": prep}
            for match in (False, True):
                models, _ = build_cell(name, prep, sample, [run_seed], match_start_scale=match,
                                       shared_points=shared.get(prep), **build)
                out = train_saes(models, data, [run_seed], n_steps * train["sae_batch_size"],
                                 train["sae_batch_size"], train["sae_lr"], [],
                                 shift=mu if prep == "centered" else None, progress=False, **fit)
                loss = out["loss"][-max(1, n_steps // 10):].mean()
                row["scaled" if match else "reference"] = float(fvu_of_mse(loss, x))
            rows.append(row)
    return rows
