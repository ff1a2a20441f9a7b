"""The robustness stage's variants: each a set of parameter overrides of the profile, stated once
here, and how the tests move under them (notebook 05)."""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

from .configs import CONFIGURATIONS


class Scaled(NamedTuple):
    """An override relative to the profile: its value times ``factor``."""

    factor: float


SLOWEST = "slowest"  # the full-rate tokens of the profile's slowest decisive cell (stage 02)
DISJOINT = "disjoint"  # as many seeds as the profile has, all above its largest

# A larger dictionary trains each latent less per token (a latent fires on about
# tokens x k / n_latents of them), so its minimum budget and cap scale with n_latents / k.
VARIANTS: dict[str, dict[str, object]] = {
    "tolerance 0.01": {"converge_tolerance": 0.01},
    "no final decay": {"lr_decay": 0.0},
    "equal budgets": {"min_sae_tokens": SLOWEST, "max_sae_tokens": SLOWEST},
    "delta x0.25": {"delta": Scaled(0.25)},
    "delta x4": {"delta": Scaled(4.0)},
    "dictionary x2": {"n_latents": Scaled(2), "n_candidates": Scaled(2),
                      "min_sae_tokens": Scaled(2), "max_sae_tokens": Scaled(2)},
    "dictionary x4": {"n_latents": Scaled(4), "n_candidates": Scaled(4),
                      "min_sae_tokens": Scaled(4), "max_sae_tokens": Scaled(4)},
    "second seed set": {"seeds": DISJOINT},
}
# the cells whose comparisons decide the verdict: the baseline, the challengers, their TopK twins
DECISIVE = ("topk-random", "ra-kmeans-shared", "ra-kmeans-independent", "ra-random-points",
            "topk-kmeans-shared", "topk-kmeans-independent", "topk-random-points")

# settings an architecture's cells never read: a variant that changes only these reuses the
# profile's own cells of that architecture instead of training copies (a TopK SAE has no delta)
UNREAD = {"topk": frozenset({"delta"}), "ra": frozenset()}


def retrains(configuration: str, changed: dict) -> bool:
    """Whether a variant that changes the settings ``changed`` changes a configuration's cells."""
    return bool(set(changed) - UNREAD[CONFIGURATIONS[configuration][0]])


def variant_overrides(name: str, params: dict, slowest_tokens: int) -> dict:
    """The parameter values variant ``name`` sets, resolved against the profile's ``params``."""
    out = {}
    for key, value in VARIANTS[name].items():
        if isinstance(value, Scaled):
            scaled = params[key] * value.factor
            out[key] = int(round(scaled)) if isinstance(params[key], int) else float(scaled)
        elif value == SLOWEST:
            out[key] = slowest_tokens
        elif value == DISJOINT:
            out[key] = [max(params[key]) + 1 + i for i in range(len(params[key]))]
        else:
            out[key] = value
    return out


def slug(name: str) -> str:
    """A variant's folder name: runs/<profile>/robustness/<slug>/."""
    return name.replace(" ", "-").replace(".", "")


def forest_rows(variant: str, tests: Sequence[dict], reference: Sequence[dict]) -> list[dict]:
    """One row per comparison of a variant's tests, with the profile's outcome for the same
    comparison (and metric) beside it and whether it held."""
    key = lambda t: (t["comparison"], t["challenger"], t["metric"], t["preprocessing"])  # noqa: E731
    ref = {key(t): t["outcome"] for t in reference}
    return [{"variant": variant, **{k: t[k] for k in ("comparison", "challenger", "reference", "metric",
                                                        "preprocessing", "difference", "lo", "hi",
                                                        "outcome")},
             "committed_outcome": ref.get(key(t)), "holds": ref.get(key(t)) == t["outcome"]}
            for t in tests]


def dictionary_sizes(profile_atoms: int, stabilization: Mapping[str, dict], atoms: Mapping[str, int],
                     cells: Mapping[str, Mapping[str, dict]]) -> list[dict]:
    """One row per dictionary size and cell: the Hungarian distance between runs at step 0 and at
    the end. The profile's rows come from notebook 04's ``stabilization`` table; each variant in
    ``atoms`` (variant -> n_latents) brings its ``cells`` rows as variant_tests returns them."""
    keys = sorted({c for v in atoms for c in cells[v]})
    rows = [{"variant": "profile", "n_latents": profile_atoms, "cell": c,
             "step0": stabilization[c]["step0"], "end": stabilization[c]["end"]} for c in keys]
    for v, n in sorted(atoms.items(), key=lambda item: item[1]):
        rows += [{"variant": v, "n_latents": n, "cell": c, "step0": cells[v][c]["step0_hungarian"],
                  "end": cells[v][c]["end_hungarian"]} for c in keys]
    return rows
