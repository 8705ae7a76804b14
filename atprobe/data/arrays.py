"""Numpy image and label arrays as the tensors a :class:`~atprobe.data.Split` holds: the layout,
dtype and range rules every file format (``npz``, ``.npy`` pairs, CIFAR-10-C) shares.

Images may be stored either way round: NHWC ``(N, H, W, C)`` (numpy/TensorFlow releases:
the generated-data ``.npz`` files, TRADES' ``.npy``, CIFAR-10-C) or NCHW ``(N, C, H, W)``
(PyTorch dumps), C = 1 or 3, as uint8 0..255 or float in [0, 1]; they come out NCHW.
"""

from __future__ import annotations

import numpy as np
import torch

from atprobe.data.types import np_to_tensor
from atprobe.errors import AtprobeError

_CHANNELS = (1, 3)


def _channels_last(shape: tuple[int, ...], where: str) -> bool:
    """True for NHWC, False for NCHW; an error when the shape is neither or could be both."""
    last, first = shape[3] in _CHANNELS, shape[1] in _CHANNELS
    if last and first:
        raise AtprobeError(
            f"{where}: shape {shape} could be NHWC or NCHW; store the images as (N, H, W, C) with H, W > 3"
        )
    if not (last or first):
        raise AtprobeError(
            f"{where}: images must be (N, H, W, C) or (N, C, H, W) with C = 1 or 3 "
            f"(CIFAR: N x 32 x 32 x 3 or N x 3 x 32 x 32), got shape {shape}"
        )
    return last


def images_to_tensor(x: np.ndarray, where: str) -> torch.Tensor:
    """``x`` (NHWC or NCHW, uint8 or float in [0, 1]) as a contiguous NCHW uint8/float32 tensor.

    Float images are checked to be finite and in [0, 1] (a model probed on 0..255 floats or on
    normalized images would be silently wrong); uint8 are taken as 0..255.
    """
    if x.ndim != 4:
        raise AtprobeError(f"{where}: images must be 4-D (N, H, W, C) or (N, C, H, W), got shape {x.shape}")
    if x.shape[0] == 0:
        raise AtprobeError(f"{where}: holds no images")
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise AtprobeError(f"{where}: images have dtype {x.dtype}; expected uint8 0..255 or float in [0, 1]")
    if _channels_last(x.shape, where):
        x = x.transpose(0, 3, 1, 2)
    if x.dtype == np.uint8:
        return np_to_tensor(x)
    if not np.isfinite(x).all():
        raise AtprobeError(f"{where}: float images contain NaN or inf")
    lo, hi = x.min(), x.max()
    if lo < 0 or hi > 1:
        raise AtprobeError(
            f"{where}: float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
            "(0..255 floats: store them as uint8)"
        )
    return np_to_tensor(x.astype(np.float32, copy=False))


def labels_to_tensor(y: np.ndarray, n: int, where: str) -> torch.Tensor:
    """``y`` (integer ``(n,)`` or ``(n, 1)``, >= 0) as an int64 tensor."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise AtprobeError(f"{where}: labels must be an integer vector, got {y.dtype} {y.shape}")
    if y.shape[0] != n:
        raise AtprobeError(f"{where}: {n} images but {y.shape[0]} labels")
    if n and y.min() < 0:
        raise AtprobeError(f"{where}: labels must be >= 0, got {y.min()}")
    return np_to_tensor(y.astype(np.int64))
