"""The one schedule: budgets on a doubling grid, cooldown branches, and the trunk they leave alone."""

from __future__ import annotations

import pytest

from ablation import schedule


def test_budgets_double_up_to_the_largest_in_whole_batches():
    assert schedule.budget_steps(16_000_000, 5, 1024) == [976, 1953, 3906, 7812, 15625]
    assert schedule.budget_tokens(12_800, 3, 128) == [3_200, 6_400, 12_800]
    with pytest.raises(ValueError, match="n_budgets=3"):
        schedule.budget_steps(256, 3, 128)  # the smallest budget would hold no whole batch


def test_a_branch_leaves_at_its_last_decay_share_and_cools_down_linearly_to_zero():
    assert schedule.branch_start(1000, 0.2) == 800 and schedule.branch_start(1000, 0.0) == 1000
    lr = schedule.cooldown(5e-3, 800, 1000)
    assert lr(800) == pytest.approx(5e-3) and lr(900) == pytest.approx(2.5e-3)
    assert lr(999) == pytest.approx(5e-3 / 200) and lr(1000) == 0.0
    with pytest.raises(ValueError, match="lr_decay"):
        schedule.branch_start(1000, 1.0)


def test_the_plan_orders_snapshots_branches_and_budgets_along_the_trunk():
    budgets = [25, 50, 100]
    events = schedule.plan(budgets, 0.2, schedule.trunk_snapshots(25, 100, 3, 4))
    steps = [e[0] for e in events]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 100
    branches = [(s, b) for s, kind, b in events if kind == "branch"]
    assert branches == [(20, 0), (40, 1), (80, 2)]
    assert [(s, b) for s, kind, b in events if kind == "budget"] == [(25, 0), (50, 1), (100, 2)]
    # with no decay, a branch leaves at its budget and comes before the trunk's own reading there
    flat = schedule.plan([50], 0.0, [0, 50])
    assert [k for s, k, _ in flat if s == 50] == ["snapshot", "branch", "budget"]


def test_the_schedule_costs_the_largest_budget_and_a_decay_share_of_every_budget():
    budgets = schedule.budget_steps(16_000_000, 5, 1024)
    branch_steps = sum(b - schedule.branch_start(b, 0.2) for b in budgets)
    assert (budgets[-1] + branch_steps) / budgets[-1] == pytest.approx(1 + 0.2 * 31 / 16, abs=0.01)
