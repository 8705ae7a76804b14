"""User ``.npz`` datasets: one file with x/y (and x_test/y_test), or a folder with train.npz/test.npz."""

from __future__ import annotations

import os
import pathlib
import zipfile
from typing import Any

import numpy as np
import torch

from atprobe.data.types import Split, make_split, np_to_tensor
from atprobe.errors import AtprobeError


def _npz_images(x: np.ndarray, where: str) -> torch.Tensor:
    if x.ndim != 4:
        raise AtprobeError(f"{where}: x must be 4-D (uint8 N,H,W,C or float N,C,H,W), got shape {x.shape}")
    if x.shape[0] == 0:
        raise AtprobeError(f"{where}: x holds no images")
    if x.dtype == np.uint8:
        if x.shape[3] not in (1, 3):
            raise AtprobeError(
                f"{where}: uint8 x must be NHWC (N, H, W, C) with C = 1 or 3, got shape {x.shape}"
            )
        return np_to_tensor(x.transpose(0, 3, 1, 2))
    if x.dtype.kind == "f":
        if x.shape[1] not in (1, 3):
            raise AtprobeError(
                f"{where}: float x must be NCHW (N, C, H, W) with C = 1 or 3, got shape {x.shape}"
            )
        if not np.isfinite(x).all():
            raise AtprobeError(f"{where}: float x contains NaN or inf")
        lo, hi = x.min(), x.max()
        if lo < 0 or hi > 1:
            raise AtprobeError(f"{where}: float x must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
        return np_to_tensor(x.astype(np.float32, copy=False))
    raise AtprobeError(
        f"{where}: x has dtype {x.dtype}; expected uint8 (N, H, W, C) or float (N, C, H, W) in [0, 1]"
    )


def _npz_labels(y: np.ndarray, n: int, where: str) -> torch.Tensor:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise AtprobeError(f"{where}: y must be an integer vector, got {y.dtype} {y.shape}")
    if y.shape[0] != n:
        raise AtprobeError(f"{where}: {n} images but {y.shape[0]} labels")
    if y.min() < 0:
        raise AtprobeError(f"{where}: labels must be >= 0, got {y.min()}")
    return np_to_tensor(y.astype(np.int64))


def _npz_split(arrays: Any, xk: str, yk: str, source: pathlib.Path) -> Split:
    if xk not in arrays or yk not in arrays:
        found = ", ".join(arrays.files) or "none"
        raise AtprobeError(f"{source}: needs arrays '{xk}' and '{yk}', found {found}")
    x = _npz_images(arrays[xk], f"{source.name}:{xk}")
    y = _npz_labels(arrays[yk], x.shape[0], f"{source.name}:{yk}")
    return make_split(x, y)


def _open_npz(path: pathlib.Path) -> Any:
    try:
        arrays = np.load(path, allow_pickle=False)  # never unpickle user files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise AtprobeError(f"cannot read {path}: not an .npz archive ({e})") from e
    if not hasattr(arrays, "files"):
        raise AtprobeError(f"cannot read {path}: a single .npy array, expected an .npz archive")
    return arrays


def load_npz(data_dir: str | os.PathLike[str] | None) -> tuple[Split, Split]:
    if data_dir is None:
        raise AtprobeError("the npz dataset needs data_dir: a .npz file or a folder with train.npz/test.npz")
    path = pathlib.Path(data_dir).expanduser()
    try:
        if path.is_dir():
            tr, te = path / "train.npz", path / "test.npz"
            if not tr.is_file() and not te.is_file():
                raise AtprobeError(f"no train.npz or test.npz in {path}")
            splits = []
            for f in (tr, te):
                if f.is_file():
                    with _open_npz(f) as arrays:
                        splits.append(_npz_split(arrays, "x", "y", f))
                else:
                    splits.append(None)
            train, test = splits
            # A folder with only one file: that file serves as both splits.
            train, test = (train or test), (test or train)
        elif path.is_file():
            with _open_npz(path) as arrays:
                train = _npz_split(arrays, "x", "y", path)
                has_xt, has_yt = "x_test" in arrays, "y_test" in arrays
                if has_xt != has_yt:
                    raise AtprobeError(f"{path}: has {'x_test' if has_xt else 'y_test'} without its partner")
                test = _npz_split(arrays, "x_test", "y_test", path) if has_xt else train
        else:
            raise AtprobeError(f"npz data not found: {path} is neither a .npz file nor a folder")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:  # lazily read members
        raise AtprobeError(f"cannot read npz data at {path}: {e}") from e
    assert train is not None and test is not None
    if train.x.shape[1:] != test.x.shape[1:] or train.x.dtype != test.x.dtype:
        raise AtprobeError(
            f"{path}: train and test images differ: {train.x.dtype} {tuple(train.x.shape[1:])} vs "
            f"{test.x.dtype} {tuple(test.x.shape[1:])}"
        )
    return train, test
