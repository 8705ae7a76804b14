"""``flatness``: flatness of the weight loss landscape of the adversarial loss (Wu et al.,
NeurIPS 2020, "Adversarial weight perturbation helps robust generalization"; Dong et al.,
ICLR 2022, Sec. 3.3, Fig. 6).

With filter-normalized random directions ``d_1..d_K`` (``atprobe.directions``, Li et al.
2018: Gaussian, every output filter rescaled to its weight filter's norm, 1-d parameters
zeroed by default) and a grid of ``lam``, the adversarial loss at the point
``theta + lam d_k`` is

    rho(theta + lam d_k) = 1/N sum_i CE(f(x'_i; theta + lam d_k), y_i),
    x'_i = PGD against the model *at that point*, from sample i's own random start,

Wu et al.'s ``g(alpha) = rho(w + alpha d)``. The adversarial examples are re-crafted at every
point (the loss is the robust loss of the perturbed model, not the loss of theta's
examples), from a start that depends on ``(seed, sample index)`` only, so ``lam = 0``
reproduces the model's own adversarial loss exactly. The summary is the mean increase at
radius ``r``:

    flatness(r) = mean over k and over the grid points lam = +-r of [rho(theta + lam d_k) - rho(theta)]

(both signs when the grid has them: the first-order term ``lam <grad rho, d_k>`` cancels
between ``+r`` and ``-r``, leaving about ``r^2/2 d_k^T H d_k``). Larger = sharper. ``r``
defaults to the largest ``|lam|`` of the grid.

``probe(model, data, config)`` returns the curve, one row per (direction, lam) with the
adversarial and natural loss and accuracy; :func:`summarize` the mean increase;
:func:`complexity_rows` the row of ``atprobe complexity``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import pandas as pd
import torch
from torch import Tensor, nn

from atprobe import objectives
from atprobe.attacked import attacked_batches
from atprobe.data import Split
from atprobe.directions import IGNORES, NORMS, ModelAt, model_parameters, parse_lambdas, perturbed_parameters
from atprobe.directions import directions as draw_directions
from atprobe.errors import AtprobeError, check_choice
from atprobe.probes._gradutil import COMPLEXITY_COLUMNS, PGDFields, is_int, is_number
from atprobe.runtime import module_mode

__all__ = [
    "CURVE_COLUMNS",
    "DEFAULT_LAMBDAS",
    "FlatnessConfig",
    "SUMMARY_COLUMNS",
    "complexity_rows",
    "probe",
    "summarize",
]

CURVE_COLUMNS = ["direction", "lam", "n", "adv_loss", "adv_acc", "nat_loss", "nat_acc"]
SUMMARY_COLUMNS = ["loss", "radius", "directions", "n", "at_theta", "at_radius", "increase", "increase_std"]

#: The default grid: 11 points from -0.5 to 0.5 (step 0.1), so r = 0.5 by default.
DEFAULT_LAMBDAS = parse_lambdas("-0.5:0.5:11")


@dataclass(frozen=True)
class FlatnessConfig(PGDFields):
    """What ``flatness`` measures.

    lambdas: the grid of steps along each direction (relative filter steps); must contain 0
        (see ``atprobe.directions.parse_lambdas``).
    radius: ``r`` of the summary; default (None) the largest ``|lam|`` of the grid, and it
        must be the ``|lam|`` of a grid point (set to that value after validation).
    directions: ``K`` random directions, drawn one after the other from a CPU generator
        seeded with ``seed`` (the same directions on every machine).
    ignore, direction_norm: ``atprobe.directions`` options.
    threat: the PGD attack re-crafted at every point (default PGD-10 at 8/255, step eps/4).
    batch_size: samples per attack batch.
    seed: directions and the attacks' per-sample random starts.
    """

    lambdas: tuple[float, ...] = field(default=DEFAULT_LAMBDAS)
    radius: float | None = None
    directions: int = 5
    ignore: str = "biasbn"
    direction_norm: str = "filter"
    batch_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.lambdas, str) or not all(is_number(v) for v in self.lambdas):
            raise AtprobeError("lambdas must be finite numbers")
        object.__setattr__(self, "lambdas", tuple(float(v) for v in self.lambdas))
        if len(set(self.lambdas)) != len(self.lambdas):
            raise AtprobeError("lambdas must be distinct")
        if 0.0 not in self.lambdas:
            raise AtprobeError("the lam grid does not contain 0, the reference point")
        sizes = sorted({abs(v) for v in self.lambdas if v != 0})
        if not sizes:
            raise AtprobeError("the lam grid has no point besides 0: flatness needs a step")
        if self.radius is None:
            object.__setattr__(self, "radius", sizes[-1])
        elif not is_number(self.radius) or float(self.radius) not in sizes:
            shown = ", ".join(f"{v:g}" for v in sizes)
            raise AtprobeError(f"radius {self.radius!r} is not the |lam| of a grid point (grid sizes: {shown})")
        object.__setattr__(self, "radius", float(self.radius))
        if not is_int(self.directions) or self.directions < 1:
            raise AtprobeError(f"number of directions must be an integer >= 1, got {self.directions!r}")
        check_choice(self.ignore, IGNORES, "direction ignore option")
        check_choice(self.direction_norm, NORMS, "direction norm")
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise AtprobeError(f"batch size must be an integer >= 1, got {self.batch_size!r}")


def _evaluate(model: nn.Module, point: Mapping[str, Tensor], data: Split, config: FlatnessConfig) -> dict[str, float]:
    """Adversarial and natural mean loss and accuracy of the model at ``point``, PGD
    re-crafted there (``atprobe.attacked``: keyed starts, so each sample starts from the
    same point at every lam)."""
    view = ModelAt(model, point)
    n = len(data)
    values = None
    for b in attacked_batches(view, data, config.attack, seed=config.seed, batch_size=config.batch_size, amp=False,
                              natural=True):
        part = torch.stack([
            objectives.ce(b.logits, b.y), (b.logits.argmax(1) == b.y),
            objectives.ce(b.natural_logits, b.y), (b.natural_logits.argmax(1) == b.y),
        ]).to(torch.float64)
        if values is None:
            values = torch.empty(4, n, dtype=torch.float64, device=part.device)
        values[:, b.rows] = part
    adv_loss, adv_acc, nat_loss, nat_acc = (values.sum(dim=1) / n).tolist()  # one host sync per point
    return {"adv_loss": adv_loss, "adv_acc": adv_acc, "nat_loss": nat_loss, "nat_acc": nat_acc}


def probe(
    model: nn.Module,
    data: Split,
    config: FlatnessConfig = FlatnessConfig(),
    *,
    directions: Sequence[Mapping[str, Tensor]] | None = None,
    progress=None,
) -> pd.DataFrame:
    """The landscape curve: one row per (direction, lam) (columns :data:`CURVE_COLUMNS`), in
    the order directions x ``config.lambdas``: ``adv_loss``/``adv_acc`` (PGD re-crafted at
    the point), ``nat_loss``/``nat_acc`` (the natural samples) at ``theta + lam d_k``.

    ``directions``: explicit directions (``{name: tensor}``, e.g. the difference of two
    checkpoints) instead of ``config.directions`` random ones. ``data.y`` are the labels;
    samples are keyed by ``data.index`` for their random starts. The point ``lam = 0`` is
    evaluated once and repeated for every direction. The model's weights and buffers are not
    modified. ``progress``: anything with ``update(n)``, advanced by the samples of each point.
    """
    if directions is None:
        directions = draw_directions(model, config.directions, config.seed, config.ignore,
                                     norm=config.direction_norm, device="cpu")
    if len(directions) == 0:
        raise AtprobeError("no direction given")
    if len(data) == 0:
        raise AtprobeError("no samples to probe")
    rows = []
    with module_mode(model, False):
        theta = _evaluate(model, model_parameters(model), data, config)
        if progress is not None:
            progress.update(len(data))
        for k, d in enumerate(directions):
            for lam in config.lambdas:
                if lam == 0.0:
                    values = theta  # perturbed_parameters(model, d, 0) == theta bit for bit
                else:
                    values = _evaluate(model, perturbed_parameters(model, d, lam), data, config)
                    if progress is not None:
                        progress.update(len(data))
                rows.append({"direction": k, "lam": lam, "n": len(data), **values})
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def summarize(curve: pd.DataFrame, config: FlatnessConfig = FlatnessConfig()) -> pd.DataFrame:
    """The mean increase at radius ``config.radius``, one row per loss (``adv``, ``nat``;
    columns :data:`SUMMARY_COLUMNS`): ``at_theta`` = the loss at theta, ``at_radius`` = its
    mean over directions and the grid points ``lam = +-r``, ``increase`` = ``at_radius -
    at_theta`` (the flatness measure for ``adv``), ``increase_std`` = population std over
    directions of each direction's increase (mean over its ``+-r`` points)."""
    r = config.radius
    zero = curve[curve["lam"] == 0.0]
    ring = curve[curve["lam"].abs() == r]
    if zero.empty or ring.empty:
        raise AtprobeError(f"the curve has no point at lam = 0 or at |lam| = {r:g}")
    rows = []
    for loss in ("adv", "nat"):
        col = f"{loss}_loss"
        at_theta = float(zero[col].iloc[0])
        per_direction = ring.groupby("direction")[col].mean() - at_theta
        rows.append({
            "loss": loss, "radius": r, "directions": int(per_direction.size), "n": int(curve["n"].iloc[0]),
            "at_theta": at_theta, "at_radius": float(ring[col].mean()),
            "increase": float(ring[col].mean()) - at_theta,
            "increase_std": float(per_direction.std(ddof=0)),
        })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def complexity_rows(model: nn.Module, samples: Split, config: FlatnessConfig = FlatnessConfig()) -> pd.DataFrame:
    """The row of ``atprobe complexity`` (columns :data:`~atprobe.probes.curvature.COMPLEXITY_COLUMNS`):
    measure ``flatness``, variant ``radius=<r>;directions=<K>``, value = the mean increase of
    the adversarial loss at radius r. Only the grid points 0 and ``+-r`` are evaluated.
    ``reason`` '' or why the value is NaN."""
    r = config.radius
    config = replace(config, lambdas=tuple(v for v in config.lambdas if v == 0 or abs(v) == r))
    summary = summarize(probe(model, samples, config), config)
    value = float(summary.loc[summary["loss"] == "adv", "increase"].iloc[0])
    reason = "" if math.isfinite(value) else "the adversarial loss is not finite at theta or at radius r"
    return pd.DataFrame([{"measure": "flatness", "variant": f"radius={r:g};directions={config.directions}",
                          "value": value, "reason": reason}], columns=COMPLEXITY_COLUMNS)
