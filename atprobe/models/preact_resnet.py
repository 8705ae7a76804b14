"""Pre-activation ResNet-18s: Rice, Wong & Kolter 2020 (``overfitting`` repo) with a final ``bn``, and the
fast-AT layout (Wong et al. 2020 as RobustBench loads it, Andriushchenko & Flammarion 2020) without it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from atprobe.models.layers import IN_CHANNELS, BatchNorm2d, Classifier, apply_optional, optional_dropout, resnet_stages


class PreActBlock(nn.Module):
    """Pre-activation block: bn-relu-conv-bn-relu-conv, shortcut taken after the first bn-relu."""

    expansion = 1
    #: Whether the projection shortcut reads the block's raw input instead of bn1-relu of it.
    shortcut_from_input = False
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
        if self.shortcut is None:
            return out + x
        return out + self.shortcut(x if self.shortcut_from_input else pre)


class InputShortcutPreActBlock(PreActBlock):
    """The fast-AT pre-activation block (RobustBench's ``PreActBlock``, Andriushchenko &
    Flammarion's ``models.py``): same keys as :class:`PreActBlock`, but the projection
    shortcut is applied to the block's raw input ``x``, before ``bn1``-relu."""

    shortcut_from_input = True


class PreActResNet(Classifier):
    """PreActResNet: stem conv, four pre-act stages, final ``bn``-relu (``final_bn=False``:
    neither, the stages feed the pooling directly), ``linear``."""

    def __init__(
        self,
        block: type[PreActBlock],
        num_blocks: Sequence[int],
        num_classes: int = 10,
        *,
        final_bn: bool = True,
        dropout: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(num_classes, mean, std)
        self.conv1 = nn.Conv2d(IN_CHANNELS, 64, kernel_size=3, stride=1, padding=1, bias=False)
        # Stages in registration order layer1..4: that order fixes keys and seeded init.
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet_stages(block, num_blocks)
        self.bn = BatchNorm2d(512 * block.expansion) if final_bn else None
        self.dropout = optional_dropout(dropout)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.bn is not None:
            out = F.relu(self.bn(out))
        out = torch.flatten(F.avg_pool2d(out, 4), 1)
        return self.linear(apply_optional(self.dropout, out))
