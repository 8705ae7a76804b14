"""Presets: every one resolves, a few against the paper's stated values, precedence, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from atprobe.data import NUM_CLASSES
from atprobe.errors import AtprobeError
from atprobe.models import canonical_arch
from atprobe.presets import PRESETS, get_preset, options_config, preset_config
from atprobe.threat import ThreatModel
from atprobe.train import TrainConfig
from tests.conftest import cli_error, run_cli


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_resolves(name):
    preset = PRESETS[name]
    assert preset.name == name and preset.description and preset.source
    given = {k: f"{k}.pt" for k in preset.requires}  # KD-SWA's teachers: files of the user's
    c = preset.config(**given).resolved(NUM_CLASSES[preset.fields["dataset"]])
    assert c.preset == name and c.arch == canonical_arch(c.arch)
    assert c.te_weight is not None and c.lr > 0
    assert TrainConfig.from_json(json.loads(json.dumps(c.to_json()))) == c  # config.json round trip


def _resolved(name: str) -> TrainConfig:
    return preset_config(name, **{k: f"{k}.pt" for k in PRESETS[name].requires}).resolved()


def test_table1_cifar10_pgd_is_the_papers_setting():
    # Sec. 5 "Training details": ResNet-18, 10-step PGD eps 8/255 step 2/255, SGD momentum 0.9,
    # weight decay 5e-4, batch 128, lr 0.1 decayed x0.1 at 100 and 150 of 200 epochs.
    c = _resolved("table1-cifar10-pgd")
    assert (c.arch, c.dataset, c.method, c.optimizer) == ("resnet18", "cifar10", "pgd_at", "sgd")
    assert (c.epochs, c.lr, c.milestones, c.lr_decay, c.schedule) == (200, 0.1, (100, 150), 0.1, "piecewise")
    assert (c.momentum, c.weight_decay, c.batch_size, c.augment, c.te) == (0.9, 5e-4, 128, True, False)
    assert (c.threat.norm, c.threat.steps) == ("linf", 10)
    assert math.isclose(c.threat.eps, 8 / 255) and math.isclose(c.threat.alpha, 2 / 255)
    assert c.label_noise == 0.0 and c.dropout == 0.0


def test_table1_te_presets_carry_the_papers_te_parameters():
    # Sec. 5: eta = 0.9, w = 30 along a Gaussian ramp-up; official train_te.py: ramp 90 -> 150,
    # reg_weight 300 as a mean over classes (30 on CIFAR-10, 3 on CIFAR-100); TRADES beta 6.
    c = _resolved("table1-cifar10-trades-te")
    assert (c.method, c.te, c.te_eta, c.te_weight, c.te_start, c.te_end, c.beta) == (
        "trades", True, 0.9, 30.0, 90, 150, 6.0)
    assert _resolved("table1-cifar100-pgd-te").te_weight == 3.0


def test_table1_svhn_is_lr_001_cosine_80_epochs_without_augmentation():
    # Sec. 5: "For SVHN, the learning rate starts from 0.01 with a cosine annealing schedule for a
    # total number of 80 training epochs"; official train_te.py: SVHN trained with the test transform.
    for name in ("table1-svhn-pgd", "table1-svhn-trades-te"):
        c = _resolved(name)
        assert (c.dataset, c.lr, c.schedule, c.epochs, c.augment) == ("svhn", 0.01, "cosine", 80, False)
    c = _resolved("table1-svhn-trades-te")
    assert c.te and c.te_start < c.te_end <= 80


def test_sec31_and_table_a1_presets():
    # Sec. 3.1: WRN-28-10, TRADES beta 6, no explicit regularization, random labels = noise rate 1.
    c = _resolved("fig2-trades-random")
    assert (c.arch, c.method, c.label_noise, c.beta) == ("wrn-28-10", "trades", 1.0, 6.0)
    assert (c.augment, c.weight_decay, c.dropout) == (False, 0.0, 0.0)
    assert _resolved("fig2-pgd-true").label_noise == 0.0 and _resolved("fig2-pgd-true").method == "pgd_at"
    # Table A.1: weight decay 0.0002, dropout 0.2; Fig. 2(c): noise rates.
    c = _resolved("tableA1-random-wd-dropout")
    assert (c.method, c.label_noise, c.weight_decay, c.dropout, c.augment) == ("trades", 1.0, 2e-4, 0.2, False)
    c = _resolved("tableA1-true-aug")
    assert (c.label_noise, c.weight_decay, c.dropout, c.augment) == (0.0, 0.0, 0.0, True)
    assert {n for n in PRESETS if n.startswith("tableA1-")} == {
        f"tableA1-{labels}-{combo}" for labels in ("true", "random")
        for combo in ("none", "aug", "wd", "dropout", "aug-wd", "wd-dropout")}
    assert [_resolved(f"fig2c-pgd-noise{r}").label_noise for r in ("0.0", "0.2", "0.4", "0.6", "0.8", "1.0")] == [
        0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    c = _resolved("fig5-pgd-eq6-random")
    assert (c.method, c.mix_clean, c.label_noise) == ("pgd_at", True, 1.0)


def test_appendix_presets():
    # Table C.1: WRN-34-10 and VGG-16 under L-inf; ResNet-18 under L2 with eps 128/255.
    assert _resolved("tableC1-wrn34-10-pgd-te").arch == "wrn-34-10" and _resolved("tableC1-wrn34-10-pgd-te").te
    assert _resolved("tableC1-vgg16-pgd").arch == "vgg16"
    t = _resolved("tableC1-l2-trades-te").threat
    assert t.norm == "l2" and math.isclose(t.eps, 128 / 255)
    # Fig. A.4: L2 eps 1.0, alpha 0.25.
    t = _resolved("figA4-pgd-random-l2").threat
    assert (t.norm, t.eps, t.alpha, t.steps) == ("l2", 1.0, 0.25, 10)
    # App. A.2: Adam (PyTorch's defaults); fast AT with step 10/255.
    c = _resolved("a2-pgd-random-adam")
    assert (c.optimizer, c.lr, c.weight_decay, c.label_noise) == ("adam", 1e-3, 0.0, 1.0)
    c = _resolved("a2-pgd-random-fgsm-rs")
    assert c.method == "fgsm_rs" and math.isclose(c.attack_config().alpha, 10 / 255)


def test_explicit_options_override_the_preset():
    c = preset_config("table1-cifar10-pgd", arch="mlp", epochs=20, threat={"steps": 3}).resolved()
    assert (c.arch, c.epochs, c.milestones, c.weight_decay) == ("mlp", 20, (10, 15), 5e-4)
    assert c.threat.steps == 3 and math.isclose(c.threat.alpha, 2 / 255)  # the rest of the preset's threat
    c = preset_config("table1-cifar10-pgd-te", epochs=20, te_end=19).resolved()
    assert (c.te_start, c.te_end) == (9, 19)  # scaled to 45%, the given end kept
    assert math.isclose(preset_config("table1-cifar10-pgd", threat={"eps": 4 / 255}).threat.alpha, 1 / 255)
    t = preset_config("figA4-pgd-random-l2", threat={"norm": "linf"}).threat
    assert math.isclose(t.eps, 8 / 255) and math.isclose(t.alpha, 2 / 255)  # the L2 budget dropped with its norm
    # the CLI's options: only the given ones override, the defaults of the rest do not
    options = {"arch": "cnn-small", "lr": None, "epochs": 200, "threat": ThreatModel(steps=1)}
    c = options_config("fig2-pgd-random", options, {"steps"})
    assert (c.arch, c.epochs, c.threat.steps, c.preset) == ("wrn-28-10", 300, 1, "fig2-pgd-random")
    assert options_config(None, options, set()) == TrainConfig(**options)


def test_unknown_preset_names_the_closest():
    with pytest.raises(AtprobeError, match="did you mean table1-cifar10-pgd-te"):
        get_preset("table1-cifar10-pgdte")


def test_list_presets_prints_every_preset():
    out = run_cli("train", "--list-presets").stdout
    for name, preset in PRESETS.items():
        assert f"\n{name}: {preset.description}\n" in f"\n{out}"
    assert out.rstrip().endswith(f"{len(PRESETS)} presets")
    assert "table1-svhn-pgd: " in out and "lr=0.01 schedule=cosine" in out


def test_cli_preset_with_overrides_records_the_preset(tmp_path):
    run = tmp_path / "run"
    run_cli("train", "--preset", "fig2-trades-random", "--arch", "mlp", "--dataset", "synthetic", "--epochs", "1",
            "--train-n", "32", "--batch-size", "32", "--eval-n", "16", "--steps", "1", "--eval-attack", "pgd1",
            "--out", run, "--device", "cpu", "-q")
    saved = json.loads((run / "config.json").read_text())
    assert (saved["preset"], saved["arch"], saved["method"], saved["label_noise"]) == (
        "fig2-trades-random", "mlp", "trades", 1.0)
    assert (saved["weight_decay"], saved["augment"], saved["epochs"], saved["threat"]["steps"]) == (0.0, False, 1, 1)
    assert math.isclose(saved["threat"]["alpha"], 2 / 255)
    line = cli_error("train", "--preset", "table1-cifar10-pgdte", "--out", tmp_path / "bad")
    assert "unknown preset" in line and "table1-cifar10-pgd-te" in line
    assert not (tmp_path / "bad").exists()


def test_docs_table_every_preset():
    from tests.conftest import ROOT

    text = (ROOT / "docs" / "presets.md").read_text()
    missing = [name for name in PRESETS if f"| `{name}` |" not in text]
    assert not missing, missing


def test_table2_presets_hold_their_methods():
    assert _resolved("table2-pgd-ls").label_smoothing == 0.2
    sat = _resolved("table2-sat")
    assert sat.sat and sat.sat_momentum == 0.9 and sat.sat_start == 90
    kd = _resolved("table2-kd-swa")
    assert kd.kd_weights == (0.3, 0.1, 0.6) and kd.kd_temperature == 2.0 and kd.swa_start == 106
    assert _resolved("table2-coteach").coteach and _resolved("table2-coteach").forget_rate == 0.2
    assert (_resolved("awp-pgd").awp_gamma, _resolved("awp-pgd").awp_warmup) == (0.01, 0)
    assert (_resolved("awp-trades").awp_gamma, _resolved("awp-trades").awp_warmup) == (0.005, 9)
    assert _resolved("table2-pgd") == dataclasses.replace(_resolved("table1-cifar10-pgd"), preset="table2-pgd")
    with pytest.raises(AtprobeError, match="needs --teacher-robust and --teacher-natural"):
        preset_config("table2-kd-swa")
    # a shorter run moves the epoch-counted fields along: SWA from 106 of 200 -> 11 of 20
    assert preset_config("table2-kd-swa", epochs=20, teacher_robust="r.pt", teacher_natural="n.pt").swa_start == 11
