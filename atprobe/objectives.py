"""Every loss of atprobe, as per-sample values: the attacks' objectives and the
training objectives of adversarial training.

The attacks (``atprobe.attacks``), training (``atprobe.train``), the grad-ratio log,
evaluation and every probe compute their losses here, so "CE", "the CW margin", "the
PGD-AT loss" or "the TRADES loss" means one formula everywhere. Every function returns
per-sample values (shape (B,)); callers take the mean for a batch objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from atprobe.errors import AtprobeError

#: The attacks' objectives (``PGDConfig.loss``).
ATTACK_LOSSES = ("ce", "kl", "cw")

#: A per-sample attack objective: logits of the perturbed input -> (B,) losses to maximize.
PerSampleLoss = Callable[[Tensor], Tensor]


def full_precision(t: Tensor) -> Tensor:
    """Half/bf16 (autocast) logits up to float32 for losses; float32/float64 unchanged,
    so float64 reference tests stay in float64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def ce(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy CE(f(x), y)."""
    return F.cross_entropy(full_precision(logits), y, reduction="none")


def cw_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample margin max_{j != y} z_j - z_y (> 0 exactly when misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.amax(dim=1) - true


def kl_to_natural(logits: Tensor, natural_log_probs: Tensor) -> Tensor:
    """Per-sample KL(p_nat || p_adv) = sum_j p_nat,j (log p_nat,j - log p_adv,j)."""
    log_q = F.log_softmax(full_precision(logits), dim=1)
    p = natural_log_probs.exp()
    return (p * (natural_log_probs - log_q)).sum(dim=1)


def attack_loss(name: str, y: Tensor | None = None, natural_logits: Tensor | None = None) -> PerSampleLoss:
    """The per-sample attack objective ``name`` as a function of the perturbed logits:
    ``ce`` (CE on y), ``cw`` (the CW margin on y) or ``kl`` (TRADES: KL to the detached
    natural prediction)."""
    if name == "ce":
        if y is None:
            raise ValueError("the ce attack loss needs labels")
        return lambda z: ce(z, y)
    if name == "cw":
        if y is None:
            raise ValueError("the cw attack loss needs labels")
        return lambda z: cw_margin(full_precision(z), y)
    if name == "kl":
        if natural_logits is None:
            raise ValueError("the kl attack loss needs the natural logits")
        log_p = F.log_softmax(full_precision(natural_logits.detach()), dim=1)
        return lambda z: kl_to_natural(z, log_p)
    raise AtprobeError(f"unknown attack loss {name!r}: choose from {', '.join(ATTACK_LOSSES)}")


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


# ---------------------------------------------------------------------------- remedies of robust overfitting


def smoothed_labels(y: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """Label smoothing as Pang et al. (2021) apply it to adversarial training: ``1 - s`` on the
    label and ``s / (K - 1)`` on each of the other ``K - 1`` classes (their ``LabelSmoothingLoss``;
    not the ``s / K`` of ``F.cross_entropy(label_smoothing=s)``). Float32 rows of shape (B, K)."""
    off = smoothing / (num_classes - 1)
    target = torch.full((len(y), num_classes), off, dtype=torch.float32, device=y.device)
    return target.scatter_(1, y[:, None], 1.0 - smoothing)


def soft_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample cross-entropy with a distribution: ``-sum_j t_j log softmax(f(x))_j``."""
    log_p = F.log_softmax(full_precision(logits), dim=1)
    return -(target.to(log_p.dtype) * log_p).sum(dim=1)


def distillation(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Per-sample distillation term of Chen et al. (2021), as their ``loss_fn_kd``:
    ``T^2 * soft_ce(s / T, softmax(t / T))`` (KL(p_t || p_s) at temperature T plus the teacher's
    entropy, a constant: the same gradient). The teacher's logits carry no gradient."""
    t = float(temperature)
    target = F.softmax(full_precision(teacher_logits.detach()) / t, dim=1)
    return t * t * soft_ce(full_precision(student_logits) / t, target)


def sat_update(targets: Tensor, index: Tensor, probs: Tensor, momentum: float) -> Tensor:
    """Self-adaptive training (Huang et al. 2020): ``t_i <- m t_i + (1 - m) p_i`` for the
    visited samples ``index``, in place (targets start one-hot); returns their new targets."""
    updated = momentum * targets[index] + (1.0 - momentum) * probs.to(targets.dtype)
    targets[index] = updated
    return updated


def sat_weights(targets: Tensor) -> Tensor:
    """SAT's sample weights of a batch: ``w_i = max_j t_ij``, scaled to mean 1 over the batch
    (the official ``weights *= B / weights.sum()``), so ``mean(w_i l_i) = sum w_i l_i / sum w_i``."""
    w = targets.amax(dim=1)
    return w * (len(w) / w.sum())


def forget_rates(forget_rate: float, epochs: int, gradual: int = 10, exponent: float = 1.0) -> list[float]:
    """Co-teaching's fraction dropped from each batch, per 0-based training epoch (Han et al.
    2018's ``rate_schedule``: ``forget_rate`` throughout, its first ``gradual`` entries
    ``linspace(0, forget_rate ** exponent, gradual)``). The official loop trains epochs 1, 2, ...
    of that schedule (entry 0 only evaluates the fresh networks), so training epoch ``e`` takes
    entry ``e + 1``: the first epoch drops ``forget_rate / (gradual - 1)``."""
    schedule = [float(forget_rate)] * (int(epochs) + 1)
    top = float(forget_rate) ** exponent
    for e in range(min(int(gradual), len(schedule))):
        schedule[e] = top * e / (gradual - 1) if gradual > 1 else top
    return schedule[1:]


def small_loss_rows(losses: Tensor, forget_rate: float) -> Tensor:
    """Co-teaching's selection: the indices of the ``int((1 - rate) * B)`` smallest ``losses``
    (ascending; ties by position), which the *other* network is trained on."""
    keep = int((1.0 - float(forget_rate)) * len(losses))
    return torch.sort(losses.detach(), stable=True).indices[:keep]
