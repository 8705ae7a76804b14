"""Options and helpers every command shares (click conventions: typed options, help text)."""

from __future__ import annotations

import functools
import sys
from fractions import Fraction
from typing import Any, Callable

import click
from tqdm import tqdm

from atprobe.data import DATASETS
from atprobe.errors import AtprobeError


class Number(click.ParamType):
    """A float that may be written as a fraction: ``8/255``, ``0.5``, ``1e-3``."""

    name = "number"

    def convert(self, value: Any, param, ctx) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip()
        try:
            number = float(Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):
            self.fail(f"{value!r} is not a number (examples: 8/255, 0.031, 1e-3)", param, ctx)
        if number != number or number in (float("inf"), float("-inf")):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


NUMBER = Number()


def common_options(func: Callable) -> Callable:
    """``--device``, ``--batch-size``, ``--seed``, ``--quiet``."""

    @click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                  help="Where to compute; auto = first GPU if any, else CPU.")
    @click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
                  help="Samples per batch.")
    @click.option("--seed", type=int, default=0, show_default=True,
                  help="Seeds every random choice; same seed on the CPU, same CSV.")
    @click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def data_options(func: Callable) -> Callable:
    """``--dataset``, ``--data-dir``, ``--download``."""

    @click.option("--dataset", type=click.Choice(DATASETS), default=None,
                  help="Dataset to use (default: the one the checkpoints record).")
    @click.option("--data-dir", type=click.Path(), default=None,
                  help="Where datasets live (default $ATPROBE_DATA_DIR or ~/.cache/atprobe/data); "
                       "for npz, the .npz file or a folder with train.npz/test.npz.")
    @click.option("--download", is_flag=True, help="Fetch a missing dataset (MD5-verified).")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def foreign_options(func: Callable) -> Callable:
    """How to read checkpoints that atprobe did not write."""

    @click.option("--arch", default=None, metavar="NAME",
                  help="Architecture of foreign checkpoints (bare state_dicts), e.g. wrn-34-10.")
    @click.option("--num-classes", type=click.IntRange(min=2), default=None,
                  help="Classes of foreign checkpoints (default: read off the classifier weights).")
    @click.option("--normalize", type=click.Choice(["none", "dataset"]), default="none", show_default=True,
                  help="Input normalization for foreign checkpoints: none = the weights take [0,1] "
                       "images (TRADES, MART, AWP); dataset = subtract the dataset mean, divide by std.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def progress(total: int, desc: str, quiet: bool) -> tqdm:
    """A progress bar on stderr, silent when asked or when stderr is not a terminal."""
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False,
                disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)


def split_list(value: str, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise AtprobeError(f"{what}: give at least one, comma-separated")
    return items
