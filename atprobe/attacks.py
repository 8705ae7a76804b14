"""Projected gradient attacks in [0,1] pixel space: the one implementation that
training, evaluation and every probe call.

``pgd`` maximizes a per-sample loss (``atprobe.objectives``) inside an L-inf or L2 ball
around ``x`` (and the [0,1] box). Its budget comes from a ``ThreatModel``
(``atprobe.threat``) through ``ThreatModel.attack``; its random starts are keyed per
sample (``atprobe.starts``), so an example depends on its sample alone, never on its batch.
FGSM and FGSM with random start are one-step configurations of it (``fgsm_config``,
``fgsm_rs_config``), not a second copy of the loop.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from atprobe.autoattack import NAMES as AUTOATTACK_NAMES
from atprobe.autoattack import AutoAttackConfig, autoattack_config
from atprobe.errors import AtprobeError, check_choice
from atprobe.objectives import ATTACK_LOSSES as LOSSES
from atprobe.objectives import PerSampleLoss, attack_loss, full_precision
from atprobe.runtime import autocast, frozen_parameters, module_mode
from atprobe.starts import Starts, keyed_normal, keyed_uniform
from atprobe.threat import NORMS, ThreatModel

INITS = ("uniform", "normal", "zero")


@dataclass(frozen=True)
class PGDConfig:
    """One projected-gradient attack: a threat model's budget (``ThreatModel.attack``
    builds it) plus the loss it maximizes and the mode it runs the model in.

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


def fgsm_config(threat: ThreatModel = ThreatModel()) -> PGDConfig:
    """FGSM (Goodfellow et al.): one full-size step (alpha = eps) from the clean input."""
    return threat.attack("ce", steps=1, restarts=1, alpha=threat.eps, start="zero")


def fgsm_rs_config(threat: ThreatModel = ThreatModel()) -> PGDConfig:
    """FGSM with random start (Wong et al. 2020, "fast AT"): uniform start, one step of
    1.25 eps (the method's own step, whatever the threat model's alpha)."""
    return threat.attack("ce", steps=1, restarts=1, alpha=1.25 * threat.eps, start="uniform")


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


def _linf_bounds(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-pixel bounds of ``x + delta`` for the L-inf ball and the [0,1] box, computed
    once per attack: ``clamp(x - eps, 0, 1)`` and ``clamp(x + eps, 0, 1)``."""
    return (x - eps).clamp_(0.0, 1.0), (x + eps).clamp_(0.0, 1.0)


def _project_(delta: Tensor, x: Tensor, norm: str, eps: float, bounds: tuple[Tensor, Tensor] | None) -> Tensor:
    """``project(delta, x, norm, eps)`` written into ``delta``'s own buffer (which the
    caller owns), bit for bit the same values; ``bounds`` are ``_linf_bounds(x, eps)``.

    L-inf: ``project`` computes ``clamp(x + clamp(delta, -eps, eps), 0, 1) - x``; this
    computes ``clamp(x + delta, lo, hi) - x`` with ``lo = clamp(x - eps, 0, 1)``,
    ``hi = clamp(x + eps, 0, 1)``. The same floats, not merely the same projection: the
    rounded sum ``d -> fl(x + d)`` is monotone, so it commutes with the clamp to
    ``[-eps, eps]`` (``fl(x + clamp(d, -eps, eps)) = clamp(fl(x + d), fl(x - eps), fl(x + eps))``),
    and clamping into ``[a, b]`` then into ``[0, 1]`` is clamping into
    ``[clamp(a, 0, 1), clamp(b, 0, 1)]`` for any ``a <= b`` (also when the two intervals
    are disjoint). ``tests/test_attacks.py`` checks it against a frozen copy of the old loop.
    """
    if norm == "linf":
        assert bounds is not None
        lo, hi = bounds
        return delta.add_(x).clamp_(lo, hi).sub_(x)
    scale = (eps / _per_sample_l2(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta.mul_(scale).add_(x).clamp_(0.0, 1.0).sub_(x)


def _start(x: Tensor, config: PGDConfig, starts: Starts, restart: int,
           bounds: tuple[Tensor, Tensor] | None) -> Tensor:
    """``random_start`` (see there), its arithmetic done in place on the fresh draws."""
    if config.init == "zero" or config.eps == 0:
        return torch.zeros_like(x)
    keys = starts.keys(restart).to(x.device)
    if keys.shape[0] != x.shape[0]:
        raise ValueError(f"{keys.shape[0]} start keys for a batch of {x.shape[0]}")
    shape = tuple(x.shape[1:])
    if config.init == "normal":
        delta = keyed_normal(keys, shape, x.dtype).mul_(0.001)
    elif config.norm == "linf":
        delta = keyed_uniform(keys, shape, x.dtype).mul_(2).sub_(1).mul_(config.eps)
    else:
        direction = keyed_normal(keys, shape, x.dtype)
        radius = keyed_uniform(keys ^ 0x5EED, (1,), x.dtype).view(-1, *([1] * (x.dim() - 1))) * config.eps
        delta = direction / _per_sample_l2(direction).clamp_min(1e-12) * radius
    return _project_(_same_format(delta, x), x, config.norm, config.eps, bounds)


def random_start(x: Tensor, config: PGDConfig, starts: Starts, restart: int = 0) -> Tensor:
    """The initial perturbation of ``config.init`` for restart ``restart``, drawn per sample
    from ``starts`` (``atprobe.starts``: a function of seed and sample index only) in NCHW
    order and projected into the feasible set."""
    bounds = _linf_bounds(x, config.eps) if config.norm == "linf" else None
    return _start(x, config, starts, restart, bounds)


def _ascent_step_(delta: Tensor, grad: Tensor, config: PGDConfig) -> Tensor:
    """``delta + alpha * sign(g)`` (L-inf) or ``delta + alpha * g / ||g||_2`` (L2), added
    into ``delta``'s buffer: the same operations in the same order as the out-of-place
    formula, so the same floats. ``grad`` is only read (autograd may hand back an
    expanded or shared tensor)."""
    if config.norm == "linf":
        return delta.add_(grad.sign().mul_(config.alpha))
    step = torch.mul(grad, config.alpha).div_(_per_sample_l2(grad).clamp_min(1e-12))
    return delta.add_(step)


# ---------------------------------------------------------------------------- PGD


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    config: PGDConfig = PGDConfig(),
    *,
    starts: Starts | None = None,
    natural_logits: Tensor | None = None,
    loss_fn: PerSampleLoss | None = None,
    delta_init: Tensor | None = None,
    amp: bool = True,
) -> Tensor:
    """Adversarial examples ``x' = x + delta`` that maximize a per-sample loss.

    Args:
        model: maps images in [0,1] to logits.
        x: clean images (B, C, H, W) in [0,1]; never modified.
        y: labels for ``ce``/``cw`` (may be None for ``kl`` or a custom ``loss_fn``).
        config: the attack (see ``PGDConfig``).
        starts: the per-sample keys of the random starts (``Starts(seed, ids)``, ``ids`` the
            samples' dataset indices); default ``Starts(0, arange(B))``. The same keys give
            the same examples, whatever else is in the batch.
        natural_logits: for ``kl``; computed once on ``x`` (in the attack's mode) if omitted.
        loss_fn: a custom per-sample objective of the logits, replacing ``config.loss``
            (temporal ensembling adds its term this way).
        delta_init: an explicit first start (restart 0) instead of a random one; probes use
            it to give a sample the same start at every parameter point.
        amp: bf16 autocast on CUDA (ignored on the CPU).

    Returns the detached adversarial images, same dtype and memory format as ``x``.

    Per step the perturbation is updated in place (``_ascent_step_``, ``_project_``), so
    the only new tensors of a step outside the model are its input ``x + delta`` and
    ``sign(g)`` (eight in the out-of-place formula; on the CPU a fresh 1.5 MB buffer
    costs more than the arithmetic in it).
    """
    x = x.detach()
    if starts is None:
        starts = Starts(0, torch.arange(x.shape[0], device=x.device))
    mode = module_mode(model, False) if config.eval_mode else contextlib.nullcontext()
    with mode, frozen_parameters(model):
        if loss_fn is None:
            if config.loss == "kl" and natural_logits is None:
                with torch.no_grad(), autocast(x.device, amp):
                    natural_logits = model(x)
            loss_fn = attack_loss(config.loss, y, natural_logits)

        bounds = _linf_bounds(x, config.eps) if config.norm == "linf" else None
        best_x: Tensor | None = None
        best_loss: Tensor | None = None
        for restart in range(config.restarts):
            if restart == 0 and delta_init is not None:
                delta = project(delta_init.detach().to(x), x, config.norm, config.eps)
            else:
                delta = _start(x, config, starts, restart, bounds)
            if delta.stride() != x.stride():  # updated in place from here: give it x's layout
                delta = torch.empty_like(x).copy_(delta)
            for _ in range(config.steps):
                # A leaf sharing delta's memory; the graph is freed by autograd.grad before
                # delta is written in place, and the model sees the non-leaf x + delta, as
                # ever (so a model that works in place on its input still can).
                leaf = delta.detach().requires_grad_(True)
                with autocast(x.device, amp):
                    logits = model(x + leaf)
                # Sum, not mean: each sample's gradient keeps its own scale (a 1/B factor
                # underflows in bf16 for large batches and changes nothing for the steps).
                loss = loss_fn(logits).sum()
                (grad,) = torch.autograd.grad(loss, leaf)
                _project_(_ascent_step_(delta, grad, config), x, config.norm, config.eps, bounds)
            x_adv = x + delta
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


# ---------------------------------------------------------------------------- names

_ATTACK_NAME = re.compile(r"^(?P<kind>pgd|cw)(?P<steps>\d+)?(?:x(?P<restarts>\d+))?$")


@dataclass(frozen=True)
class AttackSpec:
    """A named evaluation attack: ``natural``, a PGD configuration or an AutoAttack run
    (``atprobe.autoattack``, through the optional extra)."""

    name: str
    config: PGDConfig | AutoAttackConfig | None  # None = natural (no attack)

    @property
    def norm(self) -> str:
        return "none" if self.config is None else self.config.norm

    @property
    def eps(self) -> float:
        return 0.0 if self.config is None else self.config.eps

    @property
    def alpha(self) -> float:
        """The PGD step; 0 for ``natural`` and AutoAttack (no fixed step)."""
        return 0.0 if self.config is None else self.config.alpha

    @property
    def steps(self) -> int:
        return 0 if self.config is None else self.config.steps

    @property
    def restarts(self) -> int:
        return 0 if self.config is None else self.config.restarts


def parse_attack(name: str, threat: ThreatModel = ThreatModel()) -> AttackSpec:
    """Parse an attack name against a threat model: ``natural``, ``fgsm``, ``fgsm_rs``,
    ``pgd``/``cw`` (PGD on CE / on the CW margin with the threat model's steps and
    restarts), ``pgdK``/``cwK`` (K steps) with an optional ``xR`` for R restarts
    (``pgd50x10``). Norm, eps, step size and start are the threat model's.

    AutoAttack (``atprobe.autoattack.NAMES``, the optional extra ``pyautoattack``): ``aa``
    (standard version), ``aa-plus``, ``apgd-ce``, ``apgd-t``, ``fab-t``, ``square``, in the
    threat model's norm and eps (its alpha, steps, restarts and start do not apply); without
    the extra these are a one-line error saying how to install it.
    """
    name = name.strip().lower()
    if name == "natural":
        return AttackSpec(name, None)
    if name in AUTOATTACK_NAMES:
        return AttackSpec(name, autoattack_config(name, threat.norm, threat.eps))
    if name == "fgsm":
        return AttackSpec(name, fgsm_config(threat))
    if name == "fgsm_rs":
        return AttackSpec(name, fgsm_rs_config(threat))
    match = _ATTACK_NAME.match(name)
    if not match:
        raise AtprobeError(
            f"unknown attack {name!r}: use natural, fgsm, fgsm_rs, pgd[K] or cw[K] (e.g. pgd10, cw100, pgd50x5), "
            f"or AutoAttack's {', '.join(AUTOATTACK_NAMES)}"
        )
    steps = threat.steps if match["steps"] is None else int(match["steps"])
    restarts = threat.restarts if match["restarts"] is None else int(match["restarts"])
    if steps < 1:
        raise AtprobeError(f"attack {name!r} needs at least one step")
    if restarts < 1:
        raise AtprobeError(f"attack {name!r} needs at least one restart")
    loss = "ce" if match["kind"] == "pgd" else "cw"
    return AttackSpec(name, threat.attack(loss, steps=steps, restarts=restarts))


def with_config(spec: AttackSpec, **changes) -> AttackSpec:
    """A copy of ``spec`` with some PGD fields changed (e.g. ``eval_mode``)."""
    if spec.config is None:
        return spec
    if not isinstance(spec.config, PGDConfig):
        raise AtprobeError(f"attack {spec.name!r} is not PGD: it has no PGD fields to change")
    return AttackSpec(spec.name, replace(spec.config, **changes))
