"""``atprobe curvature``, ``atprobe hessian``, ``atprobe flatness``: the loss-landscape
measures of Dong et al. (ICLR 2022), Sec. 3.3 / Fig. 6, as standalone commands with their
own rich output (``atprobe complexity`` reports their summaries side by side with the
other measures). Thin: parse options, call ``atprobe.probes``, write the tables (see
docs/probes/curvature.md, hessian.md, flatness.md)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import click
import pandas as pd
from torch import nn

from atprobe.checkpoint import Checkpoint
from atprobe.data import Dataset, Split
from atprobe.directions import IGNORES
from atprobe.directions import NORMS as DIRECTION_NORMS
from atprobe.inputs import first_n, load_checkpoints, load_for_checkpoints, pick_split, with_checkpoint_labels
from atprobe.io import run_meta, write_table
from atprobe.probes import curvature, flatness, hessian
from atprobe.probes.stability import parse_lambdas
from atprobe.runtime import prepare_model, set_determinism

from atprobe.cli.common import NUMBER, common_options, data_options, foreign_options, progress, threat_options
from atprobe.cli.probes_grad import DEFAULT_N, sample_options

#: A command's work on one checkpoint: (model, samples, bar) -> {file suffix: table};
#: suffix "" is the main table (-o), others go to OUTPUT's stem + suffix + ".csv".
Work = Callable[[nn.Module, Split, Any], dict[str, pd.DataFrame]]


def _samples(data: Dataset, split: str, n: int | None) -> Split:
    chosen = pick_split(data, split)
    return first_n(chosen, n if n is not None else min(DEFAULT_N, len(chosen)))


def _config_meta(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _run(name: str, paths, config, work: Work, *, split: str, n: int | None, labels: str, output: str,
         options: dict[str, Any], prefix: dict[str, Any], units: Callable[[nn.Module, Split], int],
         show: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    """Load the checkpoints and samples, run ``work`` per checkpoint, prefix the rows with
    checkpoint, epoch, split, labels and ``prefix``, and write every table (extra tables
    first, the main one last: the main CSV exists only when everything was written)."""
    device = options["device"]
    set_determinism(options["seed"])
    ckpts: list[Checkpoint] = load_checkpoints(
        paths, arch=options["arch"], num_classes=options["num_classes"], dataset=options["dataset"],
        normalize=options["normalize"], data_dir=options["data_dir"])
    data = load_for_checkpoints(ckpts, dataset=options["dataset"], data_dir=options["data_dir"],
                                download=options["download"])
    base = _samples(data, split, n)
    tables: dict[str, list[pd.DataFrame]] = {}
    for ckpt in ckpts:
        model = prepare_model(ckpt.build_model(), device)
        samples = with_checkpoint_labels(base, ckpt, labels, split)
        with progress(units(model, samples), f"{name} {ckpt.name}", options["quiet"]) as bar:
            out = work(model, samples, bar)
        for suffix, df in out.items():
            for column, value in reversed(list(prefix.items())):
                df.insert(0, column, value)
            df.insert(0, "labels", labels)
            df.insert(0, "split", split)
            df.insert(0, "epoch", pd.array([ckpt.epoch] * len(df), dtype="Int64"))
            df.insert(0, "checkpoint", str(ckpt.path))
            tables.setdefault(suffix, []).append(df)
        del model
    meta_config = {**_config_meta(config), "split": split, "n": len(base), "labels": labels,
                   "batch_size": options["batch_size"], "device": str(device), "dataset": data.name}
    path = Path(output)
    for suffix in sorted(tables, key=lambda s: s == ""):
        target = path if suffix == "" else path.with_name(path.stem + suffix + ".csv")
        table = pd.concat(tables[suffix], ignore_index=True)
        write_table(table, target, run_meta(seed=options["seed"], checkpoints=ckpts, config=meta_config,
                                            extra={"table": suffix.lstrip(".") or "main"}))
    if not options["quiet"]:
        main = pd.concat(tables[""], ignore_index=True)
        click.echo(show(main).to_string(index=False), err=True)
        click.echo(f"wrote {output}", err=True)


def _options(**kwargs) -> dict[str, Any]:
    keys = ("dataset", "data_dir", "download", "arch", "num_classes", "normalize", "device", "batch_size", "seed",
            "quiet")
    return {k: kwargs[k] for k in keys}


# ---------------------------------------------------------------------------- curvature

CURVATURE_EXAMPLES = """
\b
Examples:
  atprobe curvature run/final.pt --n 512 -o curvature.csv
  atprobe curvature run/final.pt --at adv --per-sample -o curv_adv.csv    # also curv_adv.samples.csv
  atprobe curvature runs/*/final.pt --iterations 50 --tol 1e-4
"""


@click.command("curvature", epilog=CURVATURE_EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--at", "at", type=click.Choice(curvature.AT_CHOICES), default="natural", show_default=True,
              help="Take the input Hessian at the natural samples or at their PGD examples.")
@click.option("--iterations", type=click.IntRange(min=1), default=20, show_default=True,
              help="The most power-iteration steps (Hessian-vector products) per sample.")
@click.option("--tol", type=NUMBER, default=1e-3, show_default=True,
              help="Stop a sample when its eigenvalue estimate changes by less than tol (relative); 0 = never.")
@click.option("--per-sample", is_flag=True, help="Also write one row per sample to OUTPUT's stem + .samples.csv.")
@sample_options
@threat_options
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="curvature.csv", show_default=True)
@data_options
@foreign_options
@common_options
def curvature_command(checkpoints, at, iterations, tol, per_sample, split, n, labels, threat,
                      output, **kwargs) -> None:
    """Dominant eigenvalue of the input Hessian of the loss, per sample (CHECKPOINTS).

    The eigenvalue of largest magnitude (signed) of d^2 CE(f(x), y) / dx^2 at each sample
    (or its PGD example with --at adv), by batched power iteration on Hessian-vector products
    (Moosavi-Dezfooli et al. 2019). Writes the summary: checkpoint, epoch, split, labels, at,
    statistic (mean, median, std, mean_abs, converged), n, value (docs/probes/curvature.md).
    """
    options = _options(**kwargs)
    config = curvature.CurvatureConfig(at=at, iterations=iterations, tol=tol, threat=threat,
                                       batch_size=options["batch_size"], seed=options["seed"])

    def work(model, samples, bar):
        table = curvature.probe(model, samples, config, progress=bar)
        out = {"": curvature.summarize(table)}
        if per_sample:
            out[".samples"] = table
        return out

    _run("curvature", checkpoints, config, work, split=split, n=n, labels=labels, output=output, options=options,
         prefix={"at": at}, units=lambda model, s: len(s), show=lambda df: df)


# ---------------------------------------------------------------------------- hessian

HESSIAN_EXAMPLES = """
\b
Examples:
  atprobe hessian run/final.pt --batch-size 128 -o hessian.csv            # one adversarial batch
  atprobe hessian run/final.pt --scope all --n 1024 --blocks none          # whole sample set, whole model
  atprobe hessian run/final.pt --top-k 3 --density -o h.csv                # also h.density.csv
  atprobe hessian run/final.pt --device cpu --iterations 20 --trace-samples 20
"""


@click.command("hessian", epilog=HESSIAN_EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--at", "at", type=click.Choice(hessian.LOSS_POINTS), default="adv", show_default=True,
              help="The loss on PGD examples (crafted once, then fixed) or on the natural samples.")
@click.option("--scope", type=click.Choice(hessian.SCOPES), default="batch", show_default=True,
              help="batch: the first --batch-size samples; all: every sample, products accumulated over batches.")
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="Eigenvalues per block (largest magnitude first).")
@click.option("--iterations", type=click.IntRange(min=1), default=100, show_default=True,
              help="The most power-iteration steps per eigenvalue (pyhessian's maxIter).")
@click.option("--tol", type=NUMBER, default=1e-3, show_default=True,
              help="Relative change of the eigenvalue estimate that stops the power iteration.")
@click.option("--trace-samples", type=click.IntRange(min=1), default=100, show_default=True,
              help="The most Hutchinson probes for the trace.")
@click.option("--trace-tol", type=NUMBER, default=0.0, show_default=True,
              help="Relative change of the running trace mean that stops Hutchinson early (pyhessian uses "
                   "1e-3); 0 = use every probe.")
@click.option("--blocks", type=click.Choice(hessian.BLOCK_MODES), default="module", show_default=True,
              help="Per-block rows: one per module (layer), one per parameter tensor, or none.")
@click.option("--density", is_flag=True,
              help="Also write the eigenvalue density (stochastic Lanczos quadrature) to OUTPUT's stem + .density.csv.")
@click.option("--density-steps", type=click.IntRange(min=1), default=100, show_default=True,
              help="Lanczos steps per density run.")
@click.option("--density-runs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Independent Lanczos runs (random starts) averaged in the density.")
@click.option("--engine", type=click.Choice(hessian.ENGINES), default="atprobe", show_default=True,
              help="Who computes the whole model's rows: atprobe (atprobe.linalg, like the blocks) or pyhessian "
                   "(the reference).")
@sample_options
@threat_options
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="hessian.csv", show_default=True)
@data_options
@foreign_options
@common_options
def hessian_command(checkpoints, at, scope, top_k, iterations, tol, trace_samples, trace_tol, blocks, density,
                    density_steps, density_runs, engine, split, n, labels, threat, output, **kwargs) -> None:
    """Top eigenvalues and trace of the weight Hessian of the adversarial loss (CHECKPOINTS).

    The whole model and each layer (--blocks) by the same power iteration and Hutchinson
    estimator (atprobe.linalg) on Hessian-vector products (the blocks' restricted), optionally
    the eigenvalue density; --engine pyhessian computes the whole model's rows by pyhessian.
    Writes one row per (block, quantity, k): checkpoint, epoch, split, labels, at, scope, n,
    block, params, quantity, k, value, iterations, converged, std_error, method
    (docs/probes/hessian.md).
    """
    options = _options(**kwargs)
    config = hessian.HessianConfig(at=at, scope=scope, batch_size=options["batch_size"], top_k=top_k,
                                   iterations=iterations, tol=tol, trace_samples=trace_samples, trace_tol=trace_tol,
                                   blocks=blocks, density=density, density_steps=density_steps,
                                   density_runs=density_runs, engine=engine, threat=threat,
                                   seed=options["seed"])

    def work(model, samples, bar):
        result = hessian.compute(model, samples, config, progress=bar)
        out = {"": result.table}
        if result.density is not None:
            out[".density"] = result.density
        for df in out.values():
            df.insert(0, "n", result.n)
        return out

    _run("hessian", checkpoints, config, work, split=split, n=n, labels=labels, output=output,
         options=options, prefix={"at": at, "scope": scope},
         units=lambda model, s: 1 + len(hessian.parameter_blocks(model, blocks)),
         show=lambda df: df[["checkpoint", "block", "quantity", "k", "value", "iterations", "method"]])


# ---------------------------------------------------------------------------- flatness

FLATNESS_EXAMPLES = """
\b
Examples:
  atprobe flatness run/final.pt --n 512 -o flatness.csv
  atprobe flatness run/final.pt --curve -o flat.csv                        # also flat.curve.csv
  atprobe flatness runs/*/final.pt --lambdas=-0.5,0,0.5 --directions 10    # only what the summary needs
  atprobe flatness run/final.pt --lambdas -1:1:21 --radius 0.5 --curve
"""


@click.command("flatness", epilog=FLATNESS_EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--lambdas", default="-0.5:0.5:11", show_default=True,
              help="Steps along each direction: START:STOP:NUM or a comma list; must contain 0.")
@click.option("--radius", type=NUMBER, default=None,
              help="r of the summary: the |lam| of a grid point (default: the largest |lam|).")
@click.option("--directions", "num_directions", type=int, default=5, show_default=True,
              help="Random filter-normalized directions (drawn from --seed).")
@click.option("--ignore", type=click.Choice(IGNORES), default="biasbn", show_default=True,
              help="biasbn: zero the direction on biases and BatchNorm parameters (Li et al.).")
@click.option("--direction-norm", type=click.Choice(DIRECTION_NORMS), default="filter", show_default=True)
@click.option("--curve", is_flag=True,
              help="Also write the whole curve (one row per direction and lam) to OUTPUT's stem + .curve.csv.")
@sample_options
@threat_options
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="flatness.csv", show_default=True)
@data_options
@foreign_options
@common_options
def flatness_command(checkpoints, lambdas, radius, num_directions, ignore, direction_norm, curve, split, n, labels,
                     threat, output, **kwargs) -> None:
    """Flatness of the weight loss landscape of the adversarial loss (CHECKPOINTS).

    Adversarial loss (PGD re-crafted at every point) along random filter-normalized directions
    over a lam grid (Wu et al. 2020); the summary is the mean increase over theta at radius r.
    Writes one row per (checkpoint, loss): checkpoint, epoch, split, labels, loss (adv, nat),
    radius, directions, n, at_theta, at_radius, increase, increase_std (docs/probes/flatness.md).
    """
    options = _options(**kwargs)
    config = flatness.FlatnessConfig(lambdas=parse_lambdas(lambdas), radius=radius, directions=num_directions,
                                     ignore=ignore, direction_norm=direction_norm, threat=threat,
                                     batch_size=options["batch_size"], seed=options["seed"])

    def work(model, samples, bar):
        table = flatness.probe(model, samples, config, progress=bar)
        out = {"": flatness.summarize(table, config)}
        if curve:
            out[".curve"] = table
        return out

    points = 1 + config.directions * sum(1 for v in config.lambdas if v != 0)
    _run("flatness", checkpoints, config, work, split=split, n=n, labels=labels, output=output, options=options,
         prefix={}, units=lambda model, s: points * len(s), show=lambda df: df)
