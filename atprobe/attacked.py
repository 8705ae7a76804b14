"""The one attacked-data path: a split, attacked batch by batch, as its consumers see it.

``attacked_batches(model, split, attack, ...)`` yields, for consecutive batches of the
split in order, the rows they hold, the samples' dataset indices and labels, the clean
and the adversarial inputs and the model's logits at the adversarial inputs.
``evaluate`` (accuracy and loss), ``hardness`` (per-sample losses), ``complexity``'s margins
and ``flatness`` (the loss at each point of the landscape) each reduce these in their own
way; none of them has an attack loop of its own.

Invariance. The model runs in eval mode (BatchNorm's running statistics, dropout off), so a
sample's logits depend on that sample alone; the attack's random starts are keyed by
``(seed, sample index)`` (``atprobe.starts``). So what a sample contributes is independent
of ``batch_size`` and of which other samples share its batch, up to the floating-point
rounding of batched kernels (CPU GEMM and convolution kernels block over the batch, so a
logit can differ in its last bit between batch sizes). Consumers store per-sample values by
row and reduce the whole vector at the end, so no reduction order depends on batching either.
The exception is AutoAttack (``atprobe.autoattack``): the package draws its random starts for
a batch as a whole, so its examples can change with ``batch_size`` (docs/attacks.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from atprobe import autoattack
from atprobe.attacks import PGDConfig, pgd
from atprobe.data import Split, iterate_batches
from atprobe.errors import AtprobeError
from atprobe.objectives import full_precision
from atprobe.runtime import autocast, module_mode
from atprobe.starts import Starts

__all__ = ["AttackedBatch", "attack_batch", "attacked_batches", "model_device_dtype"]


@dataclass(frozen=True)
class AttackedBatch:
    """One batch of the attacked split.

    rows: the positions ``start:stop`` of these samples in the split (for per-sample
        vectors of length ``len(split)``).
    index: the samples' dataset indices (``Split.index``; they key the random starts).
    y: the labels attacked and scored (``Split.y``).
    x: the clean inputs, in the model's dtype, channels-last.
    x_adv: the adversarial inputs (``x`` itself when there is no attack).
    logits: the model's logits at ``x_adv``, full precision, no graph.
    natural_logits: the logits at ``x`` when asked for (``natural=True``), else None.
    """

    rows: slice
    index: Tensor
    y: Tensor
    x: Tensor
    x_adv: Tensor
    logits: Tensor
    natural_logits: Tensor | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of the model's parameters (inputs are cast to it)."""
    p = next(model.parameters(), None)
    if p is None:
        raise AtprobeError("the model has no parameters")
    return p.device, p.dtype


Attack = PGDConfig | autoattack.AutoAttackConfig | None


def attack_batch(model: nn.Module, x: Tensor, y: Tensor, ids: Tensor, attack: Attack, *, seed: int = 0,
                 amp: bool = True, stream: tuple[int, ...] = ()) -> Tensor:
    """``x`` attacked by ``attack`` against ``model`` (a module or an
    ``atprobe.directions.ModelAt``), each sample from its own start keyed by
    ``(seed, ids[i], *stream)``: the same sample starts from the same point whatever its
    batch and whatever the parameters. ``x`` itself when ``attack`` is None.

    An ``AutoAttackConfig`` runs AutoAttack on the batch (``atprobe.autoattack.perturb``),
    seeded by ``seed`` alone, in float32 whatever ``amp``: its starts are drawn for the
    batch as a whole, so its examples are not keyed per sample."""
    if attack is None:
        return x
    if isinstance(attack, autoattack.AutoAttackConfig):
        return autoattack.perturb(model, x, y, attack, seed=seed)
    ids = torch.as_tensor(ids, dtype=torch.int64).to(x.device)
    return pgd(model, x, y, attack, starts=Starts(seed, ids, stream), amp=amp)


def attacked_batches(
    model: nn.Module,
    split: Split,
    attack: Attack,
    *,
    seed: int = 0,
    batch_size: int = 256,
    amp: bool = True,
    natural: bool = False,
    stream: tuple[int, ...] = (),
    exact_logits: bool = False,
    progress=None,
) -> Iterator[AttackedBatch]:
    """Attack ``split`` with ``attack`` (None: no attack, ``x_adv is x``; a ``PGDConfig`` or
    an ``atprobe.autoattack.AutoAttackConfig``) against ``model`` in eval mode, batch after
    batch in split order.

    seed, stream: key each sample's random starts with its index (``atprobe.starts.Starts``).
    amp: bf16 autocast on CUDA for the attack and the logits (a no-op on the CPU).
    natural: also return the logits at the clean inputs.
    exact_logits: compute the logits without autocast even when the attack uses it.
    progress: anything with ``update(n)``, advanced by each batch's samples.
    """
    if len(split) == 0:
        raise AtprobeError("no samples: the split is empty")
    device, dtype = model_device_dtype(model)
    return _batches(model, split.to(device), attack, seed, batch_size, amp, natural, stream, dtype,
                    amp and not exact_logits, progress)


def _batches(model, split, attack, seed, batch_size, amp, natural, stream, dtype, logits_amp, progress):
    start = 0
    with module_mode(model, False):
        for batch in iterate_batches(split, batch_size, channels_last=True):
            x = batch.x.to(dtype)
            b = x.shape[0]
            x_adv = attack_batch(model, x, batch.y, batch.index, attack, seed=seed, amp=amp, stream=stream)
            with torch.no_grad(), autocast(x.device, logits_amp):
                logits = model(x_adv)
                nat = model(x) if natural else None
            yield AttackedBatch(
                rows=slice(start, start + b), index=batch.index, y=batch.y, x=x, x_adv=x_adv,
                logits=full_precision(logits), natural_logits=None if nat is None else full_precision(nat),
            )
            start += b
            if progress is not None:
                progress.update(b)
