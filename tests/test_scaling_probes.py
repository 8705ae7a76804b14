"""The gradient and landscape probes under torchrun (2 and 3 gloo processes on the CPU)
write the single-process CSVs byte for byte: per-sample probes (gradnorm, curvature) gather
their rows, the probes that reduce over samples (stability, gradcos, flatness) gather the
per-sample values before the statistics, and flatness --plane/--between split the grid."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_error, run_cli, save_seeded_checkpoint
from test_scaling import VOLATILE, torchrun

# 7 samples in chunks/batches of 2: 4 chunks, uneven over 2 and 3 ranks, the last one partial.
SAMPLES = ["--split", "train", "--n", "7", "--steps", "2", "--device", "cpu", "--quiet"]
GRID = ["--lambdas=-0.1:0.1:3", "--directions", "2"]
#: name -> (arguments, the files it writes besides OUTPUT's stem + .csv)
COMMANDS = {
    "gradnorm": (["gradnorm", "a.pt", "b.pt", "--chunk-size", "2", "--per-sample"], [".samples"]),
    "stability": (["stability", "a.pt", "--chunk-size", "2", "--losses", "clean,pgd_at", *GRID], []),
    "gradcos": (["gradcos", "a.pt", "b.pt", "--chunk-size", "2"], []),
    "curvature": (["curvature", "a.pt", "--batch-size", "2", "--iterations", "5", "--per-sample"], [".samples"]),
    "flatness": (["flatness", "a.pt", "--batch-size", "2", *GRID, "--curve"], [".curve"]),
    "plane": (["flatness", "a.pt", "--batch-size", "2", "--plane", "--x=-0.1:0.1:3", "--y=-0.1:0.1:3"], []),
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


@pytest.mark.slow  # one torchrun launch per case, ~6 s each
@pytest.mark.parametrize("nproc", [2, 3])
@pytest.mark.parametrize("name", list(COMMANDS))
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


@pytest.mark.slow  # 6 runs and 2 merges, ~25 s
@pytest.mark.parametrize("name", ["gradnorm", "curvature"])
def test_shard_parts_merge_to_the_single_process_csvs(single, monkeypatch, name):
    """--shard I/3 parts (given to merge out of order) join into the single-process CSVs byte
    for byte, their meta records equal but for merged_from; a missing part is a one-line error."""
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


@pytest.mark.parametrize("name", ["stability", "gradcos", "flatness"])
def test_shard_is_not_an_option_of_the_reducing_probes(single, monkeypatch, name):
    """Their parts are not tables (yet): --shard is not offered, a one-line usage error."""
    monkeypatch.chdir(single)
    line = cli_error(*_args(name, "never.csv"), "--shard", "0/2")
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


def test_complexity_refuses_torchrun(single, monkeypatch):
    monkeypatch.chdir(single)
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = cli_error("complexity", "a.pt", "--device", "cpu", "--quiet", "-o", "never.csv")
    assert "complexity does not run under torchrun" in line, line
    assert not Path("never.csv").exists()
