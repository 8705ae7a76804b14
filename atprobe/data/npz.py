"""User array files (the ``npz`` dataset): one ``.npz`` archive, a folder with ``train.npz``/``test.npz``,
or an image ``.npy`` with its label ``.npy`` beside it (``cifar10_X.npy`` + ``cifar10_Y.npy``).

An archive holds one pair of arrays under the names the published releases use
(:data:`KEY_PAIRS`): ``x``/``y``, ``image``/``label`` (the generated-data ``.npz`` files of
Wang et al. 2023 and DeepMind) or ``data``/``targets`` (torchvision-style dumps); test arrays,
if any, are the same names with ``_test`` appended. Layouts and value ranges are checked by
:mod:`atprobe.data.arrays`.
"""

from __future__ import annotations

import os
import pathlib
import zipfile
from typing import Any

import numpy as np

from atprobe.data.arrays import images_to_tensor, labels_to_tensor
from atprobe.data.types import Split, make_split
from atprobe.errors import AtprobeError

#: (images, labels) array names an archive may use, in the order the error lists them.
KEY_PAIRS: tuple[tuple[str, str], ...] = (("x", "y"), ("image", "label"), ("data", "targets"))
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)


def _pairs_text() -> str:
    return ", ".join(f"{x}/{y}" for x, y in KEY_PAIRS)


def _key_pair(arrays: Any, source: pathlib.Path) -> tuple[str, str]:
    """The one pair of :data:`KEY_PAIRS` the archive holds (an error naming what it has otherwise)."""
    found = [(x, y) for x, y in KEY_PAIRS if x in arrays.files and y in arrays.files]
    if not found:
        has = ", ".join(arrays.files) or "no arrays"
        raise AtprobeError(f"{source}: needs images and labels named {_pairs_text()}; the file has {has}")
    if len(found) > 1:
        raise AtprobeError(f"{source}: holds several image/label pairs ({', '.join(f'{x}/{y}' for x, y in found)}); "
                           "keep one")
    return found[0]


def _make_split(x: np.ndarray, y: np.ndarray, where_x: str, where_y: str) -> Split:
    images = images_to_tensor(x, where_x)
    return make_split(images, labels_to_tensor(y, images.shape[0], where_y))


def _archive_split(arrays: Any, xk: str, yk: str, source: pathlib.Path) -> Split:
    return _make_split(arrays[xk], arrays[yk], f"{source.name}:{xk}", f"{source.name}:{yk}")


def _open_npz(path: pathlib.Path) -> Any:
    try:
        arrays = np.load(path, allow_pickle=False)  # never unpickle user files
    except _READ_ERRORS as e:
        raise AtprobeError(f"cannot read {path}: not an .npz archive ({e})") from e
    if not hasattr(arrays, "files"):
        raise AtprobeError(f"cannot read {path}: a single .npy array, expected an .npz archive "
                           "(an image .npy needs a name ending in .npy)")
    return arrays


def _archive(path: pathlib.Path) -> tuple[Split, Split | None]:
    """``(train, test or None)`` of one archive: its pair, and the pair's ``_test`` partners if present."""
    with _open_npz(path) as arrays:
        xk, yk = _key_pair(arrays, path)
        train = _archive_split(arrays, xk, yk, path)
        xt, yt = f"{xk}_test", f"{yk}_test"
        has_xt, has_yt = xt in arrays.files, yt in arrays.files
        if has_xt != has_yt:
            raise AtprobeError(f"{path}: has {xt if has_xt else yt} without its partner")
        return train, (_archive_split(arrays, xt, yt, path) if has_xt else None)


def label_file_of(images: pathlib.Path) -> pathlib.Path:
    """The label ``.npy`` beside an image ``.npy``: the last ``X``/``x`` of the name's ``_``-separated
    parts becomes ``Y``/``y`` (TRADES' ``cifar10_X.npy`` -> ``cifar10_Y.npy``, ``x_test.npy`` -> ``y_test.npy``)."""
    parts = images.stem.split("_")
    for i in reversed(range(len(parts))):
        if parts[i] in ("X", "x"):
            parts[i] = "Y" if parts[i] == "X" else "y"
            return images.with_name("_".join(parts) + images.suffix)
    raise AtprobeError(f"{images}: an image .npy is read with the labels beside it, found by its name: call the "
                       "pair like cifar10_X.npy and cifar10_Y.npy (or x.npy and y.npy)")


def load_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """One ``.npy`` array, memory-mapped (only the rows used are read), never unpickled."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise AtprobeError(f"missing file {path}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except _READ_ERRORS as e:
        raise AtprobeError(f"cannot read {path}: not a .npy array ({e})") from e
    if not isinstance(array, np.ndarray):  # np.load opened an .npz archive
        array.close()
        raise AtprobeError(f"{path}: an .npz archive, expected one .npy array")
    return array


def _npy_pair(path: pathlib.Path) -> Split:
    labels = label_file_of(path)
    x, y = load_npy(path), load_npy(labels)
    return _make_split(x, y, path.name, labels.name)


def load_npz(data_dir: str | os.PathLike[str] | None) -> tuple[Split, Split]:
    """``(train, test)`` of the user's files at ``data_dir`` (see the module docstring); a
    source without test arrays serves as both splits."""
    if data_dir is None:
        raise AtprobeError("the npz dataset needs data_dir: a .npz file, a folder with train.npz/test.npz, "
                           "or an image .npy with its label .npy beside it")
    path = pathlib.Path(data_dir).expanduser()
    try:
        if path.is_dir():
            tr, te = path / "train.npz", path / "test.npz"
            if not tr.is_file() and not te.is_file():
                raise AtprobeError(f"no train.npz or test.npz in {path}")
            train = _archive(tr)[0] if tr.is_file() else None
            test = _archive(te)[0] if te.is_file() else None
            # A folder with only one file: that file serves as both splits.
            train, test = (train or test), (test or train)
        elif path.is_file() and path.suffix.lower() == ".npy":
            train = test = _npy_pair(path)
        elif path.is_file():
            train, test = _archive(path)
            test = test or train
        else:
            raise AtprobeError(f"npz data not found: {path} is neither a file nor a folder")
    except _READ_ERRORS as e:  # lazily read members
        raise AtprobeError(f"cannot read npz data at {path}: {e}") from e
    assert train is not None and test is not None
    if train.x.shape[1:] != test.x.shape[1:] or train.x.dtype != test.x.dtype:
        raise AtprobeError(
            f"{path}: train and test images differ: {train.x.dtype} {tuple(train.x.shape[1:])} vs "
            f"{test.x.dtype} {tuple(test.x.shape[1:])}"
        )
    return train, test
