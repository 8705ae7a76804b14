"""Natural and adversarial accuracy of a model: the evaluation loop every command shares."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from atprobe.attacked import attacked_batches, model_device_dtype
from atprobe.attacks import AttackSpec
from atprobe.data import Split
from atprobe.errors import AtprobeError, check_seed
from atprobe.objectives import ce

EVAL_COLUMNS = ["attack", "norm", "eps", "alpha", "steps", "restarts", "n", "accuracy", "loss"]
SAMPLE_COLUMNS = ["attack", "index", "label", "prediction", "robust", "loss"]


@dataclass(frozen=True)
class EvalConfig:
    """What ``evaluate`` measures.

    attacks: parsed attack specs (``atprobe.attacks.parse_attack`` against a threat model).
    batch_size: samples per forward/attack batch (does not change the result, except for
        AutoAttack, whose random starts are drawn per batch: docs/attacks.md).
    seed: keys each sample's random starts with its index (the same for every attack).
    amp: bf16 autocast on CUDA (off by default: the paper's numbers are float32, and bf16
        logits can flip a prediction near the decision boundary).
    """

    attacks: tuple[AttackSpec, ...]
    batch_size: int = 256
    seed: int = 0
    amp: bool = False

    def __post_init__(self) -> None:
        if not self.attacks:
            raise AtprobeError("no attack given: name at least one, e.g. natural,pgd10")
        if self.batch_size < 1:
            raise AtprobeError(f"batch size must be >= 1, got {self.batch_size}")
        check_seed(self.seed)


def evaluate(model: nn.Module, split: Split, config: EvalConfig, progress=None) -> pd.DataFrame:
    """Accuracy and mean cross-entropy of ``model`` on ``split`` under each attack.

    One row per attack with columns ``EVAL_COLUMNS``: ``accuracy`` is the fraction of
    samples whose (attacked) prediction equals ``split.y``; ``loss`` the mean CE there.
    The model is evaluated in eval mode (restored afterwards) through
    ``atprobe.attacked.attacked_batches``. Per-sample values are kept on the device by row
    and reduced once per attack, so neither the batch size nor the summation order changes
    the result; the only host syncs are one per attack, at the end.
    """
    return evaluate_samples(model, split, config, progress, per_sample=False)[0]


def evaluate_samples(model: nn.Module, split: Split, config: EvalConfig, progress=None, *,
                     per_sample: bool = True) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """``(summary, samples)``: ``evaluate``'s table and, with ``per_sample``, one row per
    (attack, sample) with columns ``SAMPLE_COLUMNS`` (attacks in order, samples in split
    order): the sample's dataset index (``Split.index``), the label scored (``split.y``),
    the predicted class at the (attacked) input, ``robust`` (prediction == label) and the
    CE there. Both come from the same per-sample vectors, so per attack the mean of
    ``robust`` is ``accuracy`` and the mean of ``loss`` is ``loss``."""
    device, _ = model_device_dtype(model)
    n = len(split)
    if n == 0:
        raise AtprobeError("the evaluation split is empty")
    samples = []
    labels = split.y.to(device)
    for spec in config.attacks:
        predictions = torch.zeros(n, dtype=torch.int64, device=device)
        losses = torch.zeros(n, dtype=torch.float64, device=device)
        for b in attacked_batches(model, split, spec.config, seed=config.seed, batch_size=config.batch_size,
                                  amp=config.amp, progress=progress):
            predictions[b.rows] = b.logits.argmax(1)
            losses[b.rows] = ce(b.logits, b.y).double()
        samples.append(pd.DataFrame({
            "attack": spec.name, "index": split.index.cpu().numpy(), "label": labels.cpu().numpy(),
            "prediction": predictions.cpu().numpy(), "robust": (predictions == labels).cpu().numpy(),
            "loss": losses.cpu().numpy(),
        }, columns=SAMPLE_COLUMNS))
    rows = pd.concat(samples, ignore_index=True)
    summary = summarize_samples(rows, [attack_fields(spec) for spec in config.attacks])
    return summary, (rows if per_sample else None)


def attack_fields(spec) -> dict:
    """The columns of an attack's summary row besides its counts: ``attack, norm, eps,
    alpha, steps, restarts`` (JSON values: a ``--shard`` part records them for the merge)."""
    return {"attack": spec.name, "norm": spec.norm, "eps": spec.eps, "alpha": spec.alpha, "steps": spec.steps,
            "restarts": spec.restarts}


def summarize_samples(samples: pd.DataFrame, attacks: Sequence[Mapping]) -> pd.DataFrame:
    """The summary (``EVAL_COLUMNS``) of per-sample rows (``SAMPLE_COLUMNS``, one block of
    equal size per attack, in the order of ``attacks``, each :func:`attack_fields`):
    ``accuracy`` = mean of ``robust``, ``loss`` = mean of ``loss``, summed in float64 on
    the CPU, so one process, a ``torchrun`` job and merged parts give the same bits."""
    n = len(samples) // max(len(attacks), 1)
    rows = []
    for i, fields in enumerate(attacks):
        block = samples.iloc[i * n:(i + 1) * n]
        correct = torch.from_numpy(block["robust"].to_numpy(dtype=bool, copy=True))
        loss = torch.from_numpy(block["loss"].to_numpy(dtype="float64", copy=True))
        rows.append({**fields, "n": n, "accuracy": correct.sum().item() / n, "loss": loss.sum().item() / n})
    return pd.DataFrame(rows, columns=EVAL_COLUMNS)
