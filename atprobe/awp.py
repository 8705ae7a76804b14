"""Adversarial weight perturbation (Wu, Xia and Wang 2020, "AWP"): each update's gradient is
taken at ``w + v``, ``v`` the layer-wise worst case of the training objective, and applied to ``w``.

The official code copies the model into a proxy, takes one plain SGD *ascent* step on the
objective there (train mode, so only the proxy's BatchNorm statistics move) and keeps, for every
weight with more than one dimension (conv and linear weights; biases and BatchNorm are not
perturbed), ``v_l = gamma ||w_l|| d_l / ||d_l||`` with ``d_l = w_proxy,l - w_l``. One ascent step
without momentum moves each layer along its gradient, so ``d_l`` is the gradient ``g_l`` up to the
step size, which the normalization removes: ``v_l = gamma ||w_l|| g_l / ||g_l||``. That is the
layer-normalized direction of ``atprobe.directions.normalize_direction`` (``norm="layer"``,
``ignore="biasbn"``), scaled by ``gamma``; here the gradient is taken directly, through copies of
the BatchNorm buffers, so the model's statistics stay untouched as with the proxy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from atprobe.directions import normalize_direction

__all__ = ["ProxyView", "shift_weights", "weight_perturbation"]


class ProxyView(nn.Module):
    """``model`` with its own parameters (gradients flow to them) but copies of its buffers:
    a train-mode forward updates the copies, never the model's BatchNorm statistics (what the
    official proxy model is for)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._buffers_copy = {k: b.clone() for k, b in model.named_buffers()}

    def forward(self, x: Tensor) -> Tensor:
        return functional_call(self.model, {**dict(self.model.named_parameters()), **self._buffers_copy}, (x,))


def weight_perturbation(model: nn.Module, loss: Tensor, gamma: float,
                        reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """``{name: v_l}`` for the weights of ``model`` with more than one dimension: ``gamma *
    ||w_l|| g_l / ||g_l||``, ``g`` the gradient of ``loss`` (a scalar computed from the model's
    parameters). ``reduce``: sums the flattened gradient over the ranks of a ``torchrun`` job
    (each rank's ``loss`` weighted by its share of the batch), so every rank gets the
    perturbation of the whole batch."""
    named = {k: p for k, p in model.named_parameters() if p.requires_grad and p.dim() >= 2}
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, named.values())]
    if reduce is not None:
        flat = reduce(torch.cat([g.reshape(-1) for g in grads]))
        grads, offset = [], 0
        for p in named.values():
            grads.append(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    direction = normalize_direction(dict(zip(named, grads)), {k: p.detach() for k, p in named.items()},
                                    ignore="biasbn", norm="layer")
    return {k: gamma * d for k, d in direction.items()}


@torch.no_grad()
def shift_weights(model: nn.Module, perturbation: Mapping[str, Tensor], sign: float) -> None:
    """``w <- w + sign * v`` in place for every entry of ``perturbation`` (+1 before the
    update's forward, -1 after the optimizer step, as the official ``perturb``/``restore``)."""
    params = dict(model.named_parameters())
    for name, v in perturbation.items():
        params[name].add_(v, alpha=sign)
