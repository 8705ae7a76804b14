"""Figures from atprobe's CSVs: one function per kind of table, each returning a Figure.

Every function takes a DataFrame, a path, a list of them (concatenated, with a
``source`` column naming each, so several runs or checkpoints are drawn together with a
legend) or a dict ``{label: DataFrame or path}`` (the keys become the ``source``)::

    from atprobe import plot
    fig = plot.learning_curves(["runs/pgd/curves.csv", "runs/trades/curves.csv"])
    fig = plot.plot("stability.csv")                 # kind recognized from the columns
    plot.save_figure(fig, "stability.png", dpi=150)  # atomic; .png, .pdf or .svg

``KINDS`` maps each kind's name to ``Kind(columns, function, description)``; ``detect_kind``
recognizes a table by its columns. A new kind is one drawing function decorated with
``@register(name, columns, description)``.

Figures are ``matplotlib.figure.Figure`` objects on an Agg canvas, created without pyplot:
importing this module (or ``atprobe``) selects no backend and changes no global style; seaborn
and matplotlib are imported on the first drawing.

Layout (one module per family of figures; everything public is importable from
``atprobe.plot`` itself):

* :mod:`atprobe.plot.core`: the registry of kinds, reading/concatenating tables,
  :func:`plot`, :func:`save_figure`, and the drawing helpers every figure shares;
* :mod:`atprobe.plot.training`: ``curves``, ``gradratio``;
* :mod:`atprobe.plot.gradients`: ``gradnorm``, ``gradnorm_samples``, ``stability``, ``gradcos``;
* :mod:`atprobe.plot.eval`: ``eval``;
* :mod:`atprobe.plot.measures`: ``complexity`` (the module is not called ``complexity``, so that
  ``atprobe.plot.complexity`` is always the drawing function);
* :mod:`atprobe.plot.hardness`: ``hardness``, ``hardness_consistency`` and the hardness
  probe's own figures (:func:`sorted_loss_figure`, :func:`gallery_figure`,
  :func:`hardest_gallery`, :func:`png_bytes`);
* :mod:`atprobe.plot.landscape`: ``flatness_curve``, ``flatness``, ``flatness_plane``,
  ``flatness_path``, ``curvature_samples``, ``curvature``, ``hessian``, ``hessian_density``;
* :mod:`atprobe.plot.runs`: ``table`` (Table 1's bars), and from run directories
  ``noise_gap`` (Fig. 2(c)) and ``eps_curves`` (Figs. 7(b), C.1), named with ``--kind``.

Only this package draws: the probes compute tables (and, for the gallery, images) and hand
them over. The family modules are imported below in the order their kinds are listed
(``KINDS``, ``atprobe plot --list-kinds``).
"""

from atprobe.plot.core import (
    FORMATS,
    KINDS,
    PALETTE,
    PAPER,
    TEXT_COLUMNS,
    Data,
    Kind,
    Source,
    detect_kind,
    load,
    plot,
    read,
    register,
    save_figure,
    short_names,
)
from atprobe.plot.eval import eval_bars
from atprobe.plot.gradients import GRAD_LEGEND, GRADS, RATIOS, gradcos, gradnorm, gradnorm_samples, stability
from atprobe.plot.hardness import (
    DEFAULT_DPI,
    GALLERY_COLUMN_PX,
    GALLERY_HEIGHT_PX,
    SORTED_SIZE,
    default_gallery_size,
    gallery_figure,
    hardest_gallery,
    hardness_consistency,
    hardness_sorted,
    parse_size,
    png_bytes,
    sorted_loss_figure,
)
from atprobe.plot.landscape import (
    curvature,
    curvature_samples,
    flatness,
    flatness_curve,
    flatness_path,
    flatness_plane,
    hessian,
    hessian_density,
    slq_density,
)
from atprobe.plot.measures import MEASURE_AXES, complexity
from atprobe.plot.runs import (
    METHOD_NAMES,
    eps_curves,
    generalization_gaps,
    method_label,
    noise_gap,
    robust_test_curves,
    table_bars,
)
from atprobe.plot.training import RATIO_NAMES, grad_ratio, learning_curves

__all__ = [
    "FORMATS", "KINDS", "PALETTE", "PAPER", "TEXT_COLUMNS", "Data", "Kind", "Source",
    "detect_kind", "load", "plot", "read", "register", "save_figure", "short_names",
    "RATIO_NAMES", "grad_ratio", "learning_curves",
    "GRAD_LEGEND", "GRADS", "RATIOS", "gradcos", "gradnorm", "gradnorm_samples", "stability",
    "eval_bars",
    "MEASURE_AXES", "complexity",
    "hardness_consistency", "hardness_sorted",
    "DEFAULT_DPI", "GALLERY_COLUMN_PX", "GALLERY_HEIGHT_PX", "SORTED_SIZE", "default_gallery_size", "gallery_figure",
    "hardest_gallery", "parse_size", "png_bytes", "sorted_loss_figure",
    "curvature", "curvature_samples", "flatness", "flatness_curve", "flatness_path", "flatness_plane", "hessian",
    "hessian_density", "slq_density",
    "METHOD_NAMES", "eps_curves", "generalization_gaps", "method_label", "noise_gap", "robust_test_curves",
    "table_bars",
]
