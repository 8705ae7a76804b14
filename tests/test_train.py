"""Training core: methods learn, labels, TE/ramps by hand, losses by formula, resume, errors."""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from atprobe import objectives
from atprobe.attacks import pgd
from atprobe.checkpoint import file_sha256, load_checkpoint
from atprobe.data import load_dataset, symmetric_label_noise
from atprobe.distributed import DistContext
from atprobe.errors import AtprobeError
from atprobe.models import build_model
from atprobe.starts import Starts
from atprobe.threat import ThreatModel
from atprobe.train import TrainConfig, Trainer, learning_rate, mix_gamma, te_weight, train, training_loss
from tests.conftest import cli_error, save_seeded_checkpoint, stopped_then_resumed, write_npz

FAST = dict(arch="cnn-small", dataset="synthetic", train_n=256, batch_size=64, eval_n=64, threat=ThreatModel(steps=2),
            eval_attack="pgd3", lr=0.05, schedule="constant")


@pytest.fixture(autouse=True)
def _threads():
    # One thread, as in the other test files: on the shared 2-core CI machine two threads
    # contending with another job made these runs 3-10x slower (test_resume 15 s vs 48 s).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _curve(run, split, metric):
    df = pd.read_csv(run / "curves.csv")
    return df[(df.split == split) & (df.metric == metric)].sort_values("epoch").value.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["standard", "pgd_at", "trades", "fgsm_rs"])
def test_each_method_learns(tmp_path, method):
    run = train(TrainConfig(method=method, epochs=3, **FAST), tmp_path / method, device="cpu")
    acc = _curve(run, "train", "natural_acc")
    assert acc[-1] > acc[0] or acc[-1] > 0.5, acc
    assert acc[-1] > 0.25  # chance is 0.1
    for name in ("config.json", "curves.csv", "curves.meta.json", "final.pt", "best.pt", "last.pt"):
        assert (run / name).is_file(), name
    ck = load_checkpoint(run / "final.pt")
    assert ck.epoch == 3 and ck.train_config["method"] == method


@pytest.mark.slow
def test_random_labels_are_stored_and_reproducible(tmp_path):
    cfg = TrainConfig(method="standard", epochs=1, label_noise=1.0, label_seed=7, **FAST)
    a = load_checkpoint(train(cfg, tmp_path / "a", device="cpu") / "final.pt")
    b = load_checkpoint(train(cfg, tmp_path / "b", device="cpu") / "final.pt")
    truth = load_dataset("synthetic").train.true_y
    expected = symmetric_label_noise(truth, 1.0, 10, 7)
    assert torch.equal(a.labels, expected) and torch.equal(a.labels, b.labels)
    changed = (a.labels != truth).float().mean().item()
    assert abs(changed - 0.9) < 0.03  # rate 1: every label redrawn, 1/C keep theirs by chance
    for key in a.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key])


def test_ramps_and_schedules_by_hand():
    assert objectives.gaussian_rampup(89, 90, 150) == 0.0
    assert objectives.gaussian_rampup(90, 90, 150) == pytest.approx(math.exp(-5))
    assert objectives.gaussian_rampup(120, 90, 150) == pytest.approx(math.exp(-1.25))
    assert objectives.gaussian_rampup(150, 90, 150) == 1.0
    cfg = TrainConfig(method="pgd_at", te=True).resolved()
    assert (cfg.te_start, cfg.te_end, cfg.milestones) == (90, 150, (100, 150))
    # the official code numbers epochs from 1: the 0-based epoch 119 is its epoch 120
    assert te_weight(cfg, 119) == pytest.approx(30 * math.exp(-1.25))
    assert te_weight(cfg, 88) == 0.0 and te_weight(cfg, 89) == pytest.approx(30 * math.exp(-5))
    assert learning_rate(cfg, 99.9) == pytest.approx(0.1)
    assert learning_rate(cfg, 100) == pytest.approx(0.01)
    assert learning_rate(cfg, 160) == pytest.approx(0.001)
    cos = TrainConfig(schedule="cosine", epochs=10).resolved()
    assert learning_rate(cos, 5) == pytest.approx(0.05) and learning_rate(cos, 10) == pytest.approx(0)
    mix = TrainConfig(method="pgd_at", mix_clean=True, epochs=20, mix_epochs=10).resolved()
    assert [mix_gamma(mix, e) for e in (0, 5, 10, 15)] == [0.0, 0.5, 1.0, 1.0]
    sig = TrainConfig(method="pgd_at", mix_clean=True, epochs=20, mix_epochs=10, mix_ramp="sigmoid").resolved()
    assert mix_gamma(sig, 5) == pytest.approx(math.exp(-5 * 0.25))


def test_temporal_ensemble_update_by_hand():
    ens = torch.zeros(4, 2)
    index = torch.tensor([1, 3])
    p1 = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    target = objectives.update_ensemble(ens, index, p1, 0.9)
    torch.testing.assert_close(ens[1], torch.tensor([0.08, 0.02]))
    torch.testing.assert_close(target, p1)  # bias correction: (0.1 p) / 0.1
    p2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    target = objectives.update_ensemble(ens, index, p2, 0.9)
    raw = 0.9 * 0.1 * p1 + 0.1 * p2  # [[0.072, 0.118], [0.136, 0.054]]
    torch.testing.assert_close(ens[index], raw)
    torch.testing.assert_close(target, raw / (1 - 0.9**2))
    assert torch.equal(ens[0], torch.zeros(2))


def _fixed_batch():
    torch.manual_seed(0)
    model = build_model("cnn-small").double()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(8, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=g)
    return model, x, y


def test_losses_match_direct_formulas():
    model, x, y = _fixed_batch()
    # PGD-AT: CE on examples from the same attack and generator state
    # (the attack runs in eval mode: reference examples come from a copy taken before the
    # train-mode forwards of training_loss move the BatchNorm running statistics)
    cfg = TrainConfig(method="pgd_at", threat=ThreatModel(steps=3)).resolved()
    x_adv = pgd(copy.deepcopy(model), x, y, cfg.attack_config(), starts=Starts(1, torch.arange(8)))
    out = training_loss(model, x, y, cfg, epoch=0, starts=Starts(1, torch.arange(8)))
    torch.testing.assert_close(out.x_adv, x_adv)
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x_adv), y))
    # Eq. 6 with gamma = 0.5
    mix = TrainConfig(method="pgd_at", mix_clean=True, epochs=4, mix_epochs=2, threat=ThreatModel(steps=3)).resolved()
    out = training_loss(model, x, y, mix, epoch=1, starts=Starts(1, torch.arange(8)))
    expected = 0.5 * F.cross_entropy(model(x), y) + 0.5 * F.cross_entropy(model(out.x_adv), y)
    torch.testing.assert_close(out.loss, expected)
    # TRADES: CE(f(x)) + beta * KL(f(x) || f(x')), batchmean
    tr = TrainConfig(method="trades", beta=6.0, threat=ThreatModel(steps=3)).resolved()
    out = training_loss(model, x, y, tr, epoch=0, starts=Starts(1, torch.arange(8)))
    logits_nat, logits_adv = model(x), model(out.x_adv)
    kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_nat, 1), reduction="batchmean")
    torch.testing.assert_close(out.loss, F.cross_entropy(logits_nat, y) + 6.0 * kl)
    # TE: + w * ||softmax(f(x')) - p_hat||^2 per sample (w = 30 at full ramp), also in the attack
    te = TrainConfig(method="pgd_at", te=True, epochs=10, te_start=0, te_end=0, threat=ThreatModel(steps=3)).resolved()
    target = F.softmax(torch.randn(8, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64), 1)
    out = training_loss(model, x, y, te, epoch=5, starts=Starts(1, torch.arange(8)), te_target=target)
    logits = model(out.x_adv)
    penalty = (F.softmax(logits, 1) - target).pow(2).sum(1)
    torch.testing.assert_close(out.loss, (F.cross_entropy(logits, y, reduction="none") + 30 * penalty).mean())
    assert not torch.equal(out.x_adv, x_adv)  # the TE term changed the inner maximization
    # TRADES + TE: the outer TE term on the natural prediction by default
    tte = TrainConfig(method="trades", te=True, epochs=10, te_start=0, te_end=0, threat=ThreatModel(steps=3)).resolved()
    out = training_loss(model, x, y, tte, epoch=5, starts=Starts(1, torch.arange(8)), te_target=target)
    ln, la = model(x), model(out.x_adv)
    kl = F.kl_div(F.log_softmax(la, 1), F.softmax(ln, 1), reduction="batchmean")
    pen = (F.softmax(ln, 1) - target).pow(2).sum(1).mean()
    torch.testing.assert_close(out.loss, F.cross_entropy(ln, y) + 6.0 * kl + 30 * pen)


@pytest.mark.slow
def test_resume_gives_the_same_weights(tmp_path):
    cfg = TrainConfig(method="pgd_at", epochs=3, te=True, te_start=0, te_end=2, dropout=0.1, **FAST)
    full = load_checkpoint(train(cfg, tmp_path / "full", device="cpu") / "final.pt")
    resumed = load_checkpoint(stopped_then_resumed(cfg, tmp_path / "cut", 1) / "final.pt")
    for key, value in full.state_dict.items():
        assert torch.equal(value, resumed.state_dict[key]), key
    curves = pd.read_csv(tmp_path / "cut" / "curves.csv")
    assert sorted(curves.epoch.unique()) == [1, 2, 3]


def test_grad_ratio_log(tmp_path):
    run = train(TrainConfig(method="pgd_at", epochs=1, log_grad_ratio=3, **FAST), tmp_path / "r", device="cpu")
    df = pd.read_csv(run / "gradratio.csv")
    assert list(df.iteration) == [0, 1, 2]
    torch.testing.assert_close(torch.tensor(df.ratio.values), torch.tensor((df.grad_r / df.grad_ce).values))


@pytest.mark.parametrize("args,pattern", [
    (["--eps", "-0.1"], "eps"),
    (["--method", "madry"], "madry"),
    (["--method", "standard", "--te"], "--te works with"),
    (["--te", "--te-start", "10", "--te-end", "5"], "before it starts"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/atprobe"], "--download"),
    (["--epochs", "0"], "epochs"),
    (["--label-noise", "1.5"], "rate"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, pattern):
    line = cli_error("train", "--out", tmp_path / "run", "--device", "cpu", *args)
    assert pattern in line, line
    assert not (tmp_path / "run" / "final.pt").exists()


def test_resolved_config_rejects_nonsense():
    with pytest.raises(AtprobeError):
        TrainConfig(method="pgd_at", milestones=(150, 100), epochs=200).resolved()
    with pytest.raises(AtprobeError):
        TrainConfig(method="trades", mix_clean=True).resolved()


def test_legacy_config_json_with_flat_threat_keys_loads():
    """Runs written before the threat model was one field stored norm/eps/alpha/steps flat."""
    legacy = {**TrainConfig().to_json(), "norm": "l2", "eps": 0.25, "alpha": None, "steps": 3}
    del legacy["threat"]
    config = TrainConfig.from_json(legacy).resolved()
    assert config.threat == ThreatModel(norm="l2", eps=0.25, steps=3)
    assert config.threat.alpha == 0.25 / 4
    assert TrainConfig.from_json(config.to_json()) == config


def test_te_weight_default_is_the_official_300_over_classes():
    """The official penalty is 300 * mse(...) (a mean over C classes): 300 / C on the
    per-sample sum, 30 on CIFAR-10 and 3 on CIFAR-100; an explicit weight wins."""
    assert TrainConfig(te=True, dataset="cifar10").resolved().te_weight == 30.0
    assert TrainConfig(te=True, dataset="cifar100").resolved().te_weight == 3.0
    assert TrainConfig(te=True, dataset="npz").resolved().te_weight is None  # known once read
    assert TrainConfig(te=True, dataset="npz").resolved(num_classes=20).te_weight == 15.0
    assert TrainConfig(te=True, dataset="cifar100", te_weight=30.0).resolved().te_weight == 30.0


def test_trades_te_attack_maximizes_beta_kl_plus_the_weighted_penalty():
    """The official TRADES+TE attack: beta * KL(f(x) || f(x')) + w * ||softmax f(x') - p_hat||^2."""
    model, x, y = _fixed_batch()
    cfg = TrainConfig(method="trades", beta=6.0, te=True, epochs=10, te_start=0, te_end=0,
                      threat=ThreatModel(steps=3)).resolved()
    target = F.softmax(torch.randn(8, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64), 1)
    starts = Starts(1, torch.arange(8))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        log_p = F.log_softmax(reference.eval()(x), 1)

    def objective(z):
        kl = (log_p.exp() * (log_p - F.log_softmax(z, 1))).sum(1)
        return 6.0 * kl + 30.0 * (F.softmax(z, 1) - target).pow(2).sum(1)

    expected = pgd(reference, x, y, cfg.attack_config(), starts=starts, loss_fn=objective)
    out = training_loss(model, x, y, cfg, epoch=5, starts=starts, te_target=target)
    torch.testing.assert_close(out.x_adv, expected)


def test_te_ensemble_starts_at_the_ramp(tmp_path):
    """Before epoch number te_start the ensemble is not accumulated (the official code's
    ``epoch >= es``), so its first target is the prediction itself."""
    out = tmp_path / "run"
    train(TrainConfig(**FAST, method="pgd_at", te=True, epochs=1, te_start=2, te_end=3), out, device="cpu")
    ensemble = load_checkpoint(out / "last.pt").raw["extra"]["te_ensemble"]
    assert torch.count_nonzero(ensemble) == 0
    train(TrainConfig(**FAST, method="pgd_at", te=True, epochs=1, te_start=1, te_end=3), tmp_path / "b",
          device="cpu")
    assert torch.count_nonzero(load_checkpoint(tmp_path / "b" / "last.pt").raw["extra"]["te_ensemble"]) > 0


def _npz_config(tmp_path, **kw) -> TrainConfig:
    """mlp on a 64-image npz training set with a 1200-image test split (larger than the old 1000)."""
    data = tmp_path / "data.npz"
    if not data.exists():
        write_npz(data)
    base = dict(arch="mlp", dataset="npz", data_dir=str(data), epochs=1, batch_size=64, threat=ThreatModel(steps=1),
                eval_attack="pgd1", schedule="constant", augment=False)
    return TrainConfig(**{**base, **kw})


def test_best_pt_is_chosen_on_the_whole_test_split(tmp_path):
    """The default selection (and the test curve) covers every test image, not the first 1000; the
    run records the set. Natural accuracy checked against a plain loop over all 1200 images."""
    run = train(_npz_config(tmp_path), tmp_path / "run", device="cpu")
    best = load_checkpoint(run / "best.pt")
    extra = best.raw["extra"]
    assert (extra["best_split"], extra["best_n"], extra["best_epoch"]) == ("test", 1200, 1)
    data = load_dataset("npz", str(tmp_path / "data.npz"))
    model = best.build_model("cpu")
    with torch.no_grad():
        by_hand = sum(int((model(data.test.x[i:i + 100].float() / 255).argmax(1) == data.test.y[i:i + 100]).sum())
                      for i in range(0, 1200, 100)) / 1200
    assert extra["best"][1] == pytest.approx(by_hand, abs=1e-9)
    assert _curve(run, "test", "natural_acc") == [pytest.approx(by_hand, abs=1e-9)]
    meta = json.loads((run / "curves.meta.json").read_text())
    assert (meta["best_split"], meta["best_n"]) == ("test", 1200)
    # a smaller --eval-n limits the curves and the selection alike, and says so
    quick = Trainer(_npz_config(tmp_path, eval_n=100), tmp_path / "quick", DistContext(), torch.device("cpu"))
    assert quick.selection == {"best_split": "test", "best_n": 100} and len(quick.eval_sets["train"]) == 64
    assert TrainConfig().resolved().train_eval_n == 1000 and TrainConfig(eval_n=64).resolved().train_eval_n == 64


def test_adam_is_built_with_pytorchs_defaults_and_steps_as_adam(tmp_path):
    config = _npz_config(tmp_path, optimizer="adam", method="standard").resolved()
    assert (config.lr, config.weight_decay) == (1e-3, 0.0)
    trainer = Trainer(config, tmp_path / "run", DistContext(), torch.device("cpu"))
    opt = trainer.optimizer
    assert type(opt) is torch.optim.Adam
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-8, 0.0)
    # one step on the whole 64-image batch: Adam's first step moves each weight by lr g / (|g| + eps)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    reference = copy.deepcopy(trainer.model).train()
    x, y = trainer.train_split.x.float() / 255, trainer.train_split.y
    F.cross_entropy(reference(x), y).backward()
    trainer.epoch()
    for name, p in trainer.model.named_parameters():
        g = dict(reference.named_parameters())[name].grad
        expected = before[name] - 1e-3 * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=5e-5)
        assert (p.detach() - before[name]).abs().max() > 9e-4  # an Adam-sized step, not lr * g
    assert "exp_avg_sq" in opt.state[next(iter(trainer.model.parameters()))]
    with pytest.raises(AtprobeError, match="nesterov"):
        TrainConfig(optimizer="adam", nesterov=True).resolved()


def test_init_from_starts_from_the_source_weights(tmp_path):
    source = save_seeded_checkpoint(tmp_path / "src" / "final.pt", seed=5, arch="cnn-small", random_bn=True, epoch=7)
    small = write_npz(tmp_path / "small.npz", n_test=40)
    config = _npz_config(tmp_path, arch="cnn-small", init_from=str(source), data_dir=str(small))
    trainer = Trainer(config, tmp_path / "run", DistContext(), torch.device("cpu"))
    trainer.initialize()
    want = load_checkpoint(source).state_dict
    got = trainer.model.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key  # weights and BatchNorm buffers
    assert trainer.state.epoch == 0 and not trainer.optimizer.state  # a fresh optimizer
    run = train(config, tmp_path / "run2", device="cpu")
    extra = load_checkpoint(run / "final.pt").raw["extra"]
    assert (extra["init_sha256"], extra["init_epoch"]) == (file_sha256(source), 7)
    assert load_checkpoint(run / "last.pt").raw["extra"]["init_sha256"] == file_sha256(source)  # what resume reads
    meta = json.loads((run / "curves.meta.json").read_text())
    assert meta["init_sha256"] == file_sha256(source) and meta["init_from"] == str(source.resolve())
    assert json.loads((run / "config.json").read_text())["init_from"] == str(source)


def test_init_from_another_architecture_is_a_one_line_error(tmp_path):
    source = save_seeded_checkpoint(tmp_path / "src.pt", arch="mlp")
    data = write_npz(tmp_path / "data.npz", n_test=20)
    line = cli_error("train", "--arch", "cnn-small", "--dataset", "npz", "--data-dir", data, "--init-from", source,
                     "--epochs", "1", "--out", tmp_path / "run", "--device", "cpu")
    assert "holds a mlp, not a cnn-small" in line, line
    assert not (tmp_path / "run").exists()
