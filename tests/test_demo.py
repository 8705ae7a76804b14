"""`atprobe demo`: one run at the CI size (the session fixture ``demo_run`` in conftest),
checked for what it must hold, not for exact file counts: findings.csv has every finding, a
finite statistic and a verdict from the allowed set, each the rule of atprobe.findings on the
tables beside it; the report opens with the findings table and shows every figure; each
CSV's meta records its step's command. Each step's command line, parsed and run by its click
command with the library calls recorded, makes the very call the demo makes (the two cannot
drift); --resume skips finished steps and refuses another demo's folder; the demo leaves the
working directory and ``sys.argv`` alone."""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import struct
import sys
import zlib
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from atprobe import findings as rules
from atprobe.cli.main import cli
from atprobe.demo import (
    BUDGETS,
    FINDINGS_CSV,
    PAPER_RUNS,
    RUN_BY,
    RUNS,
    Budget,
    DemoConfig,
    PlotCall,
    ProbeCall,
    TableCall,
    TrainCall,
    budget_for,
    expected_files,
    figures,
    measure_findings,
    run_demo,
    runs,
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
    return steps(DemoConfig(out=out, budget="quick", device="cpu"), QUICK, "cpu")


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
def test_findings_table(demo):
    """Every finding present, in order, with a finite statistic and a verdict of the allowed set;
    the same as the rules give on the tables the demo wrote; its meta records the demo."""
    out, _ = demo
    table = pd.read_csv(out / FINDINGS_CSV)
    assert list(table["finding"]) == list(range(1, 9))
    assert list(table["key"]) == [f.key for f in rules.FINDINGS]
    assert table["measured"].map(math.isfinite).all(), table[["key", "measured"]]
    assert set(table["verdict"]) <= set(rules.VERDICTS)
    assert table["detail"].str.len().gt(10).all() and table["paper"].str.len().gt(5).all()
    measured = measure_findings(out, QUICK)
    assert list(table["verdict"]) == [measured[k].verdict for k in table["key"]]
    assert table["measured"].tolist() == pytest.approx([measured[k].statistic for k in table["key"]])
    for fig in table["figure"]:
        png_size(out / fig)
    meta = json.loads(meta_path(out / FINDINGS_CSV).read_text())
    assert meta["command"][:2] == ["atprobe", "demo"] and meta["run_by"] == RUN_BY and meta["seed"] == 0
    assert meta["rows"] == 8 and meta["columns"] == list(table.columns)
    assert {c["path"] for c in meta["run_checkpoints"]} == {f"runs/{r.name}/{f}" for r in RUNS
                                                            for f in ("best.pt", "final.pt")}
    assert all(len(c["sha256"]) == 64 for c in meta["run_checkpoints"])
    plan = {s.command for s in _plan(out)}
    assert set(meta["commands"]) == set(table["key"])
    assert all(c in plan for cs in meta["commands"].values() for c in cs)


@pytest.mark.slow
def test_progress_one_line_per_step(demo):
    out, result = demo
    plan = _plan(out)
    lines = result.stderr.strip().splitlines()
    numbered = [line for line in lines if re.match(r"^\[ ?\d+/\d+\] ", line)]
    assert len(numbered) == len(plan)
    assert [line.split("] ", 1)[1].split(":", 1)[0] for line in numbered] == [s.name for s in plan]
    assert lines[0].startswith(f"atprobe demo: {len(plan)} steps") and "budget quick" in lines[0]
    verdicts = lines[len(plan) + 1:-1]
    assert len(verdicts) == 8 and all(line.rsplit(": ", 1)[1] in rules.VERDICTS for line in verdicts)
    assert lines[-1].startswith("done in ") and "index.html" in lines[-1]


@pytest.mark.slow
def test_every_expected_file_exists(demo):
    out, _ = demo
    files = expected_files(DemoConfig(out=out, budget="quick", device="cpu"), QUICK)
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
    for f in files:
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
            meta = json.loads(meta_path(out / f).read_text())
            # the equivalent command line, not the process's argv (the demo's, or pytest's)
            assert meta["command"] == ["atprobe", *step.args] and meta["run_by"] == RUN_BY, f
    for run in RUNS:
        config = json.loads((out / "runs" / run.name / "config.json").read_text())
        assert config["label_noise"] == (1.0 if run.random_labels else 0.0), run
        assert config["method"] == run.method and config["seed"] == run.seed_offset, run
        assert config["mix_clean"] == run.mix_clean and config["te"] == run.te, run
        # Sec. 3.1 for the random labels: no augmentation, no weight decay, a constant rate
        if run.random_labels:
            assert (config["augment"], config["weight_decay"], config["schedule"]) == (False, 0.0, "constant")
        else:
            assert config["schedule"] == "piecewise" and config["milestones"] == [1, 2]


@pytest.mark.slow
def test_tables_hold_what_the_findings_read(demo):
    out, _ = demo
    for name, loss in (("pgd_at-random", "pgd_at"), ("trades-random", "trades")):
        gc = pd.read_csv(out / "probes" / f"gradcos_{name}.csv")
        assert len(gc) == QUICK.random_epochs - 1 and (gc["loss"] == loss).all()
        assert (gc["labels"] == "trained").all() and gc["cos_mean"].between(-1, 1).all()
        ratio = pd.read_csv(out / "runs" / name / "gradratio.csv")
        assert len(ratio) == QUICK.grad_ratio_iters and (ratio["method"] == loss).all()
    stab = pd.read_csv(out / "probes" / "stability_init.csv")
    assert set(stab["loss"]) == {"pgd_at", "trades", "clean"} and stab["bn_stats"].str.startswith("recompute").all()
    cx = pd.read_csv(out / "probes" / "complexity.csv")
    noise = cx.drop_duplicates("checkpoint").set_index("checkpoint")["label_noise"]
    assert noise.to_dict() == {f"runs/{r.name}/final.pt": (1.0 if r.random_labels else 0.0) for r in RUNS}
    table = pd.read_csv(out / "probes" / "table.csv")
    assert list(table["run"].unique()) == ["runs/pgd_at-true", "runs/pgd_at-te-true"]
    assert set(table["attack"]) == {"natural", QUICK.curve_attack} and (table["n"] == QUICK.curve_n).all()
    pairs = pd.read_csv(out / "probes" / "hardness" / "consistency.csv")
    assert len(pairs) == 1 and pairs["n"].iloc[0] == QUICK.hardness_n
    record = json.loads((out / "demo.json").read_text())
    assert record["budget"]["name"] == "quick" and len(record["steps"]) == len(_plan(out))
    assert record["total_seconds"] >= sum(s["seconds"] for s in record["steps"]) - 1


@pytest.mark.slow
def test_figures_are_valid_images(demo):
    out, _ = demo
    from atprobe import plot

    for fig in figures(QUICK):  # every figure the report names, and the tables it is drawn from
        w, h = png_size(out / fig.file)
        assert 200 <= w <= 3000 and 150 <= h <= 3000, (fig.file, w, h)
        assert fig.finding in {f.key for f in rules.FINDINGS}, fig.file
        for csv in fig.csvs:
            df = pd.read_csv(out / csv)
            kind = fig.kind or plot.detect_kind(df)  # raises when the columns match no kind
            assert set(plot.KINDS[kind].columns) <= set(df.columns), (fig.file, csv, kind)
    import matplotlib.image

    pixels = matplotlib.image.imread(out / "figures" / "fig4a_stability_init.png")
    assert pixels.std() > 0.01  # something drawn, not a blank canvas


@pytest.mark.slow
def test_report_opens_with_the_findings(demo):
    out, _ = demo
    md = (out / "report.md").read_text()
    page = (out / "index.html").read_text()
    first_table = md.split("\n\n| #")[1].split("\n\n")[0]
    rows = [r for r in first_table.splitlines()[2:] if r.startswith("| ")]
    table = pd.read_csv(out / FINDINGS_CSV)
    assert len(rows) == 8
    for row, (_, f) in zip(rows, table.iterrows()):
        assert f"**{f['verdict']}**" in row and f"[png]({f['figure']})" in row and f["source"] in row
    assert md.index("| # |") < md.index("## 1. ")  # the findings table comes first
    for f in rules.FINDINGS:  # a section per finding: rule, measured, figures and the commands
        section = md.split(f"## {f.number}. {f.source}: ")[1].split("\n## ")[0]
        assert f.rule in section and "```bash\natprobe " in section
    md_images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    html_images = re.findall(r'<img src="([^"]+)"', page)
    wanted = [fig.file for fig in figures(QUICK)]
    assert sorted(md_images) == sorted(wanted) and sorted(html_images) == sorted(wanted)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.index("<table>") < page.index('<section id="finding-')


def test_budgets_and_config():
    assert budget_for("auto", "cpu") is BUDGETS["cpu"] and budget_for("auto", "cuda") is BUDGETS["gpu"]
    assert budget_for("paper", "cpu") is BUDGETS["paper"] and BUDGETS["gpu"].arch == "resnet18"
    assert DemoConfig().dataset == "synthetic" and DemoConfig(data_dir="/d").dataset == "cifar10"
    with pytest.raises(AtprobeError, match="random_epochs must be >= 2"):
        Budget(name="x", random_epochs=1)
    with pytest.raises(AtprobeError, match="integer"):
        Budget(name="x", probe_n=3.5)
    with pytest.raises(AtprobeError, match="True or False"):
        Budget(name="x", true_augment="yes")
    with pytest.raises(AtprobeError, match="alpha must be a finite number"):
        Budget(name="x", alpha="4/255")  # typed: a float, no longer a string for click
    with pytest.raises(AtprobeError, match="lambdas"):
        Budget(name="x", stability_lambdas="-0.5:0.5")
    with pytest.raises(AtprobeError, match="unknown dataset"):
        DemoConfig(dataset="imagenet")
    with pytest.raises(AtprobeError, match="npz needs --data-dir"):
        DemoConfig(dataset="npz")
    with pytest.raises(AtprobeError, match="--download is for real datasets"):
        DemoConfig(download=True)
    with pytest.raises(AtprobeError, match="unknown budget"):
        DemoConfig(budget="huge")
    with pytest.raises(AtprobeError, match="paper budget trains on CIFAR-10"):
        DemoConfig(budget="paper").resolve_budget("cuda")
    assert "lr 0.1" in QUICK.describe() and "presets" in BUDGETS["paper"].describe()
    plan = steps(DemoConfig(data_dir="/data/c10", download=True), BUDGETS["cpu"], "cpu")
    train = next(s for s in plan if s.name == "train pgd_at-true")
    assert ("--dataset", "cifar10") == train.args[train.args.index("--dataset"):][:2]
    assert all("/data/c10" in s.args for s in plan if s.args[0] != "plot")
    assert [s.args[0] for s in plan if "--download" in s.args] == ["train"] * len(RUNS)
    gpu = {s.args[0]: s.args for s in steps(DemoConfig(), BUDGETS["gpu"], "cuda")}
    assert "--n" not in gpu["table"] and "--all" in gpu["hardness"]


def test_paper_budget_is_the_presets():
    """The paper budget trains each run from its preset (Table A.1's twelve for Fig. 6, the first
    20 epochs of Fig. 2's runs for gradcos), and its probes attack with PGD-10 at 2/255."""
    budget = BUDGETS["paper"]
    plan = {s.name: s for s in steps(DemoConfig(data_dir="/data"), budget, "cuda")}
    assert [r.name for r in runs(budget)] == [r.name for r in RUNS + PAPER_RUNS]
    for run in runs(budget):
        step = plan[f"train {run.name}"]
        assert step.args[step.args.index("--preset") + 1] == run.preset
        assert step.call.config.preset == run.preset
    first = plan["train pgd_at-random-first"].call.config.resolved()
    assert (first.epochs, first.schedule, first.save_every, first.lr) == (20, "constant", 1, 0.1)
    assert plan["train pgd_at-true-seed1"].call.config.seed == 1
    complexity = plan["complexity"].call.checkpoints
    assert len(complexity) == 12 and all("tableA1-" in c for c in complexity)
    assert plan["gradcos pgd_at-random-first"].call.checkpoints == ("runs/pgd_at-random-first",)
    assert plan["stability at init"].args[plan["stability at init"].args.index("--init") + 1] == "wrn-28-10"
    assert plan["train pgd_at-random"].call.config.resolved().threat.steps == 10
    table = plan["table"].args
    assert "pgd10" in plan["hardness"].args and table[table.index("--attack") + 1] == "natural,pgd10"


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
        function = "table" if command == "table" else step.call.function
        tables = _FakeTables(recorded)
        result = (tables, None, []) if function == "hardness" else tables
        if command != "table":  # table builds its study inside studies.table
            monkeypatch.setattr(module, "Study", recorded.hook("Study", result=lambda *a, **k: "the study"))
        monkeypatch.setattr(module, "set_determinism", recorded.hook("set_determinism"))
        monkeypatch.setattr(studies, function, recorded.hook("probe", result=result))
        monkeypatch.setattr(studies, "write_hardness", recorded.hook("write_hardness"))
    result = CliRunner().invoke(cli, list(step.args), prog_name="atprobe", catch_exceptions=False)
    assert result.exit_code == 0, (step.command, result.output)
    return recorded


@pytest.mark.parametrize("config, budget", [
    (DemoConfig(budget="quick", device="cpu"), QUICK),
    (DemoConfig(seed=3), BUDGETS["gpu"]),  # --all, the whole test split, PGD-10 at 2/255
    (DemoConfig(data_dir="/data/c10", download=True), BUDGETS["cpu"]),
    (DemoConfig(data_dir="/data/c10", seed=2), BUDGETS["paper"]),
], ids=["quick", "gpu", "cpu-data-dir", "paper"])
def test_each_command_line_makes_the_demos_call(config, budget, monkeypatch):
    """The command line a step shows (report, meta), parsed by its click command, builds the
    very config and call the demo makes: same defaults, same typed values (2/255, 0.1, grids)."""
    import torch

    from atprobe.study import ModelSource

    cpu = torch.device("cpu")
    plan = steps(config, budget, "cpu")
    assert {type(s.call) for s in plan} == {TrainCall, ProbeCall, TableCall, PlotCall}
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
        elif isinstance(call, TableCall):
            (run_dirs, spec, eval_config, device), kwargs = recorded["probe"]
            assert tuple(run_dirs) == call.runs and spec == call.spec and eval_config == call.config, step.name
            assert device == cpu and kwargs["data"] == call.data and kwargs["seed"] == call.seed, step.name
            assert recorded["set_determinism"][0] == (call.seed,), step.name
            assert recorded["write"][0][0] == call.output, step.name
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


TINY = Budget(name="tiny", steps=1, alpha=4 / 255, batch_size=32, random_n=32, random_epochs=2, random_eval_every=1,
              grad_ratio_iters=1, true_n=32, true_epochs=2, curve_n=16, curve_attack="pgd1", train_eval_n=16,
              probe_n=4, complexity_n=8, hardness_n=16, stability_lambdas="-0.05:0.05:3", stability_directions=1,
              dpi=40)


@pytest.mark.slow  # a whole (tiny) demo run, twice (~40 s)
def test_run_demo_leaves_cwd_and_argv_alone_and_resumes(tmp_path, monkeypatch):
    """Every step is a library call with paths under --out: the working directory, sys.argv
    and the folder the demo was started from are as they were. --resume skips every finished
    step (a deleted table is made again) and refuses a folder of another demo."""
    started_in = tmp_path / "started_in"
    started_in.mkdir()
    monkeypatch.chdir(started_in)
    argv = ["sentinel-program", "--sentinel"]
    monkeypatch.setattr(sys, "argv", argv)
    out = tmp_path / "out"
    report = run_demo(DemoConfig(out=out, device="cpu", budget=TINY))
    assert os.getcwd() == str(started_in) and sys.argv is argv and argv == ["sentinel-program", "--sentinel"]
    assert list(started_in.iterdir()) == []
    assert report == out.resolve() / "report.md" and (out / "index.html").is_file()
    for meta in out.rglob("*.meta.json"):
        record = json.loads(meta.read_text())
        assert record["run_by"] == RUN_BY, meta
    first = pd.read_csv(out / FINDINGS_CSV)
    final = (out / "runs" / "pgd_at-true" / "final.pt").stat().st_mtime_ns
    (out / "probes" / "table.csv").unlink()
    lines: list[str] = []
    run_demo(DemoConfig(out=out, device="cpu", budget=TINY, resume=True), progress=lines.append)
    skipped = [line for line in lines if line.endswith("done before, skipped")]
    assert len(skipped) == len(steps(DemoConfig(), TINY, "cpu")) - 1 and not any("] table:" in s for s in skipped)
    assert (out / "runs" / "pgd_at-true" / "final.pt").stat().st_mtime_ns == final
    pd.testing.assert_frame_equal(pd.read_csv(out / FINDINGS_CSV), first)
    with pytest.raises(AtprobeError, match="another budget, dataset, seed"):
        run_demo(DemoConfig(out=out, device="cpu", budget=TINY, resume=True, seed=1))
    with pytest.raises(AtprobeError, match="already exists and is not an empty folder"):
        run_demo(DemoConfig(out=out, device="cpu", budget=TINY))


def test_bad_options_one_line(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("x")
    line = cli_error("demo", "--out", full)
    assert "already exists and is not an empty folder" in line and (full / "x.txt").read_text() == "x"
    assert len(list(full.iterdir())) == 1
    assert "no demo.plan.json" in cli_error("demo", "--out", full, "--resume", "--budget", "quick")
    assert "mnist" in cli_error("demo", "--out", tmp_path / "a", "--dataset", "mnist")
    assert "seed" in cli_error("demo", "--out", tmp_path / "b", "--seed", "x")
    assert "tpu" in cli_error("demo", "--out", tmp_path / "c", "--device", "tpu")
    assert "huge" in cli_error("demo", "--out", tmp_path / "e", "--budget", "huge")
    assert "CIFAR-10" in cli_error("demo", "--out", tmp_path / "f", "--budget", "paper")
    line = cli_error("demo", "--out", tmp_path / "d", "--dataset", "cifar10", "--data-dir", tmp_path / "nowhere")
    assert "does not exist" in line
    assert not any((tmp_path / x).exists() for x in "abcdef")


def test_failing_step_is_named(tmp_path):
    """A step that fails stops the demo with one line naming it, and no findings or report."""
    empty = tmp_path / "data"
    empty.mkdir()
    out = tmp_path / "out"
    line = cli_error("demo", "--out", out, "--data-dir", empty, "--budget", "quick", "--device", "cpu")
    n = len(steps(DemoConfig(data_dir=empty), QUICK, "cpu"))
    assert line.startswith(f"Error: demo step 1/{n} 'train pgd_at-random' failed: ")
    assert not (out / "report.md").exists() and not (out / FINDINGS_CSV).exists()
