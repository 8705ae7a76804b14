"""Figures of training runs: learning curves (``curves``, Fig. 2) and the gradient-norm
ratio logged during training (``gradratio``, Fig. 3(b))."""

from __future__ import annotations

from typing import TYPE_CHECKING

from atprobe.errors import AtprobeError
from atprobe.plot.core import (
    PAPER,
    Data,
    _data,
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
    _style,
    _title,
    register,
)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


@register("curves", ("epoch", "split", "metric", "value"),
          "atprobe train's curves.csv: natural and robust accuracy, train/test, per epoch (Fig. 2)")
def learning_curves(data: Data, *, title: str | None = None) -> Figure:
    """Natural (left) and robust (right) accuracy per epoch; colour = run (or split when
    there is one run), dashes = split (train solid, test dashed)."""
    df = _num(_data(data, "curves"), ["epoch", "value"], "curves")
    metric = df["metric"].astype(str)
    acc = df[metric.str.endswith("_acc") & (metric != "running_acc")].copy()
    if acc.empty:
        raise AtprobeError("curves: no accuracy rows (natural_acc, <attack>_acc) to draw")
    acc["attack"] = acc["metric"].astype(str).str[: -len("_acc")]
    acc["split"] = acc["split"].astype(str)
    attacks = [a for a in _order(acc["attack"]) if a != "natural"]
    splits = [s for s in ("train", "val", "test") if s in set(acc["split"])]
    splits += [s for s in _order(acc["split"]) if s not in splits]
    with _style():
        fig, axes = _figure(2, (11, 4.2))
        for ax, panel in zip(axes, ("natural", "robust")):
            part = acc[(acc["attack"] == "natural") == (panel == "natural")].copy()
            if part.empty:
                _empty(ax, f"{panel} accuracy")
                continue
            header, part["_run"] = _series(part, [("run", "source"), ("attack", "attack")])
            if header:
                part = _named(part, "_run", header)
                _lines(ax, part, "epoch", "value", header, style="split", style_order=splits)
            else:
                _lines(ax, part, "epoch", "value", "split", style="split", style_order=splits,
                       palette=_palette(splits))
            names = ", ".join(a.upper() if a[:3] in ("pgd", "fgs") else a for a in attacks)
            ax.set_title("natural accuracy" if panel == "natural" else f"robust accuracy ({names})")
            ax.set_xlabel("epoch")
            ax.set_ylabel("accuracy (fraction of samples)")
            ax.set_ylim(-0.02, 1.02)
            _epoch_axis(ax)
        _figure_legend(fig, axes)
        _title(fig, title, f"Learning curves (cf. {PAPER}, Fig. 2)")
    return fig


RATIO_NAMES = {"pgd_at": "‖∇R‖ / ‖∇CE(x)‖", "fgsm_rs": "‖∇R‖ / ‖∇CE(x)‖", "trades": "‖∇β·KL‖ / ‖∇CE(x)‖"}


@register("gradratio", ("iteration", "epoch", "method", "grad_ce", "ratio"),
          "atprobe train --log-grad-ratio's gradratio.csv: gradient norms of the objective's parts and "
          "their ratio per iteration (Fig. 3(b))")
def grad_ratio(data: Data, *, title: str | None = None) -> Figure:
    """Left: L2 norms of the gradients of the objective's parts (log scale); right: the ratio
    robust term / clean CE per training iteration, one line per run."""
    names = {"grad_ce": "‖∇CE(x)‖", "grad_ce_adv": "‖∇CE(x')‖", "grad_r": "‖∇R‖, R = CE(x') − CE(x)",
             "grad_beta_kl": "‖∇β·KL(f(x)‖f(x'))‖"}
    df = _num(_data(data, "gradratio"), ["iteration", "epoch", "ratio", *names], "gradratio")
    header, df["_run"] = _series(df, [("run", "source"), ("method", "method")])
    norms = [c for c in names if c in df.columns]
    long = df.melt(id_vars=["iteration", "_run"], value_vars=norms, var_name="gradient", value_name="norm")
    long = long.dropna(subset=["norm"])
    long["gradient"] = long["gradient"].map(names)
    methods = _order(df["method"].astype(str))
    ratio = "\n".join(f"{RATIO_NAMES.get(m, 'ratio')}" + (f" ({m})" if len(methods) > 1 else "")
                       for m in methods)
    with _style():
        fig, axes = _figure(2, (12, 4.2))
        if header:
            long = _named(long, "_run", header)
            _lines(axes[0], long, "iteration", "norm", header, style="gradient")
            _lines(axes[1], _named(df, "_run", header).dropna(subset=["ratio"]), "iteration", "ratio",
                   header)
        else:
            _lines(axes[0], long, "iteration", "norm", "gradient")
            _lines(axes[1], df.dropna(subset=["ratio"]), "iteration", "ratio", "method")
        axes[0].set_yscale("log")
        _log_if_wide(axes[1], df["ratio"])
        axes[0].set_title("gradient norms of the objective's parts")
        axes[0].set_ylabel("L2 norm over all parameters (log scale)")
        axes[1].set_title("ratio robust term / clean CE")
        axes[1].set_ylabel(f"{ratio}\n(dimensionless)")
        for ax in axes:
            ax.set_xlabel("training iteration (batch)")
            _epoch_axis(ax)
            _log_ticks(ax)
        _figure_legend(fig, axes)
        _title(fig, title, f"Gradient norms during training (cf. {PAPER}, Fig. 3(b))")
    return fig
