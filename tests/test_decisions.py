"""Every decision on known cases: comparisons, gate, tests, verdict, the authors' rules."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ablation import decisions, labels
from conftest import pair_matrix


def test_comparison_outcomes_on_known_cases():
    near = pair_matrix(np.array([0.05, 0.06, 0.04, 0.05, 0.05]))
    far = pair_matrix(np.array([0.30, 0.31, 0.29, 0.30, 0.30]))
    assert decisions.compare_runs(near, far, 500, 0)["outcome"] == labels.CLOSER
    assert decisions.compare_runs(far, near, 500, 0)["outcome"] == labels.FURTHER
    assert decisions.compare_runs(near, near, 500, 0)["outcome"] == labels.NO_DIFFERENCE
    assert decisions.compare_runs(far, near, 500, 0, agreement=True)["outcome"] == labels.AGREES_MORE
    assert decisions.compare_runs(near, far, 500, 0, agreement=True)["outcome"] == labels.AGREES_LESS
    res = decisions.compare_runs(near, far, 500, 0)
    assert res["difference"] == pytest.approx(-0.5) and res["lo"] <= res["difference"] <= res["hi"]


def record(converged: bool, slope: float, lo: float, hi: float) -> dict:
    """A convergence record as notebook 02 writes it."""
    return {"converged": converged, "slope": slope, "lo": lo, "hi": hi, "tolerance": 0.02,
            "tokens": 8_000_000, "max_tokens": 8_000_000}


def test_quality_gate_flags_what_did_not_learn_or_converge():
    done = record(True, -0.004, -0.011, 0.002)
    assert decisions.quality_gate(0.12, done, 0.4) == []
    assert decisions.quality_gate(1.3, done, 0.4) == ["held-out FVU 1.30 > 0.4 (worse than predicting the mean)"]
    moving = record(False, -0.05, -0.07, -0.03)
    assert decisions.quality_gate(0.5, moving, 0.4)[1] == (
        "not converged within the cap of 8,000,000 tokens: slope -0.050 per doubling [-0.070, -0.030] "
        "at 8,000,000 tokens, beyond +-0.02")
    assert len(decisions.quality_gate(float("nan"), done, 0.4)) == 1  # a NaN FVU never passes


def test_the_verdict_over_training_and_where_each_sign_settles():
    tokens = np.array([0, 1000, 2000, 4000, 8000])
    level = lambda values: np.stack([pair_matrix(np.full(4, v / 2)) for v in values])  # noqa: E731
    traj = {("topk-random", "raw"): {"tokens": tokens, "lr": np.array([1, 1, 1, 1, 0.5]),
                                      "hungarian": level([0.6, 0.5, 0.45, 0.42, 0.41])},
            # starts far, crosses below the baseline after 2000 tokens; converged earlier (shorter)
            ("ra-random-points", "raw"): {"tokens": tokens[:4], "lr": np.array([1, 1, 1, 0.5]),
                                          "hungarian": level([0.7, 0.6, 0.40, 0.38])}}
    over = pd.DataFrame(decisions.tests_over_training(traj, ["raw"], 200, 0))
    fals = over[over.test == "falsification"]
    assert list(fals.tokens) == [0, 1000, 2000, 4000, 8000]
    assert list(fals.stage) == ["full rate"] * 3 + ["held", "end"]
    # at 4000 the challenger, converged at 2000, is held there against the baseline's 4000
    assert fals.difference.tolist() == pytest.approx([0.1, 0.1, -0.05, 0.40 - 0.42, 0.38 - 0.41])
    stab = over[over.test == "stabilization"]
    assert stab.difference.iloc[-1] == pytest.approx((0.38 - 0.7) - (0.41 - 0.6))
    settled = {(s["test"], s["challenger"]): s for s in decisions.sign_settled(over)}
    f = settled["falsification", "ra-random-points"]
    assert f["sign"] == "below 0" and f["settled_from"] == 2000
    assert f["end_difference"] == pytest.approx(-0.03)


def test_tests_skip_excluded_cells_and_the_verdict_follows_them():
    steps = lambda start, end: np.stack([pair_matrix(np.full(4, v / 2)) for v in (start, end)])  # noqa: E731
    traj = {("topk-random", "raw"): {"mean_min": steps(0.7, 0.4), "hungarian": steps(0.7, 0.4)},
            ("ra-kmeans-independent", "raw"): {"mean_min": steps(0.05, 0.08), "hungarian": steps(0.05, 0.08)},
            ("ra-random-points", "raw"): {"mean_min": steps(0.3, 0.1), "hungarian": steps(0.3, 0.1)}}
    tests, skipped = decisions.falsification_tests(traj, ["raw"], {}, 200, 0)
    assert len(tests) == 4 and skipped == [] and all(t["outcome"] == labels.CLOSER for t in tests)
    adv, _ = decisions.stabilization_tests(traj, ["raw"], {}, 200, 0)
    assert [t["stabilization_advantage"] for t in adv] == [False, False, False, False]
    assert "inherited, not found" in decisions.verdict(tests, adv)
    traj["ra-random-points", "raw"] = {"mean_min": steps(0.7, 0.1), "hungarian": steps(0.7, 0.1)}
    adv, _ = decisions.stabilization_tests(traj, ["raw"], {}, 200, 0)
    assert decisions.verdict(tests, adv).startswith("FALSIFIED")
    excluded = {("ra-random-points", "raw"): ["held-out FVU 1.20 > 0.4"]}
    tests, skipped = decisions.falsification_tests(traj, ["raw"], excluded, 200, 0)
    assert {t["challenger"] for t in tests} == {"ra-kmeans-independent"}
    assert skipped == ["ra-random-points vs topk-random, raw: excluded, ra-random-points (raw): "
                       "held-out FVU 1.20 > 0.4"]
    none, skipped = decisions.falsification_tests(traj, ["raw"], {("topk-random", "raw"): ["x"]}, 200, 0)
    assert none == [] and len(skipped) == 2 and decisions.verdict([], [], skipped).startswith("no test could run")
    assert decisions.verdict([], []).startswith("not tested: the grid has no archetypal configuration")
    far = [{"outcome": labels.FURTHER}]
    assert decisions.verdict(far, []).startswith("not falsified")


def test_the_authors_pattern_holds_on_their_own_numbers_and_not_on_its_opposite():
    assert all(decisions.authors_pattern(labels.AUTHORS_TABLE3).values())
    flipped = {**labels.AUTHORS_TABLE3, ("ra-kmeans-shared", "centered"): 0.05,
               ("topk-kmeans-shared-free", "raw"): 0.25}
    pattern = decisions.authors_pattern(flipped)
    assert not pattern["raw_shared_far_closer"] and not pattern["centering_pulls_ra_apart"]
    assert pattern["unconstrained_stay_close"]
    assert not any(decisions.authors_pattern({}).values())  # missing cells never count as holding


def test_ground_truth_summary_reads_its_numbers_either_way():
    agree = {"a": {"recovered": 0.9, "hungarian_between_runs": 0.1},
             "b": {"recovered": 0.2, "hungarian_between_runs": 0.5}}
    assert "also the most correct" in decisions.ground_truth_summary(agree)
    disagree = {"a": {"recovered": 0.9, "hungarian_between_runs": 0.4},
                "b": {"recovered": 0.2, "hungarian_between_runs": 0.01}}
    assert "Stability is not correctness: the most stable configuration recovers 20%" in \
        decisions.ground_truth_summary(disagree)


def test_the_verdict_over_training_without_a_challenger_is_empty():
    over = pd.DataFrame(decisions.tests_over_training({}, ["raw"], 100, 0))
    assert over.empty and decisions.sign_settled(over) == []
