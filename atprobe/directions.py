"""Random directions in weight space and models evaluated at other parameter points.

Filter-normalized random directions follow Li et al. 2018, *Visualizing the Loss
Landscape of Neural Nets*: a Gaussian direction ``d`` with the shape of every
parameter, each output filter rescaled to the norm of the matching weight filter,

    d_i <- d_i / ||d_i||_F * ||w_i||_F        (i = slice along dim 0 of a conv / linear weight)

so a step ``theta + lam * d`` moves every filter by the same *relative* amount ``lam``,
which makes landscapes of differently scaled networks (and of scale-invariant BN
networks) comparable.

Points ``theta + lam * d`` are never materialized as model copies: they are plain
``{name: tensor}`` dicts evaluated through ``torch.func.functional_call``
(:func:`call_at`, :class:`ModelAt`), so a sweep over many ``lam`` costs one
parameter-sized tensor per point and the model's own weights are never touched.

:func:`parse_lambdas` reads the grid of steps ``lam`` along a direction (``START:STOP:NUM``
or a list), the grid of the stability and flatness probes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction

import torch
from torch import Tensor, nn
from torch.func import functional_call

from atprobe.errors import AtprobeError, check_choice
from atprobe.runtime import autocast, make_generator, module_mode

__all__ = [
    "IGNORES",
    "NORMS",
    "ModelAt",
    "call_at",
    "directions",
    "filter_normalized_direction",
    "functional_state",
    "iter_points",
    "model_parameters",
    "normalize_direction",
    "parse_lambdas",
    "perturbed_parameters",
    "random_direction",
]

#: What happens to 1-d parameters (biases, BatchNorm weight/bias):
#: ``biasbn`` zeroes them (Li et al.'s default), ``none`` keeps them random, normalized
#: to the norm of the whole parameter tensor.
IGNORES = ("biasbn", "none")
#: Normalization of >= 2-d parameters: per output ``filter`` (Li et al.) or per whole ``layer``.
NORMS = ("filter", "layer")

Direction = dict[str, Tensor]
Coefficient = float | Tensor


def model_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The model's own parameter point: ``{name: detached parameter}`` in
    ``named_parameters()`` order (detached views, no copy)."""
    return {name: p.detach() for name, p in model.named_parameters()}


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    # Draw reduced-precision parameters in float32 (randn has no sensible bf16 stream)
    # and cast; float32/float64 draw natively so float64 tests are exact.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def random_direction(
    model: nn.Module, *, generator: torch.Generator, ignore: str = "biasbn"
) -> Direction:
    """A Gaussian direction ``d ~ N(0, I)`` with the shape of every parameter.

    Every parameter gets a draw, in ``named_parameters()`` order, whatever ``ignore`` says,
    so the stream (and hence a conv layer's direction) does not depend on the option.
    Draws happen on ``generator``'s device and are moved to each parameter's device:
    a CPU generator gives the same direction on every machine, a CUDA generator is
    faster for large models. With ``ignore="biasbn"`` parameters with ``dim <= 1``
    (biases, BatchNorm weight/bias) are set to zero. Buffers (BatchNorm running
    statistics) are not parameters and get no entry.

    Returns ``{name: tensor}`` (same dtype and device as the parameter, no grad).
    """
    check_choice(ignore, IGNORES, "direction ignore option")
    out: Direction = {}
    for name, p in model.named_parameters():
        d = torch.randn(p.shape, generator=generator, device=generator.device, dtype=_draw_dtype(p.dtype))
        d = d.to(device=p.device, dtype=p.dtype)
        if ignore == "biasbn" and p.dim() <= 1:
            d = torch.zeros_like(d)
        out[name] = d
    return out


def _rescale(d: Tensor, w: Tensor, per_filter: bool) -> Tensor:
    """``d / ||d|| * ||w||``, per slice along dim 0 when ``per_filter``, else whole-tensor."""
    if per_filter:
        d_norm = d.flatten(1).norm(dim=1).view(-1, *([1] * (d.dim() - 1)))
        w_norm = w.flatten(1).norm(dim=1).view(-1, *([1] * (d.dim() - 1)))
    else:
        d_norm, w_norm = d.norm(), w.norm()
    # clamp instead of Li et al.'s "+ 1e-10": exact for any non-zero d (the float64
    # tests compare norms tightly); an all-zero d stays zero.
    return d * (w_norm / d_norm.clamp_min(torch.finfo(d.dtype).tiny))


def normalize_direction(
    direction: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    *,
    ignore: str = "biasbn",
    norm: str = "filter",
) -> Direction:
    """Scale a direction to the parameter point ``params`` (Li et al. 2018).

    For ``dim >= 2`` (conv and linear weights):
      ``norm="filter"``: ``d[i] <- d[i] / ||d[i]|| * ||w[i]||`` for every output filter i;
      ``norm="layer"``:  ``d <- d / ||d|| * ||w||`` for the whole tensor.
    For ``dim <= 1`` (biases, BatchNorm weight/bias):
      ``ignore="biasbn"``: ``d <- 0``;
      ``ignore="none"``:   ``d <- d / ||d|| * ||w||`` (whole vector).

    With ``ignore="none"`` Li et al.'s code instead *copies* the weights (``d = w``),
    which makes those coordinates a deterministic rescaling ``w (1 + lam)`` rather than a
    random direction; we keep them random at the weights' scale, so every coordinate
    of the direction is random and the same relative step applies to all of them.
    Works on any dict of tensors (e.g. the difference of two checkpoints).
    """
    check_choice(ignore, IGNORES, "direction ignore option")
    check_choice(norm, NORMS, "direction norm")
    out: Direction = {}
    for name, d in direction.items():
        if name not in params:
            raise AtprobeError(f"direction entry {name!r} is not a parameter of the model")
        w = params[name].detach()
        if w.shape != d.shape:
            raise AtprobeError(f"direction {name!r} has shape {tuple(d.shape)}, parameter {tuple(w.shape)}")
        if d.dim() <= 1:
            out[name] = torch.zeros_like(d) if ignore == "biasbn" else _rescale(d, w, per_filter=False)
        else:
            out[name] = _rescale(d, w, per_filter=norm == "filter")
    return out


def filter_normalized_direction(
    model: nn.Module, *, generator: torch.Generator, ignore: str = "biasbn", norm: str = "filter"
) -> Direction:
    """:func:`random_direction` rescaled by :func:`normalize_direction` to the model's weights."""
    d = random_direction(model, generator=generator, ignore=ignore)
    return normalize_direction(d, model_parameters(model), ignore=ignore, norm=norm)


def directions(
    model: nn.Module,
    k: int,
    seed: int,
    ignore: str = "biasbn",
    *,
    norm: str = "filter",
    device: torch.device | str | None = None,
) -> list[Direction]:
    """``k`` filter-normalized directions drawn one after the other from one generator
    seeded with ``seed`` (on ``device``, default the model's device).

    The same ``(seed, k, device)`` gives identical directions; direction j does not
    depend on ``k`` (a prefix of a longer list is the shorter list).
    """
    if k < 0:
        raise AtprobeError(f"number of directions must be >= 0, got {k}")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    generator = make_generator(seed, device)
    return [filter_normalized_direction(model, generator=generator, ignore=ignore, norm=norm) for _ in range(k)]


def perturbed_parameters(
    model: nn.Module,
    direction: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
    lam: Coefficient | Sequence[Coefficient],
    *,
    base: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The parameter point ``theta + sum_j lam_j d_j`` as a ``{name: tensor}`` dict.

    ``direction``/``lam`` are one direction and one coefficient (1-d sweeps) or
    sequences of each (2-d landscapes: ``theta + a d1 + b d2``). ``lam`` may be a 0-d
    tensor on the device (a grid value), which avoids a host round trip. ``base``
    is the point to move from (default: the model's own parameters). Parameters a
    direction does not mention stay at ``base``. ``lam = 0`` returns values equal to
    ``base`` bit for bit (``w + 0 * d == w``), so a probe's ``lam = 0`` point is
    exactly the trained model.

    One new tensor per moved parameter (entries no direction mentions are detached views
    of ``base``: do not write into them); the model is not modified.
    """
    dirs = [direction] if isinstance(direction, Mapping) else list(direction)
    lams = list(lam) if isinstance(lam, (list, tuple)) else [lam]
    if len(dirs) != len(lams):
        raise AtprobeError(f"{len(dirs)} direction(s) but {len(lams)} coefficient(s)")
    theta = model_parameters(model) if base is None else {k: v.detach() for k, v in base.items()}
    for d in dirs:
        unknown = set(d) - set(theta)
        if unknown:
            raise AtprobeError(f"direction entries are not model parameters: {', '.join(sorted(unknown))}")
    out: dict[str, Tensor] = {}
    for name, w in theta.items():
        p = w
        for d, c in zip(dirs, lams):
            if name in d:
                p = p + c * d[name]  # out of place: never writes into the model's weights
        out[name] = p
    return out


def functional_state(
    model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(params, constants)`` for ``functional_call(model, (params, constants), ...)``.

    ``constants`` are the buffers (default: the model's) plus every parameter that
    ``params`` omits, detached: gradients are taken only with respect to ``params``.
    """
    unknown = set(params) - {name for name, _ in model.named_parameters()}
    if unknown:
        raise AtprobeError(f"not parameters of the model: {', '.join(sorted(unknown))}")
    consts = {k: b.detach() for k, b in (model.named_buffers() if buffers is None else buffers.items())}
    for name, p in model.named_parameters():
        if name not in params:
            consts[name] = p.detach()
    return dict(params), consts


def call_at(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    *,
    buffers: Mapping[str, Tensor] | None = None,
    eval_mode: bool = True,
    amp: bool = False,
) -> Tensor:
    """Logits of the model at the parameter point ``params``: ``f(x; params, buffers)``.

    ``params`` may hold all parameters or a subset (the rest are the model's own);
    ``buffers`` default to the model's (BatchNorm running statistics, normalization).
    ``eval_mode`` runs in eval mode (BatchNorm uses running statistics, so the model's
    buffers are read, never updated) and restores every submodule's mode afterwards;
    with ``eval_mode=False`` a training-mode BatchNorm would update the buffers it is
    given in place. ``amp``: bf16 autocast on CUDA.

    Gradients flow to whatever tensors ``params`` holds, so
    ``torch.func.grad(lambda p: loss(call_at(model, p, x)))(params)`` is the gradient
    at the perturbed point (that is how ``atprobe.pergrad`` uses it).
    """
    mode = module_mode(model, False) if eval_mode else contextlib.nullcontext()
    with mode, autocast(x.device, amp):
        return functional_call(model, functional_state(model, params, buffers), (x,))


class ModelAt(nn.Module):
    """A view of ``model`` at the parameter point ``params``: ``forward(x)`` is
    ``functional_call(model, (params, buffers), x)``.

    It lets code written for modules (``atprobe.attacks.pgd``) run at a perturbed
    point without copying the model. ``model`` is a registered submodule, so mode
    switches (``.eval()``, ``module_mode``) reach it; its own parameters are unused
    by ``forward`` (``parameters()`` still lists them, which is harmless for
    ``pgd``'s ``frozen_parameters``). ``params``/``buffers`` are held by reference,
    detached, and never registered (``state_dict`` of the view is the model's).
    """

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        # Detached: an attack only needs input gradients; tracking the point's tensors
        # would make every attack step also build a graph to them.
        detached = {k: v.detach() for k, v in params.items()}
        self._point = functional_state(model, detached, buffers)

    @property
    def params(self) -> dict[str, Tensor]:
        return self._point[0]

    def forward(self, x: Tensor) -> Tensor:
        return functional_call(self.model, self._point, (x,))


def iter_points(
    model: nn.Module, direction: Mapping[str, Tensor], lams: Sequence[Coefficient] | Tensor
) -> Iterator[tuple[Coefficient, dict[str, Tensor]]]:
    """``(lam, theta + lam d)`` for each ``lam``, one point alive at a time."""
    for lam in lams:
        yield lam, perturbed_parameters(model, direction, lam)


# ---------------------------------------------------------------------------- grids of steps


def _fraction(text: str, what: str, option: str = "--lambdas") -> Fraction:
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise AtprobeError(f"{option}: {text.strip()!r} in {what} is not a number") from None
    return value


def parse_lambdas(text: str, *, option: str = "--lambdas", zero: bool = True) -> tuple[float, ...]:
    """A ``lam`` grid: ``START:STOP:NUM`` (NUM evenly spaced values, both ends included) or
    a comma-separated list (``-0.1,0,0.1``; fractions such as ``1/20`` allowed).

    The grid points of ``START:STOP:NUM`` are computed exactly (as fractions) and then
    rounded once, so a grid that passes through 0 contains exactly 0.0 (``-0.05:0.05:21``
    does), and the grid must contain 0: the reference point of the probe. Values must be
    distinct. ``option`` names the option in the errors (``--x``, ``--t``); ``zero=False``
    drops the requirement of 0 (the axes of a plane, the path's ``t``).
    """
    if not isinstance(text, str) or not text.strip():
        raise AtprobeError(f"{option} is empty: give START:STOP:NUM or a comma-separated list")
    text = text.strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise AtprobeError(f"{option} {text!r}: expected START:STOP:NUM, e.g. -0.05:0.05:21")
        start, stop = _fraction(parts[0], text, option), _fraction(parts[1], text, option)
        try:
            num = int(parts[2].strip())
        except ValueError:
            raise AtprobeError(f"{option} {text!r}: NUM must be an integer, got {parts[2].strip()!r}") from None
        if num < 1 or (num == 1 and start != stop):
            raise AtprobeError(f"{option} {text!r}: NUM must be >= 2 (or 1 with START == STOP)")
        if num > 1 and start >= stop:
            raise AtprobeError(f"{option} {text!r}: START must be smaller than STOP")
        exact = [start] if num == 1 else [start + (stop - start) * i / (num - 1) for i in range(num)]
    else:
        items = [t for t in text.split(",")]
        if any(not t.strip() for t in items):
            raise AtprobeError(f"{option} {text!r}: an empty entry in the list")
        exact = [_fraction(t, text, option) for t in items]
    values = tuple(float(v) for v in exact)
    if any(not math.isfinite(v) for v in values):
        raise AtprobeError(f"{option} {text!r}: values must be finite")
    if len(set(values)) != len(values):
        raise AtprobeError(f"{option} {text!r}: values must be distinct")
    if zero and 0.0 not in values:
        raise AtprobeError(f"{option} {text!r} does not contain 0, the reference point (lam = 0 must give distance 0)")
    return values
