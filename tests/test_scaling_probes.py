"""The gradient, landscape and complexity probes and Table 1 under torchrun (2 and 3 gloo
processes on the CPU) write the single-process CSVs byte for byte: per-sample probes
(gradnorm, curvature) gather their rows, the probes that reduce over samples (stability,
gradcos, flatness, complexity's measures) gather the per-sample values before the statistics,
and flatness --plane/--between split the grid. Their --shard parts merge into the same CSVs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_error, run_cli, save_seeded_checkpoint
from test_scaling import VOLATILE, torchrun
from test_scaling import _free_port as free_port

# 7 samples in chunks/batches of 2: 4 chunks, uneven over 2 and 3 ranks, the last one partial.
SAMPLES = ["--split", "train", "--n", "7", "--steps", "2", "--device", "cpu", "--quiet"]
GRID = ["--lambdas=-0.1:0.1:3", "--directions", "2"]
#: name -> (arguments, the files it writes besides OUTPUT's stem + .csv)
COMMANDS = {
    "gradnorm": (["gradnorm", "a.pt", "b.pt", "--chunk-size", "2", "--per-sample"], [".samples"]),
    "stability": (["stability", "a.pt", "--chunk-size", "2", "--losses", "clean,pgd_at", *GRID], []),
    "gradcos": (["gradcos", "a.pt", "b.pt", "a.pt", "--chunk-size", "2"], []),
    "curvature": (["curvature", "a.pt", "--batch-size", "2", "--iterations", "5", "--per-sample"], [".samples"]),
    "flatness": (["flatness", "a.pt", "b.pt", "--batch-size", "2", *GRID, "--curve"], [".curve"]),
    "plane": (["flatness", "a.pt", "b.pt", "--batch-size", "2", "--plane", "--x=-0.1:0.1:3", "--y=-0.1:0.1:2"], []),
    "between": (["flatness", "--between", "a.pt", "b.pt", "--batch-size", "2", "--t", "0:1:4"], []),
}


def _args(name: str, output: str) -> list[str]:
    return [*COMMANDS[name][0], *SAMPLES, "-o", output]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """Two cnn-small checkpoints and every command's single-process output (``NAME-1.csv``)."""
    root = tmp_path_factory.mktemp("scaling_probes")
    save_seeded_checkpoint(root / "a.pt", seed=0)
    save_seeded_checkpoint(root / "b.pt", seed=1)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for name in COMMANDS:
            run_cli(*_args(name, f"{name}-1.csv"))
    finally:
        os.chdir(cwd)
    return root


def _record(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in VOLATILE}


#: (command, processes): 3 ranks (uneven shares, a rank with one chunk) for every command, 2 for a
#: per-sample probe and a probe that reduces over samples (kept short: each launch costs ~12 s here).
RANKS = [(name, 3) for name in COMMANDS] + [("gradnorm", 2), ("flatness", 2)]


@pytest.mark.slow  # one torchrun launch per case, ~12 s each
@pytest.mark.parametrize("name,nproc", RANKS)
def test_torchrun_writes_the_single_process_csvs(single, name, nproc):
    done = torchrun(nproc, _args(name, f"{name}-{nproc}.csv"), single)
    assert done.returncode == 0, done.stderr[-3000:]
    for suffix in ["", *COMMANDS[name][1]]:
        got, want = single / f"{name}-{nproc}{suffix}.csv", single / f"{name}-1{suffix}.csv"
        assert got.read_bytes() == want.read_bytes(), (name, suffix)
        meta_got, meta_want = (json.loads(p.with_name(p.stem + ".meta.json").read_text()) for p in (got, want))
        assert meta_got["world_size"] == nproc and meta_want["world_size"] == 1
        assert _record(got.with_name(got.stem + ".meta.json")) == _record(want.with_name(want.stem + ".meta.json"))
    assert "Error" not in done.stderr and "%|" not in done.stderr  # progress on rank 0 only, and --quiet


@pytest.mark.slow  # 3 runs and 2 merges per command, ~10 s each
@pytest.mark.parametrize("name", list(COMMANDS))
def test_shard_parts_merge_to_the_single_process_csvs(single, monkeypatch, name):
    """--shard I/3 parts (given to merge out of order) join into the single-process CSVs byte
    for byte, their meta records equal but for merged_from; a missing part is a one-line error.
    gradnorm and curvature parts hold shares of the samples; the others whole directions, pairs
    or grid points (gradcos: 2 pairs over 3 parts, one part empty)."""
    monkeypatch.chdir(single)
    for i in range(3):
        run_cli(*_args(name, f"{name}-part{i}.csv"), "--shard", f"{i}/3")
    line = cli_error("merge", f"{name}-part0.csv", f"{name}-part2.csv", "-o", f"{name}-never.csv")
    assert "the parts are incomplete: part 1/3 missing" in line, line
    run_cli("merge", f"{name}-part2.csv", f"{name}-part0.csv", f"{name}-part1.csv", "-o", f"{name}-merged.csv")
    for suffix in ["", *COMMANDS[name][1]]:
        got, want = Path(f"{name}-merged{suffix}.csv"), Path(f"{name}-1{suffix}.csv")
        assert got.read_bytes() == want.read_bytes(), (name, suffix)
        record = _record(got.with_name(got.stem + ".meta.json"))
        assert record.pop("merged_from") == [f"{name}-part{i}.csv" for i in range(3)]
        assert record == _record(want.with_name(want.stem + ".meta.json"))
    assert not list(Path().glob(f"{name}-never*"))


def test_gradnorm_parts_need_an_explicit_chunk(single, monkeypatch):
    monkeypatch.chdir(single)
    line = cli_error("gradnorm", "a.pt", *SAMPLES, "--shard", "0/2", "-o", "never.csv")
    assert "--shard needs an explicit --chunk-size" in line, line
    assert not Path("never.csv").exists()


def test_point_parts_that_overlap_or_miss_a_unit_are_refused(single, monkeypatch):
    """Parts of whole units are checked on their rows: a unit in two parts, or in none, is a
    one-line error and nothing is written."""
    monkeypatch.chdir(single)
    args = ["stability", "a.pt", "--chunk-size", "4", "--losses", "clean", "--lambdas=0:0.1:2", "--directions",
            "2", "--split", "train", "--n", "3", "--steps", "1", "--device", "cpu", "--quiet"]
    for i in range(2):
        run_cli(*args, "--shard", f"{i}/2", "-o", f"u{i}.csv")
    good = pd.read_csv("u1.csv")
    good.assign(unit=0).to_csv("u1.csv", index=False)  # part 1 claims part 0's unit
    line = cli_error("merge", "u0.csv", "u1.csv", "-o", "never.csv")
    assert "the parts overlap: unit 0 is in u0.csv and u1.csv" in line, line
    good.iloc[:0].to_csv("u1.csv", index=False)  # part 1 lost its rows
    line = cli_error("merge", "u0.csv", "u1.csv", "-o", "never.csv")
    assert "the parts are incomplete: unit 1 of 2 missing" in line, line
    assert not Path("never.csv").exists()


def test_hessian_takes_no_parts(single, monkeypatch):
    """A part of a Hessian-vector product is not a table: hessian offers no --shard."""
    monkeypatch.chdir(single)
    line = cli_error("hessian", "a.pt", *SAMPLES, "--shard", "0/2", "-o", "never.csv")
    assert "--shard" in line, line
    assert not Path("never.csv").exists()


HESSIAN = ["hessian", "a.pt", "--scope", "all", "--batch-size", "2", "--top-k", "2", "--trace-samples", "5",
           "--density", "--density-steps", "5", "--blocks", "module", *SAMPLES]


@pytest.fixture(scope="module")
def hessian_single(single) -> Path:
    cwd = os.getcwd()
    os.chdir(single)
    try:
        run_cli(*HESSIAN, "-o", "hessian-1.csv")
    finally:
        os.chdir(cwd)
    return single


@pytest.mark.slow  # one torchrun launch, ~8 s
def test_hessian_sums_its_products_across_ranks(hessian_single):
    """3 ranks (shares of 2 + 1 + 1 batches): every product is summed in one all-reduce, so the
    eigenvalues, traces and density equal one process's up to the order of the sum (float32
    here), after the same number of iterations on every rank."""
    root = hessian_single
    done = torchrun(3, [*HESSIAN, "-o", "hessian-3.csv"], root)
    assert done.returncode == 0, done.stderr[-3000:]
    for suffix in ("", ".density"):
        one, three = (pd.read_csv(root / f"hessian-{k}{suffix}.csv") for k in (1, 3))
        numbers = one.select_dtypes("number").columns
        text = [c for c in one.columns if c not in numbers]
        assert one[text].equals(three[text])
        for column in numbers:
            if column in ("value", "eigenvalue", "weight", "std_error"):
                np.testing.assert_allclose(three[column], one[column], rtol=1e-5, atol=1e-9)
            else:
                assert one[column].equals(three[column]), column  # iterations, k, n, params: exactly
    assert json.loads((root / "hessian-3.meta.json").read_text())["world_size"] == 3
    assert (one["n"] == 7).all()


@pytest.mark.slow
def test_hessian_of_one_batch_refuses_torchrun(single):
    done = torchrun(2, [*HESSIAN, "--scope", "batch", "-o", "never.csv"], single)
    assert done.returncode != 0
    assert "splits its samples across ranks with --scope all" in done.stderr, done.stderr[-2000:]
    # torchrun's agent prints its own ChildFailedError traceback for any failed worker; no frame is atprobe's
    frames = [line for line in done.stderr.splitlines() if line.strip().startswith('File "')]
    assert not [f for f in frames if "atprobe" in f], frames
    assert not (single / "never.csv").exists()


COMPLEXITY = ["complexity", "a.pt", "b.pt", "--measures", "spectral,l1,margin,gap", "--margin", "--n", "7",
              "--steps", "2", "--batch-size", "2", "--device", "cpu", "--quiet"]


@pytest.mark.slow  # one torchrun launch, ~12 s
@pytest.mark.parametrize("nproc", [3])
def test_complexity_under_torchrun_is_the_single_process_csv(single, monkeypatch, nproc):
    """The layers of the norm measures split round robin, the margins and the accuracies of
    the gap by whole batches (7 samples in batches of 2), gathered before any statistic."""
    monkeypatch.chdir(single)
    if not Path("complexity-1.csv").exists():
        run_cli(*COMPLEXITY, "-o", "complexity-1.csv")
    done = torchrun(nproc, [*COMPLEXITY, "-o", f"complexity-{nproc}.csv"], single)
    assert done.returncode == 0, done.stderr[-3000:]
    got, want = Path(f"complexity-{nproc}.csv"), Path("complexity-1.csv")
    assert got.read_bytes() == want.read_bytes()
    assert json.loads(got.with_suffix(".meta.json").read_text())["world_size"] == nproc
    assert _record(got.with_suffix(".meta.json")) == _record(want.with_suffix(".meta.json"))
    assert set(pd.read_csv(want)["measure"]) == {"spectral", "l1", "margin", "gap"}


SUB_MEASURES = """
import sys
import torch
from atprobe.distributed import SampleShare, probe_context
from atprobe.models import build_model
from atprobe.probes import complexity, curvature, flatness, hessian
from atprobe.study import DataSource, SampleSpec, Study
from atprobe.threat import ThreatModel

ctx, device = probe_context("cpu")
study = Study(["a.pt"], data=DataSource(), share=SampleShare.of(ctx))
ckpt = study.checkpoints[0]
samples = study.samples(ckpt, SampleSpec(split="train", n=7))
threat = ThreatModel(steps=2)
config = complexity.ComplexityConfig(
    measures=("curvature", "hessian", "flatness"), threat=threat, batch_size=2,
    curvature=curvature.CurvatureConfig(batch_size=2, iterations=5, threat=threat),
    hessian=hessian.HessianConfig(scope=sys.argv[2], batch_size=2, top_k=1, trace_samples=4, threat=threat),
    flatness=flatness.FlatnessConfig(lambdas=(-0.1, 0.0, 0.1), radius=0.1, directions=2, batch_size=2,
                                     threat=threat))
table = complexity.probe(study.model(ckpt, device), samples, config, share=study.share)
if ctx.rank == 0:
    table.to_csv(sys.argv[1], index=False)
"""


@pytest.mark.slow  # three launches, ~25 s
@pytest.mark.parametrize("scope", ["all", "batch"])
def test_complexity_sub_measures_split_across_ranks(single, scope):
    """curvature (rows gathered), flatness (values gathered per point) and hessian over the
    whole set (products summed) on 3 ranks equal one process: curvature and flatness bit for
    bit, the Hessian's sums to float32 rounding; the one-batch Hessian, which cannot be split,
    is computed whole on every rank and equals one process exactly."""
    script = single / "sub_measures.py"
    script.write_text(SUB_MEASURES)
    one = subprocess.run([sys.executable, str(script), f"sub-{scope}-1.csv", scope], cwd=single,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), str(script), f"sub-{scope}-3.csv", scope],
                          cwd=single, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (pd.read_csv(single / f"sub-{scope}-{k}.csv") for k in (1, 3))
    exact = a["measure"] != "hessian"
    assert a[exact].equals(b[exact])
    tol = 1e-5 if scope == "all" else 0.0
    np.testing.assert_allclose(b.loc[~exact, "value"], a.loc[~exact, "value"], rtol=tol, atol=0)
    assert list(a["measure"]) == ["curvature", "curvature", "hessian", "hessian", "flatness"]


@pytest.mark.slow  # one torchrun launch, ~12 s
@pytest.mark.parametrize("nproc", [3])
def test_table_under_torchrun_is_the_single_process_csv(tmp_path, nproc):
    """Table 1 of two runs (best.pt and final.pt each, 7 samples in batches of 2) under torchrun."""
    from tests.test_table import _curves, _made_run

    runs = [_made_run(tmp_path / name, method=method, noise=0.0, eps=8 / 255, curves=_curves(1, 0.75, 0.5, 0.375))
            for name, method in (("r1", "pgd_at"), ("r2", "trades"))]
    args = ["table", *map(str, runs), "--attack", "natural,pgd2", "--n", "7", "--batch-size", "2", "--device", "cpu",
            "--quiet"]
    run_cli(*args, "-o", str(tmp_path / "t1.csv"))
    done = torchrun(nproc, [*args, "-o", "tn.csv"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "tn.csv").read_bytes() == (tmp_path / "t1.csv").read_bytes()
    assert json.loads((tmp_path / "tn.meta.json").read_text())["world_size"] == nproc


def test_parts_of_a_checkpoint_given_twice_merge(single, monkeypatch):
    """``flatness a.pt a.pt`` is two blocks of rows: their units are numbered by position, not by
    the file, so the parts of such a run cover every unit once and merge into its CSVs."""
    monkeypatch.chdir(single)
    args = ["flatness", "a.pt", "a.pt", "--batch-size", "4", "--lambdas=-0.1:0.1:3", "--directions", "2", "--curve",
            "--split", "train", "--n", "3", "--steps", "1", "--device", "cpu", "--quiet"]
    run_cli(*args, "-o", "twice-1.csv")
    for i in range(2):
        run_cli(*args, "--shard", f"{i}/2", "-o", f"twice-part{i}.csv")
    run_cli("merge", "twice-part1.csv", "twice-part0.csv", "-q", "-o", "twice-merged.csv")
    for suffix in ("", ".curve"):
        assert Path(f"twice-merged{suffix}.csv").read_bytes() == Path(f"twice-1{suffix}.csv").read_bytes()
