"""Device-resident mini-batches and the standard crop + flip augmentation, all on the
accelerator (no per-sample Python work, no host synchronisation in the loop), and batches
that mix the device-resident split with extra (generated) images in a fixed ratio."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from atprobe.data.checks import check_int
from atprobe.data.memmap import MappedRows, ResidentRows
from atprobe.data.types import Batch, Split
from atprobe.errors import SEED_MAX, AtprobeError, check_seed
from atprobe.runtime import make_generator
from atprobe.starts import splitmix64


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


# ---------------------------------------------------------------------------- original + extra data

#: Streams of the keyed draws of mixed batches: the order of the original samples in each pass,
#: and the extra rows of each batch (both functions of the seed and a counter, never of a state).
ORIGINAL_STREAM, EXTRA_STREAM = 0x0E1A, 0x0E1B


def check_extra_fraction(fraction: float) -> float:
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise AtprobeError(f"extra fraction must be a number in [0, 1), got {fraction!r}") from None
    if not 0.0 <= f < 1.0:  # also rejects NaN
        raise AtprobeError(f"extra fraction must be in [0, 1), got {fraction!r}")
    return f


def extra_count(batch_size: int, fraction: float) -> int:
    """Extra images in a batch: ``floor(batch_size * fraction)``, as ``int(batch_size *
    unsup_fraction)`` in Wang et al.'s sampler (a 1e-9 tolerance keeps 100 x 0.29 at 29)."""
    return int(batch_size * check_extra_fraction(fraction) + 1e-9)


def extra_positions(batch_size: int, n_extra: int) -> torch.Tensor:
    """Where a batch's extra images go: position ``i`` is extra when ``floor((i + 1) n_extra / B)``
    exceeds ``floor(i n_extra / B)``. The extra images are spread evenly, so every run of rows
    (a process's share under ``torchrun``, whose BatchNorm sees only its own) has the batch's
    ratio to within one image; the order within a batch changes nothing else."""
    i = torch.arange(batch_size)
    return ((i + 1) * n_extra) // batch_size > (i * n_extra) // batch_size


def _keyed_seed(seed: int, stream: int, counter: int) -> int:
    return splitmix64(splitmix64(splitmix64(check_seed(seed)) ^ stream) ^ counter) & SEED_MAX


def extra_rows(seed: int, batch: int, n_extra: int, n_rows: int) -> np.ndarray:
    """The extra data's rows in global batch ``batch``: ``n_extra`` uniform draws from
    ``0..n_rows-1`` with replacement (a CPU generator keyed by seed and batch number)."""
    g = torch.Generator().manual_seed(_keyed_seed(seed, EXTRA_STREAM, batch))
    return torch.randint(0, n_rows, (n_extra,), generator=g).numpy()


def original_rows(seed: int, batch: int, n_original: int, n: int, device: torch.device,
                  passes: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """The original split's rows in global batch ``batch``: positions ``[batch * k, (batch + 1) * k)``
    (``k = n_original``) of the endless stream of permutations ``perm_0, perm_1, ...`` of the
    ``n`` samples, ``perm_p`` a device ``randperm`` keyed by (seed, p). Every sample is seen once
    per pass; a pass may end inside a batch. ``passes`` caches the permutations in use."""
    passes = {} if passes is None else passes
    start, stop = batch * n_original, (batch + 1) * n_original
    pieces = []
    for p in range(start // n, (stop - 1) // n + 1):
        if p not in passes:
            for old in [q for q in passes if q < p - 1]:
                del passes[old]
            passes[p] = torch.randperm(n, generator=make_generator(_keyed_seed(seed, ORIGINAL_STREAM, p), device),
                                       device=device)
        pieces.append(passes[p][max(start - p * n, 0):min(stop - p * n, n)])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def iterate_mixed_batches(
    split: Split,
    extra: ResidentRows | MappedRows,
    extra_labels: torch.Tensor,
    batch_size: int,
    fraction: float,
    *,
    seed: int,
    first_batch: int,
    n_batches: int,
    index_base: int,
    augment: bool = False,
    generator: torch.Generator | None = None,
    channels_last: bool = False,
) -> Iterator[Batch]:
    """Batches of ``batch_size`` with :func:`extra_count` extra (generated) images each, the rest
    from ``split``: global batches ``first_batch .. first_batch + n_batches - 1``.

    Batch ``g`` holds the original rows :func:`original_rows` and the extra rows :func:`extra_rows`
    (labels from ``extra_labels``, ``true_y`` the same, ``index`` = ``index_base`` + extra row, so
    keyed attack starts never collide with an original sample's), each in its draw order, the
    extra ones at :func:`extra_positions`.
    Every draw is keyed by ``seed`` and ``g``: the same batch whatever ``first_batch`` it is
    reached from (epochs, resume) and whether ``extra`` is resident or mapped. The extra rows of
    batch ``g + 1`` are fetched before batch ``g`` is handed out (the mapped path's prefetch).
    Augmentation (``generator``) and the uint8 -> float conversion run on the device, on the whole
    batch, as :func:`iterate_batches`.
    """
    batch_size = check_int(batch_size, "batch_size")
    if batch_size < 1:
        raise AtprobeError(f"batch_size must be >= 1, got {batch_size}")
    n_extra = extra_count(batch_size, fraction)
    _check_generator(generator, split.x.device)
    labels = extra_labels.to(split.x.device)
    return _mixed_batches(split, extra, labels, batch_size, n_extra, seed, first_batch, n_batches, index_base,
                          augment, generator, channels_last)


def _mixed_batches(split: Split, extra: ResidentRows | MappedRows, labels: torch.Tensor, batch_size: int,
                   n_extra: int, seed: int, first: int, n_batches: int, index_base: int, augment: bool,
                   generator: torch.Generator | None, channels_last: bool) -> Iterator[Batch]:
    device, n, n_rows = split.x.device, len(split), labels.shape[0]
    passes: dict[int, torch.Tensor] = {}
    is_extra = extra_positions(batch_size, n_extra)
    # Batch position of each original row, then of each extra row: one gather assembles a batch.
    placement = torch.argsort(torch.cat([(~is_extra).nonzero().squeeze(1), is_extra.nonzero().squeeze(1)]))
    placement = placement.to(device)
    fetch = (lambda g: extra.fetch(extra_rows(seed, g, n_extra, n_rows))) if n_extra else None
    pending = fetch(first) if fetch and n_batches > 0 else None
    for g in range(first, first + n_batches):
        current = pending
        if fetch and g + 1 < first + n_batches:
            pending = fetch(g + 1)  # read and queue the copy of the next batch before this one is used
        rows = original_rows(seed, g, batch_size - n_extra, n, device, passes)
        x = split.x.index_select(0, rows)
        y, true_y, index = (t.index_select(0, rows) for t in (split.y, split.true_y, split.index))
        if current is not None:
            x_extra, extra_idx = extra.ready(current)
            if x.dtype != torch.uint8:
                x_extra = x_extra.to(x.dtype).div_(255)
            y_extra = labels.index_select(0, extra_idx)
            x, y, true_y, index = (torch.cat(parts).index_select(0, placement) for parts in
                                   ((x, x_extra), (y, y_extra), (true_y, y_extra), (index, index_base + extra_idx)))
        if augment:
            x = random_crop_flip(x, generator)
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div_(255)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield Batch(x=x, y=y, true_y=true_y, index=index)
