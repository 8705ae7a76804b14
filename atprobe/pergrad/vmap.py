"""The ``vmap`` method of :mod:`atprobe.pergrad`: ``torch.func.vmap(torch.func.grad(l_i))``
over ``torch.func.functional_call``, one sample at a time (a batch of one under ``vmap``).

Works for any layer, given no in-place ops on activations; buffers and unprobed parameters
are closed over as constants, so only the probed parameters are differentiated (and
broadcast, not copied, by ``vmap``)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from atprobe.pergrad.objectives import PerSampleLoss

__all__ = ["JACOBIAN_ROWS", "per_sample_grads_vmap"]

#: Rows of the Jacobian (samples) :func:`per_sample_grads_jacobian` computes at once.
JACOBIAN_ROWS = 8


def per_sample_grads_vmap(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    point: Mapping[str, Tensor],
    consts: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    extra: tuple[Tensor, ...] = (),
    *,
    coupled: bool = False,
) -> dict[str, Tensor]:
    """Per-sample gradients ``{name: (b, *shape)}`` of ``loss_fn`` with respect to ``point``
    for a chunk ``x, y`` (and the ``prepare`` outputs ``extra``, one row per sample); the
    rest of the model's state is ``consts`` (``directions.functional_state``).

    ``coupled``: the samples of the chunk interact (BatchNorm normalizing with the chunk's
    batch statistics), so a batch of one per sample would be another network (each sample
    its own statistics). The gradients are then row ``i`` of the Jacobian of the chunk's
    loss vector ``(l_1..l_b)`` from one forward of the whole chunk: the gradient of ``l_i``
    through the statistics every sample of the chunk contributes to (``torch.func.jacrev``,
    :data:`JACOBIAN_ROWS` vector-Jacobian products at a time, a backward of the chunk per
    row: about ``b`` times the work of the uncoupled path)."""
    if coupled:

        def losses(p: dict[str, Tensor]) -> Tensor:
            def f(inputs: Tensor) -> Tensor:
                return functional_call(model, (p, consts), (inputs,))

            return loss_fn(f, x, y, *extra)

        return jacrev(losses, chunk_size=JACOBIAN_ROWS)(dict(point))

    def single(p: dict[str, Tensor], xi: Tensor, yi: Tensor, *extra: Tensor) -> Tensor:
        # One sample, batch of one; buffers and unprobed parameters are closed over as
        # constants, so only ``p`` is differentiated (and broadcast, not copied, by vmap).
        def f(inputs: Tensor) -> Tensor:
            return functional_call(model, (p, consts), (inputs,))

        return loss_fn(f, xi.unsqueeze(0), yi.unsqueeze(0), *(e.unsqueeze(0) for e in extra)).sum()

    in_dims = (None, 0, 0, *([0] * len(extra)))
    return vmap(grad(single), in_dims=in_dims)(point, x, y, *extra)

