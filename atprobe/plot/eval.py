"""The figure of ``atprobe eval``: natural and robust accuracy as grouped bars (``eval``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from atprobe.plot.core import (
    PALETTE,
    Data,
    _data,
    _figure,
    _figure_legend,
    _named,
    _num,
    _order,
    _series,
    _short,
    _sns,
    _style,
    _title,
    register,
)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


def _eps_text(norm: str, eps: float) -> str:
    if not np.isfinite(eps) or eps == 0:
        return ""
    k = eps * 255
    value = f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:.4g}"
    return f"{norm} ε={value}" if norm and norm != "none" else f"ε={value}"


@register("eval", ("checkpoint", "split", "attack", "n", "accuracy"),
          "atprobe eval: natural and robust accuracy per checkpoint and attack, as grouped bars")
def eval_bars(data: Data, *, title: str | None = None) -> Figure:
    """Accuracy per attack (x), one bar per checkpoint (colour), its value printed on it."""
    sns = _sns()
    df = _num(_data(data, "eval"), ["n", "accuracy", "loss", "eps"], "eval")
    df["attack"] = df["attack"].astype(str)
    if "eps" in df.columns:
        budgets = df.groupby("attack")["eps"].nunique()
        if (budgets > 1).any():  # the same attack at several radii: say which bar is which
            norm = df["norm"].astype(str) if "norm" in df.columns else pd.Series("", index=df.index)
            df["attack"] = [f"{a}\n{_eps_text(n, e)}" if budgets[a] > 1 else a
                            for a, n, e in zip(df["attack"], norm, df["eps"])]
    df["ck"] = _short(df["checkpoint"])
    header, df["_s"] = _series(df, [("run", "source"), ("checkpoint", "ck"), ("split", "split")])
    if not header:
        header, df["_s"] = "checkpoint", df["ck"]
    df = _named(df, "_s", header)
    attacks, models = _order(df["attack"]), _order(df[header])
    width = min(18.0, max(6.5, 2.5 + len(attacks) * (0.45 * len(models) + 0.5)))
    with _style():
        fig, axes = _figure(1, (width, 4.4))
        ax = axes[0]
        sns.barplot(data=df, x="attack", y="accuracy", hue=header, order=attacks, hue_order=models,
                    palette=PALETTE, errorbar=None, ax=ax)
        if len(attacks) * len(models) <= 40:
            for cont in ax.containers:
                ax.bar_label(cont, fmt="%.3f", fontsize=7, padding=2)
        ax.set_ylim(0, 1.08)
        ax.set_xlabel("attack (natural = clean inputs)")
        ax.set_ylabel("accuracy (fraction of samples)")
        n = sorted(set(df["n"].dropna().astype(int)))
        subtitle = f"{', '.join(_order(df['split'].astype(str)))} split, n = {', '.join(map(str, n))} samples"
        if "eps" in df.columns and "norm" in df.columns:
            budgets = {_eps_text(str(a), e) for a, e in zip(df["norm"], df["eps"])} - {""}
            if len(budgets) == 1:
                subtitle += f", attacks at {budgets.pop()}"
        ax.set_title(subtitle, fontsize="medium")
        _figure_legend(fig, axes)
        _title(fig, title, "Natural and robust accuracy")
    return fig
