"""``atprobe demo``: train small models, run every probe, draw every figure, write a
report. Thin: parse options, call ``atprobe.demo.run_demo`` (docs/demo.md)."""

from __future__ import annotations

import click

from atprobe.cli.common import SEED, device_option
from atprobe.data import DATASETS

EXAMPLES = """
\b
Examples:
  atprobe demo                                   # synthetic data on the CPU, a few minutes, no download
  atprobe demo --out demo_cifar --dataset cifar10 --data-dir ../shared/data/cifar-10-subset
  atprobe demo --out demo_gpu --dataset cifar10 --data-dir ~/data --download --device cuda   # ResNet-18, full size
  atprobe demo --out demo_ci --quick             # the CI test's size, about a minute
"""


@click.command("demo", epilog=EXAMPLES)
@click.option("--out", type=click.Path(file_okay=False), default="demo", show_default=True,
              help="Folder for everything (must not exist yet, or be empty): runs/, probes/, figures/, "
                   "report.md, index.html.")
@click.option("--dataset", type=click.Choice(DATASETS), default="synthetic", show_default=True,
              help="synthetic needs no files; a real dataset reads --data-dir.")
@click.option("--data-dir", type=click.Path(), default=None,
              help="Where the dataset lives (default $ATPROBE_DATA_DIR or ~/.cache/atprobe/data).")
@click.option("--download", is_flag=True, help="Fetch a missing real dataset into --data-dir (MD5-verified).")
@device_option(keep_spec=True,
               help="Where to compute; a GPU picks the GPU-sized budget (ResNet-18, whole training split).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of every step (the second PGD-AT model uses seed+1); same seed on the CPU, same CSVs.")
@click.option("--quick", is_flag=True, help="The smallest budget (the CI test's): about a minute on a CPU.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
def demo_command(out, dataset, data_dir, download, device, seed, quick, quiet) -> None:
    """Train small models, run every probe on them, draw every figure, write a report.

    Five models (PGD-AT and TRADES on true and on random labels, a second PGD-AT seed), then
    eval, gradnorm, stability, gradcos, complexity, hardness, curvature, hessian and
    flatness on them, every CSV drawn by atprobe plot, and OUT/index.html + OUT/report.md
    showing each figure with what it means and the figure of Dong et al. (ICLR 2022) it
    mirrors. Each step makes the library call of the atprobe command the report shows
    (one progress line each).
    """
    from atprobe.demo import DemoConfig, run_demo

    config = DemoConfig(out=out, dataset=dataset, data_dir=data_dir, device=device, seed=seed, quick=quick,
                        download=download)
    say = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    run_demo(config, progress=say)
