"""``atprobe plot``: a figure from one or more CSVs of one kind."""

from __future__ import annotations

from pathlib import Path

import click

from atprobe.errors import AtprobeError
from atprobe.outputs import check_outputs

EXAMPLES = """
\b
Examples:
  atprobe plot runs/pgd/curves.csv -o curves.png
  atprobe plot runs/pgd/curves.csv runs/trades/curves.csv -o fig2.pdf --title "PGD-AT vs TRADES"
  atprobe plot stability_init.csv stability_final.csv -o stability.svg     # drawn together
  atprobe plot gradnorm.samples.csv --kind gradnorm_samples -o norms.png --dpi 200
  atprobe plot table1.csv -o table1.png                                     # Table 1's bars
  atprobe plot runs/pgd_n0 runs/pgd_n2 runs/trades_n0 --kind noise_gap -o fig2c.png
  atprobe plot runs/pgd_eps2 runs/pgd_eps8 --kind eps_curves -o fig7b.png
  atprobe plot --list-kinds
"""


def _list_kinds() -> str:
    from atprobe.plot import KINDS

    width = max(len(k) for k in KINDS)
    lines = []
    for name, kind in KINDS.items():
        lines.append(f"{name:<{width}}  {kind.description}")
        lines.append(f"{'':<{width}}  columns: {', '.join(kind.columns)}")
    return "\n".join(lines)


@click.command("plot", epilog=EXAMPLES)
@click.argument("csvs", nargs=-1, type=click.Path(), metavar="CSV|RUN_DIR [...]")
@click.option("--kind", default=None, metavar="KIND",
              help="Kind of the CSVs (default: recognized from their columns); see --list-kinds.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, metavar="FIG",
              help="The figure; its suffix picks the format: .png, .pdf or .svg.  [required]")
@click.option("--dpi", type=click.FloatRange(min=1, max=600), default=150, show_default=True,
              help="Resolution; a PNG is (figure inches x dpi) pixels.")
@click.option("--title", default=None, help="Figure title (default: what it shows and the paper figure).")
@click.option("--list-kinds", is_flag=True, help="List the kinds of CSV and the columns they need, then exit.")
@click.option("--quiet", "-q", is_flag=True, help="No 'wrote ...' line.")
def plot_command(csvs, kind, output, dpi, title, list_kinds, quiet) -> None:
    """Draw one or more CSVs written by atprobe (or run directories) as a figure.

    The kind of table (curves, eval, gradnorm, stability, ...) is recognized from the
    columns; several CSVs of one kind are drawn together, told apart by their file
    names. A run directory is its curves.csv with its config's fields (drawn as
    curves, or --kind noise_gap / eps_curves). The figure is written atomically: on
    an error nothing is written.
    """
    if list_kinds:
        click.echo(_list_kinds())
        return
    if not csvs:
        raise click.UsageError("give one or more CSV files or run directories (or --list-kinds)")
    if output is None:
        raise click.UsageError("give the figure file with -o FIG (.png, .pdf or .svg)")
    from atprobe import plot

    check_outputs([output], csvs)
    out = Path(output)
    if out.suffix.lower() not in plot.FORMATS:
        raise AtprobeError(f"cannot tell the figure format from {out.name!r}: end the name with "
                           f"{', '.join(plot.FORMATS)}")
    if kind is not None and kind not in plot.KINDS:
        raise AtprobeError(f"unknown kind {kind!r}: choose from {', '.join(plot.KINDS)}")
    fig = plot.plot(list(csvs), kind=kind, title=title)
    plot.save_figure(fig, out, dpi=dpi)
    if not quiet:
        click.echo(f"wrote {out}", err=True)
