"""The robustness stage's variants: each a set of parameter overrides of the profile, stated once
here, and how the tests move under them (notebook 05)."""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence



class Scaled(NamedTuple):
    """An override relative to the profile: its value times ``factor``."""

    factor: float


DISJOINT = "disjoint"  # as many seeds as the profile has, all above its largest
TRUNK = "trunk"  # trains nothing: the profile's cells read on their trunk (no decay) at every budget

# A larger dictionary trains each latent less per token (a latent fires on about
# tokens x k / n_latents of them), so its budgets scale with n_latents / k. A delta variant scales
# the share (and an absolute delta, where a profile sets one).
VARIANTS: dict[str, dict[str, object]] = {
    "no final decay": {"reading": TRUNK},
    "second seed set": {"seeds": DISJOINT},
    "delta x4": {"delta_share": Scaled(4.0), "delta": Scaled(4.0)},
    "delta x0.25": {"delta_share": Scaled(0.25), "delta": Scaled(0.25)},
    "dictionary x2": {"n_latents": Scaled(2), "n_candidates": Scaled(2), "sae_budget": Scaled(2)},
    "dictionary x4": {"n_latents": Scaled(4), "n_candidates": Scaled(4), "sae_budget": Scaled(4)},
}
# the cells whose comparisons decide the verdict: the baseline, the challengers, their TopK twins
DECISIVE = ("topk-random", "ra-kmeans-shared", "ra-kmeans-independent", "ra-random-points",
            "topk-kmeans-shared", "topk-kmeans-independent", "topk-random-points", "ra-projection-off")


def variant_overrides(name: str, params: dict) -> dict:
    """The parameter values variant ``name`` sets, resolved against the profile's ``params`` (its
    reading, 'branch' or 'trunk', is not a parameter and is left out)."""
    out = {}
    for key, value in VARIANTS[name].items():
        if key == "reading" or params.get(key) is None:
            continue
        if isinstance(value, Scaled):
            scaled = params[key] * value.factor
            out[key] = int(round(scaled)) if isinstance(params[key], int) else float(scaled)
        elif value == DISJOINT:
            out[key] = [max(params[key]) + 1 + i for i in range(len(params[key]))]
        else:
            out[key] = value
    return out


def reading(name: str) -> str:
    """Which reading of each budget a variant tests: 'branch' (after the cooldown) or 'trunk'."""
    return "trunk" if VARIANTS[name].get("reading") == TRUNK else "branch"


def slug(name: str) -> str:
    """A variant's folder name: runs/<profile>/robustness/<slug>/."""
    return name.replace(" ", "-").replace(".", "")


def forest_rows(variant: str, tests: Sequence[dict], reference: Sequence[dict]) -> list[dict]:
    """One row per comparison of a variant's tests, with the profile's outcome for the same
    comparison (and metric) beside it and whether it held."""
    key = lambda t: (t["comparison"], t["challenger"], t["reference"], t["metric"], t["preprocessing"])  # noqa: E731
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
