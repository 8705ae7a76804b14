"""The per-sample losses of the gradient probes: the :class:`PerSampleLoss` protocol and the
adversarial-training objectives (``clean``, ``pgd_at``, ``trades``, ``R``) of Dong et al.
(ICLR 2022) as :class:`Objective`, whose ``prepare`` crafts the adversarial examples at the
parameter point being probed (see :mod:`atprobe.pergrad` for how they are differentiated)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from atprobe import objectives
from atprobe.attacks import PGDConfig, pgd
from atprobe.errors import AtprobeError, check_choice
from atprobe.starts import Starts
from atprobe.threat import ThreatModel

__all__ = ["OBJECTIVES", "Objective", "PerSampleLoss", "PointCall", "default_attack", "objective"]

#: ``f``: images -> logits of the model at the parameter point being differentiated.
PointCall = Callable[[Tensor], Tensor]


class PerSampleLoss(Protocol):
    """``loss(f, x, y, *extra) -> (B,)``: per-sample losses of the logits function ``f``.

    Inside the gradient computation it is called one sample at a time (B = 1, under
    ``vmap``), so it must not mix samples (no batch means, no data-dependent Python
    control flow). ``extra`` are the tensors ``prepare`` returned, if any.
    """

    def __call__(self, f: PointCall, x: Tensor, y: Tensor, *extra: Tensor) -> Tensor: ...


@runtime_checkable
class _Prepared(Protocol):
    def prepare(
        self, model_at: nn.Module, x: Tensor, y: Tensor, sample_ids: Sequence[int]
    ) -> tuple[Tensor, ...]: ...


#: The objectives of the gradient probes (Dong et al. 2022):
#: clean CE, the PGD-AT loss, the TRADES loss and the robust gap R = CE(x') - CE(x).
OBJECTIVES = ("clean", "pgd_at", "trades", "R")

_DEFAULT_THREAT = ThreatModel()


def default_attack(name: str, threat: ThreatModel = _DEFAULT_THREAT) -> PGDConfig | None:
    """The attack of objective ``name`` under ``threat`` (default: the training attack of
    ``atprobe.train``, L-inf 8/255, step 2/255, 10 steps): CE with the threat model's
    start (uniform) for ``pgd_at`` and ``R``, KL with TRADES' ``0.001 N(0, I)`` start for
    ``trades``; none for ``clean``."""
    check_choice(name, OBJECTIVES, "objective")
    if name == "clean":
        return None
    return threat.attack("kl" if name == "trades" else "ce")


@dataclass(frozen=True)
class Objective:
    """A per-sample training objective of adversarial training, as a :class:`PerSampleLoss`
    with a ``prepare`` step that crafts the adversarial examples (see :func:`objective`).

    ``clean``:  CE(f(x), y)
    ``pgd_at``: CE(f(x'), y),                          x' = PGD on CE(f(.), y)
    ``trades``: CE(f(x), y) + beta KL(f(x) || f(x')),  x' = PGD on KL(f(x) || f(.))
    ``R``:      CE(f(x'), y) - CE(f(x), y),             x' = PGD on CE(f(.), y)

    KL is between the softmax distributions, gradient flowing through both arguments
    (``objectives.trades_kl``); every CE is ``objectives.ce``.
    """

    name: str
    attack: PGDConfig | None = None
    beta: float = 6.0
    seed: int = 0
    amp: bool = False

    def prepare(
        self, model_at: nn.Module, x: Tensor, y: Tensor, sample_ids: Tensor | Sequence[int]
    ) -> tuple[Tensor, ...]:
        """``(x',)`` crafted against ``model_at`` (the model at the probed point), or ``()``.

        The starts are keyed by ``(seed, sample id)`` (``atprobe.starts``), so a sample
        starts from the same point at every parameter point and in every chunk. The attack runs
        in eval mode (``PGDConfig.eval_mode``; the gradient computation is in eval mode
        anyway). ``x'`` is detached: the gradient treats it as a constant (Danskin).
        """
        if self.attack is None:
            return ()
        ids = sample_ids if isinstance(sample_ids, Tensor) else torch.as_tensor(list(sample_ids), dtype=torch.int64)
        x_adv = pgd(model_at, x, y, self.attack, starts=Starts(self.seed, ids.to(x.device)), amp=self.amp)
        return (x_adv,)

    def __call__(self, f: PointCall, x: Tensor, y: Tensor, *extra: Tensor) -> Tensor:
        if self.name == "clean":
            return objectives.ce(f(x), y)
        (x_adv,) = extra
        if self.name == "pgd_at":
            return objectives.ce(f(x_adv), y)
        # One forward for both inputs: in eval mode samples do not interact, so this is the
        # same as two forwards, with half the kernel launches.
        logits = f(torch.cat([x, x_adv]))
        natural, adversarial = logits[: x.shape[0]], logits[x.shape[0] :]
        if self.name == "trades":
            return objectives.ce(natural, y) + self.beta * objectives.trades_kl(natural, adversarial)
        return objectives.ce(adversarial, y) - objectives.ce(natural, y)  # R


def objective(
    name: str,
    *,
    attack: PGDConfig | None = None,
    beta: float = 6.0,
    seed: int = 0,
    amp: bool = False,
) -> Objective:
    """The objective ``name`` (one of :data:`OBJECTIVES`) for the gradient functions.

    Args:
        attack: the inner maximization (default :func:`default_attack`). ``pgd_at``/``R``
            need a ``ce`` or ``cw`` attack, ``trades`` a ``kl`` attack, ``clean`` none.
            Restarts are keyed per sample too, so any number keeps "same start at every
            parameter point".
        beta: TRADES' weight on the KL term.
        seed: keys the per-sample random starts (with each sample's id).
        amp: bf16 autocast for the attack on CUDA. Off by default: probes compare
            gradients at nearby points, where bf16 rounding of x' would be noise.
    """
    check_choice(name, OBJECTIVES, "objective")
    if name == "clean":
        if attack is not None:
            raise AtprobeError("the clean objective has no attack")
        return Objective(name)
    attack = default_attack(name) if attack is None else attack
    wanted = ("kl",) if name == "trades" else ("ce", "cw")
    if attack.loss not in wanted:
        raise AtprobeError(f"objective {name} needs an attack on {' or '.join(wanted)}, got {attack.loss!r}")
    if not (math.isfinite(beta) and beta >= 0):
        raise AtprobeError(f"TRADES beta must be a finite number >= 0, got {beta}")
    return Objective(name, attack, float(beta), int(seed), bool(amp))
