"""``atprobe merge``: join the ``--shard I/N`` parts of one run into its tables (docs/scaling.md)."""

from __future__ import annotations

import click

from atprobe import shards

EXAMPLES = """
\b
Examples:
  atprobe merge part0.csv part1.csv part2.csv -o eval.csv          # eval --shard I/3 -o partI.csv
  atprobe merge hard_*/per_sample.csv -o hard                        # hardness --shard I/N --out hard_I
  atprobe merge gn_part*.csv -o gradnorm.csv                         # gradnorm (or curvature) --shard I/N
  atprobe merge st_part*.csv -o stability.csv                        # stability, gradcos, flatness: whole units
"""


@click.command("merge", epilog=EXAMPLES)
@click.argument("parts", nargs=-1, required=True, type=click.Path())
@click.option("--output", "-o", required=True, type=click.Path(),
              help="eval, gradnorm, curvature: the table (and its .samples sibling if the run had --per-sample); "
                   "stability, gradcos, flatness: the table (flatness: and .curve if the run had --curve); "
                   "hardness: the directory for per_sample.csv and consistency.csv.")
@click.option("--quiet", "-q", is_flag=True, help="Say nothing.")
def merge_command(parts, output, quiet) -> None:
    """Join PARTS, the --shard I/N outputs of one eval, hardness, gradnorm, curvature, stability, gradcos or
    flatness run, into the tables one process writes.

    Checks that the parts come from the same command (the same meta record but for the
    time, the command line and the part) and cover every sample (or, for stability, gradcos
    and flatness, every direction, pair or grid point) exactly once; then writes
    what the run writes in one process, byte for byte (hardness: without the figures).
    """
    kind, written = shards.write_merged(parts, output)
    if not quiet:
        click.echo(f"merged {len(parts)} {kind} parts: wrote {written}", err=True)
