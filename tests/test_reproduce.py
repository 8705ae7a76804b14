"""docs/reproduce.md cannot drift: every ``atprobe`` command in its bash blocks names a real
command, options that command has, presets of the registry, plot kinds that exist and
attack names the parser accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from atprobe.attacks import parse_attack
from atprobe.cli.main import cli
from atprobe.plot import KINDS
from atprobe.presets import PRESETS
from atprobe.threat import ThreatModel

DOC = Path(__file__).resolve().parents[1] / "docs" / "reproduce.md"


def _commands() -> list[list[str]]:
    """The ``atprobe ...`` command lines of the doc's bash blocks, continuation lines joined,
    comments dropped, split as the shell would."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    out = []
    for line in lines:
        line = line.split(" #")[0].strip()
        if line.startswith("atprobe "):
            out.append(shlex.split(line)[1:])
    return out


COMMANDS = _commands()


def test_the_doc_has_commands_for_every_table_and_figure():
    headings = " ".join(line for line in DOC.read_text().splitlines() if line.startswith("#"))
    figures = [f"Fig. {n}" for n in range(2, 9)] + [f"Fig. A.{n}" for n in range(1, 11)] + [
        f"Fig. C.{n}" for n in range(1, 4)]
    for item in (*figures, "Table 1", "Table 2", "Table A.1", "Table C.1", "Table C.2"):
        assert re.search(re.escape(item) + r"(?![\d.])", headings), f"no section for {item}"
    assert len(COMMANDS) > 30


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a[:3]) for a in COMMANDS])
def test_each_command_names_real_options_presets_kinds_and_attacks(args):
    command = cli.commands.get(args[0])
    assert isinstance(command, click.Command), f"no command {args[0]}"
    names = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    it = iter(args[1:])
    for token in it:
        if not token.startswith("-") or token == "-":
            continue
        option, _, value = token.partition("=")
        assert option in names, f"atprobe {args[0]} has no option {option}"
        param = next(p for p in command.params if option in (*p.opts, *p.secondary_opts))
        if isinstance(param, click.Option) and not param.is_flag and not value:
            value = next(it)
        if option == "--preset":
            assert value in PRESETS, value
        elif option == "--kind":
            assert value in KINDS, value
        elif option in ("--attack", "--eval-attack"):
            for name in value.split(","):
                if not name.startswith(("aa", "apgd", "fab", "square")):  # the optional extra's names
                    parse_attack(name, ThreatModel())
