"""Stochastic weight averaging (Izmailov et al. 2018) as Chen et al. (2021) run it against
robust overfitting: from a start epoch on, after every epoch, the parameters are averaged with
equal weights (``p_avg <- p_avg + (p - p_avg) / (n + 1)``, the first update a copy; PyTorch's
``AveragedModel`` rule) and the averaged model's BatchNorm statistics are recomputed by one
train-mode pass over the clean, augmented training batches with ``momentum=None`` (their
``bn_update``; ``torch.optim.swa_utils.update_bn``). ``docs/training.md``, "SWA"."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

__all__ = ["WeightAverage"]


class WeightAverage:
    """The running equal-weight average of a model's parameters (buffers: see
    :meth:`recompute_batchnorm`), held as a separate module of the same architecture."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.count = 0  # models averaged so far

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average ``model``'s current parameters in (a copy when it is the first)."""
        for avg, p in zip(self.model.parameters(), model.parameters(), strict=True):
            if self.count == 0:
                avg.copy_(p.detach())
            else:
                avg.add_((p.detach() - avg) / (self.count + 1))
        self.count += 1

    def recompute_batchnorm(self, batches: Iterable[Tensor]) -> None:
        """The averaged model's BatchNorm statistics from one pass over ``batches`` (images):
        reset, then the cumulative average of the batch statistics (``update_bn``); eval mode after."""
        update_bn(batches, self.model)
        self.model.eval()

    def state(self) -> dict[str, Any]:
        """What a resumable checkpoint keeps: the averaged module's state and the count."""
        return {"state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "count": self.count}

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["state_dict"])
        self.count = int(state["count"])
