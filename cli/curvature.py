"""``atprobe curvature``: the dominant eigenvalue of the input Hessian of the loss, per
sample (Moosavi-Dezfooli et al. 2019; Dong et al., ICLR 2022, Fig. 6; docs/probes/curvature.md)."""

from __future__ import annotations

import click

from atprobe import studies
from atprobe.cli.common import (
    NUMBER,
    bars,
    bn_stats_option,
    common_options,
    count,
    data_options,
    finish,
    foreign_options,
    output_option,
    sample_options,
    scale_options,
    threat_options,
)
from atprobe.probes import curvature
from atprobe.runtime import set_determinism
from atprobe.study import Study

EXAMPLES = """
\b
Examples:
  atprobe curvature run/final.pt --n 512 -o curvature.csv
  atprobe curvature run/final.pt --at adv --per-sample -o curv_adv.csv    # also curv_adv.samples.csv
  atprobe curvature runs/*/final.pt --iterations 50 --tol 1e-4
  atprobe curvature run/final.pt --n 10000 --shard 0/4 -o cu0.csv      # part 0 of 4; atprobe merge cu*.csv -o c.csv
"""


@click.command("curvature", epilog=EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--at", "at", type=click.Choice(curvature.AT_CHOICES), default="natural", show_default=True,
              help="Take the input Hessian at the natural samples or at their PGD examples.")
@click.option("--iterations", type=count(1), default=20, show_default=True,
              help="The most Lanczos steps (Hessian-vector products) per sample.")
@click.option("--tol", type=NUMBER, default=1e-3, show_default=True,
              help="Stop a sample when its dominant Ritz pair's residual is below tol (relative); 0 = never.")
@click.option("--per-sample", is_flag=True, help="Also write one row per sample to OUTPUT's stem + .samples.csv.")
@sample_options
@threat_options
@bn_stats_option(batch=False)
@output_option("curvature.csv", siblings={"per_sample": ".samples"})
@data_options
@foreign_options
@scale_options
@common_options
def curvature_command(checkpoints, at, iterations, tol, per_sample, samples, threat, bn_stats, output, data, models,
                      device, batch_size, seed, quiet, share) -> None:
    """Dominant eigenvalue of the input Hessian of the loss, per sample (CHECKPOINTS).

    The eigenvalue of largest magnitude (signed) of d^2 CE(f(x), y) / dx^2 at each sample
    (or its PGD example with --at adv), by batched Lanczos on Hessian-vector products
    (Moosavi-Dezfooli et al. 2019). Writes the summary: checkpoint, epoch, split, labels, at,
    statistic (mean, median, std, mean_abs, converged), n, value (docs/probes/curvature.md).
    """
    set_determinism(seed)
    config = curvature.CurvatureConfig(at=at, iterations=iterations, tol=tol, threat=threat, batch_size=batch_size,
                                       seed=seed)
    study = Study(checkpoints, models, data, share=share)
    tables = studies.curvature(study, samples, config, device, per_sample=per_sample,
                               bn_stats=bn_stats, progress=bars(quiet))
    finish(tables, output, quiet)
