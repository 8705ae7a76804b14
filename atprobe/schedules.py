"""What changes with the epoch in a training run: the learning rate, gamma of Eq. 6 and
the TE weight of Eq. 7 (``atprobe.train`` re-exports all three)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from atprobe import objectives

if TYPE_CHECKING:  # only for the annotations: atprobe.train imports this module
    from atprobe.train import TrainConfig


def learning_rate(config: TrainConfig, epoch_float: float) -> float:
    """The learning rate at a fractional epoch (set every iteration)."""
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "cosine":
        return 0.5 * config.lr * (1 + math.cos(math.pi * min(epoch_float / config.epochs, 1.0)))
    decays = sum(1 for m in config.milestones or () if epoch_float >= m)
    return config.lr * config.lr_decay**decays


def mix_gamma(config: TrainConfig, epoch: int) -> float:
    """gamma of Eq. 6 in epoch ``epoch`` (0-based): 0 -> 1 over ``mix_epochs``."""
    if not config.mix_clean:
        return 1.0
    if config.mix_ramp == "linear":
        return objectives.linear_rampup(epoch, config.mix_epochs)
    return objectives.gaussian_rampup(epoch, 0, config.mix_epochs)


def te_epoch(epoch: int) -> int:
    """The official TE code's number of the 0-based training epoch ``epoch``: it counts from 1
    (its ramp and its ensemble start compare that number with ``--te-start``/``--te-end``)."""
    return int(epoch) + 1


def te_active(config: TrainConfig, epoch: int) -> bool:
    """Whether TE runs in the 0-based epoch ``epoch``: from epoch number ``te_start`` on."""
    return bool(config.te) and te_epoch(epoch) >= config.te_start


def te_weight(config: TrainConfig, epoch: int) -> float:
    """w of Eq. 7 in the 0-based epoch ``epoch``: te_weight * Gaussian ramp of its number
    ``epoch + 1`` between te_start and te_end (the official ``sigmoid_rampup``)."""
    if not config.te:
        return 0.0
    if config.te_weight is None:
        raise ValueError("te_weight is resolved from the number of classes (TrainConfig.resolved)")
    return config.te_weight * objectives.gaussian_rampup(te_epoch(epoch), config.te_start, config.te_end)


def sat_active(config: TrainConfig, epoch: int) -> bool:
    """Whether SAT's targets adapt in the 0-based epoch ``epoch``: from epoch number
    ``sat_start`` on (the official code counts from 1: plain CE while ``epoch < es``)."""
    return bool(config.sat) and te_epoch(epoch) >= config.sat_start


def swa_due(config: TrainConfig, epoch: int) -> bool:
    """Whether the weights are averaged after the 0-based epoch ``epoch``: from epoch number
    ``swa_start`` on (Chen et al. average after every epoch from their ``--swa_start``)."""
    return config.swa_start is not None and te_epoch(epoch) >= config.swa_start


def awp_active(config: TrainConfig, epoch: int) -> bool:
    """Whether AWP perturbs the weights in the 0-based epoch ``epoch`` (the official ``epoch >=
    awp_warmup``, epochs counted as the script counts them: from 0 in AT-AWP)."""
    return config.awp_gamma > 0 and int(epoch) >= config.awp_warmup
