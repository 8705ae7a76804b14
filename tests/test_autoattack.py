"""AutoAttack through the optional extra (``atprobe.autoattack``) and ``eval --per-sample``.

The models are tiny float64 MLPs trained in a second on a prototype task (10 classes of
8x8 images: a class prototype ``0.5 +- delta`` per pixel plus Gaussian noise). With
``delta = 0.04`` an L-inf eps of 8/255 reaches halfway to another prototype, so the
standard-trained model is accurate but not robust; with ``delta = 0.05`` it keeps part of
its accuracy under PGD. Tests that run AutoAttack skip without ``pyautoattack``.
"""

from __future__ import annotations

import json
import logging
import sys

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atprobe.attacked import attacked_batches
from atprobe.attacks import parse_attack, pgd, with_config
from atprobe.data import Split
from atprobe.errors import AtprobeError
from atprobe.evaluate import EVAL_COLUMNS, SAMPLE_COLUMNS, EvalConfig, evaluate, evaluate_samples
from atprobe.starts import Starts
from atprobe.threat import ThreatModel
from tests.conftest import cli_error, cli_rejects, run_cli

AA_NAMES = ("aa", "aa-plus", "apgd-ce", "apgd-t", "fab-t", "square")


def _prototype_split(n: int, delta: float, seed: int, sigma: float = 0.05) -> Split:
    protos = 0.5 + delta * (2 * torch.randint(0, 2, (10, 3, 8, 8), generator=torch.Generator().manual_seed(0)) - 1)
    y = torch.arange(n) % 10
    x = (protos[y] + sigma * torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)
    return Split(x=(x * 255).round().to(torch.uint8), y=y, true_y=y.clone(), index=torch.arange(100, 100 + n))


def _standard_model(delta: float, epochs: int = 10) -> nn.Module:
    """A float64 MLP trained on clean images of the prototype task (full-batch-ish SGD)."""
    train = _prototype_split(1000, delta, seed=1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Linear(32, 10)).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = train.x.double() / 255
    for _ in range(epochs):
        for i in range(0, len(train), 100):
            loss = F.cross_entropy(net(x[i:i + 100]), train.y[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def undefended():
    return _standard_model(0.04), _prototype_split(60, 0.04, seed=2)


def _config(*names: str, batch_size: int = 256, threat: ThreatModel = ThreatModel()) -> EvalConfig:
    return EvalConfig(attacks=tuple(parse_attack(a, threat) for a in names), batch_size=batch_size, seed=0)


def _accuracy(summary: pd.DataFrame, attack: str) -> float:
    return float(summary.loc[summary["attack"] == attack, "accuracy"].item())


def _check_flags_agree(summary: pd.DataFrame, samples: pd.DataFrame, n: int) -> None:
    """Per attack: n rows, the mean robust flag is the accuracy, the mean loss the loss."""
    assert list(samples.columns)[-len(SAMPLE_COLUMNS):] == SAMPLE_COLUMNS
    for row in summary.itertuples():
        rows = samples[samples["attack"] == row.attack]
        assert len(rows) == n
        assert rows["robust"].sum() == round(row.accuracy * n), row
        assert rows["robust"].mean() == pytest.approx(row.accuracy, abs=1e-12)
        assert rows["loss"].mean() == pytest.approx(row.loss, rel=1e-12)
        assert (rows["robust"] == (rows["prediction"] == rows["label"])).all()


# ------------------------------------------------------------------------- without the package


def test_missing_extra_is_a_one_line_error_at_parse_time(monkeypatch, cnn_ckpt, tmp_path):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import pyautoattack -> ImportError
    for name in AA_NAMES:
        with pytest.raises(AtprobeError) as e:
            parse_attack(name)
        assert str(e.value) == "AutoAttack needs the optional extra: pip install 'atprobe[autoattack]'"
    # the CLI refuses before any work: no study, no output, not even its folder
    cli_rejects("pip install 'atprobe[autoattack]'", "eval", cnn_ckpt, "--attack", "natural,aa", "--device", "cpu",
                output=tmp_path / "out" / "ev.csv")
    parse_attack("pgd10")  # the other names do not need it


@pytest.mark.parametrize("name", ["aa2", "apgd", "apgd-ce10", "aa_plus", "fab", "apgd-dlr", "square5000"])
def test_unknown_names_are_one_line_errors(name, cnn_ckpt, tmp_path):
    with pytest.raises(AtprobeError, match="unknown attack"):
        parse_attack(name)
    assert "unknown attack" in cli_error("eval", cnn_ckpt, "--attack", name, "-o", tmp_path / "ev.csv")


def test_per_sample_rows_match_a_plain_loop_for_natural_and_pgd(undefended):
    """Without AutoAttack: flags and losses against one forward (and one keyed PGD) per sample."""
    model, split = undefended
    threat = ThreatModel()
    summary, samples = evaluate_samples(model, split, _config("natural", "pgd10", batch_size=7))
    _check_flags_agree(summary, samples, len(split))
    assert summary.equals(evaluate(model, split, _config("natural", "pgd10", batch_size=7)))
    x = (split.x.float() / 255).double()  # the images as iterate_batches makes them (float32), in the model's dtype
    for attack in ("natural", "pgd10"):
        rows = samples[samples["attack"] == attack].reset_index(drop=True)
        assert rows["index"].tolist() == split.index.tolist() and rows["label"].tolist() == split.y.tolist()
        for i in range(len(split)):
            xi = x[i:i + 1]
            if attack == "pgd10":
                xi = pgd(model, xi, split.y[i:i + 1], threat.attack("ce"), starts=Starts(0, split.index[i:i + 1]))
            with torch.no_grad():
                logits = model(xi)
            assert rows["prediction"][i] == logits.argmax(1).item()
            assert rows["loss"][i] == pytest.approx(F.cross_entropy(logits, split.y[i:i + 1]).item(), rel=1e-9)
    assert evaluate_samples(model, split, _config("natural"), per_sample=False)[1] is None


def test_per_sample_pgd_flags_do_not_depend_on_batch_size(undefended):
    model, split = undefended
    a = evaluate_samples(model, split, _config("natural", "pgd10", batch_size=7))[1]
    b = evaluate_samples(model, split, _config("natural", "pgd10", batch_size=60))[1]
    assert a[["attack", "index", "label", "prediction", "robust"]].equals(b[["attack", "index", "label", "prediction",
                                                                           "robust"]])
    assert a["loss"].to_numpy() == pytest.approx(b["loss"].to_numpy(), rel=1e-6, abs=1e-9)


def test_cli_per_sample_without_autoattack(cnn_ckpt, tmp_path):
    out = tmp_path / "ev.csv"
    run_cli("eval", cnn_ckpt, "--attack", "natural,pgd2", "--per-sample", "--n", "10", "--device", "cpu", "-q",
            "-o", out)
    summary, samples = pd.read_csv(out), pd.read_csv(tmp_path / "ev.samples.csv")
    assert list(samples.columns) == ["checkpoint", "split", *SAMPLE_COLUMNS] and len(samples) == 2 * 10
    assert (samples["checkpoint"] == str(cnn_ckpt)).all() and (samples["split"] == "test").all()
    _check_flags_agree(summary, samples, 10)
    run_cli("eval", cnn_ckpt, "--attack", "natural", "--n", "10", "--device", "cpu", "-q", "-o", tmp_path / "b.csv")
    assert not (tmp_path / "b.samples.csv").exists()  # only when asked


# ------------------------------------------------------------------------- with the package


def test_names_carry_the_packages_iteration_counts():
    """Croce & Hein 2020 (standard version): APGD 100 iterations, APGD-T and FAB-T over 9
    target classes, Square 5000 queries; the plus version 5 restarts of APGD-CE, APGD-DLR, FAB."""
    pytest.importorskip("pyautoattack")
    expected = {"apgd-ce": (100, 1), "apgd-t": (100, 9), "fab-t": (100, 9), "square": (5000, 1),
                "aa": (100 + 900 + 900 + 5000, 1 + 9 + 9 + 1),
                "aa-plus": (500 + 500 + 500 + 5000 + 900 + 900, 5 + 5 + 5 + 1 + 9 + 9)}
    for norm, eps in (("linf", 8 / 255), ("l2", 0.5)):
        for name, (steps, restarts) in expected.items():
            spec = parse_attack(f" {name.upper()} ", ThreatModel(norm=norm, eps=eps, steps=3, alpha=0.1))
            assert spec.name == name and (spec.steps, spec.restarts) == (steps, restarts), spec
            assert (spec.norm, spec.eps, spec.alpha) == (norm, eps, 0.0)
    assert parse_attack("aa").config.attacks == ("apgd-ce", "apgd-t", "fab-t", "square")
    assert parse_attack("aa-plus").config.attacks == ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
    with pytest.raises(AtprobeError, match="not PGD"):
        with_config(parse_attack("aa"), eval_mode=False)


def test_undefended_model_falls_to_zero_and_flags_agree(undefended, capfd, monkeypatch, tmp_path):
    pytest.importorskip("pyautoattack")
    model, split = undefended
    monkeypatch.chdir(tmp_path)
    rng, trace = torch.get_rng_state(), sys.gettrace()
    names = ("natural", "pgd10", "apgd-ce", "aa")
    summary, samples = evaluate_samples(model, split, _config(*names, batch_size=25))
    assert list(summary.columns) == EVAL_COLUMNS
    assert _accuracy(summary, "natural") >= 0.95
    assert _accuracy(summary, "pgd10") <= 0.2
    assert _accuracy(summary, "apgd-ce") <= 0.05 and _accuracy(summary, "aa") == 0.0
    _check_flags_agree(summary, samples, len(split))
    # quiet, no files, the caller's generator and tracer untouched
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert list(tmp_path.iterdir()) == []
    assert torch.equal(torch.get_rng_state(), rng) and sys.gettrace() is trace
    # the same seed, the same result
    again = evaluate(model, split, _config("aa", batch_size=25))
    assert again["accuracy"].item() == _accuracy(summary, "aa") and again["loss"].item() == pytest.approx(
        summary.loc[summary["attack"] == "aa", "loss"].item(), rel=1e-12)


def test_examples_stay_in_the_ball_in_the_models_dtype(undefended):
    """float64 model: the examples come back float64, in the eps-ball and the [0,1] box, and
    the flags are the model's own predictions there (a plain forward per sample)."""
    pytest.importorskip("pyautoattack")
    model, split = undefended
    for norm, eps in (("linf", 8 / 255), ("l2", 0.5)):
        spec = parse_attack("apgd-ce", ThreatModel(norm=norm, eps=eps))
        for b in attacked_batches(model, split, spec.config, batch_size=32, amp=False):
            assert b.x_adv.dtype == torch.float64 and b.x_adv.shape == b.x.shape
            d = (b.x_adv - b.x).flatten(1)
            size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
            assert (size <= eps * (1 + 1e-12)).all() and b.x_adv.min() >= 0 and b.x_adv.max() <= 1
            assert size.max() > 0.5 * eps  # it did move
            with torch.no_grad():
                plain = torch.stack([model(b.x_adv[i:i + 1].contiguous())[0] for i in range(len(b))])
            assert torch.equal(plain.argmax(1), b.logits.argmax(1))


def test_too_few_classes_for_the_targeted_attacks():
    pytest.importorskip("pyautoattack")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 5)).double().eval()
    split = _prototype_split(10, 0.04, seed=2).with_labels(torch.arange(10) % 5)
    with pytest.raises(AtprobeError, match="at least 10 classes, not 5"):
        evaluate(net, split, _config("aa"))
    evaluate(net, split, _config("apgd-ce"))  # untargeted: any number of classes


def test_package_warnings_go_to_its_logger_only(undefended, caplog, capfd):
    """A model that outputs probabilities makes the package's check warn: nothing reaches
    stderr (the ``atprobe.autoattack`` logger has a NullHandler), and whoever asks for the
    logger's records (here caplog) gets the warning."""
    pytest.importorskip("pyautoattack")
    from atprobe.autoattack import LOG

    model, split = undefended
    probabilities = nn.Sequential(model, nn.Softmax(dim=1)).eval()
    caplog.set_level(logging.WARNING, logger=LOG.name)
    evaluate(probabilities, split.subset(slice(0, 10)), _config("apgd-ce"))
    assert capfd.readouterr() == ("", "")
    assert [r.name for r in caplog.records if "probability distribution" in r.getMessage()] == [LOG.name]
    assert any(isinstance(h, logging.NullHandler) for h in LOG.handlers)  # so no lastResort print unasked


@pytest.mark.slow
def test_on_a_partly_robust_model_aa_is_below_pgd_below_natural():
    """delta = 0.05: PGD-10 breaks part of the accuracy, AutoAttack more (about 9 s on one
    thread, most of it Square's 5000 queries on the survivors)."""
    pytest.importorskip("pyautoattack")
    model, split = _standard_model(0.05), _prototype_split(40, 0.05, seed=2)
    summary, samples = evaluate_samples(model, split, _config("natural", "pgd10", "aa", batch_size=40))
    natural, pgd10, aa = (_accuracy(summary, a) for a in ("natural", "pgd10", "aa"))
    assert natural >= 0.95 and 0.1 <= pgd10 <= 0.9 and aa <= pgd10 < natural, summary
    _check_flags_agree(summary, samples, len(split))
    flags = {a: samples.loc[samples["attack"] == a, "robust"].to_numpy() for a in ("natural", "aa")}
    assert not (flags["aa"] & ~flags["natural"]).any()  # AutoAttack leaves misclassified samples as they are


def test_cli_eval_with_autoattack_and_per_sample(cnn_ckpt, tmp_path):
    pytest.importorskip("pyautoattack")
    out = tmp_path / "ev.csv"
    result = run_cli("eval", cnn_ckpt, "--attack", "natural,apgd-ce,aa", "--per-sample", "--n", "12",
                     "--batch-size", "8", "--device", "cpu", "-q", "-o", out)
    assert result.stdout == ""
    summary, samples = pd.read_csv(out), pd.read_csv(tmp_path / "ev.samples.csv")
    assert summary["attack"].tolist() == ["natural", "apgd-ce", "aa"]
    assert summary[["steps", "restarts"]].values.tolist() == [[0, 0], [100, 1], [6900, 20]]
    assert list(samples.columns) == ["checkpoint", "split", *SAMPLE_COLUMNS] and len(samples) == 3 * 12
    assert samples["index"].tolist() == list(range(12)) * 3
    _check_flags_agree(summary, samples, 12)
    meta = json.loads((tmp_path / "ev.samples.meta.json").read_text())
    assert meta["table"] == "per-sample" and meta["config"]["autoattack"] == {"package": "pyautoattack",
                                                                             "version": "0.2.0"}
    assert json.loads((tmp_path / "ev.meta.json").read_text())["table"] == "main"


def test_table_takes_autoattack_names_as_eval_does(tmp_path):
    """``atprobe table`` parses --attack as ``eval`` does: its apgd-ce column is eval's of best.pt/final.pt."""
    pytest.importorskip("pyautoattack")
    from atprobe.train import TrainConfig
    from tests.conftest import save_seeded_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    config = TrainConfig(arch="cnn-small", epochs=2).to_json()
    (run / "config.json").write_text(json.dumps(config))
    save_seeded_checkpoint(run / "best.pt", 1, arch="cnn-small", epoch=1, train_config=config)
    save_seeded_checkpoint(run / "final.pt", 2, arch="cnn-small", epoch=2, train_config=config)
    args = ["--attack", "natural,apgd-ce", "--n", "8", "--batch-size", "8", "--device", "cpu", "-q"]
    run_cli("table", run, *args, "-o", tmp_path / "t.csv")
    run_cli("eval", run / "best.pt", run / "final.pt", *args, "-o", tmp_path / "e.csv")
    table = pd.read_csv(tmp_path / "t.csv").set_index("attack")
    ev = pd.read_csv(tmp_path / "e.csv").set_index(["checkpoint", "attack"])["accuracy"]
    assert table.loc["apgd-ce", "steps"] == 100
    for role in ("best", "final"):
        assert table[role].to_dict() == {a: ev[(str(run / f"{role}.pt"), a)] for a in ("natural", "apgd-ce")}
