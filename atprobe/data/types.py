"""The containers every data module hands out: :class:`Split`, :class:`Dataset`, :class:`Batch`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from atprobe.errors import AtprobeError


@dataclass(frozen=True)
class Split:
    """One split of a dataset, as whole tensors (keep it on the device you train on).

    Attributes:
        x: ``(N, C, H, W)`` images, uint8 pixel values 0..255 or float32 in [0, 1].
        y: int64 ``(N,)`` labels used for training/evaluation (possibly corrupted).
        true_y: int64 ``(N,)`` the dataset's original labels.
        index: int64 ``(N,)`` row of each sample in the original split; a validation
            split carved from train keeps the train rows.

    All tensors share one device and are made contiguous on construction.
    """

    x: torch.Tensor
    y: torch.Tensor
    true_y: torch.Tensor
    index: torch.Tensor

    def __post_init__(self) -> None:
        x = self.x
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise AtprobeError(f"Split.x must be an (N, C, H, W) tensor, got {shape}")
        if x.dtype not in (torch.uint8, torch.float32):
            raise AtprobeError(f"Split.x must be uint8 or float32, got {x.dtype}")
        n = x.shape[0]
        for name in ("y", "true_y", "index"):
            t = getattr(self, name)
            if (
                not isinstance(t, torch.Tensor)
                or t.dtype != torch.int64
                or t.ndim != 1
                or t.shape[0] != n
            ):
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise AtprobeError(f"Split.{name} must be an int64 vector of length {n}, got {got}")
            if t.device != x.device:
                raise AtprobeError(f"Split.{name} is on {t.device} but Split.x is on {x.device}")
        for name in ("x", "y", "true_y", "index"):
            t = getattr(self, name)
            if not t.is_contiguous():
                # Frozen dataclass: normalise in place once so every consumer can rely on it.
                object.__setattr__(self, name, t.contiguous())

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def device(self) -> torch.device:
        """The device all tensors of the split live on."""
        return self.x.device

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Split:
        """Copy of the split with every tensor on ``device`` (a no-op copy if already there).

        A whole CIFAR train split is 150 MB as uint8, so it fits on any GPU; batches
        are then sliced on the device (:func:`iterate_batches`).
        """
        return Split(
            x=self.x.to(device, non_blocking=non_blocking),
            y=self.y.to(device, non_blocking=non_blocking),
            true_y=self.true_y.to(device, non_blocking=non_blocking),
            index=self.index.to(device, non_blocking=non_blocking),
        )

    def subset(self, rows: torch.Tensor | slice | Sequence[int]) -> Split:
        """Rows of the split: a slice, integer row numbers (into *this* split), or a bool mask.

        ``index`` travels with the rows, so a subset still knows each sample's original row.
        Integer rows are not range-checked (that would need a host sync on a GPU).
        """
        if isinstance(rows, slice):
            return Split(self.x[rows], self.y[rows], self.true_y[rows], self.index[rows])
        r = torch.as_tensor(rows, device=self.x.device)
        if r.dtype == torch.bool:
            if r.shape != (len(self),):
                raise AtprobeError(f"subset mask must have shape ({len(self)},), got {tuple(r.shape)}")
            r = r.nonzero().squeeze(1)
        elif r.dtype.is_floating_point or r.dtype.is_complex:
            raise AtprobeError(f"subset rows must be integers or a bool mask, got {r.dtype}")
        r = r.reshape(-1).long()
        return Split(self.x[r], self.y[r], self.true_y[r], self.index[r])

    def with_labels(self, y: torch.Tensor | Sequence[int] | np.ndarray) -> Split:
        """Copy of the split whose used labels are ``y`` (``true_y`` and ``index`` unchanged)."""
        t = torch.as_tensor(y)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise AtprobeError(f"labels must be integers, got {t.dtype}")
        if t.shape != (len(self),):
            raise AtprobeError(f"labels must have shape ({len(self)},), got {tuple(t.shape)}")
        t = t.to(device=self.x.device, dtype=torch.int64)
        return Split(self.x, t, self.true_y, self.index)


@dataclass(frozen=True)
class Dataset:
    """A dataset: metadata plus its splits (tensors on the CPU unless moved with :meth:`to`).

    ``mean``/``std`` are per-channel statistics of the train images in [0, 1]: the
    published constants for CIFAR-10/100 and SVHN, computed over the whole original
    train split (before any validation carve-out) for ``npz`` and ``synthetic``.
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: Split
    test: Split
    val: Split | None = None

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes:
            raise AtprobeError(
                f"dataset {self.name!r} has {self.num_classes} classes but "
                f"{len(self.class_names)} class names"
            )
        channels = self.train.x.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise AtprobeError(
                f"dataset {self.name!r}: mean/std need {channels} entries, "
                f"got {len(self.mean)}/{len(self.std)}"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        _, c, h, w = self.train.x.shape
        return (c, h, w)

    def to(self, device: torch.device | str) -> Dataset:
        """Copy with every split on ``device``."""
        return dataclasses.replace(
            self,
            train=self.train.to(device),
            test=self.test.to(device),
            val=None if self.val is None else self.val.to(device),
        )


@dataclass(frozen=True)
class Batch:
    """One mini-batch, on the device of the split it came from.

    Attributes:
        x: float32 ``(B, C, H, W)`` in [0, 1] (a fresh tensor: safe to modify).
        y: int64 labels used for training.
        true_y: int64 original labels.
        index: int64 original-split row of each sample.
    """

    x: torch.Tensor
    y: torch.Tensor
    true_y: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]


def make_split(x: torch.Tensor, y: torch.Tensor) -> Split:
    """A fresh split of an original dataset: used labels = true labels, index = row."""
    y = y.to(torch.int64)
    return Split(x=x, y=y, true_y=y.clone(), index=torch.arange(x.shape[0], dtype=torch.int64))


def np_to_tensor(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # torch.from_numpy warns on read-only memory
        a = a.copy()
    return torch.from_numpy(a)
