"""The adversarial-training core: PGD-AT, TRADES, fast AT, clean mixing, temporal
ensembling and random labels, on device-resident data.

``train(config, out_dir)`` runs one training and writes a run directory
(``docs/training.md`` lists the files). The hot loop keeps every running metric on
the device; the host synchronizes once per epoch (evaluation and checkpointing).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from atprobe import objectives
from atprobe.attacks import PGDConfig, fgsm_rs_config, parse_attack, pgd
from atprobe.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from atprobe.data import DATASETS, Dataset, iterate_batches, load_dataset
from atprobe.errors import AtprobeError, check_choice
from atprobe.evaluate import EvalConfig, evaluate
from atprobe.io import write_json, write_table, run_meta
from atprobe.models import build_model, canonical_arch
from atprobe.objectives import attack_loss, full_precision
from atprobe.runtime import autocast, make_generator, module_mode, prepare_model, resolve_device, set_determinism
from atprobe.starts import Starts
from atprobe.threat import ThreatModel

METHODS = ("standard", "pgd_at", "trades", "fgsm_rs")
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
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
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
    te_weight: float = 30.0
    te_start: int | None = None  # default 45% of epochs (90 of 200)
    te_end: int | None = None  # default 75% of epochs (150 of 200)
    te_trades_input: str = "natural"
    val_size: int = 0
    val_seed: int = 0
    train_n: int = 0  # train on the first N training samples only (0 = all)
    eval_n: int = 1000
    eval_attack: str = "pgd10"  # robust metric of the curves and of best.pt
    eval_every: int = 1
    save_every: int = 0
    log_grad_ratio: int = 0
    seed: int = 0
    amp: bool = True
    compile: bool = False

    def resolved(self) -> "TrainConfig":
        """Fill the dependent defaults and validate everything (AtprobeError on nonsense)."""
        c = self
        check_choice(c.method, METHODS, "method")
        check_choice(c.dataset, DATASETS, "dataset")
        check_choice(c.schedule, SCHEDULES, "schedule")
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
        for name in ("eval_n", "val_size", "train_n", "save_every", "log_grad_ratio"):
            if getattr(c, name) < 0:
                raise AtprobeError(f"{name.replace('_', '-')} must be >= 0, got {getattr(c, name)}")
        if c.eval_every < 1:
            raise AtprobeError(f"eval-every must be >= 1, got {c.eval_every}")
        milestones = c.milestones if c.milestones is not None else (c.epochs // 2, (3 * c.epochs) // 4)
        if any(m < 0 or m > c.epochs for m in milestones) or list(milestones) != sorted(milestones):
            raise AtprobeError(f"milestones must be increasing epochs in [0, {c.epochs}], got {list(milestones)}")
        te_start = c.te_start if c.te_start is not None else round(0.45 * c.epochs)
        te_end = c.te_end if c.te_end is not None else round(0.75 * c.epochs)
        if c.te and te_end < te_start:
            raise AtprobeError(f"TE ramp ends (epoch {te_end}) before it starts (epoch {te_start})")
        mix_epochs = c.mix_epochs if c.mix_epochs is not None else c.epochs // 2
        if mix_epochs < 0:
            raise AtprobeError(f"mix-epochs must be >= 0, got {mix_epochs}")
        out = replace(
            c,
            arch=canonical_arch(c.arch),
            milestones=tuple(int(m) for m in milestones),
            te_start=int(te_start),
            te_end=int(te_end),
            mix_epochs=int(mix_epochs),
        )
        parse_attack(out.eval_attack, out.threat)
        return out

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
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainConfig":
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
        return cls(**d)


_LEGACY_THREAT_KEYS = ("norm", "eps", "alpha", "steps")


# ---------------------------------------------------------------------------- schedules


def learning_rate(config: TrainConfig, epoch_float: float) -> float:
    """The learning rate at a fractional epoch (set every iteration)."""
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "cosine":
        return 0.5 * config.lr * (1 + math.cos(math.pi * min(epoch_float / config.epochs, 1.0)))
    decays = sum(1 for m in config.milestones or () if epoch_float >= m)
    return config.lr * config.lr_decay**decays


def mix_gamma(config: TrainConfig, epoch: int) -> float:
    """gamma of Eq. 6 in epoch ``epoch`` (0-based): 0 -> 1 over ``mix_epochs``."""
    if not config.mix_clean:
        return 1.0
    if config.mix_ramp == "linear":
        return objectives.linear_rampup(epoch, config.mix_epochs)
    return objectives.gaussian_rampup(epoch, 0, config.mix_epochs)


def te_weight(config: TrainConfig, epoch: int) -> float:
    """w of Eq. 7 in epoch ``epoch``: te_weight * Gaussian ramp between te_start and te_end."""
    if not config.te:
        return 0.0
    return config.te_weight * objectives.gaussian_rampup(epoch, config.te_start, config.te_end)


# ---------------------------------------------------------------------------- one step


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
) -> StepOutput:
    """The objective of ``config.method`` on one batch (model in train mode for the update).

    standard: mean CE(f(x), y)
    pgd_at:   mean CE(f(x'), y); with --mix-clean (Eq. 6): (1-g) CE(f(x), y) + g CE(f(x'), y)
    fgsm_rs:  as pgd_at with x' from FGSM with random start
    trades:   mean CE(f(x), y) + beta KL(f(x) || f(x'))
    TE (Eq. 7) adds w ||softmax(f(.)) - p_hat||^2 to the objective and to the attack's loss.

    ``starts`` keys the attack's random starts (``training_starts``: seed, epoch and the
    samples' dataset indices, so a sample's start does not depend on its batch or on the
    number of processes); ``attack_model`` is the unwrapped module to attack (DDP's wrapper is only
    for the forward whose gradient is reduced).
    """
    attacker = model if attack_model is None else attack_model
    device = x.device
    w = te_weight(config, epoch) if te_target is not None else 0.0
    if config.method == "standard":
        with autocast(device, amp):
            (logits,) = _forward(model, x)
        loss = objectives.ce(logits, y).mean()
        return StepOutput(loss, logits, None, {"ce": loss.detach()})

    attack = config.attack_config()
    if config.method == "trades":
        with torch.no_grad(), module_mode(attacker, not attack.eval_mode), autocast(device, amp):
            natural_for_attack = attacker(x)
        inner = attack_loss("kl", natural_logits=natural_for_attack)
    else:
        inner = attack_loss("ce", y)
    loss_fn = inner
    if w > 0:
        loss_fn = lambda z: inner(z) + w * objectives.te_penalty(z, te_target)  # noqa: E731
    x_adv = pgd(attacker, x, y, attack, starts=starts, loss_fn=loss_fn, amp=amp)

    with autocast(device, amp):
        if config.method == "trades" or (config.mix_clean and mix_gamma(config, epoch) < 1):
            logits_nat, logits_adv = _forward(model, x, x_adv)
        else:
            (logits_adv,) = _forward(model, x_adv)
            logits_nat = None
    parts: dict[str, Tensor] = {}
    if config.method == "trades":
        ce_nat = objectives.ce(logits_nat, y)
        kl = objectives.trades_kl(logits_nat, logits_adv)
        per_sample = ce_nat + config.beta * kl
        parts.update(ce=ce_nat.mean().detach(), kl=kl.mean().detach())
        te_logits = logits_nat if config.te_trades_input == "natural" else logits_adv
    else:
        ce_adv = objectives.ce(logits_adv, y)
        parts["ce_adv"] = ce_adv.mean().detach()
        if logits_nat is not None:
            gamma = mix_gamma(config, epoch)
            ce_nat = objectives.ce(logits_nat, y)
            per_sample = (1 - gamma) * ce_nat + gamma * ce_adv
            parts["ce"] = ce_nat.mean().detach()
        else:
            per_sample = ce_adv
        te_logits = logits_adv
    if w > 0:
        penalty = objectives.te_penalty(te_logits, te_target)
        per_sample = per_sample + w * penalty
        parts["te"] = penalty.mean().detach()
    return StepOutput(per_sample.mean(), logits_adv, x_adv, parts)


#: The stream of training's random starts (another draw than any probe's, which use none).
TRAIN_STREAM = 0x7EA1


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


# ---------------------------------------------------------------------------- distributed


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


# ---------------------------------------------------------------------------- the run


class RunState:
    """Everything that changes during a run and must survive a resume."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data_gen: torch.Generator,
                 ensemble: Tensor | None):
        self.model = model
        self.optimizer = optimizer
        self.data_gen = data_gen
        self.ensemble = ensemble
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


def _arch_kwargs(config: TrainConfig, data: Dataset) -> dict[str, Any]:
    return {"num_classes": data.num_classes, "dropout": config.dropout,
            "mean": list(data.mean), "std": list(data.std)}


def _checkpoint(state: RunState, config: TrainConfig, data: Dataset, labels: Tensor, *, resume: bool) -> dict:
    model = state.model.module if hasattr(state.model, "module") else state.model
    model = getattr(model, "_orig_mod", model)
    extra: dict[str, Any] = {"best": list(state.best) if state.best else None, "best_epoch": state.best_epoch,
                             "best_split": "val" if data.val is not None else "test"}
    if resume and state.ensemble is not None:
        extra["te_ensemble"] = state.ensemble.detach().cpu()
    return make_checkpoint(
        model,
        arch=config.arch,
        arch_kwargs=_arch_kwargs(config, data),
        dataset=config.dataset,
        labels=labels,
        label_spec={"label_noise": config.label_noise, "label_seed": config.label_seed},
        train_config=config.to_json(),
        epoch=state.epoch,
        optimizer=state.optimizer.state_dict() if resume else None,
        rng=state.rng_state() if resume else None,
        extra=extra,
    )


def load_training_data(config: TrainConfig) -> Dataset:
    return load_dataset(
        config.dataset, config.data_dir, download=config.download,
        val_size=config.val_size, val_seed=config.val_seed,
        label_noise=config.label_noise, label_seed=config.label_seed,
        synthetic_seed=config.synthetic_seed,
    )


def _curve_rows(epoch: int, split: str, df: pd.DataFrame) -> list[dict[str, Any]]:
    rows = []
    for r in df.itertuples():
        name = r.attack
        rows.append({"epoch": epoch, "split": split, "metric": f"{name}_acc", "value": r.accuracy})
        rows.append({"epoch": epoch, "split": split, "metric": f"{name}_loss", "value": r.loss})
    return rows


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    resume: bool = False,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> Path:
    """Run (or resume) a training and write its run directory; returns the directory.

    ``progress(epoch, epochs, metrics)`` is called after each epoch (the CLI prints it).
    """
    out = Path(out_dir)
    ctx, device = distributed_context(device)
    if resume:
        saved = out / "config.json"
        if not saved.is_file():
            raise AtprobeError(f"cannot resume {out}: no config.json there (is it a run directory?)")
        config = TrainConfig.from_json(json.loads(saved.read_text()))
        if not (out / "last.pt").is_file():
            raise AtprobeError(f"cannot resume {out}: no last.pt (no epoch finished yet); start it again instead")
    config = config.resolved()
    if config.batch_size < ctx.world_size:
        raise AtprobeError(f"batch size {config.batch_size} is smaller than the {ctx.world_size} processes")
    set_determinism(config.seed)

    data = load_training_data(config)
    train_split = data.train
    if config.train_n:  # checked before anything is written
        if config.train_n > len(train_split):
            raise AtprobeError(f"--train-n {config.train_n} is larger than the training split ({len(train_split)})")
        train_split = train_split.subset(slice(0, config.train_n))
    # The full vector of trained labels over the original train split (val rows included).
    labels = torch.empty(len(data.train) + (len(data.val) if data.val is not None else 0), dtype=torch.int64)
    labels[data.train.index] = data.train.y
    if data.val is not None:
        labels[data.val.index] = data.val.y

    model = prepare_model(build_model(config.arch, **_arch_kwargs(config, data)), device)
    # Every rank starts from rank 0's weights (seeded init is identical anyway; this makes it certain).
    wrapped: nn.Module = model
    if ctx.world_size > 1:
        wrapped = nn.parallel.DistributedDataParallel(MultiForward(model),
                                                      device_ids=[device] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov, weight_decay=config.weight_decay)
    ensemble = (torch.zeros(len(labels), data.num_classes, device=device) if config.te else None)
    # Attack starts are keyed (training_starts); only the data order and augmentation draw here.
    state = RunState(model, optimizer, make_generator(config.seed, device), ensemble)
    curves: list[dict[str, Any]] = []
    grad_rows: list[dict[str, Any]] = []

    if resume:
        last = load_checkpoint(out / "last.pt")
        model.load_state_dict(last.state_dict)
        optimizer.load_state_dict(last.raw["optimizer"])
        state.load_rng_state(last.raw["rng"])
        state.epoch = int(last.epoch or 0)
        extra = last.raw.get("extra") or {}
        state.best = tuple(extra["best"]) if extra.get("best") else None
        state.best_epoch = extra.get("best_epoch")
        if ensemble is not None:
            ensemble.copy_(extra["te_ensemble"].to(device))
        if (out / "curves.csv").is_file():
            old = pd.read_csv(out / "curves.csv")
            curves = old[old["epoch"] <= state.epoch].to_dict("records")
        if (out / "gradratio.csv").is_file():
            grad_rows = pd.read_csv(out / "gradratio.csv").to_dict("records")
    elif ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(config.to_json(), out / "config.json")

    train_split = train_split.to(device)
    eval_train = train_split.subset(slice(0, min(config.eval_n, len(train_split))))
    select_name = "val" if data.val is not None else "test"
    eval_sets = {"train": eval_train,
                 "test": data.test.subset(slice(0, min(config.eval_n, len(data.test)))).to(device)}
    if data.val is not None:
        eval_sets["val"] = data.val.subset(slice(0, min(config.eval_n, len(data.val)))).to(device)
    robust = parse_attack(config.eval_attack, config.threat)
    natural = parse_attack("natural")
    eval_config = EvalConfig(attacks=(natural, robust), batch_size=max(256, config.batch_size), seed=config.seed)

    forward_model: nn.Module = torch.compile(wrapped) if config.compile else wrapped
    attack_model: nn.Module = torch.compile(model) if config.compile and ctx.world_size == 1 else model
    iters_per_epoch = math.ceil(len(train_split) / config.batch_size)
    iteration = state.epoch * iters_per_epoch
    start_time = time.perf_counter()

    while state.epoch < config.epochs:
        epoch = state.epoch
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        for i, batch in enumerate(iterate_batches(train_split, config.batch_size, shuffle=True,
                                                  augment=config.augment, generator=state.data_gen,
                                                  channels_last=True)):
            # Under DDP every rank draws the same global batch (shared generator) and keeps
            # its rows: the run equals a single process with the same global batch.
            n_global = len(batch)
            if n_global < ctx.world_size:
                continue  # a last batch too small to give every rank a sample
            rows = ctx.rows(n_global)
            lr = learning_rate(config, epoch + i / iters_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = batch.x[rows], batch.y[rows]
            te_target = None
            if ensemble is not None:
                with torch.no_grad(), module_mode(model, False), autocast(device, config.amp):
                    probs = F.softmax(full_precision(attack_model(x)), dim=1)
                probs = ctx.all_gather_rows(probs, n_global)
                te_target = objectives.update_ensemble(ensemble, batch.index, probs, config.te_eta)[rows]
            step = training_loss(forward_model, x, y, config, epoch=epoch,
                                 starts=training_starts(config, epoch, batch.index[rows]),
                                 te_target=te_target, amp=config.amp, attack_model=attack_model)
            if ctx.main and iteration < config.log_grad_ratio and step.x_adv is not None:
                row = grad_ratio_parts(model, x, step.x_adv, y, config, amp=config.amp)
                grad_rows.append({"iteration": iteration, "epoch": epoch, "method": config.method, **row})
            optimizer.zero_grad(set_to_none=True)
            # DDP averages gradients over ranks; weighting by the share makes that the global mean.
            share = len(y) * ctx.world_size / n_global
            (step.loss * share if ctx.world_size > 1 else step.loss).backward()
            optimizer.step()
            loss_sum += step.loss.detach() * len(y)
            correct += (step.logits.detach().argmax(1) == y).sum()
            seen += len(y)
            iteration += 1
        if ctx.world_size > 1:
            totals = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), device=device,
                                                                                  dtype=torch.float64)])
            torch.distributed.all_reduce(totals)
            loss_sum, correct, seen = totals[0], totals[1], int(totals[2].item())
        state.epoch = epoch + 1
        wall = time.perf_counter() - start_time
        row_epoch = state.epoch
        curves.append({"epoch": row_epoch, "split": "train", "metric": "objective", "value": loss_sum.item() / seen})
        curves.append({"epoch": row_epoch, "split": "train", "metric": "running_acc", "value": correct.item() / seen})
        curves.append({"epoch": row_epoch, "split": "-", "metric": "lr", "value": learning_rate(config, epoch + 1 - 1e-9)})
        curves.append({"epoch": row_epoch, "split": "-", "metric": "wall_time_s", "value": wall})
        metrics: dict[str, float] = {}
        evaluated = state.epoch % config.eval_every == 0 or state.epoch == config.epochs
        if not ctx.main:
            ctx.barrier()  # rank 0 evaluates and writes; the others wait for it
            continue
        if evaluated:
            for split_name, split in eval_sets.items():
                df = evaluate(model, split, eval_config)
                curves.extend(_curve_rows(row_epoch, split_name, df))
                metrics[f"{split_name}_nat"] = float(df.accuracy.iloc[0])
                metrics[f"{split_name}_pgd"] = float(df.accuracy.iloc[1])
            score = (metrics[f"{select_name}_pgd"], metrics[f"{select_name}_nat"])
            if state.best is None or score > tuple(state.best):
                state.best, state.best_epoch = score, state.epoch
                save_checkpoint(_checkpoint(state, config, data, labels, resume=False), out / "best.pt")
        if config.save_every and state.epoch % config.save_every == 0:
            save_checkpoint(_checkpoint(state, config, data, labels, resume=False), out / f"epoch_{state.epoch:04d}.pt")
        write_table(pd.DataFrame(curves, columns=["epoch", "split", "metric", "value"]), out / "curves.csv",
                    run_meta(seed=config.seed, config=config.to_json(),
                             extra={"best_split": select_name, "best_epoch": state.best_epoch}))
        if grad_rows:
            write_table(pd.DataFrame(grad_rows), out / "gradratio.csv", run_meta(seed=config.seed, config=config.to_json()))
        # last.pt is written last: once it names an epoch, everything of that epoch is on disk.
        save_checkpoint(_checkpoint(state, config, data, labels, resume=True), out / "last.pt")
        ctx.barrier()
        if progress is not None:
            progress(state.epoch, config.epochs, {"objective": loss_sum.item() / seen, **metrics, "lr": lr})

    if ctx.main:
        save_checkpoint(_checkpoint(state, config, data, labels, resume=False), out / "final.pt")
    ctx.barrier()
    return out
