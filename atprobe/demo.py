"""``atprobe demo``: the paper's findings, measured, each with a verdict.

The demo is a list of findings of Dong et al., *Exploring Memorization in Adversarial
Training* (ICLR 2022), :data:`atprobe.findings.FINDINGS`: each an experiment (training runs
and probes), a statistic, the paper's value and a verdict computed by a rule fixed in
``atprobe.findings`` before anything is measured: ``reproduced``, ``not at this size`` or
``contradicted``. It trains the runs, runs the probes, draws one figure per finding, then
writes ``findings.csv`` (one row per finding) and a report (``report.md``, ``index.html``)
that opens with the findings table; each row links to its figure and the commands that made
its tables.

Each step calls the library function its ``atprobe`` command calls (``atprobe.train.train``,
one function of ``atprobe.studies`` per probe, ``atprobe.plot`` for the figures) with the
typed config that command would build, and carries that command line (:attr:`Step.args`)
for the report and for each CSV's ``.meta.json``, so a user can re-run it inside the output
folder to re-make the file. Paths are relative to the output folder and read from there
(``root=out``): the demo never changes the working directory or ``sys.argv``, and no probe
logic lives here.

The same findings and rules run at every size (:data:`BUDGETS`): ``cpu`` (the README's main
job: at most 10 minutes on two CPU cores), ``gpu`` (about an hour on one GPU), ``paper`` (the
paper's presets, many GPU-hours; ``--resume`` continues it, skipping every step whose files
are all there) and ``quick`` (the CI test's size). docs/demo.md gives every budget's sizes,
the pilot runs that chose them and the verdicts measured.

From Python::

    from atprobe.demo import DemoConfig, run_demo
    report = run_demo(DemoConfig(out="demo", budget="quick"), progress=print)
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from atprobe import findings as rules
from atprobe import studies
from atprobe.attacks import parse_attack
from atprobe.bnstats import BNStats
from atprobe.data import DATASETS
from atprobe.directions import parse_lambdas
from atprobe.errors import AtprobeError
from atprobe.evaluate import EvalConfig
from atprobe.io import atomic_write_bytes, run_meta, write_json, write_tables
from atprobe.outputs import check_new_directory
from atprobe.presets import preset_config
from atprobe.probes import complexity as complexity_probe
from atprobe.probes import gradcos as gradcos_probe
from atprobe.probes import hardness as hardness_probe
from atprobe.probes import stability as stability_probe
from atprobe.runtime import set_determinism
from atprobe.study import DataSource, SampleSpec, Study
from atprobe.threat import ThreatModel
from atprobe.train import TrainConfig, train

__all__ = [
    "BUDGETS",
    "Budget",
    "DemoConfig",
    "Figure",
    "PlotCall",
    "ProbeCall",
    "RUN_BY",
    "Run",
    "Step",
    "StepRecord",
    "TableCall",
    "TrainCall",
    "budget_for",
    "expected_files",
    "figures",
    "measure_findings",
    "report",
    "run_demo",
    "runs",
    "steps",
]

PAPER = "Dong et al., Exploring Memorization in Adversarial Training (ICLR 2022)"
#: The ``run_by`` key of every ``.meta.json`` the demo writes: its ``command`` is the
#: equivalent command line, not the process's own (which ran ``atprobe demo``).
RUN_BY = "atprobe demo"
#: ``--batch-size`` of the probe commands when not given (cli/common.py). The demo's command
#: lines leave it out, so their calls pass this value; tests/test_demo.py parses each command
#: line with the click command and checks that it builds the very same call.
COMMAND_BATCH_SIZE = 256
FINDINGS_CSV = "findings.csv"


@dataclass(frozen=True)
class Budget:
    """How big the demo is. Every field becomes an option of one of the commands.

    The random-label runs (Figs. 2-5) follow Sec. 3.1 (no augmentation, no weight decay) at a
    constant learning rate; the true-label runs (Table 1, Sec. 4.1) decay it at 50% and 75%
    of their epochs. ``presets`` (the paper budget) takes every run from ``atprobe.presets``
    instead, and its sizes from the presets."""

    name: str
    arch: str = "cnn-small"
    steps: int = 3                # PGD steps of training and of every probe's attack (eps 8/255)
    alpha: float = 2 / 255        # their step size
    batch_size: int = 64
    lr: float = 0.1
    random_n: int = 512           # random-label runs: --train-n, all of them in the curves
    random_epochs: int = 30
    random_eval_every: int = 5
    grad_ratio_iters: int = 48    # --log-grad-ratio of the random-label PGD-AT and TRADES runs (Fig. 3(b))
    true_n: int = 1000            # true-label runs: --train-n (0 = the whole training split)
    true_epochs: int = 24
    true_augment: bool = False
    true_weight_decay: float = 5e-4
    curve_n: int = 500            # test images of the curves, of best.pt's selection and of the table (0 = all)
    curve_attack: str = "pgd5"    # the true-label runs' --eval-attack, and the table's attack
    train_eval_n: int = 200       # the true-label runs' --train-eval-n
    probe_n: int = 64             # stability and gradcos --n
    complexity_n: int = 256       # complexity --n (training and test samples)
    hardness_n: int = 1000        # hardness --n (training samples; 0 = --all)
    stability_lambdas: str = "-0.05:0.05:5"   # a --lambdas grid (START:STOP:NUM)
    stability_directions: int = 2
    dpi: int = 100                # figures: (figure inches x dpi) pixels
    presets: bool = False         # take the runs from the paper's presets (the paper budget)
    # gradcos on separate runs of the random-label runs' first gradcos_epochs (every epoch kept),
    # where keeping every epoch of the whole runs would take GBs (gpu, paper); else on those runs
    gradcos_first: bool = False
    gradcos_epochs: int = 20      # Fig. 4(b) shows the first 20 epochs

    def __post_init__(self) -> None:
        kinds = {f.name: f.type for f in dataclasses.fields(self)}
        for name, kind in kinds.items():
            value = getattr(self, name)
            if kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise AtprobeError(f"budget {name} must be an integer, got {value!r}")
            if kind == "bool" and not isinstance(value, bool):
                raise AtprobeError(f"budget {name} must be True or False, got {value!r}")
            if kind == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or value < 0 or (value == 0 and name != "true_weight_decay"):
                    raise AtprobeError(f"budget {name} must be a finite number > 0, got {value!r}")
                object.__setattr__(self, name, float(value))
        minimum = {"random_epochs": 2, "true_epochs": 2, "true_n": 0, "grad_ratio_iters": 1, "curve_n": 0,
                   "hardness_n": 0}
        for name, kind in kinds.items():
            if kind == "int" and getattr(self, name) < minimum.get(name, 1):
                raise AtprobeError(f"budget {name} must be >= {minimum.get(name, 1)}, got {getattr(self, name)}")
        parse_lambdas(self.stability_lambdas)  # a bad grid fails here, not at its probe's step
        parse_attack(self.curve_attack)

    def describe(self) -> str:
        if self.presets:
            return ("the paper's presets (atprobe train --preset, docs/presets.md), PGD-10 (eps 8/255, step 2/255) "
                    "in training and in the probes")
        n = "all" if self.true_n == 0 else f"{self.true_n:,}"
        return (f"{self.arch}; random labels: {self.random_n:,} training images, {self.random_epochs} epochs, "
                f"constant lr {_number(self.lr)}; true labels: {n} images, {self.true_epochs} epochs, lr decay at "
                f"50% and 75%; batch {self.batch_size}, PGD-{self.steps} (eps 8/255, step {_pixels(self.alpha)}) "
                "in training and in the probes")


#: The budgets; :func:`budget_for` picks one. docs/demo.md shows the pilot runs behind the sizes.
BUDGETS: dict[str, Budget] = {
    # The CI test's size: about a minute on two CPU cores (too small for any effect).
    "quick": Budget(
        name="quick", steps=2, alpha=4 / 255, random_n=128, random_epochs=3, random_eval_every=1, grad_ratio_iters=4,
        true_n=128, true_epochs=3, curve_n=64, curve_attack="pgd3", train_eval_n=64, probe_n=16, complexity_n=32,
        hardness_n=64, stability_lambdas="-0.05:0.05:3", stability_directions=1, dpi=60),
    # The README's main job: at most 10 minutes on the 2-core CI machine.
    "cpu": Budget(name="cpu"),
    # One GPU, about an hour (estimated from FLOPs, see docs/demo.md): ResNet-18, PGD-10.
    "gpu": Budget(
        name="gpu", arch="resnet18", steps=10, alpha=2 / 255, batch_size=128, random_n=5000, random_epochs=80,
        random_eval_every=5, grad_ratio_iters=1000, true_n=0, true_epochs=30, true_augment=True, curve_n=0,
        curve_attack="pgd10", train_eval_n=1000, probe_n=512, complexity_n=2000, hardness_n=0,
        stability_lambdas="-0.05:0.05:11", stability_directions=3, gradcos_first=True, dpi=100),
    # The paper's presets: WRN-28-10 and ResNet-18 on the whole of CIFAR-10, 300/200 epochs.
    "paper": Budget(
        name="paper", arch="wrn-28-10", steps=10, alpha=2 / 255, batch_size=128, grad_ratio_iters=1000, curve_n=0,
        curve_attack="pgd10", probe_n=1000, complexity_n=10000, hardness_n=0, stability_lambdas="-0.05:0.05:11",
        stability_directions=3, gradcos_first=True, presets=True),
}
#: what ``--budget`` accepts: a budget's name or ``auto`` (gpu on a CUDA device, else cpu)
BUDGET_CHOICES = ("auto", "cpu", "gpu", "paper", "quick")


def budget_for(name: str, device_type: str) -> Budget:
    """The budget called ``name``; ``auto`` is ``gpu`` on a CUDA device and ``cpu`` otherwise."""
    if name == "auto":
        name = "gpu" if device_type == "cuda" else "cpu"
    if name not in BUDGETS:
        raise AtprobeError(f"unknown budget {name!r}: choose from {', '.join(BUDGET_CHOICES)}")
    return BUDGETS[name]


@dataclass(frozen=True)
class DemoConfig:
    """What ``atprobe demo`` runs (the options of the command).

    ``dataset`` ``auto`` is cifar10 when ``data_dir`` is given, else the synthetic set.
    ``out`` must not exist or be an empty folder when the demo starts, unless ``resume``
    (then it must hold a demo of this very configuration: its steps whose files are all
    there are skipped, an interrupted training continues). ``budget``: a name of
    :data:`BUDGET_CHOICES` or a :class:`Budget` (for notebooks and tests)."""

    out: Path = Path("demo")
    dataset: str = "auto"
    data_dir: Path | None = None
    device: str = "auto"
    seed: int = 0
    budget: str | Budget = "auto"
    download: bool = False   # let the training steps fetch a missing real dataset (MD5-verified)
    resume: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.dataset == "auto":
            object.__setattr__(self, "dataset", "synthetic" if self.data_dir is None else "cifar10")
        if self.dataset not in DATASETS:
            raise AtprobeError(f"unknown dataset {self.dataset!r}: choose from auto, {', '.join(DATASETS)}")
        if self.dataset == "npz" and self.data_dir is None:
            raise AtprobeError("--dataset npz needs --data-dir (the .npz file or a folder with train.npz/test.npz)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise AtprobeError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.device, str) or not self.device:
            raise AtprobeError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.download and self.dataset == "synthetic":
            raise AtprobeError("--download is for real datasets: the synthetic one is made in memory")
        if isinstance(self.budget, str):
            if self.budget not in BUDGET_CHOICES:
                raise AtprobeError(f"unknown budget {self.budget!r}: choose from {', '.join(BUDGET_CHOICES)}")
        elif not isinstance(self.budget, Budget):
            raise AtprobeError("budget must be a budget's name or an atprobe.demo.Budget")
        if isinstance(self.budget, Budget) and self.budget.presets and self.dataset != "cifar10":
            raise AtprobeError("the paper budget trains on CIFAR-10: give --data-dir (and --download to fetch it)")

    def resolve_budget(self, device_type: str) -> Budget:
        budget = self.budget if isinstance(self.budget, Budget) else budget_for(self.budget, device_type)
        if budget.presets and self.dataset != "cifar10":
            raise AtprobeError("the paper budget trains on CIFAR-10: give --data-dir (and --download to fetch it)")
        return budget


@dataclass(frozen=True)
class Run:
    """One training run of the demo (its folder: ``runs/NAME``)."""

    name: str
    method: str              # pgd_at or trades
    random_labels: bool      # --label-noise 1.0
    what: str
    seed_offset: int = 0     # added to --seed
    mix_clean: bool = False  # Eq. 6
    te: bool = False         # temporal ensembling (Eq. 7)
    preset: str | None = None  # the paper budget's preset
    first_epochs: bool = False  # only the budget's first gradcos_epochs, every epoch kept (Fig. 4(b))

    @property
    def grad_ratio(self) -> bool:
        """Logs Fig. 3(b)'s gradient-norm ratios."""
        return self.random_labels and not self.mix_clean and not self.first_epochs


#: The runs of every budget (the paper budget takes each from its preset).
RUNS: tuple[Run, ...] = (
    Run("pgd_at-random", "pgd_at", True, "PGD-AT on completely random labels", preset="fig3-pgd-random"),
    Run("trades-random", "trades", True, "TRADES on completely random labels", preset="fig3-trades-random"),
    Run("pgd_at-eq6-random", "pgd_at", True, "PGD-AT with the clean loss ramped in (Eq. 6), random labels",
        mix_clean=True, preset="fig5-pgd-eq6-random"),
    Run("pgd_at-true", "pgd_at", False, "PGD-AT on the true labels, learning-rate decay", preset="table1-cifar10-pgd"),
    Run("pgd_at-te-true", "pgd_at", False, "PGD-AT+TE (Eq. 7) on the true labels, learning-rate decay", te=True,
        preset="table1-cifar10-pgd-te"),
    Run("pgd_at-true-seed1", "pgd_at", False, "PGD-AT on the true labels, another seed (for hardness)",
        seed_offset=1, preset="table1-cifar10-pgd"),
)
#: With ``gradcos_first``: the first epochs of the random-label runs, every epoch kept (gradcos).
FIRST_RUNS: tuple[Run, ...] = (
    Run("pgd_at-random-first", "pgd_at", True, "PGD-AT on random labels, the first epochs kept (Fig. 4(b))",
        preset="fig2-pgd-random", first_epochs=True),
    Run("trades-random-first", "trades", True, "TRADES on random labels, the first epochs kept (Fig. 4(b))",
        preset="fig2-trades-random", first_epochs=True),
)
#: The paper budget's Fig. 6 models: Table A.1's twelve TRADES runs (App. A.3).
TABLE_A1_RUNS: tuple[Run, ...] = tuple(
    Run(f"tableA1-{labels}-{reg}", "trades", labels == "random",
        f"TRADES on {labels} labels, regularizer {reg} (Table A.1, Fig. 6)", preset=f"tableA1-{labels}-{reg}")
    for labels in ("true", "random") for reg in ("none", "aug", "wd", "dropout", "aug-wd", "wd-dropout"))
PAPER_RUNS: tuple[Run, ...] = FIRST_RUNS + TABLE_A1_RUNS


def runs(budget: Budget) -> tuple[Run, ...]:
    """The training runs of ``budget``, in the order the demo trains them."""
    return RUNS + (FIRST_RUNS if budget.gradcos_first else ()) + (TABLE_A1_RUNS if budget.presets else ())


def gradcos_runs(budget: Budget) -> tuple[str, str]:
    """The runs whose successive epochs gradcos compares (PGD-AT, TRADES; random labels)."""
    first = budget.gradcos_first
    return ("pgd_at-random-first", "trades-random-first") if first else ("pgd_at-random", "trades-random")


def fig6_runs(budget: Budget) -> tuple[str, ...]:
    """The models Fig. 6's complexity measures are compared over."""
    return tuple(r.name for r in TABLE_A1_RUNS) if budget.presets else tuple(r.name for r in RUNS)


# --------------------------------------------------------------------------- what a step calls


def _as_run_by_demo(meta: Mapping[str, Any], command: Sequence[str]) -> dict[str, Any]:
    """``meta`` recording ``command`` (the step's equivalent command line) and that the demo ran it."""
    return {**meta, "command": list(command), "run_by": RUN_BY}


@dataclass(frozen=True)
class TrainCall:
    """``atprobe.train.train(config, OUT / out_dir)``: what ``atprobe train --out out_dir ...`` does
    (``--resume`` continues a run an interrupted demo left)."""

    config: TrainConfig
    out_dir: str

    def run(self, out: Path, device: torch.device, command: Sequence[str]) -> None:
        run_dir = out / self.out_dir
        if (run_dir / "last.pt").is_file():
            train(self.config, run_dir, device=device, resume=True, meta=_as_run_by_demo({}, command))
        else:  # a new run; a folder an interrupted first epoch left is replaced once this run completes
            train(self.config, run_dir, device=device, overwrite=run_dir.exists(),
                  meta=_as_run_by_demo({}, command))


@dataclass(frozen=True)
class ProbeCall:
    """``atprobe.studies.<function>(Study(checkpoints, data=data, root=OUT), [spec,] config,
    device, **options)``, its tables written to ``OUT / output``: what the probe's command
    does (after ``set_determinism(seed)``, as every command does first). ``spec`` is None for
    ``complexity`` (it takes ``n`` instead); ``hardness`` writes a folder
    (``studies.write_hardness``)."""

    function: str
    checkpoints: tuple[str, ...]
    data: DataSource
    spec: SampleSpec | None
    config: Any
    options: Mapping[str, Any]
    output: str
    seed: int

    def run(self, out: Path, device: torch.device, command: Sequence[str]) -> None:
        set_determinism(self.seed)
        study = Study(self.checkpoints, data=self.data, root=out)
        inputs = (self.config,) if self.spec is None else (self.spec, self.config)
        result = getattr(studies, self.function)(study, *inputs, device, **self.options)
        if self.function == "hardness":
            tables, drawn, _notes = result  # the notes are what the command prints without -q
            tables.meta = _as_run_by_demo(tables.meta, command)
            studies.write_hardness(out / self.output, tables, drawn)
        else:
            result.meta = _as_run_by_demo(result.meta, command)
            result.write(out / self.output)


@dataclass(frozen=True)
class TableCall:
    """``atprobe.studies.table(runs, spec, config, device, data=data, seed=seed, root=OUT)``,
    written to ``OUT / output``: what ``atprobe table RUN_DIR... -o output`` does."""

    runs: tuple[str, ...]
    data: DataSource
    spec: SampleSpec
    config: EvalConfig
    output: str
    seed: int

    def run(self, out: Path, device: torch.device, command: Sequence[str]) -> None:
        set_determinism(self.seed)
        result = studies.table(list(self.runs), self.spec, self.config, device, data=self.data,
                               threat=ThreatModel(), seed=self.seed, root=out)
        result.meta = _as_run_by_demo(result.meta, command)
        result.write(out / self.output)


@dataclass(frozen=True)
class PlotCall:
    """``atprobe.plot.save_figure(atprobe.plot.plot(csvs, kind), OUT / output, dpi)``: what
    ``atprobe plot CSV... -o output --dpi dpi`` does."""

    csvs: tuple[str, ...]
    kind: str | None
    output: str
    dpi: float

    def run(self, out: Path, device: torch.device, command: Sequence[str]) -> None:
        from atprobe import plot

        # the same labels as the command's: plot names each table by its path relative to the
        # folder they share, so reading them from OUT changes none
        fig = plot.plot([out / c for c in self.csvs], kind=self.kind)
        plot.save_figure(fig, out / self.output, dpi=self.dpi)


StepCall = TrainCall | ProbeCall | TableCall | PlotCall


@dataclass(frozen=True)
class Step:
    """One step of the demo: ``call`` (a library call with typed configs, paths relative to
    the output folder), ``args`` the equivalent ``atprobe`` command line (shown in the report,
    recorded in the meta; running it inside the output folder re-makes the files), and
    ``outputs`` the files it must leave there."""

    name: str
    args: tuple[str, ...]
    what: str
    call: StepCall
    outputs: tuple[str, ...] = ()

    @property
    def command(self) -> str:
        return " ".join(["atprobe", *(_quote(a) for a in self.args)])


@dataclass(frozen=True)
class Figure:
    """One figure of the report: a PNG under ``figures/`` drawn by ``atprobe plot`` (or a
    figure a command draws itself, ``made_by`` naming it), with its one-line caption."""

    file: str
    csvs: tuple[str, ...]
    title: str
    caption: str
    paper: str
    kind: str | None = None
    made_by: str | None = None   # a step that writes the figure itself (no plot step)
    finding: str | None = None   # the key of the finding it shows


@dataclass
class StepRecord:
    name: str
    command: str
    seconds: float
    skipped: bool = False  # --resume: its files were all there


def _quote(arg: str) -> str:
    safe = all(c.isalnum() or c in "-_./:=,+" for c in arg) and arg != ""
    return arg if safe else "'" + arg.replace("'", "'\\''") + "'"


def _number(value: float) -> str:
    """A float as a command-line number that parses back to the same float (``0.1``)."""
    return repr(float(value))


def _pixels(value: float) -> str:
    """A step size in pixel units as the commands take it: ``4/255`` when that is exactly the
    float (``atprobe.cli.common.NUMBER`` reads fractions), else its decimal."""
    k = round(value * 255)
    return f"{k}/255" if k / 255 == value else _number(value)




def _final(run: str) -> str:
    return f"runs/{run}/final.pt"


def _table(path: str) -> list[str]:
    return [path, path[: -len(".csv")] + ".meta.json"]


def _train_config(run: Run, budget: Budget, config: DemoConfig, data_dir: str | None,
                  threat: ThreatModel) -> tuple[TrainConfig, list[str]]:
    """The run's TrainConfig and its ``atprobe train`` options (without --out, data, device)."""
    b, seed = budget, config.seed + run.seed_offset
    data = {"dataset": config.dataset, "data_dir": data_dir, "download": config.download}
    if b.presets:
        overrides: dict[str, Any] = {**data, "seed": seed}
        args = ["--preset", run.preset]
        if run.random_labels:
            overrides["label_seed"] = config.seed
            args += ["--label-seed", str(config.seed)]
        if run.first_epochs:
            # the preset's lr is constant until its first decay (epoch 100): the first epochs of the full run
            overrides.update(epochs=b.gradcos_epochs, schedule="constant", save_every=1)
            args += ["--epochs", str(b.gradcos_epochs), "--schedule", "constant", "--save-every", "1"]
        return preset_config(run.preset, **overrides), [*args, "--seed", str(seed)]
    common = {"arch": b.arch, **data, "method": run.method, "batch_size": b.batch_size, "lr": b.lr, "threat": threat,
              "seed": seed}
    args = ["--arch", b.arch, "--method", run.method, "--batch-size", str(b.batch_size), "--lr", _number(b.lr),
            "--steps", str(b.steps), "--alpha", _pixels(b.alpha)]
    if run.random_labels:
        epochs = b.gradcos_epochs if run.first_epochs else b.random_epochs
        keep = run.first_epochs or (not b.gradcos_first and not run.mix_clean)
        fields = {"epochs": epochs, "train_n": b.random_n, "schedule": "constant", "weight_decay": 0.0,
                  "augment": False, "label_noise": 1.0, "label_seed": config.seed, "eval_n": b.curve_n,
                  "train_eval_n": b.random_n, "eval_attack": f"pgd{b.steps}", "eval_every": b.random_eval_every,
                  "mix_clean": run.mix_clean, "save_every": 1 if keep else 0,
                  "log_grad_ratio": b.grad_ratio_iters if run.grad_ratio else 0}
        args += ["--epochs", str(epochs), "--train-n", str(b.random_n), "--schedule", "constant",
                 "--weight-decay", "0.0", "--no-augment", "--label-noise", "1.0", "--label-seed", str(config.seed),
                 "--eval-n", str(b.curve_n), "--train-eval-n", str(b.random_n), "--eval-attack", f"pgd{b.steps}",
                 "--eval-every", str(b.random_eval_every)]
        args += ["--mix-clean"] if run.mix_clean else []
        args += ["--save-every", "1"] if keep else []
        if run.grad_ratio:
            args += ["--log-grad-ratio", str(b.grad_ratio_iters)]
    else:
        fields = {"epochs": b.true_epochs, "train_n": b.true_n, "schedule": "piecewise",
                  "weight_decay": b.true_weight_decay, "augment": b.true_augment, "eval_n": b.curve_n,
                  "train_eval_n": b.train_eval_n, "eval_attack": b.curve_attack, "te": run.te}
        args += ["--epochs", str(b.true_epochs), "--train-n", str(b.true_n), "--schedule", "piecewise",
                 "--weight-decay", _number(b.true_weight_decay), "--augment" if b.true_augment else "--no-augment",
                 "--eval-n", str(b.curve_n), "--train-eval-n", str(b.train_eval_n), "--eval-attack", b.curve_attack]
        args += ["--te"] if run.te else []
    args += ["--seed", str(seed)]
    return TrainConfig(**common, **fields), args


def steps(config: DemoConfig, budget: Budget, device: str) -> list[Step]:
    """Every step of the demo, in order (paths relative to the output folder); ``device`` is
    the ``--device`` its command lines show (the calls get the resolved device when run)."""
    b = budget
    data_dir = None if config.data_dir is None else str(config.data_dir)
    data_args = ["--dataset", config.dataset] + ([] if data_dir is None else ["--data-dir", data_dir])
    data_args += ["--download"] if config.download else []
    probe_data_args = [] if data_dir is None else ["--data-dir", data_dir]
    # the probes read the dataset the checkpoints record, from --data-dir, never downloading
    probe_data = DataSource(None, data_dir, False)
    common_args = ["--device", device, "--seed", str(config.seed), "-q"]
    attack_args = ["--steps", str(b.steps), "--alpha", _pixels(b.alpha)]
    threat = ThreatModel(steps=b.steps, alpha=b.alpha)
    seed = config.seed
    out: list[Step] = []

    for run in runs(b):
        train_config, options = _train_config(run, b, config, data_dir, threat)
        resolved = train_config.resolved()
        args = ["train", "--out", f"runs/{run.name}", *data_args, *options, "--device", device, "-q"]
        outputs = [f"runs/{run.name}/{f}" for f in ("config.json", "curves.csv", "curves.meta.json", "final.pt",
                                                      "best.pt")]
        if resolved.save_every:
            outputs += [f"runs/{run.name}/epoch_{e:04d}.pt" for e in range(resolved.save_every, resolved.epochs + 1,
                                                                          resolved.save_every)]
        if resolved.log_grad_ratio:
            outputs += _table(f"runs/{run.name}/gradratio.csv")
        out.append(Step(f"train {run.name}", tuple(args), run.what, TrainCall(train_config, f"runs/{run.name}"),
                        tuple(outputs)))

    def probe(name: str, args: list[str], what: str, outputs: list[str], function: str,
              checkpoints: Sequence[str], spec: SampleSpec | None, probe_config: Any, output: str,
              data: DataSource = probe_data, **options: Any) -> None:
        call = ProbeCall(function, tuple(checkpoints), data, spec, probe_config, options, output, seed)
        out.append(Step(name, tuple(args + probe_data_args + common_args), what, call, tuple(outputs)))

    def samples(n: int) -> SampleSpec:
        return SampleSpec(split="train", n=n)  # the first n training samples, trained labels

    batch = {"chunk_size": None, "batch_size": COMMAND_BATCH_SIZE, "bn_stats": BNStats()}
    stability_config = stability_probe.StabilityConfig(
        lambdas=parse_lambdas(b.stability_lambdas), directions=b.stability_directions, threat=threat, seed=seed)
    probe("stability at init",
          ["stability", "--init", b.arch, "--dataset", config.dataset, "--n", str(b.probe_n),
           f"--lambdas={b.stability_lambdas}", "--directions", str(b.stability_directions), *attack_args,
           "-o", "probes/stability_init.csv"],
          "gradient change along random filter-normalized directions at initialization (Fig. 4(a))",
          _table("probes/stability_init.csv"),
          "stability", [], samples(b.probe_n), stability_config, "probes/stability_init.csv",
          data=dataclasses.replace(probe_data, dataset=config.dataset), init_arch=b.arch, **batch)

    for name, loss in zip(gradcos_runs(b), ("pgd_at", "trades")):
        output = f"probes/gradcos_{name}.csv"
        probe(f"gradcos {name}",
              ["gradcos", f"runs/{name}", "--loss", loss, "--n", str(b.probe_n), *attack_args, "-o", output],
              f"gradient cosine between successive epochs of {name} (Fig. 4(b))", _table(output),
              "gradcos", [f"runs/{name}"], samples(b.probe_n),
              gradcos_probe.GradCosConfig(loss=loss, threat=threat, seed=seed), output, **batch)

    models = [_final(r) for r in fig6_runs(b)]
    measures = ("spectral", "l1", "margin", "curvature", "flatness", "gap")
    probe("complexity",
          ["complexity", *models, "--margin", "--n", str(b.complexity_n), *attack_args,
           "--measures", ",".join(measures),
           "-o", "probes/complexity.csv"],
          "complexity measures and robust generalization gaps of models on true and random labels (Fig. 6)",
          _table("probes/complexity.csv"),
          "complexity", models, None,
          complexity_probe.ComplexityConfig(measures=measures, margin=True, threat=threat,
                                            batch_size=COMMAND_BATCH_SIZE, seed=seed),
          "probes/complexity.csv", n=b.complexity_n)

    # hardness attacks with pgdK (the steps in the name), so its threat model keeps the default steps
    hard_attack, top_k = f"pgd{b.steps}", b.hardness_n // 10 if b.hardness_n else 1000
    pair = [_final("pgd_at-true"), _final("pgd_at-true-seed1")]
    probe("hardness",
          ["hardness", *pair, *(["--n", str(b.hardness_n)] if b.hardness_n else ["--all"]),
           "--attack", hard_attack, "--alpha", _pixels(b.alpha), "--top-k", str(top_k), "--out", "probes/hardness"],
          "per-sample adversarial training loss of two PGD-AT seeds and their rank agreement (Sec. 4.1)",
          _table("probes/hardness/per_sample.csv") + _table("probes/hardness/consistency.csv")
          + ["probes/hardness/hardest.png", "probes/hardness/sorted.png"],
          "hardness", pair,
          samples(b.hardness_n) if b.hardness_n else SampleSpec(split="train", default_n=None),
          hardness_probe.HardnessConfig(attack=hard_attack, threat=ThreatModel(alpha=b.alpha),
                                        batch_size=COMMAND_BATCH_SIZE, seed=seed, top_k=top_k),
          "probes/hardness", gallery_k=10, gallery_size=None)

    table_runs = ("runs/pgd_at-true", "runs/pgd_at-te-true")
    table_attacks = ("natural", b.curve_attack)
    out.append(Step(
        "table", ("table", *table_runs, "--attack", ",".join(table_attacks),
                  *(["--n", str(b.curve_n)] if b.curve_n else []), "-o", "probes/table.csv",
                  *probe_data_args, *common_args),
        "best and final checkpoints of PGD-AT and PGD-AT+TE (Table 1)",
        TableCall(table_runs, probe_data, SampleSpec(split="test", n=b.curve_n or None, default_n=None),
                  EvalConfig(attacks=tuple(parse_attack(a, ThreatModel()) for a in table_attacks),
                             batch_size=COMMAND_BATCH_SIZE, seed=seed),
                  "probes/table.csv", seed),
        tuple(_table("probes/table.csv"))))

    for fig in figures(b):
        if fig.made_by is not None:
            continue
        args = ["plot", *fig.csvs, "-o", fig.file, "--dpi", str(b.dpi), "-q"]
        if fig.kind is not None:
            args[1:1] = ["--kind", fig.kind]
        out.append(Step(f"plot {Path(fig.file).stem}", tuple(args), fig.title,
                        PlotCall(fig.csvs, fig.kind, fig.file, float(b.dpi)), (fig.file,)))
    return out


def figures(budget: Budget) -> list[Figure]:
    """The report's figures, in the order of the findings they show."""
    pgd_r, trades_r = gradcos_runs(budget)
    return [
        Figure("figures/fig2_random_labels.png", ("runs/pgd_at-random/curves.csv", "runs/trades-random/curves.csv"),
               "Fitting random labels: PGD-AT and TRADES",
               "Natural (left) and PGD (right) accuracy per epoch on the training set with its random labels "
               "(solid) and on the test set (dashed): a run that memorizes the random labels climbs towards 1 "
               "on the training set while the test set stays at chance.", "Fig. 2", finding="fig2_random_labels"),
        Figure("figures/fig3b_gradratio.png",
               ("runs/pgd_at-random/gradratio.csv", "runs/trades-random/gradratio.csv"),
               "Gradient-norm ratio over the first iterations",
               "Per training iteration on random labels: the norms of the gradients of the clean CE and of the "
               "robust term (left, log scale) and their ratio (right), ||grad R|| / ||grad CE|| for PGD-AT and "
               "||grad beta KL|| / ||grad CE|| for TRADES.", "Fig. 3(b)", finding="fig3b_gradient_ratio"),
        Figure("figures/fig4a_stability_init.png", ("probes/stability_init.csv",),
               "Gradient change along random directions at initialization",
               "Distance (left) and cosine (right) between a sample's gradient at theta + lam d and at theta "
               "(theta a fresh initialization with BatchNorm statistics recomputed, d filter-normalized), per "
               "objective.", "Fig. 4(a)", finding="fig4a_stability_init"),
        Figure("figures/fig4b_gradcos.png", (f"probes/gradcos_{pgd_r}.csv", f"probes/gradcos_{trades_r}.csv"),
               "Gradient cosine between successive epochs (random labels)",
               "Mean cosine (left) and distance (right) between each sample's gradients at epochs t and t+1: a "
               "low cosine means the per-sample gradients keep turning.", "Fig. 4(b)", finding="fig4b_gradcos"),
        Figure("figures/fig5_eq6.png", ("runs/pgd_at-random/curves.csv", "runs/pgd_at-eq6-random/curves.csv"),
               "Fitting random labels: PGD-AT with and without the clean loss (Eq. 6)",
               "As Fig. 2, for plain PGD-AT and PGD-AT with the clean loss ramped in (Eq. 6).", "Fig. 5",
               finding="fig5_clean_loss"),
        Figure("figures/fig6_complexity.png", ("probes/complexity.csv",),
               "Complexity measures against the robust generalization gap",
               "One panel per measure, each model a point at (train - test PGD accuracy, measure), marker = true or "
               "random labels, Kendall's tau in the title.", "Fig. 6", finding="fig6_flatness"),
        Figure("figures/fig7c_hardness.png", ("probes/hardness/per_sample.csv",), "Hard samples across seeds",
               "Training samples sorted by the first PGD-AT model's adversarial loss (line) with the second "
               "seed's loss on the same samples (points).", "Fig. 7(c), Sec. 4.1", kind="hardness",
               finding="sec41_hardness"),
        Figure("figures/table1_curves.png", ("runs/pgd_at-true/curves.csv", "runs/pgd_at-te-true/curves.csv"),
               "Robust overfitting: PGD-AT and PGD-AT+TE",
               "Natural and PGD accuracy per epoch, train (solid) and test (dashed), with the learning-rate "
               "decays: robust overfitting is the test PGD accuracy falling after its peak.", "Table 1, Fig. 1",
               finding="table1_te"),
        Figure("figures/table1.png", ("probes/table.csv",), "Best and final checkpoints",
               "Test accuracy of each run's best.pt (chosen by its PGD test accuracy) and final.pt.", "Table 1",
               kind="table", finding="table1_te"),
    ]


#: the steps whose tables each finding reads (besides the figures' plot steps)
def finding_steps(budget: Budget) -> dict[str, tuple[str, ...]]:
    pgd_r, trades_r = gradcos_runs(budget)
    return {
        "fig2_random_labels": ("train pgd_at-random", "train trades-random"),
        "fig3b_gradient_ratio": ("train pgd_at-random", "train trades-random"),
        "fig4a_stability_init": ("stability at init",),
        "fig4b_gradcos": (f"train {pgd_r}", f"train {trades_r}", f"gradcos {pgd_r}", f"gradcos {trades_r}"),
        "fig5_clean_loss": ("train pgd_at-random", "train pgd_at-eq6-random"),
        "fig6_flatness": (*(f"train {r}" for r in fig6_runs(budget)), "complexity"),
        "sec41_hardness": ("train pgd_at-true", "train pgd_at-true-seed1", "hardness"),
        "table1_te": ("train pgd_at-true", "train pgd_at-te-true", "table"),
    }


def expected_files(config: DemoConfig, budget: Budget) -> list[str]:
    """Every file the demo writes (relative to ``config.out``), the report's included."""
    files: list[str] = []
    for step in steps(config, budget, config.device):
        files.extend(step.outputs)
    files += [FINDINGS_CSV, "findings.meta.json", "demo.json", "demo.plan.json", "report.md", "index.html"]
    return sorted(set(files))


def _run_step(step: Step, out: Path, device: torch.device) -> None:
    step.call.run(out, device, ["atprobe", *step.args])
    missing = [f for f in step.outputs if not (out / f).is_file()]
    if missing:
        raise AtprobeError(f"it did not write {missing[0]}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return line if isinstance(exc, AtprobeError) else f"{type(exc).__name__}: {line}".rstrip(": ")


def demo_command(config: DemoConfig, budget: Budget) -> list[str]:
    """The ``atprobe demo`` command line of ``config`` (recorded in findings.meta.json)."""
    args = ["atprobe", "demo", "--out", str(config.out), "--budget", budget.name, "--dataset", config.dataset]
    args += [] if config.data_dir is None else ["--data-dir", str(config.data_dir)]
    args += ["--download"] if config.download else []
    return args + ["--device", config.device, "--seed", str(config.seed)]


def _plan_record(config: DemoConfig, budget: Budget, plan: Sequence[Step]) -> dict[str, Any]:
    """What a resumed demo must match: the budget and every step's command line."""
    return {"budget": dataclasses.asdict(budget), "dataset": config.dataset, "seed": config.seed,
            "steps": [step.command for step in plan]}


def _start(config: DemoConfig, budget: Budget, plan: Sequence[Step]) -> Path:
    """Check the output folder (new, or with ``resume`` a demo of this very plan) and record the plan."""
    record = _plan_record(config, budget, plan)
    plan_file = config.out / "demo.plan.json"
    if config.resume:
        if not plan_file.is_file():
            raise AtprobeError(f"cannot resume {config.out}: no demo.plan.json there (is it an atprobe demo folder?)")
        try:
            old = json.loads(plan_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise AtprobeError(f"cannot resume {config.out}: its demo.plan.json is damaged") from None
        if old != record:
            raise AtprobeError(f"cannot resume {config.out}: it holds a demo of another budget, dataset, seed or "
                               "version (its demo.plan.json differs); give a new --out")
        return config.out.resolve()
    check_new_directory(config.out, [config.data_dir], hint="give a new --out (the demo never overwrites), or "
                        "--resume to continue a demo there")
    out = config.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_json(record, out / "demo.plan.json")
    return out


def run_demo(config: DemoConfig, progress: Callable[[str], None] | None = None) -> Path:
    """Run every step of the demo into ``config.out``, judge every finding, and return the
    path of its report (``report.md``; ``index.html`` and ``findings.csv`` beside it).
    ``progress`` gets one line per step. A failing step stops the demo with an
    :class:`AtprobeError` naming the step; the findings and the report are written last, so
    a report means a complete demo. With ``config.resume``, steps whose files are all there
    are skipped."""
    from atprobe.distributed import single_process_only
    from atprobe.runtime import resolve_device

    single_process_only("demo")  # its steps are whole commands, each with its own output folder
    say = progress or (lambda line: None)
    device = resolve_device(config.device)
    budget = config.resolve_budget(device.type)
    if config.data_dir is not None:
        config = dataclasses.replace(config, data_dir=config.data_dir.resolve())
        if not config.data_dir.exists() and not config.download:
            raise AtprobeError(f"--data-dir {config.data_dir} does not exist "
                               "(add --download to fetch the dataset there)")
    plan = steps(config, budget, config.device)
    out = _start(config, budget, plan)
    say(f"atprobe demo: {len(plan)} steps into {config.out} ({config.dataset}, {device}, budget "
        f"{budget.name}: {budget.describe()})")
    records: list[StepRecord] = []
    start = time.perf_counter()
    for k, step in enumerate(plan, 1):
        if config.resume and all((out / f).is_file() for f in step.outputs):
            say(f"[{k:>2}/{len(plan)}] {step.name}: done before, skipped")
            records.append(StepRecord(step.name, step.command, 0.0, skipped=True))
            continue
        say(f"[{k:>2}/{len(plan)}] {step.name}: {step.what}")
        t0 = time.perf_counter()
        try:
            _run_step(step, out, device)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one line naming the step, whatever went wrong
            raise AtprobeError(f"demo step {k}/{len(plan)} '{step.name}' failed: {_first_line(exc)}") from None
        records.append(StepRecord(step.name, step.command, round(time.perf_counter() - t0, 2)))
    measured = measure_findings(out, budget)
    total = time.perf_counter() - start
    write_findings(out, config, budget, measured)
    path = report(out, config, budget, str(device), records, total, measured)
    for f in rules.FINDINGS:
        say(f"  {f.number}. {f.source}: {measured[f.key].verdict}")
    say(f"done in {total:.0f} s: open {config.out / 'index.html'} (or {config.out / 'report.md'})")
    return path


# --------------------------------------------------------------------------- the findings


def _read(out: Path, path: str) -> pd.DataFrame:
    return pd.read_csv(out / path)


def _run_config(out: Path, run: str) -> dict[str, Any]:
    return json.loads((out / "runs" / run / "config.json").read_text())


def _fit_rule(out: Path, leader: str, lagger: str, names: tuple[str, str]) -> rules.Measured:
    """Figs. 2 and 5 from the two runs' curves: n is each run's --train-eval-n, the robust
    metric its --eval-attack."""
    configs = [_run_config(out, r) for r in (leader, lagger)]
    attacks = {c["eval_attack"] for c in configs}
    if len(attacks) != 1:
        raise AtprobeError(f"runs {leader} and {lagger} measured robust accuracy with different attacks")
    ns = [int(c["train_eval_n"]) for c in configs]
    if min(ns) <= 0:
        raise AtprobeError("the random-label runs must measure their training accuracy on a stated number of "
                           "samples (--train-eval-n > 0)")
    return rules.fits_where_other_lags(_read(out, f"runs/{leader}/curves.csv"), _read(out, f"runs/{lagger}/curves.csv"),
                                       ns[0], ns[1], f"{attacks.pop()}_acc", names)


def measure_findings(out: str | Path, budget: Budget) -> dict[str, rules.Measured]:
    """Every finding's statistic and verdict, from the tables the demo's steps wrote in ``out``
    (each rule of ``atprobe.findings`` on the tables its finding names)."""
    out = Path(out)
    pgd_r, trades_r = gradcos_runs(budget)
    return {
        "fig2_random_labels": _fit_rule(out, "trades-random", "pgd_at-random", ("TRADES", "PGD-AT")),
        "fig3b_gradient_ratio": rules.gradratio_rule(_read(out, "runs/pgd_at-random/gradratio.csv"),
                                                     _read(out, "runs/trades-random/gradratio.csv")),
        "fig4a_stability_init": rules.stability_rule(_read(out, "probes/stability_init.csv")),
        "fig4b_gradcos": rules.gradcos_rule(_read(out, f"probes/gradcos_{pgd_r}.csv"),
                                            _read(out, f"probes/gradcos_{trades_r}.csv")),
        "fig5_clean_loss": _fit_rule(out, "pgd_at-eq6-random", "pgd_at-random", ("Eq. 6", "PGD-AT")),
        "fig6_flatness": rules.complexity_rule(_read(out, "probes/complexity.csv")),
        "sec41_hardness": rules.hardness_rule(_read(out, "probes/hardness/consistency.csv")),
        "table1_te": rules.overfitting_rule(_read(out, "probes/table.csv"), "runs/pgd_at-true", "runs/pgd_at-te-true",
                                            budget.curve_attack),
    }


def _finding_figures(budget: Budget) -> dict[str, list[Figure]]:
    shown: dict[str, list[Figure]] = {f.key: [] for f in rules.FINDINGS}
    for fig in figures(budget):
        if fig.finding is not None:
            shown[fig.finding].append(fig)
    return shown


def findings_frame(measured: Mapping[str, rules.Measured], budget: Budget) -> pd.DataFrame:
    """``findings.csv``: :func:`atprobe.findings.findings_table` with each finding's first
    figure (a path relative to the demo's folder)."""
    table = rules.findings_table(measured)
    shown = _finding_figures(budget)
    table["figure"] = [shown[k][0].file if shown[k] else "" for k in table["key"]]
    return table


def write_findings(out: Path, config: DemoConfig, budget: Budget, measured: Mapping[str, rules.Measured]) -> Path:
    """``findings.csv`` and its ``.meta.json`` (the demo's command, versions, seed, the SHA-256
    of every run's final.pt and best.pt, and the commands behind each finding)."""
    from atprobe.checkpoint import file_sha256

    table = findings_frame(measured, budget)
    commands = {s.name: s.command for s in steps(config, budget, config.device)}
    behind = {key: [commands[name] for name in names] for key, names in finding_steps(budget).items()}
    hashes = [{"path": f"runs/{r.name}/{name}", "sha256": file_sha256(out / "runs" / r.name / name)}
              for r in runs(budget) for name in ("best.pt", "final.pt")]
    meta = run_meta(seed=config.seed, argv=demo_command(config, budget),
                    config={"budget": dataclasses.asdict(budget), "dataset": config.dataset},
                    extra={"run_by": RUN_BY, "run_checkpoints": hashes, "commands": behind,
                           "verdicts": list(rules.VERDICTS), "rows": len(table), "columns": list(table.columns)})
    return write_tables([(table, out / FINDINGS_CSV, meta)])[0]


# --------------------------------------------------------------------------- the report


def _md_table(rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _html_table(rows: list[list[str]], raw: bool = False) -> str:
    """``raw``: the body cells are HTML already (links)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{c if raw else html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _value(m: rules.Measured, unit: str) -> str:
    if not math.isfinite(m.statistic):
        return "undefined"
    digits = 1 if unit == "points" else 3
    return f"{m.statistic:.{digits}f} {unit}"


def report(out: Path, config: DemoConfig, budget: Budget, device: str, records: Sequence[StepRecord],
           total_s: float, measured: Mapping[str, rules.Measured]) -> Path:
    """Write ``demo.json`` (config, budget, every command and its time), ``report.md`` and
    ``index.html`` into ``out``; return the path of ``report.md``. The report opens with the
    findings table (finding, paper, measured, verdict, figure, commands); a section per
    finding follows. Every figure of :func:`figures` must exist."""
    out = Path(out)
    by_name = {r.name: r for r in records}
    figs = figures(budget)
    missing = [f.file for f in figs if not (out / f.file).is_file()]
    if missing:
        raise AtprobeError(f"the report's figure {missing[0]} is missing")
    train_s = sum(r.seconds for r in records if r.name.startswith("train "))
    plot_s = sum(r.seconds for r in records if r.name.startswith("plot "))
    probe_s = sum(r.seconds for r in records) - train_s - plot_s
    write_json({
        "config": {"out": str(config.out), "dataset": config.dataset,
                   "data_dir": None if config.data_dir is None else str(config.data_dir),
                   "device": config.device, "resolved_device": device, "seed": config.seed,
                   "budget": budget.name, "download": config.download, "resume": config.resume},
        "budget": dataclasses.asdict(budget),
        "total_seconds": round(total_s, 1),
        "steps": [dataclasses.asdict(r) for r in records],
    }, out / "demo.json")

    shown = _finding_figures(budget)
    behind = finding_steps(budget)
    plot_of = {f.file: f"plot {Path(f.file).stem}" for f in figs}
    data_text = config.dataset + ("" if config.data_dir is None else f" ({config.data_dir.name})")
    skipped = sum(r.skipped for r in records)
    counts = {v: sum(m.verdict == v for m in measured.values()) for v in rules.VERDICTS}
    intro = (f"`atprobe demo --budget {budget.name}` measured eight findings of {PAPER} on {data_text} in "
             f"{total_s:.0f} s on {device} (training {train_s:.0f} s, probes {probe_s:.0f} s, figures {plot_s:.0f} s"
             + (f"; {skipped} steps done by an earlier run" if skipped else "") + f"): {budget.describe()}. "
             + ", ".join(f"{n} {v}" for v, n in counts.items()) + ". Each verdict comes from a rule fixed in "
             "`atprobe.findings` before anything was measured (docs/demo.md): `reproduced` is the paper's effect "
             "beyond the measurement's noise, `contradicted` the opposite effect as clearly, `not at this size` "
             "anything else.")

    def anchor(key: str) -> str:
        return f"finding-{key.replace('_', '-')}"

    md_rows = [["#", "finding", "paper", "measured", "verdict", "figure"]]
    html_rows = [["#", "finding", "paper", "measured", "verdict", "figure"]]
    for f in rules.FINDINGS:
        m = measured[f.key]
        fig = shown[f.key][0].file if shown[f.key] else ""
        md_rows.append([str(f.number), f"[{f.source}](#{anchor(f.key)}): {f.claim}", f.paper,
                        f"{_value(m, f.unit)}: {m.detail}", f"**{m.verdict}**", f"[png]({fig})" if fig else ""])
        html_rows.append([str(f.number), f'<a href="#{anchor(f.key)}">{html.escape(f.source)}</a>: '
                          f"{html.escape(f.claim)}", html.escape(f.paper),
                          f"{html.escape(_value(m, f.unit))}: {html.escape(m.detail)}",
                          f'<b class="v-{m.verdict.replace(" ", "-")}">{html.escape(m.verdict)}</b>',
                          f'<a href="{html.escape(fig)}">png</a>' if fig else ""])

    runs_rows = [["run", "what"]] + [[f"runs/{r.name}", r.what] for r in runs(budget)]
    md = [f"# atprobe demo: the findings of Dong et al. (ICLR 2022), budget {budget.name}", "", intro, "",
          f"The same table is `{FINDINGS_CSV}` (its `.meta.json` records the commands behind each finding).", "",
          _md_table(md_rows), ""]
    body = [f"<h1>atprobe demo: the findings of Dong et al. (ICLR 2022), budget {html.escape(budget.name)}</h1>",
            f"<p>{_code(intro)}</p>",
            f"<p>The same table is <code>{FINDINGS_CSV}</code> (its <code>.meta.json</code> records the commands "
            "behind each finding).</p>", _html_table(html_rows, raw=True)]
    for f in rules.FINDINGS:
        m = measured[f.key]
        commands = [by_name[name].command for name in behind[f.key]]
        commands += [by_name[plot_of[fig.file]].command for fig in shown[f.key] if fig.file in plot_of]
        md += [f'<a id="{anchor(f.key)}"></a>', "", f"## {f.number}. {f.source}: {m.verdict}", "",
               f"**Claim.** {f.claim} **Paper:** {f.paper}.", "",
               f"**Statistic.** {f.statistic} ({f.unit}). **Rule.** {f.rule}; otherwise not at this size.", "",
               f"**Measured.** {_value(m, f.unit)}: {m.detail}.", ""]
        body += [f'<section id="{anchor(f.key)}"><h2>{f.number}. {html.escape(f.source)}: '
                 f'<span class="v-{m.verdict.replace(" ", "-")}">{html.escape(m.verdict)}</span></h2>',
                 f"<p><b>Claim.</b> {html.escape(f.claim)} <b>Paper:</b> {html.escape(f.paper)}.</p>",
                 f"<p><b>Statistic.</b> {html.escape(f.statistic)} ({html.escape(f.unit)}). <b>Rule.</b> "
                 f"{html.escape(f.rule)}; otherwise not at this size.</p>",
                 f"<p><b>Measured.</b> {html.escape(_value(m, f.unit))}: {html.escape(m.detail)}.</p>"]
        for fig in shown[f.key]:
            md += [f"![{fig.title}]({fig.file})", "", f"*{fig.title}.* {fig.caption} *Mirrors {fig.paper}.*", ""]
            body += [f'<a href="{html.escape(fig.file)}"><img src="{html.escape(fig.file)}" '
                     f'alt="{html.escape(fig.title)}"></a>',
                     f"<p><em>{html.escape(fig.title)}.</em> {html.escape(fig.caption)} "
                     f"<em>Mirrors {html.escape(fig.paper)}.</em></p>"]
        md += ["Commands (run inside this folder to re-make the files):", "", "```bash", *commands, "```", ""]
        body += ["<p>Commands (run inside this folder to re-make the files):</p>",
                 f"<pre>{html.escape(chr(10).join(commands))}</pre></section>"]
    step_rows = [["step", "command", "seconds"]] + [
        [r.name, f"`{r.command}`", "skipped" if r.skipped else f"{r.seconds:.1f}"] for r in records]
    md += ["## The runs", "", _md_table(runs_rows), "", "## Every step", "", _md_table(step_rows), ""]
    body += ["<h2>The runs</h2>", _html_table(runs_rows), "<h2>Every step</h2>",
             _html_table([[a, b.strip("`"), c] for a, b, c in step_rows])]
    md_path = atomic_write_bytes(out / "report.md", "\n".join(md).encode())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>atprobe demo: findings</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1250px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }}
pre {{ background: #f4f4f4; padding: 0.4em 0.6em; white-space: pre-wrap; word-break: break-all; }}
code {{ background: #f4f4f4; padding: 0 0.2em; }}
section {{ margin-bottom: 2.2em; }}
.v-reproduced {{ color: #1a7f37; }} .v-contradicted {{ color: #cf222e; }} .v-not-at-this-size {{ color: #9a6700; }}
</style></head>
<body>
{chr(10).join(body)}
</body></html>
"""
    atomic_write_bytes(out / "index.html", page.encode())
    return md_path


def _code(text: str) -> str:
    """``code`` spans of Markdown text as <code>, the rest escaped."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{s}</code>" if i % 2 else s for i, s in enumerate(parts))
