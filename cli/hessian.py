"""``atprobe hessian``: top eigenvalues, trace and density of the weight Hessian of the
adversarial loss (Dong et al., ICLR 2022, Fig. 6; docs/probes/hessian.md)."""

from __future__ import annotations

import click

from atprobe import studies
from atprobe.cli.common import (
    NUMBER,
    bars,
    common_options,
    count,
    data_options,
    finish,
    foreign_options,
    output_option,
    rank_options,
    sample_options,
    threat_options,
)
from atprobe.probes import hessian
from atprobe.runtime import set_determinism
from atprobe.study import Study

EXAMPLES = """
\b
Examples:
  atprobe hessian run/final.pt --batch-size 128 -o hessian.csv            # one adversarial batch
  atprobe hessian run/final.pt --scope all --n 1024 --blocks none          # whole sample set, whole model
  atprobe hessian run/final.pt --top-k 3 --density -o h.csv                # also h.density.csv
  atprobe hessian run/final.pt --device cpu --iterations 20 --trace-samples 20
"""


@click.command("hessian", epilog=EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--at", "at", type=click.Choice(hessian.LOSS_POINTS), default="adv", show_default=True,
              help="The loss on PGD examples (crafted once, then fixed) or on the natural samples.")
@click.option("--scope", type=click.Choice(hessian.SCOPES), default="batch", show_default=True,
              help="batch: the first --batch-size samples; all: every sample, products accumulated over batches.")
@click.option("--top-k", type=count(1), default=1, show_default=True,
              help="Eigenvalues per block (largest magnitude first).")
@click.option("--iterations", type=count(1), default=100, show_default=True,
              help="The most power-iteration steps per eigenvalue (pyhessian's maxIter).")
@click.option("--tol", type=NUMBER, default=1e-3, show_default=True,
              help="Relative change of the eigenvalue estimate that stops the power iteration.")
@click.option("--trace-samples", type=count(1), default=100, show_default=True,
              help="The most Hutchinson probes for the trace.")
@click.option("--trace-tol", type=NUMBER, default=0.0, show_default=True,
              help="Relative change of the running trace mean that stops Hutchinson early (pyhessian uses "
                   "1e-3); 0 = use every probe.")
@click.option("--blocks", type=click.Choice(hessian.BLOCK_MODES), default="module", show_default=True,
              help="Per-block rows: one per module (layer), one per parameter tensor, or none.")
@click.option("--density", is_flag=True,
              help="Also write the eigenvalue density (stochastic Lanczos quadrature) to OUTPUT's stem + .density.csv.")
@click.option("--density-steps", type=count(1), default=100, show_default=True,
              help="Lanczos steps per density run.")
@click.option("--density-runs", type=count(1), default=1, show_default=True,
              help="Independent Lanczos runs (random starts) averaged in the density.")
@click.option("--engine", type=click.Choice(hessian.ENGINES), default="atprobe", show_default=True,
              help="Who computes the whole model's rows: atprobe (atprobe.linalg, like the blocks) or pyhessian "
                   "(the reference).")
@sample_options
@threat_options
@output_option("hessian.csv", siblings={"density": ".density"})
@data_options
@foreign_options
@rank_options
@common_options
def hessian_command(checkpoints, at, scope, top_k, iterations, tol, trace_samples, trace_tol, blocks, density,
                    density_steps, density_runs, engine, samples, threat, output, data, models, device, batch_size,
                    seed, quiet, share) -> None:
    """Top eigenvalues and trace of the weight Hessian of the adversarial loss (CHECKPOINTS).

    The whole model and each layer (--blocks) by the same power iteration and Hutchinson
    estimator (atprobe.linalg) on Hessian-vector products (the blocks' restricted), optionally
    the eigenvalue density; --engine pyhessian computes the whole model's rows by pyhessian.
    Writes one row per (block, quantity, k): checkpoint, epoch, split, labels, at, scope, n,
    block, params, quantity, k, value, iterations, converged, std_error, method
    (docs/probes/hessian.md).
    """
    set_determinism(seed)
    config = hessian.HessianConfig(at=at, scope=scope, batch_size=batch_size, top_k=top_k, iterations=iterations,
                                   tol=tol, trace_samples=trace_samples, trace_tol=trace_tol, blocks=blocks,
                                   density=density, density_steps=density_steps, density_runs=density_runs,
                                   engine=engine, threat=threat, seed=seed)
    finish(studies.hessian(Study(checkpoints, models, data, share=share), samples, config, device,
                           progress=bars(quiet)), output, quiet)
