"""Training-label corruption, given training labels (a vector, a ``.npy`` file) and the seeded
train/validation partition."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import torch

from atprobe.data.checks import check_int, check_rate
from atprobe.data.npz import load_npy
from atprobe.data.types import np_to_tensor
from atprobe.errors import AtprobeError, check_seed


def _cpu_generator(seed: int) -> torch.Generator:
    # Local CPU generator: results independent of the global RNG and identical on
    # every machine/device (CUDA generators produce different streams).
    return torch.Generator(device="cpu").manual_seed(check_seed(seed))


def symmetric_label_noise(y: torch.Tensor, rate: float, num_classes: int, seed: int) -> torch.Tensor:
    """Partially corrupted labels (Zhang et al. 2017, "Understanding deep learning
    requires rethinking generalization").

    Exactly ``round(rate * N)`` samples (Python rounding, half to even), chosen by a
    seeded permutation, get a label drawn uniformly from *all* ``num_classes`` classes.
    A resampled label equals the old one with probability ``1/num_classes``, so the
    expected fraction of labels that actually change is ``rate * (1 - 1/num_classes)``;
    ``rate=1`` gives completely random labels.

    Args:
        y: int ``(N,)`` clean labels (any device; the result is on the same device).
        rate: fraction in [0, 1] of samples whose label is resampled.
        num_classes: number of classes to draw from.
        seed: the corruption is a pure function of ``(y, rate, num_classes, seed)``.

    Returns:
        int64 ``(N,)`` labels.
    """
    r = check_rate(rate)
    c = check_int(num_classes, "num_classes")
    if c < 1:
        raise AtprobeError(f"num_classes must be >= 1, got {c}")
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    if y.ndim != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise AtprobeError(f"labels must be an integer vector, got {y.dtype} {tuple(y.shape)}")
    n = y.shape[0]
    k = int(round(r * n))
    g = _cpu_generator(seed)
    # Draw on the CPU (see _cpu_generator), then apply on y's device.
    rows = torch.randperm(n, generator=g)[:k]
    new = torch.randint(0, c, (k,), generator=g, dtype=torch.int64)
    out = y.to(torch.int64, copy=True)
    out[rows.to(out.device)] = new.to(out.device)
    return out


def validation_split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random partition of ``range(n)`` into ``(train_rows, val_rows)``.

    ``val_rows`` are the first ``val_size`` entries of a seeded permutation, the rest are
    train rows; both are returned sorted (int64, CPU) so carved splits keep data order.
    """
    n = check_int(n, "n")
    val_size = check_int(val_size, "val_size")
    if val_size < 0 or (val_size > 0 and val_size >= n):
        raise AtprobeError(f"val_size must be in [0, {n}) for a train split of {n} samples, got {val_size}")
    perm = torch.randperm(n, generator=_cpu_generator(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def check_labels(labels: Any, n: int, num_classes: int, what: str = "labels") -> torch.Tensor:
    """``labels`` as an int64 CPU vector if they are integers, one per row of the original train
    split (``n``) and classes ``0..num_classes-1``; a one-line error naming ``what`` otherwise."""
    t = torch.as_tensor(labels).detach().cpu()
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise AtprobeError(f"{what} must be integers, got {t.dtype}")
    if t.shape != (n,):
        raise AtprobeError(f"{what} must cover the whole original train split ({n},), got {tuple(t.shape)}")
    t = t.to(torch.int64)
    if n and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise AtprobeError(f"{what} must be in 0..{num_classes - 1}, got {int(t.min())}..{int(t.max())}")
    return t


def read_label_file(path: str | os.PathLike[str]) -> torch.Tensor:
    """The training labels a run saved as one ``.npy`` vector (the memorization-AT code's
    ``noisy_label.npy``: int64 ``(50000,)``): an integer ``(N,)`` or ``(N, 1)`` array, read
    without unpickling. Its length and classes are checked against a dataset by :func:`check_labels`."""
    path = pathlib.Path(path)
    y = load_npy(path)
    if y.dtype.kind not in "iu":
        raise AtprobeError(f"{path}: labels must be integers, got dtype {y.dtype}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.ndim != 1:
        raise AtprobeError(f"{path}: labels must be a vector (N,), got shape {y.shape}")
    return np_to_tensor(y.astype("int64"))
