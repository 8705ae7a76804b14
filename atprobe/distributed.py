"""Running under ``torchrun``: this process's place in the job, its collectives, the DDP
wrapper of training (``atprobe.train`` re-exports those names) and the sample share of the
probes (docs/scaling.md).

Training: every rank draws the same global batch and keeps its ``rows``; gradients are
reduced by DDP, the TE ensemble by ``all_gather_rows``, the epoch's running metrics by
``sum_over_ranks``. Without ``torchrun`` all of it is the identity.

Probes: :class:`SampleShare` is which whole batches of the samples this process computes,
a share of a ``torchrun`` job (gathered back to every rank in sample order) or an
independent ``--shard I/N`` part (written alone, joined by ``atprobe merge``). Whole
batches, so every batch a model sees is the batch one process sees: the per-sample
values are then the single-process ones bit for bit. The hook for probes that reduce
instead (a Hessian sum): :func:`probe_context` and :meth:`DistContext.sum_over_ranks`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn

from atprobe.errors import AtprobeError
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

    def all_gather_object(self, obj):
        """Every rank's ``obj`` (picklable), in rank order (``[obj]`` in one process)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out


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


def world_size() -> int:
    """The size of the ``torchrun`` job this process belongs to (1 without one), from the
    environment: known before any process group is joined."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    """Rank 0 of the ``torchrun`` job, or the only process: the one that writes files."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def probe_context(device: str | torch.device) -> tuple[DistContext, torch.device]:
    """The hook of every probe that runs under ``torchrun``: join the job (as
    :func:`distributed_context`; a second call reuses the joined group) and return this
    process's :class:`DistContext` and device. A probe that reduces a sum over samples
    computes its share and calls ``ctx.sum_over_ranks(t)``; one that keeps per-sample rows
    goes through :class:`SampleShare` (``SampleShare.of(ctx)``)."""
    return distributed_context(device)


def single_process_only(command: str) -> None:
    """A one-line error under ``torchrun`` for a command that does not split its work
    across ranks yet: every rank would compute the whole run (docs/scaling.md)."""
    if world_size() > 1:
        raise AtprobeError(f"{command} does not run under torchrun (every rank would compute the whole "
                           "thing): run it in one process (docs/scaling.md)")


@dataclass(frozen=True)
class SampleShare:
    """The samples this process computes: share ``index`` of ``count``, by whole batches
    (:meth:`rows`). ``gathered``: the shares are ranks of one ``torchrun`` job and are
    gathered back (:meth:`gather`); otherwise this is an independent ``--shard`` part."""

    index: int = 0
    count: int = 1
    gathered: bool = False
    ctx: DistContext = DistContext()

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise AtprobeError(f"--shard {self.index}/{self.count}: the part must be 0..{self.count - 1}")

    @classmethod
    def of(cls, ctx: DistContext) -> SampleShare:
        """This rank's share of a ``torchrun`` job."""
        return cls(ctx.rank, ctx.world_size, gathered=ctx.world_size > 1, ctx=ctx)

    @classmethod
    def parse(cls, text: str) -> SampleShare:
        """``--shard I/N``: part I (0-based) of N independent parts."""
        parts = str(text).split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or int(parts[1]) < 1:
            raise AtprobeError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
        return cls(int(parts[0]), int(parts[1]))

    @property
    def part(self) -> bool:
        """An independent part of several (``--shard I/N``, N > 1): written alone, merged later."""
        return self.count > 1 and not self.gathered

    def rows(self, n: int, batch_size: int) -> slice:
        """This share's rows of ``n`` samples cut into batches of ``batch_size``: a contiguous
        run of whole batches (counts differ by at most one batch; a share may be empty)."""
        return batch_share(n, batch_size, self.index, self.count)

    def mine(self, samples, batch_size: int):
        """This share's samples of ``samples`` (a ``Split``): :meth:`rows` of it."""
        return samples if self.count == 1 else samples.subset(self.rows(len(samples), batch_size))

    def gather(self, frame: pd.DataFrame | None, size: int) -> pd.DataFrame | None:
        """The rows of every share in sample order: ``frame`` holds blocks of ``size`` rows
        (one per attack or model, in order; None when the share is empty) and block j of
        the result is block j of every share, in share order (:func:`interleave_blocks`).
        A part (not gathered) returns its own frame."""
        if not self.gathered:
            return frame
        shares = self.ctx.all_gather_object((frame, size))
        return interleave_blocks([f for f, _ in shares], [s for _, s in shares])

    def gather_values(self, values: Tensor) -> Tensor:
        """Per-sample ``values`` (first dimension: this share's samples, in order) of every
        share, concatenated in share order on ``values``' device: the tensor one process
        computes, bit for bit (whole batches). A part (not gathered) returns its own values.
        Every rank must call it the same number of times (once per grid point, direction...)."""
        if not self.gathered:
            return values
        parts = self.ctx.all_gather_object(values.detach().cpu())
        return torch.cat(parts).to(values.device)

    def points(self, total: int) -> range:
        """This share's points of ``total`` (grid points, directions, checkpoint pairs...), round
        robin: a rank's of a ``torchrun`` job, a ``--shard`` part's, or all of them in one process."""
        return range(self.index, total, self.count)

    def point_meta(self, units: int) -> dict:
        """The meta record's ``world_size`` and, for a part that holds whole points (of ``units``
        in all, each part's :meth:`points`), its ``part`` record (what ``atprobe merge`` checks)."""
        record: dict = {"world_size": self.count if self.gathered else 1}
        if self.part:
            record["part"] = {"index": self.index, "count": self.count, "units": units}
        return record

    def gather_rows(self, frame: pd.DataFrame, key: str) -> pd.DataFrame:
        """Every rank's rows of a grid (:meth:`points`) in grid order, sorted by ``key`` (stable)."""
        if not self.gathered:
            return frame
        frames = [f for f in self.ctx.all_gather_object(frame) if len(f)]
        return pd.concat(frames, ignore_index=True).sort_values(key, kind="stable", ignore_index=True)

    def meta(self, n: int, batch_size: int) -> dict:
        """The meta record's ``world_size`` and, for a part, ``part`` (what ``atprobe merge`` checks)."""
        record: dict = {"world_size": self.count if self.gathered else 1}
        if self.part:
            rows = self.rows(n, batch_size)
            record["part"] = {"index": self.index, "count": self.count, "n": n, "batch_size": batch_size,
                              "rows": [rows.start, rows.stop]}
        return record


#: The share of a run in one process: every sample, every point (the default of the probes).
ONE_PROCESS = SampleShare()


def batch_share(n: int, batch_size: int, index: int, count: int) -> slice:
    """Share ``index`` of ``count`` of ``n`` rows in batches of ``batch_size``: whole batches,
    contiguous, the first shares one batch longer when they do not divide evenly."""
    batches = -(-n // batch_size)
    base, extra = divmod(batches, count)
    first = index * base + min(index, extra)
    last = first + base + (1 if index < extra else 0)
    return slice(min(first * batch_size, n), min(last * batch_size, n))


def interleave_blocks(frames: Sequence[pd.DataFrame | None], sizes: Sequence[int]) -> pd.DataFrame | None:
    """Frames of shares in sample order, each a run of blocks of ``sizes[i]`` rows (the same
    number of blocks in each: one per attack, model, checkpoint...), joined so that block j
    of the result is block j of every share in order. Empty shares (None or size 0) add nothing."""
    kept = [(f, s) for f, s in zip(frames, sizes) if f is not None and s > 0]
    if not kept:
        return None
    blocks = {len(f) // s for f, s in kept}
    if len(blocks) != 1 or any(len(f) % s for f, s in kept):
        raise AtprobeError("the shares do not hold the same blocks of rows: they come from different runs")
    pieces = [f.iloc[j * s:(j + 1) * s] for j in range(blocks.pop()) for f, s in kept]
    return pd.concat(pieces, ignore_index=True)


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
