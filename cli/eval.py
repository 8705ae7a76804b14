"""``atprobe eval``: natural and adversarial accuracy of checkpoints."""

from __future__ import annotations

import click

from atprobe import studies
from atprobe.cli.common import (
    bars,
    common_options,
    data_options,
    eval_options,
    finish,
    foreign_options,
    output_option,
    scale_options,
)
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
  torchrun --standalone --nproc_per_node 4 -m atprobe.cli.main -- eval run/final.pt --n 10000  # 4 GPUs
  atprobe eval run/final.pt --shard 0/8 -o part0.csv      # part 0 of 8; atprobe merge part*.csv -o eval.csv
"""


@click.command("eval", epilog=EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@eval_options
@click.option("--per-sample", is_flag=True,
              help="Also write one row per (checkpoint, attack, sample) with its robust flag to OUTPUT's stem "
                   "+ .samples.csv.")
@output_option("eval.csv", siblings={"per_sample": ".samples"})
@data_options
@foreign_options
@scale_options
@common_options
def eval_command(checkpoints, per_sample, samples, threat, config, output, data, models, device, batch_size, seed,
                 quiet, share) -> None:
    """Accuracy of CHECKPOINTS under natural and adversarial inputs.

    Writes one row per (checkpoint, split, attack): checkpoint, split, attack, norm,
    eps, alpha, steps, restarts, n, accuracy, loss; with --per-sample also one row per
    sample: checkpoint, split, attack, index, label, prediction, robust, loss. With
    --shard I/N, OUTPUT is part I's per-sample rows (atprobe merge joins the parts).
    """
    set_determinism(seed)
    study = Study(checkpoints, models, data, share=share)
    tables = studies.evaluation(study, samples, config, device, threat=threat, seed=seed, per_sample=per_sample,
                                progress=bars(quiet))
    finish(tables, output, quiet)
