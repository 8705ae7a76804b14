"""The index of every error message, for docs/errors.md (``python tests/errors_index.py --write``).

Every ``AtprobeError(...)``, ``click.UsageError(...)``, ``click.BadParameter(...)``,
``OneLineError(...)`` and ``self.fail(...)`` in ``atprobe/`` and ``cli/``, with its message as
written in the source (``{...}`` are the values filled in), grouped by the module that raises
it. ``tests/test_bad_input.py`` checks that docs/errors.md holds the current index.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
BEGIN, END = "<!-- errors-index: begin (python tests/errors_index.py --write) -->", "<!-- errors-index: end -->"
RAISERS = {"AtprobeError", "UsageError", "BadParameter", "OneLineError"}

#: Module (path prefix) -> the group of docs/errors.md its messages belong to; the first match wins.
GROUPS = [
    ("atprobe/checkpoint.py", "Checkpoints"), ("atprobe/arch_inference.py", "Checkpoints"),
    ("atprobe/models/", "Checkpoints"), ("atprobe/foldbn.py", "Checkpoints"),
    ("atprobe/study.py", "Input files"), ("atprobe/studies.py", "Input files"), ("atprobe/plot/", "Input files"),
    ("cli/plot.py", "Input files"),
    ("atprobe/data/", "Data and labels"), ("atprobe/bnstats.py", "Data and labels"),
    ("atprobe/io.py", "Outputs"),
    ("atprobe/train.py", "Runs and resume"), ("atprobe/runs.py", "Runs and resume"),
    ("atprobe/distributed.py", "Runs and resume"), ("cli/train.py", "Runs and resume"),
    ("atprobe/autoattack.py", "Optional extras"),
    ("", "Numbers and options"),
]


def _text(node: ast.expr, src: str) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{" + ast.get_source_segment(src, v.value) + "}"
                       for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _text(node.left, src) + _text(node.right, src)
    return "{" + " ".join(ast.get_source_segment(src, node).split()) + "}"


def messages() -> list[tuple[str, str, str]]:
    """``(group, module, message)`` of every error raised in ``atprobe/`` and ``cli/``, in source order."""
    out = []
    for path in sorted([*(ROOT / "atprobe").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        src = path.read_text()
        for node in ast.walk(ast.parse(src)):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in RAISERS or (name == "fail" and isinstance(func, ast.Attribute)):
                group = next(g for prefix, g in GROUPS if rel.startswith(prefix))
                out.append((group, rel, " ".join(_text(node.args[0], src).split())))
    return out


def index() -> str:
    """The Markdown of the index: a section per group, a line per module and message."""
    lines = [BEGIN, ""]
    groups = dict.fromkeys(g for _, g in GROUPS)
    found = messages()
    for group in groups:
        rows = sorted({(m, msg) for g, m, msg in found if g == group})
        lines += [f"### {group} ({len(rows)})", "", "| raised in | message |", "| --- | --- |"]
        lines += [f"| `{m}` | {msg.replace('|', '&#124;').replace('`', '')} |" for m, msg in rows]
        lines.append("")
    return "\n".join([*lines, END])


def current(doc: str) -> str:
    """The index part of ``doc`` (between the markers)."""
    start, end = doc.index(BEGIN), doc.index(END) + len(END)
    return doc[start:end]


if __name__ == "__main__":
    text = DOC.read_text()
    if sys.argv[1:] == ["--write"]:
        DOC.write_text(text.replace(current(text), index()))
    else:
        print(index())
