"""Natural and adversarial accuracy of a model: the evaluation loop every command shares."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from atprobe.attacks import AttackSpec, full_precision, pgd
from atprobe.data import Split, iterate_batches
from atprobe.errors import AtprobeError
from atprobe.runtime import autocast, make_generator, module_mode

EVAL_COLUMNS = ["attack", "norm", "eps", "alpha", "steps", "restarts", "n", "accuracy", "loss"]


@dataclass(frozen=True)
class EvalConfig:
    """What ``evaluate`` measures.

    attacks: parsed attack specs (``atprobe.attacks.parse_attack``).
    batch_size: samples per forward/attack batch.
    seed: seeds each attack's random starts (a fresh generator per attack, so the
        result of one attack does not depend on which attacks ran before it).
    amp: bf16 autocast on CUDA.
    """

    attacks: tuple[AttackSpec, ...]
    batch_size: int = 256
    seed: int = 0
    amp: bool = True

    def __post_init__(self) -> None:
        if not self.attacks:
            raise AtprobeError("no attack given: name at least one, e.g. natural,pgd10")
        if self.batch_size < 1:
            raise AtprobeError(f"batch size must be >= 1, got {self.batch_size}")


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def evaluate(model: nn.Module, split: Split, config: EvalConfig, progress=None) -> pd.DataFrame:
    """Accuracy and mean cross-entropy of ``model`` on ``split`` under each attack.

    One row per attack with columns ``EVAL_COLUMNS``: ``accuracy`` is the fraction of
    samples whose (attacked) prediction equals ``split.y``; ``loss`` the mean CE there.
    The model is evaluated in eval mode (restored afterwards). Counts accumulate on the
    device; the only host syncs are one per attack, at the end.
    """
    device = _device_of(model)
    split = split.to(device)
    n = len(split)
    if n == 0:
        raise AtprobeError("the evaluation split is empty")
    rows = []
    with module_mode(model, False):
        for spec in config.attacks:
            generator = make_generator(config.seed, device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for batch in iterate_batches(split, config.batch_size, channels_last=True):
                x = batch.x
                if spec.config is not None:
                    x = pgd(model, x, batch.y, spec.config, generator=generator, amp=config.amp)
                with torch.no_grad(), autocast(device, config.amp):
                    logits = model(x)
                logits = full_precision(logits)
                correct += (logits.argmax(1) == batch.y).sum()
                loss_sum += F.cross_entropy(logits, batch.y, reduction="sum").double()
                if progress is not None:
                    progress.update(len(batch.y))
            c = spec.config
            rows.append(
                {
                    "attack": spec.name,
                    "norm": "none" if c is None else c.norm,
                    "eps": 0.0 if c is None else c.eps,
                    "alpha": 0.0 if c is None else c.alpha,
                    "steps": spec.steps,
                    "restarts": spec.restarts,
                    "n": n,
                    "accuracy": correct.item() / n,
                    "loss": loss_sum.item() / n,
                }
            )
    return pd.DataFrame(rows, columns=EVAL_COLUMNS)
