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
  atprobe eval run/final.pt --attack natural,pgd10,aa --per-sample -o ev.csv   # also ev.samples.csv
"""


@click.command("eval", epilog=EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--attack", "attacks", default="natural,pgd10", show_default=True,
              help="Comma-separated: natural, fgsm, fgsm_rs, pgdK (K steps on CE), cwK (K steps on the "
                   "CW margin), optional xR for R restarts (pgd50x5); pgd, cw: --steps/--restarts; AutoAttack "
                   "(pip install 'atprobe[autoattack]'): aa, aa-plus, apgd-ce, apgd-t, fab-t, square.")
@click.option("--per-sample", is_flag=True,
              help="Also write one row per (checkpoint, attack, sample) with its robust flag to OUTPUT's stem "
                   "+ .samples.csv.")
@sample_options(split="test", default_n=None)
@threat_options(steps_help="PGD steps of the attacks named without a count (pgd, cw).")
@click.option("--amp/--no-amp", default=False, show_default=True,
              help="bf16 autocast on CUDA (faster; the paper's numbers are float32, the default).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="eval.csv", show_default=True)
@data_options
@foreign_options
@common_options
def eval_command(checkpoints, attacks, per_sample, samples, threat, amp, output, data, models, device, batch_size, seed,
                 quiet) -> None:
    """Accuracy of CHECKPOINTS under natural and adversarial inputs.

    Writes one row per (checkpoint, split, attack): checkpoint, split, attack, norm,
    eps, alpha, steps, restarts, n, accuracy, loss; with --per-sample also one row per
    sample: checkpoint, split, attack, index, label, prediction, robust, loss.
    """
    set_determinism(seed)
    specs = tuple(parse_attack(a, threat) for a in split_list(attacks, "--attack"))
    config = EvalConfig(attacks=specs, batch_size=batch_size, seed=seed, amp=amp)
    study = Study(checkpoints, models, data)
    tables = studies.evaluation(study, samples, config, device, threat=threat, seed=seed, per_sample=per_sample,
                                progress=bars(quiet))
    finish(tables, output, quiet)
