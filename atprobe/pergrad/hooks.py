"""Per-sample gradients from one batched backward pass and the per-layer identities.

For a layer ``out = W a + b`` applied at positions ``t`` (the pixels of a convolution's
output, one position for a linear layer), the gradient of a per-sample loss ``l_i``
with respect to ``W`` is

    dl_i / dW = sum_t  g_{i,t} a_{i,t}^T         g = dl/d out,  a = the layer's input patch

and ``dl_i / db = sum_t g_{i,t}``; an eval-mode BatchNorm ``y = w xhat + b`` has
``dl_i/dw = sum_t g_{i,t} xhat_{i,t}`` and ``dl_i/db = sum_t g_{i,t}``. So every sample's
gradient follows from the activations ``a`` (kept by the forward pass anyway) and the
output gradients ``g`` of one ordinary backward of ``sum_i l_i`` — which, in eval mode,
where samples do not interact, carries sample i's ``dl_i/d out`` in row i. The sums over
``t`` are batched matrix products (``unfold`` for convolutions): big, cache-friendly
GEMMs instead of ``vmap``'s grouped convolutions or one backward per sample.

This is the ``hooks`` method of :mod:`atprobe.pergrad`. It supports ``nn.Conv2d``
(``groups=1``, zero padding), ``nn.Linear`` and eval-mode ``nn.BatchNorm2d`` with running
statistics: every layer with parameters in ``atprobe.models``. :func:`supports` says
whether a model and parameter point qualify; otherwise :mod:`atprobe.pergrad` uses
``vmap`` (:mod:`atprobe.pergrad.vmap`).

Layer kinds. What is specific to a kind of layer (when the identities apply, what the
forward hook records besides input and output, the bias sums over positions, the weight's
positions and per-sample gradients) is one :class:`LayerKind` of small functions in
:data:`LAYER_KINDS`, keyed by module class (looked up along the class's MRO, so subclasses
count as their base); a new kind of layer is one more entry there.

Rows and samples. The loss may call the model on several stacks of the chunk
(``torch.cat([x, x_adv])`` for TRADES and R): row ``r`` of a call with ``k * b`` rows
belongs to sample ``r mod b``. That is how every :class:`atprobe.pergrad.Objective` calls
it; a loss that mixes samples or reorders rows must use ``vmap``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atprobe.errors import AtprobeError

__all__ = ["BLOCK", "LAYER_KINDS", "LayerKind", "layer_plan", "per_sample_grads_hooks", "per_sample_sq_norms_hooks",
           "row_sq_norms", "supports"]


@dataclass
class _Layer:
    """One module with probed parameters: which of its attributes map to which point names."""

    module: nn.Module
    names: dict[str, str] = field(default_factory=dict)  # attribute ("weight"/"bias") -> point name
    calls: list[tuple[Tensor, Tensor, tuple[Tensor, ...]]] = field(default_factory=list)  # (input, output, extra)


def _supported_module(module: nn.Module) -> str | None:
    """``None`` if the per-layer identities apply to ``module``, else why not."""
    kind = _kind(module)
    if kind is None:
        return f"{type(module).__name__} layers"
    return kind.why_not(module)


def layer_plan(model: nn.Module, names: list[str]) -> dict[str, _Layer] | str:
    """The layers that own the point's parameters, ``{module path: _Layer}``; or a string
    saying why the identities do not apply (an unsupported layer, a parameter that is not a
    layer's weight or bias, one shared by two modules)."""
    plan: dict[str, _Layer] = {}
    owners: dict[int, int] = {}
    for _path, module in model.named_modules(remove_duplicate=False):
        for _attr, p in module.named_parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for name in names:
        path, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            return f"{name!r} does not belong to a submodule"
        if attr not in ("weight", "bias"):
            return f"{name!r} is not a layer's weight or bias"
        why = _supported_module(module)
        if why is not None:
            return why
        if owners.get(id(getattr(module, attr)), 0) != 1:
            return f"{name!r} is shared between modules"
        plan.setdefault(path, _Layer(module)).names[attr] = name
    return plan


def supports(model: nn.Module, names: list[str]) -> bool:
    return not isinstance(layer_plan(model, names), str)


@contextlib.contextmanager
def _capturing(plan: Mapping[str, _Layer]) -> Iterator[None]:
    """Forward hooks that record every call's input and output on the planned layers."""

    def hook_for(layer: _Layer) -> Callable:
        recorded = _kind(layer.module).extra

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            layer.calls.append((inputs[0].detach(), output, recorded(module)))

        return hook

    handles = [layer.module.register_forward_hook(hook_for(layer)) for layer in plan.values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _by_sample(t: Tensor, b: int) -> Tensor:
    """``(k b, ...)`` rows -> ``(b, k, ...)``: the k rows of each sample side by side."""
    rows = t.shape[0]
    if rows % b:
        raise AtprobeError(f"a layer saw {rows} rows for a chunk of {b} samples: the loss must stack whole chunks")
    return t.reshape(rows // b, b, *t.shape[1:]).transpose(0, 1)


#: Input channels from which a stride-1 convolution's per-sample weight gradients are
#: computed offset by offset (below that, each offset's GEMM is too thin: use unfold).
SHIFTED_MIN_CHANNELS = 16


def _conv_weight_parts(module: nn.Conv2d, a: Tensor, g: Tensor, b: int) -> tuple[bool, list[Tensor]]:
    """Per-sample weight gradients of a convolution, in pieces: ``(True, [(b, c_out, c_in)
    per kernel offset])`` or ``(False, [(b, c_out, c_in * kh * kw)])``, summed over the k
    stacks of each sample.

    Stride 1 (and enough channels): for each kernel offset, GEMMs between the output
    gradients and the input *shifted by that offset*, a contiguous slice of the
    zero-padded channels-last input (output rows are laid out at the padded width; the
    extra columns have zero gradient). No im2col copy: on the CPU ``unfold`` costs more
    than the GEMMs it feeds. Otherwise (strides, dilations, few channels): ``unfold`` and
    one batched GEMM per stack.
    """
    rows, c_out = g.shape[:2]
    c_in = a.shape[1]
    kh, kw = module.kernel_size
    stacks = rows // b
    if module.stride == (1, 1) and module.dilation == (1, 1) and c_in >= SHIFTED_MIN_CHANNELS:
        ph, pw = module.padding
        h_out, w_out = g.shape[2:]
        width = a.shape[3] + 2 * pw
        # channels-last rows; one extra zero row at the bottom keeps the last offset's slice in bounds
        padded = _by_sample(F.pad(a.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph + 1)).reshape(rows, -1, c_in), b)
        grad_rows = _by_sample(F.pad(g.permute(0, 2, 3, 1), (0, 0, 0, width - w_out)).reshape(rows, -1, c_out), b)
        n = h_out * width
        parts = []
        for i in range(kh):
            for j in range(kw):
                o = i * width + j
                part = torch.bmm(grad_rows[:, 0].transpose(1, 2), padded[:, 0, o : o + n])
                for s in range(1, stacks):
                    part.baddbmm_(grad_rows[:, s].transpose(1, 2), padded[:, s, o : o + n])
                parts.append(part)
        return True, parts
    cols = _by_sample(F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride), b)
    gg = _by_sample(g.flatten(2), b)
    part = torch.bmm(gg[:, 0], cols[:, 0].transpose(1, 2))
    for s in range(1, stacks):
        part.baddbmm_(gg[:, s], cols[:, s].transpose(1, 2))
    return False, [part]


def _conv_weight_grads(module: nn.Conv2d, a: Tensor, g: Tensor, b: int) -> Tensor:
    """Per-sample weight gradients ``(b, c_out, c_in, kh, kw)`` of a convolution."""
    shifted, parts = _conv_weight_parts(module, a, g, b)
    whole = torch.stack(parts, dim=3) if shifted else parts[0]
    return whole.view(b, *module.weight.shape)


def _positions(module: nn.Module, a: Tensor, g: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """A weight's per-sample gradient as ``G_i^T A_i``: ``A`` (b, positions, d_in) and
    ``G`` (b, positions, d_out), positions of all k stacks of a sample side by side."""
    a, g = _kind(module).positions(module, a, g)
    return _by_sample(a, b).flatten(1, 2), _by_sample(g, b).flatten(1, 2)


def _small_grads(module: nn.Module, names: Mapping[str, str], a: Tensor, g: Tensor, extra: tuple[Tensor, ...],
                 b: int) -> dict[str, Tensor]:
    """Per-sample gradients of the cheap parameters: biases and BatchNorm's weight."""
    kind = _kind(module)
    out: dict[str, Tensor] = {}
    if "bias" in names:
        out["bias"] = _by_sample(kind.bias_sums(g), b).sum(1)
    if kind.small_weight is not None and "weight" in names:
        out["weight"] = _by_sample(kind.small_weight(module, a, g, extra), b).sum(1)
    return out


# ---------------------------------------------------------------------------- layer kinds


@dataclass(frozen=True)
class LayerKind:
    """The per-layer identities of one kind of module, as small functions of a call's
    input ``a`` and output gradient ``g`` (rows = samples, or k stacks of them).

    why_not: ``None`` if the identities apply to this module, else why not (for errors).
    bias_sums: ``g`` summed over the positions a bias is added at, ``(rows, d_out)``.
    extra: what the forward hook records besides input and output (read at call time).
    small_weight: ``(rows, d)`` per-row gradient of a cheap (per-channel) weight, or ``None``.
    positions: ``(A, G)``, ``(rows, positions, d_in)`` and ``(rows, positions, d_out)``, of a
        weight matrix (``dl/dW = G^T A`` per row), or ``None`` when the weight is not a matrix.
    weight_grads: per-sample gradients ``(b, *weight.shape)`` of the weight matrix.
    weight_parts: the same as a list of pieces whose squared norms add up (a convolution's
        kernel offsets), for norms without stacking them; ``None``: only ``weight_grads``.
    """

    why_not: Callable[[nn.Module], str | None]
    bias_sums: Callable[[Tensor], Tensor]
    extra: Callable[[nn.Module], tuple[Tensor, ...]] = lambda module: ()
    small_weight: Callable[[nn.Module, Tensor, Tensor, tuple[Tensor, ...]], Tensor] | None = None
    positions: Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None
    weight_grads: Callable[[nn.Module, Tensor, Tensor, int], Tensor] | None = None
    weight_parts: Callable[[nn.Module, Tensor, Tensor, int], list[Tensor]] | None = None


#: The supported layers: module class -> :class:`LayerKind`.
LAYER_KINDS: dict[type[nn.Module], LayerKind] = {}


def _kind(module: nn.Module) -> LayerKind | None:
    """The :class:`LayerKind` of ``module``'s class or of its nearest registered base class."""
    for cls in type(module).__mro__:
        if cls in LAYER_KINDS:
            return LAYER_KINDS[cls]
    return None


def _spatial_sums(g: Tensor) -> Tensor:
    return g.sum((2, 3))


def _conv_why_not(module: nn.Conv2d) -> str | None:
    if module.groups != 1:
        return "grouped convolution"
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return "non-zero or string padding"
    return None


def _conv_positions(module: nn.Conv2d, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    a = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
    return a, g.flatten(2).transpose(1, 2)


LAYER_KINDS[nn.Conv2d] = LayerKind(
    why_not=_conv_why_not,
    bias_sums=_spatial_sums,
    positions=_conv_positions,
    weight_grads=_conv_weight_grads,
    weight_parts=lambda module, a, g, b: _conv_weight_parts(module, a, g, b)[1],
)


def _linear_sums(g: Tensor) -> Tensor:
    return g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)  # over every position of the input's middle dims


def _linear_positions(module: nn.Linear, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    return a.reshape(a.shape[0], -1, a.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])


def _linear_weight_grads(module: nn.Linear, a: Tensor, g: Tensor, b: int) -> Tensor:
    pa, pg = _positions(module, a, g, b)
    return torch.bmm(pg.transpose(1, 2), pa)


LAYER_KINDS[nn.Linear] = LayerKind(
    why_not=lambda module: None,
    bias_sums=_linear_sums,
    positions=_linear_positions,
    weight_grads=_linear_weight_grads,
)


def _bn_why_not(module: nn.BatchNorm2d) -> str | None:
    if not module.track_running_stats or module.running_mean is None:
        return "BatchNorm without running statistics (mixes samples)"
    return None


def _bn_running_stats(module: nn.BatchNorm2d) -> tuple[Tensor, ...]:
    # The running statistics of the point (functional_call swaps them in only for the
    # duration of the call, so the forward hook reads them).
    return (module.running_mean, module.running_var)


def _bn_weight(module: nn.BatchNorm2d, a: Tensor, g: Tensor, extra: tuple[Tensor, ...]) -> Tensor:
    mean, var = extra
    scale = torch.rsqrt(var.to(g.dtype) + module.eps)
    # sum_t g xhat = scale (sum_t g a - mean sum_t g), per channel
    dot = torch.einsum("nchw,nchw->nc", g, a) - mean.to(g.dtype) * g.sum((2, 3))
    return dot * scale


LAYER_KINDS[nn.BatchNorm2d] = LayerKind(
    why_not=_bn_why_not,
    bias_sums=_spatial_sums,
    extra=_bn_running_stats,
    small_weight=_bn_weight,
)


# ---------------------------------------------------------------------------- per-sample gradients


def _calls(layer: _Layer, dtype: torch.dtype, grads_out: list[Tensor | None]) -> Iterator[tuple[Tensor, Tensor, tuple]]:
    for (a, _, extra), g in zip(layer.calls, grads_out):
        if g is not None:  # None: this call's output did not reach the loss
            yield a.to(dtype), g.to(dtype), extra


def _has_weight_matrix(layer: _Layer) -> bool:
    return "weight" in layer.names and _kind(layer.module).weight_grads is not None


def _layer_grads(layer: _Layer, b: int, dtype: torch.dtype, grads_out: list[Tensor | None]) -> dict[str, Tensor]:
    """Per-sample gradients ``{attr: (b, *param.shape)}`` of one layer, summed over its calls."""
    out: dict[str, Tensor] = {}

    def add(attr: str, g: Tensor) -> None:
        out[attr] = out[attr] + g if attr in out else g

    for a, g, extra in _calls(layer, dtype, grads_out):
        for attr, t in _small_grads(layer.module, layer.names, a, g, extra, b).items():
            add(attr, t)
        if _has_weight_matrix(layer):
            add("weight", _kind(layer.module).weight_grads(layer.module, a, g, b))
    return out


def _layer_sq_norms(layer: _Layer, b: int, dtype: torch.dtype, grads_out: list[Tensor | None]) -> Tensor | None:
    """``sum over the layer's probed parameters of ||dl_i/dp||^2``, (b,), without
    materializing the weight's per-sample gradient where that costs more.

    Ghost norm: with ``G_i = sum_t g_t a_t^T`` over the sample's positions t (of every
    call), ``||G_i||_F^2 = sum_{s,t} (a_s . a_t)(g_s . g_t)``: two (positions x positions)
    Gram matrices per sample instead of a (d_out x d_in) gradient. Used when
    ``positions x (d_in + d_out) < d_in x d_out`` (deep convolutions, linear layers); the
    direct product otherwise. ``None`` if no call reached the loss."""
    calls = list(_calls(layer, dtype, grads_out))
    if not calls:
        return None
    total: Tensor | None = None
    small: dict[str, Tensor] = {}
    for a, g, extra in calls:
        for attr, t in _small_grads(layer.module, layer.names, a, g, extra, b).items():
            small[attr] = small[attr] + t if attr in small else t
    for t in small.values():
        sq = row_sq_norms(t)
        total = sq if total is None else total + sq
    if _has_weight_matrix(layer):
        module = layer.module
        d_out, d_in = module.weight.shape[0], module.weight[0].numel()
        positions = sum(g.numel() // (b * d_out) for _, g, _ in calls)  # per sample, over all calls
        if positions * (d_in + d_out) < d_in * d_out:
            pairs = [_positions(module, a, g, b) for a, g, _ in calls]
            pa = torch.cat([p for p, _ in pairs], 1) if len(pairs) > 1 else pairs[0][0]
            pg = torch.cat([q for _, q in pairs], 1) if len(pairs) > 1 else pairs[0][1]
            del pairs
            sq = (torch.bmm(pa, pa.transpose(1, 2)) * torch.bmm(pg, pg.transpose(1, 2))).sum((1, 2))
        elif _kind(module).weight_parts is not None and len(calls) == 1:
            # piece by piece: one kernel offset's gradients alive at a time, never stacked
            sq = sum(row_sq_norms(part) for part in _kind(module).weight_parts(module, calls[0][0], calls[0][1], b))
        else:
            w = _layer_grads(_Layer(module, {"weight": layer.names["weight"]}, layer.calls), b, dtype, grads_out)
            sq = row_sq_norms(w.pop("weight"))
        total = sq if total is None else total + sq
    return total


#: Entries per partial sum in :func:`row_sq_norms`. The CPU's float32 norm kernel
#: accumulates long rows sequentially: over 10^7 entries it is off by ~1e-4 (relative),
#: the cascade of 4096-entry blocks by ~1e-7, at the same speed.
BLOCK = 4096


def row_sq_norms(t: Tensor) -> Tensor:
    """``||t_i||^2`` of every row of ``(b, ...)``, (b,): norms of 4096-entry blocks, then of
    those (``vector_norm``: no squared temporary of the input's size, no overflow)."""
    flat = t.flatten(1)
    b, n = flat.shape
    full = n - n % BLOCK
    parts = []
    if full:  # a view when rows are contiguous
        parts.append(torch.linalg.vector_norm(flat[:, :full].reshape(b, -1, BLOCK), dim=2))
    if full < n:
        parts.append(torch.linalg.vector_norm(flat[:, full:], dim=1, keepdim=True))
    return torch.linalg.vector_norm(torch.cat(parts, dim=1), dim=1).square()


def _backward(plan: Mapping[str, _Layer], run_loss: Callable[[], Tensor], b: int) -> list[Tensor | None]:
    """Run the loss with the planned layers recording their calls, then one backward of
    ``sum_i l_i`` to their outputs: the output gradient of every call, in plan order."""
    for layer in plan.values():
        layer.calls.clear()
    with _capturing(plan):
        losses = run_loss()
    if losses.shape != (b,):
        raise AtprobeError(f"the loss returned shape {tuple(losses.shape)}, expected ({b},)")
    outputs = [out for layer in plan.values() for _, out, _ in layer.calls]
    needs = [o.requires_grad for o in outputs]
    wanted = [o for o, r in zip(outputs, needs) if r]
    grads = iter(torch.autograd.grad(losses.sum(), wanted, allow_unused=True) if wanted else ())
    return [next(grads) if r else None for r in needs]


def _per_layer(plan: Mapping[str, _Layer], grads_out: list[Tensor | None]) -> Iterator[tuple[_Layer, list]]:
    start = 0
    for layer in plan.values():
        n = len(layer.calls)
        yield layer, grads_out[start : start + n]
        start += n


def per_sample_grads_hooks(
    model: nn.Module,
    plan: Mapping[str, _Layer],
    run_loss: Callable[[], Tensor],
    point: Mapping[str, Tensor],
    b: int,
) -> dict[str, Tensor]:
    """Per-sample gradients ``{name: (b, *shape)}`` in ``point`` order for a chunk of ``b``.

    ``run_loss()`` evaluates the chunk's per-sample losses ``(b,)`` with the model at the
    point (the probed parameters requiring grad); the layers in ``plan`` must be the ones
    owning every entry of ``point``. Parameters no call reached get zero gradients.
    """
    dtype = next(iter(point.values())).dtype
    result: dict[str, Tensor] = {}
    try:
        grads_out = _backward(plan, run_loss, b)
        for layer, outs in _per_layer(plan, grads_out):
            for attr, g in _layer_grads(layer, b, dtype, outs).items():
                result[layer.names[attr]] = g
    finally:
        for layer in plan.values():
            layer.calls.clear()  # drop the activations
    return {name: result[name] if name in result else p.new_zeros((b, *p.shape)) for name, p in point.items()}


def per_sample_sq_norms_hooks(
    model: nn.Module,
    plan: Mapping[str, _Layer],
    run_loss: Callable[[], Tensor],
    point: Mapping[str, Tensor],
    b: int,
) -> Tensor:
    """``||g_i||^2`` over all of ``point``'s parameters, (b,), layer by layer (ghost norms
    where cheaper, see :func:`_layer_sq_norms`); at most one layer's per-sample gradient
    is alive at a time."""
    p0 = next(iter(point.values()))
    total = p0.new_zeros(b)
    try:
        grads_out = _backward(plan, run_loss, b)
        for layer, outs in _per_layer(plan, grads_out):
            sq = _layer_sq_norms(layer, b, p0.dtype, outs)
            if sq is not None:
                total += sq
    finally:
        for layer in plan.values():
            layer.calls.clear()
    return total
