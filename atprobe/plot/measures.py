"""The figure of ``atprobe complexity``: each complexity measure against the robust
generalization gap (``complexity``, Fig. 6)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from atprobe.errors import AtprobeError
from atprobe.plot.core import (
    PALETTE,
    PAPER,
    Data,
    _data,
    _dirs,
    _figure,
    _figure_legend,
    _log_if_wide,
    _log_ticks,
    _named,
    _num,
    _order,
    _palette,
    _series,
    _sns,
    _style,
    _title,
    register,
)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


#: y-axis words per complexity measure (the variant says which number exactly)
MEASURE_AXES = {
    "spectral": "product of layer spectral norms",
    "l1": "sum of |weights| over layers",
    "margin": "margin quantile (logits)",
    "curvature": "input-Hessian top eigenvalue",
    "hessian": "weight-Hessian eigenvalue / trace",
    "flatness": "adversarial loss increase (nats)",
}


def _variant_text(variant: str) -> str:
    """``log10;method=operator;bn=fold`` -> ``log10 (method=operator, bn=fold)``."""
    head, *keys = str(variant).split(";")
    return f"{head} ({', '.join(keys)})" if keys else head


def _label_kind(noise) -> str:
    try:
        v = float(noise)
    except (TypeError, ValueError):
        return str(noise)
    return "true labels" if v == 0 else "random labels" if v == 1 else f"label noise {v:g}"


@register("complexity", ("checkpoint", "measure", "variant", "value", "reason"),
          "atprobe complexity: each complexity measure against the robust generalization gap, one panel "
          "per measure, marker by label kind (Fig. 6)")
def complexity(data: Data, *, title: str | None = None) -> Figure:
    """One panel per (measure, variant), every checkpoint a point at (robust generalization
    gap, measure), with Kendall's tau between the two over the points. Marker and colour: the
    label kind when the table has a ``label_noise`` column (0 = true, 1 = random labels), else
    the CSV file (pass one CSV per label kind), else the checkpoint's folder. Spectral
    ``product`` variants are left out when their ``log10`` twin is there; values that are NaN
    (a ``reason`` says why) are skipped."""
    from scipy.stats import kendalltau

    sns = _sns()
    df = _num(_data(data, "complexity"), ["epoch", "value", "label_noise"], "complexity")
    df["measure"], df["variant"] = df["measure"].astype(str), df["variant"].astype(str)
    key = ["source", "checkpoint"]
    gaps = df[(df["measure"] == "gap") & (df["variant"] == "robust_gap")]
    if gaps.empty:
        raise AtprobeError("complexity: no robust generalization gap (measure gap, variant robust_gap) in the "
                           "table: run atprobe complexity with gap among --measures")
    gaps = gaps.drop_duplicates(key)[key + ["value"]].rename(columns={"value": "robust_gap"})
    rest = df[df["measure"] != "gap"].merge(gaps, on=key, how="inner")
    rest = rest[np.isfinite(rest["value"]) & np.isfinite(rest["robust_gap"])]
    have = set(zip(rest["measure"], rest["variant"]))
    panels = [(m, v) for m, v in dict.fromkeys(zip(rest["measure"], rest["variant"]))
              if not (v.startswith("product") and (m, v.replace("product", "log10", 1)) in have)]
    if not panels:
        raise AtprobeError("complexity: no finite complexity measure next to a robust gap to draw")
    # Colour: the run (the CSV file, else the checkpoint's folder); marker: the label kind
    # when the table records it (Fig. 6), else the run again.
    rest["run_dir"] = _dirs(rest["checkpoint"])
    header, rest["_s"] = _series(rest, [("run", "source"), ("run", "run_dir")])
    rest = _named(rest, "_s", header) if header else rest
    style = header
    if "label_noise" in rest.columns and rest["label_noise"].notna().any():
        style = "labels"
        rest[style] = rest["label_noise"].map(_label_kind)
        header = header or style
    levels = _order(rest[header]) if header else []
    style_levels = _order(rest[style]) if style else []
    palette = _palette(levels) if header else None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    with _style():
        fig, axes = _figure(ncols, (4.3 * ncols + (1.8 if header else 0), 3.6 * nrows + 0.5), nrows=nrows)
        for ax, (measure, variant) in zip(axes, panels):
            part = rest[(rest["measure"] == measure) & (rest["variant"] == variant)]
            sns.scatterplot(data=part, x="robust_gap", y="value", hue=header or None, style=style or None,
                            hue_order=levels or None, style_order=style_levels or None, palette=palette,
                            color=None if header else sns.color_palette(PALETTE)[0], s=55, ax=ax,
                            legend="auto" if header else False)
            tau = ""
            if len(part) >= 3 and part["value"].nunique() > 1 and part["robust_gap"].nunique() > 1:
                tau = f", Kendall τ = {kendalltau(part['robust_gap'], part['value']).statistic:.2f}"
            ax.set_title(f"{measure}: {_variant_text(variant)}\n{len(part)} checkpoints{tau}", fontsize="small")
            ax.set_xlabel("robust gap (train − test PGD accuracy)")
            ax.set_ylabel(MEASURE_AXES.get(measure, measure) + (" (log10)" if "log10" in variant else ""))
            _log_if_wide(ax, part["value"])
            _log_ticks(ax)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        _figure_legend(fig, axes[: len(panels)])
        _title(fig, title, f"Complexity measures against the robust generalization gap (cf. {PAPER}, Fig. 6)")
    return fig
