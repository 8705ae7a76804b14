"""kuangliu/pytorch-cifar ResNets: post-activation ``BasicBlock`` (ResNet-18) or ``Bottleneck``
(ResNet-50, as in Engstrom et al. 2019's ``robustness`` library) stages.

Keys ``conv1``, ``bn1``, ``layer1..4``, ``linear``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from atprobe.models.layers import IN_CHANNELS, BatchNorm2d, Classifier, apply_optional, optional_dropout, resnet_stages


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """kuangliu's shortcut: a 1x1 conv + BN where the shape changes, else an empty Sequential.

    The empty Sequential is the identity and contributes no state_dict keys, exactly as
    upstream (so ``layer2.1.shortcut.*`` is absent, ``layer2.0.shortcut.0`` present).
    """
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False), BatchNorm2d(out_planes)
    )


class BasicBlock(nn.Module):
    """kuangliu's post-activation ResNet block: conv-bn-relu-conv-bn (+ shortcut), relu."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, self.expansion * planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)  # not ``+=``: in-place breaks torch.func transforms
        return F.relu(out)


class ResNetBottleneck(nn.Module):
    """kuangliu's ``Bottleneck``: 1x1-bn-relu, 3x3 (stride)-bn-relu, 1x1 to 4x planes-bn (+ shortcut), relu.

    Keys ``conv1..3``, ``bn1..3`` and, where the shape changes, ``shortcut.0`` (1x1 conv)
    and ``shortcut.1`` (BN). Named apart from DenseNet's ``Bottleneck``.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False)
        self.bn3 = BatchNorm2d(self.expansion * planes)
        self.shortcut = _shortcut(in_planes, self.expansion * planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(Classifier):
    """kuangliu/pytorch-cifar ResNet: 3x3 stem, four stages, 4x4 average pool, ``linear``."""

    def __init__(
        self,
        block: type[BasicBlock] | type[ResNetBottleneck],
        num_blocks: Sequence[int],
        num_classes: int = 10,
        *,
        dropout: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(num_classes, mean, std)
        self.conv1 = nn.Conv2d(IN_CHANNELS, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = BatchNorm2d(64)
        # Stages in registration order layer1..4: that order fixes keys and seeded init.
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet_stages(block, num_blocks)
        self.dropout = optional_dropout(dropout)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(F.avg_pool2d(out, 4), 1)  # flatten (a reshape) is channels_last-safe; view is not
        return self.linear(apply_optional(self.dropout, out))
