"""Figures of the loss-landscape probes: flatness along random directions
(``flatness_curve``, ``flatness``), on a plane (``flatness_plane``) and between two
checkpoints (``flatness_path``), input-space curvature (``curvature_samples``,
``curvature``) and the weight Hessian (``hessian``, ``hessian_density``), Fig. 6."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from atprobe.errors import AtprobeError
from atprobe.plot.core import (
    PALETTE,
    PAPER,
    Data,
    _bars,
    _checkpoint_bars,
    _checkpoint_series,
    _data,
    _empty,
    _figure,
    _figure_legend,
    _lines,
    _log_if_wide,
    _log_ticks,
    _named,
    _num,
    _order,
    _rotate,
    _series,
    _short,
    _sns,
    _style,
    _title,
    register,
)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


@register("flatness_curve", ("direction", "lam", "n", "adv_loss", "adv_acc", "nat_loss", "nat_acc"),
          "atprobe flatness --curve's .curve.csv: adversarial and natural loss and accuracy along random "
          "filter-normalized directions (Fig. 6's flatness; Wu et al. 2020)")
def flatness_curve(data: Data, *, title: str | None = None) -> Figure:
    """Left: loss against the step lam (adversarial solid, natural dashed); right: the
    accuracies. Line: mean over directions; band: ± the std over directions (several)."""
    df = _num(_data(data, "flatness_curve"), ["direction", "lam", "n", "adv_loss", "adv_acc", "nat_loss", "nat_acc"],
              "flatness_curve")
    return _loss_and_accuracy(
        df, "lam", "direction", "step λ along d (relative to each filter's norm)", (0.0,),
        ("loss at θ + λd (PGD re-crafted at every point)", "accuracy at θ + λd"),
        title, f"Weight loss landscape along random directions (cf. {PAPER}, Fig. 6; Wu et al. 2020)")


@register("flatness_path", ("point", "t", "n", "adv_loss", "adv_acc", "nat_loss", "nat_acc"),
          "atprobe flatness --between's table: adversarial and natural loss and accuracy along the path "
          "(1-t) A + t B between two checkpoints, BatchNorm statistics recomputed at every t")
def flatness_path(data: Data, *, title: str | None = None) -> Figure:
    """Left: loss against t (adversarial solid, natural dashed), dotted lines at the
    checkpoints t = 0 (A) and t = 1 (B); right: the accuracies."""
    df = _num(_data(data, "flatness_path"), ["point", "t", "n", "adv_loss", "adv_acc", "nat_loss", "nat_acc"],
              "flatness_path")
    df["_one"] = 0
    return _loss_and_accuracy(
        df, "t", "_one", "t along (1 − t) θ_A + t θ_B (0 = A, 1 = B)", (0.0, 1.0),
        ("loss at θ(t) (PGD re-crafted, BatchNorm statistics recomputed)", "accuracy at θ(t)"),
        title, "Loss along the linear path between two checkpoints (cf. Li et al. 2018; Goodfellow et al. 2015)")


def _loss_and_accuracy(df: pd.DataFrame, x: str, repeat: str, xlabel: str, marks: tuple[float, ...],
                       titles: tuple[str, str], title: str | None, default: str) -> Figure:
    """Loss (left) and accuracy (right) against ``x``, adversarial solid, natural dashed, one
    colour per series (source, checkpoint, split, labels); line: mean over ``repeat``
    (directions), band ± their std when there are several; dotted verticals at ``marks``."""
    df["ck"] = _short(df["checkpoint"]) if "checkpoint" in df.columns else ""
    header, df["_s"] = _series(df, [("run", "source"), ("checkpoint", "ck"), ("split", "split"),
                                    ("labels", "labels")])
    nrep = int(df.groupby("_s")[repeat].nunique().max())
    long = []
    for inputs, prefix in (("adversarial", "adv"), ("natural", "nat")):
        g = df.groupby(["_s", x], sort=False)[[f"{prefix}_loss", f"{prefix}_acc"]]
        stats = g.mean().join(g.std(ddof=0).add_suffix("_std")).reset_index()
        stats.columns = ["_s", x, "loss", "acc", "loss_std", "acc_std"]
        stats["inputs"] = inputs
        long.append(stats)
    long = pd.concat(long, ignore_index=True)
    hue = header or "inputs"
    if header:
        long = _named(long, "_s", header)
    with _style():
        fig, axes = _figure(2, (12, 4.4))
        for ax, y, ylabel in ((axes[0], "loss", "cross-entropy loss (nats)"),
                              (axes[1], "acc", "accuracy (fraction of samples)")):
            _lines(ax, long, x, y, hue, err=f"{y}_std" if nrep > 1 else None, style="inputs",
                   style_order=["adversarial", "natural"])
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel + (f"\n(mean over {nrep} directions, band ± std)" if nrep > 1 else ""))
            for m in marks:
                ax.axvline(m, color="0.5", linewidth=0.8, linestyle=":")
        axes[0].set_title(titles[0], fontsize="medium")
        axes[1].set_title(titles[1], fontsize="medium")
        _figure_legend(fig, axes)
        _title(fig, title, default)
    return fig


@register("flatness_plane", ("pair", "point", "x", "y", "n", "adv_loss", "adv_acc", "nat_loss", "nat_acc"),
          "atprobe flatness --plane's table: adversarial and natural loss over the plane theta + x d1 + y d2 "
          "of two filter-normalized directions (Li et al. 2018's contour; Wu et al. 2020)")
def flatness_plane(data: Data, *, title: str | None = None) -> Figure:
    """One row of panels per plane (source, checkpoint, pair): the contour of the adversarial
    loss (left) and of the natural loss (right) over ``(x, y)``, filled with labelled
    isolines, theta marked at the origin when the grid has it."""
    df = _num(_data(data, "flatness_plane"), ["pair", "point", "x", "y", "n", "adv_loss", "nat_loss"],
              "flatness_plane")
    df["ck"] = _short(df["checkpoint"]) if "checkpoint" in df.columns else ""
    header, df["_s"] = _series(df, [("run", "source"), ("checkpoint", "ck"), ("split", "split"),
                                    ("labels", "labels"), ("pair", "pair", True)])
    planes = list(dict.fromkeys(df["_s"]))
    with _style():
        fig, axes = _figure(2, (11.5, 4.6 * len(planes)), nrows=len(planes))
        for row, plane in enumerate(planes):
            g = df[df["_s"] == plane]
            for col, (loss, inputs) in enumerate((("adv_loss", "adversarial"), ("nat_loss", "natural"))):
                ax = axes[2 * row + col]
                grid = g.pivot_table(index="y", columns="x", values=loss, aggfunc="mean").sort_index()
                grid = grid.reindex(sorted(grid.columns), axis=1)
                if grid.shape[0] < 2 or grid.shape[1] < 2 or grid.isna().any().any():
                    raise AtprobeError("flatness_plane: a contour needs a full grid of at least 2 x 2 points "
                                       f"({plane or 'the plane'} has {grid.shape[1]} x {grid.shape[0]}, "
                                       f"{int(grid.isna().sum().sum())} missing)")
                xs, ys, z = grid.columns.to_numpy(float), grid.index.to_numpy(float), grid.to_numpy(float)
                filled = ax.contourf(xs, ys, z, levels=12, cmap="viridis")
                lines = ax.contour(xs, ys, z, levels=filled.levels, colors="white", linewidths=0.6)
                ax.clabel(lines, fmt="%.3g", fontsize="x-small")
                fig.colorbar(filled, ax=ax, label=f"{inputs} loss (nats)")
                if xs.min() <= 0 <= xs.max() and ys.min() <= 0 <= ys.max():
                    ax.plot([0.0], [0.0], marker="*", color="red", markersize=10, linestyle="none", label="θ")
                ax.set_xlabel("x: step along d1 (relative to each filter's norm)")
                ax.set_ylabel("y: step along d2")
                where = f"{plane}: " if plane else ""
                ax.set_title(f"{where}{inputs} loss at θ + x d1 + y d2", fontsize="medium")
        _title(fig, title, "Loss landscape on a plane of two filter-normalized directions "
                           "(PGD re-crafted at every point; cf. Li et al. 2018, Wu et al. 2020)")
    return fig


@register("flatness", ("loss", "radius", "directions", "n", "at_theta", "at_radius", "increase", "increase_std"),
          "atprobe flatness's summary: mean loss increase at radius r per checkpoint (Fig. 6's flatness)")
def flatness(data: Data, *, title: str | None = None) -> Figure:
    """Bars: the mean increase of the adversarial and natural loss from theta to the points at
    ±r, per checkpoint (± std over directions and signs). Larger = sharper."""
    df = _num(_data(data, "flatness"), ["radius", "directions", "n", "at_theta", "at_radius", "increase",
                                        "increase_std"], "flatness")
    header = _checkpoint_series(df, [("run", "source"), ("checkpoint", "ck"), ("split", "split"),
                                     ("labels", "labels")])
    df["inputs"] = df["loss"].astype(str).map({"adv": "adversarial", "nat": "natural"}).fillna(df["loss"])
    radii = sorted(set(df["radius"].dropna()))
    with _checkpoint_bars(df, "increase", "inputs", "increase_std", header, title,
                          f"Flatness of the loss landscape (cf. {PAPER}, Fig. 6)") as (fig, ax):
        ax.set_ylabel("mean loss increase at ±r (nats)")
        ax.set_title(f"radius r = {', '.join(f'{r:g}' for r in radii)} (filter-normalized), "
                     f"{int(df['directions'].max())} directions; larger = sharper", fontsize="medium")
        ax.axhline(0, color="0.3", linewidth=0.8)
    return fig


@register("curvature_samples", ("sample", "label", "eigenvalue", "iterations", "converged"),
          "atprobe curvature --per-sample's .samples.csv: histogram of the per-sample input-Hessian "
          "dominant eigenvalue (Fig. 6's curvature)")
def curvature_samples(data: Data, *, title: str | None = None) -> Figure:
    """Histogram of the dominant input-Hessian eigenvalue per sample, one outline per
    checkpoint (log scale when all are positive and span decades); unconverged samples counted
    in the title."""
    sns = _sns()
    df = _num(_data(data, "curvature_samples"), ["sample", "eigenvalue", "iterations"], "curvature_samples")
    df = df[np.isfinite(df["eigenvalue"])]
    if df.empty:
        raise AtprobeError("curvature_samples: no finite eigenvalue to draw")
    df["ck"] = _short(df["checkpoint"]) if "checkpoint" in df.columns else ""
    header, df["_s"] = _series(df, [("run", "source"), ("checkpoint", "ck"), ("at", "at"), ("split", "split"),
                                    ("labels", "labels")])
    if header:
        df = _named(df, "_s", header)
    v = df["eigenvalue"].to_numpy(dtype=float)
    log = bool((v > 0).all() and np.log10(v.max() / v.min()) > 1.0)
    unconverged = int((~df["converged"].astype(str).str.lower().isin(["true", "1", "1.0"])).sum())
    at = ", ".join(_order(df["at"].astype(str))) if "at" in df.columns else ""
    with _style():
        fig, axes = _figure(1, (8.5 if header else 7.0, 4.4))
        ax = axes[0]
        sns.histplot(data=df, x="eigenvalue", hue=header or None, palette=PALETTE if header else None,
                     color=None if header else sns.color_palette(PALETTE)[0], element="step",
                     fill=not header, stat="count", common_bins=True, log_scale=log, ax=ax,
                     bins=min(50, max(10, int(np.sqrt(len(df))) * 2)))
        ax.set_xlabel("dominant eigenvalue of the input Hessian of the loss" + (" (log scale)" if log else ""))
        ax.set_ylabel("samples")
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        per = df.groupby(header).size() if header else pd.Series([len(df)])
        note = (f"{int(per.iloc[0])} samples" if per.nunique() == 1 else f"{int(per.min())}-{int(per.max())} samples")
        note += (" per checkpoint" if header else "") + (f" at {at} inputs" if at else "")
        note += f", {unconverged} not converged" if unconverged else ", all converged"
        ax.set_title(note, fontsize="medium")
        _log_ticks(ax, "x")
        _figure_legend(fig, axes)
        _title(fig, title, f"Input-space curvature per sample (cf. {PAPER}, Fig. 6)")
    return fig


@register("curvature", ("at", "statistic", "n", "value"),
          "atprobe curvature's summary: mean/median/std of the per-sample input-Hessian eigenvalue per checkpoint")
def curvature(data: Data, *, title: str | None = None) -> Figure:
    """Bars of the summary statistics (mean, median, ...) per checkpoint."""
    df = _num(_data(data, "curvature"), ["n", "value"], "curvature")
    header = _checkpoint_series(df, [("run", "source"), ("checkpoint", "ck"), ("at", "at"), ("split", "split"),
                                     ("labels", "labels")])
    statistic = df["statistic"].astype(str)
    stats = df[~statistic.isin(["std", "converged"])]  # eigenvalue units only; std as whiskers
    std = df[statistic == "std"].set_index("_s")["value"]
    converged = df[statistic == "converged"].set_index("_s")["value"]
    stats = stats.assign(std=np.where(stats["statistic"] == "mean", stats["_s"].map(std), np.nan))
    with _checkpoint_bars(stats, "value", "statistic", "std", header, title,
                          f"Input-space curvature (cf. {PAPER}, Fig. 6)") as (fig, ax):
        ax.set_ylabel("input-Hessian dominant eigenvalue")
        n = sorted(set(df["n"].dropna().astype(int)))
        note = f"over n = {', '.join(map(str, n))} samples; mean ± std"
        if len(converged):
            note += "; converged: " + ", ".join(f"{v:.0%}" for v in converged)
        ax.set_title(note, fontsize="medium")
        _log_if_wide(ax, stats["value"])
        _log_ticks(ax)
    return fig


@register("hessian", ("block", "params", "quantity", "k", "value", "method"),
          "atprobe hessian: top eigenvalues and trace of the weight Hessian of the adversarial loss, whole "
          "model and per block (Fig. 6's Hessian)")
def hessian(data: Data, *, title: str | None = None) -> Figure:
    """Left: the top-k eigenvalues per block (``all`` = the whole model); right: the trace per
    block (± its Hutchinson standard error). Colour: k, or the checkpoint when there are several."""
    df = _num(_data(data, "hessian"), ["params", "k", "value", "std_error"], "hessian")
    df["quantity"] = df["quantity"].astype(str)
    df["ck"] = _short(df["checkpoint"]) if "checkpoint" in df.columns else ""
    header, df["_s"] = _series(df, [("run", "source"), ("checkpoint", "ck"), ("at", "at"), ("scope", "scope")])
    if header:
        df = _named(df, "_s", header)
    blocks = _order(df["block"].astype(str))
    df["block"] = df["block"].astype(str)
    eig = df[df["quantity"] == "eigenvalue"].copy()
    eig["eigenvalue"] = "λ" + eig["k"].astype("Int64").astype(str)
    trace = df[df["quantity"] == "trace"].copy()
    width = min(18.0, max(11.0, 4.0 + 1.1 * len(blocks) * max(1, df[header].nunique() if header else 1)))
    with _style():
        fig, axes = _figure(2, (width, 4.6))
        for ax, part, ttl in ((axes[0], eig, "top eigenvalues"), (axes[1], trace, "trace (± std. error)")):
            if part.empty:
                _empty(ax, ttl)
                continue
            hue = header or ("eigenvalue" if ttl.startswith("top") else None)
            if header and ttl.startswith("top") and part["k"].nunique() > 1:
                part = part[part["k"] == 1]
                ttl = "top eigenvalue λ1"
            _bars(ax, part, "block", "value", hue, err="std_error" if not ttl.startswith("top") else None,
                  order=[b for b in blocks if b in set(part["block"])])
            ax.set_title(ttl, fontsize="medium")
            ax.set_xlabel("parameter block (all = whole model)")
            ax.set_ylabel("eigenvalue of H" if part["quantity"].iloc[0] == "eigenvalue"
                          else "tr H (Hutchinson estimate)")
            _log_if_wide(ax, part["value"])
            _log_ticks(ax)
            _rotate(ax, len(blocks))
        _figure_legend(fig, axes)
        at = {"adv": "PGD examples", "natural": "natural inputs"}
        on = ", ".join(at.get(a, a) for a in _order(df["at"].astype(str))) if "at" in df.columns else "PGD examples"
        _title(fig, title, f"Weight Hessian H of the loss on {on} (cf. {PAPER}, Fig. 6)")
    return fig


def slq_density(nodes: np.ndarray, weights: np.ndarray, runs: np.ndarray, grid: np.ndarray,
                sigma: float) -> np.ndarray:
    """The stochastic-Lanczos spectral density smoothed with a Gaussian kernel of width
    ``sigma``: ``1/R sum_runs sum_j w_j N(t; node_j, sigma^2)`` (Ghorbani et al. 2019; PyHessian's
    ``density_generate``), a density in t that integrates to 1."""
    out = np.zeros_like(grid, dtype=float)
    uniq = np.unique(runs)
    for r in uniq:
        m = runs == r
        diff = grid[:, None] - nodes[m][None, :]
        out += (weights[m][None, :] * np.exp(-0.5 * (diff / sigma) ** 2)).sum(axis=1)
    return out / (len(uniq) * sigma * math.sqrt(2 * math.pi))


@register("hessian_density", ("run", "node", "eigenvalue", "weight"),
          "atprobe hessian --density's .density.csv: eigenvalue density of the weight Hessian (stochastic "
          "Lanczos quadrature, Gaussian-smoothed)")
def hessian_density(data: Data, *, title: str | None = None) -> Figure:
    """The spectral density (log scale) from the Lanczos nodes and weights, smoothed with a
    Gaussian of width 1% of the eigenvalue range; one line per checkpoint."""
    df = _num(_data(data, "hessian_density"), ["run", "node", "eigenvalue", "weight"], "hessian_density")
    df["ck"] = _short(df["checkpoint"]) if "checkpoint" in df.columns else ""
    header, df["_s"] = _series(df, [("run", "source"), ("checkpoint", "ck"), ("at", "at"), ("scope", "scope")])
    lo, hi = float(df["eigenvalue"].min()), float(df["eigenvalue"].max())
    span = max(hi - lo, 1e-12 + abs(hi))
    sigma = 0.01 * span
    grid = np.linspace(lo - 0.05 * span, hi + 0.05 * span, 1000)
    rows = []
    for s, g in df.groupby("_s", sort=False):
        dens = slq_density(g["eigenvalue"].to_numpy(float), g["weight"].to_numpy(float), g["run"].to_numpy(),
                           grid, sigma)
        rows.append(pd.DataFrame({"_s": s, "eigenvalue": grid, "density": np.maximum(dens, 1e-12)}))
    curve = pd.concat(rows, ignore_index=True)
    hue = header or "_s"
    if header:
        curve = _named(curve, "_s", header)
    runs = int(df.groupby("_s")["run"].nunique().max())
    with _style():
        fig, axes = _figure(1, (10.0 if header else 8.5, 4.4))
        ax = axes[0]
        _lines(ax, curve, "eigenvalue", "density", hue, legend=bool(header))
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(1e-8, curve["density"].max() * 1e-8))
        ax.set_xlabel("eigenvalue of the Hessian of the loss w.r.t. the weights")
        ax.set_ylabel("density (log scale)")
        ax.set_title(f"stochastic Lanczos quadrature, {runs} run{'s' if runs > 1 else ''}, Gaussian width "
                     f"σ = {sigma:.3g}", fontsize="medium")
        _log_ticks(ax)
        _figure_legend(fig, axes)
        _title(fig, title, "Eigenvalue density of the weight Hessian (cf. Ghorbani et al. 2019)")
    return fig
