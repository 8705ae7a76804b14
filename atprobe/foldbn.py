"""A model's linear layers as the norm-based complexity measures see them: every conv and
linear layer with the eval-mode BatchNorm that directly follows it folded in.

In eval mode a BatchNorm is the per-channel affine map

    BN(z) = s * z + t,   s = gamma / sqrt(running_var + eps),   t = beta - running_mean * s

(``gamma = 1, beta = 0`` without affine parameters). When it directly follows a conv or
linear layer ``z = W x + b`` (b = 0 when the layer has no bias), the pair is one affine layer

    W' = W * s   (per output channel: row o of a linear weight, filter o of a conv)
    b' = (b - running_mean) * s + beta

"Directly follows" is decided on the model's own forward pass, not on names: one forward of
a 1-sample input records which module produced which tensor, and a BatchNorm is folded into
a conv/linear layer when its input *is* that layer's output tensor and the autograd graph
shows no other operation consuming that output (so the fold cannot change the function).
That holds for conv-BN pairs in ResNet-18 (main branch and shortcut), VGG, cnn-small and
for the BN between the two convs of a pre-activation block; it does not hold for a BN that
opens a pre-activation block (its input is a residual sum or the stem conv's output, which
also feeds the identity shortcut), nor for DenseNet's BNs on concatenations, nor for the
final BN of PreActResNet/WRN/DenseNet. Such a *standalone* BatchNorm is its own diagonal
layer ``x -> s * x`` (its shift is a bias and is not counted by the measures).

The input normalization ``(x - mean) / std`` inside the models is not a weight layer and
is not part of the list.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from atprobe.errors import AtprobeError
from atprobe.models import IMAGE_SIZE, IN_CHANNELS
from atprobe.runtime import module_mode

__all__ = ["NormLayer", "TracedLayer", "bn_affine", "fold_bn", "norm_layers", "trace_layers"]

#: The per-sample input shape the architectures here are built for.
DEFAULT_INPUT_SHAPE = (IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)


@dataclass(frozen=True)
class TracedLayer:
    """One conv, linear or BatchNorm module as it ran in a forward pass.

    name: qualified module name (a ``state_dict`` prefix); kind: ``conv``, ``linear`` or
    ``bn``; input_shape: the per-sample shape of its input (``(C, H, W)`` or ``(F,)``);
    folds: for a conv/linear layer, the name of the BatchNorm folded into it (None when
    none); for a BatchNorm, the name of the layer it is folded into (None: standalone).
    """

    name: str
    kind: str
    input_shape: tuple[int, ...]
    folds: str | None


@dataclass(frozen=True)
class NormLayer:
    """One layer of the norm measures.

    name: the conv/linear module's name (``features.0``), or a standalone BatchNorm's name.
    kind: ``conv``, ``linear`` or ``bn`` (a standalone BatchNorm as diagonal layer).
    weight: the effective weight, BatchNorm folded in when ``bn`` is set; for kind ``bn``
        the scale vector ``s`` (the diagonal of the layer, one entry per channel).
    module: the conv/linear module (stride, padding, dilation, groups for the operator
        norm); None for kind ``bn``.
    input_shape: per-sample input shape the layer sees at the traced input size.
    bn: the folded BatchNorm's name (None when none).
    """

    name: str
    kind: str
    weight: Tensor
    module: nn.Module | None
    input_shape: tuple[int, ...]
    bn: str | None = None


def bn_affine(bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """``(s, t)`` of the eval-mode BatchNorm ``BN(z) = s * z + t``, per channel."""
    if bn.running_mean is None or bn.running_var is None:
        raise AtprobeError(
            f"{type(bn).__name__} without running statistics is not an affine map in eval mode; "
            "the norm measures need track_running_stats=True"
        )
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale = bn.weight * scale
        shift = bn.bias + bn.weight * shift
    return scale.detach(), shift.detach()


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _BatchNorm):
        return "bn"
    return None


def _consumer_counts(output: Tensor) -> dict[int, int]:
    """For every autograd node reachable from ``output``: how many graph edges lead to it
    (how many operations consumed the tensor it produced). Keyed by ``id`` of the node;
    the graph keeps the nodes alive while ``output`` is."""
    counts: dict[int, int] = {}
    root = output.grad_fn
    if root is None:
        return counts
    seen = {id(root)}
    stack = [root]
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            counts[id(nxt)] = counts.get(id(nxt), 0) + 1
            if id(nxt) not in seen:
                seen.add(id(nxt))
                stack.append(nxt)
    return counts


def _param_like(model: nn.Module) -> Tensor:
    for p in model.parameters():
        return p
    raise AtprobeError("the model has no parameters")


def trace_layers(model: nn.Module, input_shape: Sequence[int] | None = None) -> list[TracedLayer]:
    """The conv, linear and BatchNorm modules that run in ``model``'s eval-mode forward on
    one input of per-sample shape ``input_shape`` (default ``(3, 32, 32)``), in the order
    they first run, with the BatchNorm folding decided as the module docstring says.

    A conv/linear/BatchNorm module that runs more than once (weight sharing) is an error;
    modules that never run are not listed. The model's weights and mode are unchanged.
    """
    shape = tuple(int(s) for s in (DEFAULT_INPUT_SHAPE if input_shape is None else input_shape))
    modules = {m: name for name, m in model.named_modules() if _kind(m) is not None}
    order: list[tuple[str, str, tuple[int, ...]]] = []
    outputs: dict[int, tuple[str, Tensor]] = {}  # id(output tensor) -> (layer name, tensor kept alive)
    bn_inputs: dict[str, Tensor] = {}
    ran: set[str] = set()

    def pre_hook(module: nn.Module, args):
        name = modules[module]
        if name in ran:
            raise AtprobeError(f"layer {name!r} runs more than once in forward (shared weights are not supported)")
        ran.add(name)
        x = args[0]
        order.append((name, _kind(module), tuple(x.shape[1:])))
        if _kind(module) == "bn":
            bn_inputs[name] = x

    def post_hook(module: nn.Module, args, output):
        if _kind(module) != "bn" and isinstance(output, Tensor):
            outputs[id(output)] = (modules[module], output)

    handles = []
    for m in modules:
        handles.append(m.register_forward_pre_hook(pre_hook))
        handles.append(m.register_forward_hook(post_hook))
    like = _param_like(model)
    x = torch.zeros((1, *shape), dtype=like.dtype, device=like.device, requires_grad=True)
    try:
        with module_mode(model, False), torch.enable_grad():
            out = model(x)
    except AtprobeError:
        raise
    except RuntimeError as exc:
        raise AtprobeError(f"the model does not run on inputs of shape {shape}: {str(exc).splitlines()[0]}") from None
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, Tensor):
        raise AtprobeError("the model's forward must return a tensor of logits")
    counts = _consumer_counts(out)

    partner: dict[str, str] = {}  # both directions: layer -> bn, bn -> layer
    for bn_name, inp in bn_inputs.items():
        produced = outputs.get(id(inp))
        if produced is None or produced[1] is not inp:
            continue
        layer_name = produced[0]
        node = inp.grad_fn
        if layer_name in partner or node is None or counts.get(id(node), 0) != 1:
            continue
        partner[layer_name] = bn_name
        partner[bn_name] = layer_name
    return [TracedLayer(name, kind, shape_, partner.get(name)) for name, kind, shape_ in order]


def norm_layers(model: nn.Module, input_shape: Sequence[int] | None = None, *, fold: bool = True) -> list[NormLayer]:
    """The layers of the norm measures, in execution order.

    ``fold=True``: every conv/linear layer that runs, with the BatchNorm that directly
    follows it folded into its weight (``W * s`` per output channel), plus every
    standalone BatchNorm as a diagonal layer (weight = its scale vector ``s``).
    ``fold=False``: the raw weights of the conv/linear layers only; BatchNorm is ignored
    (what most code measures). Conv/linear layers come in ``atprobe.models.weight_layers``
    order for every architecture of ``atprobe.models`` (their execution order).
    """
    traced = trace_layers(model, input_shape)
    named = dict(model.named_modules())
    layers: list[NormLayer] = []
    for t in traced:
        module = named[t.name]
        if t.kind == "bn":
            if fold and t.folds is None:
                scale, _ = bn_affine(module)
                layers.append(NormLayer(t.name, "bn", scale, None, t.input_shape))
            continue
        weight = module.weight.detach()
        bn_name = t.folds if fold else None
        if bn_name is not None:
            scale, _ = bn_affine(named[bn_name])
            weight = weight * scale.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1)))
        layers.append(NormLayer(t.name, t.kind, weight, module, t.input_shape, bn_name))
    return layers


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def fold_bn(model: nn.Module, input_shape: Sequence[int] | None = None) -> nn.Module:
    """A copy of ``model`` whose directly-following BatchNorms are folded into their conv or
    linear layer (weights ``W * s``, bias ``(b - running_mean) * s + beta``) and replaced by
    ``nn.Identity``; standalone BatchNorms are kept. In eval mode the copy computes the same
    function as ``model`` (up to rounding). ``model`` itself is not changed."""
    traced = trace_layers(model, input_shape)
    folded = copy.deepcopy(model)
    named = dict(folded.named_modules())
    with torch.no_grad():
        for t in traced:
            if t.kind == "bn" or t.folds is None:
                continue
            layer, bn = named[t.name], named[t.folds]
            scale, shift = bn_affine(bn)
            scale = scale.to(layer.weight.dtype)
            view = (-1, *([1] * (layer.weight.dim() - 1)))
            layer.weight.mul_(scale.view(view))
            bias = shift.to(layer.weight.dtype)
            if layer.bias is not None:
                bias = layer.bias * scale + bias
            layer.bias = nn.Parameter(bias.clone(), requires_grad=layer.weight.requires_grad)
            _set_module(folded, t.folds, nn.Identity())
    return folded
