"""The robustness variants: every kind of override resolves against the profile, and a variant
that breaks a rule is refused, naming itself, before anything trains."""

from __future__ import annotations

import pytest

from ablation import parameters, variants

NAMES = ("n_latents", "n_candidates", "sae_budget", "n_budgets", "seeds", "delta_share", "delta",
         "converge_tolerance", "equivalence_margin", "lr_decay", "k", "n_fit_tokens", "sae_batch_size",
         "snapshots_per_doubling")


@pytest.fixture(scope="module")
def default() -> dict:
    return parameters.resolve_parameters({"profile": "default", **dict.fromkeys(NAMES)})


def test_every_kind_of_override_resolves_against_the_profile(default):
    assert parameters.resolve_variant(default, "delta x0.25")["delta_share"] == default["delta_share"] / 4
    assert parameters.resolve_variant(default, "delta x4")["delta"] is None  # the share carries it
    authors = parameters.resolve_parameters({"profile": "authors", **dict.fromkeys(NAMES)})
    assert parameters.resolve_variant(authors, "delta x4")["delta"] == pytest.approx(0.4)  # absolute, scaled
    big = parameters.resolve_variant(default, "dictionary x4")
    assert big["n_latents"] == 4 * default["n_latents"] and big["n_candidates"] == 4 * default["n_candidates"]
    assert big["sae_budget"] == 4 * default["sae_budget"]  # budgets scale with n_latents / k
    assert isinstance(big["n_latents"], int)
    seeds = parameters.resolve_variant(default, "second seed set")["seeds"]
    assert len(seeds) == len(default["seeds"]) and min(seeds) > max(default["seeds"])
    assert parameters.resolve_variant(default, "no final decay") == default  # it trains nothing
    assert variants.reading("no final decay") == "trunk" and variants.reading("delta x4") == "branch"
    assert default["delta_share"] == parameters.default("delta_share")  # the profile itself is untouched


def test_a_variant_that_breaks_a_rule_is_refused_naming_itself(default):
    small = {**default, "n_fit_tokens": 1500}  # 4 x 512 candidates cannot be drawn from 1,500 tokens
    with pytest.raises(ValueError, match=r"variant 'dictionary x4'.*n_candidates=2048 must be at most n_fit_tokens"):
        parameters.resolve_variant(small, "dictionary x4")
    with pytest.raises(ValueError, match="variants="):
        parameters.check_parameters({"variants": ["tolerance 0.01"]})  # gone with the adaptive stop


def test_forest_rows_mark_which_outcomes_held():
    ref = [{"comparison": "matched start", "challenger": "ra-random-points", "reference": "topk-random-points",
            "metric": "hungarian", "preprocessing": "centered", "difference": 0.01, "lo": -0.01, "hi": 0.03,
            "outcome": "equivalent within the margin"}]
    moved = [{**ref[0], "difference": 0.2, "lo": 0.15, "hi": 0.25,
              "outcome": "archetypal further apart by more than the margin"}]
    assert variants.forest_rows("profile", ref, ref)[0]["holds"]
    row = variants.forest_rows("dictionary x4", moved, ref)[0]
    assert not row["holds"] and row["committed_outcome"] == "equivalent within the margin"


def test_forest_rows_compare_each_metric_with_its_own_outcome():
    base = {"comparison": "against topk-random", "challenger": "ra-random-points", "reference": "topk-random",
            "preprocessing": "centered", "difference": 0.0, "lo": -0.01, "hi": 0.01}
    ref = [{**base, "metric": "hungarian", "outcome": "equivalent within the margin"},
           {**base, "metric": "mean_min", "outcome": "archetypal closer by more than the margin"}]
    rows = variants.forest_rows("profile", ref, ref)
    assert [r["committed_outcome"] for r in rows] == [r["outcome"] for r in ref] and all(r["holds"] for r in rows)


def test_dictionary_sizes_lists_the_profile_then_each_larger_dictionary_by_atoms():
    stab = {"topk-random__centered": {"step0": 0.75, "end": 0.38}, "topk-random__raw": {"step0": 0.75, "end": 0.4},
            "ra-random-points__centered": {"step0": 0.28, "end": 0.36}}
    cell = lambda s, e: {"step0_hungarian": s, "end_hungarian": e}  # noqa: E731
    cells = {"dictionary x4": {"topk-random__centered": cell(0.6, 0.5), "ra-random-points__centered": cell(0.2, 0.3)},
             "dictionary x2": {"topk-random__centered": cell(0.7, 0.45), "ra-random-points__centered": cell(0.25, 0.33)}}
    rows = variants.dictionary_sizes(512, stab, {"dictionary x4": 2048, "dictionary x2": 1024}, cells)
    assert [(r["n_latents"], r["cell"]) for r in rows] == [
        (n, c) for n in (512, 1024, 2048) for c in ("ra-random-points__centered", "topk-random__centered")]
    assert [r["step0"] for r in rows if r["cell"] == "topk-random__centered"] == [0.75, 0.7, 0.6]
    assert rows[0]["variant"] == "profile" and rows[-1]["end"] == 0.5  # raw, absent from the variants, is left out
