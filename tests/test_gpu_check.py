"""``benchmarks/gpu_check.sh``: its CPU run (the CI run) prints every check, skips the GPU-only
rows saying why and passes the rest; and the checks it is made of can fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atprobe.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

#: Every row of the table, in order, and whether only a GPU can run it (the issue's list).
CHECKS = [
    ("precision eval natural", False),
    ("precision eval pgd10", False),
    ("precision hardness adv_loss", False),
    ("precision complexity margin", False),
    ("channels_last eval", False),
    ("bf16 in effect eval", True),
    ("channels_last train epoch", False),
    ("bf16 in effect train epoch", True),
    ("channels_last stability chunk", False),
    ("fp32 kept stability chunk", True),
    ("channels_last hessian products", False),
    ("fp32 kept hessian products", True),
    ("no host sync eval", True),
    ("no host sync train epoch", True),
    ("no host sync stability chunk", True),
    ("no host sync hessian products", True),
    ("peak memory stability wrn-28-10", True),
    ("peak memory hessian wrn-28-10", True),
    ("img/s PGD-10 eval resnet18", True),
    ("img/s PGD-AT train resnet18", True),
    ("img/s hardness resnet18", True),
]


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


def table_rows(stdout: str) -> dict[str, list[str]]:
    """``{check: [status, value, threshold, note]}`` of the printed table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        if len(cells) >= 4 and cells[1] in ("pass", "fail", "skip"):
            rows[cells[0]] = (cells + [""])[1:5]
    return rows


@pytest.mark.slow
def test_cpu_run_prints_every_check_skips_gpu_rows_and_passes_the_rest():
    out = run_script("--device", "cpu", "--threads", "1", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = table_rows(out.stdout)
    assert list(rows) == [name for name, _ in CHECKS]
    for name, gpu_only in CHECKS:
        status, value, threshold, note = rows[name]
        assert threshold, name  # every row says what it is judged against
        if gpu_only:
            assert status == "skip" and note.startswith("needs CUDA"), (name, rows[name])
        else:
            assert status == "pass" and value, (name, rows[name])
    skips = sum(gpu_only for _, gpu_only in CHECKS)
    assert f"{len(CHECKS) - skips} pass, 0 fail, {skips} skip" in out.stdout


def test_bad_device_is_one_line_and_status_2():
    out = run_script("--device", "tpu", timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "tpu" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------- the pieces can fail


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return gpu_check


def test_conv_hook_tells_nchw_from_channels_last(gpu_check):
    torch.manual_seed(0)
    model = build_model("cnn-small").eval()
    x = torch.rand(2, 3, 32, 32)
    with gpu_check.conv_calls(model) as calls, torch.no_grad():
        model(x)  # NCHW weights and input
        model.to(memory_format=torch.channels_last)
        model(x)  # NHWC weights, NCHW input
        model(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x.contiguous(memory_format=torch.channels_last))
    assert calls == [(False, torch.float32), (False, torch.float32), (True, torch.float32), (True, torch.bfloat16)]


def test_sync_row_fails_naming_the_frame_and_resets_the_mode(gpu_check, monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(gpu_check, "sync", lambda device: None)
    calls = []

    def synchronizing():  # as torch raises it in "error" mode; the first (warm-up) call is outside the mode
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("called a synchronizing CUDA operation")

    row = gpu_check.no_sync_row("loop", synchronizing, torch.device("cpu"))
    assert (row.check, row.status) == ("no host sync loop", "fail")
    assert row.note.endswith("(synchronizing)") and modes == ["error", "default"]
    assert gpu_check.no_sync_row("loop", lambda: None, torch.device("cpu")).status == "pass"

    def broken():
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):  # not a sync: not hidden as a failed row
        gpu_check.no_sync_row("loop", broken, torch.device("cpu"))
    assert modes[-1] == "default"


def test_exit_status_is_1_only_when_a_row_that_ran_failed(gpu_check):
    row = gpu_check.Row
    assert gpu_check.exit_status([row("a", "pass"), row("b", "skip")]) == 0
    assert gpu_check.exit_status([row("a", "pass"), row("b", "fail"), row("c", "skip")]) == 1
