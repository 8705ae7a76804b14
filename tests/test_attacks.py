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


# ---------------------------------------------------------------------------- frozen copy
# ``pgd`` as it was before the in-place step and the precomputed L-inf bounds (issue 14),
# copied verbatim: the rewrite must give the same floats, not merely the same projection.


def _frozen_project(delta, x, norm, eps):
    from atprobe.attacks import _per_sample_l2

    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        scale = (eps / _per_sample_l2(delta).clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * scale
    return (x + delta).clamp(0.0, 1.0) - x


def _frozen_random_start(x, config, starts, restart=0):
    from atprobe.attacks import _per_sample_l2, _same_format
    from atprobe.starts import keyed_normal, keyed_uniform

    if config.init == "zero" or config.eps == 0:
        return torch.zeros_like(x)
    keys = starts.keys(restart).to(x.device)
    shape = tuple(x.shape[1:])
    if config.init == "normal":
        delta = 0.001 * keyed_normal(keys, shape, x.dtype)
    elif config.norm == "linf":
        delta = (keyed_uniform(keys, shape, x.dtype) * 2 - 1) * config.eps
    else:
        direction = keyed_normal(keys, shape, x.dtype)
        radius = keyed_uniform(keys ^ 0x5EED, (1,), x.dtype).view(-1, *([1] * (x.dim() - 1))) * config.eps
        delta = direction / _per_sample_l2(direction).clamp_min(1e-12) * radius
    return _frozen_project(_same_format(delta, x), x, config.norm, config.eps)


def _frozen_pgd(model, x, y, config, *, starts=None, loss_fn=None, delta_init=None):
    from atprobe.attacks import _per_sample_l2
    from atprobe.objectives import full_precision
    from atprobe.runtime import frozen_parameters, module_mode

    def ascent(delta, grad):
        if config.norm == "linf":
            return delta + config.alpha * grad.sign()
        return delta + config.alpha * grad / _per_sample_l2(grad).clamp_min(1e-12)

    x = x.detach()
    starts = starts if starts is not None else Starts(0, torch.arange(x.shape[0]))
    mode = module_mode(model, False) if config.eval_mode else torch.enable_grad()
    with mode, frozen_parameters(model):
        if loss_fn is None:
            natural = None
            if config.loss == "kl":
                with torch.no_grad():
                    natural = model(x)
            loss_fn = attack_loss(config.loss, y, natural)
        best_x = best_loss = None
        for restart in range(config.restarts):
            if restart == 0 and delta_init is not None:
                delta = _frozen_project(delta_init.detach().to(x), x, config.norm, config.eps)
            else:
                delta = _frozen_random_start(x, config, starts, restart)
            for _ in range(config.steps):
                delta.requires_grad_(True)
                loss = loss_fn(model(x + delta)).sum()
                (grad,) = torch.autograd.grad(loss, delta)
                delta = _frozen_project(ascent(delta.detach(), grad), x, config.norm, config.eps)
            x_adv = (x + delta).detach()
            if config.restarts == 1:
                return x_adv
            with torch.no_grad():
                final = full_precision(loss_fn(model(x_adv)))
            if best_x is None:
                best_x, best_loss = x_adv, final
            else:
                better = final > best_loss
                best_x = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best_x)
                best_loss = torch.maximum(best_loss, final)
        return best_x


def _edgy_images(n, dtype, seed=0, low=0.0, high=1.0):
    """Images with exact 0s and 1s, pixels within eps of the box and a few exact grey
    levels, so every branch of the clamps is taken."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64)
    x = torch.where(x < 0.1, torch.zeros_like(x), x)
    x = torch.where(x > 0.9, torch.ones_like(x), x)
    x = torch.where((x > 0.45) & (x < 0.5), torch.full_like(x, 8 / 255), x)
    x = torch.where((x > 0.5) & (x < 0.55), torch.full_like(x, 1 - 4 / 255), x)
    return (low + (high - low) * x).to(dtype)


_FROZEN_CONFIGS = [
    dict(norm="linf", eps=8 / 255, alpha=2 / 255, steps=5, loss="ce"),
    dict(norm="linf", eps=8 / 255, alpha=2 / 255, steps=4, loss="cw", restarts=3),
    dict(norm="linf", eps=8 / 255, alpha=2 / 255, steps=4, loss="kl", init="normal"),
    dict(norm="linf", eps=16 / 255, alpha=10 / 255, steps=1, loss="ce"),  # FGSM-RS-like: big step, clamps bite
    dict(norm="linf", eps=0.3, alpha=0.3, steps=1, loss="ce", init="zero"),  # FGSM
    dict(norm="linf", eps=8 / 255, alpha=2 / 255, steps=0, loss="ce"),
    dict(norm="linf", eps=0.0, alpha=2 / 255, steps=2, loss="ce"),
    dict(norm="l2", eps=0.5, alpha=0.125, steps=5, loss="ce"),
    dict(norm="l2", eps=0.5, alpha=0.2, steps=4, loss="cw", restarts=2),
    dict(norm="l2", eps=0.5, alpha=0.125, steps=3, loss="kl", init="normal"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kwargs", _FROZEN_CONFIGS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_pgd_is_bit_identical_to_the_frozen_loop(kwargs, dtype):
    model = tiny_net(dtype)
    x = _edgy_images(10, dtype)
    y = torch.randint(0, 5, (10,), generator=torch.Generator().manual_seed(2))
    cfg = PGDConfig(**kwargs)
    starts = Starts(7, torch.arange(30, 40))
    new = pgd(model, x, y, cfg, starts=starts)
    old = _frozen_pgd(model, x, y, cfg, starts=starts)
    assert torch.equal(new, old)
    assert new.stride() == old.stride() and new.dtype == x.dtype and not new.requires_grad


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_bit_identical_with_delta_init_custom_loss_train_mode(norm, eps):
    """delta_init (restart 0, then keyed restarts), a custom loss_fn and eval_mode=False
    through a BatchNorm model (train-mode statistics, running averages updated alike)."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),  # noqa: E731
                                 nn.Linear(4 * 6 * 6, 5)).double()
    a = make()
    b = make()
    b.load_state_dict(a.state_dict())
    x = _edgy_images(6, torch.float64, seed=3)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    start = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * eps
    cfg = PGDConfig(norm=norm, eps=eps, alpha=eps / 4, steps=3, restarts=2, eval_mode=False)
    loss_fn = lambda z: F.cross_entropy(z, y, reduction="none") + 0.5 * z.pow(2).mean(1)  # noqa: E731
    new = pgd(a.train(), x, y, cfg, starts=_starts(1, 6), loss_fn=loss_fn, delta_init=start)
    old = _frozen_pgd(b.train(), x, y, cfg, starts=_starts(1, 6), loss_fn=loss_fn, delta_init=start)
    assert torch.equal(new, old)
    assert torch.equal(a[1].running_mean, b[1].running_mean) and torch.equal(a[1].running_var, b[1].running_var)


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_bit_identical_channels_last_cnn_float32(norm, eps):
    """cnn-small in channels_last, float32 (the training and benchmark path): the same
    floats and the same memory format as the frozen loop."""
    from atprobe.models import build_model
    from tests.conftest import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(build_model("cnn-small")).eval().to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(8, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), generator=g)
    cfg = PGDConfig(norm=norm, eps=eps, alpha=eps / 4, steps=3)
    new = pgd(model, x, y, cfg, starts=_starts(2, 8))
    old = _frozen_pgd(model, x, y, cfg, starts=_starts(2, 8))
    assert torch.equal(new, old)
    assert new.is_contiguous(memory_format=torch.channels_last)


def test_linf_bounds_are_the_nested_clamps_even_off_the_box():
    """The identity behind the precomputed L-inf bounds, on a million pixels, also for
    pixels outside [0, 1] (where the ball and the box do not meet) and for steps far
    outside the ball. Control: clamping x + delta itself (keeping x_adv instead of delta)
    is the same projection but not the same floats, which is why pgd keeps delta."""
    from atprobe.attacks import _linf_bounds, _project_

    for dtype in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(6)
        x = torch.cat([_edgy_images(16, dtype, seed=6, low=-0.1, high=1.1).flatten(),
                       torch.rand(1_000_000, generator=g, dtype=dtype)]).view(-1, 1, 1, 1)
        eps = 8 / 255
        d = torch.randn(x.shape, generator=g, dtype=dtype) * 0.05
        expected = _frozen_project(d, x, "linf", eps)
        bounds = _linf_bounds(x, eps)
        assert torch.equal(_project_(d.clone(), x, "linf", eps, bounds), expected)
        if dtype == torch.float32:  # one sign step from the feasible `expected`
            step = 2 / 255 * torch.randn(x.shape, generator=g, dtype=dtype).sign()
            via_delta = x + _frozen_project(expected + step, x, "linf", eps)
            assert not torch.equal(torch.clamp((x + expected) + step, *bounds), via_delta)
    x = _edgy_images(16, torch.float32, seed=6, low=-0.1, high=1.1)
    cfg = PGDConfig(eps=8 / 255)
    assert torch.equal(random_start(x, cfg, _starts(0, 16)), _frozen_random_start(x, cfg, _starts(0, 16)))


def test_pgd_model_may_work_in_place_on_its_input(tiny_batch):
    """The model still gets the non-leaf x + delta (the leaf is delta), so in-place
    preprocessing inside a model keeps working, with the same floats as before."""
    x, y = tiny_batch
    net = tiny_net()

    class InPlace(nn.Module):
        def forward(self, t):
            return net(t.sub_(0.5).mul_(2.0))

    cfg = PGDConfig(steps=3)
    new = pgd(InPlace(), x, y, cfg, starts=_starts(0, len(y)))
    assert torch.equal(new, _frozen_pgd(InPlace(), x, y, cfg, starts=_starts(0, len(y))))
