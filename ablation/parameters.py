"""Every parameter's rule, and the checks that run before any heavy work."""

from __future__ import annotations

import ast
import math
import os
import re
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from .configs import CONFIGURATIONS, PREPROCESSING
from .variants import VARIANTS, variant_overrides


def check_choice(name: str, value: object, allowed: Sequence[object]) -> None:
    """Raise a ValueError naming the parameter and its allowed values when value is not one."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def check_finite(name: str, x: torch.Tensor | np.ndarray) -> None:
    """Raise a ValueError when an array holds NaN or infinite values."""
    if not bool(torch.isfinite(torch.as_tensor(x)).all()):
        raise ValueError(f"{name} contains NaN or infinite values; clean the data before training")


def check_seeds(seeds: object, name: str = "seeds") -> list[int]:
    """Return seeds as a list after checking it is a non-empty list of unique integers >= 0."""
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds or \
            not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0
                    for s in seeds):
        raise ValueError(f"{name}={seeds!r} must be a non-empty list of integers >= 0, e.g. [0, 1, 2]")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{name}={list(seeds)} repeats a seed; two runs with one seed are one run "
                         "counted twice")
    return [int(s) for s in seeds]


def check_sae_sizes(d_in: int, n_latents: int, k: int) -> None:
    """Raise a ValueError for impossible SAE sizes (k must lie in 1..n_latents)."""
    if d_in < 1 or n_latents < 1:
        raise ValueError(f"d_in={d_in} and n_latents={n_latents} must both be >= 1")
    if not 1 <= k <= n_latents:
        raise ValueError(f"k={k} must lie in 1..n_latents={n_latents}")


def resolve_device(device: str = "auto") -> torch.device:
    """Map 'auto' to cuda when available, else cpu; check that a requested cuda device exists."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str) or not (device == "cpu" or device == "cuda" or (
            device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"device={device!r} is not allowed; choose 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but this torch ({torch.__version__}) sees no CUDA "
                             "GPU; use device='auto' or 'cpu', or install a CUDA build of torch")
        if ":" in device and int(device[5:]) >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}, but only {torch.cuda.device_count()} GPU(s) exist")
    return torch.device(device)


PRECISIONS = ("float32", "bfloat16")  # the SAE encoder's matmul precision


def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bfloat16 natively: a CUDA GPU that supports it, or a CPU with
    the avx512_bf16 or amx_bf16 instructions (elsewhere bfloat16 is emulated, and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_precision(precision: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a precision name; a ValueError naming the allowed ones, and a warning
    when bfloat16 is asked for on a device that would run it slower than float32."""
    import warnings

    check_choice("precision", precision, PRECISIONS)
    if precision == "bfloat16" and not native_bf16(device):
        warnings.warn(f"precision='bfloat16' on {device}, which has no native bfloat16 matmul: it "
                      "will run slower than 'float32'", stacklevel=2)
    return getattr(torch, precision)


def _int(lo: int) -> tuple[Callable[[object], bool], str]:
    """A rule: an integer >= lo, with its words."""
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo), f"an integer >= {lo}"


def _num(lo: float, hi: float = math.inf, lo_open: bool = False,
         hi_closed: bool = False) -> Callable[[object], bool]:
    """A rule: a finite number in [lo, hi) (lo_open: from above lo; hi_closed: up to hi itself)."""
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
        and (v > lo if lo_open else v >= lo) and (v <= hi if hi_closed else v < hi)


def _subset(allowed: Sequence[str]) -> Callable[[object], bool]:
    """A rule: a non-empty list of distinct names from allowed."""
    return lambda v: isinstance(v, list) and bool(v) and len(set(v)) == len(v) and \
        all(x in allowed for x in v)


def _seeds_ok(seeds: object) -> bool:
    """True when check_seeds accepts seeds."""
    try:
        check_seeds(seeds)
        return True
    except ValueError:
        return False


SCHEDULERS = ("local", "serial")  # besides a Dask scheduler's address
# where and how the work runs, not what it computes (a record's key leaves them out; fresh retrains
# cells whose records match, to the same numbers): an override of these keeps the profile's run
# folder, figures and report pages
PLACEMENT = frozenset({"device", "scheduler", "workers", "fresh"})


def is_scheduler(v: object) -> bool:
    """True for 'local', 'serial' or a Dask scheduler address (protocol://host:port)."""
    return isinstance(v, str) and (v in SCHEDULERS or bool(
        re.fullmatch(r"(tcp|tls|inproc|ucx|ws|wss)://\S+:\d+", v)))


def _is_device(v: object) -> bool:
    """True for 'auto', 'cpu', 'cuda' and 'cuda:N'."""
    return v in ("auto", "cpu", "cuda") or (isinstance(v, str) and v.startswith("cuda:")
                                            and v[5:].isdigit())


# rules with their words: (test, what it allows)
_POS, _NONNEG = _int(1), _int(0)
_POSITIVE = (_num(0, lo_open=True), "a number > 0")
_NUMBER = (_num(0), "a number >= 0")
_CLIP = (_num(0), "a number >= 0 (0: no clipping)")
_SHARE = (_num(0, 1), "a number in [0, 1)")
_BOOL = ((lambda v: isinstance(v, bool)), "true or false")
_UNIT = (_num(0, 1, hi_closed=True), "a number in [0, 1]")
_OPT_NUMBER = ((lambda v: v is None or _num(0, lo_open=True)(v)), "None or a number > 0")
_OPT_STR = ((lambda v: v is None or (isinstance(v, str) and bool(v))), "None or a non-empty string")
_STR = ((lambda v: isinstance(v, str) and bool(v)), "a non-empty string")
_DTYPE = ((lambda v: v in ("float32", "float16")), "'float32' or 'float16'")
_DEVICE = (_is_device, "'auto', 'cpu', 'cuda' or 'cuda:N'")
_PRECISION = ((lambda v: v in PRECISIONS), f"one of {list(PRECISIONS)}")
_SCHEDULER = (is_scheduler, "'local', 'serial' or a Dask scheduler address such as 'tcp://10.0.0.5:8786'")
_CONFIGS = (_subset(list(CONFIGURATIONS)), f"a list of distinct names from {list(CONFIGURATIONS)}")
_PREPS = (_subset(PREPROCESSING), f"a list of distinct names from {list(PREPROCESSING)}")
_SEEDS = ((lambda v: isinstance(v, list) and _seeds_ok(v)), "a list of distinct integers >= 0")
_VARIANTS = (_subset(list(VARIANTS)), f"a list of distinct names from {list(VARIANTS)}")
_SCALES = ((lambda v: isinstance(v, list) and bool(v) and all(_num(0)(x) for x in v)),
           "a non-empty list of numbers >= 0")


class Parameter(NamedTuple):
    """One parameter: its default (as the Python literal a notebook shows), its rule, and what it is."""

    default: str
    rule: tuple[Callable[[object], bool], str]
    meaning: str


P = Parameter
# The one home of every parameter: default, type and range, and a one-line meaning. A notebook's
# tagged parameters cell lists the ones its stage uses, generated from here (report.py params).
PARAMETERS: dict[str, Parameter] = {
    "profile": P('"default"', _STR, "params/<profile>.yaml fills each parameter left at None; the "
                 "rest take their defaults"),
    "model_name": P('"local-gptneox"', _STR, '"local-gptneox" (train here), "smollm2" (packaged GGUF), or a hub name / folder'),
    "run_dir": P('None', _STR, "the git-ignored outputs (model, caches, cells, JSON); None: runs/<profile>"),
    "figures_dir": P('"figures"', _STR, 'where figures go, as PNG and PDF'),
    "cells_dir": P('None', _OPT_STR, "where the record of each cell is written and first looked for; None: report/<profile>/cells (committed) for the run folder of the profile, else run_dir/cells"),
    "fresh": P('False', _BOOL, "retrain every cell, even one whose committed record matches (FRESH of make report)"),
    "lm_seed": P('0', _NONNEG, "seeds the language model's weights and the order of its training windows"),
    "vocab_size": P('4096', _POS, 'BPE vocabulary size'),
    "d_model": P('128', _POS, 'residual-stream width'),
    "n_layers": P('4', _POS, 'transformer blocks'),
    "n_heads": P('4', _POS, 'attention heads'),
    "n_ctx": P('128', _POS, 'context length in tokens'),
    "lm_steps": P('500', _POS, 'optimizer steps'),
    "lm_batch_size": P('32', _POS, 'windows per optimizer step'),
    "lm_lr": P('2e-3', _POSITIVE, 'peak AdamW learning rate (warm-up, then cosine decay)'),
    "corpus_max_chars": P('40_000_000', _POS, 'stdlib characters read for training (about 30 M exist)'),
    "heldout_every": P('20', _int(2), 'every n-th stdlib file, in sorted order, is held out'),
    "device": P('"auto"', _DEVICE, '"auto", "cpu", "cuda" or "cuda:N"'),
    "layer": P('2', _NONNEG, 'block whose residual stream is cached'),
    "hook": P('"blocks.{layer}.hook_resid_post"', _STR, 'TransformerLens hook name; {layer} is filled in'),
    "n_tokens": P('2_000_000', _POS, 'activation vectors cached for training the SAEs'),
    "n_heldout_tokens": P('50_000', _POS, 'activation vectors cached from held-out text, for evaluation'),
    "batch_size": P('64', _POS, 'windows per forward pass'),
    "drop_first": P('True', _BOOL, 'drop position 0 of every window (attention-sink tokens dominate norms)'),
    "dtype": P('"float32"', _DTYPE, '"float32" or "float16" on disk'),
    "text_source": P('"stdlib"', _STR, '"stdlib" (offline) or a hub dataset, e.g. "NeelNanda/pile-10k"'),
    "stats_windows": P('64', _POS, 'held-out windows used for the per-layer statistics'),
    "seed": P('0', _NONNEG, 'seeds the choices all runs share: the fit sample, the training set, the bootstrap, the toy data'),
    "configurations": P('["topk-random", "topk-kmeans-shared", "topk-kmeans-independent", "topk-random-points", "ra-kmeans-shared", "ra-kmeans-independent", "ra-projection-off", "ra-random-points"]', _CONFIGS, 'any subset of helpers.CONFIGURATIONS (notebook 02 tabulates them)'),
    "preprocessing": P('["raw", "centered"]', _PREPS, '"raw" and/or "centered" (data mean subtracted)'),
    "seeds": P('[0, 1, 2, 3, 4, 5, 6, 7]', _SEEDS, 'one run per seed; every random choice of a run follows its seed'),
    "n_latents": P('512', _POS, 'dictionary atoms per SAE'),
    "k": P('16', _POS, 'active latents per token'),
    "n_candidates": P('512', _POS, 'k-means centroids or candidate points per run; atoms past n_candidates start at zero'),
    "delta_share": P('0.1', _POSITIVE, "RA-SAE relaxation radius as a share of the median norm of the candidate points on each preprocessing (0.1: what the reference delta of 1 is on the offline model), one share for every profile"),
    "delta": P('None', _OPT_NUMBER, "an absolute relaxation radius instead of delta_share (the authors set 0.1); None: delta_share times the median candidate norm"),
    "sae_budget": P('32_000_000', _POS, 'the largest token budget; every cell of a profile trains this one schedule (a trunk at the full rate, a cooldown branch at each budget)'),
    "n_budgets": P('6', _POS, 'budgets on the doubling grid ending at sae_budget: sae_budget / 2^i for i < n_budgets'),
    "sae_batch_size": P('1024', _POS, 'tokens per step'),
    "precision": P('"float32"', _PRECISION, '"float32" or "bfloat16": the SAE encoder\'s matmul precision (parameters, Adam, loss and metrics stay float32)'),
    "scheduler": P('"serial"', _SCHEDULER, '"serial": cells one after another in this process, with all its threads (the faster on 2 cores: benchmarks/bench_scheduler.py); "local": in parallel on a Dask LocalCluster of single-thread worker processes; or a Dask scheduler\'s address (tcp://host:port), e.g. one started by dask-jobqueue'),
    "workers": P('0', _NONNEG, 'worker processes of the "local" cluster; 0: one per CPU core'),
    "sae_lr": P('5e-3', _POSITIVE, "Adam learning rate (the authors' rate)"),
    "lr_decay": P('0.2', _SHARE, "the cooldown of each budget: its branch leaves the trunk at (1 - lr_decay) x budget and the rate falls linearly to 0 at the budget (0: no decay)"),
    "clip_grad": P('1.0', _CLIP, "per-run gradient-norm clip, as overcomplete's train_sae; 0: off"),
    "dead_penalty": P('1e-3', _NUMBER, "the authors' dead-latent term (pushes up latents silent on a whole batch)"),
    "aux_k": P('0', _NONNEG, 'AuxK latents of Gao et al. for TopK SAEs; 0: off'),
    "aux_dead_tokens": P('100_000', _POS, 'AuxK: a latent silent for this many tokens counts as dead'),
    "match_start_scale": P('True', _BOOL, "start each SAE so its first reconstruction has the data's norm"),
    "pre_bias": P('True', _BOOL, "TopK SAEs learn a pre-bias b_pre (the authors' TopK has none)"),
    "center_encoder": P('True', _BOOL, "RA-SAE encoders see inputs minus the fit sample's mean (their decoders do not)"),
    "train_tokens": P('0', _NONNEG, '0: train on the whole cache; else on a fixed set of this many cached tokens'),
    "n_fit_tokens": P('50_000', _POS, 'activations sampled for k-means, candidates, the data mean and the start scale'),
    "kmeans_shared_seed": P('0', _NONNEG, 'the one k-means seed every kmeans-shared run reuses'),
    "n_log_snapshots": P('14', _NONNEG, "log-spaced trunk snapshots up to the smallest budget / 4 (dense early)"),
    "snapshots_per_doubling": P('8', _int(2), "trunk snapshots per doubling of tokens from the smallest budget / 4 on (the slope of each cell per doubling is fitted over its last doubling)"),
    "converge_tolerance": P('0.025', _POSITIVE, "settled: a comparison keeps its outcome from the budget below to the largest, its difference moved by less than this over that doubling, and moving as much again would not change its outcome (at most equivalence_margin / 2)"),
    "n_scale_steps": P('100', _POS, 'steps of the start-scale comparison'),
    "dose_scales": P('[0.0, 1.0, 4.0, 16.0]', _SCALES, 'multiples of the real |mu| for the dose-response'),
    "dose_sae_latents": P('256', _POS, 'latents of the dose-response SAEs (at most n_candidates)'),
    "dose_sae_k": P('8', _POS, 'active latents per token of the dose-response SAEs'),
    "dose_sae_tokens": P('300_000', _POS, 'tokens each dose-response SAE sees'),
    "n_eval_tokens": P('20_000', _POS, 'held-out activations for reconstruction and activation correlation'),
    "equivalence_margin": P('0.05', _POSITIVE, "the smallest difference that matters, in Hungarian cosine distance (and in correlation): a comparison is decided by whether its 95% interval lies beyond -margin, beyond +margin or within +-margin"),
    "variants": P(repr(list(VARIANTS)), _VARIANTS, "the robustness stage's variants, each a set of overrides stated once in ablation/variants.py"),
    "n_boot": P('2000', _int(100), 'bootstrap resamples (over runs) for every interval'),
    "max_fvu": P('0.4', _POSITIVE, 'quality gate: a cell must reconstruct held-out activations with at most this FVU'),
    "max_dead_share": P('0.5', _UNIT, "quality gate: at most this share of the latents of a cell may be dead on held-out activations"),
    "synthetic_tokens": P('1_000_000', _POS, 'tokens each synthetic-control SAE sees'),
    "synthetic_d": P('64', _POS, 'dimension of the synthetic data'),
    "synthetic_atoms": P('128', _POS, 'atoms of the known dictionary (and latents of the SAEs)'),
    "synthetic_k": P('4', _POS, 'active atoms per synthetic token'),
    "synthetic_mean_norm": P('20.0', _NUMBER, '|mu| of the synthetic data (far from the origin)'),
}


def parameters_cell(names: Sequence[str]) -> str:
    """The tagged parameters cell of a stage that uses ``names``: profile first, then each
    parameter at None (its profile's value, else the default) with its meaning and default."""
    lines = [f'profile = None  # {PARAMETERS["profile"].meaning}; None: the {PROFILE_ENV} environment '
             f'variable (make lab sets it), else {PARAMETERS["profile"].default}']
    lines += [f"{n} = None  # {PARAMETERS[n].meaning} (default {PARAMETERS[n].default})"
              for n in PARAMETERS if n in names and n != "profile"]
    return "\n".join(lines) + "\n"


def default(name: str) -> object:
    """The default value of a parameter."""
    return ast.literal_eval(PARAMETERS[name].default)


def check_parameters(params: dict) -> None:
    """Raise one ValueError listing every parameter whose value breaks its rule in PARAMETERS.

    Types and ranges only; ``check_together`` checks the rules that tie parameters together.
    """
    bad = [f"{name}={value!r} must be {PARAMETERS[name].rule[1]}" for name, value in params.items()
           if name in PARAMETERS and not PARAMETERS[name].rule[0](value)]
    if bad:
        raise ValueError("invalid parameter(s): " + "; ".join(bad))


PROFILES = Path(__file__).resolve().parents[1] / "params"  # params/<profile>.yaml
PROFILE_ENV = "REPORT_PROFILE"  # the profile of a notebook whose first line is left at None (make lab)
# blocks of the models this report knows by name; a local or hub model is checked when booted
MODEL_DEPTHS = {"smollm2": 30, "EleutherAI/pythia-70m-deduped": 6, "EleutherAI/pythia-70m": 6}


def load_profile(profile: str) -> dict:
    """The parameters of params/<profile>.yaml; a ValueError naming the file, line and column."""
    import yaml

    path = PROFILES / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise ValueError(f"profile={profile!r} is unknown; choose one of {known}")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"params/{path.name} is not valid YAML{where}: "
                         f"{getattr(err, 'problem', err)}") from None
    if not isinstance(params, dict):
        raise ValueError(f"params/{path.name} must map parameter names to values")
    if params.get("profile", profile) != profile:
        raise ValueError(f"params/{path.name} says profile={params['profile']!r}; it must be "
                         f"{profile!r}, the name of its file")
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"params/{path.name}: unknown parameter(s) {unknown}")
    return {**params, "profile": profile}


def profile_cells_dir(profile: str, run_dir: str) -> str:
    """Where a run's cell records go: the profile's committed report/<profile>/cells for its own
    run folder runs/<profile>, else run_dir/cells (an override run keeps its records to itself)."""
    root = PROFILES.parent
    own = (root / run_dir).resolve() == (root / "runs" / profile).resolve()
    return f"report/{profile}/cells" if own else str(Path(run_dir) / "cells")


def resolve_parameters(declared: dict) -> dict:
    """A stage's parameters: each left at None takes its profile's value, else its default.

    ``declared`` maps the stage's parameter names to their values as set (None where nothing set
    them); a value set by papermill (-p, or -f params/<profile>.yaml) or by editing the cell is
    kept. run_dir None is runs/<profile>, cells_dir None ``profile_cells_dir``. Every value is checked, alone and together.
    """
    profile = declared.get("profile") or os.environ.get(PROFILE_ENV) or default("profile")
    values = load_profile(profile)
    params = {n: v if v is not None else values.get(n, default(n)) for n, v in declared.items()}
    params["profile"] = profile
    if "run_dir" in params and params["run_dir"] is None:
        params["run_dir"] = f"runs/{profile}"
    if "cells_dir" in params and params["cells_dir"] is None:
        params["cells_dir"] = profile_cells_dir(profile, params.get("run_dir", f"runs/{profile}"))
    check_parameters(params)
    check_together(params)
    return params


def check_together(params: dict) -> None:
    """Raise one ValueError for every rule that ties present parameters together, each naming the
    parameters and the values they may take: sizes, the model's depth, the model's folder."""
    p, bad = params, []
    for k, n in (("k", "n_latents"), ("dose_sae_k", "dose_sae_latents"),
                 ("synthetic_k", "synthetic_atoms"), ("dose_sae_latents", "n_candidates")):
        if k in p and n in p and not p[k] <= p[n]:
            bad.append(f"{k}={p[k]} must lie in 1..{n}={p[n]}")
    if "n_candidates" in p and "n_fit_tokens" in p and p["n_candidates"] > p["n_fit_tokens"]:
        bad.append(f"n_candidates={p['n_candidates']} must be at most n_fit_tokens="
                   f"{p['n_fit_tokens']} (k-means and random points draw from the fit sample)")
    if {"sae_budget", "n_budgets", "sae_batch_size", "snapshots_per_doubling"} <= set(p):
        smallest = p["sae_budget"] // 2 ** (p["n_budgets"] - 1)
        need = p["sae_batch_size"] * p["snapshots_per_doubling"]
        if smallest < need:
            bad.append(f"sae_budget={p['sae_budget']:,} over n_budgets={p['n_budgets']} doublings leaves "
                       f"a smallest budget of {smallest:,} tokens; it must be at least sae_batch_size x "
                       f"snapshots_per_doubling = {need:,}, so that every doubling holds distinct "
                       "snapshots: raise sae_budget or lower n_budgets")
    if "converge_tolerance" in p and "equivalence_margin" in p and \
            not p["converge_tolerance"] <= p["equivalence_margin"] / 2:
        bad.append(f"converge_tolerance={p['converge_tolerance']:g} must be at most "
                   f"equivalence_margin / 2 = {p['equivalence_margin'] / 2:g}: a settled difference may "
                   "still move by the tolerance per doubling, which must stay well inside the margin")
    name, layer = p.get("model_name"), p.get("layer")
    depth = p.get("n_layers", default("n_layers")) if name == default("model_name") \
        else MODEL_DEPTHS.get(name)
    if layer is not None and depth is not None and not layer < depth:
        bad.append(f"layer={layer} must lie in 0..{depth - 1} ({name} has {depth} blocks)")
    if isinstance(name, str) and name not in (default("model_name"), *MODEL_DEPTHS) \
            and not Path(name).expanduser().is_dir() and not _hub_id(name):
        bad.append(f"model_name={name!r} is neither a folder here nor a hub id 'owner/name'; "
                   f"choose {default('model_name')!r}, 'smollm2', a HuggingFace-format folder, "
                   "or a hub id")
    if bad:
        raise ValueError("invalid parameter(s): " + "; ".join(bad))


def resolve_variant(params: dict, name: str) -> dict:
    """The profile's parameters under robustness variant ``name`` (ablation/variants.py), checked
    by the same rules as any override, before anything trains."""
    over = variant_overrides(name, params)
    varied = {**params, **over}
    try:
        check_parameters(varied)
        check_together(varied)
    except ValueError as err:
        raise ValueError(f"variant {name!r} ({over}): {err}") from None
    return varied


def _hub_id(name: str) -> bool:
    """True for a name shaped like a hub id, 'owner/name' (no path of this machine)."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~", "/"))
