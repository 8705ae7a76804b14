"""kuangliu/pytorch-cifar VGG-16 with BatchNorm: ``features`` then ``classifier``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from atprobe.models.layers import IN_CHANNELS, BatchNorm2d, Classifier, apply_optional, optional_dropout

_VGG_CFG: dict[str, list[int | str]] = {
    "VGG16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(Classifier):
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
        super().__init__(num_classes, mean, std)
        self.features = self._make_layers(_VGG_CFG[vgg_name])
        self.dropout = optional_dropout(dropout)
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
        return self.classifier(apply_optional(self.dropout, out))
