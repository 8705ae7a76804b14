"""Projected gradient attacks in [0,1] pixel space: the one implementation that
training, evaluation and every probe call.

``pgd`` maximizes a per-sample loss inside an L-inf or L2 ball around ``x`` (and the
[0,1] box). FGSM and FGSM with random start are one-step configurations of it
(``fgsm_config``, ``fgsm_rs_config``), not a second copy of the loop.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atprobe.errors import AtprobeError, check_choice
from atprobe.runtime import autocast, frozen_parameters, module_mode

NORMS = ("linf", "l2")
LOSSES = ("ce", "kl", "cw")
INITS = ("uniform", "normal", "zero")

# A per-sample attack objective: logits of the perturbed input -> (B,) losses to maximize.
PerSampleLoss = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class PGDConfig:
    """One projected-gradient attack.

    norm: ``linf`` or ``l2`` ball of radius ``eps`` (pixel units, images in [0,1]).
    alpha: step size. L-inf steps are ``alpha * sign(g)``, L2 steps ``alpha * g / ||g||_2``.
    steps: gradient steps (``steps=0`` returns the random start, projected).
    loss: ``ce`` (cross-entropy on y), ``kl`` (TRADES: KL(softmax f(x) || softmax f(x')))
        or ``cw`` (margin max_{j!=y} z_j - z_y).
    init: ``uniform`` (L-inf: U(-eps, eps) per pixel; L2: Gaussian direction scaled to a
        radius U(0, eps), as in Rice et al.), ``normal`` (0.001 * N(0, 1), TRADES' start)
        or ``zero``.
    restarts: independent random starts; per sample the one with the highest final loss is kept.
    eval_mode: attack the model in eval mode (BatchNorm running statistics, no dropout)
        and restore each submodule's previous mode afterwards; ``False`` attacks in
        whatever mode the model is in (Madry's PGD-AT crafts in train mode).
    """

    norm: str = "linf"
    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10
    loss: str = "ce"
    init: str = "uniform"
    restarts: int = 1
    eval_mode: bool = True

    def __post_init__(self) -> None:
        check_choice(self.norm, NORMS, "norm")
        check_choice(self.loss, LOSSES, "attack loss")
        check_choice(self.init, INITS, "attack init")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise AtprobeError(f"eps must be a finite number >= 0, got {self.eps}")
        if self.norm == "linf" and self.eps > 1:
            raise AtprobeError(
                f"L-inf eps {self.eps} exceeds the [0,1] pixel range; did you mean {self.eps:g}/255?"
            )
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise AtprobeError(f"alpha (step size) must be a finite number >= 0, got {self.alpha}")
        if self.steps < 0:
            raise AtprobeError(f"steps must be >= 0, got {self.steps}")
        if self.restarts < 1:
            raise AtprobeError(f"restarts must be >= 1, got {self.restarts}")


def fgsm_config(eps: float = 8 / 255, norm: str = "linf") -> PGDConfig:
    """FGSM (Goodfellow et al.): one full-size step from the clean input."""
    return PGDConfig(norm=norm, eps=eps, alpha=eps, steps=1, init="zero")


def fgsm_rs_config(eps: float = 8 / 255, norm: str = "linf", alpha: float | None = None) -> PGDConfig:
    """FGSM with random start (Wong et al. 2020, "fast AT"): uniform start, step 1.25 * eps."""
    return PGDConfig(norm=norm, eps=eps, alpha=1.25 * eps if alpha is None else alpha, steps=1)


# ---------------------------------------------------------------------------- losses


def full_precision(t: Tensor) -> Tensor:
    """Half/bf16 (autocast) logits up to float32 for losses; float32/float64 unchanged,
    so float64 reference tests stay in float64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


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


def attack_loss(
    name: str, y: Tensor | None = None, natural_logits: Tensor | None = None
) -> PerSampleLoss:
    """The per-sample objective ``name`` as a function of the perturbed logits."""
    if name == "ce":
        if y is None:
            raise ValueError("the ce attack loss needs labels")
        return lambda z: F.cross_entropy(full_precision(z), y, reduction="none")
    if name == "cw":
        if y is None:
            raise ValueError("the cw attack loss needs labels")
        return lambda z: cw_margin(full_precision(z), y)
    if name == "kl":
        if natural_logits is None:
            raise ValueError("the kl attack loss needs the natural logits")
        log_p = F.log_softmax(full_precision(natural_logits.detach()), dim=1)
        return lambda z: kl_to_natural(z, log_p)
    raise AtprobeError(f"unknown attack loss {name!r}: choose from {', '.join(LOSSES)}")


# ---------------------------------------------------------------------------- geometry


def _per_sample_l2(t: Tensor) -> Tensor:
    """L2 norm of each sample, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(delta: Tensor, x: Tensor, norm: str, eps: float) -> Tensor:
    """Project a perturbation onto the eps-ball and keep x + delta inside [0,1].

    The box clamp comes last; for L-inf the result is exactly the projection onto the
    intersection (both constraints are per coordinate). For L2 it is the usual
    ball-then-box step of the field, which can only shrink the norm, so it stays feasible.
    """
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        scale = (eps / _per_sample_l2(delta).clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * scale
    return (x + delta).clamp(0.0, 1.0) - x


def _same_format(t: Tensor, like: Tensor) -> Tensor:
    """``t`` in ``like``'s memory format (random draws are made in NCHW order, so the
    values do not depend on the layout; only their placement in memory does)."""
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    return t


def random_start(
    x: Tensor, config: PGDConfig, generator: torch.Generator | None = None
) -> Tensor:
    """The initial perturbation of ``config.init``, projected into the feasible set."""
    if config.init == "zero" or config.eps == 0:
        return torch.zeros_like(x)
    if config.init == "normal":
        delta = 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif config.norm == "linf":
        delta = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * config.eps
    else:
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        radius = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
        radius = radius.view(-1, *([1] * (x.dim() - 1))) * config.eps
        delta = direction / _per_sample_l2(direction).clamp_min(1e-12) * radius
    return project(_same_format(delta, x), x, config.norm, config.eps)


def _ascent_step(delta: Tensor, grad: Tensor, config: PGDConfig) -> Tensor:
    if config.norm == "linf":
        return delta + config.alpha * grad.sign()
    return delta + config.alpha * grad / _per_sample_l2(grad).clamp_min(1e-12)


# ---------------------------------------------------------------------------- PGD


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    config: PGDConfig = PGDConfig(),
    *,
    generator: torch.Generator | None = None,
    natural_logits: Tensor | None = None,
    loss_fn: Optional[PerSampleLoss] = None,
    delta_init: Tensor | None = None,
    amp: bool = True,
) -> Tensor:
    """Adversarial examples ``x' = x + delta`` that maximize a per-sample loss.

    Args:
        model: maps images in [0,1] to logits.
        x: clean images (B, C, H, W) in [0,1]; never modified.
        y: labels for ``ce``/``cw`` (may be None for ``kl`` or a custom ``loss_fn``).
        config: the attack (see ``PGDConfig``).
        generator: draws the random starts; the same seeded generator gives the same examples.
        natural_logits: for ``kl``; computed once on ``x`` (in the attack's mode) if omitted.
        loss_fn: a custom per-sample objective of the logits, replacing ``config.loss``
            (temporal ensembling adds its term this way).
        delta_init: an explicit first start (restart 0) instead of a random one; probes use
            it to give a sample the same start at every parameter point.
        amp: bf16 autocast on CUDA (ignored on the CPU).

    Returns the detached adversarial images, same dtype and memory format as ``x``.
    """
    x = x.detach()
    mode = module_mode(model, False) if config.eval_mode else contextlib.nullcontext()
    with mode, frozen_parameters(model):
        if loss_fn is None:
            if config.loss == "kl" and natural_logits is None:
                with torch.no_grad(), autocast(x.device, amp):
                    natural_logits = model(x)
            loss_fn = attack_loss(config.loss, y, natural_logits)

        best_x: Tensor | None = None
        best_loss: Tensor | None = None
        for restart in range(config.restarts):
            if restart == 0 and delta_init is not None:
                delta = project(delta_init.detach().to(x), x, config.norm, config.eps)
            else:
                delta = random_start(x, config, generator)
            for _ in range(config.steps):
                delta.requires_grad_(True)
                with autocast(x.device, amp):
                    logits = model(x + delta)
                # Sum, not mean: each sample's gradient keeps its own scale (a 1/B factor
                # underflows in bf16 for large batches and changes nothing for the steps).
                loss = loss_fn(logits).sum()
                (grad,) = torch.autograd.grad(loss, delta)
                delta = project(_ascent_step(delta.detach(), grad, config), x, config.norm, config.eps)
            x_adv = (x + delta).detach()
            if config.restarts == 1:
                return x_adv
            with torch.no_grad(), autocast(x.device, amp):
                final = full_precision(loss_fn(model(x_adv)))
            if best_x is None:
                best_x, best_loss = x_adv, final
            else:
                better = final > best_loss
                best_x = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best_x)
                best_loss = torch.maximum(best_loss, final)
        assert best_x is not None
        return best_x


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float = 8 / 255,
    norm: str = "linf",
    *,
    random_start: bool = False,
    generator: torch.Generator | None = None,
    amp: bool = True,
) -> Tensor:
    """FGSM, or FGSM with random start (step 1.25 eps): ``pgd`` with one step."""
    config = fgsm_rs_config(eps, norm) if random_start else fgsm_config(eps, norm)
    return pgd(model, x, y, config, generator=generator, amp=amp)


# ---------------------------------------------------------------------------- names

_ATTACK_NAME = re.compile(r"^(?P<kind>pgd|cw)(?P<steps>\d+)(?:x(?P<restarts>\d+))?$")


@dataclass(frozen=True)
class AttackSpec:
    """A named evaluation attack: ``natural`` or a PGD configuration."""

    name: str
    config: PGDConfig | None  # None = natural (no attack)

    @property
    def steps(self) -> int:
        return 0 if self.config is None else self.config.steps

    @property
    def restarts(self) -> int:
        return 0 if self.config is None else self.config.restarts


def parse_attack(
    name: str, *, norm: str = "linf", eps: float = 8 / 255, alpha: float | None = None
) -> AttackSpec:
    """Parse an attack name: ``natural``, ``fgsm``, ``fgsm_rs``, ``pgdK`` or ``cwK``
    (K steps of PGD on CE or on the CW margin), optionally ``xR`` for R restarts
    (``pgd50x10``). The step size defaults to eps/4 (2/255 at 8/255).
    """
    name = name.strip().lower()
    if name == "natural":
        return AttackSpec(name, None)
    if name == "fgsm":
        return AttackSpec(name, fgsm_config(eps, norm))
    if name == "fgsm_rs":
        return AttackSpec(name, fgsm_rs_config(eps, norm, alpha))
    match = _ATTACK_NAME.match(name)
    if not match:
        raise AtprobeError(
            f"unknown attack {name!r}: use natural, fgsm, fgsm_rs, pgdK or cwK (e.g. pgd10, cw100, pgd50x5)"
        )
    steps = int(match["steps"])
    restarts = int(match["restarts"] or 1)
    if steps < 1:
        raise AtprobeError(f"attack {name!r} needs at least one step")
    loss = "ce" if match["kind"] == "pgd" else "cw"
    step = eps / 4 if alpha is None else alpha
    return AttackSpec(name, PGDConfig(norm=norm, eps=eps, alpha=step, steps=steps, loss=loss, restarts=restarts))


def with_config(spec: AttackSpec, **changes) -> AttackSpec:
    """A copy of ``spec`` with some PGD fields changed (e.g. ``eval_mode``)."""
    if spec.config is None:
        return spec
    return AttackSpec(spec.name, replace(spec.config, **changes))
