"""``atprobe eval``: natural and adversarial accuracy of checkpoints."""

from __future__ import annotations

import click

from atprobe import studies
from atprobe.attacks import parse_attack
from atprobe.cli.common import (
    bars,
    common_options,
    data_options,
    finish,
    foreign_options,
    sample_options,
    split_list,
    threat_options,
)
from atprobe.evaluate import EvalConfig
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
@click.option("--attack", "attacks", default="natural,pgd10", show_default=True,
              help="Comma-separated: natural, fgsm, fgsm_rs, pgdK (K steps on CE), cwK (K steps on the "
                   "CW margin), optional xR for R restarts (pgd50x5); pgd, cw: --steps/--restarts.")
@sample_options(split="test", default_n=None)
@threat_options(steps_help="PGD steps of the attacks named without a count (pgd, cw).")
@click.option("--amp/--no-amp", default=False, show_default=True,
              help="bf16 autocast on CUDA (faster; the paper's numbers are float32, the default).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="eval.csv", show_default=True)
@data_options
@foreign_options
@common_options
def eval_command(checkpoints, attacks, samples, threat, amp, output, data, models, device, batch_size, seed,
                 quiet) -> None:
    """Accuracy of CHECKPOINTS under natural and adversarial inputs.

    Writes one row per (checkpoint, split, attack): checkpoint, split, attack, norm,
    eps, alpha, steps, restarts, n, accuracy, loss.
    """
    set_determinism(seed)
    specs = tuple(parse_attack(a, threat) for a in split_list(attacks, "--attack"))
    config = EvalConfig(attacks=specs, batch_size=batch_size, seed=seed, amp=amp)
    study = Study(checkpoints, models, data)
    finish(studies.evaluation(study, samples, config, device, threat=threat, seed=seed, progress=bars(quiet)),
           output, quiet)
