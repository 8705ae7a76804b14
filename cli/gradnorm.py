"""``atprobe gradnorm``: per-sample gradient norms of the parts of the AT objectives
(Dong et al., ICLR 2022, Sec. 3.2, Fig. 3, A.9; docs/probes/gradnorm.md)."""

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
from atprobe.probes import gradnorm
from atprobe.runtime import set_determinism
from atprobe.study import Study

EXAMPLES = """
\b
Examples:
  atprobe gradnorm run/final.pt --n 1000 -o gradnorm.csv
  atprobe gradnorm run/epoch_0010.pt run/epoch_0100.pt --per-sample -o gn.csv   # also gn.samples.csv
  atprobe gradnorm noisy_run/final.pt --noisy-vs-clean -o gn_noisy.csv             # Fig. A.9
  atprobe gradnorm run/final.pt --n 50000 --chunk-size 128 --shard 2/8 -o gn2.csv   # part 2 of 8; atprobe merge
"""


@click.command("gradnorm", epilog=EXAMPLES)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@sample_options
@click.option("--noisy-vs-clean", is_flag=True,
              help="Also summarize the samples whose trained label differs from the true one (noisy) and the "
                   "others (clean) apart (Fig. A.9).")
@click.option("--per-sample", is_flag=True,
              help="Also write one row per sample to OUTPUT's stem + .samples.csv.")
@attack_options
@bn_stats_option
@output_option("gradnorm.csv", siblings={"per_sample": ".samples"})
@data_options
@foreign_options
@scale_options
@common_options
def gradnorm_command(checkpoints, samples, noisy_vs_clean, per_sample, threat, beta, chunk_size, bn_stats, output,
                     data, models, device, batch_size, seed, quiet, share) -> None:
    """Per-sample gradient norms of the parts of the AT objectives in CHECKPOINTS.

    ||grad CE||, ||grad CE(x')||, ||grad R|| (R = CE(x') - CE(x)), ||grad KL||, ||grad beta KL|| and the
    ratios ||grad R|| / ||grad CE||, ||grad beta KL|| / ||grad CE|| (Dong et al. 2022, Fig. 3).
    Writes one row per (checkpoint, group, quantity, statistic): checkpoint, epoch, split, labels,
    group, quantity, statistic, n, value (docs/probes/gradnorm.md).
    """
    set_determinism(seed)
    config = gradnorm.GradNormConfig(threat=threat, beta=beta, seed=seed, noisy_vs_clean=noisy_vs_clean)
    study = Study(checkpoints, models, data, share=share)
    tables = studies.gradnorm(study, samples, config, device, chunk_size=chunk_size,
                              batch_size=batch_size, per_sample=per_sample, bn_stats=bn_stats,
                              progress=bars(quiet))
    finish(tables, output, quiet)
