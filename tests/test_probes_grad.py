"""The gradient probes (gradnorm, stability, gradcos) against plain loops and closed forms
(float64, CPU), and their commands end to end."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atprobe.attacks import PGDConfig, pgd
from atprobe.data import Split, load_dataset, symmetric_label_noise
from atprobe.directions import directions, model_parameters
from atprobe.errors import AtprobeError
from atprobe.models import build_model
from atprobe.pergrad import per_sample_grad_distance
from atprobe.probes import gradcos, gradnorm, stability
from atprobe.threat import ThreatModel
from tests.conftest import cli_rejects, keyed_start, randomize_bn, run_cli, save_seeded_checkpoint

STEPS = 2  # short attacks keep the file fast; the math does not depend on the step count


@pytest.fixture(autouse=True)
def _one_thread_and_restore_global_torch_state():
    """One thread: these small per-sample workloads are no faster on two, and on a shared
    2-core machine two threads contending with another job run several times slower.
    The CLI seeds the global RNG: undo that."""
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(build_model("cnn-small").double(), seed).eval()


def _split(n: int = 6, seed: int = 3, offset: int = 100) -> Split:
    """uint8 images with non-trivial original rows (``index``), which key the random starts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    true_y = y.clone()
    true_y[::3] = (y[::3] + 1) % 10  # every third sample "noisy"
    return Split(x=x, y=y, true_y=true_y, index=torch.arange(offset, offset + n))


def _images(split: Split) -> torch.Tensor:
    """The images as the probes see them: float32 in [0, 1], then the model's float64."""
    return split.x.float().div(255).double()


def _loop_norm(model: nn.Module, loss) -> float:
    """||d loss / d theta|| from one plain backward pass."""
    model.zero_grad()
    loss(model).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()


def _loop_grads(model: nn.Module, loss, n: int) -> torch.Tensor:
    """(n, P): ``loss(model, i).backward()`` per sample, flat .grad stacked."""
    rows = []
    for i in range(n):
        model.zero_grad()
        loss(model, i).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(rows)


# ---------------------------------------------------------------------------- gradnorm


def test_gradnorm_matches_single_sample_backward_passes():
    model, split = _cnn(), _split()
    config = gradnorm.GradNormConfig(beta=3.0, chunk_size=4, seed=7, threat=ThreatModel(steps=STEPS))
    table = gradnorm.per_sample(model, split, config)
    assert list(table.columns) == gradnorm.SAMPLE_COLUMNS and len(table) == len(split)
    assert table["sample"].tolist() == split.index.tolist()
    assert table["noisy"].tolist() == (split.y != split.true_y).tolist()

    x, y, ids = _images(split), split.y, split.index.tolist()
    ce_attack = PGDConfig(steps=STEPS, loss="ce", init="uniform")
    kl_attack = PGDConfig(steps=STEPS, loss="kl", init="normal")
    # x' against the real model from each sample's own start; constant for the gradient (Danskin)
    x_ce = pgd(model, x, y, ce_attack, delta_init=keyed_start(x, ce_attack, 7, ids))
    x_kl = pgd(model, x, None, kl_attack, delta_init=keyed_start(x, kl_attack, 7, ids))
    model.eval()
    for i in range(len(split)):
        xi, xci, xki, yi = x[i : i + 1], x_ce[i : i + 1], x_kl[i : i + 1], y[i : i + 1]

        def kl(m):
            log_p, log_q = F.log_softmax(m(xi), 1), F.log_softmax(m(xki), 1)
            return (log_p.exp() * (log_p - log_q)).sum()

        expected = {
            "grad_ce": _loop_norm(model, lambda m: F.cross_entropy(m(xi), yi)),
            "grad_adv_ce": _loop_norm(model, lambda m: F.cross_entropy(m(xci), yi)),
            "grad_r": _loop_norm(model, lambda m: F.cross_entropy(m(xci), yi) - F.cross_entropy(m(xi), yi)),
            "grad_kl": _loop_norm(model, kl),
        }
        expected["grad_beta_kl"] = 3.0 * expected["grad_kl"]
        row = table.iloc[i]
        for col, value in expected.items():
            assert row[col] == pytest.approx(value, rel=1e-10, abs=0), (i, col)
        assert row["ratio_r_ce"] == pytest.approx(expected["grad_r"] / expected["grad_ce"], rel=1e-10)
        assert row["ratio_beta_kl_ce"] == pytest.approx(expected["grad_beta_kl"] / expected["grad_ce"], rel=1e-10)
    assert (table["grad_kl"] > 0).all() and (table["grad_r"] > 0).all()


def _fake_samples() -> pd.DataFrame:
    rows = {
        "sample": [0, 1, 2, 3, 4],
        "label": [1, 2, 3, 4, 5],
        "true_label": [1, 0, 3, 0, 5],
        "noisy": [False, True, False, True, False],
        "grad_ce": [1.0, 2.0, 4.0, 0.5, 0.0],
        "grad_adv_ce": [1.5, 2.5, 4.5, 1.0, 0.2],
        "grad_r": [0.5, 1.0, 1.0, 1.0, 0.2],
        "grad_kl": [0.1, 0.2, 0.3, 0.4, 0.5],
    }
    df = pd.DataFrame(rows)
    df["grad_beta_kl"] = 6.0 * df["grad_kl"]
    df["ratio_r_ce"] = (df["grad_r"] / df["grad_ce"]).where(df["grad_ce"] > 0)
    df["ratio_beta_kl_ce"] = (df["grad_beta_kl"] / df["grad_ce"]).where(df["grad_ce"] > 0)
    return df[gradnorm.SAMPLE_COLUMNS]


def test_gradnorm_summary_mean_of_ratios_and_ratio_of_means():
    samples = _fake_samples()
    summary = gradnorm.summarize(samples, gradnorm.GradNormConfig(noisy_vs_clean=True))
    assert list(summary.columns) == gradnorm.SUMMARY_COLUMNS
    assert summary["group"].unique().tolist() == ["all", "clean", "noisy"]

    def value(group, quantity, statistic):
        rows = summary[(summary["group"] == group) & (summary["quantity"] == quantity)
                       & (summary["statistic"] == statistic)]
        assert len(rows) == 1
        return rows.iloc[0]

    # sample 4 has a zero clean gradient: no ratio, left out of the ratio statistics
    ratios = [0.5, 0.5, 0.25, 2.0]
    r = value("all", "ratio_r_ce", "mean")
    assert r["n"] == 4 and r["value"] == pytest.approx(sum(ratios) / 4, rel=1e-15)
    assert value("all", "ratio_r_ce", "median")["value"] == pytest.approx(0.5)
    assert value("all", "ratio_r_ce", "std")["value"] == pytest.approx(torch.tensor(ratios).std(correction=0).item())
    rom = value("all", "ratio_r_ce", "ratio_of_means")
    assert rom["n"] == 5 and rom["value"] == pytest.approx((3.7 / 5) / (7.5 / 5), rel=1e-15)
    assert value("all", "ratio_beta_kl_ce", "ratio_of_means")["value"] == pytest.approx(6 * 1.5 / 7.5, rel=1e-15)
    assert value("all", "grad_ce", "mean")["value"] == pytest.approx(1.5)
    # groups: clean = samples 0, 2, 4; noisy = samples 1, 3
    assert value("noisy", "grad_ce", "mean")["value"] == pytest.approx(1.25)
    assert value("noisy", "grad_ce", "mean")["n"] == 2
    assert value("noisy", "ratio_r_ce", "mean")["value"] == pytest.approx((0.5 + 2.0) / 2)
    assert value("clean", "ratio_r_ce", "ratio_of_means")["value"] == pytest.approx(1.7 / 5.0)
    # without the flag: one group; an empty group gives no rows
    assert gradnorm.summarize(samples)["group"].unique().tolist() == ["all"]
    only_clean = gradnorm.summarize(samples[~samples["noisy"]], gradnorm.GradNormConfig(noisy_vs_clean=True))
    assert only_clean["group"].unique().tolist() == ["all", "clean"]


def test_gradnorm_probe_matches_loop_norms_and_numpy_statistics():
    """The summary table against an independent computation: each sample's norms from plain
    backward passes, the statistics from numpy, per group."""
    model, split = _cnn(1), _split(n=6)
    beta, seed = 2.0, 5
    config = gradnorm.GradNormConfig(beta=beta, chunk_size=4, seed=seed, noisy_vs_clean=True,
                                     threat=ThreatModel(steps=1))
    table = gradnorm.probe(model, split, config).set_index(["group", "quantity", "statistic"])

    x, y, ids = _images(split), split.y, split.index.tolist()
    ce_attack = PGDConfig(steps=1, loss="ce", init="uniform")
    kl_attack = PGDConfig(steps=1, loss="kl", init="normal")
    x_ce = pgd(model, x, y, ce_attack, delta_init=keyed_start(x, ce_attack, seed, ids))
    x_kl = pgd(model, x, None, kl_attack, delta_init=keyed_start(x, kl_attack, seed, ids))
    model.eval()
    norms = {q: [] for q in ("grad_ce", "grad_adv_ce", "grad_r", "grad_kl")}
    for i in range(len(split)):
        xi, xci, xki, yi = x[i : i + 1], x_ce[i : i + 1], x_kl[i : i + 1], y[i : i + 1]

        def kl(m):
            log_p, log_q = F.log_softmax(m(xi), 1), F.log_softmax(m(xki), 1)
            return (log_p.exp() * (log_p - log_q)).sum()

        norms["grad_ce"].append(_loop_norm(model, lambda m: F.cross_entropy(m(xi), yi)))
        norms["grad_adv_ce"].append(_loop_norm(model, lambda m: F.cross_entropy(m(xci), yi)))
        norms["grad_r"].append(_loop_norm(model, lambda m: F.cross_entropy(m(xci), yi) - F.cross_entropy(m(xi), yi)))
        norms["grad_kl"].append(_loop_norm(model, kl))
    values = {q: np.array(v) for q, v in norms.items()}
    values["grad_beta_kl"] = beta * values["grad_kl"]
    values["ratio_r_ce"] = values["grad_r"] / values["grad_ce"]
    values["ratio_beta_kl_ce"] = values["grad_beta_kl"] / values["grad_ce"]

    noisy = (split.y != split.true_y).numpy()
    assert noisy.sum() == 2  # both groups have samples
    expected = {}
    for group, mask in (("all", np.ones_like(noisy)), ("clean", ~noisy), ("noisy", noisy)):
        for q, v in values.items():
            v = v[mask]
            for statistic, value in (("mean", v.mean()), ("std", v.std()), ("median", np.median(v))):
                expected[group, q, statistic] = (len(v), value)
        for q, num, den in (("ratio_r_ce", "grad_r", "grad_ce"), ("ratio_beta_kl_ce", "grad_beta_kl", "grad_ce")):
            ratio_of_means = values[num][mask].mean() / values[den][mask].mean()
            expected[group, q, "ratio_of_means"] = (int(mask.sum()), ratio_of_means)
    assert sorted(table.index) == sorted(expected)
    for key, (n, value) in expected.items():
        assert table.loc[key, "n"] == n, key
        assert table.loc[key, "value"] == pytest.approx(value, rel=1e-9), key


# ---------------------------------------------------------------------------- stability


def test_stability_lam_zero_gives_distance_zero_and_cosine_one():
    torch.manual_seed(2)
    model, split = randomize_bn(build_model("cnn-small"), 2).eval(), _split(n=5)  # float32: exact all the same
    config = stability.StabilityConfig(losses=("pgd_at", "trades", "R", "clean"), lambdas=(-0.1, 0.0, 0.1),
                                       chunk_size=3, seed=4, threat=ThreatModel(steps=STEPS))
    df = stability.probe(model, split, config)
    assert list(df.columns) == stability.COLUMNS and len(df) == 4 * 3
    assert df[["loss", "direction", "lam"]].values.tolist()[:4] == [
        ["pgd_at", 0, -0.1], ["pgd_at", 0, 0.0], ["pgd_at", 0, 0.1], ["trades", 0, -0.1]]
    zero, moved = df[df["lam"] == 0.0], df[df["lam"] != 0.0]
    assert (zero["dist_mean"] == 0).all() and (zero["dist_std"] == 0).all()
    assert (zero["cos_mean"] == 1).all() and (zero["cos_std"] == 0).all()
    assert (moved["dist_mean"] > 0).all() and (moved["cos_mean"] < 1).all()
    assert (df["n"] == 5).all()


@pytest.mark.parametrize("bias", [False, True])
def test_stability_of_a_linear_model_matches_the_closed_form(bias):
    """clean CE of f(x) = W x + b: grad_W = (softmax(Wx + b) - onehot(y)) x^T, grad_b = softmax - onehot."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10, bias=bias)).double().eval()
    split = _split(n=6)
    lambdas = (-0.5, 0.0, 0.25, 1.0)
    config = stability.StabilityConfig(losses=("clean",), lambdas=lambdas, directions=2, ignore="none", seed=5,
                                       chunk_size=4)
    df = stability.probe(model, split, config)

    x, y = _images(split).flatten(1), split.y
    theta = model_parameters(model)

    def closed_form(point):
        logits = x @ point["1.weight"].T + (point["1.bias"] if bias else 0)
        r = logits.softmax(dim=1) - F.one_hot(y, 10).double()
        return torch.cat([(r[:, :, None] * x[:, None, :]).flatten(1)] + ([r] if bias else []), dim=1)

    g0 = closed_form(theta)
    for k, d in enumerate(directions(model, 2, 5, "none", device="cpu")):
        for lam in lambdas:
            g = closed_form({name: theta[name] + lam * d[name] for name in theta})
            dist, cos = (g - g0).norm(dim=1), F.cosine_similarity(g, g0, dim=1)
            row = df[(df["direction"] == k) & (df["lam"] == lam)].iloc[0]
            assert row["dist_mean"] == pytest.approx(dist.mean().item(), rel=1e-10, abs=1e-14), (k, lam)
            assert row["dist_std"] == pytest.approx(dist.std(correction=0).item(), rel=1e-8, abs=1e-14)
            assert row["cos_mean"] == pytest.approx(cos.mean().item(), rel=0, abs=1e-12)
            assert row["cos_std"] == pytest.approx(cos.std(correction=0).item(), rel=1e-6, abs=1e-12)


@pytest.mark.slow
def test_at_initialization_the_pgd_at_gradient_is_less_stable_than_the_clean_one():
    """Fig. 4(a) at small scale: for a fresh MLP, a step of lam = +-0.05 along random
    filter-normalized directions changes the PGD-AT gradient clearly more than the clean one."""
    data = load_dataset("synthetic").train.subset(slice(0, 16))
    for seed in (0, 1):
        model = stability.init_model("mlp", 10, seed).eval()
        df = stability.probe(model, data, stability.StabilityConfig(
            losses=("pgd_at", "clean"), lambdas=(-0.05, 0.0, 0.05), seed=seed, chunk_size=16))
        moved = df[df["lam"] != 0].groupby("loss")[["dist_mean", "cos_mean"]].mean()
        assert moved.loc["pgd_at", "dist_mean"] > 1.15 * moved.loc["clean", "dist_mean"], moved
        assert moved.loc["pgd_at", "cos_mean"] < moved.loc["clean", "cos_mean"], moved


@pytest.mark.parametrize("text,expected", [
    ("-0.05:0.05:21", None),
    ("-1:1:5", (-1.0, -0.5, 0.0, 0.5, 1.0)),
    ("0:0.3:4", (0.0, 0.1, 0.2, 0.3)),
    ("-0.1, 0, 1/20", (-0.1, 0.0, 0.05)),
    ("0", (0.0,)),
])
def test_parse_lambdas(text, expected):
    values = stability.parse_lambdas(text)
    if expected is None:
        assert len(values) == 21 and values[10] == 0.0 and values[0] == -0.05 and values[-1] == 0.05
        assert values[1] == pytest.approx(-0.045, rel=1e-15)
    else:
        assert values == expected


@pytest.mark.parametrize("text,fragment", [
    ("0.1:0.2:3", "does not contain 0"),
    ("-0.05:0.05:20", "does not contain 0"),  # an even count skips 0
    ("a:b:3", "not a number"),
    ("-1:1", "START:STOP:NUM"),
    ("-1:1:x", "integer"),
    ("1:-1:3", "smaller"),
    ("0,,1", "empty entry"),
    ("0,0", "distinct"),
    ("", "empty"),
])
def test_parse_lambdas_rejects_nonsense(text, fragment):
    with pytest.raises(AtprobeError, match=fragment):
        stability.parse_lambdas(text)


def test_configs_reject_nonsense():
    with pytest.raises(AtprobeError, match="unknown loss"):
        stability.StabilityConfig(losses=("pgd_at", "bogus"))
    with pytest.raises(AtprobeError, match="contain 0"):
        stability.StabilityConfig(lambdas=(0.1, 0.2))
    with pytest.raises(AtprobeError, match="directions"):
        stability.StabilityConfig(directions=0)
    with pytest.raises(AtprobeError, match="8/255"):
        gradnorm.GradNormConfig(threat=ThreatModel(eps=8))  # ThreatModel says 8/255
    with pytest.raises(AtprobeError, match="beta"):
        gradcos.GradCosConfig(beta=-1)
    with pytest.raises(AtprobeError, match="unknown loss"):
        gradcos.GradCosConfig(loss="ce")


# ---------------------------------------------------------------------------- gradcos and buffers


def test_distance_uses_each_points_own_buffers():
    """pergrad's buffers_a/buffers_b: two BN models with different weights *and* running
    statistics, evaluated through one module, equal the real models' single-sample passes."""
    a, b = _cnn(0), _cnn(1)
    split = _split(n=4)
    x, y = _images(split), split.y

    def ce64(f, xx, yy):
        return F.cross_entropy(f(xx), yy, reduction="none")

    def loss(m, i):
        return F.cross_entropy(m(x[i : i + 1]), y[i : i + 1])

    ga, gb = _loop_grads(a, loss, 4), _loop_grads(b, loss, 4)
    dist, cos = per_sample_grad_distance(a, ce64, x, y, model_parameters(a), model_parameters(b), chunk_size=3,
                                         buffers_a=dict(a.named_buffers()), buffers_b=dict(b.named_buffers()))
    torch.testing.assert_close(dist, (ga - gb).norm(dim=1), rtol=1e-10, atol=0)
    torch.testing.assert_close(cos, F.cosine_similarity(ga, gb, dim=1), rtol=0, atol=1e-12)
    # with a's buffers at b's parameters the result is another (wrong) one: buffers matter here
    _, mixed = per_sample_grad_distance(a, ce64, x, y, model_parameters(a), model_parameters(b), chunk_size=3)
    assert not torch.allclose(mixed, cos, rtol=0, atol=1e-6)
    first = next(iter(b.named_buffers()))
    with pytest.raises(AtprobeError, match="missing"):
        per_sample_grad_distance(a, ce64, x, y, model_parameters(a), model_parameters(b), buffers_b=dict([first]))
    with pytest.raises(AtprobeError, match="not a buffer"):
        per_sample_grad_distance(a, ce64, x, y, model_parameters(a), model_parameters(b),
                                 buffers_b={**dict(b.named_buffers()), "nope": torch.zeros(1)})


def test_gradcos_matches_the_loop_with_each_checkpoints_own_adversarial_examples():
    models = [_cnn(0), _cnn(1), _cnn(2)]
    split = _split(n=4)
    config = gradcos.GradCosConfig(loss="pgd_at", chunk_size=3, seed=3, threat=ThreatModel(steps=STEPS))
    df = gradcos.probe(iter(models), split, config, names=["e1", "e2", "e3"], epochs=[1, 2, 3])
    assert list(df.columns) == gradcos.COLUMNS and len(df) == 2
    assert df[["pair", "checkpoint_a", "checkpoint_b"]].values.tolist() == [[0, "e1", "e2"], [1, "e2", "e3"]]
    assert df["epoch_a"].tolist() == [1, 2] and df["epoch_b"].tolist() == [2, 3]

    x, y, ids = _images(split), split.y, split.index.tolist()
    attack = PGDConfig(steps=STEPS)
    grads = []
    for m in models:
        x_adv = pgd(m, x, y, attack, delta_init=keyed_start(x, attack, 3, ids))  # against this model
        m.eval()
        grads.append(_loop_grads(m, lambda mm, i: F.cross_entropy(mm(x_adv[i : i + 1]), y[i : i + 1]), 4))
    for k in range(2):
        cos = F.cosine_similarity(grads[k], grads[k + 1], dim=1)
        dist = (grads[k] - grads[k + 1]).norm(dim=1)
        assert df["cos_mean"][k] == pytest.approx(cos.mean().item(), rel=0, abs=1e-12)
        assert df["cos_std"][k] == pytest.approx(cos.std(correction=0).item(), rel=1e-6, abs=1e-12)
        assert df["dist_mean"][k] == pytest.approx(dist.mean().item(), rel=1e-10)


def test_gradcos_of_a_model_with_itself_is_one():
    model = _cnn(0)
    split = _split(n=4)
    for loss in ("pgd_at", "trades"):
        df = gradcos.probe([model, copy.deepcopy(model)], split,
                           gradcos.GradCosConfig(loss=loss, chunk_size=4, threat=ThreatModel(steps=STEPS)))
        assert df["cos_mean"].tolist() == [1.0] and df["cos_std"].tolist() == [0.0], df
        assert df["dist_mean"].tolist() == [0.0]


def test_gradcos_rejects_one_model_and_different_architectures():
    split = _split(n=2)
    with pytest.raises(AtprobeError, match="at least two"):
        gradcos.probe([_cnn(0)], split, gradcos.GradCosConfig(loss="clean"))
    with pytest.raises(AtprobeError, match="different architectures"):
        gradcos.probe([_cnn(0), build_model("mlp").double()], split, gradcos.GradCosConfig(loss="clean"))


# ---------------------------------------------------------------------------- CLI



@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    noisy = symmetric_label_noise(load_dataset("synthetic").train.true_y, 0.5, 10, seed=0)
    run = root / "run"
    run.mkdir()
    # written out of order; final.pt repeats the last epoch (skipped)
    for seed, epoch in ((2, 10), (0, 1), (1, 2)):
        save_seeded_checkpoint(run / f"epoch_{epoch:04d}.pt", seed=seed, epoch=epoch, labels=noisy)
    save_seeded_checkpoint(run / "final.pt", seed=2, epoch=10, labels=noisy)
    save_seeded_checkpoint(run / "best.pt", seed=0, epoch=1, labels=noisy)
    run2 = root / "run2"
    run2.mkdir()
    save_seeded_checkpoint(run2 / "epoch_0003.pt", seed=0, epoch=3)
    save_seeded_checkpoint(run2 / "final.pt", seed=1, epoch=4)  # a new epoch: included
    single = root / "single"
    single.mkdir()
    save_seeded_checkpoint(single / "epoch_0001.pt", seed=0, epoch=1)
    return {
        "a": save_seeded_checkpoint(root / "a.pt", seed=0, epoch=5, labels=noisy),
        "b": save_seeded_checkpoint(root / "b.pt", seed=1, epoch=3, labels=noisy),
        "mlp": save_seeded_checkpoint(root / "mlp.pt", seed=0, arch="mlp", epoch=7),
        "run": run, "run2": run2, "single": single,
    }


def _meta(csv_path):
    return json.loads(csv_path.with_name(csv_path.stem + ".meta.json").read_text())


def test_gradnorm_cli_writes_csv_meta_and_is_deterministic(ckpts, tmp_path):
    outs = [tmp_path / f"g{i}.csv" for i in range(3)]
    for out, seed in zip(outs, (1, 1, 2)):
        args = ["gradnorm", ckpts["a"], "--n", "6", "--steps", "1", "--noisy-vs-clean", "--per-sample",
                "--device", "cpu", "--seed", seed, "-q", "-o", out]
        run_cli(*args)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    samples = [o.with_name(o.stem + ".samples.csv") for o in outs]
    assert samples[0].read_bytes() == samples[1].read_bytes()
    assert samples[0].read_bytes() != samples[2].read_bytes()  # the seed reaches the random starts

    df = pd.read_csv(outs[0])
    assert list(df.columns) == ["checkpoint", "epoch", "split", "labels", "bn_stats", *gradnorm.SUMMARY_COLUMNS]
    assert set(df["bn_stats"]) == {"recompute:1024"}  # an untrained checkpoint: fresh buffers, recomputed
    assert set(df["checkpoint"]) == {str(ckpts["a"])} and set(df["epoch"]) == {5}
    assert set(df["group"]) <= {"all", "clean", "noisy"} and "all" in set(df["group"])
    per = pd.read_csv(samples[0])
    assert list(per.columns) == ["checkpoint", "epoch", "split", "labels", "bn_stats", *gradnorm.SAMPLE_COLUMNS]
    assert per["sample"].tolist() == list(range(6))
    mean_ratio = df[(df["group"] == "all") & (df["quantity"] == "ratio_r_ce") & (df["statistic"] == "mean")]
    assert mean_ratio["value"].iloc[0] == pytest.approx(per["ratio_r_ce"].mean(), rel=1e-12)

    meta = _meta(outs[0])
    assert meta["command"][:3] == ["atprobe", "gradnorm", str(ckpts["a"])] and meta["command"][-1] == str(outs[0])
    assert meta["seed"] == 1 and meta["rows"] == len(df) and meta["columns"] == list(df.columns)
    assert len(meta["checkpoints"]) == 1 and len(meta["checkpoints"][0]["sha256"]) == 64
    assert meta["config"]["n"] == 6 and meta["config"]["threat"]["steps"] == 1
    assert meta["config"]["noisy_vs_clean"] is True
    assert meta["config"]["bn_stats"] == "auto" and meta["config"]["bn_stats_resolved"] == ["recompute:1024"]
    assert _meta(samples[0])["rows"] == 6


def test_stability_cli_init_and_checkpoint(ckpts, tmp_path):
    outs = [tmp_path / f"s{i}.csv" for i in range(2)]
    for out in outs:
        run_cli("stability", "--init", "cnn-small", "--seed", "3", "--n", "4", "--losses", "pgd_at,clean",
                "--lambdas=-0.02,0,0.02", "--steps", "1", "--device", "cpu", "-q", "-o", out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    df = pd.read_csv(outs[0])
    assert list(df.columns) == ["checkpoint", "split", "labels", "bn_stats", *stability.COLUMNS]
    assert set(df["bn_stats"]) == {"recompute:1024"}  # --init: always recomputed by default
    assert len(df) == 6 and set(df["checkpoint"]) == {"init:cnn-small"}
    zero = df[df["lam"] == 0]
    assert (zero["dist_mean"] == 0).all() and (zero["cos_mean"] == 1).all()
    meta = _meta(outs[0])
    assert meta["checkpoints"] == [] and meta["init"]["arch"] == "cnn-small" and meta["init"]["seed"] == 3
    assert meta["config"]["lambdas"] == [-0.02, 0.0, 0.02] and meta["config"]["dataset"] == "synthetic"

    out = tmp_path / "ck.csv"
    run_cli("stability", ckpts["a"], "--n", "3", "--losses", "clean", "--lambdas", "-0.1:0.1:3",
            "--directions", "2", "--device", "cpu", "-q", "-o", out)
    df = pd.read_csv(out)
    assert df[["direction", "lam"]].values.tolist() == [[0, -0.1], [0, 0.0], [0, 0.1], [1, -0.1], [1, 0.0], [1, 0.1]]
    assert set(df["checkpoint"]) == {str(ckpts["a"])} and set(df["labels"]) == {"trained"}
    assert _meta(out)["checkpoints"][0]["arch"] == "cnn-small"


def test_gradcos_cli_orders_by_epoch(ckpts, tmp_path):
    outs = [tmp_path / f"c{i}.csv" for i in range(2)]
    for out in outs:
        run_cli("gradcos", ckpts["run"], "--n", "3", "--steps", "1", "--bn-stats", "recompute:64", "--device", "cpu",
                "-q", "-o", out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    df = pd.read_csv(outs[0])
    assert set(df["bn_stats_a"]) == set(df["bn_stats_b"]) == {"recompute:64"}
    assert list(df.columns) == ["pair", "checkpoint_a", "checkpoint_b", "epoch_a", "epoch_b", "split", "labels",
                                "bn_stats_a", "bn_stats_b",
                                "loss", "n", "cos_mean", "cos_std", "dist_mean", "dist_std"]
    # epoch_0001, epoch_0002, epoch_0010; final.pt repeats epoch 10 and best.pt is not an epoch file
    assert df[["epoch_a", "epoch_b"]].values.tolist() == [[1, 2], [2, 10]]
    assert [p.rsplit("/", 1)[-1] for p in df["checkpoint_b"]] == ["epoch_0002.pt", "epoch_0010.pt"]
    assert [c["path"].rsplit("/", 1)[-1] for c in _meta(outs[0])["checkpoints"]] == [
        "epoch_0001.pt", "epoch_0002.pt", "epoch_0010.pt"]
    assert (df["cos_mean"] < 1).all() and (df["loss"] == "pgd_at").all()

    out = tmp_path / "run2.csv"
    run_cli("gradcos", ckpts["run2"], "--loss", "clean", "--n", "3", "--device", "cpu", "-q", "-o", out)
    df = pd.read_csv(out)
    assert df[["epoch_a", "epoch_b"]].values.tolist() == [[3, 4]]
    assert df["checkpoint_b"].iloc[0].endswith("final.pt")

    # explicit files are sorted by epoch too; a checkpoint with itself gives exactly 1
    out = tmp_path / "files.csv"
    run_cli("gradcos", ckpts["a"], ckpts["b"], ckpts["a"], "--loss", "clean", "--n", "3", "--device", "cpu",
            "-q", "-o", out)
    df = pd.read_csv(out)
    assert df[["epoch_a", "epoch_b"]].values.tolist() == [[3, 5], [5, 5]]
    assert df["cos_mean"].iloc[1] == 1.0 and df["dist_mean"].iloc[1] == 0.0


def _bad_cases(ckpts):
    """name -> (argv, a fragment the error line must contain)."""
    a = ckpts["a"]
    return {
        "gradnorm n too large": (["gradnorm", a, "--n", str(10**6)], "larger than the split"),
        "gradnorm n 0": (["gradnorm", a, "--n", "0"], "--n"),
        "gradnorm noisy on test": (["gradnorm", a, "--split", "test", "--noisy-vs-clean"], "--noisy-vs-clean"),
        "gradnorm eps 8": (["gradnorm", a, "--eps", "8"], "8/255"),
        "gradnorm other arch": (["gradnorm", a, "--arch", "mlp"], "not a mlp"),
        "stability unknown loss": (["stability", a, "--losses", "pgd_at,bogus"], "unknown loss"),
        "stability lambdas without 0": (["stability", a, "--lambdas", "0.01:0.05:5"], "does not contain 0"),
        "stability malformed lambdas": (["stability", a, "--lambdas", "-1:1"], "START:STOP:NUM"),
        "stability lambdas not numbers": (["stability", a, "--lambdas", "a,b"], "not a number"),
        "stability both": (["stability", a, "--init", "cnn-small"], "either"),
        "stability neither": (["stability"], "either"),
        "stability init bogus arch": (["stability", "--init", "resnet-99"], "unknown architecture"),
        "stability init classes": (["stability", "--init", "mlp", "--num-classes", "5"], "does not match"),
        "stability directions 0": (["stability", a, "--directions", "0"], "directions"),
        "stability init with --arch": (["stability", "--init", "mlp", "--arch", "mlp"], "--init ARCH"),
        "stability other arch": (["stability", a, "--arch", "resnet18"], "not a resnet18"),
        "gradcos one checkpoint": (["gradcos", a], "at least two"),
        "gradcos different archs": (["gradcos", a, ckpts["mlp"]], "different architectures"),
        "gradcos run with one": (["gradcos", ckpts["single"]], "at least two"),
        "gradcos unknown loss": (["gradcos", a, ckpts["b"], "--loss", "bogus"], "bogus"),
        "gradcos missing file": (["gradcos", a, a.parent / "nope.pt"], "not found"),
    }


BAD_CASES = [
    "gradnorm n too large", "gradnorm n 0", "gradnorm noisy on test", "gradnorm eps 8", "gradnorm other arch",
    "stability unknown loss", "stability lambdas without 0", "stability malformed lambdas",
    "stability lambdas not numbers", "stability both", "stability neither", "stability init bogus arch",
    "stability init classes", "stability directions 0", "stability init with --arch", "stability other arch",
    "gradcos one checkpoint", "gradcos different archs", "gradcos run with one",
    "gradcos unknown loss", "gradcos missing file",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_exit_2(case, ckpts, tmp_path):
    args, fragment = _bad_cases(ckpts)[case]
    cli_rejects(fragment, *args, "--device", "cpu", "-q", output=tmp_path / "out" / "p.csv")


def test_help_lists_the_commands():
    top = run_cli("--help").output
    for name in ("gradnorm", "stability", "gradcos"):
        assert name in top
        sub = run_cli(name, "--help").output
        assert f"Usage: atprobe {name}" in sub and "Examples:" in sub
        for option in ("--n", "--split", "--labels", "--seed", "--device", "--batch-size", "--chunk-size",
                       "--quiet", "--output", "--eps"):
            assert option in sub, (name, option)
