"""``atprobe flatness``: flatness of the weight loss landscape of the adversarial loss
(Wu et al. 2020; Dong et al., ICLR 2022, Sec. 3.3, Fig. 6; docs/probes/flatness.md)."""

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
    sample_options,
    threat_options,
)
from atprobe.directions import IGNORES, parse_lambdas
from atprobe.directions import NORMS as DIRECTION_NORMS
from atprobe.probes import flatness
from atprobe.runtime import set_determinism
from atprobe.study import Study

EXAMPLES = """
\b
Examples:
  atprobe flatness run/final.pt --n 512 -o flatness.csv
  atprobe flatness run/final.pt --curve -o flat.csv                        # also flat.curve.csv
  atprobe flatness runs/*/final.pt --lambdas=-0.5,0,0.5 --directions 10    # only what the summary needs
  atprobe flatness run/final.pt --lambdas -1:1:21 --radius 0.5 --curve
"""


@click.command("flatness", epilog=EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--lambdas", default="-0.5:0.5:11", show_default=True,
              help="Steps along each direction: START:STOP:NUM or a comma list; must contain 0.")
@click.option("--radius", type=NUMBER, default=None,
              help="r of the summary: the |lam| of a grid point (default: the largest |lam|).")
@click.option("--directions", "num_directions", type=count(), default=5, show_default=True,
              help="Random filter-normalized directions (drawn from --seed).")
@click.option("--ignore", type=click.Choice(IGNORES), default="biasbn", show_default=True,
              help="biasbn: zero the direction on biases and BatchNorm parameters (Li et al.).")
@click.option("--direction-norm", type=click.Choice(DIRECTION_NORMS), default="filter", show_default=True)
@click.option("--curve", is_flag=True,
              help="Also write the whole curve (one row per direction and lam) to OUTPUT's stem + .curve.csv.")
@sample_options
@threat_options
@output_option("flatness.csv", siblings={"curve": ".curve"})
@data_options
@foreign_options
@common_options
def flatness_command(checkpoints, lambdas, radius, num_directions, ignore, direction_norm, curve, samples, threat,
                     output, data, models, device, batch_size, seed, quiet) -> None:
    """Flatness of the weight loss landscape of the adversarial loss (CHECKPOINTS).

    Adversarial loss (PGD re-crafted at every point) along random filter-normalized directions
    over a lam grid (Wu et al. 2020); the summary is the mean increase over theta at radius r.
    Writes one row per (checkpoint, loss): checkpoint, epoch, split, labels, loss (adv, nat),
    radius, directions, n, at_theta, at_radius, increase, increase_std (docs/probes/flatness.md).
    """
    set_determinism(seed)
    config = flatness.FlatnessConfig(lambdas=parse_lambdas(lambdas), radius=radius, directions=num_directions,
                                     ignore=ignore, direction_norm=direction_norm, threat=threat,
                                     batch_size=batch_size, seed=seed)
    tables = studies.flatness(Study(checkpoints, models, data), samples, config, device, curve=curve,
                              progress=bars(quiet))
    finish(tables, output, quiet)
