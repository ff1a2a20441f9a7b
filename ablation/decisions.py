"""Every decision of the report: comparisons, quality gate, verdict, the authors' Table 3."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .configs import BASELINE, COMPARISONS, PREPROCESSING
from .convergence import settled
from .labels import (
    AGREES_LESS, AGREES_MORE, AUTHORS_CONDITIONS, AUTHORS_RULES, AUTHORS_TABLE3, CLAIMS, CLOSER,
    CONTRADICTED, EQUIVALENT, FURTHER, NOT_ESTABLISHED, SHARED_START, SUPPORTED, UNCONSTRAINED_SHARED,
    UNDECIDED,
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


def quality_gate(fvu_value: float, dead_share: float, max_fvu: float, max_dead_share: float) -> list[str]:
    """Why a cell cannot support a verdict (empty when it can): at its largest budget it must
    reconstruct held-out activations with FVU <= max_fvu and have at most max_dead_share of its
    latents dead. (Whether it still moves is not a gate: the budgets show the motion.)"""
    reasons = []
    if not fvu_value <= max_fvu:
        reasons.append(f"held-out FVU {fvu_value:.2f} > {max_fvu:g}"
                       + (" (worse than predicting the mean)" if fvu_value > 1 else ""))
    if not dead_share <= max_dead_share:
        reasons.append(f"{dead_share:.0%} of latents dead > {max_dead_share:.0%}")
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


ENDPOINT_METRICS = ("mean_min", "hungarian", "hungarian_alive")  # the distances the tests decide on


def falsification_tests(mats: dict, preprocessing: Sequence[str], excluded: dict, margin: float,
                        n_boot: int = 2000, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Do archetypal runs end closer than TopK runs? The distance at one budget (``mats``: cell ->
    metric -> run-by-run matrix), archetypal minus reference, per metric (``ENDPOINT_METRICS``: all
    atoms and atoms alive in both runs) and preprocessing: against TopK from random starts (the
    brief's test), and against a reference from the same start (the constraint's own effect)."""
    pairs, skipped = _pairs(mats, preprocessing, excluded)
    rows = [_row(*pair, metric=metric, **compare_runs(mats[pair[1], pair[3]][metric],
                                                      mats[pair[2], pair[3]][metric], margin, n_boot, seed))
            for pair in pairs for metric in ENDPOINT_METRICS]
    return rows, skipped


def stabilization_tests(step0: dict, mats: dict, preprocessing: Sequence[str], excluded: dict,
                        margin: float, n_boot: int = 2000, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Do archetypal runs come closer over training than TopK runs do? The change from step 0
    (``step0``: cell -> run-by-run Hungarian matrix) to the largest budget (``mats``), archetypal
    minus reference; an advantage when closer by more than the margin."""
    pairs, skipped = _pairs(mats, preprocessing, excluded)
    rows = []
    for comparison, c, ref, p in pairs:
        a, b = mats[c, p]["hungarian"] - step0[c, p], mats[ref, p]["hungarian"] - step0[ref, p]
        res = compare_runs(a, b, margin, n_boot, seed)
        rows.append(_row(comparison, c, ref, p, metric="hungarian",
                         challenger_change=float(np.nanmean(a)), reference_change=float(np.nanmean(b)),
                         **res, stabilization_advantage=res["outcome"] == CLOSER))
    return rows, skipped


def tests_over_budgets(budgets: dict, preprocessing: Sequence[str], margin: float, n_boot: int = 2000,
                       seed: int = 0) -> list[dict]:
    """Every comparison (``COMPARISONS``) at every budget, Hungarian, archetypal minus reference,
    after the cooldown ('branch') and on the trunk ('trunk'): the difference, its 95% interval
    over runs and its outcome. ``budgets``: cell -> reading -> stats.cell_budgets."""
    rows = []
    for comparison, c, ref in COMPARISONS:
        for p in preprocessing:
            if (c, p) not in budgets or (ref, p) not in budgets:
                continue
            for reading in ("branch", "trunk"):
                for a, b in zip(budgets[c, p][reading], budgets[ref, p][reading]):
                    rows.append(_row(comparison, c, ref, p, reading=reading, tokens=int(a["tokens"]),
                                     **compare_runs(a["pairs"]["hungarian"], b["pairs"]["hungarian"],
                                                    margin, n_boot, seed)))
    return rows


def _half_difference(a: np.ndarray, b: np.ndarray, half: slice) -> float:
    """mean(a) - mean(b) over the run pairs within one half of the runs."""
    return float(np.nanmean(a[half, half]) - np.nanmean(b[half, half]))


def verdict_over_budgets(over: Sequence[dict], budgets: dict, tolerance: float, excluded: dict) -> list[dict]:
    """Per comparison and preprocessing: its outcome at the largest budget (after the cooldown),
    whether that outcome is settled (``convergence.settled``), and the noise of its *difference*:
    what the cooldown moves it by (branch against trunk), what the last doubling moved it by, and
    what a second seed set moves it by (the first half of the runs against the second; None with
    fewer than four runs). A comparison whose cell the quality gate flags says so."""
    out = []
    keys = list(dict.fromkeys((r["comparison"], r["challenger"], r["reference"], r["preprocessing"])
                              for r in over))
    for comparison, c, ref, p in keys:
        rows = [r for r in over if (r["comparison"], r["challenger"], r["reference"], r["preprocessing"])
                == (comparison, c, ref, p)]
        branch = sorted((r for r in rows if r["reading"] == "branch"), key=lambda r: r["tokens"])
        trunk = sorted((r for r in rows if r["reading"] == "trunk"), key=lambda r: r["tokens"])
        last = branch[-1]
        margin = last["margin"]
        state = settled(branch, tolerance, lambda lo, hi: outcome(lo, hi, margin))
        a, b = (budgets[n, p]["branch"][-1]["pairs"]["hungarian"] for n in (c, ref))
        n = len(a) // 2
        seed_sets = abs(_half_difference(a, b, slice(0, n)) - _half_difference(a, b, slice(n, None))) \
            if n >= 2 else None
        flagged = [f"{x} ({p}): {'; '.join(excluded[x, p])}" for x in (c, ref) if excluded.get((x, p))]
        out.append(_row(comparison, c, ref, p, tokens=last["tokens"], difference=last["difference"],
                        lo=last["lo"], hi=last["hi"], outcome=last["outcome"], margin=margin,
                        **state, flagged=flagged,
                        noise={"cooldown": abs(last["difference"] - trunk[-1]["difference"]),
                               "last_doubling": None if state["moved"] is None else abs(state["moved"]),
                               "seed_sets": seed_sets}))
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


def _status_of_null(rows: Sequence[dict]) -> str:
    """A 'no advantage' claim over its comparisons: contradicted when a settled comparison finds
    archetypal runs closer by more than the margin, supported when every one is settled within the
    margin or further apart, not established otherwise (undecided, still moving, flagged)."""
    if not rows:
        return NOT_ESTABLISHED
    ok = [r["settled"] and not r["flagged"] for r in rows]
    if any(o and r["outcome"] == CLOSER for o, r in zip(ok, rows)):
        return CONTRADICTED
    return SUPPORTED if all(ok) and all(r["outcome"] in (EQUIVALENT, FURTHER) for r in rows) else NOT_ESTABLISHED


def _status_of_effect(rows: Sequence[dict]) -> str:
    """A claim that archetypal runs end closer: supported when every comparison is settled closer,
    contradicted when a settled one is within the margin or further apart, else not established."""
    if not rows:
        return NOT_ESTABLISHED
    ok = [r["settled"] and not r["flagged"] for r in rows]
    if any(o and r["outcome"] in (EQUIVALENT, FURTHER) for o, r in zip(ok, rows)):
        return CONTRADICTED
    return SUPPORTED if all(ok) and all(r["outcome"] == CLOSER for r in rows) else NOT_ESTABLISHED


def galaxy_test(mats: dict, margin: float, n_boot: int = 2000, seed: int = 0) -> dict | None:
    """What the data mean carries on raw activations: for ra-kmeans-shared raw at the largest
    budget, the Hungarian distance of its atoms as read (minus the data mean, ``read_atoms``)
    minus that of its atoms seen from the origin; above +margin, the mean hid that much of the
    runs' disagreement from the cosine. None when the cell is not in the grid."""
    cell = mats.get(("ra-kmeans-shared", "raw"))
    if cell is None:
        return None
    return {"configuration": "ra-kmeans-shared", "preprocessing": "raw",
            "from_origin": float(np.nanmean(cell["hungarian"])),
            "as_read": float(np.nanmean(cell["hungarian_read"])),
            **compare_runs(cell["hungarian_read"], cell["hungarian"], margin, n_boot, seed)}


def claims(over: Sequence[dict], stabilization: Sequence[dict], galaxy: dict | None) -> list[dict]:
    """Each claim of ``labels.CLAIMS`` with its status (supported, contradicted, not established)
    and what it rests on: the comparisons' outcomes at the largest budget (``over``:
    verdict_over_budgets), the stabilization tests, and the galaxy test."""
    def pick(kind: str, claim: str) -> list[dict]:
        """The comparisons of one kind on the preprocessings the claim is decided on."""
        return [r for r in over if r["comparison"] == kind and r["preprocessing"] in CLAIMS[claim][2]]

    rests = lambda rows: [f"{r['challenger']} - {r['reference']} ({r['preprocessing']}, "  # noqa: E731
                          f"{r['tokens']:,} tokens): {r['difference']:+.3f}, {r['outcome']}"
                          + ("" if r["settled"] else ", not settled") for r in rows]
    independent = pick("against topk-random", "independent_not_closer")
    stab = [r for r in stabilization if r["comparison"] == "against topk-random"
            and r["preprocessing"] in CLAIMS["no_stabilization"][2]]
    settled_pairs = {(r["challenger"], r["preprocessing"]) for r in independent if r["settled"] and not r["flagged"]}
    stab_status = NOT_ESTABLISHED if not stab or not all((r["challenger"], r["preprocessing"]) in settled_pairs
                                                        for r in stab) else \
        (CONTRADICTED if any(r["stabilization_advantage"] for r in stab) else SUPPORTED)
    rows = {
        "shared_start_stable": (_status_of_effect(pick("original protocol", "shared_start_stable")),
                                rests(pick("original protocol", "shared_start_stable"))),
        "independent_not_closer": (_status_of_null(independent), rests(independent)),
        "constraint_no_effect": (_status_of_null(pick("matched start", "constraint_no_effect")),
                                 rests(pick("matched start", "constraint_no_effect"))),
        "no_stabilization": (stab_status, [f"{r['challenger']} - {r['reference']} ({r['preprocessing']}): "
                                           f"change since step 0 {r['difference']:+.3f}, {r['outcome']}" for r in stab]),
    }
    if galaxy is not None:
        # read minus origin beyond +margin ('further'): the mean hid that much disagreement
        status = {FURTHER: SUPPORTED, EQUIVALENT: CONTRADICTED}.get(galaxy["outcome"], NOT_ESTABLISHED)
        rows["galaxy"] = (status, [f"ra-kmeans-shared (raw): {galaxy['from_origin']:.3f} from the origin, "
                                   f"{galaxy['as_read']:.3f} with the mean removed ({galaxy['difference']:+.3f})"])
    else:
        rows["galaxy"] = (NOT_ESTABLISHED, ["ra-kmeans-shared on raw activations is not in this grid"])
    return [{"claim": name, "who": CLAIMS[name][0], "text": CLAIMS[name][1], "preprocessing": list(CLAIMS[name][2]),
             "status": status, "rests_on": why}
            for name, (status, why) in rows.items()]


def verdict(claim_rows: Sequence[dict], over: Sequence[dict]) -> str:
    """The verdict in the report's three words: each claim with its status, then which comparisons
    are not settled at the largest budget and why."""
    if not over:
        return "not tested: no comparison's two cells are in this grid."
    margin, tokens = over[0]["margin"], max(r["tokens"] for r in over)
    parts = [f"Decided at {tokens:,} tokens per run, after the cooldown, against a margin of {margin:g} "
             "in Hungarian cosine distance (95% intervals over runs)."]
    parts += [f"{c['who']}: {c['text']}: {c['status'].upper()}." for c in claim_rows]
    loose = [r for r in over if not r["settled"] or r["flagged"]]
    if loose:
        parts.append("Not settled: " + "; ".join(
            f"{r['challenger']} - {r['reference']} ({r['preprocessing']}): "
            + "; ".join(filter(None, [r["why"], *r["flagged"]])) for r in loose) + ".")
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
