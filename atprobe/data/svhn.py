"""Parser of the SVHN cropped-digits ``.mat`` files (``train_32x32.mat``, ``test_32x32.mat``)."""

from __future__ import annotations

import pathlib

import numpy as np

from atprobe.data.types import Split, make_split, np_to_tensor
from atprobe.errors import AtprobeError


def _read_svhn_mat(path: pathlib.Path) -> Split:
    import scipy.io  # local: scipy import is slow and only SVHN needs it

    try:
        m = scipy.io.loadmat(path, variable_names=["X", "y"])
    except FileNotFoundError:
        raise AtprobeError(f"missing file {path}") from None
    except Exception as e:  # noqa: BLE001 - scipy raises many types for foreign files
        raise AtprobeError(f"cannot read SVHN file {path}: {e}") from e
    x, y = m.get("X"), m.get("y")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else "nothing"
        raise AtprobeError(f"{path}: 'X' must be uint8 (32, 32, 3, N), got {got}")
    n = x.shape[3]
    if not isinstance(y, np.ndarray) or y.size != n or (y.ndim == 2 and y.shape[1] != 1) or y.ndim > 2:
        got = y.shape if isinstance(y, np.ndarray) else "nothing"
        raise AtprobeError(f"{path}: 'y' must have shape ({n}, 1), got {got}")
    y = y.reshape(-1)
    if n and (not np.all(np.mod(y, 1) == 0) or y.min() < 1 or y.max() > 10):
        raise AtprobeError(f"{path}: SVHN labels must be integers in 1..10")
    # The .mat files label digit 0 as 10.
    labels = y.astype(np.int64) % 10
    return make_split(np_to_tensor(x.transpose(3, 2, 0, 1)), np_to_tensor(labels))


def parse_svhn(folder: pathlib.Path) -> tuple[Split, Split, tuple[str, ...]]:
    train = _read_svhn_mat(folder / "train_32x32.mat")
    test = _read_svhn_mat(folder / "test_32x32.mat")
    return train, test, tuple(str(i) for i in range(10))
