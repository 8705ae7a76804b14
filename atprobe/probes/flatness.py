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

Two landscapes at the scale of Li et al. 2018 (tomgoldstein/loss-landscape), with the same
per-point evaluation (:func:`_evaluate`: PGD re-crafted against the model at the point):

* :func:`plane`: ``theta + x d_1 + y d_2`` over a grid ``xs x ys`` (Li et al.'s
  ``--x=XMIN:XMAX:XNUM --y=YMIN:YMAX:YNUM``, two filter-normalized directions, biases and
  BatchNorm zeroed by default: ``biasbn``);
* :func:`path`: ``theta(t) = (1 - t) theta_A + t theta_B`` between two checkpoints, the
  BatchNorm statistics recomputed at every point (``atprobe.bnstats.prepare`` with
  ``recompute:N``: an average of two networks' running statistics is the statistics of
  neither).

Both iterate over an explicit list of point indices (``points``; :func:`plane_grid`,
:func:`path_grid` give what the indices mean), so a caller can hand each process its share
of the grid and concatenate the rows: every row carries its ``point``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field, replace

import pandas as pd
import torch
from torch import Tensor, nn

from atprobe import bnstats, objectives
from atprobe.attacked import attacked_batches
from atprobe.data import Split
from atprobe.directions import IGNORES, NORMS, ModelAt, model_parameters, parse_lambdas, perturbed_parameters
from atprobe.directions import directions as draw_directions
from atprobe.distributed import ONE_PROCESS, SampleShare
from atprobe.errors import AtprobeError, check_choice
from atprobe.probes._gradutil import COMPLEXITY_COLUMNS, Gather, PGDFields, identity_gather, is_int, is_number
from atprobe.runtime import module_mode

__all__ = [
    "CURVE_COLUMNS",
    "DEFAULT_LAMBDAS",
    "DEFAULT_PLANE_AXIS",
    "DEFAULT_TS",
    "PATH_COLUMNS",
    "PLANE_COLUMNS",
    "FlatnessConfig",
    "PathConfig",
    "PlaneConfig",
    "SUMMARY_COLUMNS",
    "check_same_architecture",
    "complexity_rows",
    "interpolated_parameters",
    "path",
    "path_grid",
    "plane",
    "plane_directions",
    "plane_grid",
    "probe",
    "summarize",
]

CURVE_COLUMNS = ["direction", "lam", "n", "adv_loss", "adv_acc", "nat_loss", "nat_acc"]
PLANE_COLUMNS = ["pair", "point", "x", "y", "n", "adv_loss", "adv_acc", "nat_loss", "nat_acc"]
PATH_COLUMNS = ["point", "t", "n", "adv_loss", "adv_acc", "nat_loss", "nat_acc"]
SUMMARY_COLUMNS = ["loss", "radius", "directions", "n", "at_theta", "at_radius", "increase", "increase_std"]

#: The default grid: 11 points from -0.5 to 0.5 (step 0.1), so r = 0.5 by default.
DEFAULT_LAMBDAS = parse_lambdas("-0.5:0.5:11")
#: Each axis of the default plane: 21 points from -1 to 1 (Li et al.'s span; they plot 51).
DEFAULT_PLANE_AXIS = parse_lambdas("-1:1:21", option="--x")
#: The default path: t from -0.5 to 1.5 in steps of 0.1 (0 = A, 1 = B, as Li et al.'s 1-d interpolations).
DEFAULT_TS = parse_lambdas("-0.5:1.5:21", option="--t", zero=False)


def _check_evaluation(config: PGDFields, *, directions: bool = False) -> None:
    """What every landscape config shares: the batch size of the per-point evaluation (and,
    with ``directions``, the random directions' options)."""
    if directions:
        check_choice(config.ignore, IGNORES, "direction ignore option")
        check_choice(config.direction_norm, NORMS, "direction norm")
    if not is_int(config.batch_size) or config.batch_size < 1:
        raise AtprobeError(f"batch size must be an integer >= 1, got {config.batch_size!r}")


def _check_grid(values, option: str) -> tuple[float, ...]:
    """A grid given as numbers (the CLI parses text with ``parse_lambdas``): finite, distinct."""
    if isinstance(values, str) or not values or not all(is_number(v) for v in values):
        raise AtprobeError(f"{option} must be a non-empty sequence of finite numbers")
    values = tuple(float(v) for v in values)
    if len(set(values)) != len(values):
        raise AtprobeError(f"{option} values must be distinct")
    return values


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
        _check_evaluation(self, directions=True)


@dataclass(frozen=True)
class PlaneConfig(PGDFields):
    """What ``flatness --plane`` measures (Li et al. 2018's 2-d surface of the adversarial loss).

    xs, ys: the grid along ``d_1`` and ``d_2`` (relative filter steps; need not contain 0).
    pairs: planes, pair k spanned by random directions ``2k`` and ``2k + 1`` of
        ``atprobe.directions.directions(model, 2 * pairs, seed, ...)`` (so pair 0's ``d_1``
        is the 1-d probe's direction 0 with the same seed).
    ignore, direction_norm, threat, batch_size, seed: as in :class:`FlatnessConfig`.
    """

    xs: tuple[float, ...] = field(default=DEFAULT_PLANE_AXIS)
    ys: tuple[float, ...] = field(default=DEFAULT_PLANE_AXIS)
    pairs: int = 1
    ignore: str = "biasbn"
    direction_norm: str = "filter"
    batch_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "xs", _check_grid(self.xs, "--x"))
        object.__setattr__(self, "ys", _check_grid(self.ys, "--y"))
        if not is_int(self.pairs) or self.pairs < 1:
            raise AtprobeError(f"number of direction pairs must be an integer >= 1, got {self.pairs!r}")
        _check_evaluation(self, directions=True)


@dataclass(frozen=True)
class PathConfig(PGDFields):
    """What ``flatness --between A B`` measures: the loss along ``(1 - t) theta_A + t theta_B``.

    ts: the points ``t`` (0 = A, 1 = B; outside [0, 1] extrapolates).
    bn_images: ``N`` of ``recompute:N``: training images the BatchNorm statistics are
        re-estimated on at every point (``atprobe.bnstats``; the same draw, from ``seed``,
        at every point).
    threat, batch_size, seed: as in :class:`FlatnessConfig`.
    """

    ts: tuple[float, ...] = field(default=DEFAULT_TS)
    bn_images: int = bnstats.DEFAULT_N
    batch_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "ts", _check_grid(self.ts, "--t"))
        bnstats.BNStats("recompute", self.bn_images)  # its one-line error for a bad N
        _check_evaluation(self)

    @property
    def bn_stats(self) -> bnstats.BNStats:
        return bnstats.BNStats("recompute", self.bn_images)


def _evaluate(model: nn.Module, point: Mapping[str, Tensor], data: Split, config: PGDFields,
              gather: Gather = identity_gather) -> dict[str, float]:
    """Adversarial and natural mean loss and accuracy of the model at ``point`` and ``n``, PGD
    re-crafted there (``atprobe.attacked``: keyed starts, so each sample starts from the
    same point at every lam). ``gather``: ``data`` is this rank's share and the means are
    taken over every rank's per-sample values (``SampleShare.gather_values``)."""
    view = ModelAt(model, point)
    n = len(data)
    values = None
    batches = attacked_batches(view, data, config.attack, seed=config.seed, batch_size=config.batch_size, amp=False,
                               natural=True) if n else ()
    for b in batches:
        part = torch.stack([
            objectives.ce(b.logits, b.y), (b.logits.argmax(1) == b.y),
            objectives.ce(b.natural_logits, b.y), (b.natural_logits.argmax(1) == b.y),
        ]).to(torch.float64)
        if values is None:
            values = torch.empty(4, n, dtype=torch.float64, device=part.device)
        values[:, b.rows] = part
    if values is None:  # an empty share
        values = torch.empty(4, 0, dtype=torch.float64)
    values = gather(values.T).T  # samples first: the gather joins them
    n = values.shape[1]
    adv_loss, adv_acc, nat_loss, nat_acc = (values.sum(dim=1) / n).tolist()  # one host sync per point
    return {"n": n, "adv_loss": adv_loss, "adv_acc": adv_acc, "nat_loss": nat_loss, "nat_acc": nat_acc}


def probe(
    model: nn.Module,
    data: Split,
    config: FlatnessConfig = FlatnessConfig(),
    *,
    directions: Sequence[Mapping[str, Tensor]] | None = None,
    progress=None,
    gather: Gather = identity_gather,
    kept: Container[int] | None = None,
) -> pd.DataFrame:
    """The landscape curve: one row per (direction, lam) (columns :data:`CURVE_COLUMNS`), in
    the order directions x ``config.lambdas``: ``adv_loss``/``adv_acc`` (PGD re-crafted at
    the point), ``nat_loss``/``nat_acc`` (the natural samples) at ``theta + lam d_k``.

    ``directions``: explicit directions (``{name: tensor}``, e.g. the difference of two
    checkpoints) instead of ``config.directions`` random ones. ``data.y`` are the labels;
    samples are keyed by ``data.index`` for their random starts. The point ``lam = 0`` is
    evaluated once and repeated for every direction. The model's weights and buffers are not
    modified. ``progress``: anything with ``update(n)``, advanced by the samples of each point.
    ``gather``: under ``torchrun``, ``data`` is this rank's share and each point's means are
    over every rank's samples (:func:`_evaluate`). ``kept``: only these directions' rows (a
    ``--shard`` part's; theta is evaluated in every part), each the row of all directions.
    """
    if directions is None:
        directions = draw_directions(model, config.directions, config.seed, config.ignore,
                                     norm=config.direction_norm, device="cpu")
    if len(directions) == 0:
        raise AtprobeError("no direction given")
    if len(data) == 0 and gather is identity_gather:
        raise AtprobeError("no samples to probe")
    rows = []
    with module_mode(model, False):
        theta = _evaluate(model, model_parameters(model), data, config, gather)
        if progress is not None:
            progress.update(len(data))
        for k, d in enumerate(directions):
            if kept is not None and k not in kept:
                continue
            for lam in config.lambdas:
                if lam == 0.0:
                    values = theta  # perturbed_parameters(model, d, 0) == theta bit for bit
                else:
                    values = _evaluate(model, perturbed_parameters(model, d, lam), data, config, gather)
                    if progress is not None:
                        progress.update(len(data))
                rows.append({"direction": k, "lam": lam, **values})
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def _point_list(points: Sequence[int] | None, total: int) -> list[int]:
    """The grid indices to evaluate: all of them by default, else each in ``range(total)``, once."""
    if points is None:
        return list(range(total))
    out = list(points)
    if any(not is_int(p) or not 0 <= p < total for p in out) or len(set(out)) != len(out):
        raise AtprobeError(f"grid points must be distinct indices in 0..{total - 1}")
    return [int(p) for p in out]


def plane_grid(config: PlaneConfig) -> list[tuple[int, float, float]]:
    """``(pair, x, y)`` of every point of the plane; a point's index is its position here:
    ``pair * len(xs) * len(ys) + ix * len(ys) + iy`` (x-major, Li et al.'s ``losses[ix, iy]``)."""
    return [(k, x, y) for k in range(config.pairs) for x in config.xs for y in config.ys]


def plane_directions(model: nn.Module, config: PlaneConfig) -> list[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """``(d_1, d_2)`` of every pair: directions ``2k, 2k + 1`` of one seeded CPU stream."""
    drawn = draw_directions(model, 2 * config.pairs, config.seed, config.ignore, norm=config.direction_norm,
                            device="cpu")
    return [(drawn[2 * k], drawn[2 * k + 1]) for k in range(config.pairs)]


def plane(
    model: nn.Module,
    data: Split,
    config: PlaneConfig = PlaneConfig(),
    *,
    points: Sequence[int] | None = None,
    directions: Sequence[tuple[Mapping[str, Tensor], Mapping[str, Tensor]]] | None = None,
    progress=None,
) -> pd.DataFrame:
    """The plane: one row per evaluated point (columns :data:`PLANE_COLUMNS`), in the order of
    ``points`` (indices into :func:`plane_grid`, default all): the losses and accuracies at
    ``theta + x d_1 + y d_2`` with PGD re-crafted there (:func:`_evaluate`, the 1-d probe's
    evaluation). ``directions``: explicit ``(d_1, d_2)`` pairs instead of
    :func:`plane_directions`. The model is not modified; ``(0, 0)`` is theta bit for bit."""
    grid = plane_grid(config)
    chosen = _point_list(points, len(grid))
    pairs = plane_directions(model, config) if directions is None else list(directions)
    if len(pairs) < config.pairs:
        raise AtprobeError(f"{config.pairs} direction pair(s) asked, {len(pairs)} given")
    if len(data) == 0:
        raise AtprobeError("no samples to probe")
    rows = []
    with module_mode(model, False):
        for p in chosen:
            k, x, y = grid[p]
            values = _evaluate(model, perturbed_parameters(model, list(pairs[k]), [x, y]), data, config)
            if progress is not None:
                progress.update(len(data))
            rows.append({"pair": k, "point": p, "x": x, "y": y, **values})
    return pd.DataFrame(rows, columns=PLANE_COLUMNS)


def path_grid(config: PathConfig) -> list[float]:
    """``t`` of every point of the path; a point's index is its position here."""
    return list(config.ts)


def check_same_architecture(a: nn.Module, b: nn.Module) -> None:
    """A one-line error unless ``a`` and ``b`` have the same parameters and buffers (names,
    shapes, dtypes): a path between them is defined coordinate by coordinate."""
    sa, sb = a.state_dict(), b.state_dict()
    if type(a) is not type(b) or list(sa) != list(sb):
        raise AtprobeError(f"--between: the checkpoints are different architectures ({type(a).__name__} with "
                           f"{len(sa)} tensors, {type(b).__name__} with {len(sb)})")
    for name, v in sa.items():
        if v.shape != sb[name].shape or v.dtype != sb[name].dtype:
            raise AtprobeError(f"--between: the checkpoints are different architectures ({name}: "
                               f"{tuple(v.shape)} {v.dtype} against {tuple(sb[name].shape)} {sb[name].dtype})")


def interpolated_parameters(a: Mapping[str, Tensor], b: Mapping[str, Tensor], t: float) -> dict[str, Tensor]:
    """``(1 - t) a + t b`` entry by entry (``t = 0`` gives ``a`` and ``t = 1`` gives ``b`` bit for bit)."""
    return {name: (1.0 - t) * a[name].detach() + t * b[name].detach() for name in a}


def _fixed_buffers(a: nn.Module, b: nn.Module) -> None:
    """The buffers a path neither interpolates nor recomputes (input normalization) must agree."""
    stats = {id(t) for m in bnstats.batchnorm_layers(a) for t in m.buffers()}
    theirs = dict(b.named_buffers())
    for name, buf in a.named_buffers():
        if id(buf) not in stats and not torch.equal(buf, theirs[name]):
            raise AtprobeError(f"--between: the checkpoints differ in the buffer {name!r} (not a BatchNorm "
                               "statistic): no path between them is defined")


def path(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Split,
    config: PathConfig = PathConfig(),
    *,
    train: Split | None = None,
    points: Sequence[int] | None = None,
    progress=None,
) -> pd.DataFrame:
    """The path from A to B: one row per evaluated point (columns :data:`PATH_COLUMNS`), in
    the order of ``points`` (indices into :func:`path_grid`, default all). At each ``t`` the
    parameters are :func:`interpolated_parameters`, the BatchNorm statistics are recomputed
    on ``train`` (``atprobe.bnstats.prepare`` with ``recompute:config.bn_images``, images
    drawn with ``config.seed``; a model without BatchNorm needs no ``train``), and the losses
    are :func:`_evaluate`'s (PGD re-crafted against that model). Neither model is modified."""
    check_same_architecture(model_a, model_b)
    _fixed_buffers(model_a, model_b)
    ts = path_grid(config)
    chosen = _point_list(points, len(ts))
    if len(data) == 0:
        raise AtprobeError("no samples to probe")
    has_bn = bool(bnstats.batchnorm_layers(model_a))
    if has_bn and train is None:
        raise AtprobeError("--between recomputes the BatchNorm statistics at every point: it needs the training split")
    theta_a, theta_b = model_parameters(model_a), model_parameters(model_b)
    work = copy.deepcopy(model_a).eval()
    rows = []
    for p in chosen:
        t = ts[p]
        point = interpolated_parameters(theta_a, theta_b, t)
        with torch.no_grad():  # into the copy: bnstats.prepare recomputes a module's statistics
            for name, param in work.named_parameters():
                param.copy_(point[name])
        del point
        at = work
        if has_bn:
            at, _ = bnstats.prepare(work, config.bn_stats, train, seed=config.seed, batch_size=config.batch_size)
        with module_mode(at, False):
            values = _evaluate(at, model_parameters(at), data, config)
        if progress is not None:
            progress.update(len(data))
        rows.append({"point": p, "t": t, **values})
    return pd.DataFrame(rows, columns=PATH_COLUMNS)


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


def complexity_rows(model: nn.Module, samples: Split, config: FlatnessConfig = FlatnessConfig(), *,
                    share: SampleShare = ONE_PROCESS) -> pd.DataFrame:
    """The row of ``atprobe complexity`` (columns :data:`~atprobe.probes.curvature.COMPLEXITY_COLUMNS`):
    measure ``flatness``, variant ``radius=<r>;directions=<K>``, value = the mean increase of
    the adversarial loss at radius r. Only the grid points 0 and ``+-r`` are evaluated.
    ``reason`` '' or why the value is NaN. ``share``: under ``torchrun`` each rank takes its
    whole batches and each point's means are over every rank's samples."""
    r = config.radius
    config = replace(config, lambdas=tuple(v for v in config.lambdas if v == 0 or abs(v) == r))
    summary = summarize(probe(model, share.mine(samples, config.batch_size), config, gather=share.gather_values),
                        config)
    value = float(summary.loc[summary["loss"] == "adv", "increase"].iloc[0])
    reason = "" if math.isfinite(value) else "the adversarial loss is not finite at theta or at radius r"
    return pd.DataFrame([{"measure": "flatness", "variant": f"radius={r:g};directions={config.directions}",
                          "value": value, "reason": reason}], columns=COMPLEXITY_COLUMNS)
