"""docs/notebooks/explore.ipynb runs headless: its code cells, exported in order as one plain
script (no nbclient, no kernel), execute against the outputs of `atprobe demo --budget quick` (the
session fixture ``demo_run`` in conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebooks" / "explore.ipynb"


def code_cells(path: Path = NOTEBOOK) -> list[str]:
    """The source of every code cell, in order (nbformat 4 JSON)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        cells.append(source)
    return cells


def test_notebook_is_clean():
    """Stored without outputs, and plain Python (no IPython magics or shell escapes), so that
    the script export below is exactly what a kernel runs."""
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    for source in code_cells():
        compile(source, str(NOTEBOOK), "exec")
        assert not any(line.lstrip().startswith(("%", "!")) for line in source.splitlines())


@pytest.mark.slow
def test_notebook_runs_on_the_demo(demo_run, tmp_path, monkeypatch):
    out, result = demo_run
    assert result.exit_code == 0, (result.output, result.exception)
    import matplotlib

    matplotlib.use("Agg")  # headless: pyplot draws on Agg like in CI
    import matplotlib.pyplot as plt

    monkeypatch.setenv("ATPROBE_DEMO", str(out))
    monkeypatch.chdir(tmp_path)  # files the notebook saves land here
    namespace: dict = {"__name__": "__main__"}
    try:
        for k, source in enumerate(code_cells()):
            try:
                exec(compile(source, f"{NOTEBOOK.name}[code cell {k}]", "exec"), namespace)
            except Exception as exc:  # pragma: no cover - the failing cell in the message
                pytest.fail(f"code cell {k} failed: {type(exc).__name__}: {exc}\n{source}")
    finally:
        plt.close("all")
    assert namespace["DEMO"] == out
    assert (tmp_path / "table1.svg").stat().st_size > 1000
    kinds = set(namespace["kinds"].values())
    assert {"stability", "gradcos", "complexity", "hardness", "hardness_consistency", "table"} == kinds
    assert len(namespace["taus"]) >= 5 and len(namespace["findings"]) == 8
