"""DeepMind PreActResNet-18/34 (Gowal et al., ``adversarial_robustness/pytorch/model_zoo.py``;
RobustBench's ``DMPreActResNet``): Swish activations, ``SAME`` padding, 3x3 shortcut convolutions.

Keys ``conv_2d``, ``layer_0..3.<i>.{batchnorm_0, conv_2d_1, batchnorm_1, conv_2d_2, shortcut}``,
``batchnorm``, ``logits``. Used by the ResNet-18 releases of Rebuffi et al. 2021 and
Gowal et al. 2021 (``*_R18_*`` on RobustBench).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from atprobe.errors import AtprobeError
from atprobe.models.layers import (
    IN_CHANNELS,
    BatchNorm2d,
    Classifier,
    apply_optional,
    optional_dropout,
    resnet_stages,
    same_conv3x3,
    same_pad,
)

#: Blocks per stage of the two depths the public class accepts.
DM_PREACT_BLOCKS: dict[int, tuple[int, int, int, int]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class DMPreActBlock(nn.Module):
    """DeepMind's ``_PreActBlock``: bn-swish-conv-bn-swish-conv plus shortcut.

    Unlike the Rice et al. block, the projection ``shortcut`` is a 3x3 ``SAME`` conv and
    it reads the block's *raw* input, not the activated one. Activations keep the
    upstream names (``relu_0``, ``relu_1``) although they are Swish (SiLU).
    """

    expansion = 1
    shortcut: nn.Conv2d | None

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.batchnorm_0 = BatchNorm2d(in_planes)
        self.relu_0 = nn.SiLU()
        self.conv_2d_1 = same_conv3x3(in_planes, planes, stride)
        self.batchnorm_1 = BatchNorm2d(planes)
        self.relu_1 = nn.SiLU()
        self.conv_2d_2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = same_conv3x3(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_2d_1(same_pad(self.relu_0(self.batchnorm_0(x)), self.conv_2d_1))
        out = self.conv_2d_2(self.relu_1(self.batchnorm_1(out)))
        # Upstream computes the shortcut first; here it runs where it is registered (see weight_layers).
        shortcut = x if self.shortcut is None else self.shortcut(same_pad(x, self.shortcut))
        return out + shortcut


class DMPreActResNet(Classifier):
    """DeepMind PreActResNet-``depth`` (18 or 34) with Swish, for 32x32 inputs.

    Normalization inside the model as in :class:`~atprobe.models.dm_wide_resnet.DMWideResNet`
    (``model.normalize``; mean/std not in the ``state_dict``). PyTorch's default init.
    """

    def __init__(
        self,
        depth: int = 18,
        num_classes: int = 10,
        *,
        dropout: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if depth not in DM_PREACT_BLOCKS:
            raise AtprobeError(f"DeepMind PreActResNet depth must be 18 or 34, got {depth}")
        super().__init__(num_classes, mean, std)
        self.conv_2d = nn.Conv2d(IN_CHANNELS, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer_0, self.layer_1, self.layer_2, self.layer_3 = resnet_stages(DMPreActBlock, DM_PREACT_BLOCKS[depth])
        self.batchnorm = BatchNorm2d(512)
        self.relu = nn.SiLU()
        self.dropout = optional_dropout(dropout)
        self.logits = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_2d(self.normalize(x))
        out = self.layer_3(self.layer_2(self.layer_1(self.layer_0(out))))
        out = self.relu(self.batchnorm(out))
        out = torch.flatten(F.avg_pool2d(out, 4), 1)
        return self.logits(apply_optional(self.dropout, out))
