"""Training with extra generated data (``--extra-data``): the mapped and the resident path train
the same weights, the steps see the mixed batches, resume is bit-identical, and bad files or
options are one-line errors before anything is written."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from atprobe.checkpoint import load_checkpoint
from atprobe.data.batches import extra_positions, extra_rows
from atprobe.threat import ThreatModel
from atprobe.train import StepCallback, TrainConfig, Trainer, train
from tests.conftest import cli_error

FAST = dict(arch="mlp", dataset="synthetic", method="pgd_at", train_n=128, batch_size=32, eval_n=32, train_eval_n=32,
            threat=ThreatModel(steps=2), eval_attack="pgd2", lr=0.05, schedule="constant")


@pytest.fixture
def extra_file(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(1500, 32, 32, 3), dtype=np.uint8)  # 4.6 MB
    labels = rng.integers(0, 10, size=1500)
    np.savez(tmp_path / "extra.npz", image=images, label=labels)
    return tmp_path / "extra.npz", images, labels


def _weights(run):
    return load_checkpoint(run / "final.pt").state_dict


def test_mapped_and_resident_extra_data_train_the_same_weights(tmp_path, extra_file):
    path = str(extra_file[0])
    mapped = train(TrainConfig(epochs=2, extra_data=path, extra_budget_mb=1, **FAST), tmp_path / "m", device="cpu")
    resident = train(TrainConfig(epochs=2, extra_data=path, extra_budget_mb=100, **FAST), tmp_path / "r",
                     device="cpu")
    assert json.loads((mapped / "curves.meta.json").read_text())["extra_path"] == "mapped"
    assert json.loads((resident / "curves.meta.json").read_text())["extra_path"] == "resident"
    plain = train(TrainConfig(epochs=2, **FAST), tmp_path / "p", device="cpu")
    for key, value in _weights(mapped).items():
        assert torch.equal(value, _weights(resident)[key]), key
    assert not all(torch.equal(v, _weights(plain)[k]) for k, v in _weights(mapped).items())


def test_each_step_trains_on_the_mixed_batch(tmp_path, extra_file):
    path, images, labels = extra_file
    config = TrainConfig(epochs=1, extra_data=str(path), extra_fraction=0.75, augment=False, **FAST)
    seen = []

    class Record(StepCallback):
        def after_loss(self, iteration, epoch, x, y, step):
            seen.append((x.clone(), y.clone()))

    from atprobe.distributed import DistContext

    trainer = Trainer(config, tmp_path / "run", DistContext(), torch.device("cpu"))
    trainer.callbacks.append(Record())
    trainer.start_run_dir()
    trainer.epoch()
    assert len(seen) == trainer.iters_per_epoch == 4  # ceil(128 / 32) batches: an epoch of the original size
    for g, (x, y) in enumerate(seen):
        assert x.shape[0] == 32
        rows = extra_rows(config.seed, g, 24, len(images))  # floor(32 * 0.75) extra images, 3 of every 4 rows
        at = extra_positions(32, 24)
        assert at.tolist() == [False, True, True, True] * 8
        expected = torch.from_numpy(images[rows].transpose(0, 3, 1, 2).astype(np.float32)) / 255
        assert torch.equal(x[at], expected)
        assert torch.equal(y[at], torch.from_numpy(labels[rows]))


@pytest.mark.slow
def test_resume_with_extra_data_gives_the_same_weights(tmp_path, extra_file):
    cfg = TrainConfig(epochs=3, extra_data=str(extra_file[0]), extra_budget_mb=1, **FAST)
    full = _weights(train(cfg, tmp_path / "full", device="cpu"))
    with pytest.raises(InterruptedError):  # as a Ctrl-C after the first epoch's files are written
        train(cfg, tmp_path / "cut", device="cpu", progress=_interrupt_after(1))
    assert load_checkpoint(tmp_path / "cut" / "last.pt").epoch == 1
    resumed = _weights(train(cfg, tmp_path / "cut", device="cpu", resume=True))
    assert all(torch.equal(value, resumed[key]) for key, value in full.items())


def test_a_run_written_before_the_extra_options_resumes(tmp_path):
    cfg = TrainConfig(epochs=2, **FAST)
    with pytest.raises(InterruptedError):
        train(cfg, tmp_path / "old", device="cpu", progress=_interrupt_after(1))
    last = torch.load(tmp_path / "old" / "last.pt", weights_only=True)
    for name in ("extra_data", "extra_fraction", "extra_budget_mb"):  # as a last.pt of an older atprobe
        del last["train_config"][name]
    torch.save(last, tmp_path / "old" / "last.pt")
    assert load_checkpoint(train(cfg, tmp_path / "old", device="cpu", resume=True) / "final.pt").epoch == 2


def _interrupt_after(stop_epoch):
    def progress(epoch, epochs, metrics):
        if epoch == stop_epoch:
            raise InterruptedError
    return progress


def _bad_file(tmp_path, kind):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, size=(20, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, size=20)
    path = tmp_path / f"{kind}.npz"
    if kind == "shape":
        images = images[:, :, :28]
    if kind == "labels":
        labels[:2] = [0, 12]
    save = np.savez_compressed if kind == "compressed" else np.savez
    save(path, image=images, label=labels)
    return path


@pytest.mark.parametrize("kind,args,pattern", [
    ("ok", ["--extra-fraction", "1.0"], r"extra fraction must be in [0, 1), got 1.0"),
    ("ok", ["--extra-fraction", "-0.2"], r"extra fraction must be in [0, 1), got -0.2"),
    (None, ["--extra-fraction", "0.5"], "--extra-fraction needs --extra-data FILE"),
    ("ok", ["--te"], "does not work with --extra-data"),
    ("ok", ["--extra-budget-mb", "-1"], "extra-budget-mb must be a finite number >= 0, got -1"),
    (None, ["--extra-budget-mb", "10"], "--extra-budget-mb needs --extra-data FILE"),
    ("shape", [], "extra images have shape (H, W, C) = (32, 28, 3), the training images (32, 32, 3)"),
    ("labels", [], "extra labels must be in 0..9, got 0..12"),
    ("compressed", [], "member image.npy is compressed"),
])
def test_bad_extra_data_is_a_one_line_error(tmp_path, kind, args, pattern):
    data = [] if kind is None else ["--extra-data", str(_bad_file(tmp_path, kind))]
    line = cli_error("train", "--out", tmp_path / "run", "--device", "cpu", "--arch", "mlp", "--epochs", "1",
                     *data, *args)
    assert pattern in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # two training runs in subprocesses
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_with_extra_data_match_one_process(tmp_path, extra_file):
    from tests.test_ddp import ARGS, TOLERANCE, _free_port, _run

    extra = ["--method", "pgd_at", "--extra-data", str(extra_file[0]), "--extra-budget-mb", "1"]
    single = _run([sys.executable, "-m", "atprobe.cli.main", "train", "--out", str(tmp_path / "one"), *ARGS, *extra])
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), "-m", "atprobe.cli.main", "train", "--out", str(tmp_path / "two"),
                *ARGS, *extra])
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for key, value in a.items():  # batch 51 = 26 + 25 rows, 35 of them extra, spread over both shares
        torch.testing.assert_close(b[key], value, rtol=0, atol=TOLERANCE["pgd_at+te"]["weights"])
