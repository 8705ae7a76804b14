"""Shared fixtures: the real-data location and small deterministic models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from atprobe.checkpoint import make_checkpoint, save_checkpoint
from atprobe.models import build_model

# One torch thread for every test, whatever OMP_NUM_THREADS says (CI sets none): these small
# workloads are no faster on two, and on the shared 2-core CI machine two threads contending
# with another job ran them 3-10x slower (test_train: 120 s on two threads, 31 s on one).
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CIFAR10_SUBSET = SHARED_DATA / "cifar-10-subset"

needs_cifar = pytest.mark.skipif(
    not (CIFAR10_SUBSET / "cifar-10-batches-py").is_dir(),
    reason="../shared/data/cifar-10-subset is not present",
)


@pytest.fixture
def cifar_dir() -> Path:
    if not (CIFAR10_SUBSET / "cifar-10-batches-py").is_dir():
        pytest.skip("../shared/data/cifar-10-subset is not present")
    return CIFAR10_SUBSET


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm state (running statistics and affine parameters), so that eval
    mode and each model's own buffers matter in exact comparisons."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g, dtype=torch.float64))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g, dtype=torch.float64))
                m.weight.copy_(0.5 + torch.rand(c, generator=g, dtype=torch.float64))
                m.bias.copy_(0.1 * torch.randn(c, generator=g, dtype=torch.float64))
    return model


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    """float64 cnn-small in eval mode with non-trivial BatchNorm state."""
    torch.manual_seed(0)
    return randomize_bn(build_model("cnn-small").double()).eval()


@pytest.fixture(scope="module")
def mlp() -> nn.Module:
    """float64 mlp in eval mode."""
    torch.manual_seed(1)
    return build_model("mlp").double().eval()


def tiny_net(dtype=torch.float64, seed: int = 0, in_dim: int = 3 * 8 * 8, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, 16), nn.Tanh(), nn.Linear(16, classes))
    return net.to(dtype)


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(12, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (12,), generator=g)
    return x, y


ARCH_KWARGS = {"num_classes": 10, "dropout": 0.0, "mean": None, "std": None}


def save_seeded_checkpoint(path: Path, seed: int = 0, *, arch: str = "cnn-small", classes: int = 10,
                           dataset: str = "synthetic", random_bn: bool = False, **fields) -> Path:
    """``build_model(arch)`` after ``torch.manual_seed(seed)`` (with ``randomize_bn(model, seed)``
    when ``random_bn``), saved to ``path`` (its folder made) as a checkpoint of ``dataset`` with
    ``ARCH_KWARGS`` but ``classes`` classes; ``fields`` go to ``make_checkpoint``. Returns ``path``."""
    torch.manual_seed(seed)
    kwargs = {**ARCH_KWARGS, "num_classes": classes}
    model = build_model(arch, **kwargs)
    if random_bn:
        randomize_bn(model, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(make_checkpoint(model, arch=arch, arch_kwargs=kwargs, dataset=dataset, **fields), path)
    return path


@pytest.fixture(scope="session")
def cnn_ckpt(tmp_path_factory) -> Path:
    """``save_seeded_checkpoint`` of cnn-small (seed 0) at epoch 4, once per session."""
    return save_seeded_checkpoint(tmp_path_factory.mktemp("cnn_ckpt") / "a.pt", epoch=4)


def run_cli(*args, expect: int = 0):
    """``atprobe ARGS...`` in-process through the click group, with ``sys.argv`` set as a shell
    would set it (the ``.meta.json`` files record it); returns click's ``Result``.

    Asserts the exit status is ``expect``. A failure must be the user-facing kind: a clean exit
    (no uncaught exception), nothing on stdout, no traceback, and exactly one ``Error:`` line,
    the last one on stderr (click's usage errors print their usage lines above it)."""
    from click.testing import CliRunner

    from atprobe.cli.main import cli

    argv = [str(a) for a in args]
    saved = sys.argv
    sys.argv = ["atprobe", *argv]
    try:
        result = CliRunner().invoke(cli, argv, prog_name="atprobe")
    finally:
        sys.argv = saved
    assert result.exit_code == expect, (argv, result.output, result.exception)
    if expect != 0:
        assert isinstance(result.exception, SystemExit), (argv, result.exception)
        assert result.stdout == "" and "Traceback" not in result.output, (argv, result.output)
        lines = result.stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("Error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], (argv, result.stderr)
    return result


def cli_error(*args) -> str:
    """The one ``Error:`` line of ``atprobe ARGS...``, which must exit with status 2."""
    return run_cli(*args, expect=2).stderr.strip().splitlines()[-1]


def cli_rejects(fragment: str, *args, output: Path) -> None:
    """``atprobe ARGS... -o OUTPUT`` is a user error (``cli_error``) whose ``Error:`` line names
    ``fragment``, and writes nothing: not even OUTPUT's folder (absent beforehand) is made."""
    assert not output.parent.exists(), output
    line = cli_error(*args, "-o", output)
    assert fragment in line, line
    assert not output.parent.exists(), output  # nothing written, not even a temp file


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``atprobe demo --budget quick`` run once per session, in-process through the click group
    (tests/test_demo.py and tests/test_notebook.py read its outputs): ``(out, result)``."""
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, run_cli("demo", "--out", out, "--budget", "quick", "--device", "cpu")


def keyed_start(x, config, seed, ids, restart=0):
    """The library's keyed random start of ``ids`` (``atprobe.starts``) for an explicit
    ``delta_init``: reference loops reuse the start rule, never the batching."""
    from atprobe.attacks import random_start
    from atprobe.starts import Starts

    return random_start(x, config, Starts(seed, torch.as_tensor(list(ids), dtype=torch.int64)), restart)


def write_npz(path: Path, n_train: int = 64, n_test: int = 1200, classes: int = 10, seed: int = 0) -> Path:
    """A small random ``.npz`` dataset (uint8 NHWC 32x32 images; ``x, y, x_test, y_test``) at
    ``path``: loads in milliseconds, and its test split can be larger than any default subset."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = {"x": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8), "y": rng.integers(0, classes, n_train),
              "x_test": rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
              "y_test": rng.integers(0, classes, n_test)}
    arrays["y"][:classes] = np.arange(classes)  # every class present, so the class count is `classes`
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def stopped_then_resumed(config, run_dir: Path, stop_after: int) -> Path:
    """``atprobe.train.train(config, run_dir)`` interrupted after epoch ``stop_after`` (an
    exception out of the progress callback, as a crash would), then resumed to the end."""
    from atprobe.checkpoint import load_checkpoint
    from atprobe.train import train

    class Stop(Exception):
        pass

    def stop(epoch, epochs, metrics):
        if epoch == stop_after:
            raise Stop

    with pytest.raises(Stop):
        train(config, run_dir, device="cpu", progress=stop)
    assert load_checkpoint(run_dir / "last.pt").epoch == stop_after
    return train(config, run_dir, device="cpu", resume=True)
