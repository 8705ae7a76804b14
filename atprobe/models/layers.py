"""Pieces every architecture shares: input geometry, BatchNorm, input normalization (and the
:class:`Classifier` base that sets it up), optional dropout and the stage builder of the
residual networks.

Nothing here adds ``state_dict`` keys of its own beyond what the layers carry
(normalization buffers are non-persistent, absent dropout is no module at all), so the
families built from these pieces keep the key layout of their public codebases.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from atprobe.errors import AtprobeError

#: Input geometry every architecture here is built for (CIFAR-10/100).
IN_CHANNELS = 3
IMAGE_SIZE = 32

# --------------------------------------------------------------------------- #
# BatchNorm and input normalization
# --------------------------------------------------------------------------- #


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose eval-mode forward is the affine map it reduces to,
    y = x * s + t with s = w / sqrt(var + eps), t = b - mean * s.

    Same parameters, buffers and state_dict keys; in train mode it is the stock layer.
    Why: attacks and probes differentiate eval-mode models through every BN layer, and
    the generic batch-norm backward kernel costs several times a plain multiply there
    (17% of a PGD step of cnn-small on the CPU, profiled).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.running_mean is None or self.running_var is None:
            return super().forward(x)
        scale = torch.rsqrt(self.running_var + self.eps)
        shift = -self.running_mean * scale
        if self.affine:
            scale = self.weight * scale
            shift = self.bias + self.weight * shift
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; the identity when ``mean``/``std`` are None.

    ``mean`` and ``std`` are *non-persistent* buffers: they follow ``.to()``,
    ``.double()`` and ``functional_call`` like any buffer, but stay out of
    ``state_dict()`` so the model's keys match public checkpoints, which never
    contain normalization constants.
    """

    mean: torch.Tensor | None
    std: torch.Tensor | None

    def __init__(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        *,
        num_channels: int = IN_CHANNELS,
    ) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise AtprobeError("normalization needs both mean and std, or neither")
        # The exact constants, kept so dtype/device moves re-derive the buffers
        # from them (see _apply) instead of up-casting float32 roundings.
        self._values: tuple[list[float], list[float]] | None = None
        if mean is None or std is None:
            self.register_buffer("mean", None, persistent=False)
            self.register_buffer("std", None, persistent=False)
            return
        mean_v = _channel_values(mean, "mean", num_channels)
        std_v = _channel_values(std, "std", num_channels)
        if any(v <= 0 for v in std_v):
            raise AtprobeError(f"normalization std must be > 0 per channel, got {std_v}")
        self._values = (mean_v, std_v)
        # Shape (1, C, 1, 1) broadcasts over NCHW and channels_last alike. Created
        # with torch.tensor so an enclosing ``with torch.device(...)`` is honoured.
        self.register_buffer("mean", torch.tensor(mean_v).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std_v).view(1, -1, 1, 1), persistent=False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Normalize:
        # ``.double()`` would otherwise turn float32(0.2471) into a float64 that is
        # off by ~1e-8, breaking exact float64 comparisons against hand-normalized
        # inputs; rebuild from the Python floats in whatever dtype/device fn chose.
        # Only on a dtype or device-type change, so e.g. share_memory_() keeps its tensors.
        before = None if self.mean is None else (self.mean.dtype, self.mean.device.type)
        super()._apply(fn, recurse)
        if self._values is not None and self.mean is not None and self.std is not None:
            if (self.mean.dtype, self.mean.device.type) == before:
                return self
            for name, values in zip(("mean", "std"), self._values):
                buf: torch.Tensor = getattr(self, name)
                if buf.is_floating_point():
                    exact = torch.tensor(values, dtype=buf.dtype, device=buf.device).view(1, -1, 1, 1)
                    self._buffers[name] = exact
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None or self.std is None:
            return x
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        if self.mean is None or self.std is None:
            return "identity"
        if self.mean.is_meta:  # no data to print for shape-only (meta) models
            return f"channels={self.mean.numel()}, device=meta"
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class Classifier(nn.Module):
    """The start every architecture shares: ``num_classes`` and the input normalization
    ``normalize`` (:class:`Normalize` of ``mean``/``std``), registered before any other
    module so that the module order, and hence a seeded build, is the subclass's own from
    there on. Subclasses call ``super().__init__(num_classes, mean, std)`` first and run
    ``self.normalize`` first in ``forward``."""

    def __init__(
        self,
        num_classes: int,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        *,
        num_channels: int = IN_CHANNELS,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std, num_channels=num_channels)


def _channel_values(values: Sequence[float], what: str, num_channels: int) -> list[float]:
    """Validate a per-channel constant (plain Python, so it works on any device)."""
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise AtprobeError(f"normalization {what} must be a sequence of numbers, got {values!r}") from None
    if len(out) != num_channels:
        raise AtprobeError(f"normalization {what} needs {num_channels} values (one per channel), got {len(out)}")
    if not all(math.isfinite(v) for v in out):
        raise AtprobeError(f"normalization {what} must be finite, got {out}")
    return out


# --------------------------------------------------------------------------- #
# Dropout
# --------------------------------------------------------------------------- #


def optional_dropout(p: float) -> nn.Dropout | None:
    """``nn.Dropout(p)``, or None for p == 0 so the module tree is exactly upstream's."""
    return nn.Dropout(p) if p > 0 else None


def apply_optional(module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, or ``x`` itself where the module was left out (see :func:`optional_dropout`)."""
    return x if module is None else module(x)


# --------------------------------------------------------------------------- #
# Residual stages
# --------------------------------------------------------------------------- #

#: ``(planes, stride)`` of the four stages of the CIFAR ResNets (kuangliu, Rice et al.).
RESNET_STAGES: tuple[tuple[int, int], ...] = ((64, 1), (128, 2), (256, 2), (512, 2))


def residual_stage(
    block: Callable[..., nn.Module], in_planes: int, planes: int, num_blocks: int, stride: int, *extra: object
) -> nn.Sequential:
    """``num_blocks`` residual blocks ``block(cin, planes, s, *extra)`` in an ``nn.Sequential``.

    The first block takes ``in_planes`` channels at ``stride``; the others take the
    first's output (``planes * block.expansion``, expansion 1 if the block has none) at
    stride 1. Blocks are built in order, so a seeded build initialises the same weights.
    """
    out_planes = planes * getattr(block, "expansion", 1)
    return nn.Sequential(
        *[
            block(in_planes if i == 0 else out_planes, planes, stride if i == 0 else 1, *extra)
            for i in range(num_blocks)
        ]
    )


def wrn_blocks_per_stage(depth: int, width: int) -> int:
    """Blocks in each of the three stages of a WideResNet-``depth``-``width``: (depth - 4) / 6.

    The rule both WideResNet layouts (TRADES's and DeepMind's) share: depth 6n+4 with
    n >= 1, widen factor >= 1.
    """
    if depth < 10 or (depth - 4) % 6 != 0:
        raise AtprobeError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth}")
    if width < 1:
        raise AtprobeError(f"WideResNet widen factor must be >= 1, got {width}")
    return (depth - 4) // 6


def resnet_stages(
    block: Callable[..., nn.Module], num_blocks: Sequence[int], in_planes: int = 64
) -> list[nn.Sequential]:
    """The four :data:`RESNET_STAGES` of a CIFAR ResNet, ``num_blocks[i]`` blocks each
    (assign them to ``layer1..4`` in order: that fixes the ``state_dict`` keys)."""
    stages = []
    for i, (planes, stride) in enumerate(RESNET_STAGES):
        stages.append(residual_stage(block, in_planes, planes, num_blocks[i], stride))
        in_planes = planes * getattr(block, "expansion", 1)
    return stages



# --------------------------------------------------------------------------- #
# TensorFlow-style "SAME" 3x3 convolutions (the DeepMind models)
# --------------------------------------------------------------------------- #


def same_conv3x3(in_planes: int, out_planes: int, stride: int) -> nn.Conv2d:
    """A bias-free 3x3 convolution that, with :func:`same_pad`, is TensorFlow's ``SAME``.

    Stride 1: ``padding=1`` (one pixel on every side, already ``SAME``). Stride 2:
    ``padding=0``, and :func:`same_pad` adds one pixel on the right and bottom only, as the
    DeepMind PyTorch ports (Gowal et al. 2020, ``model_zoo.py``) do: their weights were
    trained in JAX with that padding, and PyTorch's symmetric ``padding=1`` would shift
    every output by a pixel. The pad stays outside the module so that hooks (per-sample
    gradients, operator norms) see the input the convolution really computes on.
    """
    if stride not in (1, 2):
        raise AtprobeError(f"SAME 3x3 convolutions are defined here for stride 1 or 2, got {stride}")
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1 if stride == 1 else 0, bias=False)


def same_pad(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``x`` as :func:`same_conv3x3` ``conv`` must see it: zero-padded right and bottom at stride 2."""
    return F.pad(x, (0, 1, 0, 1)) if conv.stride[0] == 2 else x
