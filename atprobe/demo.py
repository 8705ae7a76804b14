"""``atprobe demo``: the whole toolkit end to end, in one command.

Trains five small models (PGD-AT and TRADES on true and on random labels, and a second
PGD-AT seed), runs every probe on them, draws every figure and writes a report
(``report.md`` and ``index.html``) that shows each figure with one line on what it shows and
which figure of Dong et al., *Exploring Memorization in Adversarial Training* (ICLR 2022)
it mirrors.

Each step calls the library function its ``atprobe`` command calls (``atprobe.train.train``,
one function of ``atprobe.studies`` per probe, ``atprobe.plot`` for the figures) with the
typed config that command would build, and carries that command line (:attr:`Step.args`)
for the report and for each CSV's ``.meta.json``, so a user can re-run it inside the output
folder to re-make the file. Paths are relative to the output folder and read from there
(``Study(..., root=out)``): the demo never changes the working directory or ``sys.argv``,
and no probe logic lives here.

From Python::

    from atprobe.demo import DemoConfig, run_demo
    report = run_demo(DemoConfig(out="demo", quick=True), progress=print)

Sizes (:class:`Budget`) are picked by :func:`budget_for` from the dataset, the device and
``quick``: ``synthetic`` on a CPU (the default: a few minutes on two cores), a real dataset
on a CPU (``cifar10`` against a 5,000-image subset: about 11 minutes), any dataset
on a GPU (ResNet-18 on the whole training set), and ``quick`` (the CI test's size).
docs/demo.md lists every step, output and budget.
"""

from __future__ import annotations

import dataclasses
import html
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atprobe import studies
from atprobe.attacks import parse_attack
from atprobe.bnstats import BNStats
from atprobe.data import DATASETS
from atprobe.directions import parse_lambdas
from atprobe.errors import AtprobeError
from atprobe.evaluate import EvalConfig
from atprobe.io import atomic_write_bytes, write_json
from atprobe.outputs import check_new_directory
from atprobe.probes import complexity as complexity_probe
from atprobe.probes import curvature as curvature_probe
from atprobe.probes import flatness as flatness_probe
from atprobe.probes import gradcos as gradcos_probe
from atprobe.probes import gradnorm as gradnorm_probe
from atprobe.probes import hardness as hardness_probe
from atprobe.probes import hessian as hessian_probe
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
    "RUNS",
    "RUN_BY",
    "Run",
    "Step",
    "StepRecord",
    "TrainCall",
    "budget_for",
    "expected_files",
    "figures",
    "report",
    "run_demo",
    "steps",
]

PAPER = "Dong et al., Exploring Memorization in Adversarial Training (ICLR 2022)"
MORE = ("What each probe computes, its options and its CSV columns: `atprobe COMMAND --help` and the "
        "command's page in atprobe's docs/ (docs/probes/COMMAND.md, docs/plot.md for the figures).")
#: The ``run_by`` key of every ``.meta.json`` the demo writes: its ``command`` is the
#: equivalent command line, not the process's own (which ran ``atprobe demo``).
RUN_BY = "atprobe demo"
#: ``--batch-size`` of the probe commands when not given (cli/common.py). The demo's command
#: lines leave it out, so their calls pass this value; tests/test_demo.py parses each command
#: line with the click command and checks that it builds the very same call.
COMMAND_BATCH_SIZE = 256


@dataclass(frozen=True)
class Budget:
    """How big the demo is. Every field becomes an option of one of the commands."""

    name: str
    arch: str = "cnn-small"
    train_n: int = 256            # atprobe train --train-n (0 = the whole training split)
    epochs: int = 3               # every epoch is kept (--save-every 1) for gradcos/gradnorm
    batch_size: int = 64
    steps: int = 2                # PGD steps of training and of every probe's attack
    alpha: float = 4 / 255        # their step size (eps is 8/255 throughout)
    lr: float = 0.1
    # constant on the CPU: with a few epochs a decaying rate would make the last epochs' gradients
    # alike for a trivial reason (gradcos near 1); the GPU budget uses the paper's piecewise decay
    schedule: str = "constant"
    curve_n: int = 128            # atprobe train --eval-n: samples per learning-curve point
    curve_attack: str = "pgd5"    # atprobe train --eval-attack
    grad_ratio_iters: int = 12    # atprobe train --log-grad-ratio (gradratio.csv, Fig. 3(b))
    eval_n: int = 200             # atprobe eval --n (test split; 0 = the whole split)
    eval_attacks: tuple[str, ...] = ("natural", "pgd10")
    probe_n: int = 32             # gradnorm, stability, gradcos, curvature, hessian, flatness --n
    noisy_n: int = 64             # gradnorm --noisy-vs-clean --n
    complexity_n: int = 64        # complexity --n
    hardness_n: int = 256         # hardness --n (training samples; 0 = --all)
    # complexity --measures (() = all): the CPU budgets leave out ``hessian``, which runs at
    # its fixed defaults there (100 power iterations, 100 Hutchinson probes: ~20 s per model on
    # a CPU core); ``atprobe hessian`` still measures the Hessian, with this budget's sizes.
    complexity_measures: tuple[str, ...] = ("spectral", "l1", "margin", "curvature", "flatness", "gap")
    stability_lambdas: str = "-0.05:0.05:5"   # a --lambdas grid (START:STOP:NUM), atprobe.directions.parse_lambdas
    stability_directions: int = 1
    flatness_lambdas: str = "-0.5:0.5:5"
    flatness_directions: int = 2
    curvature_iterations: int = 10
    hessian_iterations: int = 10
    hessian_trace_samples: int = 10
    hessian_density_steps: int = 20
    dpi: int = 100                # figures: (figure inches x dpi) pixels

    def __post_init__(self) -> None:
        kinds = {f.name: f.type for f in dataclasses.fields(self)}
        for name, kind in kinds.items():
            value = getattr(self, name)
            if kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise AtprobeError(f"budget {name} must be an integer, got {value!r}")
            if kind == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or value <= 0:
                    raise AtprobeError(f"budget {name} must be a finite number > 0, got {value!r}")
                object.__setattr__(self, name, float(value))
            if kind == "tuple[str, ...]":
                # a comma-separated string would be iterated letter by letter
                if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                    raise AtprobeError(f"budget {name} must be a tuple of names, e.g. ('natural', 'pgd10'), "
                                       f"got {value!r}")
                object.__setattr__(self, name, tuple(value))
        minimum = {"epochs": 2, "train_n": 0, "grad_ratio_iters": 0, "eval_n": 0, "hardness_n": 0}
        for name, kind in kinds.items():
            if kind == "int" and getattr(self, name) < minimum.get(name, 1):
                raise AtprobeError(f"budget {name} must be >= {minimum.get(name, 1)} "
                                   f"(gradcos needs two epochs), got {getattr(self, name)}")
        if not self.eval_attacks:
            raise AtprobeError("budget eval_attacks must name at least one attack")
        for grid in (self.stability_lambdas, self.flatness_lambdas):
            parse_lambdas(grid)  # a bad grid fails here, not at its probe's step

    def describe(self) -> str:
        n = "all" if self.train_n == 0 else f"{self.train_n:,}"
        return (f"{self.arch}, {n} training images, {self.epochs} epochs, batch {self.batch_size}, "
                f"lr {_number(self.lr)} ({self.schedule}), "
                f"PGD-{self.steps} (eps 8/255, step {_pixels(self.alpha)}) in training and in the probes, "
                f"probes on {self.probe_n} samples")


#: The budgets; :func:`budget_for` picks one.
BUDGETS: dict[str, Budget] = {
    # The CI test's size: about a minute on two CPU cores.
    "quick": Budget(
        name="quick", train_n=128, epochs=2, curve_n=64, curve_attack="pgd3", grad_ratio_iters=4, eval_n=64,
        eval_attacks=("natural", "pgd5"), probe_n=16, noisy_n=32, complexity_n=32, hardness_n=64,
        stability_lambdas="-0.05:0.05:3", flatness_lambdas="-0.5:0.5:3", curvature_iterations=5,
        hessian_iterations=5, hessian_trace_samples=5, hessian_density_steps=10, dpi=80),
    # The default (the README's main job): synthetic data on a CPU, about 3 minutes on two cores.
    "synthetic-cpu": Budget(name="synthetic-cpu"),
    # A real dataset on a CPU (cifar10 against ../shared/data/cifar-10-subset: ~11 minutes).
    "real-cpu": Budget(
        name="real-cpu", train_n=2000, epochs=8, batch_size=128, curve_n=256, grad_ratio_iters=16, eval_n=500,
        probe_n=64, noisy_n=128, complexity_n=128, hardness_n=1000, stability_lambdas="-0.05:0.05:7",
        flatness_lambdas="-0.5:0.5:7", flatness_directions=3, curvature_iterations=20,
        hessian_iterations=20, hessian_trace_samples=20, hessian_density_steps=40),
    # A GPU: ResNet-18 on the whole training split, PGD-10 (the paper's attack), 20 epochs.
    "cuda": Budget(
        name="cuda", arch="resnet18", train_n=0, epochs=20, batch_size=128, steps=10, alpha=2 / 255,
        schedule="piecewise", curve_n=1000, curve_attack="pgd10", grad_ratio_iters=200, eval_n=0,
        eval_attacks=("natural", "pgd20"), probe_n=512, noisy_n=1000, complexity_n=1000, hardness_n=0,
        stability_lambdas="-0.05:0.05:21", stability_directions=3, flatness_lambdas="-0.5:0.5:11",
        flatness_directions=5, curvature_iterations=20, hessian_iterations=50, hessian_trace_samples=50,
        hessian_density_steps=100, complexity_measures=()),
}


def budget_for(dataset: str, device_type: str, quick: bool = False) -> Budget:
    """``quick`` wins; then a GPU; then synthetic vs a real dataset on the CPU."""
    if quick:
        return BUDGETS["quick"]
    if device_type == "cuda":
        return BUDGETS["cuda"]
    return BUDGETS["synthetic-cpu" if dataset == "synthetic" else "real-cpu"]


@dataclass(frozen=True)
class DemoConfig:
    """What ``atprobe demo`` runs (the options of the command).

    ``out`` must not exist or be an empty folder when the demo starts (it never overwrites).
    ``budget`` overrides the size :func:`budget_for` would pick from the dataset, the device
    and ``quick`` (for notebooks and experiments)."""

    out: Path = Path("demo")
    dataset: str = "synthetic"
    data_dir: Path | None = None
    device: str = "auto"
    seed: int = 0
    quick: bool = False
    download: bool = False   # let the training steps fetch a missing real dataset (MD5-verified)
    budget: Budget | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.dataset not in DATASETS:
            raise AtprobeError(f"unknown dataset {self.dataset!r}: choose from {', '.join(DATASETS)}")
        if self.dataset == "npz" and self.data_dir is None:
            raise AtprobeError("--dataset npz needs --data-dir (the .npz file or a folder with train.npz/test.npz)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise AtprobeError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.device, str) or not self.device:
            raise AtprobeError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.download and self.dataset == "synthetic":
            raise AtprobeError("--download is for real datasets: the synthetic one is made in memory")
        if self.budget is not None and not isinstance(self.budget, Budget):
            raise AtprobeError("budget must be an atprobe.demo.Budget")


@dataclass(frozen=True)
class Run:
    """One training run of the demo."""

    name: str            # its folder under runs/
    method: str          # pgd_at or trades
    random_labels: bool  # --label-noise 1.0
    seed_offset: int     # added to --seed
    what: str


RUNS: tuple[Run, ...] = (
    Run("pgd_at-true", "pgd_at", False, 0, "PGD-AT on the true labels"),
    Run("trades-true", "trades", False, 0, "TRADES on the true labels"),
    Run("pgd_at-random", "pgd_at", True, 0, "PGD-AT on completely random labels"),
    Run("trades-random", "trades", True, 0, "TRADES on completely random labels"),
    Run("pgd_at-true-seed1", "pgd_at", False, 1, "PGD-AT on the true labels, another seed (for hardness)"),
)


# --------------------------------------------------------------------------- what a step calls


def _as_run_by_demo(meta: Mapping[str, Any], command: Sequence[str]) -> dict[str, Any]:
    """``meta`` recording ``command`` (the step's equivalent command line) and that the demo ran it."""
    return {**meta, "command": list(command), "run_by": RUN_BY}


@dataclass(frozen=True)
class TrainCall:
    """``atprobe.train.train(config, OUT / out_dir)``: what ``atprobe train --out out_dir ...`` does."""

    config: TrainConfig
    out_dir: str

    def run(self, out: Path, device: torch.device, command: Sequence[str]) -> None:
        train(self.config, out / self.out_dir, device=device, meta=_as_run_by_demo({}, command))


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


StepCall = TrainCall | ProbeCall | PlotCall


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


@dataclass
class StepRecord:
    name: str
    command: str
    seconds: float


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


def _final(run: Run) -> str:
    return f"runs/{run.name}/final.pt"


def _epochs(run: Run, budget: Budget) -> list[str]:
    return [f"runs/{run.name}/epoch_{e:04d}.pt" for e in range(1, budget.epochs + 1)]


def _run(name: str) -> Run:
    return next(r for r in RUNS if r.name == name)


def _table(path: str) -> list[str]:
    return [path, path[: -len(".csv")] + ".meta.json"]


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

    for run in RUNS:
        log_ratio = b.grad_ratio_iters if run.seed_offset == 0 else 0
        train_config = TrainConfig(
            arch=b.arch, dataset=config.dataset, data_dir=data_dir, download=config.download, method=run.method,
            epochs=b.epochs, train_n=b.train_n, batch_size=b.batch_size, lr=b.lr, schedule=b.schedule,
            threat=threat, eval_n=b.curve_n, eval_attack=b.curve_attack, save_every=1,
            label_noise=1.0 if run.random_labels else 0.0, label_seed=seed if run.random_labels else 0,
            log_grad_ratio=log_ratio, seed=seed + run.seed_offset)
        args = ["train", "--out", f"runs/{run.name}", "--arch", b.arch, *data_args, "--method", run.method,
                "--epochs", str(b.epochs), "--train-n", str(b.train_n), "--batch-size", str(b.batch_size),
                "--lr", _number(b.lr), "--schedule", b.schedule, *attack_args, "--eval-n", str(b.curve_n),
                "--eval-attack", b.curve_attack, "--save-every", "1"]
        if run.random_labels:
            args += ["--label-noise", "1.0", "--label-seed", str(seed)]
        if log_ratio:
            args += ["--log-grad-ratio", str(log_ratio)]
        args += ["--device", device, "--seed", str(seed + run.seed_offset), "-q"]
        outputs = [f"runs/{run.name}/{f}" for f in ("config.json", "curves.csv", "curves.meta.json", "final.pt")]
        outputs += _epochs(run, b)
        if log_ratio:
            outputs += [f"runs/{run.name}/gradratio.csv", f"runs/{run.name}/gradratio.meta.json"]
        out.append(Step(f"train {run.name}", tuple(args), run.what, TrainCall(train_config, f"runs/{run.name}"),
                        tuple(outputs)))

    def probe(name: str, args: list[str], what: str, outputs: list[str], function: str,
              checkpoints: Sequence[str], spec: SampleSpec | None, probe_config: Any, output: str,
              data: DataSource = probe_data, **options: Any) -> None:
        call = ProbeCall(function, tuple(checkpoints), data, spec, probe_config, options, output, seed)
        out.append(Step(name, tuple(args + probe_data_args + common_args), what, call, tuple(outputs)))

    def samples(n: int) -> SampleSpec:
        return SampleSpec(split="train", n=n)  # the first n training samples, trained labels

    # the gradient probes' defaults
    batch = {"chunk_size": None, "batch_size": COMMAND_BATCH_SIZE, "bn_stats": BNStats()}
    pgd, trades = _run("pgd_at-true"), _run("trades-true")
    pgd_r, trades_r = _run("pgd_at-random"), _run("trades-random")
    seed1 = _run("pgd_at-true-seed1")
    finals = [_final(r) for r in RUNS]

    probe("eval", ["eval", *finals, "--attack", ",".join(b.eval_attacks), "--split", "test",
                   *(["--n", str(b.eval_n)] if b.eval_n else []), "-o", "probes/eval.csv"],
          "natural and PGD test accuracy of the five models", _table("probes/eval.csv"),
          "evaluation", finals, SampleSpec(split="test", n=b.eval_n or None, default_n=None),
          EvalConfig(attacks=tuple(parse_attack(a, ThreatModel()) for a in b.eval_attacks),
                     batch_size=COMMAND_BATCH_SIZE, seed=seed),
          "probes/eval.csv", threat=ThreatModel(), seed=seed, per_sample=False)

    training = [*_epochs(pgd, b), *_epochs(trades, b)]
    probe("gradnorm over training",
          ["gradnorm", *training, "--n", str(b.probe_n), *attack_args, "-o", "probes/gradnorm_training.csv"],
          "per-sample gradient norms of the objectives' parts at every epoch (true labels)",
          _table("probes/gradnorm_training.csv"),
          "gradnorm", training, samples(b.probe_n), gradnorm_probe.GradNormConfig(threat=threat, seed=seed),
          "probes/gradnorm_training.csv", **batch, per_sample=False)
    probe("gradnorm noisy-vs-clean",
          ["gradnorm", _final(pgd_r), _final(trades_r), "--noisy-vs-clean", "--per-sample", "--n", str(b.noisy_n),
           *attack_args, "-o", "probes/gradnorm_random.csv"],
          "gradient norms on random labels, noisy and clean samples apart",
          _table("probes/gradnorm_random.csv") + _table("probes/gradnorm_random.samples.csv"),
          "gradnorm", [_final(pgd_r), _final(trades_r)], samples(b.noisy_n),
          gradnorm_probe.GradNormConfig(threat=threat, seed=seed, noisy_vs_clean=True),
          "probes/gradnorm_random.csv", **batch, per_sample=True)

    stability_config = stability_probe.StabilityConfig(
        lambdas=parse_lambdas(b.stability_lambdas), directions=b.stability_directions, threat=threat, seed=seed)
    stability_args = [f"--lambdas={b.stability_lambdas}", "--directions", str(b.stability_directions), *attack_args]
    probe("stability at init",
          ["stability", "--init", b.arch, "--dataset", config.dataset, "--n", str(b.probe_n), *stability_args,
           "-o", "probes/stability_init.csv"],
          "gradient change along random weight directions, fresh initialization", _table("probes/stability_init.csv"),
          "stability", [], samples(b.probe_n), stability_config, "probes/stability_init.csv",
          data=dataclasses.replace(probe_data, dataset=config.dataset), init_arch=b.arch, **batch)
    probe("stability trained",
          ["stability", _final(pgd), "--n", str(b.probe_n), *stability_args, "-o", "probes/stability_trained.csv"],
          "gradient change along random weight directions, trained PGD-AT model",
          _table("probes/stability_trained.csv"),
          "stability", [_final(pgd)], samples(b.probe_n), stability_config, "probes/stability_trained.csv",
          init_arch=None, **batch)

    for run, loss in ((pgd, "pgd_at"), (trades, "trades")):
        output = f"probes/gradcos_{run.method}.csv"
        probe(f"gradcos {run.name}",
              ["gradcos", f"runs/{run.name}", "--loss", loss, "--n", str(b.probe_n), *attack_args, "-o", output],
              f"gradient cosine between successive epochs of {run.name}", _table(output),
              "gradcos", [f"runs/{run.name}"], samples(b.probe_n),
              gradcos_probe.GradCosConfig(loss=loss, threat=threat, seed=seed), output, **batch)

    probe("complexity",
          ["complexity", *finals, "--margin", "--n", str(b.complexity_n), *attack_args,
           *(["--measures", ",".join(b.complexity_measures)] if b.complexity_measures else []),
           "-o", "probes/complexity.csv"],
          "complexity measures and generalization gaps of the five models, true and random labels",
          _table("probes/complexity.csv"),
          "complexity", finals, None,
          complexity_probe.ComplexityConfig(
              measures=complexity_probe.parse_measures(b.complexity_measures or complexity_probe.MEASURES),
              margin=True, threat=threat, batch_size=COMMAND_BATCH_SIZE, seed=seed),
          "probes/complexity.csv", n=b.complexity_n)

    # hardness attacks with pgdK (the steps in the name), so its threat model keeps the default steps
    hard_attack, top_k = f"pgd{b.steps}", b.hardness_n // 10 if b.hardness_n else 1000
    probe("hardness",
          ["hardness", _final(pgd), _final(seed1), *(["--n", str(b.hardness_n)] if b.hardness_n else ["--all"]),
           "--attack", hard_attack, "--alpha", _pixels(b.alpha), "--top-k", str(top_k), "--out", "probes/hardness"],
          "per-sample adversarial loss of two PGD-AT seeds and their rank agreement",
          _table("probes/hardness/per_sample.csv") + _table("probes/hardness/consistency.csv")
          + ["probes/hardness/hardest.png", "probes/hardness/sorted.png"],
          "hardness", [_final(pgd), _final(seed1)],
          samples(b.hardness_n) if b.hardness_n else SampleSpec(split="train", default_n=None),
          hardness_probe.HardnessConfig(attack=hard_attack, threat=ThreatModel(alpha=b.alpha),
                                        batch_size=COMMAND_BATCH_SIZE, seed=seed, top_k=top_k),
          "probes/hardness", gallery_k=10, gallery_size=None)

    probe("curvature",
          ["curvature", _final(pgd), _final(trades), "--n", str(b.probe_n), "--iterations",
           str(b.curvature_iterations), "--per-sample", *attack_args, "-o", "probes/curvature.csv"],
          "input-space curvature of the loss per sample",
          _table("probes/curvature.csv") + _table("probes/curvature.samples.csv"),
          "curvature", [_final(pgd), _final(trades)], samples(b.probe_n),
          curvature_probe.CurvatureConfig(iterations=b.curvature_iterations, threat=threat,
                                          batch_size=COMMAND_BATCH_SIZE, seed=seed),
          "probes/curvature.csv", per_sample=True, bn_stats=BNStats())
    probe("hessian",
          ["hessian", _final(pgd), "--n", str(b.probe_n), "--batch-size", str(b.probe_n), "--iterations",
           str(b.hessian_iterations), "--trace-samples", str(b.hessian_trace_samples), "--density",
           "--density-steps", str(b.hessian_density_steps), *attack_args, "-o", "probes/hessian.csv"],
          "top eigenvalue and trace of the weight Hessian per layer, and its spectrum",
          _table("probes/hessian.csv") + _table("probes/hessian.density.csv"),
          "hessian", [_final(pgd)], samples(b.probe_n),
          hessian_probe.HessianConfig(batch_size=b.probe_n, iterations=b.hessian_iterations,
                                      trace_samples=b.hessian_trace_samples, density=True,
                                      density_steps=b.hessian_density_steps, threat=threat, seed=seed),
          "probes/hessian.csv")
    probe("flatness",
          ["flatness", _final(pgd), _final(trades), "--n", str(b.probe_n), f"--lambdas={b.flatness_lambdas}",
           "--directions", str(b.flatness_directions), "--curve", *attack_args, "-o", "probes/flatness.csv"],
          "adversarial loss along random weight directions",
          _table("probes/flatness.csv") + _table("probes/flatness.curve.csv"),
          "flatness", [_final(pgd), _final(trades)], samples(b.probe_n),
          flatness_probe.FlatnessConfig(lambdas=parse_lambdas(b.flatness_lambdas), directions=b.flatness_directions,
                                        threat=threat, batch_size=COMMAND_BATCH_SIZE, seed=seed),
          "probes/flatness.csv", curve=True)

    for fig in figures():
        if fig.made_by is not None:
            continue
        args = ["plot", *fig.csvs, "-o", fig.file, "--dpi", str(b.dpi), "-q"]
        if fig.kind is not None:
            args[1:1] = ["--kind", fig.kind]
        out.append(Step(f"plot {Path(fig.file).stem}", tuple(args), fig.title,
                        PlotCall(fig.csvs, fig.kind, fig.file, float(b.dpi)), (fig.file,)))
    return out


def figures() -> list[Figure]:
    """The report's figures, in the order it shows them."""
    all_runs = ("pgd_at-true", "trades-true", "pgd_at-random", "trades-random")
    return [
        Figure("figures/eval.png", ("probes/eval.csv",), "Test accuracy of the five models",
               "Natural and PGD accuracy on the test split, one bar per model; random-label models sit near "
               "chance (1 / number of classes): their labels carry nothing about the test images.",
               "the accuracy tables (Sec. 3)"),
        Figure("figures/fig2_curves.png", tuple(f"runs/{r}/curves.csv" for r in all_runs),
               "Learning curves", "Natural (left) and PGD (right) accuracy per epoch on train (solid) and test "
               "(dashed); for random-label runs train accuracy is on the random labels, so train rising while "
               "test stays at chance is memorization (in the paper, after far more epochs than the demo's).",
               "Fig. 2"),
        Figure("figures/fig3b_gradratio.png", tuple(f"runs/{r}/gradratio.csv" for r in all_runs),
               "Gradient-norm ratio during training",
               "Per training iteration: norms of the gradients of the clean CE and of the robust term (left, log "
               "scale) and their ratio (right); in the paper PGD-AT's robust term is large next to the clean CE "
               "from the start while TRADES' beta KL starts small, its account of why TRADES fits random labels "
               "where PGD-AT fails to converge.", "Fig. 3(b)"),
        Figure("figures/fig3_gradnorm_training.png", ("probes/gradnorm_training.csv",),
               "Per-sample gradient norms over training",
               "Mean per-sample gradient norm of CE(x), CE(x'), R and beta KL (left) and the ratios robust term / "
               "CE (right) at each saved epoch of the true-label PGD-AT and TRADES runs.", "Fig. 3"),
        Figure("figures/figA9_gradnorm_random.png", ("probes/gradnorm_random.csv",),
               "Gradient norms on random labels, noisy vs clean samples",
               "The same norms for the random-label models, with the samples whose random label differs from "
               "the true one (noisy) and the others (clean) summarized apart.", "Fig. A.9"),
        Figure("figures/figA9_gradnorm_samples.png", ("probes/gradnorm_random.samples.csv",),
               "Per-sample gradient norms (box plots)",
               "The distribution behind the means above: box plots of every sample's gradient norms and ratios, "
               "clean and noisy samples as a light/dark pair.", "Fig. A.9 (per sample)",
               kind="gradnorm_samples"),
        Figure("figures/fig4a_stability.png", ("probes/stability_init.csv", "probes/stability_trained.csv"),
               "Gradient stability along random weight directions",
               "Distance (left) and cosine (right) between a sample's gradient at theta + lam d and at theta, per "
               "objective, at initialization and after PGD-AT: the adversarial objectives' gradients change "
               "faster than the clean one's.", "Figs. 4(a), A.8"),
        Figure("figures/fig4b_gradcos.png", ("probes/gradcos_pgd_at.csv", "probes/gradcos_trades.csv"),
               "Gradient cosine between successive epochs",
               "Mean cosine (left) and distance (right) between each sample's gradients at epochs t and t+1, "
               "PGD-AT and TRADES: a low cosine means the per-sample gradients keep turning (poor "
               "convergence).", "Fig. 4(b)"),
        Figure("figures/fig6_complexity.png", ("probes/complexity.csv",),
               "Complexity measures vs robust generalization gap",
               "One panel per measure, each model a point at (train - test PGD accuracy, measure), marker = true or "
               "random labels, Kendall's tau in the title: a measure that explained robust generalization would "
               "rise with the gap across both label kinds.", "Fig. 6"),
        Figure("figures/flatness_curve.png", ("probes/flatness.curve.csv",), "Weight loss landscape",
               "Adversarial (solid) and natural (dashed) loss and accuracy at theta + lam d along random "
               "filter-normalized directions; a flatter adversarial curve is Wu et al.'s predictor of a small "
               "robust gap.", "Fig. 6's flatness measure"),
        Figure("figures/flatness.png", ("probes/flatness.csv",), "Flatness summary",
               "Mean increase of the loss at lam = +-r over its value at theta, per model.",
               "Fig. 6's flatness measure"),
        Figure("figures/curvature_samples.png", ("probes/curvature.samples.csv",), "Input-space curvature per sample",
               "Histogram of each sample's dominant eigenvalue of the input Hessian of the loss (Moosavi-Dezfooli "
               "et al. 2019): adversarial training flattens the loss in input space.",
               "Fig. 6's curvature measure", kind="curvature_samples"),
        Figure("figures/curvature.png", ("probes/curvature.csv",), "Input-space curvature summary",
               "Mean, median and mean |lambda| of the per-sample curvature, per model.", "Fig. 6's curvature measure"),
        Figure("figures/hessian.png", ("probes/hessian.csv",), "Weight Hessian of the adversarial loss",
               "Top eigenvalue (left) and trace (right) of the Hessian of the adversarial loss with respect to "
               "the weights, whole model (pyhessian) and per layer, for the PGD-AT model.",
               "Fig. 6's Hessian measures"),
        Figure("figures/hessian_density.png", ("probes/hessian.density.csv",), "Hessian eigenvalue density",
               "The spectrum of the same Hessian by stochastic Lanczos quadrature: mass far from 0 means sharp "
               "directions.", "Fig. 6's Hessian measures (PyHessian's density)", kind="hessian_density"),
        Figure("figures/fig7c_hardness.png", ("probes/hardness/per_sample.csv",), "Hard samples across seeds",
               "Training samples sorted by the first PGD-AT model's adversarial loss (line) with the second seed's "
               "loss on the same samples (points): the two models find the same samples hard.", "Fig. 7(c)",
               kind="hardness"),
        Figure("figures/hardness_consistency.png", ("probes/hardness/consistency.csv",),
               "Rank agreement between the seeds",
               "Kendall's tau between the two models' per-sample adversarial losses and the overlap of their k "
               "hardest samples (the paper reports tau = 0.85 for two PGD-AT seeds on the CIFAR-10 training set).",
               "Sec. 4.1, Fig. C.2"),
        Figure("probes/hardness/hardest.png", (), "The hardest training samples",
               "The training samples the two models find hardest (best mean rank of adversarial loss, rank 1 = "
               "hardest), natural above and adversarial below (drawn by atprobe hardness itself).", "Fig. C.3",
               made_by="hardness"),
    ]


def expected_files(config: DemoConfig, budget: Budget) -> list[str]:
    """Every file the demo writes (relative to ``config.out``), the report's included."""
    files: list[str] = []
    for step in steps(config, budget, config.device):
        files.extend(step.outputs)
    files += ["demo.json", "report.md", "index.html"]
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


def run_demo(config: DemoConfig, progress: Callable[[str], None] | None = None) -> Path:
    """Run every step of the demo into ``config.out`` and return the path of its report
    (``report.md``; ``index.html`` beside it). ``progress`` gets one line per step. A failing
    step stops the demo with an :class:`AtprobeError` naming the step; the report is
    written last, so a report means a complete demo."""
    from atprobe.runtime import resolve_device

    say = progress or (lambda line: None)
    device = resolve_device(config.device)
    budget = config.budget or budget_for(config.dataset, device.type, config.quick)
    if config.data_dir is not None:
        config = dataclasses.replace(config, data_dir=config.data_dir.resolve())
        if not config.data_dir.exists() and not config.download:
            raise AtprobeError(f"--data-dir {config.data_dir} does not exist "
                               "(add --download to fetch the dataset there)")
    check_new_directory(config.out, [config.data_dir], hint="give a new --out (the demo never overwrites)")
    out = config.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = steps(config, budget, config.device)
    say(f"atprobe demo: {len(plan)} steps into {config.out} ({config.dataset}, {device}, budget "
        f"{budget.name}: {budget.describe()})")
    records: list[StepRecord] = []
    start = time.perf_counter()
    for k, step in enumerate(plan, 1):
        say(f"[{k:>2}/{len(plan)}] {step.name}: {step.what}")
        t0 = time.perf_counter()
        try:
            _run_step(step, out, device)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one line naming the step, whatever went wrong
            raise AtprobeError(f"demo step {k}/{len(plan)} '{step.name}' failed: {_first_line(exc)}") from None
        records.append(StepRecord(step.name, step.command, round(time.perf_counter() - t0, 2)))
    total = time.perf_counter() - start
    path = report(out, config, budget, str(device), records, total)
    say(f"done in {total:.0f} s: open {config.out / 'index.html'} (or {config.out / 'report.md'})")
    return path


# --------------------------------------------------------------------------- the report


def _eval_table(out: Path) -> list[list[str]]:
    """Rows (model, attack: accuracy ...) of probes/eval.csv, for the report's summary."""
    import pandas as pd

    df = pd.read_csv(out / "probes" / "eval.csv")
    attacks = list(dict.fromkeys(df["attack"]))
    rows = [["model", *attacks]]
    for ckpt, part in df.groupby("checkpoint", sort=False):
        acc = dict(zip(part["attack"], part["accuracy"]))
        rows.append([Path(str(ckpt)).parent.name, *(f"{acc[a]:.3f}" for a in attacks)])
    return rows


def _md_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure_command(fig: Figure, records: dict[str, StepRecord]) -> str:
    name = fig.made_by if fig.made_by is not None else f"plot {Path(fig.file).stem}"
    return records[name].command


def report(out: Path, config: DemoConfig, budget: Budget, device: str, records: Sequence[StepRecord],
           total_s: float) -> Path:
    """Write ``demo.json`` (config, budget, every command and its time), ``report.md`` and
    ``index.html`` into ``out``; return the path of ``report.md``. Every figure of
    :func:`figures` must exist."""
    out = Path(out)
    by_name = {r.name: r for r in records}
    figs = figures()
    missing = [f.file for f in figs if not (out / f.file).is_file()]
    if missing:
        raise AtprobeError(f"the report's figure {missing[0]} is missing")
    train_s = sum(r.seconds for r in records if r.name.startswith("train "))
    plot_s = sum(r.seconds for r in records if r.name.startswith("plot "))
    probe_s = sum(r.seconds for r in records) - train_s - plot_s
    write_json({
        "config": {"out": str(config.out), "dataset": config.dataset,
                   "data_dir": None if config.data_dir is None else str(config.data_dir),
                   "device": config.device, "resolved_device": device, "seed": config.seed, "quick": config.quick,
                   "download": config.download},
        "budget": dataclasses.asdict(budget),
        "total_seconds": round(total_s, 1),
        "steps": [dataclasses.asdict(r) for r in records],
    }, out / "demo.json")

    data_text = config.dataset + ("" if config.data_dir is None else f" ({config.data_dir.name})")
    intro = (f"Everything below was made by `atprobe demo` in {total_s:.0f} s on {device} "
             f"(training {train_s:.0f} s, probes {probe_s:.0f} s, figures {plot_s:.0f} s): "
             f"five models trained on {data_text}: {budget.describe()}; every probe run on them, "
             f"every table drawn. Each figure mirrors a figure of {PAPER}; at this size the numbers show what "
             "each probe measures, not the paper's effects, which need full-size training "
             "(`--dataset cifar10 --device cuda`).")
    runs_rows = [["run", "what"]] + [[f"runs/{r.name}", r.what] for r in RUNS]
    eval_rows = _eval_table(out)
    layout = [
        ("runs/NAME/", "each training run: config.json, curves.csv (+ gradratio.csv), epoch_*.pt, final.pt"),
        ("probes/", "every probe's CSV with its .meta.json (the exact command, versions, seed, checkpoint hashes)"),
        ("figures/", "every figure, drawn by `atprobe plot` from those CSVs"),
        ("demo.json", "the demo's configuration, budget, and every command with its time in seconds"),
    ]

    md = [f"# atprobe demo report ({config.dataset}, budget {budget.name})", "", intro, "",
          "Every file here was written by the command shown with it; run that command inside this folder to "
          "re-make the file (`.meta.json` beside each CSV records it too). " + MORE, "",
          "## The models", "", _md_table(runs_rows), "", "Test accuracy (`atprobe eval`):", "",
          _md_table(eval_rows), "", "## Figures", ""]
    for fig in figs:
        md += [f"### {fig.title}", "", f"![{fig.title}]({fig.file})", "",
               f"{fig.caption} *Mirrors {fig.paper}.*", "", f"`{_figure_command(fig, by_name)}`", ""]
    md += ["## Files", "", _md_table([["path", "what"], *[list(x) for x in layout]]), "",
           "## Steps", "", _md_table([["step", "command", "seconds"]]
                                     + [[r.name, f"`{r.command}`", f"{r.seconds:.1f}"] for r in records]), ""]
    md_path = atomic_write_bytes(out / "report.md", "\n".join(md).encode())

    def p(text: str) -> str:
        # `code` spans of the Markdown text as <code>
        parts = html.escape(text).split("`")
        return "".join(f"<code>{s}</code>" if i % 2 else s for i, s in enumerate(parts))

    body = [f"<h1>atprobe demo report ({html.escape(config.dataset)}, budget {html.escape(budget.name)})</h1>",
            f"<p>{p(intro)}</p>",
            "<p>Every file here was written by the command shown with it; run that command inside this folder to "
            f"re-make the file (the <code>.meta.json</code> beside each CSV records it too). {p(MORE)}</p>",
            "<h2>The models</h2>", _html_table(runs_rows), "<p>Test accuracy (<code>atprobe eval</code>):</p>",
            _html_table(eval_rows), "<h2>Figures</h2>"]
    for fig in figs:
        body += [f'<section><h3>{html.escape(fig.title)}</h3>',
                 f'<a href="{html.escape(fig.file)}"><img src="{html.escape(fig.file)}" '
                 f'alt="{html.escape(fig.title)}"></a>',
                 f"<p>{p(fig.caption)} <em>Mirrors {html.escape(fig.paper)}.</em></p>",
                 f"<pre>{html.escape(_figure_command(fig, by_name))}</pre></section>"]
    body += ["<h2>Files</h2>", _html_table([["path", "what"], *[[a, b.replace('`', '')] for a, b in layout]]),
             "<h2>Steps</h2>",
             _html_table([["step", "command", "seconds"]] + [[r.name, r.command, f"{r.seconds:.1f}"] for r in records])]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>atprobe demo report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1250px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }}
pre {{ background: #f4f4f4; padding: 0.4em 0.6em; white-space: pre-wrap; word-break: break-all; }}
code {{ background: #f4f4f4; padding: 0 0.2em; }}
section {{ margin-bottom: 2.2em; }}
</style></head>
<body>
{chr(10).join(body)}
</body></html>
"""
    atomic_write_bytes(out / "index.html", page.encode())
    return md_path
