"""Device-resident mini-batches and the standard crop + flip augmentation, all on the
accelerator (no per-sample Python work, no host synchronisation in the loop)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from atprobe.data.checks import check_int
from atprobe.data.types import Batch, Split
from atprobe.errors import AtprobeError


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise AtprobeError(
            f"generator is on {generator.device} but the data is on {device}; "
            f"use torch.Generator(device={str(device)!r})"
        )


def _draw_crop_flip(
    n: int, padding: int, generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample crop offsets ``(n, 2)`` in [0, 2*padding] (row, col) and flips ``(n,)``."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=device)
    flips = torch.rand(n, generator=generator, device=device) < 0.5
    return offsets, flips


def _crop_flip_with(
    x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int
) -> torch.Tensor:
    """Crop each zero-padded image at its offset, then mirror it where ``flips`` is set.

    ``out[i, :, r, c] = pad(x)[i, :, offsets[i, 0] + r, offsets[i, 1] + c']`` with
    ``c' = W - 1 - c`` for flipped samples: one vectorised gather, no per-sample loop.
    """
    n, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding)) if padding else x
    dev = x.device
    cols = torch.arange(w, device=dev)
    cols = torch.where(flips[:, None], (w - 1) - cols, cols) + offsets[:, 1:2]  # (n, w)
    rows = torch.arange(h, device=dev) + offsets[:, 0:1]  # (n, h)
    b = torch.arange(n, device=dev)[:, None, None, None]
    ch = torch.arange(c, device=dev)[None, :, None, None]
    return xp[b, ch, rows[:, None, :, None], cols[:, None, None, :]]


def random_crop_flip(
    x: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4
) -> torch.Tensor:
    """Standard CIFAR augmentation for a batch, on its device.

    Equivalent to torchvision ``RandomCrop(H, padding=padding)`` (zero fill) followed by
    ``RandomHorizontalFlip(0.5)`` per sample. ``generator`` must be on ``x``'s device.
    Works for uint8 or float images; the output has the input's dtype and shape.
    """
    padding = check_int(padding, "padding")
    if padding < 0:
        raise AtprobeError(f"padding must be >= 0, got {padding}")
    if x.ndim != 4:
        raise AtprobeError(f"random_crop_flip expects (B, C, H, W) images, got shape {tuple(x.shape)}")
    _check_generator(generator, x.device)
    offsets, flips = _draw_crop_flip(x.shape[0], padding, generator, x.device)
    return _crop_flip_with(x, offsets, flips, padding)


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool = False,
    augment: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    channels_last: bool = False,
) -> Iterator[Batch]:
    """Mini-batches of a split that already lives on the target device.

    Each epoch (one call) visits every sample once (the last partial batch is dropped
    if ``drop_last``). Batches are slices (or, with ``shuffle``, gathers through a
    device-side ``randperm``) converted to float32 in [0, 1] on the device, optionally
    augmented with :func:`random_crop_flip` and laid out channels-last. No per-sample
    Python work and no host synchronisation happen inside the loop.

    Args:
        split: the data, already ``split.to(device)``.
        batch_size: samples per batch.
        shuffle: random order (``torch.randperm`` on the split's device).
        augment: random crop (padding 4) + horizontal flip.
        generator: RNG for the permutation and augmentation, on the split's device;
            ``None`` uses the device's global RNG.
        drop_last: skip a final batch smaller than ``batch_size``.
        channels_last: return ``x`` in ``torch.channels_last`` memory format.
    """
    # Validate eagerly (a generator function would only fail at the first next()).
    batch_size = check_int(batch_size, "batch_size")
    if batch_size < 1:
        raise AtprobeError(f"batch_size must be >= 1, got {batch_size}")
    _check_generator(generator, split.x.device)
    return _batches(split, batch_size, shuffle, augment, generator, drop_last, channels_last)


def _batches(
    split: Split,
    batch_size: int,
    shuffle: bool,
    augment: bool,
    generator: torch.Generator | None,
    drop_last: bool,
    channels_last: bool,
) -> Iterator[Batch]:
    n = len(split)
    order = torch.randperm(n, generator=generator, device=split.x.device) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        if order is None:
            # Slices are views: copy labels so callers can never write into the split.
            x = split.x[start:end]
            y, true_y, index = (t[start:end].clone() for t in (split.y, split.true_y, split.index))
        else:
            rows = order[start:end]
            x = split.x.index_select(0, rows)
            y, true_y, index = (t.index_select(0, rows) for t in (split.y, split.true_y, split.index))
        if augment:  # crop before converting: uint8 moves 4x fewer bytes
            x = random_crop_flip(x, generator)
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div_(255)
        elif order is None and not augment:
            x = x.clone()  # a float32 slice is a view of the split: never hand that out
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield Batch(x=x, y=y, true_y=true_y, index=index)
