"""What the probes share: the gradient probes' config fields, value checks, sample
batches in the model's dtype, chunk sizes that fit the device, and summary statistics.

Private to ``atprobe.probes``; the public pieces are each probe's ``probe`` function and
config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from atprobe.attacked import model_device_dtype
from atprobe.attacks import PGDConfig
from atprobe.data import Split, iterate_batches
from atprobe.errors import AtprobeError, check_seed
from atprobe.pergrad import Objective, chunk_size_for, default_attack, objective
from atprobe.threat import ThreatModel

#: The columns every measure's ``complexity_rows`` returns (``atprobe complexity``).
COMPLEXITY_COLUMNS = ["measure", "variant", "value", "reason"]


def is_int(v) -> bool:
    """An integer (numpy's too, as tables hand them out), not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_threat(threat) -> ThreatModel:
    if not isinstance(threat, ThreatModel):
        raise AtprobeError(f"threat must be an atprobe.threat.ThreatModel, got {threat!r}")
    return threat


@dataclasses.dataclass(frozen=True)
class PGDFields:
    """The fields of every probe config that attacks: ``threat``, the threat model
    (default: the training attack, L-inf 8/255, step eps/4, 10 steps), and ``seed``, which
    keys the per-sample random starts (and, where a probe draws them, its directions and
    other random vectors). ``attack`` is PGD on CE under the threat model, eval mode."""

    threat: ThreatModel = ThreatModel()
    seed: int = 0

    def __post_init__(self) -> None:
        check_threat(self.threat)
        check_seed(self.seed)

    @property
    def attack(self) -> PGDConfig:
        """The probe's attack: PGD on CE under ``threat`` (its start: uniform by default)."""
        return self.threat.attack("ce")


@dataclasses.dataclass(frozen=True)
class AttackOptions(PGDFields):
    """The fields every gradient-probe config has (probe configs extend it): ``threat``
    and ``seed`` (:class:`PGDFields`); beta: TRADES' weight on the KL term; chunk_size:
    samples per per-sample-gradient chunk."""

    beta: float = 6.0
    chunk_size: int = 64

    def __post_init__(self) -> None:
        """One-line errors for nonsense values."""
        super().__post_init__()
        if not is_number(self.beta) or self.beta < 0:
            raise AtprobeError(f"TRADES beta must be a finite number >= 0, got {self.beta!r}")
        if not is_int(self.chunk_size) or self.chunk_size < 1:
            raise AtprobeError(f"chunk size must be an integer >= 1, got {self.chunk_size!r}")


def make_objective(name: str, config) -> Objective:
    """``pergrad.objective(name)`` with the attack (``default_attack`` under the config's
    threat model), beta and seed of a probe config."""
    return objective(name, attack=default_attack(name, config.threat), beta=config.beta, seed=config.seed)


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


#: ``this process's per-sample values -> every sample's`` (``SampleShare.gather_values``).
Gather = Callable[[Tensor], Tensor]


def identity_gather(values: Tensor) -> Tensor:
    """The gather of one process: its values are every sample's."""
    return values


def gathered(parts: list[Tensor], gather: Gather) -> Tensor:
    """``parts`` (this process's per-sample chunks, possibly none) concatenated and gathered."""
    return gather(torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64))


def share_batches(model: nn.Module, data: Split, batch_size: int,
                  gather: Gather) -> list[tuple[Tensor, Tensor, Tensor]]:
    """:func:`sample_batches` of this process's share (none when the share is empty under a
    gather; one process with no sample is an error)."""
    if len(data) == 0 and gather is not identity_gather:
        return []
    return list(sample_batches(model, data, batch_size))


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
