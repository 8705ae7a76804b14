"""TRADES / MART WideResNet-D-W (D = 6n+4): ``block1..3`` of ``NetworkBlock`` stages, ``bn1``, ``fc``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from atprobe.models.layers import IN_CHANNELS, BatchNorm2d, Classifier, residual_stage, wrn_blocks_per_stage


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
        self.layer = residual_stage(block, in_planes, out_planes, nb_layers, stride, dropRate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(Classifier):
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
        n = wrn_blocks_per_stage(depth, widen_factor)
        super().__init__(num_classes, mean, std)
        n_channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
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
