"""Probes under torchrun (2 and 3 gloo processes on the CPU) write the single-process CSVs
byte for byte; a killed rank ends the run; commands that do not split refuse torchrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import cli_error, run_cli, save_seeded_checkpoint

from atprobe.distributed import SampleShare, batch_share, interleave_blocks
from atprobe.errors import AtprobeError

# 7 samples in batches of 2 = 4 batches: 2 ranks get 2 + 2 batches (4 + 3 samples), 3 ranks
# 2 + 1 + 1 (4 + 2 + 1): uneven shares, the last one a partial batch.
SAMPLES = ["--split", "train", "--n", "7", "--batch-size", "2", "--steps", "2", "--device", "cpu", "--quiet"]
EVAL = ["eval", "a.pt", "b.pt", "--attack", "natural,pgd2", "--per-sample", *SAMPLES]
HARDNESS = ["hardness", "a.pt", "b.pt", "--top-k", "3", "--gallery-k", "2", *SAMPLES]
#: Meta fields that differ between runs of one computation.
VOLATILE = ("command", "created", "world_size")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args, cwd: Path, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node NPROC -m atprobe.cli.main -- ARGS`` exactly as docs/scaling.md writes it."""
    return subprocess.run(_torchrun_argv(nproc, args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=_env(), **popen)


def _torchrun_argv(nproc: int, args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(_free_port()), "-m", "atprobe.cli.main", "--", *map(str, args)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _meta(path: Path) -> dict:
    record = json.loads(path.read_text())
    return {k: v for k, v in record.items() if k not in VOLATILE}


def single_outputs(root: Path, *more: list) -> Path:
    """Two cnn-small checkpoints in ``root``, the single-process eval (``one.csv``) and hardness
    (``one/``) outputs beside them, then each of the ``more`` commands, all run in ``root``."""
    save_seeded_checkpoint(root / "a.pt", seed=0)
    save_seeded_checkpoint(root / "b.pt", seed=1)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for args in ([*EVAL, "-o", "one.csv"], [*HARDNESS, "--out", "one"], *more):
            run_cli(*args)
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    return single_outputs(tmp_path_factory.mktemp("scaling"))


def test_batch_share_is_a_partition_of_whole_batches():
    for n in range(0, 30):
        for batch in (1, 2, 3, 7):
            for count in (1, 2, 3, 5):
                shares = [batch_share(n, batch, i, count) for i in range(count)]
                assert [r for s in shares for r in range(n)[s]] == list(range(n))
                assert all(s.start % batch == 0 for s in shares if s.stop > s.start)  # at a batch boundary
                sizes = [-(-(s.stop - s.start) // batch) for s in shares]
                assert max(sizes) - min(sizes) <= 1


def test_interleave_blocks_equals_a_plain_loop():
    # 3 shares of sizes 2, 0, 3, each with blocks for attacks x and y: block j of every share, in order.
    frames = [pd.DataFrame({"block": list("xxyy"), "row": [0, 1, 0, 1]}), None,
              pd.DataFrame({"block": list("xxxyyy"), "row": [2, 3, 4, 2, 3, 4]})]
    joined = interleave_blocks(frames, [2, 0, 3])
    expected = [(b, r) for b in "xy" for r in range(5)]
    assert list(zip(joined.block, joined.row)) == expected
    with pytest.raises(AtprobeError, match="same blocks"):
        interleave_blocks([frames[0], frames[2].iloc[:5]], [2, 3])


def test_shard_option_is_checked():
    assert SampleShare.parse("2/3").rows(7, 2) == slice(6, 7)
    for bad in ("3/3", "1", "a/b", "1/0", "-1/2"):
        with pytest.raises(AtprobeError, match="--shard"):
            SampleShare.parse(bad)


@pytest.mark.slow  # two torchrun launches per case, ~25 s
@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_writes_the_single_process_csvs(single, tmp_path, nproc):
    out = single / f"eval{nproc}.csv"
    done = torchrun(nproc, [*EVAL, "-o", out.name], single)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("", ".samples"):
        assert (single / f"eval{nproc}{name}.csv").read_bytes() == (single / f"one{name}.csv").read_bytes()
        got, want = (json.loads((single / f"{s}{name}.meta.json").read_text()) for s in (f"eval{nproc}", "one"))
        assert got["world_size"] == nproc and want["world_size"] == 1
        assert {k: v for k, v in got.items() if k not in VOLATILE} == {k: v for k, v in want.items()
                                                                        if k not in VOLATILE}
    done = torchrun(nproc, [*HARDNESS, "--out", f"hard{nproc}"], single)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("per_sample.csv", "consistency.csv", "hardest.png", "sorted.png"):
        assert (single / f"hard{nproc}" / name).read_bytes() == (single / "one" / name).read_bytes(), name
    assert _meta(single / f"hard{nproc}" / "per_sample.meta.json") == _meta(single / "one" / "per_sample.meta.json")
    assert done.stderr.count("Error") == 0 and "%|" not in done.stderr  # progress on rank 0 only, and -q


@pytest.mark.slow
def test_a_killed_rank_ends_the_run(single):
    """SIGKILL rank 1 as soon as it exists: rank 0 would wait in a collective forever; the
    launcher must end the job with a failure instead (bounded by the timeout)."""
    args = ["eval", "a.pt", "--attack", "pgd50", "--split", "train", "--n", "64", "--batch-size", "8",
            "--device", "cpu", "--quiet", "-o", "killed.csv"]
    proc = subprocess.Popen(_torchrun_argv(2, args), cwd=single, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(), start_new_session=True)
    try:
        workers = _wait_for_children(proc.pid, 2, timeout=60)
        os.kill(workers[-1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert not (single / "killed.csv").exists()
    assert "Signal 9" in stderr or "SIGKILL" in stderr or "failed" in stderr.lower(), stderr[-2000:]


def _wait_for_children(pid: int, count: int, timeout: float) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        path = Path(f"/proc/{pid}/task/{pid}/children")
        children = [int(c) for c in path.read_text().split()] if path.exists() else []
        if len(children) >= count:
            return sorted(children)
        time.sleep(0.05)
    raise AssertionError("the workers did not start")


def test_commands_that_do_not_split_refuse_torchrun(single, monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) a command that would compute everything on every rank
    is a one-line error before any work; --shard is refused there too."""
    monkeypatch.chdir(single)
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = cli_error("demo", "--out", "g", "--budget", "quick")
    assert "demo does not run under torchrun" in line, line
    line = cli_error(*EVAL, "--shard", "0/2", "-o", "s.csv")
    assert "not under torchrun" in line, line
    assert not Path("g").exists() and not Path("s.csv").exists()


def test_torch_distributed_is_available():
    assert torch.distributed.is_available()


def test_without_the_separator_torchrun_takes_atprobe_options(single):
    """Why docs/scaling.md writes ``-m atprobe.cli.main -- COMMAND``: without ``--`` torchrun's
    parser reads ``--n`` as an ambiguous abbreviation of its own options, before atprobe starts."""
    argv = _torchrun_argv(2, [*EVAL, "-o", "never.csv"])
    argv.remove("--")
    done = subprocess.run(argv, cwd=single, capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode != 0 and "ambiguous option: --n" in done.stderr, done.stderr[-2000:]
    assert not (single / "never.csv").exists()
