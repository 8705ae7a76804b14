"""The published datasets (CIFAR-10, CIFAR-100, SVHN): where their files sit on disk,
where to download them, and their published statistics."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from atprobe.data.catalog import check_name, resolve_dir
from atprobe.data.cifar import parse_cifar10, parse_cifar100
from atprobe.data.download import Fetcher, Resource, extract_tar, fetch_url
from atprobe.data.svhn import parse_svhn
from atprobe.data.types import Split
from atprobe.errors import AtprobeError

#: Published per-channel mean/std of the *train* images in [0, 1].
_PUBLISHED_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}


_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN"}


@dataclass(frozen=True)
class _Layout:
    subdirs: tuple[str, ...]  # candidate folders relative to data_dir, first = where downloads land
    files: tuple[str, ...]
    parse: Callable[[pathlib.Path], tuple[Split, Split, tuple[str, ...]]]
    size: str


_LAYOUTS: dict[str, _Layout] = {
    "cifar10": _Layout(
        ("cifar-10-batches-py", ""),
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
        parse_cifar10,
        "163 MB",
    ),
    "cifar100": _Layout(("cifar-100-python", ""), ("train", "test", "meta"), parse_cifar100, "161 MB"),
    # torchvision puts the .mat files directly in its root; also accept a svhn/ subfolder.
    "svhn": _Layout(("", "svhn"), ("train_32x32.mat", "test_32x32.mat"), parse_svhn, "246 MB"),
}


def locate_published(key: str, root: pathlib.Path) -> pathlib.Path | None:
    """The first candidate folder holding every file of the dataset, else None."""
    for sub in _LAYOUTS[key].subdirs:
        folder = root / sub if sub else root
        if all((folder / f).is_file() for f in _LAYOUTS[key].files):
            return folder
    return None


def _missing_error(key: str, root: pathlib.Path) -> AtprobeError:
    layout = _LAYOUTS[key]
    folders = " or ".join(str(root / s) if s else str(root) for s in layout.subdirs)
    return AtprobeError(
        f"{_PRETTY[key]} not found: looked for {', '.join(layout.files)} in {folders}; "
        f"pass --download (download=True) to fetch it ({layout.size}), "
        f"or point data_dir / ATPROBE_DATA_DIR at an existing copy"
    )


#: Published sources. Tests (or mirrors) may substitute entries: ``SOURCES["cifar10"] = (...)``.
SOURCES: dict[str, tuple[Resource, ...]] = {
    "cifar10": (
        Resource(
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
            extract=True,
        ),
    ),
    "cifar100": (
        Resource(
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            "cifar-100-python.tar.gz",
            "eb9058c3a382ffc7106e4002c42a8d85",
            extract=True,
        ),
    ),
    "svhn": (
        Resource(
            "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
            "train_32x32.mat",
            "e26dedcc434d2e4c54c9b2d4a06d8373",
        ),
        Resource(
            "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
            "test_32x32.mat",
            "eb5a983be6a315427106f1b164d9cef3",
        ),
    ),
}


def download_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    fetch: Fetcher | None = None,
    sources: Sequence[Resource] | None = None,
) -> pathlib.Path:
    """Make sure ``name`` (cifar10, cifar100 or svhn) is present under ``data_dir``.

    Returns the folder the parser reads (e.g. ``data_dir/cifar-10-batches-py``). A complete
    existing copy (torchvision layout) is used as is, without any network access;
    otherwise each file in ``sources`` (default ``SOURCES[name]``) is fetched with
    :func:`fetch_url` (resume + MD5) and archives are extracted into ``data_dir``.
    Archives are kept next to the data so a re-extraction needs no download.
    """
    key = check_name(name)
    if key not in _LAYOUTS:
        raise AtprobeError(f"dataset {key!r} cannot be downloaded (only {', '.join(_LAYOUTS)})")
    root = resolve_dir(data_dir)
    found = locate_published(key, root)
    if found is not None:
        return found
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AtprobeError(f"cannot create data folder {root}: {e}") from e
    for res in SOURCES[key] if sources is None else sources:
        path = fetch_url(res.url, root / res.filename, res.md5, fetch=fetch)
        if res.extract:
            extract_tar(path, root)
    found = locate_published(key, root)
    if found is None:
        raise AtprobeError(
            f"downloaded {_PRETTY[key]} but {', '.join(_LAYOUTS[key].files)} are still missing under {root}"
        )
    return found


def load_published(
    key: str, data_dir: str | os.PathLike[str] | None, *, download: bool
) -> tuple[Split, Split, tuple[str, ...], tuple[float, ...], tuple[float, ...]]:
    """``(train, test, class_names, mean, std)`` of the published dataset ``key`` (a checked name).

    Reads an existing copy under ``data_dir``; a missing one is fetched if ``download``,
    else an error says where we looked and how to get it.
    """
    root = resolve_dir(data_dir)
    folder = locate_published(key, root)
    if folder is None:
        if not download:
            raise _missing_error(key, root)
        folder = download_dataset(key, root)
    train, test, class_names = _LAYOUTS[key].parse(folder)
    mean, std = _PUBLISHED_STATS[key]
    return train, test, class_names, mean, std
