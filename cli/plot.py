"""``atprobe plot``: a figure from one or more CSVs of one kind."""

from __future__ import annotations

from pathlib import Path

import click

from atprobe.errors import AtprobeError

EXAMPLES = """
\b
Examples:
  atprobe plot runs/pgd/curves.csv -o curves.png
  atprobe plot runs/pgd/curves.csv runs/trades/curves.csv -o fig2.pdf --title "PGD-AT vs TRADES"
  atprobe plot stability_init.csv stability_final.csv -o stability.svg     # drawn together
  atprobe plot gradnorm.samples.csv --kind gradnorm_samples -o norms.png --dpi 200
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
@click.argument("csvs", nargs=-1, type=click.Path(dir_okay=False), metavar="CSV [CSV...]")
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
    """Draw one or more CSVs written by atprobe as a figure.

    The kind of table (curves, eval, gradnorm, stability, ...) is recognized from the
    columns; several CSVs of one kind are drawn together, told apart by their file
    names. The figure is written atomically: on an error nothing is written.
    """
    if list_kinds:
        click.echo(_list_kinds())
        return
    if not csvs:
        raise click.UsageError("give one or more CSV files (or --list-kinds)")
    if output is None:
        raise click.UsageError("give the figure file with -o FIG (.png, .pdf or .svg)")
    from atprobe import plot

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
