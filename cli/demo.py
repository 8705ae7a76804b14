"""``atprobe demo``: measure the findings of Dong et al. (ICLR 2022), each with a verdict.
Thin: parse options, call ``atprobe.demo.run_demo`` (docs/demo.md)."""

from __future__ import annotations

import click

from atprobe.cli.common import SEED, device_option
from atprobe.data import DATASETS

EXAMPLES = """
\b
Examples:
  atprobe demo --out runs/demo                   # the cpu budget: at most 10 minutes on 2 cores, synthetic data
  atprobe demo --out runs/demo_c10 --data-dir ../shared/data/cifar-10-subset   # the same on real CIFAR-10
  atprobe demo --out runs/demo_gpu --budget gpu --data-dir ~/data --download   # about an hour on one GPU
  atprobe demo --out runs/paper --budget paper --data-dir ~/data --download    # the paper's presets, GPU-days
  atprobe demo --out runs/paper --budget paper --data-dir ~/data --resume      # continue it
"""


@click.command("demo", epilog=EXAMPLES)
@click.option("--out", type=click.Path(file_okay=False), default="demo", show_default=True,
              help="Folder for everything (must not exist yet, or be empty, unless --resume): findings.csv, "
                   "report.md, index.html, runs/, probes/, figures/.")
@click.option("--budget", type=click.Choice(["auto", "cpu", "gpu", "paper", "quick"]), default="auto",
              show_default=True,
              help="Size: cpu (<= 10 min on 2 cores), gpu (~1 h on one GPU), paper (the paper's presets), quick "
                   "(the CI test's); auto = gpu on a CUDA device, else cpu.")
@click.option("--dataset", type=click.Choice(["auto", *DATASETS]), default="auto", show_default=True,
              help="auto: cifar10 when --data-dir is given, else the built-in synthetic set.")
@click.option("--data-dir", type=click.Path(), default=None, help="Where the dataset lives.")
@click.option("--download", is_flag=True, help="Fetch a missing real dataset into --data-dir (MD5-verified).")
@click.option("--resume", is_flag=True,
              help="Continue a demo in --out (same budget, dataset and seed): steps whose files are all there are "
                   "skipped, an interrupted training continues.")
@device_option(keep_spec=True, help="Where to compute; with --budget auto a GPU picks the gpu budget.")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of every step (the second PGD-AT seed is seed+1); same seed on the CPU, same CSVs.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
def demo_command(out, budget, dataset, data_dir, download, resume, device, seed, quiet) -> None:
    """Measure eight findings of Dong et al. (ICLR 2022) and say whether each reproduced.

    Trains PGD-AT, TRADES and PGD-AT with the clean loss (Eq. 6) on random labels and PGD-AT,
    PGD-AT+TE and a second PGD-AT seed on the true labels; runs stability, gradcos,
    complexity, hardness and table on them; judges each finding by a rule fixed in
    atprobe.findings (reproduced, not at this size, contradicted); writes OUT/findings.csv
    and OUT/index.html + OUT/report.md, which open with the findings table and show each
    finding's figure and the commands that made it.
    """
    from atprobe.demo import DemoConfig, run_demo

    config = DemoConfig(out=out, dataset=dataset, data_dir=data_dir, device=device, seed=seed, budget=budget,
                        download=download, resume=resume)
    say = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    run_demo(config, progress=say)
