"""Training under ``torchrun``: this process's place in the job, the collectives the
trainer needs, and the DDP wrapper (``atprobe.train`` re-exports the public names).

Every rank draws the same global batch and keeps its ``rows``; gradients are reduced by
DDP, the TE ensemble by ``all_gather_rows``, the epoch's running metrics by
``sum_over_ranks``. Without ``torchrun`` all of it is the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from atprobe.runtime import resolve_device


@dataclass(frozen=True)
class DistContext:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of n samples (sizes differ by <= 1)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def all_gather_rows(self, t: Tensor, n: int) -> Tensor:
        """Concatenate every rank's ``rows(n)`` share of a batch back into the global batch."""
        if self.world_size == 1:
            return t
        size = -(-n // self.world_size)  # padded to equal size: all_gather wants equal shapes
        padded = t.new_zeros((size, *t.shape[1:]))
        padded[: len(t)] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat([p[: len(range(n)[DistContext(r, self.world_size).rows(n)])]
                          for r, p in enumerate(parts)])

    def sum_over_ranks(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks (in place; ``t`` itself in one process)."""
        if self.world_size > 1:
            torch.distributed.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def distributed_context(device: str | torch.device) -> tuple[DistContext, torch.device]:
    """Join the ``torchrun`` job named by the environment (WORLD_SIZE > 1), if any:
    NCCL on GPUs (one per local rank), gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), resolve_device(device)
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local)
        torch.cuda.set_device(resolved)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    return DistContext(rank, world), resolved


class MultiForward(nn.Module):
    """``forward(*xs)`` = one ``model(x)`` per input, as a tuple.

    Each input keeps its own forward (train-mode BatchNorm statistics per input, as the
    methods define), but a DDP wrapper sees a single forward per step, which is what its
    gradient reduction expects (TRADES and Eq. 6 need two).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *xs: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.model(x) for x in xs)


def ddp_wrapped(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """The module whose forward the update differentiates: ``model`` itself in one process,
    DDP over ``MultiForward(model)`` under ``torchrun``. DDP broadcasts rank 0's weights on
    construction: seeded init is identical on every rank anyway, this makes it certain."""
    if ctx.world_size == 1:
        return model
    return nn.parallel.DistributedDataParallel(MultiForward(model),
                                               device_ids=[device] if device.type == "cuda" else None)
