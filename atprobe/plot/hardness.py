"""Figures of ``atprobe hardness``: the per-sample adversarial loss sorted by the first model's
(``hardness``, Fig. 7(c)) and the consistency heatmaps (``hardness_consistency``, Sec. 4.1),
kinds of ``atprobe plot``; and the probe's own figures at an exact pixel size
(:func:`sorted_loss_figure`, Fig. 7(c), and :func:`hardest_gallery`, Fig. C.3, on
:func:`gallery_figure`), which ``atprobe hardness`` writes as ``sorted.png`` and
``hardest.png`` (rendered by :func:`png_bytes`).

The probe (``atprobe.probes.hardness``) computes the tables and, for the gallery, the
hardest samples and their adversarial images (``hardest_samples``, ``adversarial_examples``);
the functions here only draw them. matplotlib and torch are imported when drawing.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from atprobe.errors import AtprobeError
from atprobe.plot.core import PAPER, Data, _data, _figure, _num, _order, _sns, _style, _title, register

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure
    from torch import Tensor

    from atprobe.data import Split


@register("hardness", ("index", "label", "true_label", "model", "adv_loss", "adv_correct", "rank"),
          "atprobe hardness's per_sample.csv: every model's adversarial loss per sample, sorted by the first "
          "model's (Fig. 7(c))")
def hardness_sorted(data: Data, *, title: str | None = None) -> Figure:
    """The hardness probe's own Fig. 7(c) drawing (:func:`sorted_loss_figure`):
    the samples sorted by the first model's adversarial loss (a line), the other models' losses
    as points; a log loss axis when the losses span decades. Several CSVs: models are prefixed
    with their file's name (the tables must hold the same samples)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    df = _num(_data(data, "hardness"), ["index", "adv_loss", "rank"], "hardness")
    if df["source"].astype(str).nunique() > 1:
        df["model"] = df["source"].astype(str) + ": " + df["model"].astype(str)
    loss = df["adv_loss"].to_numpy(dtype=float)
    loss = loss[np.isfinite(loss)]
    log = bool(loss.size and (loss > 0).all() and np.log10(loss.max() / loss.min()) > 1.5)
    fig = sorted_loss_figure(df, log=log)
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
def hardness_consistency(data: Data, *, title: str | None = None) -> Figure:
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


# ---------------------------------------------------------------------------- the probe's figures, in pixels

#: Dots per inch of every figure: sizes are given in pixels, figsize = pixels / DEFAULT_DPI.
DEFAULT_DPI = 100
#: Pixel size of ``sorted.png``.
SORTED_SIZE = (900, 500)
#: Pixel width of one gallery column and the gallery's height (``default_gallery_size``).
GALLERY_COLUMN_PX = 110
GALLERY_HEIGHT_PX = 320


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_size(text: str) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` in pixels (e.g. ``1100x320``) -> ``(width, height)``, each 16..20000."""
    match = _SIZE.match(str(text))
    if not match:
        raise AtprobeError(f"size {text!r} is not WIDTHxHEIGHT in pixels (e.g. 1100x320)")
    width, height = int(match[1]), int(match[2])
    _check_size((width, height))
    return width, height


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if (not isinstance(size, (tuple, list)) or len(size) != 2 or not all(_is_int(v) for v in size)
            or not all(16 <= int(v) <= 20000 for v in size)):
        raise AtprobeError(f"figure size must be two whole numbers of pixels in 16..20000, got {size!r}")
    return int(size[0]), int(size[1])


def default_gallery_size(k: int) -> tuple[int, int]:
    """``(GALLERY_COLUMN_PX * max(k, 2), GALLERY_HEIGHT_PX)`` pixels: 110 px per sample, 320 high."""
    return GALLERY_COLUMN_PX * max(int(k), 2), GALLERY_HEIGHT_PX


def _new_figure(size: tuple[int, int], dpi: int) -> Figure:
    """A matplotlib Figure of exactly ``size`` pixels at ``dpi`` (no pyplot, no global state;
    it renders with the Agg canvas when saved)."""
    from matplotlib.figure import Figure

    width, height = _check_size(size)
    if not _is_int(dpi) or dpi < 1:
        raise AtprobeError(f"dpi must be an integer >= 1, got {dpi!r}")
    return Figure(figsize=(width / dpi, height / dpi), dpi=dpi)


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes at its own dpi (its pixel size is ``figsize * dpi``; no tight
    bounding box, so the size is exactly the one asked for)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


def _hwc(image: Tensor | np.ndarray) -> np.ndarray:
    import torch

    a = (image.detach().to("cpu", torch.float32).numpy() if isinstance(image, torch.Tensor)
         else np.asarray(image, np.float32))
    a = np.clip(a, 0.0, 1.0)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a.transpose(1, 2, 0)
    return a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a


def gallery_figure(
    natural: Tensor | np.ndarray,
    adversarial: Tensor | np.ndarray,
    captions: Sequence[str],
    *,
    size: tuple[int, int] | None = None,
    dpi: int = DEFAULT_DPI,
    title: str | None = None,
    row_labels: tuple[str, str] = ("natural", "adversarial"),
) -> Figure:
    """A 2 x k grid: natural images (k, C, H, W in [0, 1]) above their adversarial versions,
    each column captioned. ``size`` in pixels (default :func:`default_gallery_size`)."""
    k = len(captions)
    if k < 1 or len(natural) != k or len(adversarial) != k:
        raise AtprobeError(f"the gallery needs as many natural ({len(natural)}) and adversarial "
                           f"({len(adversarial)}) images as captions ({k}), at least one")
    fig = _new_figure(size or default_gallery_size(k), dpi)
    axes = fig.subplots(2, k, squeeze=False)
    for j in range(k):
        for row, images in enumerate((natural, adversarial)):
            ax = axes[row][j]
            img = _hwc(images[j])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(row_labels[row], fontsize=8)
        axes[1][j].set_xlabel(captions[j], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=0.04, right=0.99, top=0.88 if title else 0.97, bottom=0.2, wspace=0.08, hspace=0.06)
    return fig


def _class(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= int(label) < len(class_names):
        return str(class_names[int(label)])
    return str(int(label))


def hardest_gallery(
    top: pd.DataFrame,
    samples: Split,
    adversarial: Tensor | np.ndarray,
    *,
    attack: str,
    class_names: Sequence[str] | None = None,
    size: tuple[int, int] | None = None,
    dpi: int = DEFAULT_DPI,
    model_name: str | None = None,
) -> Figure:
    """Fig. C.3: the hardest samples, natural above adversarial.

    ``top, samples = atprobe.probes.hardness.hardest_samples(data, per_sample, k)`` (the ``k``
    hardest by mean rank and those samples of the first model's split) and ``adversarial =
    hardness.adversarial_examples(model, samples, config)`` (re-crafted for just these samples
    against the first model); ``attack`` (the config's attack name) and ``model_name`` go into
    the title. Captions: sample index, class name of the label (and of the true label if it
    differs), mean rank."""
    import torch

    natural = samples.x.float() / 255.0 if samples.x.dtype == torch.uint8 else samples.x.float()
    captions = []
    for i, y, t, r in zip(samples.index.tolist(), samples.y.tolist(), samples.true_y.tolist(), top["mean_rank"]):
        label = _class(y, class_names) + ("" if y == t else f"\n(true {_class(t, class_names)})")
        captions.append(f"#{i} {label}\nmean rank {r:.4g}")
    who = f" against {model_name}" if model_name else ""
    title = (f"{len(samples)} hardest samples by mean rank ({attack}{who}, re-crafted)")
    return gallery_figure(natural, adversarial, captions, size=size, dpi=dpi, title=title,
                          row_labels=("natural", "adversarial"))


def sorted_loss_figure(
    per_sample: pd.DataFrame,
    *,
    size: tuple[int, int] = SORTED_SIZE,
    dpi: int = DEFAULT_DPI,
    log: bool = False,
) -> Figure:
    """Fig. 7(c): every model's per-sample adversarial loss over the samples sorted by the
    first model's loss (x = the first model's rank, 1 = hardest). The first model is a
    line, the others are points. ``log``: logarithmic loss axis."""
    from atprobe.probes.hardness import _by_model  # the table's rows per model, checked

    parts = _by_model(per_sample)
    names = list(parts)
    if not names or len(parts[names[0]]) == 0:
        raise AtprobeError("the per-sample table is empty")
    order = np.argsort(parts[names[0]]["rank"].to_numpy(), kind="stable")
    x = np.arange(1, len(order) + 1)
    fig = _new_figure(size, dpi)
    ax = fig.add_subplot()
    y0 = parts[names[0]]["adv_loss"].to_numpy(dtype=np.float64)[order]
    ax.plot(x, y0, color="C0", linewidth=1.5, label=f"{names[0]} (sort key)", zorder=3)
    for j, name in enumerate(names[1:], start=1):
        y = parts[name]["adv_loss"].to_numpy(dtype=np.float64)[order]
        ax.scatter(x, y, s=3, alpha=0.5, linewidths=0, color=f"C{j % 10}", label=name, rasterized=True, zorder=2)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(f"sample, sorted by the adversarial loss of {names[0]} (1 = hardest)")
    ax.set_ylabel("adversarial loss (CE, nats)")
    ax.legend(fontsize=7, markerscale=3, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
