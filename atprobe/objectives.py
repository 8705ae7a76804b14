"""Training objectives of adversarial training, as per-sample losses.

Training (``atprobe.train``), the grad-ratio log and the gradient probes all compute
their losses here, so "the PGD-AT loss" or "the TRADES loss" means one formula
everywhere. Every function returns per-sample values (shape (B,)); callers take the
mean for a batch objective.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from atprobe.attacks import full_precision, kl_to_natural


def ce(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy CE(f(x), y)."""
    return F.cross_entropy(full_precision(logits), y, reduction="none")


def trades_kl(natural_logits: Tensor, adversarial_logits: Tensor) -> Tensor:
    """Per-sample KL(softmax f(x) || softmax f(x')), gradient flowing through both
    (TRADES' robust term; the attack uses the same KL with f(x) detached)."""
    log_p = F.log_softmax(full_precision(natural_logits), dim=1)
    return kl_to_natural(adversarial_logits, log_p)


def te_penalty(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample ||softmax(logits) - target||_2^2 (temporal ensembling, Eq. 7)."""
    return (F.softmax(full_precision(logits), dim=1) - target).pow(2).sum(dim=1)


def gaussian_rampup(epoch: float, start: float, end: float) -> float:
    """exp(-5 (1 - t)^2) with t = (epoch - start) / (end - start) clipped to [0, 1];
    0 before ``start`` (Laine & Aila 2017, the ramp of the official TE code)."""
    if epoch < start:
        return 0.0
    if end <= start or epoch >= end:
        return 1.0
    t = (epoch - start) / (end - start)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def linear_rampup(epoch: float, end: float) -> float:
    """epoch / end clipped to [0, 1] (1 from the start when end <= 0)."""
    if end <= 0:
        return 1.0
    return min(1.0, max(0.0, epoch / end))


def update_ensemble(ensemble: Tensor, index: Tensor, probs: Tensor, eta: float) -> Tensor:
    """p_i <- eta p_i + (1 - eta) softmax(f(x_i)) for the visited samples, in place;
    returns the bias-corrected targets p_i / sum_j p_ij of those samples.

    Starting from p = 0, after t visits sum_j p_ij = 1 - eta^t, so dividing by the sum
    is exactly the (1 - eta^t) bias correction of Laine & Aila.
    """
    updated = eta * ensemble[index] + (1.0 - eta) * probs.to(ensemble.dtype)
    ensemble[index] = updated
    return updated / updated.sum(dim=1, keepdim=True)
