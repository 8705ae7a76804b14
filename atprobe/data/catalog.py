"""The dataset names :func:`~atprobe.data.load_dataset` accepts and the folder they live in."""

from __future__ import annotations

import os
import pathlib

from atprobe.errors import AtprobeError

#: The datasets a model can be trained on.
DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "svhn", "npz", "synthetic")
#: The datasets that only probe models: a corrupted test split (``atprobe.data.corrupted``) beside
#: the clean dataset's train split.
TEST_ONLY_DATASETS: tuple[str, ...] = ("cifar10c", "cifar100c")
#: Every name :func:`~atprobe.data.load_dataset` accepts.
PROBE_DATASETS: tuple[str, ...] = DATASETS + TEST_ONLY_DATASETS
#: Classes of the datasets whose class count is known before reading them (npz: read off its labels).
NUM_CLASSES: dict[str, int] = {"cifar10": 10, "cifar100": 100, "svhn": 10, "synthetic": 10, "cifar10c": 10,
                               "cifar100c": 100}


def default_data_dir() -> pathlib.Path:
    """Where datasets live unless a ``data_dir`` is given.

    ``$ATPROBE_DATA_DIR`` if set (and non-empty), else ``~/.cache/atprobe/data``.
    """
    env = os.environ.get("ATPROBE_DATA_DIR", "").strip()
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "atprobe" / "data"


def resolve_dir(data_dir: str | os.PathLike[str] | None) -> pathlib.Path:
    return default_data_dir() if data_dir is None else pathlib.Path(data_dir).expanduser()


def check_name(name: str) -> str:
    key = str(name).strip().lower()
    if key not in PROBE_DATASETS:
        raise AtprobeError(f"unknown dataset {name!r}; choose one of {', '.join(PROBE_DATASETS)}")
    return key
