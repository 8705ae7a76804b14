"""PGD/FGSM: feasibility, ascent, determinism, restarts, modes, losses against formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atprobe.attacks import PGDConfig, fgsm_config, parse_attack, pgd, project, random_start
from atprobe.errors import AtprobeError
from atprobe.objectives import attack_loss, cw_margin
from atprobe.starts import Starts
from atprobe.threat import ThreatModel
from tests.conftest import tiny_net


def _starts(seed, n, offset=0):
    return Starts(seed, torch.arange(offset, offset + n))


def _ce(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
def test_pgd_stays_feasible_and_increases_loss(norm, eps, loss, tiny_batch):
    x, y = tiny_batch
    model = tiny_net()
    cfg = PGDConfig(norm=norm, eps=eps, alpha=eps / 4, steps=10, loss=loss)
    x_adv = pgd(model, x, y, cfg, starts=_starts(0, len(y)))
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-12
    else:
        assert delta.norm(dim=1).max() <= eps + 1e-9
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        objective = attack_loss(loss, y, model(x))
        assert objective(model(x_adv)).sum() > objective(model(x)).sum()


def test_same_seed_same_examples_different_seed_different(tiny_batch):
    x, y = tiny_batch
    model = tiny_net()
    cfg = PGDConfig(steps=3)
    a = pgd(model, x, y, cfg, starts=_starts(5, len(y)))
    b = pgd(model, x, y, cfg, starts=_starts(5, len(y)))
    c = pgd(model, x, y, cfg, starts=_starts(6, len(y)))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_pgd_matches_textbook_loop(tiny_batch):
    """Same start, same steps: equal to a plain loop written from the definition."""
    x, y = tiny_batch
    model = tiny_net()
    eps, alpha, steps = 8 / 255, 2 / 255, 5
    start = (torch.rand(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype) * 2 - 1) * eps
    ours = pgd(model, x, y, PGDConfig(eps=eps, alpha=alpha, steps=steps), delta_init=start)
    delta = (x + start).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (g,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * g.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    torch.testing.assert_close(ours, x + delta, rtol=0, atol=1e-12)


def test_fgsm_on_linear_model_is_hand_computable():
    """For logits W x, CE's input gradient is W^T (softmax - onehot): FGSM is x + eps sign of it."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 3, bias=False).double()
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.full((2, 1, 2, 3), 0.5, dtype=torch.float64)
    y = torch.tensor([0, 2])
    eps = 0.1
    p = F.softmax(model(x), dim=1)
    grad = (p - F.one_hot(y, 3).double()) @ lin.weight
    expected = (x.flatten(1) + eps * grad.sign()).view_as(x)
    torch.testing.assert_close(pgd(model, x, y, fgsm_config(ThreatModel(eps=eps))), expected)


def test_l2_projection_and_box():
    x = torch.full((3, 1, 4, 4), 0.5, dtype=torch.float64)
    delta = torch.randn(3, 1, 4, 4, dtype=torch.float64) * 10
    out = project(delta, x, "l2", 0.3)
    assert torch.all(out.flatten(1).norm(dim=1) <= 0.3 + 1e-12)
    assert torch.all((x + out) >= 0) and torch.all((x + out) <= 1)
    small = torch.full_like(x, 0.001)
    torch.testing.assert_close(project(small, x, "l2", 0.3), small)


def test_restarts_keep_the_worst_case(tiny_batch):
    x, y = tiny_batch
    model = tiny_net()
    single = pgd(model, x, y, PGDConfig(steps=2, restarts=1), starts=_starts(0, len(y)))
    multi = pgd(model, x, y, PGDConfig(steps=2, restarts=4), starts=_starts(0, len(y)))
    with torch.no_grad():
        assert torch.all(_ce(model, multi, y) >= _ce(model, single, y) - 1e-12)
        assert _ce(model, multi, y).sum() > _ce(model, single, y).sum()


def test_attack_restores_modes_and_batchnorm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    model.train()
    model[1].eval()  # a deliberately mixed state must survive
    stats = model[1].running_mean.clone()
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    pgd(model, x, y, PGDConfig(steps=2))
    assert model.training and model[0].training and not model[1].training
    assert torch.equal(model[1].running_mean, stats)
    assert all(p.requires_grad for p in model.parameters())


def test_cw_margin_and_kl_formulas():
    z = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    torch.testing.assert_close(cw_margin(z, y), torch.tensor([-1.0, 3.0], dtype=torch.float64))
    nat = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    p, q = F.softmax(nat, 1), F.softmax(z, 1)
    expected = (p * (p.log() - q.log())).sum(1)
    torch.testing.assert_close(attack_loss("kl", natural_logits=nat)(z).double(), expected)


def test_zero_steps_zero_init_is_identity(tiny_batch):
    x, y = tiny_batch
    out = pgd(tiny_net(), x, y, PGDConfig(steps=0, init="zero"))
    assert torch.equal(out, x)


def test_parse_attack_names():
    a = parse_attack("pgd10", ThreatModel(eps=8 / 255))
    assert a.config.steps == 10 and a.config.loss == "ce" and math.isclose(a.config.alpha, 2 / 255)
    b = parse_attack("cw100x3", ThreatModel(norm="l2", eps=0.5, alpha=0.1))
    assert b.config.loss == "cw" and b.config.restarts == 3 and b.config.norm == "l2" and b.config.alpha == 0.1
    assert parse_attack("natural").config is None
    assert parse_attack("fgsm_rs", ThreatModel(eps=0.1)).config.alpha == pytest.approx(0.125)
    bare = parse_attack("pgd", ThreatModel(steps=7, restarts=2))  # the threat model's steps and restarts
    assert bare.config.steps == 7 and bare.config.restarts == 2
    for bad in ["pgd0", "apgd10", "pgd10x0"]:
        with pytest.raises(AtprobeError):
            parse_attack(bad)


@pytest.mark.parametrize("kwargs", [dict(eps=-0.1), dict(eps=8.0), dict(norm="l1"), dict(steps=-1),
                                    dict(loss="mse"), dict(restarts=0), dict(alpha=float("nan"))])
def test_config_validation(kwargs):
    with pytest.raises(AtprobeError):
        PGDConfig(**kwargs)


def test_threat_model_defaults_are_resolved_at_once():
    """eps per norm and alpha = eps/4, applied in one place: never an unresolved value."""
    assert ThreatModel().eps == 8 / 255 and ThreatModel().alpha == 2 / 255
    assert ThreatModel(norm="l2").eps == 128 / 255 and ThreatModel(norm="l2").alpha == 32 / 255
    assert ThreatModel(eps=16 / 255).alpha == 4 / 255
    assert ThreatModel(eps=16 / 255, alpha=1 / 255).alpha == 1 / 255
    assert ThreatModel().attack("ce").init == "uniform" and ThreatModel().attack("kl").init == "normal"
    assert ThreatModel(start="zero").attack("kl").init == "zero"
    for bad in [dict(eps=8.0), dict(norm="l1"), dict(steps=-1), dict(restarts=0), dict(alpha=float("nan")),
                dict(start="gauss")]:
        with pytest.raises(AtprobeError):
            ThreatModel(**bad)


@pytest.mark.parametrize("init,norm", [("uniform", "linf"), ("uniform", "l2"), ("normal", "linf")])
def test_random_starts_are_keyed_per_sample(init, norm):
    """A sample's start is a function of (seed, its index, restart) alone: the same in any
    batch, at any position, in any memory format; another seed, index or restart differs."""
    x = torch.rand(6, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg = PGDConfig(norm=norm, eps=0.3 if norm == "l2" else 8 / 255, init=init)
    ids = torch.tensor([40, 7, 3, 19, 2, 11])
    full = random_start(x, cfg, Starts(3, ids))
    perm = torch.tensor([4, 0, 5, 2])
    part = random_start(x[perm].contiguous(memory_format=torch.channels_last), cfg, Starts(3, ids[perm]))
    assert torch.equal(part, full[perm])
    assert not torch.equal(random_start(x, cfg, Starts(4, ids)), full)
    assert not torch.equal(random_start(x, cfg, Starts(3, ids), restart=1), full)
    assert not torch.equal(full[0], full[1])
    flat = (full / (cfg.eps if init == "uniform" else 0.001)).flatten()
    if init == "uniform" and norm == "linf":  # U(-eps, eps) before the box clamp (x away from 0, 1 mostly)
        inside = ((x + full) > 0).flatten() & ((x + full) < 1).flatten()
        assert flat[inside].abs().max() <= 1 and abs(float(flat[inside].mean())) < 0.1
    if init == "normal":
        assert abs(float(flat.std()) - 1) < 0.1


def test_keyed_draws_match_their_distribution():
    """The keyed uniform and normal draws are U(0, 1) and N(0, 1) (Kolmogorov-Smirnov)."""
    from scipy import stats

    from atprobe.starts import keyed_normal, keyed_uniform, sample_keys

    keys = sample_keys(0, torch.arange(64))
    u = keyed_uniform(keys, (500,), torch.float64).flatten().numpy()
    z = keyed_normal(keys, (500,), torch.float64).flatten().numpy()
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # Rows are not shifted copies of each other: neighbouring samples are uncorrelated.
    a = keyed_uniform(keys, (500,), torch.float64)
    assert abs(float(torch.corrcoef(a[:2])[0, 1])) < 0.2


def test_pgd_does_not_depend_on_the_batch(tiny_batch):
    """The same sample (same index) gives the same example alone or inside any batch."""
    x, y = tiny_batch
    model = tiny_net()
    ids = torch.arange(100, 100 + len(y))
    whole = pgd(model, x, y, PGDConfig(steps=3, restarts=2), starts=Starts(1, ids))
    for i in range(len(y)):
        one = pgd(model, x[i:i + 1], y[i:i + 1], PGDConfig(steps=3, restarts=2), starts=Starts(1, ids[i:i + 1]))
        torch.testing.assert_close(one, whole[i:i + 1], rtol=0, atol=1e-12)
