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
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from atprobe.errors import AtprobeError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Source = pd.DataFrame | str | os.PathLike
Data = Source | Sequence[Source] | Mapping[str, Source]

PAPER = "Dong et al. 2022"
FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}
PALETTE = "colorblind"


# ---------------------------------------------------------------------------- registry


class Kind(NamedTuple):
    """A kind of CSV: the columns that identify it, its drawing function, one line on it."""

    columns: tuple[str, ...]
    function: Callable[..., Figure]
    description: str


KINDS: dict[str, Kind] = {}


def register(name: str, columns: Iterable[str], description: str) -> Callable:
    """Decorator adding a drawing function ``f(data, *, title=None) -> Figure`` to ``KINDS``."""

    def deco(function: Callable) -> Callable:
        KINDS[name] = Kind(tuple(columns), function, description)
        return function

    return deco


def _kind_names() -> str:
    return ", ".join(KINDS)


def _matching(columns: Iterable[str]) -> list[str]:
    have = set(map(str, columns))
    found = [name for name, kind in KINDS.items() if set(kind.columns) <= have]
    # the most specific kinds: drop a match whose columns are a strict subset of another's
    return [a for a in found if not any(set(KINDS[a].columns) < set(KINDS[b].columns) for b in found)]


def detect_kind(df: pd.DataFrame, name: str = "the table") -> str:
    """The kind whose required columns ``df`` has (the most specific one if several)."""
    found = _matching(df.columns)
    if not found:
        cols = ", ".join(map(str, df.columns[:8])) + (", ..." if len(df.columns) > 8 else "")
        raise AtprobeError(f"{name}: columns ({cols}) match no known kind of CSV; known kinds: "
                           f"{_kind_names()} (see `atprobe plot --list-kinds`)")
    if len(found) > 1:
        raise AtprobeError(f"{name}: columns fit several kinds ({', '.join(found)}); choose one with --kind")
    return found[0]


def _check_columns(df: pd.DataFrame, kind: str, name: str) -> None:
    if kind not in KINDS:
        raise AtprobeError(f"unknown kind {kind!r}: choose from {_kind_names()}")
    missing = [c for c in KINDS[kind].columns if c not in df.columns]
    if missing:
        guess = _matching(df.columns)
        hint = f" (its columns are those of kind {guess[0]!r})" if len(guess) == 1 else ""
        raise AtprobeError(f"{name} lacks the columns {', '.join(missing)} that kind {kind!r} needs{hint}")


# ---------------------------------------------------------------------------- reading


#: Columns read as text whatever they hold (``true`` is a label mode, not a boolean).
TEXT_COLUMNS = ("source", "checkpoint", "checkpoint_a", "checkpoint_b", "split", "labels", "group", "method",
                "loss", "attack", "norm", "model", "model_a", "model_b", "measure", "variant", "reason")


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise AtprobeError(f"no such file: {path}")
    if path.is_dir():
        raise AtprobeError(f"{path} is a directory, not a CSV file")
    try:
        df = pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AtprobeError(f"{path}: cannot read it as a CSV table ({reason})") from None
    except OSError as exc:
        raise AtprobeError(f"{path}: {exc.strerror or exc}") from None
    return df


def short_names(paths: Sequence[str]) -> list[str]:
    """Labels telling paths apart: common leading folders and common trailing parts are
    dropped, as is the last part's suffix (``runs/pgd/curves.csv``, ``runs/trades/curves.csv``
    -> ``pgd``, ``trades``)."""
    if len(paths) == 0:
        return []
    unique = list(dict.fromkeys(map(str, paths)))
    parts = []
    for p in unique:
        pp = Path(p)
        tail = pp.name[: -len(pp.suffix)] if pp.suffix in (".csv", ".pt", ".pth", ".tsv") else pp.name
        parts.append([*pp.parent.parts, tail] if str(pp.parent) != "." else [tail])
    if len(unique) == 1:
        names = [parts[0][-1]]
    elif len(set(map(tuple, parts))) < len(unique):  # a.csv and a.tsv: keep the whole paths
        names = unique
    else:
        lead = 0
        while all(len(p) > lead + 1 for p in parts) and len({p[lead] for p in parts}) == 1:
            lead += 1
        trail = 0
        while (all(len(p) > lead + trail + 1 for p in parts)
               and len({p[len(p) - 1 - trail] for p in parts}) == 1):
            trail += 1
        names = ["/".join(p[lead: len(p) - trail]) for p in parts]
        if len(set(names)) < len(unique) or any(not n for n in names):
            names = ["/".join(p[lead:]) for p in parts]
    by_path = dict(zip(unique, names))
    out = [by_path[str(p)] for p in paths]
    return _numbered(out)


def _numbered(labels: list[str]) -> list[str]:
    """Repeated labels made unique: ``x, x`` -> ``x, x (2)``."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def _items(data: Data) -> list[tuple[str | None, Any]]:
    """``[(explicit label or None, DataFrame or path)]``."""
    if isinstance(data, pd.DataFrame) or isinstance(data, (str, os.PathLike)):
        return [(None, data)]
    if isinstance(data, Mapping):
        return [(str(k), v) for k, v in data.items()]
    if isinstance(data, Iterable):
        items = [(None, d) for d in data]
        if not items:
            raise AtprobeError("no tables given")
        for _, d in items:
            if not isinstance(d, (pd.DataFrame, str, os.PathLike)):
                raise AtprobeError(f"expected a DataFrame or a CSV path, got {type(d).__name__}")
        return items
    raise AtprobeError(f"expected a DataFrame, a CSV path or a list of them, got {type(data).__name__}")


def _read(data: Data) -> list[tuple[str, str, pd.DataFrame]]:
    """``[(source label, name for messages, DataFrame)]``."""
    items = _items(data)
    paths = [str(d) for label, d in items if label is None and not isinstance(d, pd.DataFrame)]
    names = iter(short_names(paths))
    out = []
    for i, (label, d) in enumerate(items):
        if isinstance(d, pd.DataFrame):
            df = d
            label = label if label is not None else str(d.attrs.get("source", f"frame {i + 1}"))
            where = f"table {label!r}"
        else:
            df = _read_csv(Path(d))
            auto = next(names) if label is None else None
            label = label if label is not None else auto
            where = str(d)
        if len(df) == 0:
            raise AtprobeError(f"{where}: the table has no rows")
        out.append((label, where, df))
    return out


def read(data: Data) -> list[tuple[str, pd.DataFrame]]:
    """The tables as ``[(source label, DataFrame)]``: paths read, labels from the file names
    (see ``short_names``), dict keys or ``frame 1, frame 2, ...`` for unnamed DataFrames."""
    return [(label, df) for label, _, df in _read(data)]


def load(data: Data, kind: str | None = None) -> tuple[str, pd.DataFrame]:
    """``(kind, one DataFrame)``: every table checked to be of one kind (``kind`` or the
    detected one) and concatenated, with a ``source`` column (kept if a table has one)."""
    if kind is not None and kind not in KINDS:
        raise AtprobeError(f"unknown kind {kind!r}: choose from {_kind_names()}")
    tables = _read(data)
    if kind is None:
        kinds = [(where, detect_kind(df, where)) for _, where, df in tables]
        if len({k for _, k in kinds}) > 1:
            desc = ", ".join(f"{where} is {k!r}" for where, k in kinds)
            raise AtprobeError(f"the tables are of different kinds ({desc}); plot one kind at a time")
        kind = kinds[0][1]
    for _, where, df in tables:
        _check_columns(df, kind, where)
    frames = []
    for label, _, df in tables:
        df = df.copy()
        if "source" not in df.columns:
            df.insert(0, "source", label)
        frames.append(df)
    return kind, pd.concat(frames, ignore_index=True, sort=False)


def plot(data: Data, kind: str | None = None, *, title: str | None = None) -> Figure:
    """The figure of one or more CSVs of one kind (recognized from the columns unless given)."""
    kind, df = load(data, kind)
    return KINDS[kind].function(df, title=title)


def _data(data: Data, kind: str) -> pd.DataFrame:
    return load(data, kind)[1]


# ---------------------------------------------------------------------------- saving


def save_figure(fig: Figure, path: str | os.PathLike, dpi: float = 150) -> Path:
    """Write ``fig`` atomically; the suffix picks the format (.png, .pdf, .svg). A PNG is
    ``figsize * dpi`` pixels. PDF/SVG carry no date, so the same figure gives the same bytes."""
    from atprobe.io import atomic_write

    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise AtprobeError(f"cannot tell the figure format from {path.name!r}: "
                           f"end the name with {', '.join(FORMATS)}")
    if not (dpi > 0 and math.isfinite(dpi)):
        raise AtprobeError(f"dpi must be a positive number, got {dpi}")
    import matplotlib

    metadata = {"pdf": {"CreationDate": None, "ModDate": None}, "svg": {"Date": None}}.get(fmt)

    def write(f) -> None:
        with matplotlib.rc_context({"svg.hashsalt": "atprobe"}):  # SVG ids from content, not random
            fig.savefig(f, format=fmt, dpi=dpi, metadata=metadata)

    return atomic_write(path, write)


# ---------------------------------------------------------------------------- drawing helpers


def _sns():
    import seaborn as sns  # imported on first use: `import atprobe` stays light

    return sns


@contextlib.contextmanager
def _style():
    sns = _sns()
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        yield sns


def _figure(ncols: int, figsize: tuple[float, float], nrows: int = 1,
            width_ratios: Sequence[float] | None = None) -> tuple[Figure, list[Axes]]:
    """A figure on an Agg canvas (no pyplot, no global backend) with ``nrows x ncols`` axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, width_ratios=width_ratios)
    return fig, list(axes.ravel())


def _title(fig: Figure, title: str | None, default: str) -> None:
    """The figure's title, wrapped onto more lines when it would not fit the width."""
    import textwrap

    text = title if title is not None else default
    width = max(20, int(fig.get_size_inches()[0] * 8.5))  # characters of the bold title font per line
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in text.splitlines() or [""]), fontweight="bold")


def _num(df: pd.DataFrame, cols: Iterable[str], what: str) -> pd.DataFrame:
    """``df`` with ``cols`` numeric; a non-number is a one-line error."""
    df = df.copy()
    for c in cols:
        if c not in df.columns:
            continue
        conv = pd.to_numeric(df[c], errors="coerce")
        bad = conv.isna() & df[c].notna() & (df[c].astype(str).str.strip() != "")
        if bad.any():
            raise AtprobeError(f"{what}: column {c!r} holds {df[c][bad].iloc[0]!r}, not a number")
        df[c] = conv
    return df


def _short(values: pd.Series) -> pd.Series:
    """Path-like values (checkpoints) shortened to what tells them apart."""
    uniq = list(dict.fromkeys(values.astype(str)))
    return values.astype(str).map(dict(zip(uniq, short_names(uniq))))


def _order(values: pd.Series) -> list:
    return list(dict.fromkeys(values.tolist()))


def _palette(order: Sequence, name: str = PALETTE) -> dict:
    sns = _sns()
    return dict(zip(order, sns.color_palette(name, max(len(order), 1))))


def _log_if_wide(ax: Axes, values: Iterable[float], axis: str = "y", decades: float = 1.5) -> bool:
    """Log scale when the positive values span more than ``decades`` decades."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0 or (v <= 0).any():
        return False
    if np.log10(v.max() / v.min()) > decades:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        return True
    return False


def _log_ticks(ax: Axes, axis: str = "y") -> None:
    """Plain-number labels on a log axis (0.5, 1, 20 rather than 5x10^-1); over less than
    about a decade the minor ticks (2, 3, 5 x 10^k, or all of them) are labelled too."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    which = ax.yaxis if axis == "y" else ax.xaxis
    if which.get_scale() != "log":
        return
    lo, hi = sorted(ax.get_ylim() if axis == "y" else ax.get_xlim())
    span = math.log10(hi / lo) if lo > 0 and hi > 0 else 99.0

    def plain(v, _pos=None) -> str:
        return f"{v:.3g}"

    def minor(v, _pos=None) -> str:
        if v <= 0:
            return ""
        mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9))
        keep = range(10) if span < 0.6 else (2, 3, 5) if span < 1.0 else (2, 5)
        return plain(v) if mantissa in keep else ""

    which.set_major_formatter(FuncFormatter(plain))
    which.set_minor_formatter(FuncFormatter(minor) if span < 1.6 else NullFormatter())


def _figure_legend(fig: Figure, axes: Sequence[Axes], title: str | None = None) -> None:
    """One legend for the figure, right of the panels, from the axes' own legends (merged,
    each label once); the per-axes legends are removed."""
    handles, labels = [], []
    if title is None:  # a hue-only seaborn legend names its column in the title
        first = next((ax.get_legend() for ax in axes if ax.get_legend() is not None), None)
        title = (first.get_title().get_text() or None) if first is not None else None
    for ax in axes:
        legend = ax.get_legend()
        if legend is not None and legend.get_texts():  # seaborn's own (histplot's has no labelled artists)
            h = list(getattr(legend, "legend_handles", None) or legend.legendHandles)  # the latter: mpl < 3.7
            lab = [t.get_text() for t in legend.get_texts()]
        else:
            h, lab = ax.get_legend_handles_labels()
        seen = set(labels)  # within one axes every entry stays (a header may equal a value)
        for hh, ll in zip(h, lab):
            if ll not in seen and not ll.startswith("_"):
                handles.append(hh)
                labels.append(ll)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if len(labels) > 1 or (labels and labels[0]):
        try:
            fig.legend(handles, labels, loc="outside right center", title=title, frameon=False)
        except ValueError:  # matplotlib < 3.7: no "outside" placement
            fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), title=title, frameon=False)


def _band(ax: Axes, x, y, err, color, alpha: float = 0.18, positive: bool = False) -> None:
    """``y ± err``; ``positive`` (a log axis): the lower edge at least 5% of ``y``, as the bar
    whiskers of :func:`_bar_errors`, so that a std larger than the mean does not reach 0."""
    x, y, err = (np.asarray(v, dtype=float) for v in (x, y, err))
    ok = np.isfinite(err)
    lower = y - (np.minimum(err, 0.95 * y) if positive else err)
    if ok.any():
        ax.fill_between(x[ok], lower[ok], (y + err)[ok], color=color, alpha=alpha, linewidth=0)


def _lines(ax: Axes, df: pd.DataFrame, x: str, y: str, hue: str, *, err: str | None = None,
           style: str | None = None, palette: dict | None = None, style_order: list | None = None,
           legend: bool = True, positive: bool = False) -> None:
    """One line per ``hue`` value (colour) and ``style`` value (dashes and markers), with an
    optional ``y ± err`` band. The column names are the legend's headers."""
    sns = _sns()
    order = _order(df[hue])
    palette = palette or _palette(order)
    style = style if style is not None and df[style].nunique() > 1 else None
    multi = len(order) > 1 or style is not None
    points = int(df.groupby([hue] + ([style] if style else []), sort=False).size().max())
    kw = {"marker": "o"} if style is None and points <= 40 else {}
    sns.lineplot(data=df, x=x, y=y, hue=hue, hue_order=order, palette=palette, style=style,
                 style_order=style_order if style else None, markers=style is not None and points <= 40,
                 dashes=True, errorbar=None, estimator=None, sort=True, ax=ax,
                 legend="auto" if (legend and multi) else False, markersize=5, linewidth=1.6, **kw)
    if err is not None and err in df.columns:
        for key, g in df.groupby([hue] + ([style] if style else []), sort=False):
            g = g.sort_values(x)
            _band(ax, g[x], g[y], g[err], palette[key[0] if isinstance(key, tuple) else key], positive=positive)


def _epoch_axis(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# ---------------------------------------------------------------------------- kinds


def _series(df: pd.DataFrame, parts: Sequence[tuple]) -> tuple[str, pd.Series]:
    """``(legend header, label per row)`` from the ``(header, column)`` parts whose values vary
    (``("", "")`` when none does), e.g. ``("run | group", "pgd | noisy")``. A part whose value
    follows from the parts before it is left out, unless it is ``(header, column, True)``."""
    varying: list[tuple[str, str]] = []
    for h, c, *keep in parts:
        if c not in df.columns or df[c].astype(str).nunique() < 2:
            continue
        if varying and not keep and (df.astype({k: str for _, k in varying}).groupby([k for _, k in varying])[c]
                                     .nunique(dropna=False) <= 1).all():
            continue  # told by the parts already taken (e.g. the checkpoint of each file)
        varying.append((h, c))
    if not varying:
        return "", pd.Series([""] * len(df), index=df.index, dtype=object)
    header = " | ".join(h for h, _ in varying)
    return header, df[[c for _, c in varying]].astype(str).agg(" | ".join, axis=1)


def _dirs(paths: pd.Series) -> pd.Series:
    return _short(paths.map(lambda c: str(Path(str(c)).parent)))


def _empty(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in the table", ha="center", va="center", transform=ax.transAxes,
            color="0.4")


def _named(df: pd.DataFrame, column: str, header: str) -> pd.DataFrame:
    """``df`` with ``column`` renamed to ``header`` (a column already of that name is replaced)."""
    return df.drop(columns=[header], errors="ignore").rename(columns={column: header})


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


# ---------------------------------------------------------------------------- kinds of the Sec. 3.3 / 4.1 probes


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


@register("hardness", ("index", "label", "true_label", "model", "adv_loss", "adv_correct", "rank"),
          "atprobe hardness's per_sample.csv: every model's adversarial loss per sample, sorted by the first "
          "model's (Fig. 7(c))")
def hardness_sorted(data: Data, *, title: str | None = None) -> Figure:
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


@register("flatness_curve", ("direction", "lam", "n", "adv_loss", "adv_acc", "nat_loss", "nat_acc"),
          "atprobe flatness --curve's .curve.csv: adversarial and natural loss and accuracy along random "
          "filter-normalized directions (Fig. 6's flatness; Wu et al. 2020)")
def flatness_curve(data: Data, *, title: str | None = None) -> Figure:
    """Left: loss against the step lam (adversarial solid, natural dashed); right: the
    accuracies. Line: mean over directions; band: ± the std over directions (several)."""
    df = _num(_data(data, "flatness_curve"), ["direction", "lam", "n", "adv_loss", "adv_acc", "nat_loss", "nat_acc"],
              "flatness_curve")
    df["ck"] = _short(df["checkpoint"]) if "checkpoint" in df.columns else ""
    header, df["_s"] = _series(df, [("run", "source"), ("checkpoint", "ck"), ("split", "split"),
                                    ("labels", "labels")])
    ndir = int(df.groupby("_s")["direction"].nunique().max())
    long = []
    for inputs, prefix in (("adversarial", "adv"), ("natural", "nat")):
        g = df.groupby(["_s", "lam"], sort=False)[[f"{prefix}_loss", f"{prefix}_acc"]]
        stats = g.mean().join(g.std(ddof=0).add_suffix("_std")).reset_index()
        stats.columns = ["_s", "lam", "loss", "acc", "loss_std", "acc_std"]
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
            _lines(ax, long, "lam", y, hue, err=f"{y}_std" if ndir > 1 else None, style="inputs",
                   style_order=["adversarial", "natural"])
            ax.set_xlabel("step λ along d (relative to each filter's norm)")
            ax.set_ylabel(ylabel + (f"\n(mean over {ndir} directions, band ± std)" if ndir > 1 else ""))
            ax.axvline(0.0, color="0.5", linewidth=0.8, linestyle=":")
        axes[0].set_title("loss at θ + λd (PGD re-crafted at every point)", fontsize="medium")
        axes[1].set_title("accuracy at θ + λd", fontsize="medium")
        _figure_legend(fig, axes)
        _title(fig, title, f"Weight loss landscape along random directions (cf. {PAPER}, Fig. 6; Wu et al. 2020)")
    return fig


def _bars(ax: Axes, df: pd.DataFrame, x: str, y: str, hue: str | None, err: str | None = None,
          order: list | None = None) -> None:
    """Grouped bars with optional ± ``err`` whiskers, matched through each bar's position."""
    sns = _sns()
    from matplotlib.container import BarContainer

    order = order or _order(df[x])
    levels = _order(df[hue]) if hue else [None]
    sns.barplot(data=df, x=x, y=y, hue=hue, order=order, hue_order=levels if hue else None,
                palette=PALETTE if hue else None, color=None if hue else sns.color_palette(PALETTE)[0],
                errorbar=None, ax=ax)
    if err is None or err not in df.columns:
        return
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    for cont, level in zip(bars, levels):
        g = df if level is None else df[df[hue] == level]
        for bar in cont.patches:
            i = int(round(bar.get_x() + bar.get_width() / 2))
            rows = g[g[x] == order[i]] if 0 <= i < len(order) else g.iloc[:0]
            if len(rows) == 1 and np.isfinite(rows[err].iloc[0]) and np.isfinite(rows[y].iloc[0]):
                ax.errorbar(bar.get_x() + bar.get_width() / 2, rows[y].iloc[0], yerr=rows[err].iloc[0],
                            color="0.2", capsize=3, linewidth=1)


def _rotate(ax: Axes, labels: int) -> None:
    if labels > 4:
        ax.tick_params(axis="x", labelrotation=30)
        for t in ax.get_xticklabels():
            t.set_horizontalalignment("right")


@register("flatness", ("loss", "radius", "directions", "n", "at_theta", "at_radius", "increase", "increase_std"),
          "atprobe flatness's summary: mean loss increase at radius r per checkpoint (Fig. 6's flatness)")
def flatness(data: Data, *, title: str | None = None) -> Figure:
    """Bars: the mean increase of the adversarial and natural loss from theta to the points at
    ±r, per checkpoint (± std over directions and signs). Larger = sharper."""
    df = _num(_data(data, "flatness"), ["radius", "directions", "n", "at_theta", "at_radius", "increase",
                                        "increase_std"], "flatness")
    df["ck"] = _short(df["checkpoint"]) if "checkpoint" in df.columns else df["source"]
    header, df["_s"] = _series(df, [("run", "source"), ("checkpoint", "ck"), ("split", "split"),
                                    ("labels", "labels")])
    df["_s"] = df["_s"] if header else df["ck"]
    df["inputs"] = df["loss"].astype(str).map({"adv": "adversarial", "nat": "natural"}).fillna(df["loss"])
    radii = sorted(set(df["radius"].dropna()))
    width = min(16.0, max(8.0, 2.5 + 0.9 * df["_s"].nunique()))
    with _style():
        fig, axes = _figure(1, (width, 4.4))
        ax = axes[0]
        _bars(ax, df, "_s", "increase", "inputs", err="increase_std")
        ax.set_xlabel(header or "checkpoint")
        ax.set_ylabel("mean loss increase at ±r (nats)")
        ax.set_title(f"radius r = {', '.join(f'{r:g}' for r in radii)} (filter-normalized), "
                     f"{int(df['directions'].max())} directions; larger = sharper", fontsize="medium")
        ax.axhline(0, color="0.3", linewidth=0.8)
        _rotate(ax, df["_s"].nunique())
        _figure_legend(fig, axes)
        _title(fig, title, f"Flatness of the loss landscape (cf. {PAPER}, Fig. 6)")
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
    df["ck"] = _short(df["checkpoint"]) if "checkpoint" in df.columns else df["source"]
    header, df["_s"] = _series(df, [("run", "source"), ("checkpoint", "ck"), ("at", "at"), ("split", "split"),
                                    ("labels", "labels")])
    df["_s"] = df["_s"] if header else df["ck"]
    statistic = df["statistic"].astype(str)
    stats = df[~statistic.isin(["std", "converged"])]  # eigenvalue units only; std as whiskers
    std = df[statistic == "std"].set_index("_s")["value"]
    converged = df[statistic == "converged"].set_index("_s")["value"]
    stats = stats.assign(std=np.where(stats["statistic"] == "mean", stats["_s"].map(std), np.nan))
    width = min(16.0, max(8.0, 2.5 + 0.9 * stats["_s"].nunique()))
    with _style():
        fig, axes = _figure(1, (width, 4.4))
        ax = axes[0]
        _bars(ax, stats, "_s", "value", "statistic", err="std")
        ax.set_xlabel(header or "checkpoint")
        ax.set_ylabel("input-Hessian dominant eigenvalue")
        n = sorted(set(df["n"].dropna().astype(int)))
        note = f"over n = {', '.join(map(str, n))} samples; mean ± std"
        if len(converged):
            note += "; converged: " + ", ".join(f"{v:.0%}" for v in converged)
        ax.set_title(note, fontsize="medium")
        _log_if_wide(ax, stats["value"])
        _log_ticks(ax)
        _rotate(ax, stats["_s"].nunique())
        _figure_legend(fig, axes)
        _title(fig, title, f"Input-space curvature (cf. {PAPER}, Fig. 6)")
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
