"""Every decision on known cases: comparisons, gate, tests, verdict, the authors' rules."""

from __future__ import annotations

import numpy as np
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


def test_flattening_tells_a_settled_trajectory_from_a_moving_one():
    base = pair_matrix(np.array([0.20, 0.21, 0.19, 0.20]))
    tokens = [0, 250, 500, 750, 800, 900, 1000]
    settled = np.stack([base + 0.3, base + 0.1, base, base, base, base + 0.001, base])
    moving = np.stack([base + 0.3 - 0.05 * i for i in range(7)])
    a = decisions.flattening(settled, tokens, 0.2, 0.01, 500, 0)
    b = decisions.flattening(moving, tokens, 0.2, 0.01, 500, 0)
    assert a["flat"] and a["from_tokens"] == 800 and abs(a["change"]) < 1e-12
    assert not b["flat"] and b["change"] == pytest.approx(-0.1)


def test_quality_gate_flags_what_did_not_learn_or_settle():
    flat = {"flat": True, "change": -0.001, "lo": -0.004, "hi": 0.002}
    assert decisions.quality_gate(0.12, flat, 0.4, 0.02) == []
    assert decisions.quality_gate(1.3, flat, 0.4, 0.02) == ["held-out FVU 1.30 > 0.4 (worse than predicting the mean)"]
    moving = {"flat": False, "change": -0.05, "lo": -0.07, "hi": -0.03}
    assert decisions.quality_gate(0.5, moving, 0.4, 0.02)[1].startswith("trajectory still moving (-0.050")
    noisy = {"flat": False, "change": 0.001, "lo": -0.022, "hi": 0.029}  # no drift, too wide to call flat
    assert decisions.quality_gate(0.2, noisy, 0.4, 0.02) == [
        "trajectory not shown flat (+0.001 over the last stretch of training, but its 95% interval "
        "[-0.022, +0.029] reaches beyond +-0.02)"]
    assert len(decisions.quality_gate(float("nan"), flat, 0.4, 0.02)) == 1  # a NaN FVU never passes


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
