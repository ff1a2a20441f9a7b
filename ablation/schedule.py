"""The one training schedule of every cell: a trunk at the full rate with a cooldown branch at
each budget of a doubling grid (warmup-stable-decay with cooldown branches, Hägele et al. 2024).

The trunk trains at the full rate up to the largest budget; its snapshots are the "no decay"
reading. At each budget B, a branch copies the trunk's state at (1 - lr_decay) x B tokens and
lets the rate fall linearly to 0 at B; the branch's end is the cell at budget B. Every cell of a
profile therefore has a model at every budget, each after the same decay, from one run of about
1 + lr_decay x 2 times the largest budget's tokens.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def budget_steps(sae_budget: int, n_budgets: int, batch_size: int) -> list[int]:
    """The steps of each budget, ascending: sae_budget / 2^i tokens for i < n_budgets, in whole
    batches."""
    if n_budgets < 1 or sae_budget < batch_size * 2 ** (n_budgets - 1):
        raise ValueError(f"sae_budget={sae_budget:,} must hold at least one batch of {batch_size} "
                         f"at each of n_budgets={n_budgets} halvings")
    return [(sae_budget >> i) // batch_size for i in reversed(range(n_budgets))]


def branch_start(steps: int, lr_decay: float) -> int:
    """The trunk step at which the branch of a budget of ``steps`` leaves: its last lr_decay share."""
    if not 0 <= lr_decay < 1:
        raise ValueError(f"lr_decay={lr_decay} must be in [0, 1)")
    return steps - int(round(steps * lr_decay))


def cooldown(lr: float, start: int, end: int) -> Callable[[int], float]:
    """A branch's rate at each step from start: falling linearly from lr to 0 at step end (the
    last step, end - 1, trains at lr / (end - start))."""
    return lambda step: lr * (end - step) / max(end - start, 1)


def trunk_snapshots(first: int, last: int, n_log: int, per_doubling: int) -> list[int]:
    """Trunk snapshot steps: 0, n_log log-spaced steps up to first / 4 (dense early), then
    per_doubling steps per doubling from first / 4 up to last (``first`` and ``last`` are the
    smallest and the largest budget's steps)."""
    if not 1 <= first <= last:
        raise ValueError(f"need 1 <= first={first} <= last={last}")
    if per_doubling < 2:
        raise ValueError(f"per_doubling={per_doubling} must be >= 2 (a slope needs several snapshots)")
    early = np.geomspace(1, max(first / 4, 1), n_log) if n_log > 0 else []
    late, i = [], -2 * per_doubling
    while (s := first * 2 ** (i / per_doubling)) < last:
        late.append(s)
        i += 1
    return sorted({0, first, last, *(int(round(s)) for s in (*early, *late))} - {-1})


def plan(budgets: list[int], lr_decay: float, snapshots: list[int]) -> list[tuple[int, str, int]]:
    """The trunk's events in order: (step, kind, budget index), kind 'snapshot' (distances between
    runs), 'branch' (a cooldown branch leaves for budget i) or 'budget' (the trunk reaches budget
    i: its no-decay reading). A branch that leaves at the budget itself (no decay) comes first."""
    order = {"snapshot": 0, "branch": 1, "budget": 2}
    events = [(s, "snapshot", -1) for s in snapshots]
    events += [(branch_start(b, lr_decay), "branch", i) for i, b in enumerate(budgets)]
    events += [(b, "budget", i) for i, b in enumerate(budgets)]
    return sorted(events, key=lambda e: (e[0], order[e[1]], e[2]))


def budget_tokens(sae_budget: int, n_budgets: int, batch_size: int) -> list[int]:
    """The budgets in tokens (whole batches), ascending."""
    return [s * batch_size for s in budget_steps(sae_budget, n_budgets, batch_size)]


def learning_rates(budgets: list[int], lr: float, lr_decay: float) -> list[tuple[list[int], list[float]]]:
    """The schedule as lines to draw: the trunk (tokens, rate), then each budget's branch."""
    lines = [([0, budgets[-1]], [lr, lr])]
    for b in budgets:
        start = branch_start(b, lr_decay)
        lines.append(([start, b], [lr, 0.0]))
    return lines
