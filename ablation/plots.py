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

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, (tokens, rates) in enumerate(learning_rates(list(budgets), lr, lr_decay)):
        ax.plot(tokens, rates, color="0.2" if i == 0 else "C0", lw=2.2 if i == 0 else 1.4,
                label="trunk (no decay)" if i == 0 else ("cooldown branches" if i == 1 else None))
        if i:
            ax.plot(tokens[-1:], [0], marker="o", color="C0", ms=5)
    ax.set_xscale("log")
    ax.set(xlabel="tokens seen", ylabel="learning rate", ylim=(-0.05 * lr, 1.15 * lr),
           title=f"{len(budgets)} budgets from one run; dot: the cell at that budget")
    ax.legend(fontsize=8, loc="lower left")
    return fig


def plot_trajectories(curves, chance: dict, metric: str, preprocessing: Sequence[str],
                      configurations: Sequence[str], flagged: Iterable[tuple[str, str]] = (),
                      model: str = ""):
    """Figure 1: inter-run distance against tokens seen, one panel per preprocessing, each cell's
    line to its own end, with a tick where it was judged converged (its last full-rate snapshot);
    ``model`` names the activations' model in every title."""
    import matplotlib.pyplot as plt

    label = {"mean_min": "symmetric mean-min cosine distance",
             "hungarian": "Hungarian-matched cosine distance"}[metric]
    fig, axes = plt.subplots(1, len(preprocessing), figsize=(6.5 * len(preprocessing), 4.8),
                             sharey=True, squeeze=False)
    flagged = set(flagged)
    for ax, prep in zip(axes[0], preprocessing):
        for kind, ls in (("random", (0, (6, 3))), ("kmeans", (0, (1, 2)))):
            if (prep, metric, kind) in chance:
                ax.axhline(chance[prep, metric, kind], color="0.45", ls=ls, lw=1.4, zorder=1,
                           label="chance: random dictionaries (dashed)" if kind == "random"
                           else "chance: independent k-means (dotted)")
        for name in configurations:
            c = curves[(curves.configuration == name) & (curves.preprocessing == prep)
                       & (curves.metric == metric)]
            color, ls, marker = STYLES[name]
            ax.fill_between(c.tokens, c.lo, c.hi, color=color, alpha=0.25, lw=0, zorder=2)
            ax.plot(c.tokens, c["mean"], color=color, ls=ls, marker=marker, ms=4, lw=1.8, zorder=3,
                    label=name, mfc="white" if (name, prep) in flagged else color)
        ax.set_xscale("symlog", linthresh=max(1, int(curves.tokens[curves.tokens > 0].min())))
        ax.set_xlim(left=0)
        ax.set(title=f"{prep} activations", xlabel="tokens seen",
               ylabel=label + "\n(lower: runs agree more)")
    fig.suptitle(model)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if flagged:
        handles.append(plt.Line2D([], [], color="0.3", marker="o", mfc="white", ls=""))
        labels.append("hollow markers: flagged by the quality gate")
    axes[0][-1].legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def plot_tests_over_training(rows, preprocessing: Sequence[str], margin: float, model: str = ""):
    """The verdict over training, Hungarian, one row of panels per test: the endpoint difference
    against TopK from random starts, the same against TopK from the same start (the constraint's
    own effect), and the change since step 0 against TopK from random starts; archetypal minus
    TopK against tokens seen, 95% bands, the margin as a grey band; dotted past the end of the cell
    that converged first (held at its convergence); the end of both cells at the right, and again
    in an inset at a scale where the margin and the end intervals are visible. ``model`` names
    the activations' model in every title."""
    import matplotlib.pyplot as plt

    from matplotlib.ticker import NullFormatter

    panels = (("falsification", "against topk-random", "distance: archetypal minus topk-random"),
              ("falsification", "matched start", "distance: archetypal minus TopK\nfrom the same start"),
              ("stabilization", "against topk-random", "change since step 0:\narchetypal minus topk-random"))
    fig, axes = plt.subplots(len(panels), len(preprocessing), figsize=(6.5 * len(preprocessing), 12),
                             sharex=True, squeeze=False)
    for row_ax, (test, comparison, what) in zip(axes, panels):
        for ax, prep in zip(row_ax, preprocessing):
            ax.axhspan(-margin, margin, color="0.85", zorder=0, lw=0)
            ax.axhline(0, color="0.3", lw=1)
            sub = rows[(rows.test == test) & (rows.comparison == comparison)
                       & (rows.preprocessing == prep)] if not rows.empty else rows
            if sub.empty:
                ax.text(0.5, 0.5, f"no comparison '{comparison}'\nin this grid", ha="center",
                        va="center", transform=ax.transAxes)
                continue
            for name in sub.challenger.unique():
                c = sub[sub.challenger == name]
                color, ls, marker = STYLES[name]
                run, held, end = (c[c.stage == st] for st in ("full rate", "held", "end"))
                ax.fill_between(run.tokens, run.lo, run.hi, color=color, alpha=0.25, lw=0)
                ax.plot(run.tokens, run.difference, color=color, ls="-", lw=1.8, label=name)
                if len(held):
                    held = c[c.stage != "end"].iloc[len(run) - 1:]  # continue from the last shared point
                    ax.fill_between(held.tokens, held.lo, held.hi, color=color, alpha=0.12, lw=0)
                    ax.plot(held.tokens, held.difference, color=color, ls=":", lw=1.8)
                ax.errorbar(end.tokens, end.difference, yerr=[end.difference - end.lo, end.hi - end.difference],
                            color=color, marker=marker, ms=7, capsize=3, ls="")
            ends = sub[sub.stage == "end"]
            ins = ax.inset_axes([0.70, 0.06, 0.28, 0.34])
            ins.axhspan(-margin, margin, color="0.85", lw=0)
            ins.axhline(0, color="0.3", lw=0.8)
            for i, name in enumerate(ends.challenger.unique()):
                e = ends[ends.challenger == name].tail(1)
                color, _, marker = STYLES[name]
                ins.errorbar([i], e.difference, yerr=[e.difference - e.lo, e.hi - e.difference],
                             color=color, marker=marker, ms=5, capsize=2, ls="")
            reach = max(1.5 * margin, float(ends[["lo", "hi"]].abs().max().max()) * 1.1)
            ins.set(ylim=(-reach, reach), xlim=(-0.6, max(len(ends.challenger.unique()), 1) - 0.4),
                    xticks=[], title="ends", facecolor="white")
            ins.title.set_fontsize(8)
            ins.tick_params(labelsize=7)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set(title=f"{test}, {comparison}, {prep} activations",
                   ylabel=f"{what}\n(below 0: archetypal closer)")
            ax.legend(fontsize=8, loc="best")
    for ax in axes[-1]:
        ax.set_xlabel("tokens seen")
    fig.text(0.5, -0.01, f"grey band: the margin +-{margin:g}; dotted: the cell that converged "
             "first, held at its convergence; markers: both cells' ends, after the final decay",
             ha="center", fontsize=9)
    fig.suptitle(model)
    return fig


def plot_forest(rows, preprocessing: Sequence[str], margin: float, model: str = ""):
    """Figure 4: the Hungarian test differences of every variant (the profile's own on top), one
    row per variant and comparison, 95% intervals, the margin as a grey band; a filled marker
    where the outcome is the profile's, hollow where it moved."""
    import matplotlib.pyplot as plt

    rows = rows[rows.metric == "hungarian"]
    variants = list(dict.fromkeys(rows.variant))
    keys = list(dict.fromkeys(zip(rows.comparison, rows.challenger)))
    n = len(variants) * len(keys)
    fig, axes = plt.subplots(1, len(preprocessing), figsize=(6.5 * len(preprocessing), 1.0 + 0.22 * n),
                             sharey=True, squeeze=False)
    labels = [f"{v} · {c} ({cmp})" for v in variants for cmp, c in keys]
    for ax, prep in zip(axes[0], preprocessing):
        ax.axvspan(-margin, margin, color="0.85", zorder=0, lw=0)
        ax.axvline(0, color="0.3", lw=1)
        for i, v in enumerate(variants):
            for j, (cmp, c) in enumerate(keys):
                r = rows[(rows.variant == v) & (rows.comparison == cmp) & (rows.challenger == c)
                         & (rows.preprocessing == prep)]
                if r.empty:
                    continue
                r = r.iloc[0]
                y = n - 1 - (i * len(keys) + j)
                color, _, marker = STYLES[c]
                ax.errorbar([r.difference], [y], xerr=[[r.difference - r.lo], [r.hi - r.difference]],
                            color=color, marker=marker, ms=6, capsize=2, ls="",
                            mfc=color if r.holds else "white")
            if i:
                ax.axhline(n - 0.5 - i * len(keys), color="0.7", lw=0.6)
        ax.set(title=f"{prep} activations", xlabel="Hungarian distance: archetypal minus TopK\n"
               "(below 0: archetypal closer; grey: within the margin)")
    axes[0][0].set_yticks(range(n))
    axes[0][0].set_yticklabels(labels[::-1], fontsize=7)
    fig.suptitle(model)
    fig.tight_layout()
    return fig
