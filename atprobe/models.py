"""CIFAR classifiers with the exact layouts of the well-known public codebases.

Every model takes images in ``[0, 1]`` pixel space, shape ``(B, 3, 32, 32)``, and
applies its input normalization itself (``model.normalize``, a :class:`Normalize`
run first in ``forward``). Attacks and probes therefore work in pixel space, where
an epsilon ball means what the papers say it means.

The normalization buffers are *non-persistent*, so ``model.state_dict()`` has
exactly the keys of the public codebase each architecture comes from:

===================  ================================================================
name                 layout
===================  ================================================================
``resnet18``         kuangliu/pytorch-cifar ``ResNet18``
``preact_resnet18``  Rice et al. 2020 (``overfitting`` repo) ``PreActResNet18``
``wrn-D-W``          TRADES / MART ``WideResNet(depth=D, widen_factor=W)``, D = 6n+4
``vgg16``            kuangliu/pytorch-cifar ``VGG('VGG16')`` (with BatchNorm)
``dense121``         kuangliu/pytorch-cifar ``DenseNet121`` (growth rate 32)
``cnn-small``        atprobe's own small CPU-friendly CNN (4 conv + BN, FC 256)
``mlp``              atprobe's own 3072-512-256-C ReLU MLP (no BN)
===================  ================================================================

so a foreign checkpoint's ``state_dict`` loads with ``strict=True`` (after the usual
``module.`` prefix stripping, and for TRADES/MART WideResNets after dropping their
unused ``sub_block1.*`` keys; both are the checkpoint loader's job).

No layer uses ``inplace=True`` and no residual sum uses ``+=``: in-place ops on
activations break the ``torch.func`` transforms (``vmap``/``grad`` for per-sample
gradients, ``functional_call``) that the probes rely on.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from atprobe.errors import AtprobeError

__all__ = [
    "MLP",
    "VGG",
    "BasicBlock",
    "Bottleneck",
    "DenseNet",
    "NetworkBlock",
    "Normalize",
    "PreActBlock",
    "PreActResNet",
    "ResNet",
    "SmallCNN",
    "Transition",
    "WideBasicBlock",
    "WideResNet",
    "WRN_PATTERN",
    "build_model",
    "canonical_arch",
    "list_architectures",
    "weight_layers",
]

#: Input geometry every architecture here is built for (CIFAR-10/100).
IN_CHANNELS = 3
IMAGE_SIZE = 32

#: The generic WideResNet name pattern accepted by :func:`canonical_arch`.
WRN_PATTERN = "wrn-D-W"


# --------------------------------------------------------------------------- #
# Input normalization
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

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "Normalize":
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
# ResNet-18 (kuangliu/pytorch-cifar)
# --------------------------------------------------------------------------- #


class BasicBlock(nn.Module):
    """kuangliu's post-activation ResNet block: conv-bn-relu-conv-bn (+ shortcut), relu."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        # An empty Sequential is the identity and contributes no state_dict keys,
        # exactly as upstream (so ``layer2.1.shortcut.*`` is absent, ``layer2.0.shortcut.0`` present).
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)  # not ``+=``: in-place breaks torch.func transforms
        return F.relu(out)


class ResNet(nn.Module):
    """kuangliu/pytorch-cifar ResNet: 3x3 stem, four stages, 4x4 average pool, ``linear``."""

    def __init__(
        self,
        block: type[BasicBlock],
        num_blocks: Sequence[int],
        num_classes: int = 10,
        *,
        dropout: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
        self.in_planes = 64
        self.conv1 = nn.Conv2d(IN_CHANNELS, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.dropout = _optional_dropout(dropout)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block: type[BasicBlock], planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(F.avg_pool2d(out, 4), 1)  # flatten (a reshape) is channels_last-safe; view is not
        return self.linear(_apply(self.dropout, out))


# --------------------------------------------------------------------------- #
# PreActResNet-18 (Rice, Wong & Kolter 2020)
# --------------------------------------------------------------------------- #


class PreActBlock(nn.Module):
    """Pre-activation block: bn-relu-conv-bn-relu-conv, shortcut taken after the first bn-relu."""

    expansion = 1
    shortcut: nn.Sequential | None

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        # Upstream only defines ``shortcut`` when a projection is needed (no empty Sequential).
        self.shortcut = None
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        # Upstream computes the shortcut before conv1; computing it here is the same
        # math and makes execution order equal registration order (see weight_layers).
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        return out + shortcut


class PreActResNet(nn.Module):
    """Rice et al. PreActResNet: stem conv, four pre-act stages, final ``bn``-relu, ``linear``."""

    def __init__(
        self,
        block: type[PreActBlock],
        num_blocks: Sequence[int],
        num_classes: int = 10,
        *,
        dropout: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
        self.in_planes = 64
        self.conv1 = nn.Conv2d(IN_CHANNELS, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.bn = BatchNorm2d(512 * block.expansion)
        self.dropout = _optional_dropout(dropout)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block: type[PreActBlock], planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = torch.flatten(F.avg_pool2d(out, 4), 1)
        return self.linear(_apply(self.dropout, out))


# --------------------------------------------------------------------------- #
# WideResNet (TRADES / MART)
# --------------------------------------------------------------------------- #


class WideBasicBlock(nn.Module):
    """TRADES' WRN ``BasicBlock``: bn-relu-conv-bn-relu-[dropout]-conv plus (projected) shortcut.

    When the width changes, the first bn-relu is applied to the block input and
    *both* branches see the activated tensor, as in the original code.
    """

    convShortcut: nn.Conv2d | None  # noqa: N815 - upstream checkpoint name

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropRate: float = 0.0) -> None:  # noqa: N803
        super().__init__()
        self.bn1 = BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()  # upstream uses inplace=True; not here (torch.func)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = dropRate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A stage of ``nb_layers`` WRN blocks, stored as ``.layer`` (an ``nn.Sequential``)."""

    def __init__(
        self,
        nb_layers: int,
        in_planes: int,
        out_planes: int,
        block: type[WideBasicBlock],
        stride: int,
        dropRate: float = 0.0,  # noqa: N803
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropRate)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """TRADES/MART WideResNet-``depth``-``widen_factor`` for 32x32 inputs.

    Keys: ``conv1``, ``block1..3.layer.<i>.*``, ``bn1``, ``fc``. The released TRADES
    and MART checkpoints additionally carry ``sub_block1.*``, an unused stage that
    never runs in ``forward``; it is deliberately not built here (it would add
    ~2.1M dead parameters to WRN-34-10), so drop those keys before loading.
    """

    def __init__(
        self,
        depth: int = 34,
        num_classes: int = 10,
        widen_factor: int = 10,
        dropRate: float = 0.0,  # noqa: N803
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise AtprobeError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth}")
        if widen_factor < 1:
            raise AtprobeError(f"WideResNet widen factor must be >= 1, got {widen_factor}")
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
        n_channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(IN_CHANNELS, n_channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, n_channels[0], n_channels[1], WideBasicBlock, 1, dropRate)
        self.block2 = NetworkBlock(n, n_channels[1], n_channels[2], WideBasicBlock, 2, dropRate)
        self.block3 = NetworkBlock(n, n_channels[2], n_channels[3], WideBasicBlock, 2, dropRate)
        self.bn1 = BatchNorm2d(n_channels[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(n_channels[3], num_classes)
        self.nChannels = n_channels[3]

        # Upstream init: conv N(0, sqrt(2 / (k*k*out))) == kaiming normal, fan_out;
        # BN weight 1 / bias 0; Linear bias 0 (weight keeps PyTorch's default).
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) and m.weight.is_meta:
                # Shape-only construction: nothing to fill, and meta normal_() would
                # import torch._dynamo (seconds) just to do nothing.
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        out = torch.flatten(F.avg_pool2d(out, 8), 1)
        return self.fc(out)


# --------------------------------------------------------------------------- #
# VGG-16 (kuangliu/pytorch-cifar)
# --------------------------------------------------------------------------- #

_VGG_CFG: dict[str, list[int | str]] = {
    "VGG16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """kuangliu VGG: ``features`` (conv-bn-relu triples and max-pools) then ``classifier``."""

    def __init__(
        self,
        vgg_name: str = "VGG16",
        num_classes: int = 10,
        *,
        dropout: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
        self.features = self._make_layers(_VGG_CFG[vgg_name])
        self.dropout = _optional_dropout(dropout)
        self.classifier = nn.Linear(512, num_classes)

    @staticmethod
    def _make_layers(cfg: Sequence[int | str]) -> nn.Sequential:
        layers: list[nn.Module] = []
        in_channels = IN_CHANNELS
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                assert isinstance(v, int)
                # Conv keeps its bias (upstream does), so ``features.<i>.bias`` exists.
                layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), BatchNorm2d(v), nn.ReLU()]
                in_channels = v
        # A no-op kept so ``features`` has upstream's module count/indices.
        layers.append(nn.AvgPool2d(kernel_size=1, stride=1))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(self.features(self.normalize(x)), 1)
        return self.classifier(_apply(self.dropout, out))


# --------------------------------------------------------------------------- #
# DenseNet-121 (kuangliu/pytorch-cifar)
# --------------------------------------------------------------------------- #


class Bottleneck(nn.Module):
    """DenseNet-BC layer: bn-relu-conv1x1(4k)-bn-relu-conv3x3(k), output concatenated with input."""

    def __init__(self, in_planes: int, growth_rate: int) -> None:
        super().__init__()
        self.bn1 = BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, kernel_size=1, bias=False)
        self.bn2 = BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """DenseNet transition: bn-relu-conv1x1 then 2x2 average pool."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    """kuangliu DenseNet for CIFAR: ``conv1``, ``dense1..4``, ``trans1..3``, ``bn``, ``linear``."""

    def __init__(
        self,
        nblocks: Sequence[int] = (6, 12, 24, 16),
        growth_rate: int = 32,
        reduction: float = 0.5,
        num_classes: int = 10,
        *,
        dropout: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
        self.growth_rate = growth_rate

        num_planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(IN_CHANNELS, num_planes, kernel_size=3, padding=1, bias=False)

        self.dense1 = self._make_dense_layers(num_planes, nblocks[0])
        num_planes += nblocks[0] * growth_rate
        out_planes = int(math.floor(num_planes * reduction))
        self.trans1 = Transition(num_planes, out_planes)
        num_planes = out_planes

        self.dense2 = self._make_dense_layers(num_planes, nblocks[1])
        num_planes += nblocks[1] * growth_rate
        out_planes = int(math.floor(num_planes * reduction))
        self.trans2 = Transition(num_planes, out_planes)
        num_planes = out_planes

        self.dense3 = self._make_dense_layers(num_planes, nblocks[2])
        num_planes += nblocks[2] * growth_rate
        out_planes = int(math.floor(num_planes * reduction))
        self.trans3 = Transition(num_planes, out_planes)
        num_planes = out_planes

        self.dense4 = self._make_dense_layers(num_planes, nblocks[3])
        num_planes += nblocks[3] * growth_rate

        self.bn = BatchNorm2d(num_planes)
        self.dropout = _optional_dropout(dropout)
        self.linear = nn.Linear(num_planes, num_classes)

    def _make_dense_layers(self, in_planes: int, nblock: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for _ in range(nblock):
            layers.append(Bottleneck(in_planes, self.growth_rate))
            in_planes += self.growth_rate
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.trans1(self.dense1(out))
        out = self.trans2(self.dense2(out))
        out = self.trans3(self.dense3(out))
        out = self.dense4(out)
        out = torch.flatten(F.avg_pool2d(F.relu(self.bn(out)), 4), 1)
        return self.linear(_apply(self.dropout, out))


# --------------------------------------------------------------------------- #
# Small CPU models (atprobe's own)
# --------------------------------------------------------------------------- #


class SmallCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU layers (32-32-64-64) with 2x2 max-pools, FC 256, classifier.

    Layout: conv32 @32x32, pool, conv32 @16x16, pool, conv64, conv64 @8x8, pool,
    flatten (64*4*4 = 1024) -> ``fc`` 256 -> ReLU -> ``classifier``. Pooling early
    keeps it at ~7M multiply-adds per image (vs ~25M with both pools after conv
    pairs), so an epoch on 4k CIFAR images takes seconds on two CPU cores, while
    still having BatchNorm, which several probes study in eval mode.
    Keys: ``features.{0,4,8,11}`` (convs), ``features.{1,5,9,12}`` (BNs), ``fc``, ``classifier``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_channels: int = IN_CHANNELS,
        dropout: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std, num_channels=in_channels)

        def unit(cin: int, cout: int) -> list[nn.Module]:
            # No conv bias: the following BN's shift makes it redundant.
            return [nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False), BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *unit(in_channels, 32),
            nn.MaxPool2d(2),
            *unit(32, 32),
            nn.MaxPool2d(2),
            *unit(32, 64),
            *unit(64, 64),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(64 * (IMAGE_SIZE // 8) ** 2, 256)
        self.dropout = _optional_dropout(dropout)
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(self.features(self.normalize(x)), 1)
        out = F.relu(self.fc(out))
        return self.classifier(_apply(self.dropout, out))


class MLP(nn.Module):
    """flatten -> ``fc1`` 3072->512 -> ReLU -> ``fc2`` 512->256 -> ReLU -> ``fc3`` 256->C. No BN."""

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_channels: int = IN_CHANNELS,
        dropout: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std, num_channels=in_channels)
        self.fc1 = nn.Linear(in_channels * IMAGE_SIZE * IMAGE_SIZE, 512)
        self.fc2 = nn.Linear(512, 256)
        self.dropout = _optional_dropout(dropout)
        self.fc3 = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(self.normalize(x), 1)  # reshape: logical NCHW order even for channels_last
        out = F.relu(self.fc1(out))
        out = F.relu(self.fc2(out))
        return self.fc3(_apply(self.dropout, out))


# --------------------------------------------------------------------------- #
# Dropout helpers
# --------------------------------------------------------------------------- #


def _optional_dropout(p: float) -> nn.Dropout | None:
    """``nn.Dropout(p)``, or None for p == 0 so the module tree is exactly upstream's."""
    return nn.Dropout(p) if p > 0 else None


def _apply(module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if module is None else module(x)


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #

_Builder = Callable[..., nn.Module]

# Builders take (num_classes, dropout=, mean=, std=); WRN is handled by pattern.
_FIXED: dict[str, _Builder] = {
    "resnet18": lambda c, **kw: ResNet(BasicBlock, (2, 2, 2, 2), c, **kw),
    "preact_resnet18": lambda c, **kw: PreActResNet(PreActBlock, (2, 2, 2, 2), c, **kw),
    "vgg16": lambda c, **kw: VGG("VGG16", c, **kw),
    "dense121": lambda c, **kw: DenseNet((6, 12, 24, 16), 32, 0.5, c, **kw),
    "cnn-small": lambda c, **kw: SmallCNN(c, **kw),
    "mlp": lambda c, **kw: MLP(c, **kw),
}

# WideResNets listed by list_architectures(); any wrn-D-W with D = 6n+4 also builds.
_WRN_EXAMPLES = ("wrn-28-10", "wrn-34-10")

# Alias keys are compared after lower-casing and mapping "_"/" " to "-".
_ALIASES: dict[str, str] = {
    "resnet18": "resnet18",
    "resnet-18": "resnet18",
    "rn18": "resnet18",
    "preact-resnet18": "preact_resnet18",
    "preact-resnet-18": "preact_resnet18",
    "preactresnet18": "preact_resnet18",
    "preactresnet-18": "preact_resnet18",
    "prn18": "preact_resnet18",
    "vgg16": "vgg16",
    "vgg-16": "vgg16",
    "vgg16-bn": "vgg16",
    "dense121": "dense121",
    "densenet121": "dense121",
    "densenet-121": "dense121",
    "cnn-small": "cnn-small",
    "cnnsmall": "cnn-small",
    "small-cnn": "cnn-small",
    "smallcnn": "cnn-small",
    "mlp": "mlp",
}

_WRN_RE = re.compile(r"^(?:wrn|wide-?resnet)-?(\d+)-(\d+)$")


def list_architectures() -> list[str]:
    """Canonical names of the registered architectures, in a stable order.

    Every name is buildable as is. Besides the listed WideResNets
    (``wrn-28-10``, ``wrn-34-10``), any ``wrn-D-W`` with D = 6n+4, n >= 1 and
    W >= 1 is accepted (e.g. ``wrn-16-4``); see :data:`WRN_PATTERN`.
    """
    return ["resnet18", "preact_resnet18", *_WRN_EXAMPLES, "vgg16", "dense121", "cnn-small", "mlp"]


def _choices_text() -> str:
    return ", ".join(list_architectures()) + f", or {WRN_PATTERN} with D = 6n+4 (e.g. wrn-16-4)"


def _parse_wrn(name: str) -> tuple[int, int] | None:
    m = _WRN_RE.match(name)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2))


def canonical_arch(arch: str) -> str:
    """Normalize an architecture name (case, ``_``/``-``, known aliases) and validate it.

    ``"ResNet-18"`` -> ``"resnet18"``, ``"PreActResNet18"`` -> ``"preact_resnet18"``,
    ``"WRN_34_10"`` / ``"WideResNet-34-10"`` -> ``"wrn-34-10"``. Raises
    :class:`AtprobeError` naming the choices for anything else, and for a WRN
    depth that is not 6n+4.
    """
    if not isinstance(arch, str):
        raise AtprobeError(f"architecture must be a string, got {type(arch).__name__}")
    key = re.sub(r"[\s_]+", "-", arch.strip().lower())
    if key in _ALIASES:
        return _ALIASES[key]
    wrn = _parse_wrn(key)
    if wrn is not None:
        depth, width = wrn
        if depth < 10 or (depth - 4) % 6 != 0:
            raise AtprobeError(
                f"bad WideResNet {arch!r}: depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth}"
            )
        if width < 1:
            raise AtprobeError(f"bad WideResNet {arch!r}: widen factor must be >= 1, got {width}")
        return f"wrn-{depth}-{width}"
    raise AtprobeError(f"unknown architecture {arch!r}; choose one of: {_choices_text()}")


def _check_options(num_classes: int, dropout: float) -> tuple[int, float]:
    """Validate and normalize (numpy scalars welcome) the numeric options."""
    # bool is an int subclass; ``num_classes=True`` is always a mistake.
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise AtprobeError(f"num_classes must be an integer, got {num_classes!r}")
    if num_classes < 2:
        raise AtprobeError(f"num_classes must be >= 2, got {num_classes}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise AtprobeError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if not (0.0 <= float(dropout) < 1.0):  # also rejects NaN
        raise AtprobeError(f"dropout must be in [0, 1), got {dropout}")
    return int(num_classes), float(dropout)


def build_model(
    arch: str,
    num_classes: int = 10,
    *,
    dropout: float = 0.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Build a float32 CIFAR classifier for ``[0, 1]`` inputs of shape ``(B, 3, 32, 32)``.

    Args:
        arch: a name from :func:`list_architectures`, an alias, or ``wrn-D-W``.
        num_classes: number of logits (>= 2).
        dropout: probability in [0, 1). WideResNets use it inside every block
            (upstream ``dropRate``); the other models apply ``nn.Dropout`` right
            before the final classifier (no module at all when 0).
        mean, std: per-channel input normalization applied inside the model
            (``model.normalize``); both or neither. None means identity.

    Returns:
        The model in train mode, with ``model.arch`` set to the canonical name.
    """
    name = canonical_arch(arch)
    num_classes, p = _check_options(num_classes, dropout)
    model: nn.Module
    wrn = _parse_wrn(name)
    if wrn is not None:
        depth, width = wrn
        model = WideResNet(depth, num_classes, width, p, mean=mean, std=std)
    else:
        model = _FIXED[name](num_classes, dropout=p, mean=mean, std=std)
    model.arch = name  # informational; a plain attribute, not in state_dict
    return model


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``nn.Conv2d`` and ``nn.Linear`` layers of ``model`` with qualified names.

    Order is module registration order (``named_modules``). For every
    architecture built here this equals the order in which the layers run in
    ``forward``; a residual block's shortcut projection (``shortcut.0``,
    ``convShortcut``) comes after that block's main-branch convs, where it runs.
    Names are ``state_dict`` prefixes, e.g. ``layer1.0.conv1`` or ``fc``.
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
