"""``atprobe gradcos``: cosine of per-sample gradients between successive checkpoints
(Dong et al., ICLR 2022, Sec. 3.2, Fig. 4(b); docs/probes/gradcos.md)."""

from __future__ import annotations

import click

from atprobe import studies
from atprobe.cli.common import (
    attack_options,
    bars,
    bn_stats_option,
    common_options,
    data_options,
    finish,
    foreign_options,
    output_option,
    sample_options,
    scale_options,
)
from atprobe.pergrad import OBJECTIVES
from atprobe.probes import gradcos
from atprobe.runtime import set_determinism
from atprobe.study import Study

EXAMPLES = """
\b
Examples:
  atprobe gradcos runs/pgd -o gradcos.csv                 # epoch_*.pt (+ final.pt) of a run, Fig. 4(b)
  atprobe gradcos e10.pt e20.pt e30.pt --loss trades --n 500
"""


@click.command("gradcos", epilog=EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--loss", type=click.Choice(OBJECTIVES), default="pgd_at", show_default=True,
              help="The objective whose per-sample gradients are compared.")
@sample_options
@attack_options
@bn_stats_option
@output_option("gradcos.csv")
@data_options
@foreign_options
@scale_options
@common_options
def gradcos_command(checkpoints, loss, samples, threat, beta, chunk_size, bn_stats, output, data, models, device,
                    batch_size, seed, quiet, share) -> None:
    """Cosine of per-sample gradients between successive checkpoints (RUN_DIR or CKPT CKPT ...).

    Checkpoints are ordered by epoch. For each successive pair: mean and std over a fixed sample
    set of cos(grad J_i(theta_t), grad J_i(theta_t+1)), each checkpoint with its own buffers and
    adversarial examples (Dong et al. 2022, Fig. 4(b)). Writes one row per pair: checkpoint_a,
    checkpoint_b, epoch_a, epoch_b, split, labels, pair, loss, n, cos_mean, cos_std, dist_mean, dist_std.
    """
    set_determinism(seed)
    config = gradcos.GradCosConfig(loss=loss, threat=threat, beta=beta, seed=seed)
    study = Study(checkpoints, models, data, share=share)
    tables = studies.gradcos(study, samples, config, device, chunk_size=chunk_size,
                             batch_size=batch_size, bn_stats=bn_stats, progress=bars(quiet))
    finish(tables, output, quiet)
