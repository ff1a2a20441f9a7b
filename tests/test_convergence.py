"""Is it still moving: a cell's slope over its last doubling, and whether a comparison's outcome
is settled over the budgets, on curves with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from ablation import convergence, decisions, parameters

TOKENS = np.round(1_000_000 * 2 ** (np.arange(-8, 17) / 8)).astype(int)  # 2^-1 .. 2^2 M, 8 per doubling
MARGIN, TOL = 0.05, parameters.default("converge_tolerance")


def trajectory(per_run_slope: np.ndarray, level: float = 0.4, jitter: float = 0.0, seed: int = 0) -> np.ndarray:
    """Run-by-run distances (snapshots x runs x runs), pair (i, j) moving by the mean of the two
    runs' slopes per doubling of tokens, plus independent jitter per snapshot and pair."""
    rng = np.random.default_rng(seed)
    s = len(per_run_slope)
    slope = (per_run_slope[:, None] + per_run_slope[None, :]) / 2
    t = np.log2(TOKENS / TOKENS[-1])
    m = level + t[:, None, None] * slope[None] + jitter * rng.standard_normal((len(t), s, s))
    m = (m + m.transpose(0, 2, 1)) / 2
    m[:, np.arange(s), np.arange(s)] = np.nan
    return m


def test_a_cells_slope_over_its_last_doubling_has_the_known_value():
    rec = convergence.last_doubling_slope(trajectory(np.full(4, -0.03), jitter=0.001), TOKENS, 500)
    assert rec["slope"] == pytest.approx(-0.03, abs=0.002) and rec["lo"] <= rec["slope"] <= rec["hi"]
    assert rec["tokens"] == TOKENS[-1] and rec["from_tokens"] == TOKENS[-1] // 2 and rec["n_snapshots"] == 9


def rows(diffs, half_width=0.005):
    """A comparison's rows over budgets: each difference with a narrow interval and its outcome."""
    return [{"difference": d, "lo": d - half_width, "hi": d + half_width,
             "outcome": decisions.outcome(d - half_width, d + half_width, MARGIN)} for d in diffs]


def judge(diffs):
    return convergence.settled(rows(diffs), TOL, lambda lo, hi: decisions.outcome(lo, hi, MARGIN))


def test_a_flat_difference_is_settled():
    rec = judge([-0.09, -0.082, -0.080, -0.079])
    assert rec["settled"] and rec["moved"] == pytest.approx(0.001) and rec["why"] == ""


def test_a_rise_then_fall_is_not_settled_where_a_per_cell_slope_test_would_pass():
    # closer and closer, then back: the turn between the last two budgets moves the difference by
    # 0.04, more than the tolerance, although the outcome is 'closer' at both
    rec = judge([-0.02, -0.06, -0.12, -0.14, -0.10])
    assert not rec["settled"] and rec["moved"] == pytest.approx(0.04) and "moved +0.040" in rec["why"]


def test_a_steady_drift_just_under_the_tolerance_is_not_settled_once_it_would_cross_the_margin():
    # 0.024 per doubling passes the tolerance at every budget, and adds up: from -0.021 to -0.045
    # over the last doubling, equivalent at both; one more doubling at that rate crosses -0.05
    rec = judge([0.051, 0.027, 0.003, -0.021, -0.045])
    assert abs(rec["moved"]) < TOL and rows([-0.045])[0]["outcome"] == decisions.EQUIVALENT
    assert not rec["settled"] and rec["projected_outcome"] == decisions.CLOSER
    assert "moving as much again" in rec["why"]
    # the same drift far from any margin boundary is settled: its outcome would hold
    assert judge([-0.20, -0.224, -0.248])["settled"]


def test_a_changed_outcome_or_a_single_budget_is_not_settled():
    assert "outcome changed" in judge([-0.03, -0.07])["why"]
    assert not judge([-0.1])["settled"]
