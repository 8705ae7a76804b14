"""``atprobe demo``: the whole toolkit end to end, in one command.

Trains five small models (PGD-AT and TRADES on true and on random labels, and a second
PGD-AT seed), runs every probe on them, draws every figure and writes a report
(``report.md`` and ``index.html``) that shows each figure with one line on what it shows and
which figure of Dong et al., *Exploring Memorization in Adversarial Training* (ICLR 2022)
it mirrors.

Each step is exactly a documented ``atprobe`` command (``atprobe train``, ``eval``,
``gradnorm``, ..., ``plot``), run in-process through the click group with the output folder
as working directory, so every CSV's ``.meta.json`` records the very command line that a
user can re-run inside the output folder to re-make it. No probe logic lives here.

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

import contextlib
import dataclasses
import html
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from atprobe.data import DATASETS
from atprobe.errors import AtprobeError
from atprobe.io import atomic_write_bytes, write_json

__all__ = [
    "BUDGETS",
    "Budget",
    "DemoConfig",
    "Figure",
    "RUNS",
    "Run",
    "Step",
    "StepRecord",
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


@dataclass(frozen=True)
class Budget:
    """How big the demo is. Every field becomes an option of one of the commands."""

    name: str
    arch: str = "cnn-small"
    train_n: int = 256            # atprobe train --train-n (0 = the whole training split)
    epochs: int = 3               # every epoch is kept (--save-every 1) for gradcos/gradnorm
    batch_size: int = 64
    steps: int = 2                # PGD steps of training and of every probe's attack
    alpha: str = "4/255"          # their step size (eps is 8/255 throughout)
    lr: str = "0.1"
    # constant on the CPU: with a few epochs a decaying rate would make the last epochs' gradients
    # alike for a trivial reason (gradcos near 1); the GPU budget uses the paper's piecewise decay
    schedule: str = "constant"
    curve_n: int = 128            # atprobe train --eval-n: samples per learning-curve point
    curve_attack: str = "pgd5"    # atprobe train --eval-attack
    grad_ratio_iters: int = 12    # atprobe train --log-grad-ratio (gradratio.csv, Fig. 3(b))
    eval_n: int = 200             # atprobe eval --n (test split; 0 = the whole split)
    eval_attacks: str = "natural,pgd10"
    probe_n: int = 32             # gradnorm, stability, gradcos, curvature, hessian, flatness --n
    noisy_n: int = 64             # gradnorm --noisy-vs-clean --n
    complexity_n: int = 64        # complexity --n
    hardness_n: int = 256         # hardness --n (training samples; 0 = --all)
    # complexity --measures ("" = all): the CPU budgets leave out ``hessian``, which runs at
    # its fixed defaults there (100 power iterations, 100 Hutchinson probes: ~20 s per model on
    # a CPU core); ``atprobe hessian`` still measures the Hessian, with this budget's sizes.
    complexity_measures: str = "spectral,l1,margin,curvature,flatness,gap"
    stability_lambdas: str = "-0.05:0.05:5"
    stability_directions: int = 1
    flatness_lambdas: str = "-0.5:0.5:5"
    flatness_directions: int = 2
    curvature_iterations: int = 10
    hessian_iterations: int = 10
    hessian_trace_samples: int = 10
    hessian_density_steps: int = 20
    dpi: int = 100                # figures: (figure inches x dpi) pixels

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise AtprobeError(f"budget {f.name} must be an integer, got {value!r}")
        minimum = {"epochs": 2, "train_n": 0, "grad_ratio_iters": 0, "eval_n": 0, "hardness_n": 0}
        for f in dataclasses.fields(self):
            if f.type == "int" and getattr(self, f.name) < minimum.get(f.name, 1):
                raise AtprobeError(f"budget {f.name} must be >= {minimum.get(f.name, 1)} "
                                   f"(gradcos needs two epochs), got {getattr(self, f.name)}")

    def describe(self) -> str:
        n = "all" if self.train_n == 0 else f"{self.train_n:,}"
        return (f"{self.arch}, {n} training images, {self.epochs} epochs, batch {self.batch_size}, "
                f"lr {self.lr} ({self.schedule}), "
                f"PGD-{self.steps} (eps 8/255, step {self.alpha}) in training and in the probes, "
                f"probes on {self.probe_n} samples")


#: The budgets; :func:`budget_for` picks one.
BUDGETS: dict[str, Budget] = {
    # The CI test's size: about a minute on two CPU cores.
    "quick": Budget(
        name="quick", train_n=128, epochs=2, curve_n=64, curve_attack="pgd3", grad_ratio_iters=4, eval_n=64,
        eval_attacks="natural,pgd5", probe_n=16, noisy_n=32, complexity_n=32, hardness_n=64,
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
        name="cuda", arch="resnet18", train_n=0, epochs=20, batch_size=128, steps=10, alpha="2/255", schedule="piecewise",
        curve_n=1000, curve_attack="pgd10", grad_ratio_iters=200, eval_n=0, eval_attacks="natural,pgd20",
        probe_n=512, noisy_n=1000, complexity_n=1000, hardness_n=0, stability_lambdas="-0.05:0.05:21",
        stability_directions=3, flatness_lambdas="-0.5:0.5:11", flatness_directions=5,
        curvature_iterations=20, hessian_iterations=50, hessian_trace_samples=50, hessian_density_steps=100,
        complexity_measures=""),
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


@dataclass(frozen=True)
class Step:
    """One command of the demo: ``atprobe <args...>``, run with the output folder as the
    working directory; ``outputs`` are the files it must leave there."""

    name: str
    args: tuple[str, ...]
    what: str
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


def _final(run: Run) -> str:
    return f"runs/{run.name}/final.pt"


def _epochs(run: Run, budget: Budget) -> list[str]:
    return [f"runs/{run.name}/epoch_{e:04d}.pt" for e in range(1, budget.epochs + 1)]


def _run(name: str) -> Run:
    return next(r for r in RUNS if r.name == name)


def steps(config: DemoConfig, budget: Budget, device: str) -> list[Step]:
    """Every command of the demo, in order (paths relative to the output folder)."""
    b = budget
    data = ["--dataset", config.dataset] + ([] if config.data_dir is None else ["--data-dir", str(config.data_dir)])
    data += ["--download"] if config.download else []
    probe_data = [] if config.data_dir is None else ["--data-dir", str(config.data_dir)]
    common = ["--device", device, "--seed", str(config.seed), "-q"]
    attack = ["--steps", str(b.steps), "--alpha", b.alpha]
    out: list[Step] = []

    for run in RUNS:
        args = ["train", "--out", f"runs/{run.name}", "--arch", b.arch, *data, "--method", run.method,
                "--epochs", str(b.epochs), "--train-n", str(b.train_n), "--batch-size", str(b.batch_size),
                "--lr", b.lr, "--schedule", b.schedule, *attack, "--eval-n", str(b.curve_n),
                "--eval-attack", b.curve_attack, "--save-every", "1"]
        if run.random_labels:
            args += ["--label-noise", "1.0", "--label-seed", str(config.seed)]
        if run.seed_offset == 0 and b.grad_ratio_iters:
            args += ["--log-grad-ratio", str(b.grad_ratio_iters)]
        args += ["--device", device, "--seed", str(config.seed + run.seed_offset), "-q"]
        outputs = [f"runs/{run.name}/{f}" for f in ("config.json", "curves.csv", "curves.meta.json", "final.pt")]
        outputs += _epochs(run, b)
        if run.seed_offset == 0 and b.grad_ratio_iters:
            outputs += [f"runs/{run.name}/gradratio.csv", f"runs/{run.name}/gradratio.meta.json"]
        out.append(Step(f"train {run.name}", tuple(args), run.what, tuple(outputs)))

    def probe(name: str, args: list[str], what: str, outputs: list[str]) -> None:
        out.append(Step(name, tuple(args + probe_data + common), what, tuple(outputs)))

    def table(path: str) -> list[str]:
        return [path, path[: -len(".csv")] + ".meta.json"]

    pgd, trades = _run("pgd_at-true"), _run("trades-true")
    pgd_r, trades_r = _run("pgd_at-random"), _run("trades-random")
    seed1 = _run("pgd_at-true-seed1")
    probe("eval", ["eval", *(_final(r) for r in RUNS), "--attack", b.eval_attacks, "--split", "test",
                   *(["--n", str(b.eval_n)] if b.eval_n else []), "-o", "probes/eval.csv"],
          "natural and PGD test accuracy of the five models", table("probes/eval.csv"))
    probe("gradnorm over training",
          ["gradnorm", *_epochs(pgd, b), *_epochs(trades, b), "--n", str(b.probe_n), *attack,
           "-o", "probes/gradnorm_training.csv"],
          "per-sample gradient norms of the objectives' parts at every epoch (true labels)",
          table("probes/gradnorm_training.csv"))
    probe("gradnorm noisy-vs-clean",
          ["gradnorm", _final(pgd_r), _final(trades_r), "--noisy-vs-clean", "--per-sample", "--n", str(b.noisy_n),
           *attack, "-o", "probes/gradnorm_random.csv"],
          "gradient norms on random labels, noisy and clean samples apart",
          table("probes/gradnorm_random.csv") + table("probes/gradnorm_random.samples.csv"))
    probe("stability at init",
          ["stability", "--init", b.arch, "--dataset", config.dataset, "--n", str(b.probe_n),
           f"--lambdas={b.stability_lambdas}", "--directions", str(b.stability_directions), *attack,
           "-o", "probes/stability_init.csv"],
          "gradient change along random weight directions, fresh initialization",
          table("probes/stability_init.csv"))
    probe("stability trained",
          ["stability", _final(pgd), "--n", str(b.probe_n), f"--lambdas={b.stability_lambdas}",
           "--directions", str(b.stability_directions), *attack, "-o", "probes/stability_trained.csv"],
          "gradient change along random weight directions, trained PGD-AT model",
          table("probes/stability_trained.csv"))
    for run, loss in ((pgd, "pgd_at"), (trades, "trades")):
        probe(f"gradcos {run.name}",
              ["gradcos", f"runs/{run.name}", "--loss", loss, "--n", str(b.probe_n), *attack,
               "-o", f"probes/gradcos_{run.method}.csv"],
              f"gradient cosine between successive epochs of {run.name}", table(f"probes/gradcos_{run.method}.csv"))
    probe("complexity",
          ["complexity", *(_final(r) for r in RUNS), "--margin", "--n", str(b.complexity_n), *attack,
           *(["--measures", b.complexity_measures] if b.complexity_measures else []), "-o", "probes/complexity.csv"],
          "complexity measures and generalization gaps of the five models, true and random labels",
          table("probes/complexity.csv"))
    hard_attack = f"pgd{b.steps}"
    probe("hardness",
          ["hardness", _final(pgd), _final(seed1), *(["--n", str(b.hardness_n)] if b.hardness_n else ["--all"]),
           "--attack", hard_attack, "--alpha", b.alpha, "--top-k", str(b.hardness_n // 10 if b.hardness_n else 1000),
           "--out", "probes/hardness"],
          "per-sample adversarial loss of two PGD-AT seeds and their rank agreement",
          table("probes/hardness/per_sample.csv") + table("probes/hardness/consistency.csv")
          + ["probes/hardness/hardest.png", "probes/hardness/sorted.png"])
    probe("curvature",
          ["curvature", _final(pgd), _final(trades), "--n", str(b.probe_n), "--iterations",
           str(b.curvature_iterations), "--per-sample", *attack, "-o", "probes/curvature.csv"],
          "input-space curvature of the loss per sample",
          table("probes/curvature.csv") + table("probes/curvature.samples.csv"))
    probe("hessian",
          ["hessian", _final(pgd), "--n", str(b.probe_n), "--batch-size", str(b.probe_n), "--iterations",
           str(b.hessian_iterations), "--trace-samples", str(b.hessian_trace_samples), "--density",
           "--density-steps", str(b.hessian_density_steps), *attack, "-o", "probes/hessian.csv"],
          "top eigenvalue and trace of the weight Hessian per layer, and its spectrum",
          table("probes/hessian.csv") + table("probes/hessian.density.csv"))
    probe("flatness",
          ["flatness", _final(pgd), _final(trades), "--n", str(b.probe_n), f"--lambdas={b.flatness_lambdas}",
           "--directions", str(b.flatness_directions), "--curve", *attack, "-o", "probes/flatness.csv"],
          "adversarial loss along random weight directions",
          table("probes/flatness.csv") + table("probes/flatness.curve.csv"))

    for fig in figures():
        if fig.made_by is not None:
            continue
        args = ["plot", *fig.csvs, "-o", fig.file, "--dpi", str(b.dpi), "-q"]
        if fig.kind is not None:
            args[1:1] = ["--kind", fig.kind]
        out.append(Step(f"plot {Path(fig.file).stem}", tuple(args), fig.title, (fig.file,)))
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


@contextlib.contextmanager
def _as_command(cwd: Path, argv: Sequence[str]) -> Iterator[None]:
    """Run inside ``cwd`` with ``sys.argv`` set to the step's command line, so that its
    ``.meta.json`` records exactly that command (restored afterwards)."""
    old_cwd, old_argv = os.getcwd(), sys.argv
    os.chdir(cwd)
    sys.argv = list(argv)
    try:
        yield
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)


def _run_step(step: Step, out: Path) -> None:
    import click

    from atprobe.cli.main import cli

    try:
        with _as_command(out, ["atprobe", *step.args]):
            cli.main(list(step.args), prog_name="atprobe", standalone_mode=False)
    except click.exceptions.Exit as exc:
        if exc.exit_code:
            raise AtprobeError(f"exit status {exc.exit_code}") from None
    except click.ClickException as exc:
        raise AtprobeError(exc.format_message()) from None
    except click.Abort:
        raise KeyboardInterrupt from None
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
            raise AtprobeError(f"--data-dir {config.data_dir} does not exist (add --download to fetch the dataset there)")
    if config.out.exists() and (not config.out.is_dir() or any(config.out.iterdir())):
        raise AtprobeError(f"{config.out} already exists and is not an empty folder: give a new --out "
                           "(the demo never overwrites)")
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
            _run_step(step, out)
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
