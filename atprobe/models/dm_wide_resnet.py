"""DeepMind WideResNet-D-W (Gowal et al. 2020, ``adversarial_robustness/pytorch/model_zoo.py``;
RobustBench's ``DMWideResNet``): Swish activations, TensorFlow ``SAME`` padding.

Keys ``init_conv``, ``layer.<g>.block.<i>.{batchnorm_0, conv_0, batchnorm_1, conv_1, shortcut}``,
``batchnorm``, ``logits``. The releases of Gowal et al. 2020/2021, Rebuffi et al. 2021 and
Wang et al. 2023 and most current top RobustBench CIFAR entries use this layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from atprobe.models.layers import (
    IN_CHANNELS,
    BatchNorm2d,
    Classifier,
    apply_optional,
    optional_dropout,
    residual_stage,
    same_conv3x3,
    same_pad,
    wrn_blocks_per_stage,
)

#: The normalization constants the DeepMind classes apply inside the model
#: (``CIFAR10_MEAN``/``STD``, ``CIFAR100_MEAN``/``STD`` of ``model_zoo.py``); they equal the
#: published dataset statistics that ``--normalize dataset`` uses.
DM_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
DM_CIFAR10_STD = (0.2471, 0.2435, 0.2616)
DM_CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
DM_CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class DMWideBlock(nn.Module):
    """DeepMind's WRN ``_Block``: bn-swish-conv-bn-swish-conv plus (projected) shortcut.

    Where the width changes the block has a 1x1 ``shortcut`` conv and both branches start
    from the activated input; otherwise the identity shortcut adds the raw input.
    ``conv_0`` is a ``SAME`` 3x3 conv (see :func:`same_conv3x3`). The activations keep the
    upstream module names (``relu_0``, ``relu_1``) although they are Swish (SiLU).
    """

    shortcut: nn.Conv2d | None

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.batchnorm_0 = BatchNorm2d(in_planes)
        self.relu_0 = nn.SiLU()
        self.conv_0 = same_conv3x3(in_planes, out_planes, stride)
        self.batchnorm_1 = BatchNorm2d(out_planes)
        self.relu_1 = nn.SiLU()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        # Upstream decides by width only (a stride-2 block always changes width here).
        self.shortcut = None
        if in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu_0(self.batchnorm_0(x))
        out = self.conv_0(same_pad(act, self.conv_0))
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        shortcut = x if self.shortcut is None else self.shortcut(act)
        return shortcut + out


class DMBlockGroup(nn.Module):
    """A stage of ``num_blocks`` :class:`DMWideBlock`\\ s, stored as ``.block`` (an ``nn.Sequential``)."""

    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.block = residual_stage(DMWideBlock, in_planes, out_planes, num_blocks, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DMWideResNet(Classifier):
    """DeepMind WideResNet-``depth``-``width`` with Swish, for 32x32 inputs.

    The public class normalizes inside the model with mean/std that are not in its
    ``state_dict`` (plain attributes in DeepMind's file, non-persistent buffers in
    RobustBench's); here that is ``model.normalize`` like every atprobe model, so pass
    the constants (``DM_CIFAR10_MEAN``/``STD``, or ``--normalize dataset``) to reproduce it.
    PyTorch's default initialization, as upstream. The upstream ``padding`` option (an
    extra pad of the input image) is 0 for every CIFAR release and is not offered.
    """

    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        num_classes: int = 10,
        *,
        dropout: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        n = wrn_blocks_per_stage(depth, width)
        super().__init__(num_classes, mean, std)
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.init_conv = nn.Conv2d(IN_CHANNELS, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            DMBlockGroup(n, channels[0], channels[1], 1),
            DMBlockGroup(n, channels[1], channels[2], 2),
            DMBlockGroup(n, channels[2], channels[3], 2),
        )
        self.batchnorm = BatchNorm2d(channels[3])
        self.relu = nn.SiLU()
        self.dropout = optional_dropout(dropout)
        self.logits = nn.Linear(channels[3], num_classes)
        self.num_channels = channels[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(self.init_conv(self.normalize(x)))
        out = self.relu(self.batchnorm(out))
        out = torch.flatten(F.avg_pool2d(out, 8), 1)
        return self.logits(apply_optional(self.dropout, out))
