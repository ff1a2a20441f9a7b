"""The convergence criterion on trajectories with known answers, and the snapshot plan."""

from __future__ import annotations

import numpy as np
import pytest

from ablation import convergence, parameters

TOKENS = np.round(1_000_000 * 2 ** (np.arange(-8, 17) / 8)).astype(int)  # 2^-1 .. 2^2 M, 8 per doubling
LR = 5e-3


def trajectory(per_run_slope: np.ndarray, level: float = 0.4, jitter: float = 0.0,
               seed: int = 0) -> np.ndarray:
    """Run-by-run distances (snapshots x runs x runs) with pair (i, j) moving by the mean of the
    two runs' slopes per doubling of tokens, plus independent jitter per snapshot and pair."""
    rng = np.random.default_rng(seed)
    s = len(per_run_slope)
    slope = (per_run_slope[:, None] + per_run_slope[None, :]) / 2
    t = np.log2(TOKENS / TOKENS[-1])
    m = level + t[:, None, None] * slope[None] + jitter * rng.standard_normal((len(t), s, s))
    m = (m + m.transpose(0, 2, 1)) / 2
    m[:, np.arange(s), np.arange(s)] = np.nan
    return m


def judge(m: np.ndarray, lrs=None, tolerance: float = 0.02) -> dict:
    return convergence.convergence(m, TOKENS, [LR] * len(TOKENS) if lrs is None else lrs,
                                   tolerance, n_boot=500)


def test_a_converged_trajectory_is_converged():
    rec = judge(trajectory(np.zeros(4), jitter=0.002))
    assert rec["converged"] and abs(rec["slope"]) < 0.005
    assert rec["tokens"] == TOKENS[-1] and rec["from_tokens"] == TOKENS[16] and rec["n_snapshots"] == 9
    assert abs(rec["slope_before"]) < 0.005 and rec["lo_before"] <= rec["hi_before"]
    assert rec["lr"] == LR


def test_a_steady_drift_just_under_the_old_tolerance_is_not_converged_under_the_margin():
    # 0.029 per doubling passed the old tolerance (0.03) at every snapshot, and moves 0.058 over
    # two more doublings: more than the declared margin; the tolerance tied to the margin says no
    tolerance = parameters.default("converge_tolerance")
    assert tolerance <= parameters.default("equivalence_margin") / 2
    m = trajectory(np.full(4, -0.029), jitter=0.001)
    assert judge(m, tolerance=0.03)["converged"]  # the old criterion
    rec = judge(m, tolerance=tolerance)
    assert not rec["converged"] and rec["slope"] == pytest.approx(-0.029, abs=0.002)


def test_a_turning_point_is_not_converged():
    # rises from a close start at 0.1 per doubling, peaks in the middle of the last doubling and
    # turns: the last doubling alone is flat (one window called this converged), the one before
    # it rises steeply
    t = np.log2(TOKENS / TOKENS[-1])
    level = 0.3 - 0.1 * (t + 0.5) ** 2 / 0.5  # slope 0 at t = -0.5, +0.1 per doubling at t = -1
    m = trajectory(np.zeros(4), jitter=0.001) - 0.4 + level[:, None, None]
    rec = judge(m)
    assert abs(rec["slope"]) < 0.01 and -0.02 <= rec["lo"] and rec["hi"] <= 0.02  # one window: flat
    assert rec["slope_before"] > 0.1 and not rec["converged"]


def test_a_slowly_drifting_trajectory_is_not():
    rec = judge(trajectory(np.full(4, -0.03), jitter=0.002))
    assert not rec["converged"]
    assert rec["slope"] == pytest.approx(-0.03, abs=0.003) and rec["hi"] < -0.02


def test_the_slope_is_per_doubling_of_tokens():
    m = trajectory(np.array([-0.01, -0.02, -0.03, -0.04]))
    slopes = convergence.slope_per_doubling(m[16:], TOKENS[16:])
    assert slopes[0, 3] == pytest.approx(-0.025) and slopes[1, 2] == pytest.approx(-0.025)
    assert np.isnan(slopes[2, 2])


def test_a_jittery_flat_trajectory_is_converged_though_two_snapshots_differ_by_more():
    m = trajectory(np.zeros(4), jitter=0.0)
    m[8:] += np.where(np.arange(len(TOKENS) - 8) % 2, 0.03, -0.03)[:, None, None]  # +-0.03 zig-zag
    assert abs(np.nanmean(m[-1] - m[-2])) > 0.02  # a difference of two snapshots would say "moving"
    rec = judge(m)
    assert rec["converged"] and abs(rec["slope"]) < 0.01


def test_a_trajectory_frozen_by_a_decay_is_not_converged():
    # drifting at -0.05 per doubling at the full rate, then the rate falls to 0 over the last
    # quarter of the snapshots and the distance stops moving there
    m = trajectory(np.full(4, -0.05), jitter=0.001)
    n_decay = 6
    lrs = [LR] * (len(TOKENS) - n_decay) + list(LR * np.linspace(0.8, 0.0, n_decay))
    m[-n_decay:] = m[-n_decay - 1]
    assert abs(np.nanmean(m[-1] - m[-n_decay])) < 1e-9  # the decayed stretch is flat
    rec = judge(m, lrs)
    assert not rec["converged"] and rec["hi"] < -0.04
    assert rec["tokens"] == TOKENS[-n_decay - 1]  # judged at the last full-rate snapshot


def test_too_few_snapshots_in_the_window_are_not_judged():
    rec = convergence.convergence(trajectory(np.zeros(3))[-3:], TOKENS[-3:], [LR] * 3, 0.02)
    assert not rec["converged"] and np.isnan(rec["slope"])


def test_the_snapshot_plan_is_log_dense_early_and_per_doubling_late():
    steps = convergence.full_rate_steps(1000, 8000, n_log=10, per_doubling=4)
    assert steps[0] == 0 and steps[-1] == 8000 and {250, 500, 1000} <= set(steps)
    early = [s for s in steps if 0 < s < 250]
    assert len(early) >= 6 and early[0] == 1  # log-spaced from step 1
    late = [s for s in steps if s >= 250]
    assert np.allclose(np.diff(np.log2(late)), 0.25, atol=0.01)  # 4 per doubling, from min / 4
    # a fixed budget (min = max) still leaves two full doublings to judge
    fixed = convergence.full_rate_steps(1500, 1500, n_log=5, per_doubling=8)
    assert fixed[-1] == 1500 and sum(s >= 750 for s in fixed) == 9
    assert sum(375 <= s <= 750 for s in fixed) == 9
    with pytest.raises(ValueError, match="min_steps"):
        convergence.full_rate_steps(10, 5, 4, 4)


def test_the_final_decay_is_the_last_share_of_all_steps():
    assert convergence.decay_steps(800, 0.2) == 200  # 200 / (800 + 200) = 0.2
    assert convergence.decay_steps(800, 0.0) == 0
    with pytest.raises(ValueError, match="lr_decay=1"):
        convergence.decay_steps(800, 1.0)


def test_the_full_rate_is_a_cells_largest_rate():
    assert convergence.at_full_rate([5e-3, 5e-3, 2e-3, 0.0]).tolist() == [True, True, False, False]
