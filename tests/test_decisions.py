"""Every decision on known cases: comparisons, gate, tests, verdict, the authors' rules."""

from __future__ import annotations

import numpy as np
import pytest

from ablation import decisions, labels, synthetic
from conftest import pair_matrix


def test_comparison_outcomes_under_the_margin_on_known_cases():
    near = pair_matrix(np.array([0.05, 0.06, 0.04, 0.05, 0.05]))
    far = pair_matrix(np.array([0.30, 0.31, 0.29, 0.30, 0.30]))
    a_bit = pair_matrix(np.array([0.06, 0.07, 0.05, 0.06, 0.06]))  # pairs 0.02 further than near
    compare = lambda a, b, **kw: decisions.compare_runs(a, b, 0.05, 500, 0, **kw)["outcome"]  # noqa: E731
    assert compare(near, far) == labels.CLOSER
    assert compare(far, near) == labels.FURTHER
    assert compare(near, near) == labels.EQUIVALENT
    assert compare(a_bit, near) == labels.EQUIVALENT  # a real difference, inside the margin
    assert decisions.compare_runs(a_bit, near, 0.002, 500, 0)["outcome"] == labels.FURTHER
    assert compare(far, near, agreement=True) == labels.AGREES_MORE
    assert compare(near, far, agreement=True) == labels.AGREES_LESS
    res = decisions.compare_runs(near, far, 0.05, 500, 0)
    assert res["difference"] == pytest.approx(-0.5) and res["lo"] <= res["difference"] <= res["hi"]
    assert res["margin"] == 0.05


def test_an_interval_that_crosses_a_margin_is_undecided_and_the_margin_must_be_positive():
    assert decisions.outcome(-0.08, -0.03, 0.05) == labels.UNDECIDED  # below 0, not beyond -margin
    assert decisions.outcome(0.04, 0.07, 0.05) == labels.UNDECIDED
    assert decisions.outcome(-0.051, -0.06, 0.05) == labels.CLOSER
    assert decisions.outcome(-0.05, 0.05, 0.05) == labels.EQUIVALENT
    for bad in (0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="equivalence_margin"):
            decisions.outcome(0.0, 0.0, bad)


def test_quality_gate_flags_what_did_not_learn_and_what_died():
    assert decisions.quality_gate(0.12, 0.1, 0.4, 0.5) == []
    assert decisions.quality_gate(1.3, 0.1, 0.4, 0.5) == ["held-out FVU 1.30 > 0.4 (worse than predicting the mean)"]
    assert decisions.quality_gate(0.2, 0.62, 0.4, 0.5) == ["62% of latents dead > 50%"]
    assert len(decisions.quality_gate(float("nan"), 0.0, 0.4, 0.5)) == 1  # a NaN FVU never passes


def level(v: float) -> np.ndarray:
    """A run-by-run matrix of 4 runs whose every pair is at distance v."""
    return pair_matrix(np.full(4, v / 2))


def at(*values: float) -> dict:
    """A cell at every budget (after the cooldown and on the trunk alike), Hungarian distance
    ``values[i]`` at budget i for every pair of runs."""
    rows = [{"tokens": 1000 * 2 ** i, "pairs": {"hungarian": level(v)}} for i, v in enumerate(values)]
    return {"branch": rows, "trunk": rows}


def test_every_comparison_is_read_at_every_budget_and_settles_or_not():
    budgets = {("topk-random", "raw"): at(0.6, 0.5, 0.45, 0.42),
               ("ra-random-points", "raw"): at(0.7, 0.6, 0.44, 0.41),  # within the margin from 4 k on
               ("ra-kmeans-independent", "raw"): at(0.1, 0.2, 0.3, 0.4)}  # drifting, crossing -0.05
    over = decisions.tests_over_budgets(budgets, ["raw"], 0.05, 200, 0)
    assert {(r["challenger"], r["reading"]) for r in over} == {
        (c, r) for c in ("ra-random-points", "ra-kmeans-independent") for r in ("branch", "trunk")}
    rp = [r for r in over if r["challenger"] == "ra-random-points" and r["reading"] == "branch"]
    assert [r["tokens"] for r in rp] == [1000, 2000, 4000, 8000]
    assert [r["difference"] for r in rp] == pytest.approx([0.1, 0.1, -0.01, -0.01])
    verdicts = {v["challenger"]: v for v in decisions.verdict_over_budgets(over, budgets, 0.025, {})}
    v = verdicts["ra-random-points"]
    assert v["outcome"] == labels.EQUIVALENT and v["settled"] and v["tokens"] == 8000
    assert v["noise"] == {"cooldown": 0.0, "last_doubling": pytest.approx(0.0), "seed_sets": pytest.approx(0.0)}
    moving = verdicts["ra-kmeans-independent"]
    assert moving["difference"] == pytest.approx(-0.02) and not moving["settled"]
    assert "moved +0.130" in moving["why"] and "outcome changed" in moving["why"]


def test_the_noise_of_a_difference_is_its_cooldown_shift_and_its_two_seed_sets():
    m = pair_matrix(np.array([0.1, 0.1, 0.3, 0.3]))  # first half's pairs 0.2, second half's 0.6
    ref = level(0.4)
    budgets = {("topk-random", "raw"): {"branch": [{"tokens": 1, "pairs": {"hungarian": ref}}] * 2,
                                        "trunk": [{"tokens": 1, "pairs": {"hungarian": level(0.5)}}] * 2},
               ("ra-random-points", "raw"): {"branch": [{"tokens": 1, "pairs": {"hungarian": m}}] * 2,
                                             "trunk": [{"tokens": 1, "pairs": {"hungarian": m}}] * 2}}
    over = decisions.tests_over_budgets(budgets, ["raw"], 0.05, 200, 0)
    (v,) = decisions.verdict_over_budgets(over, budgets, 0.025, {})
    assert v["noise"]["cooldown"] == pytest.approx(0.1)  # the trunk's reference is 0.1 further apart
    assert v["noise"]["seed_sets"] == pytest.approx(0.4)  # (0.2 - 0.4) against (0.6 - 0.4)


def test_tests_at_a_budget_skip_excluded_cells_and_read_alive_atoms_too():
    cell = lambda v, alive: {"mean_min": level(v), "hungarian": level(v), "hungarian_alive": level(alive)}  # noqa: E731
    mats = {("topk-random", "raw"): cell(0.4, 0.4), ("ra-kmeans-independent", "raw"): cell(0.08, 0.3),
            ("ra-random-points", "raw"): cell(0.1, 0.1)}
    tests, skipped = decisions.falsification_tests(mats, ["raw"], {}, 0.05, 200, 0)
    assert len(tests) == 6 and skipped == []
    alive = {t["challenger"]: t["outcome"] for t in tests if t["metric"] == "hungarian_alive"}
    assert alive == {"ra-kmeans-independent": labels.CLOSER, "ra-random-points": labels.CLOSER}
    excluded = {("ra-random-points", "raw"): ["held-out FVU 1.20 > 0.4"]}
    tests, skipped = decisions.falsification_tests(mats, ["raw"], excluded, 0.05, 200, 0)
    assert {t["challenger"] for t in tests} == {"ra-kmeans-independent"}
    assert skipped == ["ra-random-points vs topk-random, raw: excluded, ra-random-points (raw): "
                       "held-out FVU 1.20 > 0.4"]
    step0 = {k: level(0.7 if k[0] == "topk-random" else 0.05) for k in mats}
    adv, _ = decisions.stabilization_tests(step0, mats, ["raw"], {}, 0.05, 200, 0)
    assert [t["stabilization_advantage"] for t in adv] == [False, False]  # TopK came 0.3 closer


def verdict_row(comparison, c, ref, diff, outcome, settled=True, flagged=()):
    return {"comparison": comparison, "challenger": c, "reference": ref, "preprocessing": "centered",
            "tokens": 16_000_000, "difference": diff, "lo": diff - 0.01, "hi": diff + 0.01,
            "outcome": outcome, "margin": 0.05, "settled": settled, "why": "" if settled else "moved",
            "flagged": list(flagged)}


def test_each_claim_gets_one_of_three_statuses_from_settled_comparisons():
    over = [verdict_row("original protocol", "ra-kmeans-shared", "topk-random", -0.2, labels.CLOSER),
            verdict_row("against topk-random", "ra-random-points", "topk-random", -0.01, labels.EQUIVALENT),
            verdict_row("matched start", "ra-random-points", "topk-random-points", -0.07, labels.CLOSER,
                        settled=False)]
    stab = [{"comparison": "against topk-random", "challenger": "ra-random-points", "reference": "topk-random",
             "preprocessing": "centered", "difference": 0.2, "outcome": labels.FURTHER,
             "stabilization_advantage": False}]
    got = {c["claim"]: c["status"] for c in decisions.claims(over, stab, None)}
    assert got == {"shared_start_stable": labels.SUPPORTED, "independent_not_closer": labels.SUPPORTED,
                   "constraint_no_effect": labels.NOT_ESTABLISHED,  # closer, but still moving
                   "no_stabilization": labels.SUPPORTED, "galaxy": labels.NOT_ESTABLISHED}
    over[2]["settled"] = True
    got = {c["claim"]: c["status"] for c in decisions.claims(over, stab, None)}
    assert got["constraint_no_effect"] == labels.CONTRADICTED
    over[1]["flagged"] = ["ra-random-points (centered): held-out FVU 0.90 > 0.4"]
    rows = decisions.claims(over, stab, None)
    assert {c["claim"]: c["status"] for c in rows}["independent_not_closer"] == labels.NOT_ESTABLISHED
    assert all(c["status"] in labels.STATUSES for c in rows)
    said = decisions.verdict(rows, over)
    assert "SUPPORTED" in said and "CONTRADICTED" in said and "FALSIFIED" not in said
    assert "Not settled: ra-random-points - topk-random (centered): ra-random-points (centered): held-out" in said


def test_the_galaxy_claim_rests_on_what_removing_the_mean_does_to_the_same_runs():
    close = {("ra-kmeans-shared", "raw"): {"hungarian": level(0.06), "hungarian_read": level(0.35)}}
    g = decisions.galaxy_test(close, 0.05, 200, 0)
    assert g["difference"] == pytest.approx(0.29) and g["outcome"] == labels.FURTHER
    assert {c["claim"]: c["status"] for c in decisions.claims([], [], g)}["galaxy"] == labels.SUPPORTED
    same = {("ra-kmeans-shared", "raw"): {"hungarian": level(0.3), "hungarian_read": level(0.31)}}
    g = decisions.galaxy_test(same, 0.05, 200, 0)
    assert {c["claim"]: c["status"] for c in decisions.claims([], [], g)}["galaxy"] == labels.CONTRADICTED
    assert decisions.galaxy_test({}, 0.05, 200, 0) is None


def test_the_geometry_free_control_reads_alive_latents_and_keeps_the_all_latent_number():
    m = lambda v: pair_matrix(np.full(4, v / 2))  # noqa: E731
    mats = {("topk-random", "raw"): {"activation_corr": m(0.6), "activation_corr_all": m(0.59),
                                     "dead_share": m(0.01)},
            ("ra-random-points", "raw"): {"activation_corr": m(0.62), "activation_corr_all": m(0.45),
                                          "dead_share": m(0.15)}}
    rows, _ = decisions.geometry_free_tests(mats, ["raw"], {}, 0.05, 200, 0)
    (row,) = rows
    assert row["outcome"] == labels.EQUIVALENT and row["difference"] == pytest.approx(0.02)
    assert row["all_latents"]["outcome"] == labels.AGREES_LESS  # dead latents counted as 0
    assert row["challenger_dead_share"] == pytest.approx(0.15)
    assert row["reference_dead_share"] == pytest.approx(0.01)


def test_the_authors_pattern_holds_on_their_own_numbers_and_not_on_its_opposite():
    assert all(decisions.authors_pattern(labels.AUTHORS_TABLE3).values())
    flipped = {**labels.AUTHORS_TABLE3, ("ra-kmeans-shared", "centered"): 0.05,
               ("topk-kmeans-shared-free", "raw"): 0.25}
    pattern = decisions.authors_pattern(flipped)
    assert not pattern["raw_shared_far_closer"] and not pattern["centering_pulls_ra_apart"]
    assert pattern["unconstrained_stay_close"]
    assert all(v is None for v in decisions.authors_pattern({}).values())  # not testable, not False
    only_grid = {k: v for k, v in labels.AUTHORS_TABLE3.items() if k[0] in ("topk-random", "ra-kmeans-shared")}
    assert decisions.authors_pattern(only_grid) == {"raw_shared_far_closer": None,
                                                    "centering_pulls_ra_apart": True,
                                                    "unconstrained_stay_close": None}


def test_ground_truth_summary_reads_its_numbers_either_way():
    agree = {"a": {"recovered": 0.9, "hungarian_between_runs": 0.1},
             "b": {"recovered": 0.2, "hungarian_between_runs": 0.5}}
    assert "also the most correct" in synthetic.ground_truth_summary(agree)
    disagree = {"a": {"recovered": 0.9, "hungarian_between_runs": 0.4, "recovered_centered": 0.8,
                      "hungarian_between_runs_centered": 0.1},
                "b": {"recovered": 0.2, "hungarian_between_runs": 0.01, "recovered_centered": 0.3,
                      "hungarian_between_runs_centered": 0.5}}
    said = synthetic.ground_truth_summary(disagree)
    assert "Stability is not correctness: the most stable configuration recovers 20%" in said
    assert "On centered synthetic data" in said and "also the most correct" in said


def test_no_comparison_no_claim_established():
    assert decisions.tests_over_budgets({}, ["raw"], 0.05, 100, 0) == []
    assert decisions.verdict([], []).startswith("not tested")
    assert all(c["status"] == labels.NOT_ESTABLISHED for c in decisions.claims([], [], None))
