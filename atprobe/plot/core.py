"""The machinery under every figure of :mod:`atprobe.plot`: the registry of kinds of CSV
(:data:`KINDS`, :func:`register`, :func:`detect_kind`), reading and concatenating tables
(:func:`read`, :func:`load`, :func:`plot`), :func:`save_figure`, and the shared drawing
helpers (an Agg figure without pyplot, seaborn style, lines with bands, bars with whiskers,
log axes, one merged legend). The figures themselves are in the family modules.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import numpy as np
import pandas as pd

from atprobe.errors import AtprobeError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Runtime type aliases: evaluated at import (the __future__ import postpones annotations only).
Source = Union[pd.DataFrame, str, os.PathLike]  # noqa: UP007 (runtime alias)
Data = Union[Source, Sequence[Source], Mapping[str, Source]]  # noqa: UP007 (runtime alias)

PAPER = "Dong et al. 2022"
FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}
PALETTE = "colorblind"


# ---------------------------------------------------------------------------- registry


class Kind(NamedTuple):
    """A kind of CSV: the columns that identify it, its drawing function, one line on it;
    ``auto`` False: never recognized from the columns, only named (``--kind``), for a
    second figure of a table that another kind draws by default."""

    columns: tuple[str, ...]
    function: Callable[..., Figure]
    description: str
    auto: bool = True


KINDS: dict[str, Kind] = {}


def register(name: str, columns: Iterable[str], description: str, *, auto: bool = True) -> Callable:
    """Decorator adding a drawing function ``f(data, *, title=None) -> Figure`` to ``KINDS``."""

    def deco(function: Callable) -> Callable:
        KINDS[name] = Kind(tuple(columns), function, description, auto)
        return function

    return deco


def _kind_names() -> str:
    return ", ".join(KINDS)


def _matching(columns: Iterable[str]) -> list[str]:
    have = set(map(str, columns))
    found = [name for name, kind in KINDS.items() if kind.auto and set(kind.columns) <= have]
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
                "loss", "attack", "norm", "model", "model_a", "model_b", "measure", "variant", "reason",
                "dataset", "arch", "train_norm", "eval_attack")


def _read_csv(path: Path) -> pd.DataFrame:
    """The table at ``path``; an ``atprobe train`` run directory is its ``curves.csv`` with the
    run's config fields as columns (``atprobe.runs.run_curves``)."""
    if not path.exists():
        raise AtprobeError(f"no such file: {path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AtprobeError(f"{path} is a directory, not a CSV file (nor a run directory with config.json)")
        from atprobe.runs import run_curves

        return run_curves(path)
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


# ---------------------------------------------------------------------------- helpers of the kinds


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


def _checkpoint_series(df: pd.DataFrame, parts: Sequence[tuple]) -> str:
    """Label the rows of a per-checkpoint summary, in place: ``df["ck"]``, the short name of
    the checkpoint (of the source file where the table names none), and ``df["_s"]``, the
    series of :func:`_series` over ``parts`` (which may use ``"ck"``), or the checkpoint where
    no part varies. Returns the series' legend header (``""`` then)."""
    df["ck"] = _short(df["checkpoint"]) if "checkpoint" in df.columns else df["source"]
    header, df["_s"] = _series(df, parts)
    df["_s"] = df["_s"] if header else df["ck"]
    return header


@contextlib.contextmanager
def _checkpoint_bars(df: pd.DataFrame, y: str, hue: str, err: str, header: str, title: str | None,
                     default_title: str):
    """A one-panel figure of :func:`_bars` of ``y`` per series ``df["_s"]`` (see
    :func:`_checkpoint_series`), coloured by ``hue`` with ``err`` whiskers, as wide as the
    series need. Yields ``(fig, ax)`` inside the style for the caller's labels and scales;
    afterwards turns crowded tick labels, merges the legend and sets the title."""
    series = df["_s"].nunique()
    with _style():
        fig, axes = _figure(1, (min(16.0, max(8.0, 2.5 + 0.9 * series)), 4.4))
        ax = axes[0]
        _bars(ax, df, "_s", y, hue, err=err)
        ax.set_xlabel(header or "checkpoint")
        yield fig, ax
        _rotate(ax, series)
        _figure_legend(fig, axes)
        _title(fig, title, default_title)
