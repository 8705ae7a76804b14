"""The ``atprobe`` command group and its error handling."""

from __future__ import annotations

import sys

import click
import torch

import atprobe
from atprobe.errors import AtprobeError


class OneLineError(click.ClickException):
    """Printed as ``Error: <message>``; exit status 2 like click's own usage errors."""

    exit_code = 2


class AtprobeGroup(click.Group):
    """Turns user-facing errors into one line on stderr and exit status 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AtprobeError as exc:
            raise OneLineError(str(exc).splitlines()[0] if str(exc) else "error") from None
        except torch.OutOfMemoryError:
            raise OneLineError("out of memory on the device: lower --batch-size or --n") from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
            raise OneLineError(f"{exc.strerror or type(exc).__name__}: {exc.filename}") from None


EXAMPLES = """
\b
Examples:
  atprobe train --method pgd_at --epochs 5 --out runs/quick
  atprobe eval runs/quick/best.pt --attack natural,pgd20 -o eval.csv
  atprobe train --resume runs/quick
"""


@click.group(cls=AtprobeGroup, epilog=EXAMPLES,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(atprobe.__version__, prog_name="atprobe")
def cli() -> None:
    """Probe why adversarially trained models behave as they do.

    Every command writes a tidy CSV and a .meta.json beside it. Run
    `atprobe COMMAND --help` for a command's options and examples.
    """


def _register() -> None:
    from atprobe.cli.complexity import complexity_command
    from atprobe.cli.curvature import curvature_command
    from atprobe.cli.demo import demo_command
    from atprobe.cli.eval import eval_command
    from atprobe.cli.flatness import flatness_command
    from atprobe.cli.gradcos import gradcos_command
    from atprobe.cli.gradnorm import gradnorm_command
    from atprobe.cli.hardness import hardness_command
    from atprobe.cli.hessian import hessian_command
    from atprobe.cli.merge import merge_command
    from atprobe.cli.plot import plot_command
    from atprobe.cli.stability import stability_command
    from atprobe.cli.table import table_command
    from atprobe.cli.train import train_command

    for command in (train_command, eval_command, gradnorm_command, stability_command, gradcos_command,
                    hardness_command, complexity_command, curvature_command, hessian_command, flatness_command,
                    table_command, plot_command, demo_command, merge_command):
        cli.add_command(command)


_register()


def main(args: list[str] | None = None) -> None:
    """The console script and ``python -m atprobe.cli.main``. A leading ``--`` is dropped: under
    ``torchrun ... -m atprobe.cli.main -- COMMAND ...`` it keeps torchrun's own parser from
    reading atprobe's options (``--n`` as an abbreviation of ``--nnodes``; docs/scaling.md)."""
    args = sys.argv[1:] if args is None else list(args)
    if args[:1] == ["--"]:
        args = args[1:]
    cli(args=args, prog_name="atprobe")


if __name__ == "__main__":
    main()
