"""Figures of the gradient probes: per-sample gradient norms (``gradnorm``,
``gradnorm_samples``, Figs. 3, A.9), gradient stability along directions (``stability``,
Figs. 4(a), A.8) and between epochs (``gradcos``, Fig. 4(b))."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from atprobe.errors import AtprobeError
from atprobe.plot.core import (
    PALETTE,
    PAPER,
    Data,
    _data,
    _dirs,
    _empty,
    _epoch_axis,
    _figure,
    _figure_legend,
    _lines,
    _log_if_wide,
    _log_ticks,
    _named,
    _num,
    _order,
    _palette,
    _series,
    _short,
    _sns,
    _style,
    _title,
    register,
)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


# the gradients drawn, in this order; a ratio is drawn in its numerator's colour
GRADS = {"grad_ce": "CE(x)", "grad_adv_ce": "CE(x')", "grad_r": "R", "grad_beta_kl": "β·KL"}
RATIOS = {"ratio_r_ce": "grad_r", "ratio_beta_kl_ce": "grad_beta_kl"}
GRAD_LEGEND = "gradient of"


def _epochs_vary(df: pd.DataFrame) -> bool:
    return "epoch" in df.columns and df["epoch"].notna().all() and df["epoch"].nunique() > 1


@register("gradnorm", ("checkpoint", "epoch", "group", "quantity", "statistic", "n", "value"),
          "atprobe gradnorm's summary: mean per-sample gradient norms and their ratios per checkpoint, "
          "over epochs for several (Figs. 3, A.9)")
def gradnorm(data: Data, *, title: str | None = None) -> Figure:
    """Left: mean per-sample gradient norm of each part of the objectives (± std over samples,
    log scale); right: robust term / clean CE (ratio of the means, as in the paper; a ratio is
    drawn in its robust term's colour). Lines over the checkpoints' epochs when they have several,
    else bars per checkpoint; groups (all/clean/noisy) and runs as dashes or bar colours."""
    sns = _sns()
    df = _num(_data(data, "gradnorm"), ["epoch", "n", "value"], "gradnorm")
    df["quantity"] = df["quantity"].astype(str)
    df = df[df["quantity"].isin([*GRADS, *RATIOS])]
    if df.empty:
        raise AtprobeError(f"gradnorm: no rows with a quantity among {', '.join([*GRADS, *RATIOS])}")
    keys = [c for c in ("source", "checkpoint", "epoch", "split", "labels", "group", "quantity") if c in df.columns]
    wide = df.pivot_table(index=keys, columns="statistic", values="value", aggfunc="first",
                          dropna=False, sort=False).reset_index()
    for stat in ("mean", "std", "ratio_of_means"):
        if stat not in wide.columns:
            wide[stat] = np.nan
    wide["y"] = np.where(wide["quantity"].isin(list(RATIOS)), wide["ratio_of_means"].fillna(wide["mean"]),
                         wide["mean"])
    wide = wide.dropna(subset=["y"])
    wide[GRAD_LEGEND] = wide["quantity"].map({**GRADS, **{r: GRADS[g] for r, g in RATIOS.items()}})
    over_epochs = _epochs_vary(wide)
    wide["ck"] = _dirs(wide["checkpoint"]) if over_epochs else _short(wide["checkpoint"])
    header, wide["_s"] = _series(wide, [("run", "source"), ("checkpoint", "ck"), ("split", "split"),
                                        ("labels", "labels"), ("group", "group")])
    if over_epochs:
        wide = wide.drop_duplicates(["_s", "epoch", "quantity"])
    grad_order = [GRADS[q] for q in GRADS if q in set(wide["quantity"])]
    palette = _palette(list(GRADS.values()))
    with _style():
        fig, axes = _figure(2, (12, 4.4))
        for ax, panel in zip(axes, ("norms", "ratios")):
            part = wide[wide["quantity"].isin(GRADS if panel == "norms" else RATIOS)].copy()
            if part.empty:
                _empty(ax, "gradient norms" if panel == "norms" else "ratios")
                continue
            if over_epochs:
                if header:
                    part = _named(part, "_s", header)
                _lines(ax, part, "epoch", "y", GRAD_LEGEND, err="std" if panel == "norms" else None,
                       style=header or None, palette=palette, positive=True)  # the norms' axis is log
                ax.set_xlabel("epoch of the checkpoint")
                _epoch_axis(ax)
            else:
                hue = header if header else GRAD_LEGEND
                part = _named(part, "_s", header) if header else part
                order = [g for g in grad_order if g in set(part[GRAD_LEGEND])]
                levels = order if hue == GRAD_LEGEND else _order(part[hue])
                sns.barplot(data=part, x=GRAD_LEGEND, y="y", order=order, hue=hue, hue_order=levels,
                            palette=palette if hue == GRAD_LEGEND else PALETTE, errorbar=None, ax=ax,
                            legend=bool(header))
                if panel == "norms":
                    _bar_errors(ax, part, order, hue, levels)
                ax.set_xlabel("gradient of" if panel == "norms" else "robust term (its norm ÷ ‖∇CE(x)‖)")
            if panel == "norms":
                ax.set_yscale("log")
                ax.set_ylabel("mean per-sample ‖∇θ loss‖₂ (log scale)")
                ax.set_title("gradient norms (mean ± std over samples)")
            else:
                _log_if_wide(ax, part["y"])
                ax.set_ylabel("ratio of the mean norms (dimensionless)")
                ax.set_title("robust term / clean CE: R / CE(x), β·KL / CE(x)")
            _log_ticks(ax)
        _figure_legend(fig, axes)
        _title(fig, title, f"Per-sample gradient norms (cf. {PAPER}, Figs. 3, A.9)")
    return fig


def _bar_errors(ax: Axes, part: pd.DataFrame, order: list, hue: str, levels: list) -> None:
    """± std whiskers on seaborn's bars: a bar's category from its position on the x axis, its
    hue level from its container's place (seaborn draws one container per level of
    ``hue_order``, in that order; the containers' labels are not the levels)."""
    from matplotlib.container import BarContainer

    for cont, level in zip([c for c in ax.containers if isinstance(c, BarContainer)], levels):
        g = part[part[hue].astype(str) == str(level)]
        for bar in cont.patches:
            i = int(round(bar.get_x() + bar.get_width() / 2))
            rows = g[g[GRAD_LEGEND] == order[i]] if 0 <= i < len(order) else g.iloc[:0]
            if len(rows) != 1:
                continue
            m, sd = float(rows["y"].iloc[0]), float(rows["std"].iloc[0])
            if np.isfinite(m) and np.isfinite(sd) and m > 0:
                cx = bar.get_x() + bar.get_width() / 2
                ax.errorbar(cx, m, yerr=[[min(sd, 0.95 * m)], [sd]], color="0.2", capsize=3, linewidth=1)


@register("gradnorm_samples", ("checkpoint", "epoch", "sample", "label", "true_label", "noisy", "grad_ce"),
          "atprobe gradnorm --per-sample's .samples.csv: distribution of the per-sample gradient norms "
          "and ratios (Figs. 3, A.9)")
def gradnorm_samples(data: Data, *, title: str | None = None) -> Figure:
    """Box plots (median, quartiles, 1.5 IQR whiskers) of the per-sample gradient norms (left)
    and ratios (right) of each part, log scale; colour = checkpoint (its epoch) and clean vs
    noisy samples when both occur."""
    sns = _sns()
    df = _data(data, "gradnorm_samples")
    cols = [c for c in (*GRADS, *RATIOS) if c in df.columns]
    df = _num(df, ["epoch", *cols], "gradnorm_samples")
    epochs_name = df.groupby("checkpoint")["epoch"].nunique().le(1).all() and df["epoch"].notna().all()
    if epochs_name and _epochs_vary(df):
        dirs = _dirs(df["checkpoint"])
        df["ck"] = ((dirs + " " if dirs.nunique() > 1 else "") + "epoch " + df["epoch"].astype(int).astype(str))
    else:
        df["ck"] = _short(df["checkpoint"])
    df["samples"] = np.where(df["noisy"].astype(str).str.lower().isin(["true", "1", "1.0"]), "noisy", "clean")
    header, df["_s"] = _series(df, [("run", "source"), ("checkpoint", "ck"), ("split", "split"),
                                    ("labels", "labels"), ("samples", "samples")])
    # hue levels in checkpoint order, clean before noisy; a light/dark pair per checkpoint
    paired = header.endswith("samples") and df["samples"].nunique() > 1 and df["_s"].nunique() <= 12
    levels = df.assign(_ck=df["_s"].str.rsplit(" | ", n=1).str[0] if paired else df["_s"])
    ck_order = _order(levels["_ck"])
    hue_order = sorted(_order(df["_s"]), key=lambda v: (ck_order.index(v.rsplit(" | ", 1)[0]) if paired else 0,
                                                        v.endswith("noisy")))
    palette = (dict(zip(hue_order, sns.color_palette("Paired", len(hue_order)))) if paired
               else _palette(hue_order))
    long = df.melt(id_vars=["_s"], value_vars=cols, var_name="quantity", value_name="v").dropna(subset=["v"])
    long[GRAD_LEGEND] = long["quantity"].map({**GRADS, **{r: GRADS[g] + " / CE(x)" for r, g in RATIOS.items()}})
    if header:
        long = _named(long, "_s", header)
    n = df.groupby("_s").size()
    per_box = f"{int(n.iloc[0])} samples" if n.nunique() == 1 else f"{int(n.min())}-{int(n.max())} samples"
    with _style():
        fig, axes = _figure(2, (12, 4.4), width_ratios=(2, 1))
        for ax, names, panel in ((axes[0], GRADS, "norms"), (axes[1], RATIOS, "ratios")):
            part = long[long["quantity"].isin(list(names)) & (long["v"] > 0)]
            if part.empty:
                _empty(ax, "gradient norms" if panel == "norms" else "ratios")
                continue
            with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib 3.11's deprecated `vert`
                warnings.filterwarnings("ignore", message=".*vert: bool.*")
                sns.boxplot(data=part, x=GRAD_LEGEND, y="v", hue=header or None,
                            hue_order=hue_order if header else None, palette=palette if header else None,
                            color=None if header else sns.color_palette(PALETTE)[0], log_scale=True,
                            fliersize=2, linewidth=1, ax=ax)
            ax.set_xlabel("gradient of")
            if panel == "norms":
                ax.set_ylabel("per-sample ‖∇θ loss‖₂ (log scale)")
                ax.set_title(f"per-sample gradient norms ({per_box} per box)")
            else:
                ax.set_ylabel("per-sample ratio (dimensionless, log scale)")
                ax.set_title("robust term / clean CE")
            _log_ticks(ax)
        _figure_legend(fig, axes)
        _title(fig, title, f"Per-sample gradient norms (cf. {PAPER}, Figs. 3, A.9)")
    return fig


@register("stability", ("loss", "direction", "lam", "dist_mean", "dist_std", "cos_mean", "cos_std"),
          "atprobe stability: gradient L2 change and cosine against the step lam along random directions, "
          "per loss (Figs. 4(a), A.8)")
def stability(data: Data, *, title: str | None = None) -> Figure:
    """Left: ``||grad J(theta + lam d) - grad J(theta)||``; right: the cosine of the two, against
    lam; colour = loss, dashes = checkpoint/run. Line: mean over samples (and over directions
    when there are several); band: ± the std over samples (averaged over directions)."""
    df = _num(_data(data, "stability"), ["direction", "lam", "dist_mean", "dist_std", "cos_mean", "cos_std"],
              "stability")
    df["ck"] = _short(df["checkpoint"]) if "checkpoint" in df.columns else ""
    header, df["_s"] = _series(df, [("run", "source"), ("checkpoint", "ck"), ("split", "split"),
                                    ("labels", "labels")])
    ndirs = df.groupby(["_s", "loss"])["direction"].nunique()
    ndir = int(ndirs.max())
    agg = (df.groupby(["_s", "loss", "lam"], sort=False)[["dist_mean", "dist_std", "cos_mean", "cos_std"]]
             .mean().reset_index())
    if header:
        agg = _named(agg, "_s", header)
    losses = _order(agg["loss"])
    over = ("samples" if ndir == 1 else f"samples and {ndir} directions" if ndirs.nunique() == 1
            else f"samples and up to {ndir} directions")
    with _style():
        fig, axes = _figure(2, (12, 4.4))
        for ax, y, err, ylabel, ttl in (
                (axes[0], "dist_mean", "dist_std", "‖∇θJ(θ+λd) − ∇θJ(θ)‖₂", "gradient change (L2 distance)"),
                (axes[1], "cos_mean", "cos_std", "cos(∇θJ(θ+λd), ∇θJ(θ))", "gradient cosine similarity")):
            _lines(ax, agg, "lam", y, "loss", err=err, style=header or None, palette=_palette(losses))
            ax.set_xlabel("step λ along d (relative to each filter's norm)")
            ax.set_ylabel(f"{ylabel}\n(mean over {over})")
            ax.set_title(f"{ttl}, band ± std over samples", fontsize="medium")
            ax.axvline(0.0, color="0.5", linewidth=0.8, linestyle=":")
        axes[1].set_ylim(top=1.003)
        axes[0].set_ylim(bottom=max(axes[0].get_ylim()[0], 0.0))  # a distance: the ± std band stops at 0
        _figure_legend(fig, axes)
        _title(fig, title, f"Gradient stability along random directions (cf. {PAPER}, Figs. 4(a), A.8)")
    return fig


@register("gradcos", ("pair", "epoch_a", "epoch_b", "loss", "cos_mean", "cos_std", "dist_mean", "dist_std"),
          "atprobe gradcos: cosine and L2 distance between per-sample gradients of successive epochs (Fig. 4(b))")
def gradcos(data: Data, *, title: str | None = None) -> Figure:
    """Left: mean cosine between the per-sample gradients of epochs t and t+1 (± std over
    samples), against t+1; right: their mean L2 distance. Colour = run (or loss)."""
    df = _num(_data(data, "gradcos"), ["pair", "epoch_a", "epoch_b", "cos_mean", "cos_std", "dist_mean",
                                       "dist_std"], "gradcos")
    if df["epoch_b"].notna().all():
        x, xlabel = "epoch_b", "epoch t+1 (gradients at epochs t and t+1 compared)"
    else:
        x, xlabel = "pair", "pair of successive checkpoints (0-based)"
    df["ck"] = _dirs(df["checkpoint_b"]) if "checkpoint_b" in df.columns else ""
    header, df["_s"] = _series(df, [("run", "source"), ("checkpoints in", "ck"), ("split", "split"),
                                    ("labels", "labels"), ("loss", "loss", True)])
    if header:
        df = _named(df, "_s", header)
    hue = header or "loss"
    with _style():
        fig, axes = _figure(2, (12, 4.4))
        for ax, y, err, ylabel, ttl in (
                (axes[0], "cos_mean", "cos_std", "cos(∇θJ(θₜ), ∇θJ(θₜ₊₁))", "gradient cosine between epochs"),
                (axes[1], "dist_mean", "dist_std", "‖∇θJ(θₜ₊₁) − ∇θJ(θₜ)‖₂", "gradient change between epochs")):
            _lines(ax, df, x, y, hue, err=err)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{ylabel}\n(mean over samples)")
            ax.set_title(f"{ttl}, band ± std over samples", fontsize="medium")
            _epoch_axis(ax)
        axes[0].set_ylim(top=1.003)
        axes[1].set_ylim(bottom=max(axes[1].get_ylim()[0], 0.0))  # a distance: the ± std band stops at 0
        if not header:
            axes[0].set_title(f"{axes[0].get_title()} (loss {df['loss'].iloc[0]})", fontsize="medium")
        _figure_legend(fig, axes)
        _title(fig, title, f"Gradient cosine between successive epochs (cf. {PAPER}, Fig. 4(b))")
    return fig
