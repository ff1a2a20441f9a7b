"""Every decision of the report: comparisons, quality gate, verdict, the authors' Table 3."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .configs import BASELINE, COMPARISONS, PREPROCESSING
from .convergence import at_full_rate
from .labels import (
    AGREES_LESS, AGREES_MORE, AUTHORS_CONDITIONS, AUTHORS_RULES, AUTHORS_TABLE3, CLOSER, EQUIVALENT,
    FURTHER, SHARED_START, UNCONSTRAINED_SHARED, UNDECIDED,
)
from .bootstrap import bootstrap_runs


def outcome(lo: float, hi: float, margin: float, agreement: bool = False) -> str:
    """The equivalence test's outcome for a 95% interval [lo, hi] of a difference (archetypal
    minus reference): beyond the margin on one side, within +-margin on both (two one-sided
    tests), or undecided when the interval crosses a margin. For a distance, below -margin is
    CLOSER; for an agreement (a correlation), above +margin is AGREES_MORE."""
    if not margin > 0:
        raise ValueError(f"equivalence_margin={margin!r} must be a number > 0")
    if -margin <= lo and hi <= margin:
        return EQUIVALENT
    if hi < -margin:
        return AGREES_LESS if agreement else CLOSER
    if lo > margin:
        return AGREES_MORE if agreement else FURTHER
    return UNDECIDED


def compare_runs(a: np.ndarray, b: np.ndarray, margin: float, n_boot: int = 2000, seed: int = 0,
                 agreement: bool = False) -> dict:
    """Difference of two configurations' run-pair means, mean(a) - mean(b), with a 95% bootstrap
    interval over runs and its outcome under the margin (``outcome``)."""
    diff, lo, hi = bootstrap_runs(a, n_boot, seed, other=b)
    return {"difference": diff, "lo": lo, "hi": hi, "margin": margin,
            "outcome": outcome(lo, hi, margin, agreement)}


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
                       f"at {record['tokens']:,} tokens (the doubling before: "
                       f"{record['slope_before']:+.3f} [{record['lo_before']:+.3f}, "
                       f"{record['hi_before']:+.3f}]), not both within +-{record['tolerance']:g}")
    return reasons


def _pairs(cells: Iterable[tuple[str, str]], preprocessing: Sequence[str],
           excluded: dict) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """(comparison, challenger, reference, prep) of ``COMPARISONS`` whose two cells are in the grid
    and pass the quality gate, and why the others in the grid were skipped."""
    cells = set(cells)
    pairs, skipped = [], []
    for comparison, c, ref in COMPARISONS:
        for prep in preprocessing:
            if (c, prep) not in cells or (ref, prep) not in cells:
                continue
            bad = [f"{n} ({prep}): {'; '.join(excluded[n, prep])}" for n in (c, ref)
                   if excluded.get((n, prep))]
            if bad:
                skipped.append(f"{c} vs {ref}, {prep}: excluded, " + ", ".join(bad))
            else:
                pairs.append((comparison, c, ref, prep))
    return pairs, skipped


def _row(comparison: str, c: str, ref: str, prep: str, **rest: object) -> dict:
    """One comparison's row: what is compared with what, on which data, and its numbers."""
    return {"comparison": comparison, "challenger": c, "reference": ref, "preprocessing": prep, **rest}


def falsification_tests(traj: dict, preprocessing: Sequence[str], excluded: dict, margin: float,
                        n_boot: int = 2000, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Do archetypal runs end closer than TopK runs? Endpoint distance, archetypal minus TopK, per
    metric and preprocessing: against TopK from random starts (the brief's test), and against
    TopK started at the same kind of points (the constraint's own effect)."""
    pairs, skipped = _pairs(traj, preprocessing, excluded)
    rows = [_row(*pair, metric=metric, **compare_runs(traj[pair[1], pair[3]][metric][-1],
                                                      traj[pair[2], pair[3]][metric][-1],
                                                      margin, n_boot, seed))
            for pair in pairs for metric in ("mean_min", "hungarian")]
    return rows, skipped


def stabilization_tests(traj: dict, preprocessing: Sequence[str], excluded: dict, margin: float,
                        n_boot: int = 2000, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Do archetypal runs come closer over training than TopK runs do? The change end minus step
    0, archetypal minus TopK; an advantage when closer by more than the margin."""
    pairs, skipped = _pairs(traj, preprocessing, excluded)
    rows = []
    for comparison, c, ref, p in pairs:
        for metric in ("mean_min", "hungarian"):
            a, b = traj[c, p][metric], traj[ref, p][metric]
            res = compare_runs(a[-1] - a[0], b[-1] - b[0], margin, n_boot, seed)
            rows.append(_row(comparison, c, ref, p, metric=metric,
                             challenger_change=float(np.nanmean(a[-1] - a[0])),
                             reference_change=float(np.nanmean(b[-1] - b[0])),
                             **res, stabilization_advantage=res["outcome"] == CLOSER))
    return rows, skipped


def tests_over_training(traj: dict, preprocessing: Sequence[str], margin: float,
                        n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Both comparisons (``COMPARISONS``) over training, Hungarian: the endpoint difference
    ('falsification') and the change since step 0 ('stabilization'), archetypal minus TopK, at
    every token count where both cells have a snapshot at the full rate (stage 'full rate'); past
    the end of the cell that converged first, that cell held at its last full-rate snapshot
    against the other's later ones (stage 'held'); then at both cells' ends (stage 'end')."""
    rows = []
    for comparison, c, ref in COMPARISONS:
        for p in preprocessing:
            if (c, p) not in traj or (ref, p) not in traj:
                continue
            a, b = traj[c, p], traj[ref, p]
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
                    rows.append(_row(comparison, c, ref, p, tokens=t, stage=stage, test=test,
                                     **compare_runs(x, y, margin, n_boot, seed)))
    return rows


def outcome_settled(over) -> list[dict]:
    """Per test, comparison, challenger and preprocessing of ``tests_over_training`` (a
    DataFrame): the outcome at the end and the smallest token count from which every later
    point, the end included, has that outcome (None: only the end has it)."""
    out = []
    if over.empty:  # no comparison in this grid
        return out
    keys = ["test", "comparison", "challenger", "reference", "preprocessing"]
    for (test, comparison, c, ref, p), g in over.groupby(keys, sort=False):
        g = g.assign(last=g.stage == "end").sort_values(["last", "tokens"])
        outcomes = g.outcome.to_numpy()
        same = outcomes == outcomes[-1]
        first = len(same) - int(np.argmin(same[::-1])) if not same.all() else 0
        settled = int(g.tokens.iloc[first]) if first < len(g) - 1 else None
        out.append(_row(comparison, c, ref, p, test=test, outcome=str(outcomes[-1]),
                        settled_from=settled, end_difference=float(g.difference.iloc[-1])))
    return out


def geometry_free_tests(mats: dict, preprocessing: Sequence[str], excluded: dict, margin: float,
                        n_boot: int = 2000, seed: int = 0) -> tuple[list[dict], list[str]]:
    """The referee's control: correlation of activation-matched latents on held-out data, matched
    among the latents alive in both runs of a pair, archetypal minus TopK (above 0: archetypal runs
    agree more), with each side's dead share and the all-latent version (dead latents counted as
    correlation 0) beside it."""
    pairs, skipped = _pairs(mats, preprocessing, excluded)
    rows = []
    for comparison, c, ref, p in pairs:
        a, b = mats[c, p], mats[ref, p]
        every = compare_runs(a["activation_corr_all"], b["activation_corr_all"], margin, n_boot,
                             seed, agreement=True)
        rows.append(_row(comparison, c, ref, p,
                         **compare_runs(a["activation_corr"], b["activation_corr"], margin, n_boot,
                                        seed, agreement=True),
                         challenger_dead_share=float(np.nanmean(a["dead_share"])),
                         reference_dead_share=float(np.nanmean(b["dead_share"])),
                         all_latents={k_: every[k_] for k_ in ("difference", "lo", "hi", "outcome")}))
    return rows, skipped


_SHORT = {CLOSER: "closer", FURTHER: "further apart", EQUIVALENT: "equivalent",
          UNDECIDED: "undecided"}


def _listing(rows: Sequence[dict]) -> str:
    """'name vs reference (prep) outcome (difference [lo, hi])' for each row, joined by ';'."""
    return "; ".join(f"{r['challenger']} vs {r['reference']} ({r['preprocessing']}) "
                     f"{_SHORT[r['outcome']]} ({r['difference']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}])"
                     for r in rows)


def verdict(falsification: list[dict], stabilization: list[dict], skipped: Sequence[str] = ()) -> str:
    """The verdict, built from the outcomes of the Hungarian comparisons under the margin: each
    comparison named with its outcome and interval, then what they say together."""
    hung = [t for t in falsification if t["metric"] == "hungarian"]
    if not hung:
        return ("no test could run: the quality gate excluded " + "; ".join(skipped) + "."
                if skipped else "not tested: the grid has no archetypal configuration beside the "
                "TopK SAE it is compared with.")
    margin = hung[0]["margin"]  # every row carries the margin it was decided against
    base = [t for t in hung if t["comparison"] == "against topk-random"]
    matched = [t for t in hung if t["comparison"] == "matched start"]
    parts = [f"Decided against a margin of {margin:g} in Hungarian cosine distance (95% intervals "
             "over runs)."]
    if base:
        parts.append(f"Against TopK from random starts: {_listing(base)}.")
    if matched:
        parts.append(f"The constraint at a matched start (RA-SAE minus TopK started at the same "
                     f"points): {_listing(matched)}.")
    if skipped:
        parts.append("Not testable on this grid: " + "; ".join(skipped) + ".")
    closer_matched = [t for t in matched if t["outcome"] == CLOSER]
    closer_base = [t for t in base if t["outcome"] == CLOSER]
    if closer_matched:
        parts.append("FALSIFIED where the constraint itself ends runs closer than an unconstrained "
                     "SAE from the same start: " + ", ".join(
                         f"{t['challenger']} ({t['preprocessing']})" for t in closer_matched) + ".")
    elif closer_base and matched:
        parts.append("Archetypal runs end closer than TopK from random starts, but not closer "
                     "than TopK from the same start: the closeness comes from the start, not the "
                     "constraint.")
    elif closer_base:
        parts.append("Archetypal runs end closer than TopK from random starts; without a "
                     "start-matched TopK control this grid cannot tell the start from the constraint.")
    else:
        parts.append("Not falsified: no archetypal configuration ends closer than TopK by more than "
                     "the margin.")
    if any(t["stabilization_advantage"] for t in stabilization if t["metric"] == "hungarian"):
        parts.append("Over training, archetypal runs come closer than TopK runs by more than the "
                     "margin in: " + ", ".join(
                         f"{t['challenger']} vs {t['reference']} ({t['preprocessing']})"
                         for t in stabilization
                         if t["metric"] == "hungarian" and t["stabilization_advantage"]) + ".")
    else:
        parts.append("Over training, no archetypal configuration comes closer than TopK by more "
                     "than the margin: no stabilization advantage.")
    if any(t["outcome"] == UNDECIDED for t in hung):
        parts.append("Undecided comparisons need more runs, or a protocol with less noise.")
    return " ".join(parts)


def authors_pattern(distance: dict[tuple[str, str], float]) -> dict:
    """Whether endpoint Hungarian distances show the authors' pattern, rule by rule
    (``AUTHORS_RULES``): True or False, or None (not testable on this grid) when a rule needs a
    cell the grid does not have."""
    d = lambda n, p: distance.get((n, p))  # noqa: E731
    needs = {"raw_shared_far_closer": [(n, "raw") for n in (BASELINE, *SHARED_START)],
             "centering_pulls_ra_apart": [("ra-kmeans-shared", p) for p in PREPROCESSING],
             "unconstrained_stay_close": [(n, "centered") for n in (BASELINE, *UNCONSTRAINED_SHARED)]}
    holds = {
        "raw_shared_far_closer": lambda: all(d(n, "raw") <= 0.5 * d(BASELINE, "raw")
                                             for n in SHARED_START),
        "centering_pulls_ra_apart": lambda: d("ra-kmeans-shared", "centered")
        >= 1.5 * d("ra-kmeans-shared", "raw"),
        "unconstrained_stay_close": lambda: all(d(n, "centered") <= 0.5 * d(BASELINE, "centered")
                                                for n in UNCONSTRAINED_SHARED),
    }
    return {rule: bool(holds[rule]()) if all(c in distance for c in needs[rule]) else None
            for rule in AUTHORS_RULES}


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
