"""Training-label corruption and the seeded train/validation partition."""

from __future__ import annotations

import torch

from atprobe.data.checks import check_int, check_rate
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
