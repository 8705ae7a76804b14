"""``curvature``: the input-Hessian power iteration against dense Hessians, closed forms and a
per-sample loop (float64, CPU), and ``atprobe curvature`` end to end."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atprobe.attacks import pgd
from atprobe.data import Split
from atprobe.errors import AtprobeError
from atprobe.models import build_model
from atprobe.probes import curvature
from atprobe.probes.curvature import CurvatureConfig, input_hessian_eigenvalues
from atprobe.threat import ThreatModel
from tests.conftest import cli_rejects, keyed_start, run_cli


@pytest.fixture(autouse=True)
def _one_thread_and_restore_global_torch_state():
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def _tiny_conv(act: type[nn.Module], seed: int = 0) -> nn.Module:
    """3x4x4 images -> conv 4 -> act -> linear 5, float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), act(), nn.Flatten(), nn.Linear(64, 5)).double().eval()


def _dense_dominant(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The eigenvalue of largest magnitude of the dense input Hessian of one sample's CE, and all eigenvalues."""
    h = torch.autograd.functional.hessian(lambda xi: F.cross_entropy(model(xi[None]), y[None]), x)
    ev = torch.linalg.eigvalsh(h.reshape(x.numel(), x.numel()))
    return float(ev[ev.abs().argmax()]), ev


@pytest.mark.parametrize("act", [nn.Tanh, nn.Softplus, nn.ReLU])
def test_dominant_eigenvalue_matches_the_dense_input_hessian(act):
    model = _tiny_conv(act)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (5,), generator=g)
    eig, iters, conv = input_hessian_eigenvalues(model, x, y, iterations=2000, tol=1e-13, seed=2)
    assert conv.all() and (iters < 2000).all() and (iters > 1).all()
    for i in range(5):
        expected, ev = _dense_dominant(model, x[i], y[i])
        assert eig[i].item() == pytest.approx(expected, rel=1e-8), (act.__name__, i)
        if act is nn.ReLU:  # J^T (diag p - p p^T) J: positive semi-definite
            assert ev.min() > -1e-12 and eig[i] > 0


class _Quadratic(nn.Module):
    """Logits (s, 0) with s = a ||x - c||^2: for label 0, CE = log(1 + exp(-s)) and
    H = 4 a^2 q (1 - q) (x - c)(x - c)^T - 2 a q I with q = sigmoid(-s)."""

    def __init__(self, a: float, c: torch.Tensor) -> None:
        super().__init__()
        self.a = a
        self.register_buffer("c", c)

    def forward(self, x):
        s = self.a * (x - self.c).pow(2).flatten(1).sum(1)
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def test_a_negative_dominant_eigenvalue_matches_the_closed_form():
    a = 3.0
    g = torch.Generator().manual_seed(0)
    c = torch.rand(1, 2, 3, 3, generator=g, dtype=torch.float64)
    x = (c + 0.05 * torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)).clamp(0, 1)
    y = torch.zeros(4, dtype=torch.int64)
    model = _Quadratic(a, c)
    eig, _, conv = input_hessian_eigenvalues(model, x, y, iterations=200, tol=1e-14)
    s = a * (x - c).pow(2).flatten(1).sum(1)
    q = torch.sigmoid(-s)
    r2 = (x - c).pow(2).flatten(1).sum(1)
    along = -2 * a * q + 4 * a**2 * q * (1 - q) * r2
    assert (along.abs() < 2 * a * q).all()  # the -2 a q eigenspace dominates
    assert conv.all()
    torch.testing.assert_close(eig, -2 * a * q, rtol=1e-10, atol=0)


def _split(n: int = 6, seed: int = 3, offset: int = 40) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return Split(x=x, y=y, true_y=y.clone(), index=torch.arange(offset, offset + n))


def _images(split: Split) -> torch.Tensor:
    return split.x.float().div(255).double()


def test_batched_equals_the_per_sample_loop(cnn):
    split = _split(n=4)
    x, y = _images(split), split.y
    ids = split.index.tolist()
    eig, iters, conv = input_hessian_eigenvalues(cnn, x, y, iterations=12, tol=1e-4, seed=5, sample_ids=ids)
    for i in range(4):
        e1, t1, c1 = input_hessian_eigenvalues(cnn, x[i : i + 1], y[i : i + 1], iterations=12, tol=1e-4, seed=5,
                                               sample_ids=ids[i : i + 1])
        assert eig[i].item() == pytest.approx(e1.item(), rel=1e-10)
        assert iters[i].item() == t1.item() and conv[i].item() == c1.item()
    assert (iters <= 12).all() and (iters >= 1).all()


def test_probe_rows_batch_independence_and_the_adversarial_point(cnn):
    split = _split(n=5)
    config = CurvatureConfig(iterations=6, tol=0.0, batch_size=2, seed=1)
    table = curvature.probe(cnn, split, config)
    assert list(table.columns) == curvature.SAMPLE_COLUMNS
    assert table["sample"].tolist() == split.index.tolist() and table["label"].tolist() == split.y.tolist()
    assert (table["iterations"] == 6).all() and not table["converged"].any()  # tol 0: every step runs
    other = curvature.probe(cnn, split, CurvatureConfig(iterations=6, tol=0.0, batch_size=5, seed=1))
    pd.testing.assert_series_equal(table["eigenvalue"], other["eigenvalue"], rtol=1e-10, atol=0)

    # --at adv: the Hessian at PGD examples crafted from each sample's own start
    adv = CurvatureConfig(at="adv", iterations=6, tol=0.0, batch_size=3, seed=1, threat=ThreatModel(steps=2))
    table = curvature.probe(cnn, split, adv)
    x, y = _images(split), split.y
    x_adv = pgd(cnn, x, y, adv.attack, delta_init=keyed_start(x, adv.attack, 1, split.index.tolist()), amp=False)
    assert not torch.equal(x_adv, x)
    expected, _, _ = input_hessian_eigenvalues(cnn, x_adv, y, iterations=6, tol=0.0, seed=1,
                                               sample_ids=split.index.tolist())
    torch.testing.assert_close(torch.tensor(table["eigenvalue"].to_numpy()), expected, rtol=1e-10, atol=0)


def test_model_is_left_as_it_was():
    model = build_model("cnn-small").double().train()
    model.fc.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curvature.probe(model, _split(n=2), CurvatureConfig(iterations=2, at="adv", threat=ThreatModel(steps=1)))
    assert model.training and all(m.training for m in model.modules())
    assert not model.fc.weight.requires_grad and model.classifier.weight.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_summarize_and_complexity_rows(cnn):
    table = pd.DataFrame({"sample": [0, 1, 2, 3, 4], "label": [0] * 5,
                          "eigenvalue": [1.0, -3.0, 2.0, math.nan, 4.0],
                          "iterations": [3, 4, 5, 20, 2], "converged": [True, True, True, False, True]})
    s = curvature.summarize(table).set_index("statistic")
    assert list(s.index) == ["mean", "median", "std", "mean_abs", "converged"]
    assert s.loc["mean", "value"] == pytest.approx(1.0) and s.loc["mean", "n"] == 4
    assert s.loc["median", "value"] == pytest.approx(1.5)
    assert s.loc["std", "value"] == pytest.approx(math.sqrt((0 + 16 + 1 + 9) / 4))
    assert s.loc["mean_abs", "value"] == pytest.approx(2.5)
    assert s.loc["converged", "value"] == pytest.approx(0.8) and s.loc["converged", "n"] == 5

    split = _split(n=3)
    config = CurvatureConfig(iterations=4, seed=2)
    rows = curvature.complexity_rows(cnn, split, config)
    assert list(rows.columns) == ["measure", "variant", "value", "reason"]
    assert rows["measure"].tolist() == ["curvature"] * 2
    assert rows["variant"].tolist() == ["mean;at=natural", "median;at=natural"]
    assert rows["reason"].tolist() == ["", ""]
    eig = curvature.probe(cnn, split, config)["eigenvalue"]
    assert rows["value"].tolist() == pytest.approx([eig.mean(), eig.median()], rel=1e-12)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"at": "bogus"}, "unknown curvature point"),
    ({"iterations": 0}, "iterations"),
    ({"tol": -1.0}, "tol"),
    ({"tol": math.nan}, "tol"),
    ({"batch_size": 0}, "batch size"),
    ({"threat": (8, 255)}, "ThreatModel"),
])
def test_config_rejects_nonsense(kwargs, fragment):
    with pytest.raises(AtprobeError, match=fragment):
        CurvatureConfig(**kwargs)


# ---------------------------------------------------------------------------- CLI


def test_cli_writes_summary_and_samples_and_is_deterministic(cnn_ckpt, tmp_path):
    outs = [tmp_path / f"c{i}.csv" for i in range(3)]
    for out, seed in zip(outs, (1, 1, 2)):
        run_cli("curvature", cnn_ckpt, "--n", "4", "--iterations", "3", "--at", "adv", "--steps", "1",
                "--per-sample", "--device", "cpu", "--seed", seed, "-q", "-o", out)
    samples = [o.with_name(o.stem + ".samples.csv") for o in outs]
    assert outs[0].read_bytes() == outs[1].read_bytes() and samples[0].read_bytes() == samples[1].read_bytes()
    assert samples[0].read_bytes() != samples[2].read_bytes()

    df = pd.read_csv(outs[0])
    assert list(df.columns) == ["checkpoint", "epoch", "split", "labels", "bn_stats", "at", *curvature.SUMMARY_COLUMNS]
    assert df["statistic"].tolist() == ["mean", "median", "std", "mean_abs", "converged"]
    assert set(df["at"]) == {"adv"} and set(df["epoch"]) == {4}
    per = pd.read_csv(samples[0])
    assert list(per.columns) == ["checkpoint", "epoch", "split", "labels", "bn_stats", "at", *curvature.SAMPLE_COLUMNS]
    assert per["sample"].tolist() == [0, 1, 2, 3] and (per["iterations"] <= 3).all()
    assert df.loc[df["statistic"] == "mean", "value"].iloc[0] == pytest.approx(per["eigenvalue"].mean(), rel=1e-12)
    meta = json.loads(outs[0].with_name("c0.meta.json").read_text())
    assert meta["command"][:2] == ["atprobe", "curvature"] and meta["seed"] == 1
    assert meta["config"]["at"] == "adv" and meta["config"]["iterations"] == 3 and meta["config"]["n"] == 4


@pytest.mark.parametrize("args,fragment", [
    (["--iterations", "0"], "--iterations"),
    (["--at", "middle"], "--at"),
    (["--tol", "-1"], "tol"),
    (["--eps", "8"], "8/255"),
    (["--n", "0"], "--n"),
    (["--n", "100000000"], "larger than the split"),
])
def test_cli_bad_input_is_one_line_exit_2(cnn_ckpt, tmp_path, args, fragment):
    cli_rejects(fragment, "curvature", cnn_ckpt, *args, "--device", "cpu", "-q", output=tmp_path / "out" / "c.csv")


@pytest.mark.slow  # trains a model first (~55 s on the CI CPU)
def test_defaults_converge_on_a_briefly_trained_cnn_small():
    """On a trained model the top eigenvalues of the input Hessian cluster (small eigengap,
    where 20 power steps stopped 2% short): the default Lanczos solve must converge and agree
    with the dense float64 eigenvalue of every sample."""
    from atprobe.data import make_synthetic

    train, test = make_synthetic(0, n_train=512, n_test=2)
    torch.manual_seed(0)
    model = build_model("cnn-small")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = train.x.float().div(255), train.y
    for _ in range(3):  # a few epochs of standard training
        for idx in torch.randperm(len(y)).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model = model.double().eval()
    table = curvature.probe(model, test, CurvatureConfig())
    assert table["converged"].all() and (table["iterations"] <= CurvatureConfig().iterations).all()
    for i in range(len(test)):
        expected, ev = _dense_dominant(model, _images(test)[i], test.y[i])
        assert table["eigenvalue"][i] == pytest.approx(expected, rel=1e-4), i
