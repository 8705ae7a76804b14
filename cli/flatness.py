"""``atprobe flatness``: flatness of the weight loss landscape of the adversarial loss
(Wu et al. 2020; Dong et al., ICLR 2022, Sec. 3.3, Fig. 6; docs/probes/flatness.md)."""

from __future__ import annotations

import click

from atprobe import landscapes, studies
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
    scale_options,
    threat_options,
)
from atprobe.directions import IGNORES, parse_lambdas
from atprobe.directions import NORMS as DIRECTION_NORMS
from atprobe.errors import AtprobeError
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
  atprobe flatness run/final.pt --plane --x=-1:1:21 --y=-1:1:21 -o plane.csv   # Li et al.'s 2-d surface
  atprobe flatness --between runs/a/final.pt runs/b/final.pt --t=-0.5:1.5:21 -o path.csv
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
@click.option("--plane", is_flag=True,
              help="The 2-d landscape theta + x d1 + y d2 over the --x by --y grid (Li et al. 2018).")
@click.option("--x", "x_grid", default=None, help="--plane: the grid along d1, XMIN:XMAX:XNUM or a list "
              "[default: -1:1:21].")
@click.option("--y", "y_grid", default=None, help="--plane: the grid along d2 [default: -1:1:21].")
@click.option("--pairs", type=count(), default=None, help="--plane: planes, each from two new random directions "
              "[default: 1].")
@click.option("--between", is_flag=True,
              help="The path (1-t) A + t B between the two CHECKPOINTS A B, BatchNorm statistics recomputed at "
                   "every t.")
@click.option("--t", "t_grid", default=None, help="--between: the points t (0 = A, 1 = B), START:STOP:NUM or a "
              "list [default: -0.5:1.5:21].")
@click.option("--bn-images", type=count(2), default=None,
              help="--between: training images the BatchNorm statistics are recomputed on (recompute:N) "
                   "[default: 1024].")
@sample_options
@threat_options
@output_option("flatness.csv", siblings={"curve": ".curve"})
@data_options
@foreign_options
@scale_options
@common_options
def flatness_command(checkpoints, lambdas, radius, num_directions, ignore, direction_norm, curve, plane, x_grid,
                     y_grid, pairs, between, t_grid, bn_images, samples, threat, output, data, models, device,
                     batch_size, seed, quiet, share) -> None:
    """Flatness of the weight loss landscape of the adversarial loss (CHECKPOINTS).

    Adversarial loss (PGD re-crafted at every point) along random filter-normalized directions
    over a lam grid (Wu et al. 2020); the summary is the mean increase over theta at radius r.
    Writes one row per (checkpoint, loss): checkpoint, epoch, split, labels, loss (adv, nat),
    radius, directions, n, at_theta, at_radius, increase, increase_std (docs/probes/flatness.md).
    --plane writes one row per (checkpoint, pair, grid point); --between A B one row per t.
    """
    _check_modes(plane, between, curve, {"--x": x_grid, "--y": y_grid, "--pairs": pairs},
                 {"--t": t_grid, "--bn-images": bn_images})
    set_determinism(seed)
    if plane:
        config = flatness.PlaneConfig(
            xs=flatness.DEFAULT_PLANE_AXIS if x_grid is None else parse_lambdas(x_grid, option="--x", zero=False),
            ys=flatness.DEFAULT_PLANE_AXIS if y_grid is None else parse_lambdas(y_grid, option="--y", zero=False),
            pairs=1 if pairs is None else pairs, ignore=ignore, direction_norm=direction_norm, threat=threat,
            batch_size=batch_size, seed=seed)
        finish(landscapes.plane(Study(checkpoints, models, data, share=share), samples, config, device,
                                  progress=bars(quiet)), output, quiet)
        return
    if between:
        if len(checkpoints) != 2:
            raise AtprobeError(f"--between takes two checkpoints A B, got {len(checkpoints)}")
        config = flatness.PathConfig(
            ts=flatness.DEFAULT_TS if t_grid is None else parse_lambdas(t_grid, option="--t", zero=False),
            bn_images=flatness.PathConfig.bn_images if bn_images is None else bn_images, threat=threat,
            batch_size=batch_size, seed=seed)
        finish(landscapes.between(Study(checkpoints, models, data, share=share), samples, config, device,
                                  progress=bars(quiet)), output, quiet)
        return
    config = flatness.FlatnessConfig(lambdas=parse_lambdas(lambdas), radius=radius, directions=num_directions,
                                     ignore=ignore, direction_norm=direction_norm, threat=threat,
                                     batch_size=batch_size, seed=seed)
    tables = studies.flatness(Study(checkpoints, models, data, share=share), samples, config, device, curve=curve,
                              progress=bars(quiet))
    finish(tables, output, quiet)


def _check_modes(plane: bool, between: bool, curve: bool, plane_only: dict, between_only: dict) -> None:
    """One landscape per run; an option of the other landscape (or of none) is an error, not ignored."""
    if plane and between:
        raise AtprobeError("--plane and --between are two different landscapes: give one of them")
    if curve and (plane or between):
        raise AtprobeError("--curve is the 1-d curve's table: --plane and --between write their grid as the main "
                           "table")
    for needs, given, options in (("--plane", plane, plane_only), ("--between", between, between_only)):
        used = [name for name, value in options.items() if value is not None]
        if used and not given:
            raise AtprobeError(f"{', '.join(used)} only applies with {needs}")
