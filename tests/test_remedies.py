"""The remedies of robust overfitting in the training core (Table 2 of Dong et al. 2022, and AWP):
label smoothing, self-adaptive training, knowledge distillation, SWA and adversarial weight
perturbation, each against a hand computation on a tiny model, and each training run end to end
with a bit-exact resume."""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atprobe import awp, objectives
from atprobe.checkpoint import load_checkpoint
from atprobe.models import build_model
from atprobe.starts import Starts
from atprobe.swa import WeightAverage
from atprobe.threat import ThreatModel
from atprobe.train import Teachers, TrainConfig, train, training_loss
from tests.conftest import cli_error, save_seeded_checkpoint, stopped_then_resumed

FAST = dict(arch="cnn-small", dataset="synthetic", train_n=128, batch_size=32, eval_n=32, train_eval_n=32,
            threat=ThreatModel(steps=1), eval_attack="pgd2", lr=0.05, schedule="constant")


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _batch(n=6, classes=10, seed=0):
    torch.manual_seed(seed)
    model = build_model("cnn-small").double()
    g = torch.Generator().manual_seed(seed + 3)
    x = torch.rand(n, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return model, x, y


# ---------------------------------------------------------------------------- label smoothing


def test_smoothed_labels_by_hand():
    """Pang et al.'s convention: 1 - s on the label, s / (K - 1) on the others (here K = 4)."""
    t = objectives.smoothed_labels(torch.tensor([2, 0]), 4, 0.3)
    expected = torch.tensor([[0.1, 0.1, 0.7, 0.1], [0.7, 0.1, 0.1, 0.1]])
    torch.testing.assert_close(t, expected)
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    z = math.exp(1) + math.exp(2) + math.exp(3) + math.exp(0.5)
    by_hand = -sum(w * (v - math.log(z)) for w, v in ((0.1, 1.0), (0.1, 2.0), (0.7, 3.0), (0.1, 0.5)))
    torch.testing.assert_close(objectives.soft_ce(logits, t)[0].item(), by_hand)
    torch.testing.assert_close(objectives.soft_ce(logits, t)[1].item(), math.log(4))


def test_label_smoothing_in_pgd_at_and_trades():
    """The CE terms use the smoothed labels; the attack keeps the hard ones (same x' as plain PGD-AT)."""
    model, x, y = _batch()
    starts = Starts(1, torch.arange(len(y)))
    plain = TrainConfig(method="pgd_at", threat=ThreatModel(steps=2)).resolved()
    ls = TrainConfig(method="pgd_at", label_smoothing=0.2, threat=ThreatModel(steps=2)).resolved()
    out_plain = training_loss(copy.deepcopy(model), x, y, plain, epoch=0, starts=starts)
    out = training_loss(model, x, y, ls, epoch=0, starts=starts)
    torch.testing.assert_close(out.x_adv, out_plain.x_adv)
    target = torch.full((len(y), 10), 0.2 / 9, dtype=torch.float64).scatter(1, y[:, None], 0.8)
    logits = model(out.x_adv)
    torch.testing.assert_close(out.loss, -(target * F.log_softmax(logits, 1)).sum(1).mean())
    tr = TrainConfig(method="trades", label_smoothing=0.2, threat=ThreatModel(steps=2)).resolved()
    out = training_loss(model, x, y, tr, epoch=0, starts=starts)
    ln, la = model(x), model(out.x_adv)
    kl = F.kl_div(F.log_softmax(la, 1), F.softmax(ln, 1), reduction="batchmean")
    torch.testing.assert_close(out.loss, -(target * F.log_softmax(ln, 1)).sum(1).mean() + 6.0 * kl)


# ---------------------------------------------------------------------------- SAT


def test_sat_targets_after_two_updates_and_weights_by_hand():
    targets = F.one_hot(torch.tensor([0, 1, 1]), 2).double()
    index = torch.tensor([0, 2])
    p1 = torch.tensor([[0.2, 0.8], [0.6, 0.4]], dtype=torch.float64)
    p2 = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    objectives.sat_update(targets, index, p1, 0.9)
    got = objectives.sat_update(targets, index, p2, 0.9)
    # t = 0.81 onehot + 0.09 p1 + 0.1 p2
    expected = torch.tensor([[0.81 + 0.018 + 0.05, 0.072 + 0.05], [0.054 + 0.1, 0.81 + 0.036]], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(targets[1], torch.tensor([0.0, 1.0], dtype=torch.float64))  # not visited
    w = objectives.sat_weights(got)
    raw = torch.tensor([0.878, 0.846], dtype=torch.float64)
    torch.testing.assert_close(w, raw * 2 / raw.sum())


def test_sat_objective_is_the_weighted_soft_ce():
    """PGD-AT+SAT: mean_i w_i soft_ce(f(x'_i), t_i); TRADES+SAT: the natural term weighted, the KL not."""
    model, x, y = _batch()
    starts = Starts(1, torch.arange(len(y)))
    target = F.softmax(torch.randn(len(y), 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64), 1)
    weight = objectives.sat_weights(target)
    seen = []

    def sat(probs):
        seen.append(probs)
        return target, weight

    cfg = TrainConfig(method="pgd_at", sat=True, threat=ThreatModel(steps=2)).resolved()
    out = training_loss(model, x, y, cfg, epoch=0, starts=starts, sat=sat)
    with torch.no_grad():
        model.eval()
        natural = F.softmax(model(x), 1)  # PGD-AT: the natural prediction in eval mode
        model.train()
    torch.testing.assert_close(seen[0], natural)
    logits = model(out.x_adv)
    torch.testing.assert_close(out.loss, (weight * -(target * F.log_softmax(logits, 1)).sum(1)).mean())
    tr = TrainConfig(method="trades", sat=True, threat=ThreatModel(steps=2)).resolved()
    out = training_loss(model, x, y, tr, epoch=0, starts=starts, sat=sat)
    ln, la = model(x), model(out.x_adv)
    kl = F.kl_div(F.log_softmax(la, 1), F.softmax(ln, 1), reduction="batchmean")
    torch.testing.assert_close(out.loss, (weight * -(target * F.log_softmax(ln, 1)).sum(1)).mean() + 6.0 * kl)


# ---------------------------------------------------------------------------- KD


def test_distillation_by_hand():
    """T^2 * soft CE at temperature T: KL(p_t || p_s) plus the teacher's entropy (T = 2)."""
    s = torch.tensor([[1.0, -1.0, 0.5]], dtype=torch.float64)
    t = torch.tensor([[0.2, 0.3, -0.4]], dtype=torch.float64)
    pt, ps = F.softmax(t / 2, 1), F.softmax(s / 2, 1)
    kl = (pt * (pt.log() - ps.log())).sum()
    entropy = -(pt * pt.log()).sum()
    torch.testing.assert_close(objectives.distillation(s, t, 2.0)[0], 4 * (kl + entropy))


def test_kd_objective_weights_ce_and_both_teachers():
    model, x, y = _batch()
    natural, robust = (build_model("cnn-small").double().eval() for _ in range(2))
    cfg = TrainConfig(method="pgd_at", teacher_robust="r.pt", teacher_natural="n.pt", kd_temperature=2.0,
                      kd_weights=(0.3, 0.1, 0.6), threat=ThreatModel(steps=2)).resolved()
    out = training_loss(model, x, y, cfg, epoch=0, starts=Starts(1, torch.arange(len(y))),
                        teachers=Teachers(natural=natural, robust=robust))
    z = model(out.x_adv)

    def kd(teacher):
        return 4 * -(F.softmax(teacher(out.x_adv) / 2, 1) * F.log_softmax(z / 2, 1)).sum(1)

    expected = (0.3 * F.cross_entropy(z, y, reduction="none") + 0.1 * kd(natural) + 0.6 * kd(robust)).mean()
    torch.testing.assert_close(out.loss, expected)


# ---------------------------------------------------------------------------- SWA


def test_weight_average_is_the_mean_and_batchnorm_is_recomputed():
    models = [build_model("cnn-small").double() for _ in range(3)]
    for i, m in enumerate(models):
        torch.manual_seed(i)
        for p in m.parameters():
            p.data.normal_()
    average = WeightAverage(models[0])
    for m in models:
        average.update(m)
    for name, p in average.model.named_parameters():
        mean = sum(dict(m.named_parameters())[name] for m in models) / 3
        torch.testing.assert_close(p, mean)
    assert average.count == 3
    # update_bn: a cumulative average of the batch statistics of the first BatchNorm's input
    images = [torch.rand(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
              for k in range(3)]
    average.recompute_batchnorm(iter(images))
    bn = next(m for m in average.model.modules() if isinstance(m, nn.BatchNorm2d))
    first_conv = next(m for m in average.model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        means = [first_conv(x).mean(dim=(0, 2, 3)) for x in images]
    torch.testing.assert_close(bn.running_mean, sum(means) / 3)
    assert not average.model.training


# ---------------------------------------------------------------------------- AWP


def test_awp_perturbation_is_layer_wise_gamma_times_the_weight_norm():
    model, x, y = _batch()
    loss = F.cross_entropy(model(x), y)
    grads = dict(zip([k for k, p in model.named_parameters() if p.dim() >= 2],
                     torch.autograd.grad(loss, [p for p in model.parameters() if p.dim() >= 2], retain_graph=True)))
    v = awp.weight_perturbation(model, loss, 0.01)
    params = dict(model.named_parameters())
    assert set(v) == set(grads) and all(params[k].dim() >= 2 for k in v)  # no bias, no BatchNorm
    for name, d in v.items():
        torch.testing.assert_close(d.norm(), 0.01 * params[name].norm())
        cos = F.cosine_similarity(d.flatten(), grads[name].flatten(), dim=0)
        torch.testing.assert_close(cos, torch.tensor(1.0, dtype=torch.float64))
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    awp.shift_weights(model, v, +1.0)
    awp.shift_weights(model, v, -1.0)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p, before[k], rtol=0, atol=1e-15)


def test_awp_proxy_view_leaves_batchnorm_statistics_alone():
    model, x, y = _batch()
    model.train()
    stats = {k: b.clone() for k, b in model.named_buffers()}
    F.cross_entropy(awp.ProxyView(model)(x), y).backward()
    for k, b in model.named_buffers():
        assert torch.equal(b, stats[k]), k
    assert any(p.grad is not None for p in model.parameters())


def test_awp_update_takes_the_gradient_at_the_perturbed_weights(tmp_path):
    """One SGD step (no momentum, no weight decay) of PGD-AT-AWP by hand: w <- w - lr g(w + v),
    v from the gradient of the objective at w (BatchNorm in train mode, through buffer copies)."""
    cfg = TrainConfig(method="pgd_at", epochs=1, awp_gamma=0.01, momentum=0.0, weight_decay=0.0, augment=False,
                      amp=False, **{**FAST, "train_n": 32, "batch_size": 32})
    run = train(cfg, tmp_path / "awp", device="cpu")
    trained = load_checkpoint(run / "final.pt").state_dict
    # the same step by hand
    from atprobe.distributed import DistContext
    from atprobe.train import Trainer
    trainer = Trainer(cfg, tmp_path / "hand", DistContext(), torch.device("cpu"))
    model = trainer.model
    batch = next(iter(trainer._batches(0)))
    start = copy.deepcopy(model.state_dict())
    from atprobe.train import training_starts
    starts = training_starts(trainer.config, 0, batch.index)
    proxy = training_loss(awp.ProxyView(model), batch.x, batch.y, trainer.config, epoch=0, starts=starts,
                          attack_model=model, amp=False)
    v = awp.weight_perturbation(model, proxy.loss, 0.01)
    awp.shift_weights(model, v, +1.0)
    loss = F.cross_entropy(model(proxy.x_adv), batch.y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for (name, p), g in zip(model.named_parameters(), grads):
            p.copy_(start[name] - cfg.lr * g)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------- Co-teaching


def test_forget_rate_schedule_by_hand():
    """linspace(0, 0.2, 10) then 0.2; training epoch e takes entry e + 1 (the official loop)."""
    rates = objectives.forget_rates(0.2, 12, gradual=10)
    assert len(rates) == 12
    for e in range(9):
        assert rates[e] == pytest.approx(0.2 * (e + 1) / 9)
    assert rates[8:] == [pytest.approx(0.2)] * 4


def test_small_loss_selection_on_known_losses():
    losses = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7])
    assert objectives.small_loss_rows(losses, 0.4).tolist() == [1, 3, 2]  # int(0.6 * 5) = 3 kept
    assert objectives.small_loss_rows(losses, 0.0).tolist() == [1, 3, 2, 4, 0]
    assert objectives.small_loss_rows(losses, 0.99).tolist() == []


def test_coteach_step_trains_each_network_on_the_other_picks(tmp_path):
    """One step by hand: net A's update is the gradient of the mean adversarial CE over the rows
    with the smallest CE under net B, and the other way round (SGD, no momentum, no weight decay)."""
    from atprobe.distributed import DistContext
    from atprobe.train import EpochStats, Trainer, training_starts

    cfg = TrainConfig(method="pgd_at", epochs=12, coteach=True, forget_rate=0.5, forget_gradual=2, momentum=0.0,
                      weight_decay=0.0, augment=False, **{**FAST, "train_n": 32, "batch_size": 32})
    trainer = Trainer(cfg, tmp_path / "r", DistContext(), torch.device("cpu"))
    a, b = copy.deepcopy(trainer.model), copy.deepcopy(trainer.peer)
    batch = next(iter(trainer._batches(1)))  # epoch 1: the ramp is done, rate 0.5
    starts = training_starts(trainer.config, 1, batch.index)
    out_a = training_loss(a, batch.x, batch.y, trainer.config, epoch=1, starts=starts)
    out_b = training_loss(b, batch.x, batch.y, trainer.config, epoch=1, starts=starts)
    pick_b = torch.argsort(out_b.per_sample.detach())[:16]  # B's 16 smallest -> A trains on them
    pick_a = torch.argsort(out_a.per_sample.detach())[:16]
    grads_a = torch.autograd.grad(out_a.per_sample[pick_b].mean(), list(a.parameters()))
    grads_b = torch.autograd.grad(out_b.per_sample[pick_a].mean(), list(b.parameters()))
    trainer._step(batch, 1, EpochStats.zeros(torch.device("cpu")))
    for net, start, grads in ((trainer.model, a, grads_a), (trainer.peer, b, grads_b)):
        for p, p0, g in zip(net.parameters(), start.parameters(), grads):
            torch.testing.assert_close(p, p0 - cfg.lr * g, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- training runs


def _teachers(tmp_path):
    save_seeded_checkpoint(tmp_path / "robust.pt", 1)
    save_seeded_checkpoint(tmp_path / "natural.pt", 2)
    return {"teacher_robust": str(tmp_path / "robust.pt"), "teacher_natural": str(tmp_path / "natural.pt")}


RUNS = {
    "ls": dict(method="pgd_at", label_smoothing=0.2),
    "sat": dict(method="pgd_at", sat=True, sat_start=2),
    "sat-trades": dict(method="trades", sat=True, sat_start=2),
    "swa": dict(method="pgd_at", swa_start=2),
    "awp": dict(method="pgd_at", awp_gamma=0.01),
    "awp-trades": dict(method="trades", awp_gamma=0.005, awp_warmup=1),
    "kd-swa": dict(method="pgd_at", swa_start=2),
    "coteach": dict(method="pgd_at", coteach=True, forget_gradual=2),
}


@pytest.mark.slow  # two 3-epoch runs per method, ~6 s each
@pytest.mark.parametrize("name", list(RUNS))
def test_each_remedy_trains_and_resumes_bit_exactly(tmp_path, name):
    extra = {**RUNS[name], **(_teachers(tmp_path) if name == "kd-swa" else {})}
    cfg = TrainConfig(epochs=3, **FAST, **extra)
    full = train(cfg, tmp_path / "full", device="cpu")
    for f in ("config.json", "curves.csv", "best.pt", "final.pt", "last.pt"):
        assert (full / f).is_file(), f
    resumed = stopped_then_resumed(cfg, tmp_path / "cut", 2)
    written = ("final.pt", "last.pt", *(("final_peer.pt", "best_peer.pt") if name == "coteach" else ()))
    for f in written:
        a, b = load_checkpoint(full / f), load_checkpoint(resumed / f)
        for key, value in a.state_dict.items():
            assert torch.equal(value, b.state_dict[key]), (f, key)
    pd.testing.assert_frame_equal(pd.read_csv(full / "curves.csv").drop(columns="value"),
                                  pd.read_csv(resumed / "curves.csv").drop(columns="value"))
    curves = pd.read_csv(full / "curves.csv")
    assert curves["value"].notna().all()


@pytest.mark.slow
def test_swa_writes_the_averaged_model(tmp_path):
    """final.pt of a run with --swa-start 2 of 3 epochs is the mean of the epoch-2 and epoch-3 weights
    (BatchNorm recomputed), while last.pt keeps the trained model."""
    cfg = TrainConfig(epochs=3, save_every=1, method="pgd_at", swa_start=2, **FAST)
    run = train(cfg, tmp_path / "swa", device="cpu")
    plain = train(TrainConfig(epochs=3, save_every=1, method="pgd_at", **FAST), tmp_path / "plain", device="cpu")
    final, last = load_checkpoint(run / "final.pt"), load_checkpoint(run / "last.pt")
    e2, e3 = (load_checkpoint(plain / f"epoch_{k:04d}.pt").state_dict for k in (2, 3))
    model = build_model("cnn-small")
    for name, _ in model.named_parameters():
        torch.testing.assert_close(final.state_dict[name], (e2[name] + e3[name]) / 2)
        assert torch.equal(last.state_dict[name], e3[name])
    assert final.raw["extra"]["swa_models"] == 2
    bn = [k for k in final.state_dict if k.endswith("running_mean")]
    assert bn and not torch.equal(final.state_dict[bn[0]], e3[bn[0]])


@pytest.mark.parametrize("args,pattern", [
    (["--label-smoothing", "1.0"], "label-smoothing must be in [0, 1)"),
    (["--sat", "--te"], "does not combine with --te"),
    (["--sat", "--method", "standard"], "--sat works with pgd_at or trades"),
    (["--swa-start", "99", "--epochs", "3"], "swa-start must be an epoch number in [1, 3]"),
    (["--awp-gamma", "-1"], "awp-gamma must be"),
    (["--kd-weights", "1,x"], "is not three comma-separated numbers"),
])
def test_bad_remedy_options_are_one_line_errors(tmp_path, args, pattern):
    line = cli_error("train", "--out", tmp_path / "run", "--device", "cpu", *args)
    assert pattern in line, line
    assert not (tmp_path / "run").exists()


def test_kd_needs_both_teachers(tmp_path):
    save_seeded_checkpoint(tmp_path / "t.pt", 0)
    line = cli_error("train", "--out", tmp_path / "run", "--device", "cpu", "--teacher-robust", tmp_path / "t.pt")
    assert "needs both teachers" in line, line


def test_remedy_names_table2_rows():
    from atprobe.presets import preset_config
    from atprobe.runs import remedy

    teachers = {"teacher_robust": "r.pt", "teacher_natural": "n.pt"}
    names = {name: remedy(preset_config(name, **(teachers if name == "table2-kd-swa" else {})))
             for name in ("table2-pgd", "table2-pgd-ls", "table2-sat", "table2-kd-swa", "table2-coteach",
                          "table2-pgd-te", "awp-pgd", "awp-trades", "table2-standard")}
    assert names == {"table2-pgd": "PGD-AT", "table2-pgd-ls": "PGD-AT+LS", "table2-sat": "PGD-AT+SAT",
                     "table2-kd-swa": "PGD-AT+KD+SWA", "table2-coteach": "PGD-AT+Co-teaching",
                     "table2-pgd-te": "PGD-AT+TE", "awp-pgd": "PGD-AT+AWP", "awp-trades": "TRADES+AWP",
                     "table2-standard": "standard"}


def test_cli_trains_each_remedy_and_writes_the_peer(tmp_path):
    """The options as a user gives them: SAT with SWA, Co-teaching (its two networks), AWP, LS, KD."""
    from tests.conftest import run_cli

    base = ["train", "--arch", "mlp", "--train-n", "64", "--batch-size", "32", "--epochs", "2", "--eval-n", "32",
            "--train-eval-n", "32", "--steps", "1", "--eval-attack", "pgd2", "--device", "cpu", "-q"]
    run_cli(*base, "--sat", "--sat-start", "1", "--swa-start", "1", "--out", tmp_path / "sat")
    run_cli(*base, "--coteach", "--forget-rate", "0.25", "--out", tmp_path / "cot")
    run_cli(*base, "--awp-gamma", "0.005", "--label-smoothing", "0.1", "--out", tmp_path / "awp")
    run_cli(*base, "--method", "standard", "--out", tmp_path / "std")
    run_cli(*base, "--teacher-robust", tmp_path / "awp" / "best.pt", "--teacher-natural", tmp_path / "std" / "best.pt",
            "--kd-weights", "0.5,0.25,0.25", "--out", tmp_path / "kd")
    assert (tmp_path / "cot" / "final_peer.pt").is_file() and (tmp_path / "cot" / "best_peer.pt").is_file()
    assert load_checkpoint(tmp_path / "sat" / "final.pt").raw["extra"]["swa_models"] == 2
    meta = json.loads((tmp_path / "kd" / "curves.meta.json").read_text())
    assert meta["teacher_robust"]["sha256"] == load_checkpoint(tmp_path / "awp" / "best.pt").sha256
    config = json.loads((tmp_path / "kd" / "config.json").read_text())
    assert config["kd_weights"] == [0.5, 0.25, 0.25] and config["label_smoothing"] == 0.0
