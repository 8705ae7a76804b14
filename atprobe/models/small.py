"""atprobe's own small CPU models: ``cnn-small`` (4 conv + BN, FC 256) and the 3072-512-256-C ``mlp``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from atprobe.models.layers import IMAGE_SIZE, IN_CHANNELS, BatchNorm2d, Classifier, apply_optional, optional_dropout


class SmallCNN(Classifier):
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
        super().__init__(num_classes, mean, std, num_channels=in_channels)

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
        self.dropout = optional_dropout(dropout)
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(self.features(self.normalize(x)), 1)
        out = F.relu(self.fc(out))
        return self.classifier(apply_optional(self.dropout, out))


class MLP(Classifier):
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
        super().__init__(num_classes, mean, std, num_channels=in_channels)
        self.fc1 = nn.Linear(in_channels * IMAGE_SIZE * IMAGE_SIZE, 512)
        self.fc2 = nn.Linear(512, 256)
        self.dropout = optional_dropout(dropout)
        self.fc3 = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(self.normalize(x), 1)  # reshape: logical NCHW order even for channels_last
        out = F.relu(self.fc1(out))
        out = F.relu(self.fc2(out))
        return self.fc3(apply_optional(self.dropout, out))
