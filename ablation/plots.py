"""The report's one figure style, its colours per configuration, and Figure 1."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence


# one colour, line style and marker per configuration, told apart in print and by colour-blind readers
STYLES = {
    "topk-random": ("#000000", "-", "o"),
    "topk-kmeans-shared": ("#E69F00", "--", "s"),
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


def plot_trajectories(curves, chance: dict, metric: str, preprocessing: Sequence[str],
                      configurations: Sequence[str], flagged: Iterable[tuple[str, str]] = ()):
    """Figure 1: inter-run distance against tokens seen, one panel per preprocessing."""
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
        ax.set(title=f"{prep} activations", xlabel="tokens seen", ylabel=label + "\n(lower: runs agree more)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if flagged:
        handles.append(plt.Line2D([], [], color="0.3", marker="o", mfc="white", ls=""))
        labels.append("hollow markers: flagged by the quality gate")
    axes[0][-1].legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig
