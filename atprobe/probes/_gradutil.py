"""What the gradient probes (gradnorm, stability, gradcos) share: attack options, sample
batches in the model's dtype, chunk sizes that fit the device, and summary statistics.

Private to ``atprobe.probes``; the public pieces are each probe's ``probe`` function and
config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import torch
from torch import Tensor, nn

from atprobe.attacks import NORMS, PGDConfig
from atprobe.data import Split, iterate_batches
from atprobe.errors import AtprobeError, check_choice
from atprobe.pergrad import chunk_size_for, default_attack, objective, Objective


@dataclasses.dataclass(frozen=True)
class AttackOptions:
    """The attack and chunking fields every gradient-probe config has (probe configs
    extend it). norm, eps, alpha, steps: the attacks' budget (defaults: the training
    attacks, L-inf 8/255, step 2/255, 10 steps); beta: TRADES' weight on the KL term;
    chunk_size: samples per per-sample-gradient chunk; seed: keys the per-sample random
    starts (and, where a probe draws them, its directions)."""

    norm: str = "linf"
    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10
    beta: float = 6.0
    chunk_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        """One-line errors for nonsense values."""
        norm, eps, alpha, steps, beta, chunk_size = (self.norm, self.eps, self.alpha, self.steps, self.beta,
                                                    self.chunk_size)
        check_choice(norm, NORMS, "norm")
        for what, v in (("eps", eps), ("alpha", alpha)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise AtprobeError(f"{what} must be a finite number >= 0, got {v!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise AtprobeError(f"steps must be an integer >= 0, got {steps!r}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
            raise AtprobeError(f"TRADES beta must be a finite number >= 0, got {beta!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise AtprobeError(f"chunk size must be an integer >= 1, got {chunk_size!r}")
        for name in ("pgd_at", "trades"):  # PGDConfig's own checks (e.g. an L-inf eps of 8 instead of 8/255)
            attack_config(name, norm, eps, alpha, steps)


def attack_config(name: str, norm: str, eps: float, alpha: float, steps: int) -> PGDConfig | None:
    """The attack of objective ``name`` (``pergrad.default_attack``: CE with a uniform start
    for pgd_at/R, KL with TRADES' 0.001 N(0, I) start for trades) at this budget."""
    base = default_attack(name)
    if base is None:
        return None
    return dataclasses.replace(base, norm=norm, eps=float(eps), alpha=float(alpha), steps=int(steps))


def make_objective(name: str, config) -> Objective:
    """``pergrad.objective(name)`` with the attack, beta and seed of a probe config."""
    attack = attack_config(name, config.norm, config.eps, config.alpha, config.steps)
    return objective(name, attack=attack, beta=config.beta, seed=config.seed)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    if p is None:
        raise AtprobeError("the model has no parameters")
    return p.device, p.dtype


def sample_batches(model: nn.Module, data: Split, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(x, y, ids)`` batches of ``data`` on the model's device, ``x`` in [0, 1] in the
    model's floating dtype (float64 models get float64 images), channels-last; ``ids``
    are the samples' original rows (``Split.index``), which key their PGD random starts."""
    if len(data) == 0:
        raise AtprobeError("no samples to probe")
    device, dtype = model_device_dtype(model)
    for batch in iterate_batches(data.to(device), batch_size, channels_last=True):
        yield batch.x.to(dtype), batch.y, batch.index


#: Memory the per-sample gradient chunks may use on the CPU, when no --chunk-size is given.
CPU_BUDGET_BYTES = 4 << 30
#: Fraction of a GPU's memory the per-sample gradient chunks may use (the rest: activations).
GPU_BUDGET_FRACTION = 0.25


def auto_chunk_size(model: nn.Module, limit: int, copies: int) -> int:
    """``min(limit, pergrad.chunk_size_for(model, budget, copies=copies))`` with a budget that
    depends only on the device (4 GiB on the CPU, a quarter of a GPU's total memory), so
    the same command on the same machine always picks the same chunk."""
    device, _ = model_device_dtype(model)
    if device.type == "cuda":
        budget = GPU_BUDGET_FRACTION * torch.cuda.get_device_properties(device).total_memory
    else:
        budget = CPU_BUDGET_BYTES
    return max(1, min(int(limit), chunk_size_for(model, budget, copies=copies)))


def stats(values: Tensor) -> dict[str, float]:
    """``n``, ``mean``, ``std`` (population, ddof 0) and ``median`` of the finite entries,
    reduced in float64 on the host. NaN statistics when no entry is finite."""
    v = values.detach().to("cpu", torch.float64)
    v = v[torch.isfinite(v)]
    n = int(v.numel())
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "median": math.nan}
    return {
        "n": n,
        "mean": float(v.mean()),
        "std": float(v.std(correction=0)),
        "median": float(v.quantile(0.5)),  # the mean of the two middle values for even n
    }
