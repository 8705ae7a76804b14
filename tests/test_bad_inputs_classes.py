"""Issue 16's classes of bad input, each at its one place: labels a model has no class for
(atprobe.study), seeds outside [0, 2**63) (atprobe.errors.check_seed, cli.common.SEED),
count options at their extremes (cli.common.count), damaged run directories on --resume
(atprobe.train.saved_config), native checkpoints with fields of the wrong type and files that
would run code to unpickle (atprobe.checkpoint). Every case: one ``Error:`` line, exit 2, no
traceback, nothing written."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from atprobe.checkpoint import load_checkpoint
from atprobe.errors import SEED_MAX, AtprobeError, check_seed
from atprobe.models import build_model
from atprobe.threat import ThreatModel
from atprobe.train import TrainConfig, train
from tests.conftest import cli_error, cli_rejects, save_seeded_checkpoint, write_npz

BIG = str(10**30)


class NotWeights:
    """A class outside torch's weights-only allow-list: unpickling it means importing it."""

    def __init__(self) -> None:
        self.value = 1


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- labels and classes


@pytest.fixture(scope="module")
def five_class(tmp_path_factory) -> Path:
    """A 5-class cnn-small that claims the 10-class synthetic dataset."""
    return save_seeded_checkpoint(tmp_path_factory.mktemp("c5") / "c5.pt", classes=5, epoch=1)


@pytest.mark.parametrize("command,args", [
    ("eval", ["--attack", "natural"]),
    ("gradnorm", ["--n", "200", "--steps", "1"]),
    ("stability", ["--n", "200", "--steps", "1"]),
    ("curvature", ["--n", "200"]),
    ("hessian", ["--n", "200"]),
    ("flatness", ["--n", "200"]),
    ("complexity", ["--n", "200"]),
])
def test_labels_beyond_the_models_classes(tmp_path, five_class, command, args):
    """Old code: IndexError 'Target 8 is out of bounds' from inside cross_entropy."""
    line = cli_error(command, five_class, *args, "--device", "cpu", "-o", tmp_path / "out" / "x.csv")
    assert "c5.pt: the model has 5 classes" in line and "need 10 (labels up to 9)" in line, line
    assert "--dataset" in line, line
    assert not (tmp_path / "out").exists()


def test_dataset_override_with_more_classes(tmp_path, cnn_ckpt):
    """An npz of 20 classes for a 10-class model: both numbers named, nothing written."""
    npz = write_npz(tmp_path / "d" / "twenty.npz", classes=20)
    for split in ("test", "train"):
        out = tmp_path / split / "x.csv"
        cli_rejects("the model has 10 classes", "eval", cnn_ckpt, "--dataset", "npz", "--data-dir", npz,
                    "--split", split, "--labels", "true", "--attack", "natural", "--device", "cpu", output=out)
        line = cli_error("eval", cnn_ckpt, "--dataset", "npz", "--data-dir", npz, "--split", split,
                         "--attack", "natural", "--device", "cpu", "-o", out)
        assert "need 20 (labels up to 19)" in line, line


def test_stored_training_labels_beyond_the_classes(tmp_path):
    """A checkpoint whose recorded training labels reach class 12 of a 10-class model."""
    labels = torch.zeros(4000, dtype=torch.int64)
    labels[3] = 12
    ckpt = save_seeded_checkpoint(tmp_path / "c" / "bad_labels.pt", labels=labels, epoch=1)
    line = cli_error("gradnorm", ckpt, "--n", "8", "--steps", "1", "--device", "cpu", "-o", tmp_path / "o" / "x.csv")
    assert "has 10 classes, but the trained labels" in line and "need 13" in line, line
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("value", ["-1", str(2**63), BIG])
@pytest.mark.parametrize("command,option", [
    (["eval", "A", "--attack", "natural"], "--seed"),
    (["gradnorm", "A"], "--seed"),
    (["train", "--out", "RUN"], "--seed"),
    (["train", "--out", "RUN"], "--label-seed"),
    (["train", "--out", "RUN"], "--val-seed"),
    (["train", "--out", "RUN"], "--synthetic-seed"),
])
def test_seeds_outside_0_to_2_63(tmp_path, cnn_ckpt, command, option, value):
    """Old code: -1 and 2**63 ran (and -1 gave 2**64 - 1's starts); 10**30 was a ValueError traceback."""
    args = [str(cnn_ckpt) if a == "A" else str(tmp_path / "run") if a == "RUN" else a for a in command]
    if command[0] != "train":
        args += ["-o", str(tmp_path / "run" / "x.csv")]
    line = cli_error(*args, option, value, "--device", "cpu")
    assert f"'{option}'" in line and f"0<=x<={SEED_MAX}" in line, line
    assert not (tmp_path / "run").exists()


def test_seed_range_in_the_library():
    from atprobe.attacks import parse_attack
    from atprobe.evaluate import EvalConfig
    from atprobe.probes.gradnorm import GradNormConfig
    from atprobe.runtime import make_generator, set_determinism
    from atprobe.starts import sample_keys

    assert check_seed(SEED_MAX) == SEED_MAX and check_seed(0) == 0
    sample_keys(SEED_MAX, torch.arange(3))  # the largest seed is one every generator takes
    make_generator(SEED_MAX)
    for bad in (-1, 2**63, 10**30, 1.5, True):
        for call in (lambda: check_seed(bad), lambda: sample_keys(bad, torch.arange(3)),
                     lambda: make_generator(bad), lambda: set_determinism(bad),
                     lambda: EvalConfig(attacks=(parse_attack("natural"),), seed=bad),
                     lambda: GradNormConfig(seed=bad), lambda: TrainConfig(seed=bad).resolved(),
                     lambda: TrainConfig(label_seed=bad).resolved()):
            with pytest.raises(AtprobeError, match=r"seed must be"):
                call()


# ---------------------------------------------------------------------------- integer options at extremes


@pytest.mark.parametrize("command,option", [
    (["eval", "A", "--attack", "natural"], "--n"),
    (["eval", "A", "--attack", "natural"], "--batch-size"),
    (["eval", "A", "--attack", "pgd"], "--steps"),
    (["eval", "A", "--attack", "pgd1"], "--restarts"),
    (["gradnorm", "A"], "--chunk-size"),
    (["stability", "A"], "--directions"),
    (["flatness", "A"], "--directions"),
    (["curvature", "A"], "--iterations"),
    (["hessian", "A"], "--top-k"),
    (["hessian", "A"], "--iterations"),
    (["hessian", "A"], "--trace-samples"),
    (["hessian", "A"], "--density-steps"),
    (["hessian", "A"], "--density-runs"),
    (["complexity", "A"], "--n"),
    (["eval", "A", "--arch", "cnn-small"], "--num-classes"),
    *[(["train", "--out", "RUN"], option) for option in (
        "--epochs", "--batch-size", "--train-n", "--eval-n", "--train-eval-n", "--val-size", "--eval-every",
        "--save-every", "--log-grad-ratio", "--mix-epochs", "--te-start", "--te-end", "--steps")],
])
def test_huge_counts_are_usage_errors(tmp_path, cnn_ckpt, command, option):
    """Old code: 10**30 ran forever (--steps, --restarts, --directions, --top-k, ...), or raised
    an overflow from inside torch, or was taken (--batch-size)."""
    args = [str(cnn_ckpt) if a == "A" else str(tmp_path / "run") if a == "RUN" else a for a in command]
    if command[0] != "train":
        args += ["-o", str(tmp_path / "run" / "x.csv")]
    line = cli_error(*args, option, BIG, "--device", "cpu")
    assert f"'{option}'" in line and "2147483647" in line, line
    assert not (tmp_path / "run").exists()


def test_hardness_huge_top_k(tmp_path, cnn_ckpt):
    other = save_seeded_checkpoint(tmp_path / "c" / "b.pt", seed=1, epoch=1)
    for option in ("--top-k", "--gallery-k"):
        line = cli_error("hardness", cnn_ckpt, other, option, BIG, "--device", "cpu", "--out", tmp_path / "h")
        assert f"'{option}'" in line and "2147483647" in line, line
    assert not (tmp_path / "h").exists()


# ---------------------------------------------------------------------------- native checkpoint fields


@pytest.mark.parametrize("key,value,fragment", [
    ("model", [1, 2], "model is a list, not a state_dict"),
    ("model", {1: torch.zeros(1)}, "model has a key 1 (int), not a parameter name"),
    ("model", {"conv.weight": 3}, "model['conv.weight'] is an int, not a tensor"),
    ("arch", 3, "arch is an int, not an architecture name"),
    ("arch_kwargs", [1], "arch_kwargs is a list, not a dict"),
    ("num_classes", "ten", "num_classes is 'ten', not a class count"),
    ("epoch", "x", "epoch is 'x', not a count of epochs"),
    ("epoch", -1, "epoch is -1"),
    ("labels", [1, 2], "labels is a list, not a 1-D integer tensor"),
    ("labels", torch.zeros(3), "labels is a Tensor"),
    ("dataset", 5, "dataset is an int, not a dataset name"),
    ("label_spec", "x", "label_spec is a str, not a dict"),
    ("train_config", [1], "train_config is a list, not a dict"),
    ("extra", 5, "extra is an int, not a dict"),
    ("optimizer", "sgd", "optimizer is a str, not a dict"),
])
def test_native_fields_of_the_wrong_type(tmp_path, cnn_ckpt, key, value, fragment):
    """Old code: TypeError/ValueError from deep inside, or a CSV with the bad field in it."""
    raw = torch.load(cnn_ckpt, weights_only=True)
    raw[key] = value
    bad = tmp_path / "bad.pt"
    torch.save(raw, bad)
    with pytest.raises(AtprobeError, match="damaged atprobe checkpoint") as exc:
        load_checkpoint(bad)
    assert fragment in str(exc.value) and "make_checkpoint" in str(exc.value), exc.value
    cli_rejects(fragment, "eval", bad, "--attack", "natural", "--device", "cpu", output=tmp_path / "o" / "x.csv")


# ---------------------------------------------------------------------------- files that would run code


def _plain_pickle(path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(NotWeights(), f)  # protocol 5: torch's unpickler stops at its first frame


@pytest.mark.parametrize("make,shown", [
    (_plain_pickle, "NotWeights"),
    (lambda p: pickle.dump({"w": torch.zeros(2)}, open(p, "wb")), "torch._utils._rebuild_tensor_v2"),
    (lambda p: torch.save(build_model("cnn-small"), p), "atprobe.models.small.SmallCNN"),
    (lambda p: torch.save({"model": NotWeights()}, p), "NotWeights"),
    (lambda p: torch.save(NotWeights(), p, _use_new_zipfile_serialization=False), "NotWeights"),
], ids=["plain-pickle", "plain-pickle-of-tensors", "nn-module", "zip-custom-class", "legacy-custom-class"])
def test_files_that_would_run_code_are_refused(tmp_path, make, shown):
    """Old code: a plain pickle was 'not a readable PyTorch checkpoint (Unsupported operand 149)'
    and no message said how to re-save the weights."""
    path = tmp_path / "code.pt"
    make(path)
    line = cli_error("eval", path, "--arch", "cnn-small", "--dataset", "synthetic", "--attack", "natural",
                     "--device", "cpu", "-o", tmp_path / "o" / "x.csv")
    assert f"refused to load {path}: unpickling it would run code (" in line, line
    assert shown in line and f"torch.save(model.state_dict(), '{path}')" in line, line
    assert not (tmp_path / "o").exists()


def test_text_that_parses_as_opcodes_is_not_called_code(tmp_path):
    """'c' is pickle's GLOBAL opcode: a text file is corrupt, not code (old code said 'arbitrary code')."""
    path = tmp_path / "notes.pt"
    path.write_text("config\nthing\n")
    with pytest.raises(AtprobeError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------- damaged run directories


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory) -> tuple[Path, Path]:
    """A run of 2 epochs stopped after the first (resumable), and a finished run of another seed."""
    root = tmp_path_factory.mktemp("runs")
    fast = dict(arch="cnn-small", dataset="synthetic", train_n=64, batch_size=64, eval_n=16, train_eval_n=16,
                threat=ThreatModel(steps=1), eval_attack="pgd1", schedule="constant")

    class Stop(Exception):
        pass

    def stop(epoch, epochs, metrics):
        raise Stop

    with pytest.raises(Stop):
        train(TrainConfig(epochs=2, **fast), root / "cut", device="cpu", progress=stop)
    train(TrainConfig(epochs=2, seed=5, **fast), root / "other", device="cpu")
    return root / "cut", root / "other"


def _damage_config_truncated(run, other):
    text = (run / "config.json").read_text()
    (run / "config.json").write_text(text[: len(text) // 2])


def _damage_curves_truncated(run, other):
    data = (run / "curves.csv").read_bytes()
    (run / "curves.csv").write_bytes(data[: len(data) - 3])


def _damage_curves_rows(run, other):
    lines = (run / "curves.csv").read_text().splitlines(keepends=True)
    (run / "curves.csv").write_text(lines[0])


@pytest.mark.parametrize("damage,fragments", [
    (lambda r, o: (r / "config.json").write_text("not json{"), ["config.json is damaged (not JSON", "restore it"]),
    (_damage_config_truncated, ["config.json is damaged (not JSON"]),
    (lambda r, o: (r / "config.json").write_text("[1, 2]"), ["config.json is damaged (it holds a list"]),
    (lambda r, o: (r / "config.json").write_text('{"epochs": "many"}'), ["config.json is damaged ("]),
    (lambda r, o: (r / "config.json").write_text('{"threat": {"bogus": 1}}'), ["config.json is damaged ("]),
    (lambda r, o: (r / "curves.csv").write_text(""), ["curves.csv is damaged (empty)"]),
    (_damage_curves_truncated, ["curves.csv is damaged (truncated"]),
    (_damage_curves_rows, ["curves.csv is damaged (no rows of epoch 1"]),
    (lambda r, o: (r / "curves.csv").write_text("a,b\n1,2\n"), ["curves.csv is damaged (columns ['a', 'b']"]),
    (lambda r, o: shutil.copy(o / "last.pt", r / "last.pt"),
     ["last.pt is from another run", "seed 5 in last.pt, 0 in config.json", "put this run's last.pt back"]),
    (lambda r, o: shutil.copy(o / "final.pt", r / "last.pt"), ["last.pt is from another run"]),
    (lambda r, o: (r / "last.pt").write_bytes((r / "last.pt").read_bytes()[:1000]),
     ["last.pt is not a readable PyTorch checkpoint", "put this run's last.pt back"]),
], ids=["config-garbage", "config-truncated", "config-list", "config-bad-value", "config-bad-threat",
        "curves-empty", "curves-truncated", "curves-no-rows", "curves-columns", "last-other-run",
        "last-other-final", "last-truncated"])
def test_damaged_run_directory_on_resume(tmp_path, cut_run, damage, fragments):
    """Old code: JSONDecodeError, TypeError, pandas EmptyDataError, KeyError 'epoch'
    tracebacks; a truncated curves.csv or another run's last.pt were resumed from silently."""
    cut, other = cut_run
    run = tmp_path / "run"
    shutil.copytree(cut, run)
    damage(run, other)
    before = _listing(run)
    line = cli_error("train", "--resume", run, "--device", "cpu", "-q")
    assert line.startswith(f"Error: cannot resume {run}: "), line
    for fragment in fragments:
        assert fragment in line, line
    assert _listing(run) == before  # nothing written, nothing removed
    assert sorted(os.listdir(run)) == sorted(before)


def test_final_pt_as_last_pt_of_the_same_run(tmp_path, cut_run):
    """A checkpoint of this run without its resume state (an epoch_K.pt or best.pt copied over last.pt)."""
    cut, _ = cut_run
    run = tmp_path / "run"
    shutil.copytree(cut, run)
    shutil.copy(run / "best.pt", run / "last.pt")
    line = cli_error("train", "--resume", run, "--device", "cpu", "-q")
    assert "last.pt is damaged (no optimizer, rng" in line, line


def test_undamaged_run_still_resumes(tmp_path, cut_run):
    cut, _ = cut_run
    run = tmp_path / "run"
    shutil.copytree(cut, run)
    train(TrainConfig(), run, device="cpu", resume=True)
    assert load_checkpoint(run / "final.pt").epoch == 2
