"""Figures of sets of training runs: Table 1 as Best/Final bars (``table``, the CSV of
``atprobe table``), the generalization gap against the label-noise rate (``noise_gap``,
Fig. 2(c)) and the robust test accuracy over epochs per training budget (``eps_curves``,
Fig. 7(b) and C.1).

``noise_gap`` and ``eps_curves`` draw run directories (``atprobe plot RUN_DIR... --kind
...``): each is read as its ``curves.csv`` with the fields of its ``config.json`` as columns
(:func:`atprobe.runs.run_curves`), so the x variable (``label_noise``, ``train_eps``) is the
run's own setting, never guessed from a name. Such a table is drawn as learning curves
(``curves``) unless one of these kinds is named. :func:`generalization_gaps` and
:func:`robust_test_curves` are the numbers each figure draws.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from atprobe.errors import AtprobeError
from atprobe.plot.core import (
    PAPER,
    Data,
    _data,
    _epoch_axis,
    _figure,
    _figure_legend,
    _lines,
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
from atprobe.plot.eval import _eps_text
from atprobe.runs import METHOD_NAMES  # the paper's names of the training methods (one table, re-exported)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


_RUN_COLUMNS = ("method", "epoch", "split", "metric", "value", "eval_attack")


def method_label(method: str, te=False) -> str:
    """``PGD-AT``, ``TRADES+TE``, ...: the paper's name of a run's method."""
    on = str(te).strip().lower() in ("true", "1", "1.0")
    return METHOD_NAMES.get(str(method), str(method)) + ("+TE" if on else "")


def _methods(df: pd.DataFrame) -> pd.Series:
    te = df["te"] if "te" in df.columns else pd.Series(False, index=df.index)
    return pd.Series([method_label(m, t) for m, t in zip(df["method"], te)], index=df.index)


# ---------------------------------------------------------------------------- Table 1


@register("table", ("run", "attack", "best", "final", "diff"),
          "atprobe table: accuracy of each run's best and final checkpoint per attack, as bars (Table 1)")
def table_bars(data: Data, *, title: str | None = None) -> Figure:
    """One panel per attack, a pair of bars per run: the best checkpoint's accuracy and the
    final one's, the value on each bar and ``Δ = best − final`` under the run's name."""
    sns = _sns()
    df = _num(_data(data, "table"), ["best", "final", "diff"], "table")
    df["attack"] = df["attack"].astype(str)
    df["_run"] = _short(df["run"])
    header, df["_x"] = _series(df, [("table", "source"), ("run", "_run", True)])
    df["_x"] = [f"{x}\nΔ = {d:+.3f}" for x, d in zip(df["_x"], df["diff"])]
    long = df.melt(id_vars=["attack", "_x"], value_vars=["best", "final"], var_name="checkpoint",
                   value_name="accuracy")
    attacks = _order(df["attack"])
    runs = df.groupby("attack", sort=False)["_x"].nunique().max()
    cols = min(len(attacks), 5)
    rows = -(-len(attacks) // cols)
    with _style():
        fig, axes = _figure(cols, (min(20.0, cols * max(2.6, 0.9 + 1.1 * runs)), 3.9 * rows + 0.5), nrows=rows)
        palette = _palette(["best", "final"])
        for ax, attack in zip(axes, attacks):
            part = long[long["attack"] == attack]
            sns.barplot(data=part, x="_x", y="accuracy", hue="checkpoint", hue_order=["best", "final"],
                        order=_order(part["_x"]), palette=palette, errorbar=None, ax=ax)
            for cont in ax.containers:
                ax.bar_label(cont, fmt="%.3f", fontsize=7, padding=2)
            ax.set_ylim(0, 1.1)
            ax.set_title(attack)
            if runs > 4:  # Table 2's many runs: slanted names stay apart
                for label in ax.get_xticklabels():
                    label.set_rotation(35)
                    label.set_horizontalalignment("right")
            ax.set_xlabel(header or "run")
            ax.set_ylabel("accuracy (fraction of samples)")
        for ax in axes[len(attacks):]:
            ax.set_visible(False)
        _figure_legend(fig, axes[: len(attacks)], title="checkpoint")
        _title(fig, title, f"Best and final checkpoints, Δ = best − final (cf. {PAPER}, Table 1)")
    return fig


# ---------------------------------------------------------------------------- Fig. 2(c)


def generalization_gaps(data: Data) -> pd.DataFrame:
    """Per run (``source``) at its last evaluated epoch: the train and test accuracy and
    ``gap = train − test``, natural (``natural_acc``) and robust (the run's ``eval_attack``),
    with the run's ``method`` (the paper's name) and ``label_noise``. Train accuracy is on the
    labels the run was trained on (the noisy ones), over the first ``eval_n`` training samples;
    test accuracy over the first ``eval_n`` test samples (``atprobe train``'s curves)."""
    df = _num(_data(data, "noise_gap"), ["epoch", "value", "label_noise"], "noise_gap")
    df["_method"] = _methods(df)
    rows = []
    for source, run in df.groupby("source", sort=False):
        robust = f"{run['eval_attack'].iloc[0]}_acc"
        acc = run[run["split"].isin(["train", "test"]) & run["metric"].isin(["natural_acc", robust])]
        if acc.empty:
            raise AtprobeError(f"{source}: no train/test accuracy in its curves")
        last = int(acc["epoch"].max())
        at = acc[acc["epoch"] == last].set_index(["metric", "split"])["value"]
        for accuracy, metric in (("natural", "natural_acc"), ("robust", robust)):
            if (metric, "train") not in at.index or (metric, "test") not in at.index:
                raise AtprobeError(f"{source}: no train and test {metric} at its last epoch ({last})")
            train, test = float(at[(metric, "train")]), float(at[(metric, "test")])
            rows.append({"source": source, "method": run["_method"].iloc[0],
                         "label_noise": float(run["label_noise"].iloc[0]), "epoch": last, "accuracy": accuracy,
                         "metric": metric, "train": train, "test": test, "gap": train - test})
    return pd.DataFrame(rows)


@register("noise_gap", ("label_noise", *_RUN_COLUMNS),
          "atprobe plot RUN_DIR... --kind noise_gap: train - test accuracy at the last epoch against each run's "
          "label-noise rate, per method (Fig. 2(c))", auto=False)
def noise_gap(data: Data, *, title: str | None = None) -> Figure:
    """Generalization gap (train − test accuracy at the end of training) against the run's
    label-noise rate: natural (left) and robust (right), one line per method through the
    mean over its runs at each rate, each run a point."""
    gaps = generalization_gaps(data)
    methods = _order(gaps["method"])
    palette = _palette(methods)
    with _style():
        fig, axes = _figure(2, (11, 4.2))
        for ax, accuracy in zip(axes, ("natural", "robust")):
            part = gaps[gaps["accuracy"] == accuracy]
            mean = part.groupby(["method", "label_noise"], sort=False, as_index=False)["gap"].mean()
            _lines(ax, mean, "label_noise", "gap", "method", palette=palette)
            if len(mean) < len(part):  # several runs at one rate: each run a point
                for method, g in part.groupby("method", sort=False):
                    ax.scatter(g["label_noise"], g["gap"], color=palette[method], s=12, alpha=0.6)
            metric = ", ".join(_order(part["metric"].str[: -len("_acc")].str.upper()))
            ax.set_title(f"{accuracy} accuracy ({metric})" if accuracy == "robust" else "natural accuracy")
            ax.set_xlabel("label-noise rate (fraction of training labels replaced)")
            ax.set_ylabel("generalization gap = train − test accuracy")
            ax.axhline(0, color="0.6", linewidth=0.8, gid="zero")
        _figure_legend(fig, axes)
        _title(fig, title, f"Generalization gap at the end of training vs label noise (cf. {PAPER}, Fig. 2(c))")
    return fig


# ---------------------------------------------------------------------------- Fig. 7(b), C.1


def robust_test_curves(data: Data) -> pd.DataFrame:
    """Per run (``source``) and epoch: the robust test accuracy (the run's ``eval_attack``, at
    the run's own training budget), with the run's ``method``, ``train_norm``, ``train_eps``
    and ``budget`` (the ε as text, e.g. ``linf ε=8/255``)."""
    df = _num(_data(data, "eps_curves"), ["epoch", "value", "train_eps"], "eps_curves")
    df["_method"] = _methods(df)
    norm = df["train_norm"].astype(str) if "train_norm" in df.columns else pd.Series("", index=df.index)
    keep = (df["split"].astype(str) == "test") & (df["metric"].astype(str) == df["eval_attack"].astype(str) + "_acc")
    part = df[keep]
    missing = sorted(set(df["source"]) - set(part["source"]))
    if missing:
        raise AtprobeError(f"{missing[0]}: no robust test accuracy in its curves")
    out = pd.DataFrame({"source": part["source"], "method": part["_method"], "train_norm": norm[keep],
                        "train_eps": part["train_eps"], "eval_attack": part["eval_attack"],
                        "budget": [_eps_text(n, e) or f"{n} ε=0" for n, e in zip(norm[keep], part["train_eps"])],
                        "epoch": part["epoch"].astype(int), "accuracy": part["value"]})
    return out.sort_values(["train_eps", "source", "epoch"], kind="stable").reset_index(drop=True)


@register("eps_curves", ("train_eps", *_RUN_COLUMNS),
          "atprobe plot RUN_DIR... --kind eps_curves: robust test accuracy per epoch, one line per run's training "
          "eps (Figs. 7(b), C.1)", auto=False)
def eps_curves(data: Data, *, title: str | None = None) -> Figure:
    """Robust test accuracy over epochs, one colour per training budget ε (ordered by ε), the
    method and the run named too where they vary."""
    curves = robust_test_curves(data)
    header, curves["_s"] = _series(curves, [("ε", "budget", True), ("method", "method"), ("run", "source")])
    if not header:
        header, curves["_s"] = "ε", curves["budget"]
    curves = _named(curves, "_s", header)
    attacks = ", ".join(_order(curves["eval_attack"].astype(str).str.upper()))
    with _style():
        fig, axes = _figure(1, (7.5, 4.4))
        ax = axes[0]
        _lines(ax, curves, "epoch", "accuracy", header)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"robust test accuracy ({attacks} at the run's ε)")
        ax.set_ylim(-0.02, max(0.1, float(np.nanmax(curves["accuracy"])) * 1.1))
        _epoch_axis(ax)
        _figure_legend(fig, axes)
        _title(fig, title, f"Robust test accuracy under various training budgets (cf. {PAPER}, Figs. 7(b), C.1)")
    return fig
