"""Figures of ``atprobe hardness``: the per-sample adversarial loss sorted by the first model's
(``hardness``, Fig. 7(c)) and the consistency heatmaps (``hardness_consistency``, Sec. 4.1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from atprobe.plot.core import (Data, PAPER, _data, _figure, _num, _order, _sns, _style, _title, register)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


@register("hardness", ("index", "label", "true_label", "model", "adv_loss", "adv_correct", "rank"),
          "atprobe hardness's per_sample.csv: every model's adversarial loss per sample, sorted by the first "
          "model's (Fig. 7(c))")
def hardness_sorted(data: Data, *, title: str | None = None) -> "Figure":
    """The hardness probe's own Fig. 7(c) drawing (``atprobe.probes.hardness.sorted_loss_figure``):
    the samples sorted by the first model's adversarial loss (a line), the other models' losses
    as points; a log loss axis when the losses span decades. Several CSVs: models are prefixed
    with their file's name (the tables must hold the same samples)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from atprobe.probes import hardness

    df = _num(_data(data, "hardness"), ["index", "adv_loss", "rank"], "hardness")
    if df["source"].astype(str).nunique() > 1:
        df["model"] = df["source"].astype(str) + ": " + df["model"].astype(str)
    loss = df["adv_loss"].to_numpy(dtype=float)
    loss = loss[np.isfinite(loss)]
    log = bool(loss.size and (loss > 0).all() and np.log10(loss.max() / loss.min()) > 1.5)
    fig = hardness.sorted_loss_figure(df, log=log)
    FigureCanvasAgg(fig)
    models = df["model"].nunique()
    fig.axes[0].set_title(title if title is not None else
                          f"Per-sample adversarial loss of {models} model{'s' if models > 1 else ''}, sorted by the "
                          f"first\n(cf. {PAPER}, Fig. 7(c))", fontweight="bold")  # one line is wider than the figure
    fig.tight_layout()
    return fig


@register("hardness_consistency", ("model_a", "model_b", "n", "kendall_tau", "spearman_rho", "top_k", "top_k_overlap"),
          "atprobe hardness's consistency.csv: how alike models rank the samples by adversarial loss "
          "(Kendall tau, top-k overlap) as heatmaps (Sec. 4.1)")
def hardness_consistency(data: Data, *, title: str | None = None) -> "Figure":
    """Two symmetric heatmaps over the models: Kendall's tau between their per-sample
    adversarial losses, and the overlap of their k hardest samples (1 on the diagonal)."""
    sns = _sns()
    df = _num(_data(data, "hardness_consistency"), ["n", "kendall_tau", "spearman_rho", "top_k", "top_k_overlap"],
              "hardness_consistency")
    for c in ("model_a", "model_b"):
        df[c] = df[c].astype(str)
        if df["source"].astype(str).nunique() > 1:
            df[c] = df["source"].astype(str) + ": " + df[c]
    models = _order(pd.concat([df["model_a"], df["model_b"]]))
    ks = sorted(set(df["top_k"].dropna().astype(int)))
    size = min(16.0, 3.0 + 0.55 * len(models))
    with _style():
        fig, axes = _figure(2, (2 * size + 1.0, size))
        for ax, col, ttl in ((axes[0], "kendall_tau", "Kendall τ of the adversarial losses"),
                             (axes[1], "top_k_overlap",
                              f"overlap of the {', '.join(map(str, ks))} hardest samples")):
            values = np.full((len(models), len(models)), np.nan)
            np.fill_diagonal(values, 1.0)
            pos = {name: i for i, name in enumerate(models)}
            for a, b, v in zip(df["model_a"], df["model_b"], df[col]):
                values[pos[a], pos[b]] = values[pos[b], pos[a]] = v
            m = pd.DataFrame(values, index=models, columns=models)
            sns.heatmap(m, ax=ax, vmin=-1 if col == "kendall_tau" else 0, vmax=1, cmap="vlag" if col == "kendall_tau"
                        else "mako", annot=len(models) <= 12, fmt=".2f", square=True, cbar_kws={"shrink": 0.8})
            ax.set_title(ttl, fontsize="medium")
            ax.set_xlabel("model")
            ax.set_ylabel("model" if col == "kendall_tau" else "")
            ax.tick_params(axis="y", labelrotation=0)
            ax.tick_params(axis="x", labelrotation=30)
            for t in ax.get_xticklabels():
                t.set_horizontalalignment("right")
        n = sorted(set(df["n"].dropna().astype(int)))
        _title(fig, title, f"Consistency of sample hardness between models, n = {', '.join(map(str, n))} "
                           f"(cf. {PAPER}, Sec. 4.1)")
    return fig
