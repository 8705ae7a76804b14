"""The threat model: the one place that says what "an attack of budget eps" means.

Training, evaluation and every probe hold one :class:`ThreatModel` and turn it into the
attack they run with :meth:`ThreatModel.attack`; the CLI builds it with one decorator
(``atprobe.cli.common.threat_options``). The dependent defaults live here and only here:

* ``eps``: 8/255 for L-inf, 128/255 (0.5) for L2 (the budgets of Madry et al., TRADES,
  Rice et al. and RobustBench on CIFAR);
* ``alpha`` (the PGD step): eps/4, i.e. 2/255 at 8/255 (the official PGD-AT/TRADES code);
* ``start``: ``auto`` picks the start of the attack's loss: a uniform draw in the ball for
  CE and the CW margin (Madry et al.), TRADES' ``0.001 N(0, I)`` for its KL.

They are applied in ``__post_init__``, so a ``ThreatModel`` is always resolved: there is
no unresolved state a caller could read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from atprobe.errors import AtprobeError, check_choice

NORMS = ("linf", "l2")
STARTS = ("auto", "uniform", "normal", "zero")
#: The default radius of each norm, in [0, 1] pixel units.
DEFAULT_EPS = {"linf": 8 / 255, "l2": 128 / 255}
#: alpha = eps / ALPHA_DIVISOR unless given.
ALPHA_DIVISOR = 4


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise AtprobeError(f"{what} must be a finite number >= 0, got {v!r}")
    return float(v)


def _count(v: Any, what: str, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise AtprobeError(f"{what} must be an integer >= {low}, got {v!r}")
    return int(v)


@dataclass(frozen=True)
class ThreatModel:
    """A perturbation budget and how PGD searches it.

    norm: ``linf`` or ``l2`` ball around the clean image (and the [0, 1] box).
    eps: its radius in [0, 1] pixel units (None: the norm's default, 8/255 or 128/255).
    alpha: the PGD step (None: eps/4). L-inf steps are ``alpha sign(g)``, L2 steps
        ``alpha g / ||g||``.
    steps: PGD steps (0: the random start alone).
    restarts: random starts; per sample the one with the highest final loss is kept.
    start: ``auto`` (the loss's own: uniform for CE/CW, 0.001 N(0, I) for TRADES' KL),
        ``uniform``, ``normal`` or ``zero``.
    """

    norm: str = "linf"
    eps: float | None = None
    alpha: float | None = None
    steps: int = 10
    restarts: int = 1
    start: str = "auto"

    def __post_init__(self) -> None:
        check_choice(self.norm, NORMS, "norm")
        check_choice(self.start, STARTS, "attack start")
        eps = DEFAULT_EPS[self.norm] if self.eps is None else _number(self.eps, "eps")
        if self.norm == "linf" and eps > 1:
            raise AtprobeError(f"L-inf eps {eps:g} exceeds the [0,1] pixel range; did you mean {eps:g}/255?")
        alpha = eps / ALPHA_DIVISOR if self.alpha is None else _number(self.alpha, "alpha (step size)")
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "steps", _count(self.steps, "steps", 0))
        object.__setattr__(self, "restarts", _count(self.restarts, "restarts", 1))

    def start_for(self, loss: str) -> str:
        """The random start the attack on ``loss`` uses (``auto`` resolved)."""
        if self.start != "auto":
            return self.start
        return "normal" if loss == "kl" else "uniform"

    def attack(self, loss: str = "ce", *, eval_mode: bool = True, steps: int | None = None,
               restarts: int | None = None, alpha: float | None = None, start: str | None = None):
        """The ``atprobe.attacks.PGDConfig`` of this budget maximizing ``loss`` (``ce``,
        ``cw`` or ``kl``); ``steps``/``restarts``/``alpha``/``start`` override the
        threat model's own (a named eval attack such as ``pgd50x5`` carries its steps)."""
        from atprobe.attacks import PGDConfig  # attacks imports this module

        return PGDConfig(
            norm=self.norm,
            eps=self.eps,
            alpha=self.alpha if alpha is None else float(alpha),
            steps=self.steps if steps is None else int(steps),
            loss=loss,
            init=self.start_for(loss) if start is None else start,
            restarts=self.restarts if restarts is None else int(restarts),
            eval_mode=eval_mode,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """``linf eps=8/255 alpha=2/255 steps=10`` (fractions of 255 where exact)."""
        def px(v: float) -> str:
            k = v * 255
            return f"{round(k)}/255" if abs(k - round(k)) < 1e-9 else f"{v:g}"

        extra = f" restarts={self.restarts}" if self.restarts > 1 else ""
        return f"{self.norm} eps={px(self.eps)} alpha={px(self.alpha)} steps={self.steps}{extra}"
