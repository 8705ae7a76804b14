"""``atprobe stability``: how per-sample gradients change along random filter-normalized
directions (Dong et al., ICLR 2022, Sec. 3.2, Fig. 4(a), A.8; docs/probes/stability.md)."""

from __future__ import annotations

import click

from atprobe import studies
from atprobe.cli.common import (
    attack_options,
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
    split_list,
)
from atprobe.directions import IGNORES, parse_lambdas
from atprobe.directions import NORMS as DIRECTION_NORMS
from atprobe.pergrad import OBJECTIVES
from atprobe.probes import stability
from atprobe.runtime import set_determinism
from atprobe.study import Study

EXAMPLES = """
\b
Examples:
  atprobe stability --init cnn-small --seed 0 -o stability_init.csv      # Fig. 4(a), fresh init
  atprobe stability --init resnet18 --dataset cifar10 --n 256 --directions 3
  atprobe stability --init cnn-small --bn-stats running      # the fresh identity BatchNorm, as before
  atprobe stability run/final.pt --losses pgd_at,clean --lambdas -0.1:0.1:11 -o stab.csv
  atprobe stability run/final.pt --lambdas=-0.02,-0.01,0,0.01,0.02
"""


@click.command("stability", epilog=EXAMPLES)
@click.argument("checkpoint", required=False, type=click.Path())
@click.option("--init", "init_arch", metavar="ARCH", default=None,
              help="Probe a freshly initialized ARCH (seeded by --seed) instead of a checkpoint.")
@click.option("--losses", default="pgd_at,trades,clean", show_default=True,
              help=f"Comma-separated objectives: {', '.join(OBJECTIVES)}.")
@click.option("--lambdas", default="-0.05:0.05:21", show_default=True,
              help="Steps along each direction: START:STOP:NUM or a comma list; must contain 0.")
@click.option("--directions", "num_directions", type=count(), default=1, show_default=True,
              help="Random filter-normalized directions (drawn from --seed).")
@click.option("--ignore", type=click.Choice(IGNORES), default="biasbn", show_default=True,
              help="biasbn: zero the direction on biases and BatchNorm parameters (Li et al.).")
@click.option("--direction-norm", type=click.Choice(DIRECTION_NORMS), default="filter", show_default=True)
@sample_options
@attack_options
@bn_stats_option
@output_option("stability.csv", inputs="checkpoint")
@data_options
@foreign_options
@scale_options
@common_options
def stability_command(checkpoint, init_arch, losses, lambdas, num_directions, ignore, direction_norm, samples,
                      threat, beta, chunk_size, bn_stats, output, data, models, device, batch_size, seed,
                      quiet, share) -> None:
    """How per-sample gradients change along random directions (CHECKPOINT or --init ARCH).

    For each loss, direction k and lam: mean and std over the samples of
    ||grad J_i(theta + lam d_k) - grad J_i(theta)|| and of the cosine between the two gradients
    (Dong et al. 2022, Fig. 4(a), A.8). Writes one row per (loss, direction, lam): checkpoint,
    split, labels, loss, direction, lam, n, dist_mean, dist_std, cos_mean, cos_std.
    """
    set_determinism(seed)
    config = stability.StabilityConfig(
        losses=tuple(split_list(losses, "--losses")), lambdas=parse_lambdas(lambdas),
        directions=num_directions, ignore=ignore, direction_norm=direction_norm, threat=threat, beta=beta, seed=seed)
    study = Study([checkpoint] if checkpoint is not None else [], models, data, share=share)
    tables = studies.stability(study, samples, config, device, init_arch=init_arch, chunk_size=chunk_size,
                               batch_size=batch_size, bn_stats=bn_stats, progress=bars(quiet))
    finish(tables, output, quiet)
