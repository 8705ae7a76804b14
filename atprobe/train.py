"""The adversarial-training core: PGD-AT, TRADES, fast AT, clean mixing, temporal
ensembling and random labels, on device-resident data.

``train(config, out_dir)`` runs one training and writes a run directory
(``docs/training.md`` lists the files) through a ``Trainer``, one method per phase
(setup, resume, epoch, evaluate_and_select, save). The hot loop keeps every running
metric on the device; the host synchronizes once per epoch (evaluation and checkpointing).
Schedules live in ``atprobe.schedules``, the ``torchrun`` helpers in ``atprobe.distributed``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from atprobe import awp, objectives
from atprobe.attacks import PGDConfig, fgsm_rs_config, parse_attack, pgd
from atprobe.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from atprobe.data import DATASETS, NUM_CLASSES, Batch, Dataset, Split, iterate_batches, load_dataset
from atprobe.data.batches import check_extra_fraction, iterate_mixed_batches
from atprobe.data.memmap import ExtraData, MappedRows, image_rows, load_extra_data
from atprobe.distributed import DistContext, MultiForward, ddp_wrapped, distributed_context
from atprobe.errors import AtprobeError, check_choice, check_seed
from atprobe.evaluate import EvalConfig, evaluate
from atprobe.io import run_meta, write_json, write_table
from atprobe.models import build_model, canonical_arch
from atprobe.objectives import attack_loss, full_precision
from atprobe.outputs import (
    ASIDE_SUFFIX,
    check_new_directory,
    check_outputs,
    inside,
    is_run_directory,
    named_path,
    replace_directory,
)
from atprobe.runtime import autocast, make_generator, module_mode, prepare_model, set_determinism
from atprobe.schedules import awp_active, learning_rate, mix_gamma, sat_active, swa_due, te_active, te_weight
from atprobe.starts import Starts
from atprobe.swa import WeightAverage
from atprobe.threat import ThreatModel

METHODS = ("standard", "pgd_at", "trades", "fgsm_rs")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("piecewise", "cosine", "constant")
RAMPS = ("linear", "sigmoid")
ATTACK_MODES = ("eval", "train")
TE_TRADES_INPUTS = ("natural", "adversarial")


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run (``atprobe train --help`` documents each).

    Options given as ``None`` are resolved by ``resolved()`` to defaults that depend on
    others (eps on the norm, ramp epochs on ``epochs``); a run stores the resolved form.
    """

    arch: str = "cnn-small"
    dataset: str = "synthetic"
    data_dir: str | None = None
    download: bool = False
    synthetic_seed: int = 0
    method: str = "pgd_at"
    epochs: int = 200
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None  # default: 0.1 (SGD) or 1e-3 (Adam, PyTorch's default)
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    weight_decay: float | None = None  # default: 5e-4 (SGD) or 0 (Adam, PyTorch's default)
    schedule: str = "piecewise"
    milestones: tuple[int, ...] | None = None  # default: 50% and 75% of epochs (100, 150 of 200)
    lr_decay: float = 0.1
    augment: bool = True
    dropout: float = 0.0
    label_noise: float = 0.0
    label_seed: int = 0
    threat: ThreatModel = ThreatModel()  # the training attack's budget: 8/255 (linf) or 128/255 (l2), step eps/4
    attack_mode: str = "eval"
    beta: float = 6.0
    mix_clean: bool = False
    mix_epochs: int | None = None  # gamma reaches 1 here; default epochs // 2
    mix_ramp: str = "linear"
    te: bool = False
    te_eta: float = 0.9
    te_weight: float | None = None  # default TE_REG_WEIGHT / classes: the official 300 * mean over classes
    te_start: int | None = None  # default 45% of epochs (90 of 200)
    te_end: int | None = None  # default 75% of epochs (150 of 200)
    te_trades_input: str = "natural"
    label_smoothing: float = 0.0  # Pang et al. 2021: 1 - s on the label, s / (K - 1) elsewhere (outer CE terms)
    sat: bool = False  # self-adaptive training (Huang et al. 2020) on pgd_at or trades
    sat_momentum: float = 0.9
    sat_start: int | None = None  # epoch number (from 1) where the targets start adapting; default 45% of epochs
    swa_start: int | None = None  # average the weights after every epoch from this epoch number on (None: no SWA)
    teacher_robust: str | None = None  # KD (Chen et al. 2021): an adversarially trained teacher checkpoint
    teacher_natural: str | None = None  # ... and a standard-trained one; both or neither
    kd_temperature: float = 2.0
    kd_weights: tuple[float, float, float] = (0.3, 0.1, 0.6)  # CE, natural teacher, robust teacher
    awp_gamma: float = 0.0  # adversarial weight perturbation (Wu et al. 2020): layer-wise relative size; 0: off
    awp_warmup: int = 0  # AWP from this 0-based epoch on
    coteach: bool = False  # Co-teaching (Han et al. 2018) adapted to PGD-AT: two networks, each on the other's picks
    forget_rate: float = 0.2  # Co-teaching: the fraction of each batch dropped, after the ramp
    forget_gradual: int = 10  # Co-teaching: epochs of the ramp from 0 to forget_rate
    forget_exponent: float = 1.0
    val_size: int = 0
    val_seed: int = 0
    train_n: int = 0  # train on the first N training samples only (0 = all)
    extra_data: str | None = None  # generated images + labels (.npz or folder), memory-mapped, mixed into each batch
    extra_fraction: float | None = None  # share of each batch from extra_data; default 0.7 (Wang et al. 2023)
    extra_budget_mb: float | None = None  # extra images up to this size live on the device; default: automatic
    eval_n: int = 0  # test/val samples of the curves and of best.pt's selection (0 = the whole split)
    train_eval_n: int | None = None  # train samples of the curves (0 = all); default eval_n if given, else 1000
    eval_attack: str = "pgd10"  # robust metric of the curves and of best.pt
    eval_every: int = 1
    save_every: int = 0
    log_grad_ratio: int = 0
    seed: int = 0
    amp: bool = True
    compile: bool = False
    init_from: str | None = None  # start from this checkpoint's weights (fresh optimizer, epoch 0)
    preset: str | None = None  # the atprobe.presets entry the run was built from (a record)

    def resolved(self, num_classes: int | None = None) -> TrainConfig:
        """Fill the dependent defaults and validate everything (AtprobeError on nonsense).

        ``te_weight`` defaults to ``TE_REG_WEIGHT / C`` for ``C`` classes (``num_classes``, or the
        dataset's known count; an npz dataset's is known once it is read, so the trainer
        resolves it again then)."""
        c = self
        c._check_options()
        milestones = c.milestones if c.milestones is not None else (c.epochs // 2, (3 * c.epochs) // 4)
        if any(m < 0 or m > c.epochs for m in milestones) or list(milestones) != sorted(milestones):
            raise AtprobeError(f"milestones must be increasing epochs in [0, {c.epochs}], got {list(milestones)}")
        te_start = c.te_start if c.te_start is not None else round(0.45 * c.epochs)
        sat_start = c.sat_start if c.sat_start is not None else round(0.45 * c.epochs)
        if c.swa_start is not None and not 1 <= c.swa_start <= c.epochs:
            raise AtprobeError(f"swa-start must be an epoch number in [1, {c.epochs}], got {c.swa_start}")
        te_end = c.te_end if c.te_end is not None else round(0.75 * c.epochs)
        if c.te and te_end < te_start:
            raise AtprobeError(f"TE ramp ends (epoch {te_end}) before it starts (epoch {te_start})")
        mix_epochs = c.mix_epochs if c.mix_epochs is not None else c.epochs // 2
        if mix_epochs < 0:
            raise AtprobeError(f"mix-epochs must be >= 0, got {mix_epochs}")
        te_weight = c.te_weight
        if te_weight is None and (num_classes or NUM_CLASSES.get(c.dataset)):
            te_weight = TE_REG_WEIGHT / (num_classes or NUM_CLASSES[c.dataset])
        train_eval_n = c.train_eval_n if c.train_eval_n is not None else (c.eval_n or TRAIN_CURVE_N)
        extra_fraction = c.extra_fraction if c.extra_fraction is not None or c.extra_data is None \
            else EXTRA_FRACTION_DEFAULT
        out = replace(
            c,
            arch=canonical_arch(c.arch),
            lr=float(c.lr if c.lr is not None else OPTIMIZER_DEFAULTS[c.optimizer]["lr"]),
            weight_decay=float(c.weight_decay if c.weight_decay is not None
                               else OPTIMIZER_DEFAULTS[c.optimizer]["weight_decay"]),
            train_eval_n=int(train_eval_n),
            milestones=tuple(int(m) for m in milestones),
            te_start=int(te_start),
            sat_start=int(sat_start),
            kd_weights=tuple(float(w) for w in c.kd_weights),
            te_end=int(te_end),
            mix_epochs=int(mix_epochs),
            te_weight=None if te_weight is None else float(te_weight),
            extra_fraction=None if extra_fraction is None else float(extra_fraction),
        )
        parse_attack(out.eval_attack, out.threat)
        return out

    def _check_options(self) -> None:
        """The checks of options that depend on no default (AtprobeError on nonsense)."""
        c = self
        check_choice(c.method, METHODS, "method")
        check_choice(c.dataset, DATASETS, "dataset")
        check_choice(c.schedule, SCHEDULES, "schedule")
        check_choice(c.optimizer, OPTIMIZERS, "optimizer")
        if c.optimizer == "adam" and c.nesterov:
            raise AtprobeError("--nesterov is an SGD option; Adam has none")
        if not isinstance(c.threat, ThreatModel):
            raise AtprobeError(f"threat must be an atprobe.threat.ThreatModel, got {c.threat!r}")
        check_choice(c.mix_ramp, RAMPS, "ramp")
        check_choice(c.attack_mode, ATTACK_MODES, "attack mode")
        check_choice(c.te_trades_input, TE_TRADES_INPUTS, "TE-TRADES input")
        if c.epochs < 1:
            raise AtprobeError(f"epochs must be >= 1, got {c.epochs}")
        if c.batch_size < 1:
            raise AtprobeError(f"batch size must be >= 1, got {c.batch_size}")
        for name in ("lr", "weight_decay", "beta", "te_weight"):
            value = getattr(c, name)
            if value is None and name in ("te_weight", "lr", "weight_decay"):
                continue  # resolved from the number of classes or the optimizer
            if not (math.isfinite(value) and value >= 0):
                raise AtprobeError(f"{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if not 0 <= c.momentum < 1:
            raise AtprobeError(f"momentum must be in [0, 1), got {c.momentum}")
        if not 0 < c.lr_decay <= 1:
            raise AtprobeError(f"lr-decay must be in (0, 1], got {c.lr_decay}")
        if not 0 <= c.te_eta < 1:
            raise AtprobeError(f"te-eta must be in [0, 1), got {c.te_eta}")
        if c.threat.steps < 1 and c.method in ("pgd_at", "trades"):
            raise AtprobeError(f"steps must be >= 1 for {c.method}, got {c.threat.steps}")
        if c.te and c.method not in ("pgd_at", "trades"):
            raise AtprobeError(f"--te works with pgd_at or trades, not {c.method}")
        if c.mix_clean and c.method not in ("pgd_at", "fgsm_rs"):
            raise AtprobeError(f"--mix-clean mixes clean CE into pgd_at or fgsm_rs, not {c.method}")
        self._check_remedies()
        for name in ("eval_n", "train_eval_n", "val_size", "train_n", "save_every", "log_grad_ratio"):
            if (getattr(c, name) or 0) < 0:
                raise AtprobeError(f"{name.replace('_', '-')} must be >= 0, got {getattr(c, name)}")
        for name in ("seed", "label_seed", "val_seed", "synthetic_seed"):
            check_seed(getattr(c, name), name.replace("_", "-"))
        if c.eval_every < 1:
            raise AtprobeError(f"eval-every must be >= 1, got {c.eval_every}")
        self._check_extra_options()

    def _check_remedies(self) -> None:
        """Label smoothing, SAT, KD, SWA, AWP and Co-teaching: their ranges and the combinations they define."""
        c = self
        if not (isinstance(c.label_smoothing, (int, float)) and 0 <= c.label_smoothing < 1):
            raise AtprobeError(f"label-smoothing must be in [0, 1), got {c.label_smoothing}")
        if not 0 <= c.sat_momentum < 1:
            raise AtprobeError(f"sat-momentum must be in [0, 1), got {c.sat_momentum}")
        if c.sat:
            if c.method not in ("pgd_at", "trades"):
                raise AtprobeError(f"--sat works with pgd_at or trades, not {c.method}")
            for flag, on in (("--te", c.te), ("--label-smoothing", c.label_smoothing > 0),
                             ("--extra-data", c.extra_data is not None), ("--mix-clean", c.mix_clean)):
                if on:
                    raise AtprobeError(f"--sat adapts its own per-sample targets; it does not combine with {flag}")
        if (c.teacher_robust is None) != (c.teacher_natural is None):
            raise AtprobeError("knowledge distillation needs both teachers: --teacher-robust CKPT and "
                               "--teacher-natural CKPT")
        if c.teacher_robust is not None:
            if c.method != "pgd_at" or c.mix_clean or c.te or c.sat:
                raise AtprobeError("knowledge distillation (--teacher-robust/--teacher-natural) works with plain "
                                   "pgd_at (no --mix-clean, --te or --sat)")
            if not (math.isfinite(c.kd_temperature) and c.kd_temperature > 0):
                raise AtprobeError(f"kd-temperature must be a finite number > 0, got {c.kd_temperature}")
            weights = tuple(c.kd_weights)
            if len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights):
                raise AtprobeError(f"kd-weights must be three finite numbers >= 0 (CE, natural, robust), "
                                   f"got {list(weights)}")
        if not (math.isfinite(c.awp_gamma) and c.awp_gamma >= 0):
            raise AtprobeError(f"awp-gamma must be a finite number >= 0, got {c.awp_gamma}")
        if c.awp_warmup < 0:
            raise AtprobeError(f"awp-warmup must be >= 0, got {c.awp_warmup}")
        if c.awp_gamma > 0 and c.method not in ("pgd_at", "trades"):
            raise AtprobeError(f"--awp-gamma perturbs the weights of pgd_at or trades, not {c.method}")
        if not 0 <= c.forget_rate < 1:
            raise AtprobeError(f"forget-rate must be in [0, 1), got {c.forget_rate}")
        if c.forget_gradual < 1 or not (math.isfinite(c.forget_exponent) and c.forget_exponent > 0):
            raise AtprobeError(f"forget-gradual must be >= 1 and forget-exponent > 0, got {c.forget_gradual}, "
                               f"{c.forget_exponent}")
        if c.coteach:
            if c.method != "pgd_at":
                raise AtprobeError(f"--coteach is adapted to pgd_at, not {c.method}")
            for flag, on in (("--te", c.te), ("--sat", c.sat), ("--mix-clean", c.mix_clean),
                             ("--teacher-robust", c.teacher_robust is not None), ("--awp-gamma", c.awp_gamma > 0),
                             ("--swa-start", c.swa_start is not None), ("--extra-data", c.extra_data is not None),
                             ("--log-grad-ratio", c.log_grad_ratio > 0)):
                if on:
                    raise AtprobeError(f"--coteach trains two networks on each other's small-loss samples; it does "
                                       f"not combine with {flag}")

    def _check_extra_options(self) -> None:
        c = self
        if c.extra_data is None:
            for name in ("extra_fraction", "extra_budget_mb"):
                if getattr(c, name) is not None:
                    raise AtprobeError(f"--{name.replace('_', '-')} needs --extra-data FILE")
            return
        if c.extra_fraction is not None:
            check_extra_fraction(c.extra_fraction)
        if c.te:
            raise AtprobeError("--te keeps an ensemble per original sample; it does not work with --extra-data")
        if c.extra_budget_mb is not None and not (math.isfinite(c.extra_budget_mb) and c.extra_budget_mb >= 0):
            raise AtprobeError(f"extra-budget-mb must be a finite number >= 0, got {c.extra_budget_mb}")

    def attack_config(self) -> PGDConfig:
        """The inner maximization of this method (training attack) under ``threat``:
        PGD on CE (uniform start) for pgd_at; PGD on TRADES' KL to the natural prediction
        from x + 0.001 N(0, I) for trades; FGSM-RS (one step of 1.25 eps) for fgsm_rs."""
        eval_mode = self.attack_mode == "eval"
        if self.method == "fgsm_rs":
            return replace(fgsm_rs_config(self.threat), eval_mode=eval_mode)
        return self.threat.attack("kl" if self.method == "trades" else "ce", eval_mode=eval_mode)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones) if self.milestones is not None else None
        d["kd_weights"] = list(self.kd_weights)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        # Runs written before the threat model was one field stored its parts flat.
        legacy = {k: d.pop(k) for k in _LEGACY_THREAT_KEYS if k in d}
        if "threat" in d or legacy:
            d["threat"] = ThreatModel(**{**legacy, **(d.get("threat") or {})})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AtprobeError(f"unknown training options in config: {', '.join(unknown)}")
        if d.get("milestones") is not None:
            d["milestones"] = tuple(d["milestones"])
        if d.get("kd_weights") is not None:
            d["kd_weights"] = tuple(d["kd_weights"])
        return cls(**d)


_LEGACY_THREAT_KEYS = ("norm", "eps", "alpha", "steps")

#: The learning rate and weight decay of each optimizer unless given: SGD as the paper's Sec. 5
#: (and the official ``train_te.py``); Adam with PyTorch's ``torch.optim.Adam`` defaults (lr 1e-3,
#: no weight decay), the official code having no Adam of its own (App. A.2 names it only).
OPTIMIZER_DEFAULTS: dict[str, dict[str, float]] = {"sgd": {"lr": 0.1, "weight_decay": 5e-4},
                                                    "adam": {"lr": 1e-3, "weight_decay": 0.0}}
#: Adam's moment coefficients and epsilon: PyTorch's defaults (Kingma & Ba's).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
#: The share of each batch drawn from --extra-data unless given: 0.7, Wang et al. (2023)'s
#: ``--unsup-fraction`` for CIFAR-10 with 1M-20M generated images (Gowal et al. 2021 report the same share).
EXTRA_FRACTION_DEFAULT = 0.7
#: Training samples in the curves unless ``train_eval_n`` or ``eval_n`` says otherwise.
TRAIN_CURVE_N = 1000
#: What best.pt and the curves record of ``init_from``.
INIT_KEYS = ("init_from", "init_sha256", "init_epoch")
#: ``train --overwrite OUT`` writes the new run to OUT + this suffix until it is complete.
OVERWRITE_SUFFIX = ".overwrite"

#: The official TE code's ``reg_weight``: its penalty is ``300 * mse(softmax, target)``, a mean
#: over the C classes, i.e. ``300 / C`` times the per-sample sum (30 on CIFAR-10, the paper's
#: Eq. 7 value; 3 on CIFAR-100).
TE_REG_WEIGHT = 300.0

# ---------------------------------------------------------------------------- one step

def _forward(model: nn.Module, *xs: Tensor) -> tuple[Tensor, ...]:
    if isinstance(model, MultiForward) or isinstance(getattr(model, "module", None), MultiForward):
        return model(*xs)
    return tuple(model(x) for x in xs)


@dataclass
class StepOutput:
    loss: Tensor  # scalar objective to minimize
    logits: Tensor  # logits whose accuracy the running train metric reports
    x_adv: Tensor | None = None  # the training attack's examples (None for standard)
    parts: dict[str, Tensor] = field(default_factory=dict)  # per-batch means of the parts
    per_sample: Tensor | None = None  # the objective of each sample (``loss`` is their mean)


@dataclass(frozen=True)
class Teachers:
    """The two teachers of knowledge distillation (Chen et al. 2021), in eval mode."""

    natural: nn.Module
    robust: nn.Module


#: ``probs of this process's rows -> (their SAT targets, their SAT weights)`` (the trainer's).
SatTargets = Callable[[Tensor], tuple[Tensor, Tensor]]


def training_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: TrainConfig,
    *,
    epoch: int,
    starts: Starts | None = None,
    te_target: Tensor | None = None,
    amp: bool = True,
    attack_model: nn.Module | None = None,
    x_adv: Tensor | None = None,
    sat: SatTargets | None = None,
    teachers: Teachers | None = None,
) -> StepOutput:
    """The objective of ``config.method`` on one batch (model in train mode for the update).

    standard: mean CE(f(x), y)
    pgd_at:   mean CE(f(x'), y); with --mix-clean (Eq. 6): (1-g) CE(f(x), y) + g CE(f(x'), y)
    fgsm_rs:  as pgd_at with x' from FGSM with random start
    trades:   mean CE(f(x), y) + beta KL(f(x) || f(x'))
    TE (Eq. 7) adds w ||softmax(f(.)) - p_hat||^2 to the objective and to the attack's loss.
    Label smoothing scores the CE terms against :func:`objectives.smoothed_labels`; SAT (``sat``,
    once active) against the adaptive targets, each sample weighted; KD (``teachers``) is
    ``c_ce CE(f(x'), y) + c_nat KD(f(x'), t_nat(x')) + c_rob KD(f(x'), t_rob(x'))``. The attacks
    always use the hard labels.

    ``starts`` keys the attack's random starts (``training_starts``: seed, epoch and the
    samples' dataset indices, so a sample's start does not depend on its batch or on the
    number of processes); ``attack_model`` is the unwrapped module to attack (DDP's wrapper is only
    for the forward whose gradient is reduced). ``x_adv``: the training examples, already
    crafted (AWP crafts them at the unperturbed weights before the update's forward).
    """
    attacker = model if attack_model is None else attack_model
    device = x.device
    w = te_weight(config, epoch) if te_target is not None else 0.0
    if config.method == "standard":
        with autocast(device, amp):
            (logits,) = _forward(model, x)
        loss = _outer_ce(logits, y, config, None).mean()
        return StepOutput(loss, logits, None, {"ce": loss.detach()})

    if x_adv is None:
        x_adv = _training_attack(attacker, x, y, config, w=w, te_target=te_target, starts=starts, amp=amp)
    with autocast(device, amp):
        if config.method == "trades" or (config.mix_clean and mix_gamma(config, epoch) < 1):
            logits_nat, logits_adv = _forward(model, x, x_adv)
        else:
            (logits_adv,) = _forward(model, x_adv)
            logits_nat = None
    parts: dict[str, Tensor] = {}
    adaptive = None
    if sat is not None:  # SAT's targets from the natural prediction (TRADES: the loss's own forward)
        if logits_nat is None:
            with torch.no_grad(), module_mode(attacker, False), autocast(device, amp):
                logits_for_target = attacker(x)
        else:
            logits_for_target = logits_nat.detach()
        adaptive = sat(F.softmax(full_precision(logits_for_target), dim=1))
    per_sample, te_logits = _method_objective(config, epoch, y, logits_nat, logits_adv, parts, adaptive)
    if teachers is not None:
        per_sample = _distilled(config, x_adv, logits_adv, per_sample, teachers, amp, parts)
    if w > 0:
        penalty = objectives.te_penalty(te_logits, te_target)
        per_sample = per_sample + w * penalty
        parts["te"] = penalty.mean().detach()
    return StepOutput(per_sample.mean(), logits_adv, x_adv, parts, per_sample)


def _outer_ce(logits: Tensor, y: Tensor, config: TrainConfig, adaptive: tuple[Tensor, Tensor] | None) -> Tensor:
    """The per-sample CE term of the objective: on the hard labels, the smoothed ones
    (``label_smoothing``) or SAT's weighted adaptive targets (``adaptive``)."""
    if adaptive is not None:
        target, weight = adaptive
        return weight * objectives.soft_ce(logits, target)
    if config.label_smoothing > 0:
        return objectives.soft_ce(logits, objectives.smoothed_labels(y, logits.shape[1], config.label_smoothing))
    return objectives.ce(logits, y)


def _distilled(config: TrainConfig, x_adv: Tensor, logits_adv: Tensor, ce_adv: Tensor, teachers: Teachers,
               amp: bool, parts: dict[str, Tensor]) -> Tensor:
    """KD's per-sample objective (Chen et al. 2021): the weighted CE of the adversarial
    examples and the distillation terms of both teachers on the same examples."""
    with torch.no_grad(), autocast(x_adv.device, amp):
        natural, robust = teachers.natural(x_adv), teachers.robust(x_adv)
    t = config.kd_temperature
    kd_nat = objectives.distillation(logits_adv, natural, t)
    kd_rob = objectives.distillation(logits_adv, robust, t)
    parts.update(kd_natural=kd_nat.mean().detach(), kd_robust=kd_rob.mean().detach())
    c_ce, c_nat, c_rob = config.kd_weights
    return c_ce * ce_adv + c_nat * kd_nat + c_rob * kd_rob


def _training_attack(attacker: nn.Module, x: Tensor, y: Tensor, config: TrainConfig, *, w: float,
                     te_target: Tensor | None, starts: Starts | None, amp: bool) -> Tensor:
    """x' of the method's inner maximization, with TE's term in the attack's loss when ``w > 0``."""
    attack = config.attack_config()
    if config.method == "trades":
        with torch.no_grad(), module_mode(attacker, not attack.eval_mode), autocast(x.device, amp):
            natural_for_attack = attacker(x)
        inner = attack_loss("kl", natural_logits=natural_for_attack)
    else:
        inner = attack_loss("ce", y)
    loss_fn = inner
    if w > 0:
        # With TE the official attack maximizes beta * KL + w * penalty (TRADES) or CE + w * penalty:
        # the KL's weight matters once another term is added.
        scale = config.beta if config.method == "trades" else 1.0
        loss_fn = lambda z: scale * inner(z) + w * objectives.te_penalty(z, te_target)  # noqa: E731
    return pgd(attacker, x, y, attack, starts=starts, loss_fn=loss_fn, amp=amp)


def _method_objective(config: TrainConfig, epoch: int, y: Tensor, logits_nat: Tensor | None, logits_adv: Tensor,
                      parts: dict[str, Tensor], adaptive: tuple[Tensor, Tensor] | None = None
                      ) -> tuple[Tensor, Tensor]:
    """The per-sample objective of an AT method before TE and KD, and the logits TE's outer
    term uses; the batch means of its parts go into ``parts``. The CE terms are
    :func:`_outer_ce` (hard, smoothed or SAT's labels); TRADES' KL is never reweighted."""
    if config.method == "trades":
        ce_nat = _outer_ce(logits_nat, y, config, adaptive)
        kl = objectives.trades_kl(logits_nat, logits_adv)
        parts.update(ce=ce_nat.mean().detach(), kl=kl.mean().detach())
        te_logits = logits_nat if config.te_trades_input == "natural" else logits_adv
        return ce_nat + config.beta * kl, te_logits
    ce_adv = _outer_ce(logits_adv, y, config, adaptive)
    parts["ce_adv"] = ce_adv.mean().detach()
    if logits_nat is None:
        return ce_adv, logits_adv
    gamma = mix_gamma(config, epoch)  # Eq. 6
    ce_nat = _outer_ce(logits_nat, y, config, adaptive)
    parts["ce"] = ce_nat.mean().detach()
    return (1 - gamma) * ce_nat + gamma * ce_adv, logits_adv


#: The stream of training's random starts (another draw than any probe's, which use none).
TRAIN_STREAM = 0x7EA1
#: The stream of SWA's BatchNorm passes (their batch order and augmentation).
SWA_STREAM = 0x5A7A


def training_starts(config: TrainConfig, epoch: int, ids: Tensor) -> Starts:
    """The keys of the training attack's random starts in ``epoch``: a function of
    (seed, epoch, sample index), fresh every epoch, the same whatever the batch or the
    number of processes."""
    return Starts(config.seed, ids, (TRAIN_STREAM, int(epoch)))


# ---------------------------------------------------------------------------- grad ratio


def _flat_grad(loss: Tensor, params: list[Tensor]) -> Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def grad_ratio_parts(
    model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, config: TrainConfig, amp: bool = True
) -> dict[str, float]:
    """Parameter-gradient norms of the objective's parts on one batch (Fig. 3(b)).

    PGD-AT (and fgsm_rs): ||grad CE(x)||, ||grad CE(x')||, ||grad R|| with R = CE(x') - CE(x),
    ratio = ||grad R|| / ||grad CE(x)||. TRADES: ||grad CE(x)||, ||grad beta KL||,
    ratio = ||grad beta KL|| / ||grad CE(x)||. Computed in the model's current mode on copies of
    its buffers, so logging does not change the training run.
    """
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    # Forward through copies of the buffers: BatchNorm updates the copies, so logging
    # neither changes the run nor bumps the versions autograd saved for the real step.
    state = {**{k: b.clone() for k, b in model.named_buffers()}, **named}
    with autocast(x.device, amp):
        logits_nat = functional_call(model, state, (x,))
        logits_adv = functional_call(model, state, (x_adv,))
    g_ce = _flat_grad(objectives.ce(logits_nat, y).mean(), params)
    if config.method == "trades":
        g_kl = _flat_grad(config.beta * objectives.trades_kl(logits_nat, logits_adv).mean(), params)
        norms = {"grad_ce": g_ce.norm(), "grad_beta_kl": g_kl.norm()}
        norms["ratio"] = norms["grad_beta_kl"] / norms["grad_ce"]
    else:
        g_adv = _flat_grad(objectives.ce(logits_adv, y).mean(), params)
        norms = {"grad_ce": g_ce.norm(), "grad_ce_adv": g_adv.norm(), "grad_r": (g_adv - g_ce).norm()}
        norms["ratio"] = norms["grad_r"] / norms["grad_ce"]
    return {k: float(v) for k, v in norms.items()}


# ---------------------------------------------------------------------------- the run


class RunState:
    """Everything that changes during a run and must survive a resume."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data_gen: torch.Generator,
                 ensemble: Tensor | None, sat_targets: Tensor | None = None, average: WeightAverage | None = None):
        self.model = model
        self.optimizer = optimizer
        self.data_gen = data_gen
        self.ensemble = ensemble
        self.sat_targets = sat_targets  # SAT: one target distribution per training sample
        self.average = average  # SWA: the running average of the weights
        self.epoch = 0  # completed epochs
        self.best: tuple[float, float] | None = None  # (robust acc, natural acc) on the selection split
        self.best_epoch: int | None = None

    def rng_state(self) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data": self.data_gen.get_state(),
        }

    def load_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if torch.cuda.is_available() and state.get("cuda"):
            torch.cuda.set_rng_state_all(state["cuda"])
        self.data_gen.set_state(state["data"])




@dataclass
class EpochStats:
    """The running metrics of one epoch: sums on the device, read once when it ends."""

    loss_sum: Tensor
    correct: Tensor
    seen: int = 0
    lr: float = math.nan  # the learning rate of the epoch's last step

    @classmethod
    def zeros(cls, device: torch.device) -> EpochStats:
        return cls(torch.zeros((), device=device), torch.zeros((), dtype=torch.int64, device=device))

    def add(self, step: StepOutput, y: Tensor) -> None:
        self.loss_sum += step.loss.detach() * len(y)
        self.correct += (step.logits.detach().argmax(1) == y).sum()
        self.seen += len(y)

    def summed_over(self, ctx: DistContext) -> EpochStats:
        """The global epoch's metrics (this rank's own in one process)."""
        if ctx.world_size == 1:
            return self
        seen = torch.tensor(float(self.seen), device=self.loss_sum.device, dtype=torch.float64)
        totals = ctx.sum_over_ranks(torch.stack([self.loss_sum.double(), self.correct.double(), seen]))
        return EpochStats(totals[0], totals[1], int(totals[2].item()), self.lr)

    @property
    def objective(self) -> float:
        return self.loss_sum.item() / self.seen

    @property
    def running_acc(self) -> float:
        return self.correct.item() / self.seen


class StepCallback:
    """A hook into the epoch loop; it persists what it logs in the run directory."""

    def after_loss(self, iteration: int, epoch: int, x: Tensor, y: Tensor, step: StepOutput) -> None:
        """Called after each step's objective, before its update (this step's weights)."""

    def load(self, out: Path) -> None:
        """Take back what an interrupted run wrote (on resume)."""

    def write(self, out: Path, meta: Mapping[str, Any]) -> None:
        """Write what is logged so far (every epoch, before last.pt), with the run's ``meta``
        fields merged into its table's record."""


class GradRatioLog(StepCallback):
    """``--log-grad-ratio N``: ``grad_ratio_parts`` of the first N iterations, to gradratio.csv."""

    def __init__(self, model: nn.Module, config: TrainConfig):
        self.model = model  # the unwrapped module: the norms are of one process's batch
        self.config = config
        self.rows: list[dict[str, Any]] = []

    def after_loss(self, iteration: int, epoch: int, x: Tensor, y: Tensor, step: StepOutput) -> None:
        if iteration < self.config.log_grad_ratio and step.x_adv is not None:
            parts = grad_ratio_parts(self.model, x, step.x_adv, y, self.config, amp=self.config.amp)
            self.rows.append({"iteration": iteration, "epoch": epoch, "method": self.config.method, **parts})

    def load(self, out: Path) -> None:
        if (out / "gradratio.csv").is_file():
            self.rows = read_run_csv(out, "gradratio.csv").to_dict("records")

    def write(self, out: Path, meta: Mapping[str, Any]) -> None:
        if self.rows:
            write_table(pd.DataFrame(self.rows), out / "gradratio.csv",
                        {**run_meta(seed=self.config.seed, config=self.config.to_json()), **meta})


def _arch_kwargs(config: TrainConfig, data: Dataset) -> dict[str, Any]:
    return {"num_classes": data.num_classes, "dropout": config.dropout,
            "mean": list(data.mean), "std": list(data.std)}


def load_training_data(config: TrainConfig) -> Dataset:
    return load_dataset(
        config.dataset, config.data_dir, download=config.download,
        val_size=config.val_size, val_seed=config.val_seed,
        label_noise=config.label_noise, label_seed=config.label_seed,
        synthetic_seed=config.synthetic_seed,
    )


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The resolved config's optimizer: SGD (momentum, Nesterov) or Adam (``ADAM_BETAS``,
    ``ADAM_EPS``), weight decay as an L2 term in the gradient in both (PyTorch's ``weight_decay``).
    The learning rate schedule sets its lr every iteration."""
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                                weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                           weight_decay=config.weight_decay)


def _first(split: Split, n: int) -> Split:
    """The first ``n`` samples of ``split`` (0, or more than it has: all of it)."""
    return split if not n or n >= len(split) else split.subset(slice(0, n))


def _trained_split(config: TrainConfig, data: Dataset) -> Split:
    """The samples trained on: the train split, or its first ``--train-n``."""
    if not config.train_n:
        return data.train
    if config.train_n > len(data.train):
        raise AtprobeError(f"--train-n {config.train_n} is larger than the training split ({len(data.train)})")
    return data.train.subset(slice(0, config.train_n))


def _trained_labels(data: Dataset) -> Tensor:
    """The full vector of trained labels over the original train split (val rows included)."""
    labels = torch.empty(len(data.train) + (len(data.val) if data.val is not None else 0), dtype=torch.int64)
    labels[data.train.index] = data.train.y
    if data.val is not None:
        labels[data.val.index] = data.val.y
    return labels


def _curve_rows(epoch: int, split: str, df: pd.DataFrame) -> list[dict[str, Any]]:
    rows = []
    for r in df.itertuples():
        name = r.attack
        rows.append({"epoch": epoch, "split": split, "metric": f"{name}_acc", "value": r.accuracy})
        rows.append({"epoch": epoch, "split": split, "metric": f"{name}_loss", "value": r.loss})
    return rows


#: The columns of curves.csv, in order.
CURVE_COLUMNS = ["epoch", "split", "metric", "value"]
_RESTART = "start the run again with --out (a new directory)"


def _damaged(out: Path, name: str, why: str, fix: str = _RESTART) -> AtprobeError:
    return AtprobeError(f"cannot resume {out}: {name} is damaged ({why}); {fix}")


def read_run_csv(out: Path, name: str, columns: list[str] | None = None) -> pd.DataFrame:
    """``out/name``, a table the run wrote (atomically, so complete unless damaged since), or
    a one-line error naming the file: empty, cut short (no final newline), unparsable, or
    without ``columns``."""
    path = out / name
    raw = path.read_bytes()
    if not raw.strip():
        raise _damaged(out, name, "empty")
    if not raw.endswith(b"\n"):
        raise _damaged(out, name, "truncated: its last line is cut short")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise _damaged(out, name, f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}") from None
    if columns is not None and list(df.columns) != columns:
        raise _damaged(out, name, f"columns {list(map(str, df.columns))!r}, expected {columns!r}")
    return df


def _read_config(out: Path) -> TrainConfig:
    saved = out / "config.json"
    try:
        record = json.loads(saved.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _damaged(out, "config.json", f"not JSON: {exc}",
                       "restore it from a copy, or " + _RESTART) from None
    if not isinstance(record, dict):
        raise _damaged(out, "config.json", f"it holds a {type(record).__name__}, not the options of a run")
    try:
        return TrainConfig.from_json(record).resolved()
    except (AtprobeError, TypeError, ValueError, KeyError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _damaged(out, "config.json", why[:160], "restore it from a copy, or " + _RESTART) from None


def saved_config(out: Path) -> TrainConfig:
    """The configuration of the run to resume in ``out``, checked with what the run left (a
    one-line AtprobeError naming the file if there is none or one is damaged): config.json,
    last.pt (its own, with the resume state: the training options it records are
    config.json's) and curves.csv (a row for every epoch up to last.pt's)."""
    saved = out / "config.json"
    if not saved.is_file():
        raise AtprobeError(f"cannot resume {out}: no config.json there (is it a run directory?)")
    config = _read_config(out)
    if not (out / "last.pt").is_file():
        raise AtprobeError(f"cannot resume {out}: no last.pt (no epoch finished yet); start it again instead")
    try:
        last = load_checkpoint(out / "last.pt")
    except AtprobeError as exc:
        raise AtprobeError(f"cannot resume {out}: {exc}; put this run's last.pt back, or {_RESTART}") from None
    own = config.to_json()
    recorded = last.train_config
    # An option added after the run was written is absent from its last.pt: at its default it differs in nothing.
    defaults = TrainConfig().to_json()
    differ = [k for k in own if (recorded[k] != own[k] if k in recorded else own[k] != defaults.get(k))]
    if differ:
        shown = "; ".join(f"{k} {recorded.get(k)!r} in last.pt, {own[k]!r} in config.json" for k in differ[:3])
        raise AtprobeError(f"cannot resume {out}: last.pt is from another run, its training options are not "
                           f"config.json's ({shown}); put this run's last.pt back, or {_RESTART}")
    missing = [k for k in ("optimizer", "rng") if not isinstance(last.raw.get(k), Mapping)]
    if config.te and not isinstance((last.raw.get("extra") or {}).get("te_ensemble"), torch.Tensor):
        missing.append("te_ensemble")
    if missing:
        raise _damaged(out, "last.pt", f"no {', '.join(missing)}: a checkpoint without resume state, not the "
                       "run's last.pt", f"put this run's last.pt back, or {_RESTART}")
    if (out / "curves.csv").is_file():
        curves = read_run_csv(out, "curves.csv", CURVE_COLUMNS)
        logged = set(pd.to_numeric(curves["epoch"], errors="coerce").dropna().astype(int))
        lacking = [e for e in range(1, int(last.epoch or 0) + 1) if e not in logged]
        if lacking:
            raise _damaged(out, "curves.csv", f"no rows of epoch {lacking[0]}, though last.pt has epoch {last.epoch}")
    return config


class Trainer:
    """One training run, phase by phase: ``__init__`` (setup), ``resume`` or
    ``start_run_dir``, then ``run``: per epoch ``epoch`` (the updates), ``log_epoch``,
    ``evaluate_and_select`` and ``save`` (rank 0), and ``final.pt`` at the end."""

    def __init__(self, config: TrainConfig, out: Path, ctx: DistContext, device: torch.device,
                 meta: Mapping[str, Any] | None = None):
        config = config.resolved()
        self.meta = dict(meta or {})  # merged into every table's record (e.g. the command that ran it)
        if config.batch_size < ctx.world_size:
            raise AtprobeError(f"batch size {config.batch_size} is smaller than the {ctx.world_size} processes")
        set_determinism(config.seed)
        self.config, self.out, self.ctx, self.device = config, out, ctx, device
        self.data = load_training_data(config)
        if config.te_weight is None:  # an npz dataset's class count is known only now
            config = self.config = config.resolved(self.data.num_classes)
        train_split = _trained_split(config, self.data)  # checked before anything is written
        self.labels = _trained_labels(self.data)
        self.model = prepare_model(build_model(config.arch, **_arch_kwargs(config, self.data)), device)
        # Co-teaching's second network: the next draw of the same seeded stream (the official
        # code builds its two networks one after the other)
        self.peer = (prepare_model(build_model(config.arch, **_arch_kwargs(config, self.data)), device)
                     if config.coteach else None)
        self.optimizer = build_optimizer(self.model, config)
        self.peer_optimizer = build_optimizer(self.peer, config) if self.peer is not None else None
        ensemble = torch.zeros(len(self.labels), self.data.num_classes, device=device) if config.te else None
        sat_targets = (F.one_hot(self.labels.long(), self.data.num_classes).float().to(device) if config.sat
                       else None)  # SAT's targets start one-hot (the official soft_labels)
        average = WeightAverage(self.model) if config.swa_start is not None else None
        # Attack starts are keyed (training_starts); only the data order and augmentation draw here.
        self.state = RunState(self.model, self.optimizer, make_generator(config.seed, device), ensemble,
                              sat_targets, average)
        self.teachers = self._load_teachers()
        self.curves: list[dict[str, Any]] = []
        # Only rank 0 writes files, so only it logs (the grad ratio of its own rows).
        self.callbacks: list[StepCallback] = (
            [GradRatioLog(self.model, config)] if ctx.main and config.log_grad_ratio else [])
        self.train_split = train_split.to(device)
        self._prepare_extra_data()
        self._prepare_evaluation()
        self.peer_forward = ddp_wrapped(self.peer, ctx, device) if self.peer is not None else None
        self.forget_rates = (objectives.forget_rates(config.forget_rate, config.epochs, config.forget_gradual,
                                                     config.forget_exponent) if config.coteach else None)
        wrapped = ddp_wrapped(self.model, ctx, device)
        self.forward_model = torch.compile(wrapped) if config.compile else wrapped
        compile_attack = config.compile and ctx.world_size == 1
        self.attack_model = torch.compile(self.model) if compile_attack else self.model
        self.iters_per_epoch = math.ceil(len(self.train_split) / config.batch_size)
        self.iteration = 0  # global step count of this process's run (the grad-ratio log's x axis)
        self.init_record: dict[str, Any] = {}  # init_from's path, SHA-256 and epoch, once loaded

    def _load_teachers(self) -> Teachers | None:
        """KD's teachers (their checkpoints' own architectures, eval mode, frozen), their
        paths and SHA-256 in the meta record."""
        c = self.config
        if c.teacher_robust is None:
            return None
        loaded = {}
        for role, path in (("natural", c.teacher_natural), ("robust", c.teacher_robust)):
            ckpt = load_checkpoint(path)
            if ckpt.num_classes not in (None, self.data.num_classes):
                raise AtprobeError(f"--teacher-{role} {path}: {ckpt.num_classes} classes, the data has "
                                   f"{self.data.num_classes}")
            model = prepare_model(ckpt.build_model(), self.device).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            loaded[role] = model
            self.meta[f"teacher_{role}"] = {"path": str(ckpt.path.resolve()), "sha256": ckpt.sha256,
                                            "arch": ckpt.arch, "epoch": ckpt.epoch}
        return Teachers(**loaded)

    def _prepare_extra_data(self) -> None:
        """``--extra-data``: the file mapped and checked against the dataset, its images resident on
        the device if they fit ``--extra-budget-mb`` (default: automatic), else streamed from the map;
        its labels on the device. Extra samples get indices after the original train split's."""
        c = self.config
        self.extra: ExtraData | None = None
        if c.extra_data is None:
            return
        self.extra = load_extra_data(c.extra_data, self.data.image_shape, self.data.num_classes)
        self.extra_rows = image_rows(self.extra.images, self.device, c.extra_budget_mb)
        self.extra_labels = self.extra.labels.to(self.device)
        self.meta.update({"extra_data": str(self.extra.path.resolve()), "extra_n": len(self.extra),
                          "extra_path": "mapped" if isinstance(self.extra_rows, MappedRows) else "resident"})

    def _batches(self, epoch: int):
        """The epoch's training batches: the shuffled split, or with --extra-data global batches
        ``epoch * iters_per_epoch ...`` of the original + extra mix."""
        c = self.config
        if self.extra is None:
            return iterate_batches(self.train_split, c.batch_size, shuffle=True, augment=c.augment,
                                   generator=self.state.data_gen, channels_last=True)
        return iterate_mixed_batches(self.train_split, self.extra_rows, self.extra_labels, c.batch_size,
                                     c.extra_fraction, seed=c.seed, first_batch=epoch * self.iters_per_epoch,
                                     n_batches=self.iters_per_epoch, index_base=len(self.labels), augment=c.augment,
                                     generator=self.state.data_gen, channels_last=True)

    def _prepare_evaluation(self) -> None:
        """The curves' eval sets (the first ``train_eval_n`` training samples, the first ``eval_n``
        of test and val; 0 = the whole split) and their attacks; best.pt is chosen on val if held
        out, else on test."""
        c, data = self.config, self.data
        self.eval_sets = {"train": _first(self.train_split, c.train_eval_n),
                          "test": _first(data.test, c.eval_n).to(self.device)}
        if data.val is not None:
            self.eval_sets["val"] = _first(data.val, c.eval_n).to(self.device)
        self.select_name = "val" if data.val is not None else "test"  # best.pt's split
        self.selection = {"best_split": self.select_name, "best_n": len(self.eval_sets[self.select_name])}
        robust, natural = parse_attack(c.eval_attack, c.threat), parse_attack("natural")
        # float32 whatever --amp says: the curves and best.pt's selection are the paper's numbers
        self.eval_config = EvalConfig(attacks=(natural, robust), batch_size=max(256, c.batch_size), seed=c.seed,
                                      amp=False)

    def initialize(self) -> None:
        """``init_from``: the weights and BatchNorm buffers of another run's checkpoint (same
        architecture and classes), before the first epoch; optimizer, TE ensemble and epoch stay fresh."""
        if self.config.init_from is None:
            return
        source = load_checkpoint(self.config.init_from, arch=self.config.arch, num_classes=self.data.num_classes)
        self.model.load_state_dict(source.state_dict)  # load_checkpoint built this architecture from it
        self.init_record = {"init_from": str(source.path.resolve()), "init_sha256": source.sha256,
                            "init_epoch": source.epoch}
        self.meta.update(self.init_record)

    def start_run_dir(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.config.to_json(), self.out / "config.json")

    def resume(self) -> None:
        """Continue from last.pt: weights, optimizer, RNGs, TE ensemble, best score, logs."""
        last = load_checkpoint(self.out / "last.pt")
        self.model.load_state_dict(last.state_dict)
        self.optimizer.load_state_dict(last.raw["optimizer"])
        self.state.load_rng_state(last.raw["rng"])
        self.state.epoch = int(last.epoch or 0)
        extra = last.raw.get("extra") or {}
        self.state.best = tuple(extra["best"]) if extra.get("best") else None
        self.state.best_epoch = extra.get("best_epoch")
        self.init_record = {k: extra[k] for k in INIT_KEYS if k in extra}
        self.meta.update(self.init_record)
        if self.state.ensemble is not None:
            self.state.ensemble.copy_(extra["te_ensemble"].to(self.device))
        if self.state.sat_targets is not None:
            self.state.sat_targets.copy_(extra["sat_targets"].to(self.device))
        if self.peer is not None:
            self.peer.load_state_dict(extra["peer"]["state_dict"])
            self.peer_optimizer.load_state_dict(extra["peer"]["optimizer"])
        if self.state.average is not None and extra.get("swa") is not None:
            self.state.average.load_state(extra["swa"])
        if (self.out / "curves.csv").is_file():
            old = read_run_csv(self.out, "curves.csv", CURVE_COLUMNS)
            self.curves = old[old["epoch"] <= self.state.epoch].to_dict("records")
        for callback in self.callbacks:
            callback.load(self.out)

    def run(self, progress: Callable[[int, int, dict[str, float]], None] | None = None) -> None:
        """The remaining epochs; rank 0 evaluates and writes while the others wait."""
        self.iteration = self.state.epoch * self.iters_per_epoch
        start_time = time.perf_counter()
        while self.state.epoch < self.config.epochs:
            stats = self.epoch()
            self.average_weights()
            self.log_epoch(stats, wall_time=time.perf_counter() - start_time)
            if not self.ctx.main:
                self.ctx.barrier()
                continue
            metrics = self.evaluate_and_select() if self._evaluation_due() else {}
            self.save()
            self.ctx.barrier()
            if progress is not None:
                metrics = {"objective": stats.objective, **metrics, "lr": stats.lr}
                progress(self.state.epoch, self.config.epochs, metrics)
        if self.ctx.main:
            save_checkpoint(self._checkpoint(resumable=False), self.out / "final.pt")
            if self.peer is not None:
                save_checkpoint(self._checkpoint(resumable=False, model=self.peer), self.out / "final_peer.pt")
        self.ctx.barrier()

    def epoch(self) -> EpochStats:
        """One epoch of shuffled, augmented training batches (``iters_per_epoch`` of them, with or
        without extra data); returns the global metrics."""
        epoch = self.state.epoch
        self.model.train()
        stats = EpochStats.zeros(self.device)
        for i, batch in enumerate(self._batches(epoch)):
            # Under DDP every rank draws the same global batch (shared generator) and keeps
            # its rows: the run equals a single process with the same global batch.
            if len(batch) < self.ctx.world_size:
                continue  # a last batch too small to give every rank a sample
            stats.lr = self._set_learning_rate(epoch + i / self.iters_per_epoch)
            self._step(batch, epoch, stats)
            self.iteration += 1
        self.state.epoch = epoch + 1
        return stats.summed_over(self.ctx)

    def average_weights(self) -> None:
        """SWA after the epoch just finished (every rank, so all hold the same average): the
        weights averaged in, then the averaged model's BatchNorm statistics from one pass over
        the training batches, augmented as training is, in an order of their own (seeded by
        the run's seed and the epoch: the training stream is not touched)."""
        average, c = self.state.average, self.config
        if average is None or not swa_due(c, self.state.epoch - 1):
            return
        average.update(self.model)
        g = torch.Generator(device=self.device)
        g.manual_seed((c.seed * 1_000_003 + SWA_STREAM * 1_009 + self.state.epoch) % (2**63))
        batches = iterate_batches(self.train_split, c.batch_size, shuffle=True, augment=c.augment, generator=g,
                                  channels_last=True)
        average.recompute_batchnorm(b.x for b in batches)

    @property
    def output_model(self) -> nn.Module:
        """The model the run evaluates and writes to best.pt/final.pt: the SWA average once it
        holds a model, else the trained one."""
        average = self.state.average
        return average.model if average is not None and average.count else self.model

    def _set_learning_rate(self, epoch_float: float) -> float:
        lr = learning_rate(self.config, epoch_float)
        for optimizer in (self.optimizer, self.peer_optimizer):
            for group in optimizer.param_groups if optimizer is not None else ():
                group["lr"] = lr
        return lr

    def _step(self, batch: Batch, epoch: int, stats: EpochStats) -> None:
        """TE targets, the training objective and one SGD update on this rank's rows of ``batch``."""
        ctx, n_global = self.ctx, len(batch)
        rows = ctx.rows(n_global)
        x, y = batch.x[rows], batch.y[rows]
        if self.peer is not None:
            return self._coteach_step(batch, rows, x, y, epoch, stats)
        # The ensemble accumulates from the ramp's first epoch on, as in the official code (its
        # first target is then the prediction itself); before it TE adds nothing.
        active = self.state.ensemble is not None and te_active(self.config, epoch)
        te_target = self._te_targets(batch, x, rows) if active else None
        sat = self._sat_targets(batch, rows) if sat_active(self.config, epoch) else None
        starts = training_starts(self.config, epoch, batch.index[rows])
        common = {"epoch": epoch, "starts": starts, "te_target": te_target, "amp": self.config.amp,
                  "attack_model": self.attack_model, "sat": sat, "teachers": self.teachers}
        perturbation, x_adv = None, None
        if awp_active(self.config, epoch):
            # AWP: x' at the unperturbed weights, the perturbation from the objective there (through
            # copies of the BatchNorm buffers), then the update's gradient at w + v
            proxy = training_loss(awp.ProxyView(self.model), x, y, self.config, **common)
            x_adv = proxy.x_adv
            reduce = ctx.sum_over_ranks if ctx.world_size > 1 else None
            perturbation = awp.weight_perturbation(self.model, proxy.loss * (len(y) / n_global), self.config.awp_gamma,
                                                   reduce)
            awp.shift_weights(self.model, perturbation, +1.0)
        step = training_loss(self.forward_model, x, y, self.config, x_adv=x_adv, **common)
        for callback in self.callbacks:
            callback.after_loss(self.iteration, epoch, x, y, step)
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks; weighting by the share makes that the global mean.
        share = len(y) * ctx.world_size / n_global
        (step.loss * share if ctx.world_size > 1 else step.loss).backward()
        self.optimizer.step()
        if perturbation is not None:
            awp.shift_weights(self.model, perturbation, -1.0)  # the update applies to w
        stats.add(step, y)

    def _coteach_step(self, batch: Batch, rows: slice, x: Tensor, y: Tensor, epoch: int, stats: EpochStats) -> None:
        """Co-teaching adapted to PGD-AT (Han et al. 2018, Dong et al. 2022 Table 2): each
        network attacks itself (PGD-AT's x'), ranks the global batch by its own adversarial CE,
        and the *other* network is updated on the ``1 - forget_rate(epoch)`` fraction with the
        smallest losses (the mean over them: the paper's Algorithm 1)."""
        ctx, n_global, rate = self.ctx, len(batch), self.forget_rates[epoch]
        starts = training_starts(self.config, epoch, batch.index[rows])
        own = training_loss(self.forward_model, x, y, self.config, epoch=epoch, starts=starts, amp=self.config.amp,
                            attack_model=self.attack_model)
        peer = training_loss(self.peer_forward, x, y, self.config, epoch=epoch, starts=starts, amp=self.config.amp,
                             attack_model=self.peer)
        mine = {}  # this rank's part of each network's mean over the picked rows
        for name, step, other in (("own", own, peer), ("peer", peer, own)):
            # this network trains on the rows the other network picked
            picked = objectives.small_loss_rows(ctx.all_gather_rows(other.per_sample.detach(), n_global), rate)
            mask = torch.zeros(n_global, dtype=step.per_sample.dtype, device=x.device)
            mask[picked] = 1.0
            mine[name] = (step.per_sample * mask[rows]).sum() / max(len(picked), 1)
        for optimizer, name in ((self.optimizer, "own"), (self.peer_optimizer, "peer")):
            optimizer.zero_grad(set_to_none=True)
            (mine[name] * ctx.world_size).backward()  # DDP averages over the ranks: the sum of their parts
            optimizer.step()
        own.loss = mine["own"].detach() * (n_global / len(y))  # EpochStats weighs it by len(y): the picked mean
        stats.add(own, y)

    def _sat_targets(self, batch: Batch, rows: slice) -> SatTargets:
        """SAT's targets and weights of this rank's rows: the global batch's predictions update
        the targets once (a second call, AWP's update after its proxy, returns the same)."""
        done: list[tuple[Tensor, Tensor]] = []

        def targets(probs: Tensor) -> tuple[Tensor, Tensor]:
            if not done:
                every = self.ctx.all_gather_rows(probs.float(), len(batch))
                updated = objectives.sat_update(self.state.sat_targets, batch.index, every, self.config.sat_momentum)
                weights = objectives.sat_weights(updated)  # normalized over the global batch
                done.append((updated[rows], weights[rows]))
            return done[0]

        return targets

    def _te_targets(self, batch: Batch, x: Tensor, rows: slice) -> Tensor:
        """p_hat of Eq. 7 for this rank's rows, after the ensemble took the global batch's predictions."""
        with torch.no_grad(), module_mode(self.model, False), autocast(self.device, self.config.amp):
            probs = F.softmax(full_precision(self.attack_model(x)), dim=1)
        probs = self.ctx.all_gather_rows(probs, len(batch))
        return objectives.update_ensemble(self.state.ensemble, batch.index, probs, self.config.te_eta)[rows]

    def log_epoch(self, stats: EpochStats, wall_time: float) -> None:
        """The epoch's training rows of the curves (``epoch`` counts completed epochs)."""
        epoch = self.state.epoch
        lr_at_end = learning_rate(self.config, epoch - 1e-9)  # the last lr of the epoch's schedule
        self.curves += [
            {"epoch": epoch, "split": "train", "metric": "objective", "value": stats.objective},
            {"epoch": epoch, "split": "train", "metric": "running_acc", "value": stats.running_acc},
            {"epoch": epoch, "split": "-", "metric": "lr", "value": lr_at_end},
            {"epoch": epoch, "split": "-", "metric": "wall_time_s", "value": wall_time},
        ]

    def _evaluation_due(self) -> bool:
        return self.state.epoch % self.config.eval_every == 0 or self.state.epoch == self.config.epochs

    def evaluate_and_select(self) -> dict[str, float]:
        """Curves on every eval subset; best.pt when the selection split's (robust, natural)
        accuracy beats the best so far (robust first, natural breaks ties)."""
        metrics: dict[str, float] = {}
        for split_name, split in self.eval_sets.items():
            df = evaluate(self.output_model, split, self.eval_config)
            self.curves.extend(_curve_rows(self.state.epoch, split_name, df))
            metrics[f"{split_name}_nat"] = float(df.accuracy.iloc[0])
            metrics[f"{split_name}_pgd"] = float(df.accuracy.iloc[1])
        score = (metrics[f"{self.select_name}_pgd"], metrics[f"{self.select_name}_nat"])
        if self.state.best is None or score > tuple(self.state.best):
            self.state.best, self.state.best_epoch = score, self.state.epoch
            save_checkpoint(self._checkpoint(resumable=False), self.out / "best.pt")
            if self.peer is not None:  # the second network at the epoch best.pt was selected
                save_checkpoint(self._checkpoint(resumable=False, model=self.peer), self.out / "best_peer.pt")
        return metrics

    def save(self) -> None:
        """This epoch's files: epoch_K.pt (cadence), curves.csv, the callbacks' logs, last.pt."""
        c, out, epoch = self.config, self.out, self.state.epoch
        if c.save_every and epoch % c.save_every == 0:
            save_checkpoint(self._checkpoint(resumable=False), out / f"epoch_{epoch:04d}.pt")
        write_table(pd.DataFrame(self.curves, columns=CURVE_COLUMNS), out / "curves.csv",
                    {**run_meta(seed=c.seed, config=c.to_json(),
                                extra={**self.selection, "best_epoch": self.state.best_epoch}),
                     **self.meta})
        for callback in self.callbacks:
            callback.write(out, self.meta)
        # last.pt is written last: once it names an epoch, everything of that epoch is on disk.
        save_checkpoint(self._checkpoint(resumable=True), out / "last.pt")

    def _checkpoint(self, *, resumable: bool, model: nn.Module | None = None) -> dict:
        """The checkpoint of the current epoch; ``resumable`` adds optimizer, RNGs, TE ensemble,
        SAT targets, the SWA average and Co-teaching's second network. ``model``: another
        network to write (Co-teaching's second) instead of the run's own."""
        state, config = self.state, self.config
        if model is None:
            model = state.model.module if hasattr(state.model, "module") else state.model
            model = getattr(model, "_orig_mod", model)
            if not resumable:  # best.pt, final.pt, epoch_K.pt: the model the run produces (SWA: the average)
                model = self.output_model
        extra: dict[str, Any] = {"best": list(state.best) if state.best else None, "best_epoch": state.best_epoch,
                                 **self.selection, **self.init_record}
        if state.average is not None and not resumable:
            extra["swa_models"] = state.average.count
        if resumable and state.ensemble is not None:
            extra["te_ensemble"] = state.ensemble.detach().cpu()
        if resumable and state.sat_targets is not None:
            extra["sat_targets"] = state.sat_targets.detach().cpu()
        if resumable and state.average is not None:
            extra["swa"] = state.average.state()
        if resumable and self.peer is not None:
            extra["peer"] = {"state_dict": {k: v.detach().cpu() for k, v in self.peer.state_dict().items()},
                             "optimizer": self.peer_optimizer.state_dict()}
        return make_checkpoint(
            model, arch=config.arch, arch_kwargs=_arch_kwargs(config, self.data), dataset=config.dataset,
            labels=self.labels, label_spec={"label_noise": config.label_noise, "label_seed": config.label_seed},
            train_config=config.to_json(), epoch=state.epoch,
            optimizer=state.optimizer.state_dict() if resumable else None,
            rng=state.rng_state() if resumable else None, extra=extra,
        )


def plan_run_dir(out: Path, config: TrainConfig, *, overwrite: bool = False) -> Path:
    """Where a new run is written, decided before any work (the output rule,
    ``atprobe.outputs``): ``out`` itself when it is new or an empty folder; an existing,
    non-empty ``out`` is refused, except with ``overwrite`` when it is a run directory: then
    the new run is written to the sibling ``OUT.overwrite`` and put in ``out``'s place only
    once it is complete (:func:`atprobe.outputs.replace_directory`, in :func:`train`)."""
    inputs = [config.init_from, config.data_dir, config.extra_data, config.teacher_robust, config.teacher_natural]
    if not (overwrite and out.is_dir() and any(out.iterdir())):
        check_new_directory(out, inputs, option="--out",
                            hint=f"continue the run with --resume {out}, or replace it with --overwrite")
        return out
    if not is_run_directory(out):
        raise AtprobeError(f"{out} is not an atprobe train run directory (no config.json): --overwrite replaces only "
                           "runs; give a new or empty --out")
    whole = Path(os.path.abspath(out))
    staging = whole.with_name(whole.name + OVERWRITE_SUFFIX)
    aside = whole.with_name(whole.name + ASIDE_SUFFIX)
    if staging.exists() or staging.is_symlink():
        raise AtprobeError(f"{staging} exists (an interrupted --overwrite of {out}): continue it with --resume "
                           f"{staging}, or delete it")
    if aside.exists() or aside.is_symlink():
        raise AtprobeError(f"{aside} exists (the old run of an interrupted --overwrite of {out}): move or delete it")
    for item in inputs:
        if item is not None and inside(item, out):
            raise AtprobeError(f"{item}: --overwrite would replace {out}, which holds this input; copy it out first")
    check_outputs((), inputs, option="--out", directories=[staging])
    return staging


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Run (or resume) a training and write its run directory; returns the directory.

    A new run needs a new or empty ``out_dir``; ``overwrite`` replaces a run there, once
    the new one is complete (:func:`plan_run_dir`).
    ``progress(epoch, epochs, metrics)`` is called after each epoch (the CLI prints it).
    ``meta``: fields merged into the ``.meta.json`` of curves.csv and gradratio.csv (the
    demo records the equivalent ``command`` this way; default: the process's own argv).
    """
    out = named_path(out_dir, "--resume" if resume else "--out", folder=True)
    if resume and overwrite:
        raise AtprobeError("give --resume or --overwrite, not both")
    ctx, device = distributed_context(device)
    if resume:
        config = saved_config(out)  # the run's own config wins
    work = out if resume else plan_run_dir(out, config, overwrite=overwrite)
    ctx.barrier()  # every rank has decided before rank 0 writes anything
    trainer = Trainer(config, work, ctx, device, meta)
    if resume:
        trainer.resume()
    else:
        trainer.initialize()  # every rank, as resume: DDP shares the module's parameters
        if ctx.main:
            trainer.start_run_dir()
    trainer.run(progress)
    if work != out and ctx.main:
        replace_directory(work, Path(os.path.abspath(out)))
    ctx.barrier()
    return out
