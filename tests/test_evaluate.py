"""``evaluate`` against independent loops, an undefended model under PGD, and ``atprobe eval``."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atprobe.attacks import parse_attack, pgd
from atprobe.checkpoint import load_checkpoint
from atprobe.data import Split, iterate_batches, load_dataset, symmetric_label_noise
from atprobe.errors import AtprobeError
from atprobe.evaluate import EVAL_COLUMNS, EvalConfig, evaluate
from atprobe.models import build_model
from atprobe.runtime import make_generator
from atprobe.starts import Starts
from atprobe.threat import ThreatModel
from tests.conftest import ARCH_KWARGS, cli_rejects, run_cli, save_seeded_checkpoint

CSV_COLUMNS = ["checkpoint", "split", "attack", "norm", "eps", "alpha", "steps", "restarts", "n", "accuracy",
               "loss"]


@pytest.fixture(autouse=True)
def _restore_global_torch_state():
    """The CLI seeds the global RNG and turns on deterministic algorithms: undo that."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    yield
    if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) != (
        deterministic, warn_only
    ):  # the call costs seconds the first time (it imports torch._dynamo), so only when needed
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    torch.set_rng_state(rng)


# ------------------------------------------------------------------------- library


class _Float64Net(nn.Module):
    """A float64 model behind a cast, so float32 batches from ``iterate_batches`` go in.

    It has BatchNorm so that eval mode (running statistics) is observable.
    """

    def __init__(self, classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, classes)
        ).double()
        with torch.no_grad():  # non-trivial running statistics, so train mode would differ
            self.body[2].running_mean.uniform_(-0.5, 0.5)
            self.body[2].running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.double())


def _split(n: int = 37, classes: int = 5, seed: int = 3) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, classes, (n,), generator=g)
    return Split(x=x, y=y, true_y=y.clone(), index=torch.arange(n))


def _per_sample_metrics(model: nn.Module, images: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Accuracy and mean CE, one float64 forward per sample in a Python loop."""
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(len(y)):
            logits = model(images[i : i + 1].double())
            correct += int(logits.argmax(1).item() == y[i].item())
            loss += F.cross_entropy(logits, y[i : i + 1]).item()
    return correct / len(y), loss / len(y)


def _row(df: pd.DataFrame, attack: str) -> pd.Series:
    rows = df[df["attack"] == attack]
    assert len(rows) == 1, df
    return rows.iloc[0]


def test_natural_matches_a_plain_loop():
    model, split = _Float64Net(), _split()
    model.train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    df = evaluate(model, split, EvalConfig(attacks=(parse_attack("natural"),), batch_size=8))
    # the caller's mode and the BN statistics are back as they were
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k

    assert list(df.columns) == EVAL_COLUMNS and len(df) == 1
    acc, loss = _per_sample_metrics(model, split.x.double() / 255, split.y)
    row = _row(df, "natural")
    assert row["accuracy"] == acc and row["n"] == len(split)
    assert row["loss"] == pytest.approx(loss, rel=1e-6)
    assert (row["norm"], row["eps"], row["alpha"], row["steps"], row["restarts"]) == ("none", 0.0, 0.0, 0, 0)
    # eval mode mattered: train-mode BN (batch statistics) gives another loss
    with torch.no_grad():
        batch_stats = F.cross_entropy(copy.deepcopy(model).train()(split.x.double() / 255), split.y).item()
    assert batch_stats != pytest.approx(loss, rel=1e-3)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("pgd3", {}),
        ("cw3", {}),
        ("pgd2x3", {}),
        ("fgsm", {}),
        ("fgsm_rs", {}),
        ("pgd3", {"norm": "l2", "eps": 0.5}),
    ],
)
def test_attack_rows_match_pgd_called_batch_by_batch(name, kwargs):
    model, split = _Float64Net(), _split()
    spec = parse_attack(name, ThreatModel(**kwargs))
    seed, batch_size = 11, 10
    df = evaluate(model, split, EvalConfig(attacks=(spec,), batch_size=batch_size, seed=seed))

    # A plain per-sample loop: each sample alone, its start keyed by (seed, its index).
    adversarial = []
    for batch in iterate_batches(split, 1):
        adversarial.append(pgd(model, batch.x, batch.y, spec.config, starts=Starts(seed, batch.index)))
    acc, loss = _per_sample_metrics(model, torch.cat(adversarial), split.y)

    row = _row(df, name)
    assert row["accuracy"] == acc
    assert row["loss"] == pytest.approx(loss, rel=1e-6)
    c = spec.config
    assert (row["norm"], row["eps"], row["alpha"], row["steps"], row["restarts"], row["n"]) == (
        c.norm, c.eps, c.alpha, c.steps, c.restarts, len(split)
    )
    # and the attack did something: the mean CE rises above the natural one
    natural = evaluate(model, split, EvalConfig(attacks=(parse_attack("natural"),)))
    assert row["loss"] > natural["loss"].iloc[0]


def test_natural_does_not_depend_on_batch_size():
    model, split = _Float64Net(seed=1), _split(n=41)
    spec = (parse_attack("natural"),)
    rows = [evaluate(model, split, EvalConfig(attacks=spec, batch_size=b)).iloc[0] for b in (1, 7, 41, 256)]
    for row in rows[1:]:
        assert row["accuracy"] == rows[0]["accuracy"]
        assert row["loss"] == pytest.approx(rows[0]["loss"], rel=1e-6)


def test_attack_order_does_not_change_a_row():
    model, split = _Float64Net(seed=2), _split(n=30)
    names = ["natural", "pgd3", "fgsm_rs", "cw2x2"]
    forward = evaluate(model, split, EvalConfig(attacks=tuple(map(parse_attack, names)), batch_size=8, seed=5))
    backward = evaluate(model, split, EvalConfig(attacks=tuple(map(parse_attack, names[::-1])), batch_size=8, seed=5))
    assert list(forward["attack"]) == names and list(backward["attack"]) == names[::-1]
    for name in names:
        alone = evaluate(model, split, EvalConfig(attacks=(parse_attack(name),), batch_size=8, seed=5))
        pd.testing.assert_series_equal(_row(forward, name), _row(backward, name), check_names=False)
        pd.testing.assert_series_equal(_row(forward, name), _row(alone, name), check_names=False)
    # and the seed does reach the random starts
    other = evaluate(model, split, EvalConfig(attacks=(parse_attack("fgsm_rs"),), batch_size=8, seed=6))
    assert other["loss"].iloc[0] != _row(forward, "fgsm_rs")["loss"]


def test_eval_config_rejects_nonsense():
    with pytest.raises(AtprobeError, match="no attack"):
        EvalConfig(attacks=())
    with pytest.raises(AtprobeError, match="batch size"):
        EvalConfig(attacks=(parse_attack("natural"),), batch_size=0)
    empty = _split().subset(slice(0, 0))
    with pytest.raises(AtprobeError, match="empty"):
        evaluate(_Float64Net(), empty, EvalConfig(attacks=(parse_attack("natural"),)))


@pytest.mark.slow
def test_undefended_cnn_loses_its_accuracy_under_pgd(cifar_dir):
    """A standard (non-adversarial) model: clearly better than chance, ~0 under PGD-10 at 8/255."""
    torch.set_num_threads(2)
    data = load_dataset("cifar10", cifar_dir)
    train = data.train.subset(slice(0, 2000))
    torch.manual_seed(0)
    model = build_model("cnn-small", 10)
    epochs, batch_size = 6, 64
    steps = epochs * math.ceil(len(train) / batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    generator = make_generator(0)
    model.train()
    for _ in range(epochs):
        for batch in iterate_batches(train, batch_size, shuffle=True, generator=generator):
            loss = F.cross_entropy(model(batch.x), batch.y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()

    natural = evaluate(model, data.test, EvalConfig(attacks=(parse_attack("natural"),), batch_size=500))
    attacked = evaluate(model, data.test.subset(slice(0, 200)),
                        EvalConfig(attacks=(parse_attack("natural"), parse_attack("pgd10", ThreatModel(eps=8 / 255))),
                                   batch_size=200))
    assert natural["accuracy"].iloc[0] >= 0.35, natural  # chance is 0.10
    assert _row(attacked, "natural")["accuracy"] >= 0.35, attacked
    assert _row(attacked, "pgd10")["accuracy"] <= 0.05, attacked
    assert _row(attacked, "pgd10")["loss"] > 2 * _row(attacked, "natural")["loss"]


# ------------------------------------------------------------------------- CLI

SYNTHETIC_TRAIN = 4000


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    synthetic = load_dataset("synthetic")
    assert len(synthetic.train) == SYNTHETIC_TRAIN
    noisy = symmetric_label_noise(synthetic.train.true_y, 1.0, 10, seed=0)
    return {
        "a": save_seeded_checkpoint(root / "a.pt", seed=0),
        "b": save_seeded_checkpoint(root / "b.pt", seed=1),
        "noisy": save_seeded_checkpoint(root / "noisy.pt", seed=2, labels=noisy,
                       label_spec={"label_noise": 1.0, "label_seed": 0}),
        "noisy_val": save_seeded_checkpoint(root / "noisy_val.pt", seed=2, labels=noisy,
                           label_spec={"label_noise": 1.0, "label_seed": 0},
                           train_config={"val_size": 500, "val_seed": 4}),
        "labels": noisy,
        "data": synthetic,
    }


def _read_csv(path) -> pd.DataFrame:
    return pd.read_csv(path)


def test_eval_writes_csv_and_meta(ckpts, tmp_path):
    out = tmp_path / "out.csv"
    args = ["eval", ckpts["a"], "--attack", "natural,pgd2", "--n", "64", "-o", out, "--device", "cpu"]
    run_cli(*args)
    df = _read_csv(out)
    assert list(df.columns) == CSV_COLUMNS
    assert list(df["attack"]) == ["natural", "pgd2"]
    assert set(df["checkpoint"]) == {str(ckpts["a"])} and set(df["split"]) == {"test"}
    assert list(df["n"]) == [64, 64] and list(df["norm"]) == ["none", "linf"]
    assert list(df["steps"]) == [0, 2] and list(df["restarts"]) == [0, 1]
    assert df["eps"].iloc[1] == pytest.approx(8 / 255, rel=1e-15)  # the defaults
    assert df["alpha"].iloc[1] == pytest.approx(2 / 255, rel=1e-15)

    # the numbers are the library's on the same samples
    model = load_checkpoint(ckpts["a"]).build_model()
    config = EvalConfig(attacks=(parse_attack("natural"), parse_attack("pgd2")), seed=0)
    expected = evaluate(model, ckpts["data"].test.subset(slice(0, 64)), config)
    assert list(df["accuracy"]) == list(expected["accuracy"])
    assert df["loss"].tolist() == pytest.approx(expected["loss"].tolist(), rel=1e-12)

    meta = json.loads(out.with_name("out.meta.json").read_text())
    assert meta["command"] == ["atprobe", *map(str, args)]
    assert meta["seed"] == 0
    assert {"atprobe", "torch", "python", "numpy", "pandas"} <= set(meta["versions"])
    assert meta["versions"]["torch"] == torch.__version__
    digest = hashlib.sha256(ckpts["a"].read_bytes()).hexdigest()
    assert [c["sha256"] for c in meta["checkpoints"]] == [digest]
    assert meta["checkpoints"][0]["arch"] == "cnn-small" and meta["checkpoints"][0]["native"] is True
    assert meta["rows"] == 2 and meta["columns"] == CSV_COLUMNS
    assert meta["config"]["attacks"] == ["natural", "pgd2"] and meta["config"]["n"] == 64
    assert meta["config"]["dataset"] == "synthetic" and meta["config"]["device"] == "cpu"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_eval_two_checkpoints_and_determinism(ckpts, tmp_path):
    outs = [tmp_path / f"run{i}.csv" for i in range(3)]
    for out, seed in zip(outs, (7, 7, 8)):
        run_cli("eval", ckpts["a"], ckpts["b"], "--attack", "natural,fgsm_rs", "--n", "32", "-o", out,
                "--device", "cpu", "--seed", seed, "-q")
    df = _read_csv(outs[0])
    assert list(zip(df["checkpoint"], df["attack"])) == [
        (str(ckpts["a"]), "natural"), (str(ckpts["a"]), "fgsm_rs"),
        (str(ckpts["b"]), "natural"), (str(ckpts["b"]), "fgsm_rs"),
    ]
    meta = json.loads(outs[0].with_name("run0.meta.json").read_text())
    assert [c["path"] for c in meta["checkpoints"]] == [str(ckpts["a"]), str(ckpts["b"])]
    assert meta["checkpoints"][0]["sha256"] != meta["checkpoints"][1]["sha256"]
    assert meta["seed"] == 7
    assert outs[0].read_bytes() == outs[1].read_bytes()  # same seed: byte-identical
    other = _read_csv(outs[2])
    assert other["loss"][df["attack"] == "fgsm_rs"].tolist() != df["loss"][df["attack"] == "fgsm_rs"].tolist()
    pd.testing.assert_frame_equal(other[df["attack"] == "natural"], df[df["attack"] == "natural"])


def test_eval_parses_fractions(ckpts, tmp_path):
    out = tmp_path / "frac.csv"
    run_cli("eval", ckpts["a"], "--attack", "pgd1,pgd1x2", "--eps", "8/255", "--alpha", "1/255", "--n", "8",
            "-o", out, "--device", "cpu")
    df = _read_csv(out)
    assert df["eps"].tolist() == pytest.approx([8 / 255] * 2, rel=1e-15)
    assert df["alpha"].tolist() == pytest.approx([1 / 255] * 2, rel=1e-15)
    assert list(df["restarts"]) == [1, 2]
    out = tmp_path / "l2.csv"
    run_cli("eval", ckpts["a"], "--attack", "pgd1", "--norm", "l2", "--eps", "128/255", "--n", "8",
            "-o", out, "--device", "cpu")
    df = _read_csv(out)
    assert df["norm"].tolist() == ["l2"]
    assert df["eps"].iloc[0] == pytest.approx(128 / 255, rel=1e-15)
    assert df["alpha"].iloc[0] == pytest.approx(32 / 255, rel=1e-15)  # eps/4


@pytest.mark.slow
def test_eval_trained_vs_true_labels(ckpts, tmp_path):
    noisy, data = ckpts["labels"], ckpts["data"]
    assert (noisy != data.train.true_y).float().mean() > 0.8  # rate 1.0: ~90% of labels change
    results = {}
    for split in ("train", "test"):
        for labels in ("trained", "true"):
            out = tmp_path / f"{split}-{labels}.csv"
            run_cli("eval", ckpts["noisy"], "--split", split, "--labels", labels, "--attack", "natural",
                    "--n", "200", "-o", out, "--device", "cpu", "-q")
            results[split, labels] = _read_csv(out).iloc[0]
    assert results["train", "trained"]["loss"] != results["train", "true"]["loss"]
    # the test split is never corrupted: both label modes give the same row
    pd.testing.assert_series_equal(results["test", "trained"], results["test", "true"], check_names=False)

    model = build_model("cnn-small", **ARCH_KWARGS)
    model.load_state_dict(torch.load(ckpts["noisy"], weights_only=True)["model"])
    config = EvalConfig(attacks=(parse_attack("natural"),))
    first = data.train.subset(slice(0, 200))
    for labels, y in (("trained", noisy[:200]), ("true", data.train.true_y[:200])):
        expected = evaluate(model, first.with_labels(y), config).iloc[0]
        assert results["train", labels]["accuracy"] == expected["accuracy"]
        assert results["train", labels]["loss"] == pytest.approx(expected["loss"], rel=1e-12)

    # a validation split carved as the training run did keeps each sample's trained label
    out = tmp_path / "val.csv"
    run_cli("eval", ckpts["noisy_val"], "--split", "val", "--attack", "natural", "--n", "50", "-o", out,
            "--device", "cpu", "-q")
    val = load_dataset("synthetic", val_size=500, val_seed=4).val.subset(slice(0, 50))
    expected = evaluate(model, val.with_labels(noisy[val.index]), config).iloc[0]
    row = _read_csv(out).iloc[0]
    assert row["split"] == "val" and row["n"] == 50
    assert row["accuracy"] == expected["accuracy"]
    assert row["loss"] == pytest.approx(expected["loss"], rel=1e-12)


def _bad_inputs(root, ckpts):
    """name -> (argv after `eval`, a fragment the error must contain)."""
    text = root / "notes.txt"
    text.write_text("these are not weights\n")
    noise = root / "noise.pt"
    noise.write_bytes(random.Random(0).randbytes(4096))
    empty = root / "empty.pt"
    empty.write_bytes(b"")
    foreign = root / "foreign.pt"
    torch.save(torch.load(ckpts["a"], weights_only=True)["model"], foreign)
    a = ckpts["a"]
    (root / "no_checkpoints").mkdir(exist_ok=True)
    return {
        "missing": ([root / "nope.pt"], "not found"),
        "directory": ([root / "no_checkpoints"], "no checkpoints in this directory"),
        "text": ([text], "not a readable PyTorch checkpoint"),
        "random bytes": ([noise], "not a readable PyTorch checkpoint"),
        "empty file": ([empty], "not a readable PyTorch checkpoint"),
        "foreign without --arch": ([foreign], "--arch"),
        "foreign with wrong --arch": ([foreign, "--arch", "mlp", "--dataset", "synthetic"], "do not fit"),
        "unknown arch": ([foreign, "--arch", "resnet-99"], "unknown architecture"),
        "bogus attack": ([a, "--attack", "bogus"], "unknown attack"),
        "empty attack list": ([a, "--attack", ","], "--attack"),
        "linf eps 8": ([a, "--eps", "8"], "8/255"),
        "eps abc": ([a, "--eps", "abc"], "not a number"),
        "n 0": ([a, "--n", "0"], "--n"),
        "n 10**6": ([a, "--n", str(10**6)], "larger than the split"),
        "device cuda": ([a, "--device", "cuda"], "no CUDA GPU"),
        "device tpu": ([a, "--device", "tpu"], "device"),
        "split val without val": ([a, "--split", "val"], "no val split"),
    }


BAD_CASES = [
    "missing", "directory", "text", "random bytes", "empty file", "foreign without --arch",
    "foreign with wrong --arch", "unknown arch", "bogus attack", "empty attack list", "linf eps 8", "eps abc",
    "n 0", "n 10**6", "device cuda", "device tpu", "split val without val",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_eval_bad_input_is_one_line_exit_2(case, ckpts, tmp_path):
    if case == "device cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present, so --device cuda is valid here")
    args, fragment = _bad_inputs(tmp_path, ckpts)[case]
    device = [] if case.startswith("device") else ["--device", "cpu"]
    cli_rejects(fragment, "eval", *args, *device, "-q", output=tmp_path / "out" / "e.csv")


def test_help_shows_commands_and_examples():
    top = run_cli("--help")
    assert "Usage: atprobe" in top.output and "eval" in top.output and "train" in top.output
    assert "atprobe COMMAND --help" in " ".join(top.output.split())
    assert run_cli("-h").output == top.output
    sub = run_cli("eval", "--help")
    assert "Usage: atprobe eval" in sub.output and "Examples:" in sub.output
    assert "atprobe eval run/final.pt --attack natural,pgd10 -o eval.csv" in sub.output
    assert "atprobe eval trades_wrn.pt --arch wrn-34-10 --dataset cifar10 --attack pgd50x5 --eps 8/255" in sub.output
    for option in ("--attack", "--split", "--n", "--labels", "--norm", "--eps", "--alpha", "--output", "--dataset",
                   "--data-dir", "--arch", "--num-classes", "--normalize", "--device", "--batch-size", "--seed"):
        assert option in sub.output, option


def test_evaluation_is_float32_unless_asked(ckpts, tmp_path):
    """The paper's numbers are float32: eval, and training's curves and best.pt selection, run
    without autocast by default; `eval --amp` turns bf16 on (on CUDA) and says so in the meta."""
    from atprobe.distributed import DistContext
    from atprobe.train import TrainConfig, Trainer

    assert EvalConfig(attacks=(parse_attack("natural"),)).amp is False
    for flag, expected in ((), False), (("--amp",), True):
        out = tmp_path / f"e{len(flag)}.csv"
        run_cli("eval", ckpts["a"], "--n", "4", "--attack", "natural", *flag, "-o", out, "--device", "cpu", "-q")
        assert json.loads(out.with_name(out.stem + ".meta.json").read_text())["config"]["amp"] is expected
    trainer = Trainer(TrainConfig(amp=True, train_n=64, batch_size=32, eval_n=16), tmp_path / "run", DistContext(),
                      torch.device("cpu"))
    assert trainer.config.amp is True and trainer.eval_config.amp is False
