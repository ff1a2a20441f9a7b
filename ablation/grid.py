"""One cell of the grid: a configuration on one preprocessing, all its seeds."""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from tqdm.auto import tqdm

from .activations import cache_definition, fit_sample
from .configs import CONFIGURATIONS
from .evaluation import evaluate_runs
from .memory import trim_heap_every
from .metrics import pair_matrices
from .parameters import resolve_device
from .records import find_record, made_by, record_lock, record_path, triangle, write_record
from .sae import RelaxedArchetypalSAE, TopKSAE, match_start_scale_
from .schedule import budget_steps, cooldown, plan, trunk_snapshots
from .starts import kmeans_centroids, make_sae
from .store import cached_result, cell_lock, code_hash, meta_matches, save_result, temp_path
from .train import SAETrainer, train_saes


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


@dataclass(frozen=True)
class TrainSettings:
    """Every setting that decides how a cell's runs are built and trained: ``train_cell``'s one
    argument besides the data (each parameter's meaning: ablation/parameters.py)."""

    n_latents: int
    k: int
    n_candidates: int
    delta_share: float
    delta: float | None
    sae_budget: int
    n_budgets: int
    sae_batch_size: int
    sae_lr: float
    lr_decay: float
    clip_grad: float | None
    dead_penalty: float
    aux_k: int
    aux_dead_tokens: int
    match_start_scale: bool
    pre_bias: bool
    center_encoder: bool
    kmeans_shared_seed: int
    n_log_snapshots: int
    snapshots_per_doubling: int
    precision: str = "float32"
    device: str = field(default="auto", compare=False)  # where it trains, not what it computes

    @classmethod
    def from_params(cls, params: dict) -> "TrainSettings":
        """The settings of a notebook's resolved parameters."""
        return cls(**{f.name: params[f.name] for f in fields(cls)})

    def identity(self, arch: str) -> dict:
        """The settings that change a cell of architecture ``arch``: all but the device, and
        neither the relaxation for a TopK SAE nor AuxK for an RA-SAE (which never read them)."""
        unread = {"device"} | ({"delta_share", "delta"} if arch == "topk" else {"aux_k", "aux_dead_tokens"})
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in unread}


TRAIN_KEYS = tuple(f.name for f in fields(TrainSettings))  # the parameters TrainSettings holds


def median_norm(x: torch.Tensor) -> float:
    """The median row norm of the (preprocessed) fit sample: the scale of the candidate points."""
    return float(x.norm(dim=1).median())


def resolved_delta(settings: TrainSettings, x: torch.Tensor) -> float:
    """The absolute relaxation radius on data x: settings.delta when given, else delta_share
    times the candidates' median norm."""
    return settings.delta if settings.delta is not None else settings.delta_share * median_norm(x)


def build_cell(name: str, prep: str, sample: torch.Tensor, seeds: Sequence[int],
               settings: TrainSettings, shared_points: torch.Tensor | None = None,
               ) -> tuple[list[nn.Module], list[float], float]:
    """Every seed's SAE of one configuration on one preprocessing, at its start: the models, their
    start scales and the absolute delta. ``sample`` is the raw fit sample (k-means, candidates,
    the start scale, delta's scale and the mean that 'centered' subtracts)."""
    arch, init, decoder = CONFIGURATIONS[name]
    s = settings
    x = sample - sample.mean(0) if prep == "centered" else sample
    delta = resolved_delta(s, x)
    models = [make_sae(arch, init, x, s.n_latents, s.k, seed, s.n_candidates, delta, decoder,
                       s.kmeans_shared_seed, shared_points, False, s.pre_bias, s.center_encoder)
              for seed in seeds]
    return models, [match_start_scale_(m, x) if s.match_start_scale else 1.0 for m in models], delta


def _save_checkpoint(path: Path, meta: dict, trainer: SAETrainer, taken: dict) -> None:
    """The trainer's state and the readings so far, written to a temporary name then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
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


def _reading(trainer: SAETrainer, models: list[nn.Module],
             evaluate: Callable[[list[nn.Module]], dict] | None) -> dict:
    """The runs as they are now: their dictionaries, their states and, with ``evaluate``, what it
    measures of the models (as plain lists, so a checkpoint can hold it)."""
    trainer.write_back()
    found = None if evaluate is None else evaluate(models)
    if found is not None:
        found = {part: {m: np.asarray(v).tolist() for m, v in values.items()} for part, values in found.items()}
    return {"dictionaries": trainer.dictionaries(),
            "states": [{n: t.clone() for n, t in m.state_dict().items()} for m in models],
            "evaluation": found}


def train_cell(name: str, prep: str, data: np.ndarray | torch.Tensor, sample: torch.Tensor,
               seeds: Sequence[int], settings: TrainSettings, *,
               evaluate: Callable[[list[nn.Module]], dict] | None = None,
               shared_points: torch.Tensor | None = None, checkpoint: str | os.PathLike | None = None,
               meta: dict | None = None) -> dict:
    """Train every seed of one configuration on one preprocessing on the profile's one schedule
    (``schedule``): a trunk at the full rate up to the largest budget, and at every budget a
    cooldown branch whose end is the cell at that budget.

    Along the trunk, every snapshot records the run-by-run distances (``metrics.pair_matrices``).
    At every budget the branch's end and the trunk (its no-decay reading) are read: the runs'
    dictionaries, and ``evaluate(models)`` when given. A branch starts from a copy of the trunk's
    whole state and the trunk continues from that copy, so no branch changes the trunk. With
    ``checkpoint``, the state is saved after every branch and budget for this ``meta``, and a
    re-run resumes from it bit for bit. ``data`` is what the runs train on, ``sample`` the raw fit
    sample. Returns the snapshots (tokens, distances), the budgets, per budget the branch's and
    the trunk's dictionaries and evaluations, the states at the largest budget, the trunk's
    losses and clipped share, the mean, the start scales and the absolute delta.
    """
    s = settings
    checkpoint = None if checkpoint is None else Path(checkpoint)
    meta = meta or {}
    mu = sample.mean(0)
    models, scales, delta = build_cell(name, prep, sample, seeds, s, shared_points)
    trainer = SAETrainer(models, data, seeds, s.sae_batch_size, s.sae_lr,
                         shift=mu if prep == "centered" else None, clip_grad=s.clip_grad,
                         dead_penalty=s.dead_penalty, aux_k=s.aux_k, aux_dead_tokens=s.aux_dead_tokens,
                         device=s.device, progress=False, precision=s.precision)
    budgets = budget_steps(s.sae_budget, s.n_budgets, s.sae_batch_size)
    events = plan(budgets, s.lr_decay, trunk_snapshots(budgets[0], budgets[-1], s.n_log_snapshots,
                                                       s.snapshots_per_doubling))
    taken: dict = {"done": 0, "steps": [], "distances": [], "branch": [None] * len(budgets),
                   "trunk": [None] * len(budgets)}
    found = _load_checkpoint(checkpoint, meta)
    if found is not None:
        trainer.load_state_dict(found["trainer"])
        taken = found["taken"]
    full = lambda step: s.sae_lr  # noqa: E731
    for i, (step, kind, b) in enumerate(tqdm(events, desc=f"{name} / {prep}", leave=False)):
        if i < taken["done"]:
            continue
        trainer.advance(step, full)
        if kind == "snapshot":
            taken["steps"].append(step)
            taken["distances"].append({m: v.tolist() for m, v in pair_matrices(trainer.dictionaries()).items()})
        elif kind == "budget":
            taken["trunk"][b] = _reading(trainer, models, evaluate)
        else:  # a cooldown branch from a copy of the trunk's state, which the trunk then resumes
            trunk = copy.deepcopy(trainer.state_dict())
            trainer.advance(budgets[b], cooldown(s.sae_lr, step, budgets[b]))
            taken["branch"][b] = _reading(trainer, models, evaluate)
            trainer.load_state_dict(trunk)
        if kind != "snapshot" and b < len(budgets) - 1:
            taken[kind if kind == "branch" else "trunk"][b].pop("states")  # kept at the largest only
        taken["done"] = i + 1
        if checkpoint is not None and kind != "snapshot" and i + 1 < len(events):
            _save_checkpoint(checkpoint, meta, trainer, taken)
    last = {part: taken[part][-1].pop("states") for part in ("branch", "trunk")}
    distances = {m: np.array([d[m] for d in taken["distances"]]) for m in taken["distances"][0]}
    return {"tokens": [t * s.sae_batch_size for t in taken["steps"]], "distances": distances,
            "budgets": [b * s.sae_batch_size for b in budgets],
            **{part: taken[part] for part in ("branch", "trunk")}, "states": last,
            "loss": torch.stack(trainer.losses), "clipped": (trainer.clipped / max(trainer.step, 1)).tolist(),
            "seeds": list(seeds), "mean": mu, "start_scale": scales, "delta": delta}


def _binned(tokens: np.ndarray, values: np.ndarray, n_bins: int = 120) -> dict:
    """A long curve as the means of log-spaced bins of tokens: what a figure of it needs."""
    edges = np.unique(np.geomspace(tokens[0], tokens[-1] + 1, n_bins + 1).astype(np.int64))
    idx = np.clip(np.searchsorted(edges, tokens, side="right") - 1, 0, len(edges) - 2)
    keep = np.bincount(idx, minlength=len(edges) - 1) > 0
    sums = np.bincount(idx, weights=values, minlength=len(edges) - 1)
    counts = np.bincount(idx, minlength=len(edges) - 1)
    mids = np.bincount(idx, weights=tokens, minlength=len(edges) - 1)
    return {"tokens": (mids[keep] / counts[keep]).round().tolist(), "value": (sums[keep] / counts[keep]).tolist()}


def cell_payload(out: dict, x_fit: torch.Tensor) -> dict:
    """A trained cell (``train_cell``'s output, evaluated) as its record's numbers: the trunk's
    snapshots and its training-FVU curve, and at every budget the branch's and the trunk's
    evaluations; pair matrices as upper triangles (``records.triangle``). ``x_fit`` is the
    preprocessed fit sample the training FVU is taken against."""
    n = len(out["seeds"])
    pairs = lambda mats: {m: triangle(np.asarray(v)) for m, v in mats.items()}  # noqa: E731
    curve = fvu_of_mse(out["loss"].double().mean(1), x_fit.double()).numpy()
    tokens = np.arange(1, len(curve) + 1) * (out["budgets"][-1] // len(curve))  # batch size
    return {"seeds": out["seeds"], "n_runs": n, "budgets": out["budgets"],
            "n_latents": int(out["branch"][-1]["dictionaries"].shape[1]),
            "d": int(out["branch"][-1]["dictionaries"].shape[2]),
            "delta": out["delta"], "start_scale": out["start_scale"], "clipped": out["clipped"],
            "trunk": {"tokens": out["tokens"], **{m: [triangle(v) for v in vs] for m, vs in out["distances"].items()}},
            "training_fvu": _binned(tokens, curve),
            **{f"{part}_at_budget": [{"runs": r["evaluation"]["runs"], "pairs": pairs(r["evaluation"]["pairs"])}
                                     for r in out[part]] for part in ("branch", "trunk")}}


@dataclass(frozen=True)
class CellJob:
    """Everything one process needs to find one cell's record, or to train and record it."""

    name: str  # the configuration (configs.CONFIGURATIONS)
    prep: str  # "raw" or "centered"
    seeds: tuple[int, ...]  # one run per seed
    settings: TrainSettings  # how its runs are built and trained
    cache_dir: str  # the run folder holding the verified activation caches (notebook 01)
    run_dir: str  # where its weights, checkpoint and shared starts go: run_dir/saes/
    records: tuple[str, ...]  # folders its record is looked for in; the first is where it is written
    key: dict  # what the record is keyed by (cell_key)
    data: dict  # train_tokens, n_fit_tokens, n_eval_tokens and seed: what it reads of the caches
    fresh: bool = False  # train even when a record matches
    threads: int = 0  # torch threads while this cell trains; 0: as the process has them


def cell_file(run_dir: str | os.PathLike, name: str, prep: str, suffix: str = ".safetensors") -> Path:
    """Where a cell's weights (suffix .safetensors) or its checkpoint (.ckpt) live."""
    return Path(run_dir) / "saes" / f"{name}__{prep}{suffix}"


def cell_code() -> str:
    """Identity of the code a record's numbers come from: training, evaluation, the record."""
    return code_hash(train_cell, evaluate_runs, cell_payload)


def cell_key(name: str, prep: str, seeds: Sequence[int], settings: TrainSettings, data: dict,
             cache_dir: str | os.PathLike) -> dict:
    """What a cell's record is keyed by: the cell, every setting its architecture reads, what it
    reads of the caches, the caches' definition (``activations.cache_definition``) and the code."""
    return {"configuration": name, "preprocessing": prep, "seeds": [int(x) for x in seeds],
            "settings": settings.identity(CONFIGURATIONS[name][0]), "data": dict(data),
            "cache": cache_definition(cache_dir), "code": cell_code()}


def shared_start(job: CellJob, sample: torch.Tensor) -> torch.Tensor:
    """The k-means centroids every kmeans-shared run of the job's preprocessing starts from,
    fitted on the (centered) fit sample once and saved under run_dir/saes/."""
    s = job.settings
    meta = {"n_candidates": s.n_candidates, "kmeans_shared_seed": s.kmeans_shared_seed,
            "data": job.data, "cache": job.key["cache"], "preprocessing": job.prep,
            "code": code_hash(kmeans_centroids)}
    path = cell_file(job.run_dir, "kmeans-shared", job.prep)
    x = sample - sample.mean(0) if job.prep == "centered" else sample
    with cell_lock(path):
        return cached_result(path, meta, lambda: {"centroids": kmeans_centroids(
            x, s.n_candidates, s.kmeans_shared_seed)})["centroids"]


def _train_and_record(job: CellJob) -> dict:
    """Train a job's cell (resuming its checkpoint), evaluate it at every budget, save its weights
    under run_dir/saes/ and write its record; return the record."""
    started = time.perf_counter()
    d = job.data
    cache = Path(job.cache_dir)
    data = training_set(np.load(cache / "acts_train.npy", mmap_mode="r"), d["train_tokens"], d["seed"])
    sample = fit_sample(data, d["n_fit_tokens"], d["seed"])
    mu = sample.mean(0)
    shift = mu if job.prep == "centered" else 0
    held = np.load(cache / "acts_heldout.npy", mmap_mode="r")
    x_eval = torch.from_numpy(np.array(held[:d["n_eval_tokens"]], dtype=np.float32)) - shift
    x_train = fit_sample(data, len(x_eval), d["seed"]) - shift
    x_fit = sample - shift
    spent = [0.0]  # seconds of evaluation, told apart from training in the record

    def evaluate(models: list[nn.Module]) -> dict:
        """evaluate_runs on this cell's held-out and training activations, timed."""
        tic = time.perf_counter()
        out = evaluate_runs(models, x_eval, x_train, x_fit.mean(0))
        spent[0] += time.perf_counter() - tic
        return out

    shared = shared_start(job, sample) if CONFIGURATIONS[job.name][1] == "kmeans-shared" else None
    ckpt = cell_file(job.run_dir, job.name, job.prep, ".ckpt")
    resumed = ckpt.is_file()
    out = train_cell(job.name, job.prep, data, sample, list(job.seeds), job.settings, evaluate=evaluate,
                     shared_points=shared, checkpoint=ckpt, meta=job.key)
    trained = time.perf_counter() - started
    save_result(cell_file(job.run_dir, job.name, job.prep),
                {"states": out["states"], "mean": out["mean"], "delta": out["delta"],
                 "dictionaries": {p: torch.stack([r["dictionaries"] for r in out[p]]) for p in ("branch", "trunk")}},
                job.key)
    payload = cell_payload(out, x_fit)
    made = made_by({"train": trained - spent[0], "evaluate": spent[0],
                    "record": time.perf_counter() - started - trained}, str(resolve_device(job.settings.device)))
    made["resumed"] = resumed
    record = write_record(record_path(job.records[0], job.name, job.prep), job.key, payload, made)
    ckpt.unlink(missing_ok=True)
    return record


def run_cell(job: CellJob) -> dict:
    """A job's record: the first that matches its key in job.records (unless job.fresh), else the
    cell trained and recorded, under the record's lock. Returns the record, where it was found
    (None when trained now), and this call's seconds."""
    started, before = time.perf_counter(), torch.get_num_threads()
    trim_heap_every()  # a worker process trims its heap as a notebook's does (memory.py)
    if job.threads:
        torch.set_num_threads(job.threads)
    try:
        with record_lock(record_path(job.records[0], job.name, job.prep)):
            record, found = (None, None) if job.fresh else find_record(job.records, job.name, job.prep, job.key)
            if record is None:
                record = _train_and_record(job)
    finally:
        torch.set_num_threads(before)
    return {"record": record, "found": None if found is None else str(found),
            "seconds": time.perf_counter() - started}


def cell_jobs(params: dict, configurations: Sequence[str], preprocessing: Sequence[str],
              run_dir: str | os.PathLike, records: Sequence[str | os.PathLike]) -> list[CellJob]:
    """Every cell of a grid as a job, from a notebook's resolved parameters: the profile's caches
    in params['run_dir'], weights under run_dir/saes/, records looked for in ``records`` (the
    first is where new ones are written)."""
    settings = TrainSettings.from_params(params)
    data = {k: params[k] for k in ("train_tokens", "n_fit_tokens", "n_eval_tokens", "seed")}
    seeds = tuple(params["seeds"])
    folders = tuple(dict.fromkeys(str(r) for r in records))
    return [CellJob(name, prep, seeds, settings, str(params["run_dir"]), str(run_dir), folders,
                    cell_key(name, prep, seeds, settings, data, params["run_dir"]), data,
                    bool(params.get("fresh", False)))
            for name in configurations for prep in preprocessing]


def find_records(params: dict, configurations: Sequence[str], preprocessing: Sequence[str],
                 folders: Sequence[str | os.PathLike]) -> dict[tuple[str, str], dict]:
    """Every cell's record made for exactly these parameters (the key notebook 02 gives it), from
    the first of ``folders`` that holds one; a clear error naming the cells that have none."""
    out, missing = {}, []
    for job in cell_jobs(params, configurations, preprocessing, params["run_dir"], folders):
        record, _ = find_record(job.records, job.name, job.prep, job.key)
        if record is None:
            missing.append(f"{job.name}__{job.prep}")
        else:
            out[job.name, job.prep] = record
    if missing:
        raise FileNotFoundError(f"no record made for these parameters of {missing} in {list(folders)}: run "
                                "notebook 02 with the same parameters first (make report does)")
    return out


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
                       run_seed: int, settings: TrainSettings) -> list[dict]:
    """Training FVU over the last tenth of the first n_steps at the full rate, with and without
    the start scale: one run (``run_seed``) per configuration and preprocessing, built and
    trained as the grid does (a kmeans-shared start is fitted with the run's own seed here: the
    probe needs a data-like start, not the shared one)."""
    s = settings
    rows, mu = [], sample.mean(0)
    for name in configurations:
        for prep in preprocessing:
            x = sample - mu if prep == "centered" else sample
            row = {"configuration": name, "preprocessing": prep}
            for match in (False, True):
                models, _, _ = build_cell(name, prep, sample, [run_seed], replace(s, match_start_scale=match))
                out = train_saes(models, data, [run_seed], n_steps * s.sae_batch_size, s.sae_batch_size,
                                 s.sae_lr, [], shift=mu if prep == "centered" else None,
                                 clip_grad=s.clip_grad, dead_penalty=s.dead_penalty, aux_k=s.aux_k,
                                 aux_dead_tokens=s.aux_dead_tokens, device=s.device,
                                 precision=s.precision, progress=False)
                loss = out["loss"][-max(1, n_steps // 10):].mean()
                row["scaled" if match else "reference"] = float(fvu_of_mse(loss, x))
            rows.append(row)
    return rows
