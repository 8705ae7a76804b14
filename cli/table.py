"""``atprobe table``: Table 1 of the paper (best and final checkpoints of training runs)."""

from __future__ import annotations

import click

from atprobe import studies
from atprobe.cli.common import bars, common_options, data_options, eval_options, finish, output_option, rank_options
from atprobe.runtime import set_determinism

#: Table 1's columns that need no extra package (add AutoAttack's name to --attack where it is available).
DEFAULT_ATTACKS = "natural,pgd10,pgd1000,cw1000"

EXAMPLES = """
\b
Examples:
  atprobe table runs/pgd_at runs/pgd_at_te runs/trades runs/trades_te -o table1.csv
  atprobe table runs/pgd_at runs/trades --attack natural,pgd10 --n 1000 -o quick.csv
  atprobe plot table1.csv -o table1.png
"""


@click.command("table", epilog=EXAMPLES)
@click.argument("runs", nargs=-1, required=True, type=click.Path(), metavar="RUN_DIR...")
@eval_options(attacks=DEFAULT_ATTACKS)
@output_option("table.csv", inputs="runs")
@data_options
@rank_options
@common_options
def table_command(runs, samples, threat, config, output, data, device, batch_size, seed, quiet, share) -> None:
    """Table 1 of RUN_DIRs: each run's best.pt and final.pt under every attack.

    best.pt is the checkpoint `atprobe train` selected by its robust accuracy (the paper:
    the highest PGD-10 test accuracy). Writes one row per (run, attack): the run's config
    fields, the attack's budget, n, best, final, diff = best - final, best_epoch,
    final_epoch (accuracies are fractions in [0, 1]).
    """
    set_determinism(seed)
    finish(studies.table(runs, samples, config, device, data=data, threat=threat, seed=seed, share=share,
                         progress=bars(quiet)),
           output, quiet)
