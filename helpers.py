"""What the report's notebooks call, by stage: ``import helpers as h``.

The notebooks narrate and plot; the ``ablation`` package beside this file computes and decides,
one concern per module (its ``__init__`` lists them). This module names, stage by stage, the
pieces a reader of a notebook meets, so that ``h.train_cell`` or ``h.verdict`` leads straight to
its home. Shapes follow one convention: a dictionary is an ``(n_latents, d_in)`` tensor whose rows
are atoms; a batch of activations is ``(batch, d_in)``; stacked tensors of several runs (seeds)
trained together carry a leading ``n_seeds`` axis.
"""

from __future__ import annotations

import os
from pathlib import Path

# every stage: the grid's vocabulary, parameters and their checks, files, figures
from ablation.configs import BASELINE, COMPARISONS, CONFIGURATIONS  # noqa: F401
from ablation.memory import trim_heap_every
from ablation.parameters import PARAMETERS, resolve_device, resolve_parameters  # noqa: F401
from ablation.plots import (  # noqa: F401
    STYLES, plot_forest, plot_schedule, plot_trajectories, plot_verdict_over_budgets, save_figure,
    set_style,
)
from ablation.store import (  # noqa: F401
    cached_result, claim_run_dir, code_hash, lock_run_dir, read_meta, write_json_atomic,
)

# 00 · language model
from ablation.lm import (  # noqa: F401
    OFFLINE_MODEL, boot_model, encode_texts, export_smollm2, lm_code, lm_loss, make_gptneox,
    save_model, saved_model_matches, stdlib_texts, take_chars, train_bpe_tokenizer, train_lm,
    unigram_entropy,
)

# 01 · activation cache
from ablation.activations import (  # noqa: F401
    cache_activations, cache_code, fit_sample, hook_layer, layer_stats, load_cache, open_cache,
    text_tokens, token_windows,
)

# 02 · the SAEs and their training
from ablation.kernels import kernel_backend  # noqa: F401
from ablation.sae import RelaxedArchetypalSAE, TopKSAE, dense_codes, unit_rows  # noqa: F401
from ablation.starts import kmeans_centroids, make_sae  # noqa: F401
from ablation.train import train_saes  # noqa: F401
from ablation.schedule import budget_tokens  # noqa: F401
from ablation.grid import (  # noqa: F401
    TRAIN_KEYS, CellJob, TrainSettings, cell_jobs, find_records, fvu_of_mse, median_norm,
    resolved_delta, start_scale_effect, train_cell, training_set,
)
from ablation.cluster import cell_runner, local_workers, map_cells  # noqa: F401

# 03 · galaxy far away, and stable is not correct
from ablation.metrics import fvu, hungarian_cosine_distance, scalar_mean_r2  # noqa: F401
from ablation.synthetic import galaxy_toy_data, ground_truth_summary, synthetic_control  # noqa: F401

# 04 · the ablation: distances over training, the quality gate, the tests, the verdict
from ablation.convergence import last_doubling_slope  # noqa: F401
from ablation.stats import (  # noqa: F401
    budget_curves, cell_budgets, cell_summary, cell_trajectory, chance_levels, endpoint_summary,
    stability_table, trajectory_curves,
)
from ablation.decisions import (  # noqa: F401
    authors_pattern, authors_table, claims, falsification_tests, galaxy_test, geometry_free_tests, quality_gate, stabilization_tests, tests_over_budgets, verdict,
    verdict_over_budgets,
)
from ablation.labels import AUTHORS_CONDITIONS, AUTHORS_RULES  # noqa: F401

# 05 · robustness: the verdict under every variant of the protocol
from ablation.parameters import resolve_variant  # noqa: F401
from ablation.variants import (  # noqa: F401
    DECISIVE, VARIANTS, dictionary_sizes, forest_rows, reading, slug,
)
from ablation.robustness import variant_tests  # noqa: F401


def use_profile(namespace: dict) -> dict:
    """This notebook's parameters, each left at None filled from its profile (else its default)
    and all checked before any work: ``globals().update(h.use_profile(globals()))``. The notebook
    then works from the repository root, as report.py runs it, wherever JupyterLab started it,
    and gives freed heap memory back to the system as it runs."""
    params = resolve_parameters({n: v for n, v in namespace.items() if n in PARAMETERS})
    os.chdir(Path(__file__).resolve().parent)
    trim_heap_every()  # long training otherwise grows the heap without bound (ablation/memory.py)
    return params
