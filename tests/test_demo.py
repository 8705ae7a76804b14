"""`atprobe demo`: one run at the CI size (the session fixture ``demo_run`` in conftest),
every expected file written and readable, each CSV's meta recording its step's command, the
figures valid PNGs, the report showing every figure; bad options and a failing step give one
line. Each step's command line, parsed and run by its click command with the library calls
recorded, makes the very call the demo makes (the two cannot drift), and the demo leaves the
working directory and ``sys.argv`` alone."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import struct
import sys
import zlib
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from atprobe.cli.main import cli
from atprobe.demo import (
    BUDGETS,
    RUN_BY,
    RUNS,
    Budget,
    DemoConfig,
    PlotCall,
    ProbeCall,
    TrainCall,
    budget_for,
    expected_files,
    figures,
    run_demo,
    steps,
)
from atprobe.errors import AtprobeError
from atprobe.io import meta_path
from tests.conftest import cli_error

QUICK = BUDGETS["quick"]


@pytest.fixture(scope="module")
def demo(demo_run):
    return demo_run  # run_cli checked its exit status


def _plan(out: Path):
    return steps(DemoConfig(out=out, quick=True, device="cpu"), QUICK, "cpu")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature, IHDR chunk and CRC and that it
    has image data and ends with IEND."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13, path
    ihdr = data[16:29]
    (crc,) = struct.unpack(">I", data[29:33])
    assert crc == zlib.crc32(b"IHDR" + ihdr), f"{path}: bad IHDR CRC"
    width, height = struct.unpack(">II", ihdr[:8])
    assert b"IDAT" in data and data.endswith(b"IEND\xaeB`\x82"), f"{path}: no image data or truncated"
    return width, height


@pytest.mark.slow
def test_progress_one_line_per_step(demo):
    out, result = demo
    plan = _plan(out)
    lines = result.stderr.strip().splitlines()
    numbered = [line for line in lines if re.match(r"^\[ ?\d+/\d+\] ", line)]
    assert len(numbered) == len(plan) == 34
    assert [line.split("] ", 1)[1].split(":", 1)[0] for line in numbered] == [s.name for s in plan]
    assert lines[0].startswith("atprobe demo: 34 steps") and "budget quick" in lines[0]
    assert lines[-1].startswith("done in ") and "index.html" in lines[-1]
    assert len(lines) == len(plan) + 2  # the steps' own output is silenced (-q)


@pytest.mark.slow
def test_every_expected_file_exists(demo):
    out, _ = demo
    files = expected_files(DemoConfig(out=out, quick=True, device="cpu"), QUICK)
    missing = [f for f in files if not (out / f).is_file()]
    assert not missing
    tables = [f for f in files if f.endswith(".csv")]
    assert {f"runs/{r.name}/curves.csv" for r in RUNS} <= set(tables)
    for f in tables:  # every table the demo names: a header, rows, and a meta that agrees
        df = pd.read_csv(out / f)
        assert len(df.columns) > 1 and len(df) > 0, f
        assert not any(c.startswith("Unnamed") for c in df.columns), f  # no stray index column
        meta = json.loads(meta_path(out / f).read_text())
        assert meta["columns"] == list(df.columns) and meta["rows"] == len(df), f
    for f in files:  # every image, the report's figures and those a command draws beside its tables
        if f.endswith(".png"):
            png_size(out / f)
    written = min((out / f).stat().st_mtime for f in ("report.md", "index.html"))
    assert all((out / f).stat().st_mtime <= written for f in files if f not in ("report.md", "index.html"))


@pytest.mark.slow
def test_csvs_parse_and_meta_records_the_step(demo):
    out, _ = demo
    for step in _plan(out):
        for f in step.outputs:
            if not f.endswith(".csv"):
                continue
            df = pd.read_csv(out / f)
            assert len(df) > 0, f
            meta = json.loads(meta_path(out / f).read_text())
            # the equivalent command line, not the process's argv (the demo's, or pytest's)
            assert meta["command"] == ["atprobe", *step.args] and meta["run_by"] == RUN_BY, f
            assert meta["rows"] == len(df) and meta["columns"] == list(df.columns), f
    for run in RUNS:
        curves = pd.read_csv(out / "runs" / run.name / "curves.csv")
        assert sorted(curves["epoch"].unique()) == list(range(1, QUICK.epochs + 1))
        config = json.loads((out / "runs" / run.name / "config.json").read_text())
        assert config["label_noise"] == (1.0 if run.random_labels else 0.0), run
        assert config["method"] == run.method and config["seed"] == run.seed_offset, run


@pytest.mark.slow
def test_tables_hold_what_the_report_says(demo):
    out, _ = demo
    ev = pd.read_csv(out / "probes" / "eval.csv")
    assert set(ev["checkpoint"]) == {f"runs/{r.name}/final.pt" for r in RUNS}
    assert set(ev["attack"]) == set(QUICK.eval_attacks)
    assert (ev["n"] == QUICK.eval_n).all() and ev["accuracy"].between(0, 1).all()
    gn = pd.read_csv(out / "probes" / "gradnorm_training.csv")
    assert sorted(gn["epoch"].unique()) == list(range(1, QUICK.epochs + 1))
    assert gn["checkpoint"].nunique() == 2 * QUICK.epochs
    noisy = pd.read_csv(out / "probes" / "gradnorm_random.csv")
    assert {"clean", "noisy"} <= set(noisy["group"])
    for method in ("pgd_at", "trades"):
        gc = pd.read_csv(out / "probes" / f"gradcos_{method}.csv")
        assert len(gc) == QUICK.epochs - 1 and (gc["loss"] == method).all() and gc["cos_mean"].between(-1, 1).all()
    cx = pd.read_csv(out / "probes" / "complexity.csv")
    noise = cx.drop_duplicates("checkpoint").set_index("checkpoint")["label_noise"]
    assert noise.to_dict() == {f"runs/{r.name}/final.pt": (1.0 if r.random_labels else 0.0) for r in RUNS}
    assert set(cx["measure"]) == set(QUICK.complexity_measures)
    pairs = pd.read_csv(out / "probes" / "hardness" / "consistency.csv")
    assert len(pairs) == 1 and -1 <= pairs["kendall_tau"].iloc[0] <= 1
    record = json.loads((out / "demo.json").read_text())
    assert record["budget"] == json.loads(json.dumps(dataclasses.asdict(QUICK))) and len(record["steps"]) == 34
    assert record["total_seconds"] >= sum(s["seconds"] for s in record["steps"]) - 1


@pytest.mark.slow
def test_figures_are_valid_images(demo):
    out, _ = demo
    from atprobe import plot

    for fig in figures():  # every figure the report names, and the tables it is drawn from
        w, h = png_size(out / fig.file)
        assert 200 <= w <= 3000 and 150 <= h <= 3000, (fig.file, w, h)
        assert fig.csvs or fig.made_by, fig.file
        for csv in fig.csvs:
            df = pd.read_csv(out / csv)
            assert len(df) > 0, (fig.file, csv)
            kind = fig.kind or plot.detect_kind(df)  # raises when the columns match no kind
            assert set(plot.KINDS[kind].columns) <= set(df.columns), (fig.file, csv, kind)
    # atprobe plot draws (figure inches x dpi) pixels: every figure at the budget's dpi
    w, h = png_size(out / "figures" / "fig4a_stability.png")
    import matplotlib.image

    pixels = matplotlib.image.imread(out / "figures" / "fig4a_stability.png")
    assert pixels.shape[:2] == (h, w) and pixels.std() > 0.01  # something drawn, not a blank canvas


@pytest.mark.slow
def test_report_shows_every_figure(demo):
    out, _ = demo
    md = (out / "report.md").read_text()
    page = (out / "index.html").read_text()
    md_images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    html_images = re.findall(r'<img src="([^"]+)"', page)
    wanted = [f.file for f in figures()]
    assert md_images == wanted and html_images == wanted
    for f in wanted:
        assert (out / f).is_file() and png_size(out / f)[0] > 0
    for fig in figures():  # one line on what it shows and the paper figure, and the command
        assert fig.caption in md and f"Mirrors {fig.paper}." in md
    shown = md.split("## Figures")[1].split("## Files")[0]
    assert shown.count("\n`atprobe plot ") == len([f for f in figures() if f.made_by is None])
    assert shown.count("\n`atprobe hardness ") == 1
    assert "pgd_at-random" in md and "| model | natural | pgd5 |" in md
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_budgets_and_config():
    assert budget_for("synthetic", "cpu") is BUDGETS["synthetic-cpu"]
    assert budget_for("cifar10", "cpu") is BUDGETS["real-cpu"]
    assert budget_for("cifar10", "cuda") is BUDGETS["cuda"] and BUDGETS["cuda"].arch == "resnet18"
    assert budget_for("cifar10", "cuda", quick=True) is QUICK
    assert "hessian" not in BUDGETS["synthetic-cpu"].complexity_measures and BUDGETS["cuda"].complexity_measures == ()
    with pytest.raises(AtprobeError, match="epochs must be >= 2"):
        Budget(name="x", epochs=1)
    with pytest.raises(AtprobeError, match="integer"):
        Budget(name="x", probe_n=3.5)
    with pytest.raises(AtprobeError, match="alpha must be a finite number"):
        Budget(name="x", alpha="4/255")  # typed: a float, no longer a string for click
    with pytest.raises(AtprobeError, match="tuple of names"):
        Budget(name="x", eval_attacks="natural,pgd10")
    with pytest.raises(AtprobeError, match="lambdas"):
        Budget(name="x", flatness_lambdas="-0.5:0.5")
    assert Budget(name="x", lr=1).lr == 1.0 and isinstance(Budget(name="x", lr=1).lr, float)
    assert BUDGETS["cuda"].describe().count("step 2/255") == 1 and "lr 0.1 " in QUICK.describe()
    with pytest.raises(AtprobeError, match="unknown dataset"):
        DemoConfig(dataset="imagenet")
    with pytest.raises(AtprobeError, match="npz needs --data-dir"):
        DemoConfig(dataset="npz")
    with pytest.raises(AtprobeError, match="--download is for real datasets"):
        DemoConfig(download=True)
    plan = steps(DemoConfig(dataset="cifar10", data_dir="/data/c10", download=True), BUDGETS["real-cpu"], "cpu")
    train = next(s for s in plan if s.name == "train pgd_at-true")
    assert ("--dataset", "cifar10") == train.args[train.args.index("--dataset"):][:2]
    assert all("/data/c10" in s.args for s in plan if s.args[0] != "plot")
    assert [s.args[0] for s in plan if "--download" in s.args] == ["train"] * len(RUNS)
    gpu = {s.args[0]: s.args for s in steps(DemoConfig(), BUDGETS["cuda"], "cuda")}
    assert "--n" not in gpu["eval"] and "--all" in gpu["hardness"] and "--measures" not in gpu["complexity"]


def test_bad_options_one_line(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("x")
    line = cli_error("demo", "--out", full)
    assert "already exists and is not an empty folder" in line and (full / "x.txt").read_text() == "x"
    assert len(list(full.iterdir())) == 1
    assert "mnist" in cli_error("demo", "--out", tmp_path / "a", "--dataset", "mnist")
    assert "seed" in cli_error("demo", "--out", tmp_path / "b", "--seed", "x")
    assert "tpu" in cli_error("demo", "--out", tmp_path / "c", "--device", "tpu")
    line = cli_error("demo", "--out", tmp_path / "d", "--dataset", "cifar10", "--data-dir", tmp_path / "nowhere")
    assert "does not exist" in line


def test_failing_step_is_named(tmp_path):
    """A step that fails stops the demo with one line naming it, and no report."""
    empty = tmp_path / "data"
    empty.mkdir()
    out = tmp_path / "out"
    line = cli_error("demo", "--out", out, "--dataset", "cifar10", "--data-dir", empty, "--quick", "--device", "cpu")
    assert line.startswith("Error: demo step 1/34 'train pgd_at-true' failed: ")
    assert not (out / "report.md").exists() and not (out / "index.html").exists()


@pytest.mark.slow
def test_gradnorm_bars_have_their_std_whiskers(demo):
    """atprobe.plot.gradnorm's bar mode (one epoch per checkpoint) draws a ± std whisker on every
    norm bar (three lines each: the bar and two caps) at the bar's mean, matched to its hue level."""
    from atprobe import plot

    out, _ = demo
    table = pd.read_csv(out / "probes" / "gradnorm_random.csv")
    norms = table[table["quantity"].isin(plot.GRADS)]
    wide = norms.pivot_table(index=["checkpoint", "group", "quantity"], columns="statistic", values="value")
    fig = plot.gradnorm(table)
    ax = fig.axes[0]
    assert len(ax.lines) == 3 * len(wide)  # per whisker: the point and two caps
    drawn = sorted(round(float(line.get_ydata()[0]), 9) for line in ax.lines)
    expected = sorted(round(v, 9) for m, sd in zip(wide["mean"], wide["std"])
                      for v in (m, m - min(sd, 0.95 * m), m + sd))
    assert drawn == expected


# --------------------------------------------------------------------------- the command lines make the same calls


class _Recorded:
    """What a command's callback handed to the library."""

    def __init__(self):
        self.calls: dict[str, tuple] = {}

    def hook(self, name: str, result=None):
        def record(*args, **kwargs):
            self.calls[name] = (args, kwargs)
            return result(*args, **kwargs) if callable(result) else result
        return record


class _FakeTables:
    """Stands for the tables a study function returns: ``write`` records where."""

    def __init__(self, recorded: _Recorded):
        self.recorded, self.main, self.shown = recorded, pd.DataFrame({"x": [1]}), None
        self.meta: dict = {}

    def write(self, output):
        self.recorded.calls["write"] = ((output,), {})


def _command_call(step, monkeypatch) -> _Recorded:
    """Run ``atprobe <step.args>`` through the click group with the library functions it calls
    replaced by recorders (no checkpoint is read, nothing is trained or written)."""
    import atprobe.plot
    from atprobe import studies

    recorded = _Recorded()
    command = step.args[0]
    module = importlib.import_module(f"atprobe.cli.{command}")
    if command == "train":
        monkeypatch.setattr(module, "train", recorded.hook("train"))
    elif command == "plot":
        monkeypatch.setattr(atprobe.plot, "plot", recorded.hook("plot"))
        monkeypatch.setattr(atprobe.plot, "save_figure", recorded.hook("save_figure"))
    else:
        function = step.call.function
        tables = _FakeTables(recorded)
        result = (tables, None, []) if function == "hardness" else tables
        monkeypatch.setattr(module, "Study", recorded.hook("Study", result=lambda *a, **k: "the study"))
        monkeypatch.setattr(module, "set_determinism", recorded.hook("set_determinism"))
        monkeypatch.setattr(studies, function, recorded.hook("probe", result=result))
        monkeypatch.setattr(studies, "write_hardness", recorded.hook("write_hardness"))
    result = CliRunner().invoke(cli, list(step.args), prog_name="atprobe", catch_exceptions=False)
    assert result.exit_code == 0, (step.command, result.output)
    return recorded


@pytest.mark.parametrize("config, budget", [
    (DemoConfig(quick=True, device="cpu"), QUICK),
    (DemoConfig(seed=3), BUDGETS["cuda"]),  # --all, eval on the whole split, every complexity measure, 2/255
    (DemoConfig(dataset="cifar10", data_dir="/data/c10", download=True), BUDGETS["real-cpu"]),
], ids=["quick", "cuda", "real-cpu-data-dir"])
def test_each_command_line_makes_the_demos_call(config, budget, monkeypatch):
    """The command line a step shows (report, meta), parsed by its click command, builds the
    very config and call the demo makes: same defaults, same typed values (4/255, 0.1, grids)."""
    import torch

    from atprobe.study import ModelSource

    cpu = torch.device("cpu")
    plan = steps(config, budget, "cpu")
    assert {type(s.call) for s in plan} == {TrainCall, ProbeCall, PlotCall}
    for step in plan:
        call, recorded = step.call, _command_call(step, monkeypatch).calls
        if isinstance(call, TrainCall):
            (train_config, out_dir), kwargs = recorded["train"]
            assert train_config == call.config and out_dir == call.out_dir, step.name
            assert kwargs["device"] == cpu and not kwargs["resume"], step.name
        elif isinstance(call, PlotCall):
            (csvs,), kwargs = recorded["plot"]
            assert tuple(csvs) == call.csvs and kwargs == {"kind": call.kind, "title": None}, step.name
            (_, output), kwargs = recorded["save_figure"]
            assert Path(output) == Path(call.output) and kwargs == {"dpi": call.dpi}, step.name
        else:
            (checkpoints, models, data), _ = recorded["Study"]
            assert tuple(checkpoints) == call.checkpoints, step.name
            assert models == ModelSource() and data == call.data, step.name
            assert recorded["set_determinism"][0] == (call.seed,), step.name
            args, kwargs = recorded["probe"]
            inputs = (call.config,) if call.spec is None else (call.spec, call.config)
            assert args == ("the study", *inputs, cpu), step.name
            assert {k: v for k, v in kwargs.items() if k != "progress"} == dict(call.options), step.name
            written = recorded["write_hardness" if call.function == "hardness" else "write"][0][0]
            assert written == call.output, step.name


@pytest.mark.slow  # a whole (tiny) demo run (~25 s)
def test_run_demo_leaves_cwd_and_argv_alone(tmp_path, monkeypatch):
    """Every step is a library call with paths under --out: the working directory, sys.argv
    and the folder the demo was started from are as they were (a tiny budget, ~20 s)."""
    started_in = tmp_path / "started_in"
    started_in.mkdir()
    monkeypatch.chdir(started_in)
    argv = ["sentinel-program", "--sentinel"]
    monkeypatch.setattr(sys, "argv", argv)
    tiny = Budget(name="tiny", train_n=32, epochs=2, batch_size=32, steps=1, curve_n=16, curve_attack="pgd1",
                  grad_ratio_iters=1, eval_n=16, eval_attacks=("natural",), probe_n=4, noisy_n=8, complexity_n=8,
                  hardness_n=16, complexity_measures=("spectral", "gap"), stability_lambdas="-0.05:0.05:3",
                  flatness_lambdas="-0.5:0.5:3", flatness_directions=1, curvature_iterations=2,
                  hessian_iterations=2, hessian_trace_samples=2, hessian_density_steps=3, dpi=40)
    out = tmp_path / "out"
    report = run_demo(DemoConfig(out=out, device="cpu", budget=tiny))
    assert os.getcwd() == str(started_in) and sys.argv is argv and argv == ["sentinel-program", "--sentinel"]
    assert list(started_in.iterdir()) == []
    assert report == out.resolve() / "report.md" and (out / "index.html").is_file()
    for meta in out.rglob("*.meta.json"):
        record = json.loads(meta.read_text())
        assert record["command"][0] == "atprobe" and record["run_by"] == RUN_BY, meta
