"""The public functions of :mod:`atprobe.pergrad`: per-sample gradients chunk by chunk and
their reductions (norms, distances and cosines between two points or two losses), the
method choice (``hooks`` or ``vmap``) and :func:`chunk_size_for`. See the package docstring
for eval mode, memory and the adversarial objectives."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from atprobe.bnstats import couples_samples
from atprobe.directions import ModelAt, functional_state, model_parameters
from atprobe.errors import AtprobeError, check_choice
from atprobe.pergrad.hooks import layer_plan, per_sample_grads_hooks, per_sample_sq_norms_hooks, row_sq_norms
from atprobe.pergrad.objectives import Objective, PerSampleLoss, _Prepared
from atprobe.pergrad.vmap import per_sample_grads_vmap
from atprobe.runtime import autocast, module_mode

__all__ = [
    "METHODS",
    "chunk_size_for",
    "per_sample_grad_distance",
    "per_sample_grad_distances",
    "per_sample_grad_norm_pair",
    "per_sample_grad_norms",
    "per_sample_grads",
    "resolve_method",
]

# ---------------------------------------------------------------------------- gradients


def _check(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    params: Mapping[str, Tensor] | None,
    chunk_size: int,
    sample_ids: Tensor | Sequence[int] | None,
    buffers: Mapping[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], Sequence[int], dict[str, Tensor] | None]:
    """Validate the common arguments; returns the detached point, the host-side sample ids and
    the buffers (:func:`_check_buffers`)."""
    if x.dim() < 1 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise AtprobeError(f"x and y must have the same number of samples, got {tuple(x.shape)} and {tuple(y.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise AtprobeError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    own = dict(model.named_parameters())
    point = model_parameters(model) if params is None else {k: v.detach() for k, v in params.items()}
    if not point:
        raise AtprobeError("no parameters to differentiate")
    for name, v in point.items():
        if name not in own:
            raise AtprobeError(f"{name!r} is not a parameter of the model")
        if v.shape != own[name].shape:
            raise AtprobeError(f"parameter {name!r} has shape {tuple(own[name].shape)}, "
                               f"the point gives {tuple(v.shape)}")
    n = x.shape[0]
    if sample_ids is None:
        ids: Sequence[int] = range(n)  # row positions; a range slices without copying
    else:
        # One host copy up front (a sync if the ids live on a GPU), none inside the loop.
        ids = sample_ids.tolist() if isinstance(sample_ids, Tensor) else [int(i) for i in sample_ids]
        if len(ids) != n:
            raise AtprobeError(f"{len(ids)} sample ids for {n} samples")
    return point, ids, _check_buffers(model, buffers)


#: How per-sample gradients are computed: ``hooks`` (per-layer identities on one batched
#: backward, :mod:`atprobe.pergrad.hooks`), ``vmap`` (``torch.func``), or ``auto``: hooks
#: where they apply (every probed parameter in a supported layer, and an :class:`Objective`
#: loss, which is known to keep samples apart and stack whole chunks), else vmap. A model
#: whose BatchNorm normalizes with batch statistics (``atprobe.bnstats.couples_samples``)
#: couples the samples of a chunk: ``auto`` then takes Jacobian rows of the chunk's loss
#: vector (``jacobian``, :func:`~atprobe.pergrad.vmap.per_sample_grads_vmap` with ``coupled``); ``vmap``
#: would run each sample as a batch of one with its own statistics and is refused.
METHODS = ("auto", "hooks", "vmap")


def resolve_method(model: nn.Module, loss_fn: PerSampleLoss, point: Mapping[str, Tensor], method: str) -> str:
    """``hooks``, ``vmap`` or (batch-statistics models) ``jacobian`` for ``method`` (one of
    :data:`METHODS`); a method that cannot handle the model is an error saying why."""
    check_choice(method, METHODS, "per-sample gradient method")
    if couples_samples(model):
        if method != "auto":
            raise AtprobeError(f"per-sample gradients by {method} are not defined for a model whose BatchNorm uses "
                               "batch statistics (vmap would give each sample its own); use method='auto'")
        return "jacobian"
    if method == "vmap":
        return "vmap"
    plan = layer_plan(model, list(point))
    if isinstance(plan, str):
        if method == "hooks":
            raise AtprobeError(f"per-sample gradients by hooks do not support {plan}; use method='vmap'")
        return "vmap"
    if method == "auto" and not isinstance(loss_fn, Objective):
        return "vmap"
    return "hooks"


def _check_buffers(model: nn.Module, buffers: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
    """``None`` (the model's own buffers) or a detached copy of the mapping, which must give
    every buffer of the model (``named_buffers()``), with its shape, and nothing else: a
    partial mapping would silently mix the model's statistics with another point's."""
    if buffers is None:
        return None
    own = dict(model.named_buffers())
    unknown = [k for k in buffers if k not in own]
    if unknown:
        raise AtprobeError(f"{unknown[0]!r} is not a buffer of the model")
    missing = [k for k in own if k not in buffers]
    if missing:
        raise AtprobeError(f"buffers must give every buffer of the model; {missing[0]!r} is missing")
    for name, b in buffers.items():
        if b.shape != own[name].shape:
            raise AtprobeError(f"buffer {name!r} has shape {tuple(own[name].shape)}, the point gives {tuple(b.shape)}")
    return {k: b.detach() for k, b in buffers.items()}


def _grad_chunks(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    x: Tensor,
    y: Tensor,
    point: dict[str, Tensor],
    chunk_size: int,
    sample_ids: Sequence[int],
    amp: bool,
    buffers: dict[str, Tensor] | None = None,
    method: str = "auto",
    norms_only: bool = False,
) -> Iterator[Any]:
    """Per-sample gradients chunk by chunk: ``{name: (b, *param.shape)}`` in ``point`` order
    (with ``norms_only``, their norms ``(b,)``, which the hooks method computes without
    materializing every layer's gradients).

    ``buffers`` (default: the model's own) are the constants of the point: the loss and
    the attack of ``prepare`` both see them. Drops its own reference to a chunk as soon as
    the consumer resumes it, so a consumer that lets go of chunk k before asking for
    chunk k+1 never has two alive.
    """
    _, consts = functional_state(model, point, buffers)
    prepare = loss_fn.prepare if isinstance(loss_fn, _Prepared) else None
    view = ModelAt(model, point, buffers) if prepare is not None else None
    method = resolve_method(model, loss_fn, point, method)
    plan = layer_plan(model, list(point)) if method == "hooks" else None
    # Leaves that require grad, sharing the point's storage: the layers' outputs then
    # require grad, and the backward stops at them (no weight gradient is accumulated).
    point_leaves = {k: v.detach().requires_grad_() for k, v in point.items()} if plan is not None else None
    for start in range(0, x.shape[0], chunk_size):
        xb, yb = x[start : start + chunk_size].detach(), y[start : start + chunk_size]
        # Eval mode per chunk (restored in between), so a consumer that keeps the
        # iterator open does not find its model switched to eval.
        with module_mode(model, False):
            extra: tuple[Tensor, ...] = ()
            if prepare is not None:
                extra = tuple(e.detach() for e in prepare(view, xb, yb, sample_ids[start : start + chunk_size]))
            if plan is not None:

                def run_loss(xb: Tensor = xb, yb: Tensor = yb, extra: tuple[Tensor, ...] = extra) -> Tensor:
                    def f(inputs: Tensor) -> Tensor:
                        return functional_call(model, (point_leaves, consts), (inputs,))

                    return loss_fn(f, xb, yb, *extra)

                with torch.enable_grad(), autocast(x.device, amp):
                    if norms_only:
                        grads = per_sample_sq_norms_hooks(model, plan, run_loss, point, xb.shape[0]).sqrt()
                    else:
                        grads = per_sample_grads_hooks(model, plan, run_loss, point, xb.shape[0])
            else:
                with autocast(x.device, amp):
                    grads = per_sample_grads_vmap(model, loss_fn, point, consts, xb, yb, extra,
                                                  coupled=method == "jacobian")
                if norms_only:
                    grads = _norms(grads)
        del extra
        yield grads
        del grads


def per_sample_grads(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    x: Tensor,
    y: Tensor,
    *,
    params: Mapping[str, Tensor] | None = None,
    chunk_size: int = 64,
    sample_ids: Tensor | Sequence[int] | None = None,
    amp: bool = False,
    buffers: Mapping[str, Tensor] | None = None,
    method: str = "auto",
) -> Iterator[Tensor]:
    """Per-sample gradients ``g_i = d l_i / d theta`` as flat ``(b, P)`` chunks, ``b <= chunk_size``.

    Args:
        model: any ``atprobe.models`` model (no in-place ops); run in eval mode.
        loss_fn: ``loss_fn(f, x, y, *extra) -> (B,)``, e.g. :func:`objective` or a plain
            function; if it has ``prepare(model_at, x, y, sample_ids)`` that is called
            once per chunk, outside the gradient, and its outputs are passed as ``extra``.
        x, y: the samples (N, ...) and labels (N,), on the model's device.
        params: the parameter point ``{name: tensor}`` (e.g.
            ``directions.perturbed_parameters``); gradients are taken with respect to
            exactly these entries, flattened in this dict's order (P = their total size);
            parameters it omits stay at the model's values as constants. Default: all of
            the model's parameters, in ``named_parameters()`` order.
        chunk_size: samples per chunk; a chunk holds ``chunk_size x P`` floats
            (twice that while it is flattened).
        sample_ids: one integer per sample keying its random start (e.g. ``Split.index``);
            default the row position 0..N-1.
        amp: bf16 autocast on CUDA for the gradient's forward/backward. Off by default.
        buffers: the buffers of the point (BatchNorm running statistics, input
            normalization), ``{name: tensor}`` for every buffer of the model; default the
            model's own. With ``params`` and ``buffers`` of another model of the same
            architecture, the gradients are that model's (e.g. another epoch's checkpoint).
        method: ``auto`` (default), ``hooks`` or ``vmap`` (see :data:`METHODS`); the same
            gradients up to rounding.
    """
    point, ids, bufs = _check(model, x, y, params, chunk_size, sample_ids, buffers)
    return _flat_chunks(model, loss_fn, x, y, point, chunk_size, ids, amp, bufs, method)


def _flat_chunks(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    x: Tensor,
    y: Tensor,
    point: dict[str, Tensor],
    chunk_size: int,
    ids: Sequence[int],
    amp: bool,
    buffers: dict[str, Tensor] | None = None,
    method: str = "auto",
) -> Iterator[Tensor]:
    for grads in _grad_chunks(model, loss_fn, x, y, point, chunk_size, ids, amp, buffers, method):
        flat = torch.cat([g.flatten(1) for g in grads.values()], dim=1)
        del grads
        yield flat
        del flat


def _norms(grads: Mapping[str, Tensor]) -> Tensor:
    """Per-sample L2 norm over all parameters of a chunk, (b,), in the gradients' dtype:
    accurately blocked squared norms per parameter (``pergrad.hooks.row_sq_norms``), summed."""
    return torch.stack([row_sq_norms(g) for g in grads.values()]).sum(0).sqrt()


def per_sample_grad_norms(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    x: Tensor,
    y: Tensor,
    *,
    params: Mapping[str, Tensor] | None = None,
    chunk_size: int = 64,
    sample_ids: Tensor | Sequence[int] | None = None,
    amp: bool = False,
    buffers: Mapping[str, Tensor] | None = None,
    method: str = "auto",
) -> Tensor:
    """``||g_i||_2`` for every sample, shape (N,), on ``x``'s device (arguments as in
    :func:`per_sample_grads`). One chunk of gradients is alive at a time, never flattened."""
    point, ids, bufs = _check(model, x, y, params, chunk_size, sample_ids, buffers)
    norms = list(_grad_chunks(model, loss_fn, x, y, point, chunk_size, ids, amp, bufs, method, norms_only=True))
    return torch.cat(norms) if norms else x.new_zeros(0)


def per_sample_grad_distance(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    x: Tensor,
    y: Tensor,
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    *,
    chunk_size: int = 64,
    sample_ids: Tensor | Sequence[int] | None = None,
    amp: bool = False,
    buffers_a: Mapping[str, Tensor] | None = None,
    buffers_b: Mapping[str, Tensor] | None = None,
    method: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``(||g_i(a) - g_i(b)||_2, cos(g_i(a), g_i(b)))`` for every sample, each (N,).

    The same sample's gradient at two parameter points (e.g. ``theta`` and
    ``theta + lam d``). The cosine ``<g_a, g_b> / (||g_a|| ||g_b||)`` is evaluated as
    ``(||g_a||^2 + ||g_b||^2 - ||g_a - g_b||^2) / (2 ||g_a|| ||g_b||)`` from three accurately
    reduced norms (absolute error ~ eps (||g_a||/||g_b|| + ||g_b||/||g_a||)), and is 0 when
    either gradient is exactly zero. Adversarial objectives craft ``x'`` separately at
    each point from the same start, so ``params_a == params_b`` gives distance 0 and
    cosine 1 exactly (given deterministic kernels; see the module docstring). At most two
    chunks of gradients (one per point) are alive at any time. ``params_a`` and
    ``params_b`` must name the same parameters. Results are in
    the gradients' dtype, on ``x``'s device.

    ``buffers_a``/``buffers_b``: the buffers of each point (see :func:`per_sample_grads`;
    default the model's own for both). Two checkpoints of one architecture differ in
    their BatchNorm running statistics too: pass each one's ``params`` *and* buffers, and
    each point is exactly that model (its loss, its gradient, its adversarial examples).
    """
    point_a, ids, bufs_a = _check(model, x, y, params_a, chunk_size, sample_ids, buffers_a)
    point_b, _, bufs_b = _check(model, x, y, params_b, chunk_size, sample_ids, buffers_b)
    if list(point_a) != list(point_b):
        raise AtprobeError("params_a and params_b must name the same parameters in the same order")
    na, nb, dist = _paired_norms(
        _grad_chunks(model, loss_fn, x, y, point_a, chunk_size, ids, amp, bufs_a, method),
        _grad_chunks(model, loss_fn, x, y, point_b, chunk_size, ids, amp, bufs_b, method),
    )
    return dist, _cosine(na, nb, dist)


def per_sample_grad_distances(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    x: Tensor,
    y: Tensor,
    reference: Mapping[str, Tensor],
    points: Sequence[Mapping[str, Tensor]],
    *,
    chunk_size: int = 64,
    sample_ids: Tensor | Sequence[int] | None = None,
    amp: bool = False,
    buffers: Mapping[str, Tensor] | None = None,
    method: str = "auto",
) -> list[tuple[Tensor, Tensor]]:
    """:func:`per_sample_grad_distance` from one ``reference`` point to each of ``points``:
    ``[(dist, cos)]`` in ``points`` order, each pair as that function returns it.

    Each chunk's reference gradients are computed once and compared with every point's
    (the stability probe's grid: one gradient at ``theta`` per chunk, not one per ``lam``).
    ``points`` is indexed once per chunk (``len`` and ``[k]``), so it may build each point
    on demand instead of holding them all. Two chunks of gradients are alive at a time.
    ``buffers``: the buffers of every point, the reference included (default the model's).
    """
    ref_point, ids, bufs = _check(model, x, y, reference, chunk_size, sample_ids, buffers)
    dists: list[list[Tensor]] = [[] for _ in range(len(points))]
    coss: list[list[Tensor]] = [[] for _ in range(len(points))]
    for start in range(0, x.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        chunk_ids = ids[rows]

        def grads_at(point: dict[str, Tensor], rows: slice = rows,
                     chunk_ids: Sequence[int] = chunk_ids) -> dict[str, Tensor]:
            (g,) = _grad_chunks(model, loss_fn, x[rows], y[rows], point, chunk_size, chunk_ids, amp, bufs, method)
            return g

        ref = grads_at(ref_point)
        ref_norms = _norms(ref)
        for k in range(len(points)):
            point, _, _ = _check(model, x, y, points[k], chunk_size, None)
            if list(point) != list(ref_point):
                raise AtprobeError("every point must name the reference's parameters in the same order")
            g = grads_at(point)
            norms = _norms(g)
            for name, t in g.items():  # in place into this point's gradients, discarded next
                t.sub_(ref[name])
            dist = _norms(g)
            del g
            dists[k].append(dist)
            coss[k].append(_cosine(ref_norms, norms, dist))
        del ref
    if x.shape[0] == 0:
        empty = torch.zeros(0)
        return [(empty, empty) for _ in range(len(points))]
    return [(torch.cat(d), torch.cat(c)) for d, c in zip(dists, coss)]


def _cosine(na: Tensor, nb: Tensor, dist: Tensor) -> Tensor:
    """The cosine from three accurate norms (law of cosines) rather than a separate dot
    product: a float32 GEMM-based dot over 10^7 entries is off by ~1e-2 on the CPU, and
    this form gives exactly 1 when the gradients are identical; 0 if either is zero."""
    cos = (na.square() + nb.square() - dist.square()) / (2 * na * nb).clamp_min(torch.finfo(na.dtype).tiny)
    return cos.clamp(-1.0, 1.0)


def per_sample_grad_norm_pair(
    model: nn.Module,
    loss_a: PerSampleLoss,
    loss_b: PerSampleLoss,
    x: Tensor,
    y: Tensor,
    *,
    params: Mapping[str, Tensor] | None = None,
    chunk_size: int = 64,
    sample_ids: Tensor | Sequence[int] | None = None,
    amp: bool = False,
    buffers: Mapping[str, Tensor] | None = None,
    method: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """``(||g_a,i||, ||g_b,i||, ||g_a,i - g_b,i||)`` of two losses at one parameter point.

    E.g. adversarial and clean CE: their difference is the gradient of
    ``R = CE(f(x'), y) - CE(f(x), y)``, so the three norms of the gradient-norm probe cost
    two gradients (and one attack) per sample instead of three (and two). At most two chunks
    of gradients are alive at a time. Arguments as in :func:`per_sample_grads`.
    """
    point, ids, bufs = _check(model, x, y, params, chunk_size, sample_ids, buffers)
    return _paired_norms(
        _grad_chunks(model, loss_a, x, y, point, chunk_size, ids, amp, bufs, method),
        _grad_chunks(model, loss_b, x, y, point, chunk_size, ids, amp, bufs, method),
    )


def _paired_norms(
    chunks_a: Iterator[dict[str, Tensor]], chunks_b: Iterator[dict[str, Tensor]]
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample ``||a||``, ``||b||`` and ``||a - b||`` over two aligned chunk streams."""
    norms_a: list[Tensor] = []
    norms_b: list[Tensor] = []
    dists: list[Tensor] = []
    for ga in chunks_a:
        gb = next(chunks_b)
        norms_a.append(_norms(ga))
        norms_b.append(_norms(gb))
        # The distance from the differences themselves, not from ||a||^2 + ||b||^2 - 2<a,b>,
        # which cancels catastrophically at nearby points. In place into ga's tensors
        # (private to this loop, no longer needed): no temporary of a layer's size.
        for k, a in ga.items():
            a.sub_(gb[k])
        dists.append(_norms(ga))
        del ga, gb  # both chunks go before the next pair is computed: two alive at most
    if not dists:  # no samples
        empty = torch.zeros(0)
        return empty, empty, empty
    return torch.cat(norms_a), torch.cat(norms_b), torch.cat(dists)


def chunk_size_for(
    model_or_params: nn.Module | Mapping[str, Tensor],
    budget_bytes: float,
    *,
    copies: int = 1,
    overhead: float = 2.0,
) -> int:
    """The largest chunk whose gradients fit in ``budget_bytes``: ``budget / (copies x
    overhead x P x bytes per entry)``, at least 1.

    ``copies``: gradient chunks alive at once (1 for norms, 2 for distances).
    ``overhead``: room for the backward pass's temporaries and flattening (2 = the
    chunk's size again). Activations are not counted: keep a margin for them.
    E.g. WRN-28-10 (P = 36.5M, float32), 40 GB, copies=2: 68 samples.
    """
    tensors: Any = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params.values()
    per_sample = sum(t.numel() * t.element_size() for t in tensors)
    if per_sample == 0:
        raise AtprobeError("no parameters")
    return max(1, int(budget_bytes // (copies * overhead * per_sample)))
