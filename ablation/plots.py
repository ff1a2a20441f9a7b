"""The report's one figure style, its colours per configuration, Figures 1, 3 and 4."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence



# one colour, line style and marker per configuration, told apart in print and by colour-blind readers
STYLES = {
    "topk-random": ("#000000", "-", "o"),
    "topk-kmeans-shared": ("#E69F00", "--", "s"),
    "topk-kmeans-independent": ("#7F7F7F", "--", "<"),
    "topk-random-points": ("#8C564B", (0, (4, 2)), ">"),
    "ra-kmeans-shared": ("#0072B2", "-", "^"),
    "ra-kmeans-independent": ("#009E73", "-.", "v"),
    "ra-projection-off": ("#CC79A7", ":", "D"),
    "ra-random-points": ("#D55E00", (0, (5, 1, 1, 1)), "p"),
    "topk-kmeans-shared-free": ("#E69F00", (0, (3, 1, 1, 1)), "P"),
    "ra-projection-off-free": ("#56B4E9", (0, (1, 1)), "X"),
}


def set_style() -> None:
    """The report's one seaborn style."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")


def save_figure(fig, name: str, figures_dir: str | os.PathLike) -> Path:
    """Save fig as figures_dir/name.png and .pdf; returns the PNG path."""
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / f"{name}.pdf", bbox_inches="tight")
    fig.savefig(out / f"{name}.png", dpi=150, bbox_inches="tight")
    return out / f"{name}.png"


def plot_schedule(budgets: Sequence[int], lr: float, lr_decay: float):
    """The one schedule every cell trains on: the trunk at the full rate and each budget's
    cooldown branch, the learning rate against tokens seen."""
    import matplotlib.pyplot as plt

    from .schedule import learning_rates

    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, (tokens, rates) in enumerate(learning_rates(list(budgets), lr, lr_decay)):
        tokens = [max(t, budgets[0] / 4) for t in tokens]  # the trunk from step 0, on a log axis
        ax.plot(tokens, rates, color="0.2" if i == 0 else "C0", lw=2.2 if i == 0 else 1.4,
                label="trunk (no decay)" if i == 0 else ("cooldown branches" if i == 1 else None))
        if i:
            ax.plot(tokens[-1:], [0], marker="o", color="C0", ms=5)
    ax.set_xscale("log")
    ax.set_xticks(list(budgets))
    ax.set_xticklabels([_budget_label(b) for b in budgets])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="token budget", ylabel="learning rate", ylim=(-0.05 * lr, 1.15 * lr),
           title=f"{len(budgets)} budgets from one run; dot: the cell at that budget")
    ax.legend(fontsize=8, loc="center left")
    return fig


# one marker language in every figure: filled = read after the cooldown at that budget (the
# verdict's reading); hollow = on the trunk, no cooldown, or a moved outcome in Figure 4; a cross
# over a marker = flagged by the quality gate
LEGEND_FILLED = "filled: after the cooldown at that budget"
LEGEND_HOLLOW = "hollow: on the trunk (no cooldown)"
LEGEND_FLAGGED = "x: a cell flagged by the quality gate"


def _marker_legend(ax, flagged: bool, trunk_line: bool = False) -> None:
    """A second legend, outside the panel at its lower right, that says what every marker means
    (``trunk_line``: the trunk is drawn as a line, not as hollow markers)."""
    import matplotlib.pyplot as plt

    trunk = (plt.Line2D([], [], color="0.3", ls="-"), "lines: the trunk (no cooldown)") if trunk_line else \
        (plt.Line2D([], [], color="0.3", marker="o", mfc="white", ls=""), LEGEND_HOLLOW)
    items = [(plt.Line2D([], [], color="0.3", marker="o", ls=""), LEGEND_FILLED), trunk]
    if flagged:
        items.append((plt.Line2D([], [], color="0.3", marker="x", ms=9, ls=""), LEGEND_FLAGGED))
    from matplotlib.legend import Legend

    ax.add_artist(Legend(ax, *zip(*items), fontsize=7, loc="lower left", bbox_to_anchor=(1.02, 0.0),
                         framealpha=0.9))  # beside the axes' own legend, not in its place


def _budget_label(t: float) -> str:
    """A budget as a tick label: '0.2 M', '16 M', '12.8 k'."""
    return f"{t / 1e6:.2g} M" if t >= 1e5 else f"{t / 1e3:.3g} k"


def plot_trajectories(curves, ends, chance: dict, metric: str, preprocessing: Sequence[str],
                      configurations: Sequence[str], flagged: Iterable[tuple[str, str]] = (),
                      model: str = ""):
    """Figure 1: inter-run distance against tokens seen along the trunk (no cooldown), one panel
    per preprocessing, with a 95% band over runs; filled markers: each budget after its cooldown
    (``ends``: budget_curves rows, Hungarian only); the reproducibility of k-means and random
    dictionaries as grey references. ``model`` names the activations' model in the title."""
    import matplotlib.pyplot as plt

    label = {"mean_min": "symmetric mean-min cosine distance",
             "hungarian": "Hungarian-matched cosine distance"}[metric]
    fig, axes = plt.subplots(1, len(preprocessing), figsize=(6.0 * len(preprocessing) + 2.6, 4.8),
                             sharey=True, squeeze=False)
    flagged = set(flagged)
    for ax, prep in zip(axes[0], preprocessing):
        for kind, ls in (("random", (0, (6, 3))), ("kmeans", (0, (1, 2)))):
            if (prep, metric, kind) in chance:
                ax.axhline(chance[prep, metric, kind], color="0.45", ls=ls, lw=1.4, zorder=1,
                           label="random dictionaries" if kind == "random"
                           else "k-means with two seeds (reproducibility)")
        for name in configurations:
            c = curves[(curves.configuration == name) & (curves.preprocessing == prep)
                       & (curves.metric == metric)]
            color, ls, marker = STYLES[name]
            ax.fill_between(c.tokens, c.lo, c.hi, color=color, alpha=0.2, lw=0, zorder=2)
            ax.plot(c.tokens, c["mean"], color=color, ls=ls, lw=1.6, zorder=3, label=name)
            if metric == "hungarian":
                e = ends[(ends.configuration == name) & (ends.preprocessing == prep) & (ends.reading == "branch")]
                ax.plot(e.tokens, e["mean"], color=color, marker=marker, ms=6, ls="", zorder=4)
                if (name, prep) in flagged:
                    ax.plot(e.tokens.tail(1), e["mean"].tail(1), color="0.1", marker="x", ms=10, ls="", zorder=5)
        ax.set_xscale("symlog", linthresh=max(1, int(curves.tokens[curves.tokens > 0].min())))
        ax.set_xlim(left=0)
        ax.set(title=f"{prep} activations", xlabel="tokens seen",
               ylabel=label + "\n(lower: runs agree more)")
    fig.suptitle(model)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    axes[0][-1].legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    if metric == "hungarian":
        _marker_legend(axes[0][-1], bool(flagged), trunk_line=True)
    return fig


def plot_verdict_over_budgets(rows, preprocessing: Sequence[str], margin: float,
                              flagged: Iterable[tuple[str, str]] = (), model: str = ""):
    """Figure 3: every comparison's difference (Hungarian, archetypal minus reference) against the
    budget, one row of panels per kind of comparison and one column per preprocessing: filled
    markers and solid lines after the cooldown (the verdict's reading), hollow markers and dotted
    lines on the trunk; 95% bands over runs; the margin as a grey band; each comparison in its
    archetypal configuration's colour with its reference's marker."""
    import matplotlib.pyplot as plt

    from matplotlib.ticker import NullFormatter

    kinds = list(dict.fromkeys(rows.comparison)) if len(rows) else ["against topk-random"]
    fig, axes = plt.subplots(len(kinds), len(preprocessing),
                             figsize=(6.0 * len(preprocessing) + 3.2, 4.0 * len(kinds)),
                             sharex=True, squeeze=False)
    flagged = set(flagged)
    for row_ax, kind in zip(axes, kinds):
        for ax, prep in zip(row_ax, preprocessing):
            ax.axhspan(-margin, margin, color="0.88", zorder=0, lw=0, label=f"margin +-{margin:g}")
            ax.axhline(0, color="0.3", lw=1)
            sub = rows[(rows.comparison == kind) & (rows.preprocessing == prep)] if len(rows) else rows
            for (c, ref), g in sub.groupby(["challenger", "reference"], sort=False):
                color, marker = STYLES[c][0], STYLES[ref][2]  # the challenger's colour, the reference's marker
                lab = f"{c} - {ref}"
                for reading, ls, fill in (("trunk", ":", "white"), ("branch", "-", color)):  # filled on top
                    r = g[g.reading == reading].sort_values("tokens")
                    if reading == "branch":
                        ax.fill_between(r.tokens, r.lo, r.hi, color=color, alpha=0.18, lw=0)
                    ax.plot(r.tokens, r.difference, color=color, ls=ls, lw=1.5, marker=marker, ms=6,
                            mfc=fill, label=lab if reading == "branch" else None)
                if (c, prep) in flagged or (ref, prep) in flagged:
                    last = g[g.reading == "branch"].sort_values("tokens").tail(1)
                    ax.plot(last.tokens, last.difference, color="0.1", marker="x", ms=10, ls="")
            ax.set_xscale("log", base=2)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set(title=f"{kind}, {prep} activations",
                   ylabel="Hungarian distance:\narchetypal minus reference\n(below 0: archetypal closer)")
        handles, labels = row_ax[-1].get_legend_handles_labels()
        if handles:
            row_ax[-1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        _marker_legend(row_ax[-1], bool(flagged))
    for ax in axes[-1]:
        ax.set_xlabel("token budget")
        ticks = sorted(rows.tokens.unique()) if len(rows) else []
        ax.set_xticks(ticks)
        ax.set_xticklabels([_budget_label(t) for t in ticks], fontsize=8)
    fig.suptitle(model)
    return fig


def plot_forest(rows, preprocessing: Sequence[str], margin: float, model: str = ""):
    """Figure 4: the Hungarian test differences of every variant at its largest budget (the
    profile's own on top), one row per variant and comparison, 95% intervals, the margin as a grey
    band; filled where the outcome is the profile's, hollow where it moved, a cross where the
    comparison is not settled at that budget (``rows.settled`` False)."""
    import matplotlib.pyplot as plt

    rows = rows[rows.metric == "hungarian"]
    variants = list(dict.fromkeys(rows.variant))
    keys = list(dict.fromkeys(zip(rows.comparison, rows.challenger, rows.reference)))
    n = len(variants) * len(keys)
    fig, axes = plt.subplots(1, len(preprocessing), figsize=(6.0 * len(preprocessing) + 1.5, 1.6 + 0.24 * n),
                             sharey=True, squeeze=False)
    labels = [f"{v} · {c} - {ref}" for v in variants for cmp, c, ref in keys]
    for ax, prep in zip(axes[0], preprocessing):
        ax.axvspan(-margin, margin, color="0.88", zorder=0, lw=0)
        ax.axvline(0, color="0.3", lw=1)
        for i, v in enumerate(variants):
            for j, (cmp, c, ref) in enumerate(keys):
                r = rows[(rows.variant == v) & (rows.comparison == cmp) & (rows.challenger == c)
                         & (rows.reference == ref) & (rows.preprocessing == prep)]
                if r.empty:
                    continue
                r = r.iloc[0]
                y = n - 1 - (i * len(keys) + j)
                color, _, marker = STYLES[c]
                ax.errorbar([r.difference], [y], xerr=[[r.difference - r.lo], [r.hi - r.difference]],
                            color=color, marker=marker, ms=6, capsize=2, ls="",
                            mfc=color if r.holds else "white")
                if "settled" in r and r.settled is False:
                    ax.plot([r.difference], [y], color="0.1", marker="x", ms=9, ls="")
            if i:
                ax.axhline(n - 0.5 - i * len(keys), color="0.7", lw=0.6)
        ax.set(title=f"{prep} activations", xlabel="Hungarian distance: archetypal minus reference\n"
               "(below 0: archetypal closer; grey: within the margin)")
    axes[0][0].set_yticks(range(n))
    axes[0][0].set_yticklabels(labels[::-1], fontsize=7)
    items = [(plt.Line2D([], [], color="0.3", marker="o", ls=""), "filled: the profile's outcome"),
             (plt.Line2D([], [], color="0.3", marker="o", mfc="white", ls=""), "hollow: the outcome moved"),
             (plt.Line2D([], [], color="0.1", marker="x", ms=9, ls=""), "x: not settled at the largest budget")]
    axes[0][-1].legend(*zip(*items), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(model)
    fig.tight_layout()
    return fig
