"""Every decision on known cases: comparisons, gate, tests, verdict, the authors' rules."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ablation import decisions, labels
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


def record(converged: bool, slope: float, lo: float, hi: float) -> dict:
    """A convergence record as notebook 02 writes it."""
    return {"converged": converged, "slope": slope, "lo": lo, "hi": hi, "slope_before": slope,
            "lo_before": lo, "hi_before": hi, "tolerance": 0.02, "tokens": 8_000_000,
            "max_tokens": 8_000_000}


def test_quality_gate_flags_what_did_not_learn_or_converge():
    done = record(True, -0.004, -0.011, 0.002)
    assert decisions.quality_gate(0.12, done, 0.4) == []
    assert decisions.quality_gate(1.3, done, 0.4) == ["held-out FVU 1.30 > 0.4 (worse than predicting the mean)"]
    moving = record(False, -0.05, -0.07, -0.03)
    assert decisions.quality_gate(0.5, moving, 0.4)[1] == (
        "not converged within the cap of 8,000,000 tokens: slope -0.050 per doubling [-0.070, -0.030] "
        "at 8,000,000 tokens (the doubling before: -0.050 [-0.070, -0.030]), not both within +-0.02")
    assert len(decisions.quality_gate(float("nan"), done, 0.4)) == 1  # a NaN FVU never passes


def test_the_verdict_over_training_and_where_each_sign_settles():
    tokens = np.array([0, 1000, 2000, 4000, 8000])
    level = lambda values: np.stack([pair_matrix(np.full(4, v / 2)) for v in values])  # noqa: E731
    traj = {("topk-random", "raw"): {"tokens": tokens, "lr": np.array([1, 1, 1, 1, 0.5]),
                                      "hungarian": level([0.6, 0.5, 0.45, 0.42, 0.41])},
            # starts further apart, within the margin of the baseline from 2000 tokens on; converged earlier
            ("ra-random-points", "raw"): {"tokens": tokens[:4], "lr": np.array([1, 1, 1, 0.5]),
                                          "hungarian": level([0.7, 0.6, 0.42, 0.38])}}
    over = pd.DataFrame(decisions.tests_over_training(traj, ["raw"], 0.05, 200, 0))
    assert set(over.comparison) == {"against topk-random"}  # no start-matched TopK in this grid
    fals = over[over.test == "falsification"]
    assert list(fals.tokens) == [0, 1000, 2000, 4000, 8000]
    assert list(fals.stage) == ["full rate"] * 3 + ["held", "end"]
    # at 4000 the challenger, converged at 2000, is held there against the baseline's 4000
    assert fals.difference.tolist() == pytest.approx([0.1, 0.1, -0.03, 0.0, 0.38 - 0.41])
    stab = over[over.test == "stabilization"]
    assert stab.difference.iloc[-1] == pytest.approx((0.38 - 0.7) - (0.41 - 0.6))
    assert fals.outcome.iloc[0] == labels.FURTHER  # +0.1: further apart by more than the margin
    settled = {(s["test"], s["challenger"]): s for s in decisions.outcome_settled(over)}
    f = settled["falsification", "ra-random-points"]
    # -0.03, 0.0, -0.03 from 2000 tokens on: all inside the margin of 0.05, equivalent from there
    assert f["outcome"] == labels.EQUIVALENT and f["settled_from"] == 2000
    assert f["end_difference"] == pytest.approx(-0.03)


def cell(start: float, end: float) -> dict:
    """A cell whose every run pair is at distance start at step 0 and end at its end (both metrics)."""
    m = np.stack([pair_matrix(np.full(4, v / 2)) for v in (start, end)])
    return {"mean_min": m, "hungarian": m}


def test_tests_skip_excluded_cells_and_the_verdict_follows_them():
    traj = {("topk-random", "raw"): cell(0.7, 0.4), ("ra-kmeans-independent", "raw"): cell(0.05, 0.08),
            ("ra-random-points", "raw"): cell(0.3, 0.1)}
    tests, skipped = decisions.falsification_tests(traj, ["raw"], {}, 0.05, 200, 0)
    assert len(tests) == 4 and skipped == [] and all(t["outcome"] == labels.CLOSER for t in tests)
    adv, _ = decisions.stabilization_tests(traj, ["raw"], {}, 0.05, 200, 0)
    assert [t["stabilization_advantage"] for t in adv] == [False, False, False, False]
    said = decisions.verdict(tests, adv)
    assert "margin of 0.05" in said and "cannot tell the start from the constraint" in said
    assert "ra-random-points vs topk-random (raw) closer (-0.300 [-0.300, -0.300])" in said
    assert "no stabilization advantage" in said
    traj["ra-random-points", "raw"] = cell(0.7, 0.1)
    adv, _ = decisions.stabilization_tests(traj, ["raw"], {}, 0.05, 200, 0)
    assert "come closer than TopK runs by more than the margin in: ra-random-points" in \
        decisions.verdict(tests, adv)
    excluded = {("ra-random-points", "raw"): ["held-out FVU 1.20 > 0.4"]}
    tests, skipped = decisions.falsification_tests(traj, ["raw"], excluded, 0.05, 200, 0)
    assert {t["challenger"] for t in tests} == {"ra-kmeans-independent"}
    assert skipped == ["ra-random-points vs topk-random, raw: excluded, ra-random-points (raw): "
                       "held-out FVU 1.20 > 0.4"]
    assert ("Not testable on this grid: ra-random-points vs topk-random, raw: excluded, "
            "ra-random-points (raw): held-out FVU 1.20 > 0.4.") in decisions.verdict(tests, adv, skipped)
    none, skipped = decisions.falsification_tests(traj, ["raw"], {("topk-random", "raw"): ["x"]},
                                                  0.05, 200, 0)
    assert none == [] and len(skipped) == 2 and decisions.verdict([], [], skipped).startswith("no test could run")
    assert decisions.verdict([], []).startswith("not tested: the grid has no archetypal configuration")


def test_start_matched_controls_separate_the_start_from_the_constraint():
    # archetypal runs end far closer than TopK from random starts, but exactly as close as TopK
    # started at the same random points: the closeness is the start's, not the constraint's
    traj = {("topk-random", "centered"): cell(0.7, 0.4), ("ra-random-points", "centered"): cell(0.3, 0.2),
            ("topk-random-points", "centered"): cell(0.3, 0.21)}
    tests, _ = decisions.falsification_tests(traj, ["centered"], {}, 0.05, 200, 0)
    hung = {t["comparison"]: t for t in tests if t["metric"] == "hungarian"}
    assert hung["against topk-random"]["outcome"] == labels.CLOSER
    assert hung["matched start"]["reference"] == "topk-random-points"
    assert hung["matched start"]["outcome"] == labels.EQUIVALENT
    adv, _ = decisions.stabilization_tests(traj, ["centered"], {}, 0.05, 200, 0)
    said = decisions.verdict(tests, adv)
    assert "the closeness comes from the start, not the constraint" in said
    # and where the constraint itself pulls runs together, the verdict says so
    traj["topk-random-points", "centered"] = cell(0.3, 0.35)
    tests, _ = decisions.falsification_tests(traj, ["centered"], {}, 0.05, 200, 0)
    assert "FALSIFIED where the constraint itself" in decisions.verdict(tests, adv)
    over = pd.DataFrame(decisions.tests_over_training(
        {k: {**v, "tokens": np.array([0, 1000]), "lr": np.array([1.0, 1.0])} for k, v in traj.items()},
        ["centered"], 0.05, 200, 0))
    assert set(over.comparison) == {"against topk-random", "matched start"}


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
    assert "also the most correct" in decisions.ground_truth_summary(agree)
    disagree = {"a": {"recovered": 0.9, "hungarian_between_runs": 0.4},
                "b": {"recovered": 0.2, "hungarian_between_runs": 0.01}}
    assert "Stability is not correctness: the most stable configuration recovers 20%" in \
        decisions.ground_truth_summary(disagree)


def test_the_verdict_over_training_without_a_challenger_is_empty():
    over = pd.DataFrame(decisions.tests_over_training({}, ["raw"], 0.05, 100, 0))
    assert over.empty and decisions.outcome_settled(over) == []
