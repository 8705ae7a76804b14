"""``atprobe eval``: natural and adversarial accuracy of checkpoints."""

from __future__ import annotations

import click

from atprobe import studies
from atprobe.cli.common import bars, common_options, data_options, eval_options, finish, foreign_options
from atprobe.runtime import set_determinism
from atprobe.study import Study

EXAMPLES = """
\b
Examples:
  atprobe eval run/final.pt --attack natural,pgd10 -o eval.csv
  atprobe eval a.pt b.pt --attack natural,pgd20,cw100 --split test --n 1000
  atprobe eval trades_wrn.pt --arch wrn-34-10 --dataset cifar10 --attack pgd50x5 --eps 8/255
  atprobe eval model.pt --norm l2 --eps 128/255 --attack pgd20
"""


@click.command("eval", epilog=EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@eval_options
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="eval.csv", show_default=True)
@data_options
@foreign_options
@common_options
def eval_command(checkpoints, samples, threat, config, output, data, models, device, batch_size, seed,
                 quiet) -> None:
    """Accuracy of CHECKPOINTS under natural and adversarial inputs.

    Writes one row per (checkpoint, split, attack): checkpoint, split, attack, norm,
    eps, alpha, steps, restarts, n, accuracy, loss.
    """
    set_determinism(seed)
    study = Study(checkpoints, models, data)
    finish(studies.evaluation(study, samples, config, device, threat=threat, seed=seed, progress=bars(quiet)),
           output, quiet)
