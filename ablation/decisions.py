"""Every decision of the report: comparisons, quality gate, verdict, the authors' Table 3."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .configs import BASELINE, CHALLENGERS, PREPROCESSING
from .convergence import at_full_rate
from .labels import (
    AGREES_LESS, AGREES_MORE, AUTHORS_CONDITIONS, AUTHORS_RULES, AUTHORS_TABLE3, CLOSER, FURTHER,
    NO_DIFFERENCE, SHARED_START, UNCONSTRAINED_SHARED,
)
from .bootstrap import bootstrap_runs


# Outcome labels: the notebooks print them and the README generator reads them from the JSON.


def compare_runs(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0,
                 agreement: bool = False) -> dict:
    """Difference of two configurations' run-pair means, mean(a) - mean(b), with a 95% bootstrap
    interval over runs and its outcome.

    For a distance (agreement=False) an interval wholly below 0 reads CLOSER, wholly above
    FURTHER; for an agreement such as a correlation, above 0 reads AGREES_MORE, below AGREES_LESS.
    """
    diff, lo, hi = bootstrap_runs(a, n_boot, seed, other=b)
    if agreement:
        outcome = AGREES_MORE if lo > 0 else AGREES_LESS if hi < 0 else NO_DIFFERENCE
    else:
        outcome = CLOSER if hi < 0 else FURTHER if lo > 0 else NO_DIFFERENCE
    return {"difference": diff, "lo": lo, "hi": hi, "outcome": outcome}


def quality_gate(fvu_value: float, record: dict, max_fvu: float) -> list[str]:
    """Why a cell cannot support a verdict (empty when it can): it must reconstruct held-out
    activations with FVU <= max_fvu, and it must have converged at the full learning rate
    (``record``: its convergence record, ``convergence.convergence`` plus the tokens trained)."""
    reasons = []
    if not fvu_value <= max_fvu:
        reasons.append(f"held-out FVU {fvu_value:.2f} > {max_fvu:g}"
                       + (" (worse than predicting the mean)" if fvu_value > 1 else ""))
    if not record["converged"]:
        reasons.append(f"not converged within the cap of {record['max_tokens']:,} tokens: slope "
                       f"{record['slope']:+.3f} per doubling [{record['lo']:+.3f}, {record['hi']:+.3f}] "
                       f"at {record['tokens']:,} tokens, beyond +-{record['tolerance']:g}")
    return reasons


def _pairs(cells: Iterable[tuple[str, str]], preprocessing: Sequence[str],
           excluded: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """(challenger, prep) pairs testable against the baseline, and why the others were skipped."""
    cells = set(cells)
    pairs, skipped = [], []
    for c in CHALLENGERS:
        for prep in preprocessing:
            if (c, prep) not in cells or (BASELINE, prep) not in cells:
                continue
            bad = [f"{n} ({prep}): {'; '.join(excluded[n, prep])}" for n in (c, BASELINE)
                   if excluded.get((n, prep))]
            if bad:
                skipped.append(f"{c} vs {BASELINE}, {prep}: excluded, " + ", ".join(bad))
            else:
                pairs.append((c, prep))
    return pairs, skipped


def falsification_tests(traj: dict, preprocessing: Sequence[str], excluded: dict,
                        n_boot: int = 2000, seed: int = 0) -> tuple[list[dict], list[str]]:
    """The brief's test: do archetypal runs with independent starts end closer than TopK runs?
    Endpoint distance, challenger minus baseline, per metric and preprocessing."""
    pairs, skipped = _pairs(traj, preprocessing, excluded)
    rows = [{"challenger": c, "preprocessing": p, "metric": metric,
             **compare_runs(traj[c, p][metric][-1], traj[BASELINE, p][metric][-1], n_boot, seed)}
            for c, p in pairs for metric in ("mean_min", "hungarian")]
    return rows, skipped


def stabilization_tests(traj: dict, preprocessing: Sequence[str], excluded: dict,
                        n_boot: int = 2000, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Do independently started archetypal runs come closer over training than TopK runs do?
    The change end minus step 0, challenger minus baseline; an advantage when wholly below 0."""
    pairs, skipped = _pairs(traj, preprocessing, excluded)
    rows = []
    for c, p in pairs:
        for metric in ("mean_min", "hungarian"):
            a, b = traj[c, p][metric], traj[BASELINE, p][metric]
            res = compare_runs(a[-1] - a[0], b[-1] - b[0], n_boot, seed)
            rows.append({"challenger": c, "preprocessing": p, "metric": metric,
                         "challenger_change": float(np.nanmean(a[-1] - a[0])),
                         "baseline_change": float(np.nanmean(b[-1] - b[0])),
                         **res, "stabilization_advantage": res["hi"] < 0})
    return rows, skipped


def tests_over_training(traj: dict, preprocessing: Sequence[str], n_boot: int = 2000,
                        seed: int = 0) -> list[dict]:
    """The falsification difference (distance) and the stabilization difference (distance minus
    step 0), challenger minus baseline, Hungarian, over training: at every token count where both
    cells have a snapshot at the full rate (stage 'full rate'); past the end of the cell that
    converged first, that cell held at its last full-rate snapshot against the other's later
    ones (stage 'held'); then at both cells' ends (stage 'end', at the later end)."""
    rows = []
    for c in CHALLENGERS:
        for p in preprocessing:
            if (c, p) not in traj or (BASELINE, p) not in traj:
                continue
            a, b = traj[c, p], traj[BASELINE, p]
            full = [{int(x["tokens"][i]): i for i in np.flatnonzero(at_full_rate(x["lr"]))}
                    for x in (a, b)]
            points = []
            for t in sorted(set(full[0]) | set(full[1])):
                ij = [f.get(t, f[max(f)] if t > max(f) else None) for f in full]
                if None not in ij:
                    points.append((t, *ij, "full rate" if all(t in f for f in full) else "held"))
            points.append((int(max(a["tokens"][-1], b["tokens"][-1])), -1, -1, "end"))
            ha, hb = a["hungarian"], b["hungarian"]
            for t, i, j, stage in points:
                for test, (x, y) in (("falsification", (ha[i], hb[j])),
                                     ("stabilization", (ha[i] - ha[0], hb[j] - hb[0]))):
                    rows.append({"challenger": c, "preprocessing": p, "tokens": t, "stage": stage,
                                 "test": test, **compare_runs(x, y, n_boot, seed)})
    return rows


def sign_settled(over) -> list[dict]:
    """Per test, challenger and preprocessing of ``tests_over_training`` (a DataFrame): the sign
    at the end (below 0, above 0, or undecided: the interval holds 0) and the smallest token count
    from which every later point, the end included, has that sign (None: only the end has it)."""
    out = []
    if over.empty:  # no challenger beside the baseline
        return out
    for (test, c, p), g in over.groupby(["test", "challenger", "preprocessing"], sort=False):
        g = g.assign(last=g.stage == "end").sort_values(["last", "tokens"])
        signs = np.where(g.hi < 0, "below 0", np.where(g.lo > 0, "above 0", "undecided"))
        same = signs == signs[-1]
        first = len(same) - int(np.argmin(same[::-1])) if not same.all() else 0
        settled = int(g.tokens.iloc[first]) if first < len(g) - 1 else None
        out.append({"test": test, "challenger": c, "preprocessing": p, "sign": str(signs[-1]),
                    "settled_from": settled, "end_difference": float(g.difference.iloc[-1])})
    return out


def geometry_free_tests(mats: dict, preprocessing: Sequence[str], excluded: dict,
                        n_boot: int = 2000, seed: int = 0) -> tuple[list[dict], list[str]]:
    """The referee's control: correlation of activation-matched latents on held-out data,
    challenger minus baseline (above 0: archetypal runs agree more)."""
    pairs, skipped = _pairs(mats, preprocessing, excluded)
    rows = [{"challenger": c, "preprocessing": p,
             **compare_runs(mats[c, p]["activation_corr"], mats[BASELINE, p]["activation_corr"],
                            n_boot, seed, agreement=True)} for c, p in pairs]
    return rows, skipped


def verdict(falsification: list[dict], stabilization: list[dict], skipped: Sequence[str] = ()) -> str:
    """One sentence from the two tests: endpoint falsification and stabilization advantage."""
    if not falsification and skipped:
        return ("no test could run: the quality gate excluded the archetypal challengers or the TopK "
                "baseline.")
    if not falsification:
        return (f"not tested: the grid has no archetypal configuration with independent starts "
                f"({', '.join(CHALLENGERS)}) beside {BASELINE}.")
    if not any(t["outcome"] == CLOSER for t in falsification):
        return ("not falsified: with independent starts, archetypal SAEs end no closer than TopK "
                "SAEs.")
    if any(t["stabilization_advantage"] for t in stabilization):
        return ("FALSIFIED: archetypal runs with independent starts end closer than TopK runs and "
                "come closer over training than TopK runs do.")
    return ("the literal endpoint criterion is met (archetypal runs with independent starts end "
            "closer than TopK runs), but the closeness is inherited, not found: over training the "
            "archetypal runs come no closer than TopK runs do, so the constraint shows no "
            "stabilization advantage.")


def authors_pattern(distance: dict[tuple[str, str], float]) -> dict:
    """Whether endpoint Hungarian distances show the authors' pattern, rule by rule
    (``AUTHORS_RULES``); a rule that needs a missing cell does not hold."""
    d = lambda n, p: distance.get((n, p))  # noqa: E731
    rules = {
        "raw_shared_far_closer": [d(n, "raw") is not None and d("topk-random", "raw") is not None
                                  and d(n, "raw") <= 0.5 * d("topk-random", "raw") for n in SHARED_START],
        "centering_pulls_ra_apart": [None not in (d("ra-kmeans-shared", "raw"), d("ra-kmeans-shared", "centered"))
                                     and d("ra-kmeans-shared", "centered") >= 1.5 * d("ra-kmeans-shared", "raw")],
        "unconstrained_stay_close": [None not in (d(n, "centered"), d("topk-random", "centered"))
                                     and d(n, "centered") <= 0.5 * d("topk-random", "centered")
                                     for n in UNCONSTRAINED_SHARED],
    }
    return {rule: all(rules[rule]) for rule in AUTHORS_RULES}


def authors_table(endpoint: dict, stability: dict) -> list[dict]:
    """The authors' Table 3 beside this run: per condition and preprocessing, their DINOv2 number,
    this run's endpoint Hungarian distance with its interval, and this run's step-0 distance."""
    return [{"condition": label, "configuration": name, "preprocessing": prep,
             "authors": AUTHORS_TABLE3[name, prep],
             **dict(zip(("mean", "lo", "hi"), endpoint[name, prep]["hungarian"])),
             "step0": stability[name, prep]["step0"]}
            for name, label in AUTHORS_CONDITIONS.items() for prep in PREPROCESSING
            if (name, prep) in endpoint]


def ground_truth_summary(synthetic: dict[str, dict]) -> str:
    """What the synthetic control shows, computed from its numbers, whichever way they point."""
    best = max(synthetic, key=lambda n: synthetic[n]["recovered"])
    stable = min(synthetic, key=lambda n: synthetic[n]["hungarian_between_runs"])
    s = (f"On synthetic data with a known dictionary, {best} recovers the most true atoms "
         f"({synthetic[best]['recovered']:.0%} at cosine >= 0.9) and {stable} looks the most "
         f"stable (runs {synthetic[stable]['hungarian_between_runs']:.3f} apart).")
    if best == stable:
        return s + " Here the most stable configuration is also the most correct."
    return s + (f" Stability is not correctness: the most stable configuration recovers "
                f"{synthetic[stable]['recovered']:.0%}.")
