"""``flatness``: the adversarial-loss landscape against independent PGD runs on moved copies of
the model, closed forms and hand numbers (float64, CPU), and ``atprobe flatness`` end to end."""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch
from torch import nn

from atprobe import objectives
from atprobe.attacks import pgd
from atprobe.data import Split
from atprobe.directions import directions
from atprobe.errors import AtprobeError
from atprobe.models import build_model
from atprobe.probes import flatness
from atprobe.probes.flatness import FlatnessConfig
from atprobe.threat import ThreatModel
from tests.conftest import cli_rejects, keyed_start, randomize_bn, run_cli


@pytest.fixture(autouse=True)
def _one_thread_and_restore_global_torch_state():
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def _split(n: int = 5, seed: int = 3, offset: int = 20) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return Split(x=x, y=y, true_y=y.clone(), index=torch.arange(offset, offset + n))


def _images(split: Split) -> torch.Tensor:
    return split.x.float().div(255).double()


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(build_model("cnn-small").double(), seed).eval()


def _reference(model: nn.Module, split: Split, config: FlatnessConfig) -> dict[str, float]:
    """Adversarial/natural loss and accuracy of a real module: atprobe.attacks.pgd from the
    per-sample starts, objectives.ce, one batch, NCHW."""
    x, y = _images(split), split.y
    attack = config.attack
    x_adv = pgd(model, x, y, attack, delta_init=keyed_start(x, attack, config.seed, split.index.tolist()),
                amp=False)
    model.eval()
    with torch.no_grad():
        adv, nat = model(x_adv), model(x)
    return {"adv_loss": objectives.ce(adv, y).mean().item(), "adv_acc": (adv.argmax(1) == y).double().mean().item(),
            "nat_loss": objectives.ce(nat, y).mean().item(), "nat_acc": (nat.argmax(1) == y).double().mean().item()}


def test_lam_zero_is_the_models_own_adversarial_loss_and_points_are_moved_copies():
    model, split = _cnn(), _split()
    config = FlatnessConfig(lambdas=(-0.3, 0.0, 0.3), directions=2, batch_size=3, seed=4, threat=ThreatModel(steps=2))
    curve = flatness.probe(model, split, config)
    assert list(curve.columns) == flatness.CURVE_COLUMNS and len(curve) == 6
    assert curve[["direction", "lam"]].values.tolist() == [[0, -0.3], [0, 0.0], [0, 0.3], [1, -0.3], [1, 0.0],
                                                           [1, 0.3]]
    assert (curve["n"] == 5).all()
    ref = _reference(model, split, config)
    zero = curve[curve["lam"] == 0.0]
    for col, value in ref.items():
        assert zero[col].tolist() == pytest.approx([value, value], rel=1e-12, abs=0), col
    assert ref["adv_loss"] > ref["nat_loss"]

    # every other point: a deep copy with theta + lam d loaded, attacked from the same starts
    dirs = directions(model, 2, 4, "biasbn", device="cpu")
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    for k, d in enumerate(dirs):
        for lam in (-0.3, 0.3):
            moved = copy.deepcopy(model)
            with torch.no_grad():
                for name, p in moved.named_parameters():
                    p.copy_(theta[name] + lam * d[name])
            ref = _reference(moved, split, config)
            row = curve[(curve["direction"] == k) & (curve["lam"] == lam)].iloc[0]
            for col, value in ref.items():
                assert row[col] == pytest.approx(value, rel=1e-10, abs=1e-14), (k, lam, col)
    assert (curve.loc[curve["lam"] != 0, "adv_loss"] != zero["adv_loss"].iloc[0]).all()
    assert all(torch.equal(theta[k], v) for k, v in model.named_parameters())  # the model is untouched


def test_a_zero_direction_gives_a_flat_curve_and_flatness_zero():
    model, split = _cnn(1), _split(n=3)
    config = FlatnessConfig(lambdas=(-0.5, -0.25, 0.0, 0.25, 0.5), batch_size=3, threat=ThreatModel(steps=1))
    zero = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    curve = flatness.probe(model, split, config, directions=[zero])
    for col in ("adv_loss", "adv_acc", "nat_loss", "nat_acc"):
        assert curve[col].nunique() == 1, col
    summary = flatness.summarize(curve, config)
    assert summary["increase"].tolist() == [0.0, 0.0] and summary["increase_std"].tolist() == [0.0, 0.0]


def test_clean_loss_of_a_linear_model_matches_the_closed_form():
    """eps = 0: the adversarial loss is the clean loss; for f(x) = W x + b along d (bias
    zeroed, ignore=biasbn) it is CE((W + lam d_W) x + b, y)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).double().eval()
    split = _split(n=6)
    lambdas = (-1.0, -0.5, 0.0, 0.5, 1.0)
    config = FlatnessConfig(lambdas=lambdas, directions=2, seed=7, batch_size=4, threat=ThreatModel(eps=0.0, steps=3))
    curve = flatness.probe(model, split, config)
    assert (curve["adv_loss"] == curve["nat_loss"]).all() and (curve["adv_acc"] == curve["nat_acc"]).all()
    x, y = _images(split).flatten(1), split.y
    w, b = model[1].weight.detach(), model[1].bias.detach()
    for k, d in enumerate(directions(model, 2, 7, "biasbn", device="cpu")):
        assert torch.equal(d["1.bias"], torch.zeros_like(b))
        # filter normalization: each row of d_W has the norm of the matching row of W
        torch.testing.assert_close(d["1.weight"].norm(dim=1), w.norm(dim=1), rtol=1e-12, atol=0)
        for lam in lambdas:
            logits = x @ (w + lam * d["1.weight"]).T + b
            expected = -(logits.log_softmax(1)[torch.arange(6), y]).mean().item()
            row = curve[(curve["direction"] == k) & (curve["lam"] == lam)].iloc[0]
            assert row["nat_loss"] == pytest.approx(expected, rel=1e-12), (k, lam)


def test_curve_is_seeded_and_deterministic():
    model, split = _cnn(2), _split(n=3)
    config = FlatnessConfig(lambdas=(-0.2, 0.0, 0.2), directions=1, seed=1, threat=ThreatModel(steps=2))
    a, b = flatness.probe(model, split, config), flatness.probe(model, split, config)
    pd.testing.assert_frame_equal(a, b)
    c = flatness.probe(model, split, FlatnessConfig(lambdas=(-0.2, 0.0, 0.2), directions=1, seed=2,
                                                    threat=ThreatModel(steps=2)))
    assert not a["adv_loss"].equals(c["adv_loss"])
    # batch composition does not matter (per-sample starts)
    d = flatness.probe(model, split, FlatnessConfig(lambdas=(-0.2, 0.0, 0.2), directions=1, seed=1,
                                                    batch_size=1, threat=ThreatModel(steps=2)))
    pd.testing.assert_series_equal(a["adv_loss"], d["adv_loss"], rtol=1e-12, atol=0)


def test_summarize_hand_numbers():
    curve = pd.DataFrame({
        "direction": [0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
        "lam": [-1.0, -0.5, 0.0, 0.5, 1.0] * 2,
        "n": [4] * 10,
        "adv_loss": [3.0, 2.5, 2.0, 2.4, 4.0, 2.2, 2.1, 2.0, 2.1, 2.6],
        "adv_acc": [0.0] * 10,
        "nat_loss": [1.5, 1.2, 1.0, 1.1, 1.5, 1.1, 1.0, 1.0, 1.0, 1.3],
        "nat_acc": [0.0] * 10,
    })
    s = flatness.summarize(curve, FlatnessConfig(lambdas=(-1.0, -0.5, 0.0, 0.5, 1.0))).set_index("loss")
    assert list(s.columns) == flatness.SUMMARY_COLUMNS[1:]
    # r = 1: direction 0 increases (1.0 + 2.0) / 2 = 1.5, direction 1 (0.2 + 0.6) / 2 = 0.4
    assert s.loc["adv", "radius"] == 1.0 and s.loc["adv", "directions"] == 2 and s.loc["adv", "n"] == 4
    assert s.loc["adv", "at_theta"] == 2.0 and s.loc["adv", "at_radius"] == pytest.approx(2.95)
    assert s.loc["adv", "increase"] == pytest.approx(0.95) and s.loc["adv", "increase_std"] == pytest.approx(0.55)
    assert s.loc["nat", "increase"] == pytest.approx((0.5 + 0.5 + 0.1 + 0.3) / 4)
    half = flatness.summarize(curve, FlatnessConfig(lambdas=(-1.0, -0.5, 0.0, 0.5, 1.0), radius=0.5))
    assert half.loc[0, "increase"] == pytest.approx((0.5 + 0.4 + 0.1 + 0.1) / 4)
    # a one-sided grid uses the one point
    one = curve[curve["lam"] >= 0]
    s1 = flatness.summarize(one, FlatnessConfig(lambdas=(0.0, 0.5, 1.0)))
    assert s1.loc[0, "increase"] == pytest.approx((2.0 + 0.6) / 2)


def test_complexity_rows_evaluate_only_the_radius_and_agree_with_the_full_curve():
    model, split = _cnn(3), _split(n=3)
    config = FlatnessConfig(lambdas=(-0.4, -0.2, 0.0, 0.2, 0.4), directions=2, seed=6, threat=ThreatModel(steps=1))
    rows = flatness.complexity_rows(model, split, config)
    assert list(rows.columns) == ["measure", "variant", "value", "reason"]
    assert rows.iloc[0].tolist()[:2] == ["flatness", "radius=0.4;directions=2"] and rows.iloc[0]["reason"] == ""
    full = flatness.summarize(flatness.probe(model, split, config), config)
    assert rows.iloc[0]["value"] == pytest.approx(full.loc[full["loss"] == "adv", "increase"].iloc[0], rel=1e-12)

    calls = []

    def counting(n):
        calls.append(n)

    flatness.probe(model, split, FlatnessConfig(lambdas=(-0.4, 0.0, 0.4), directions=2, threat=ThreatModel(steps=1)),
                   progress=type("P", (), {"update": staticmethod(counting)})())
    assert len(calls) == 1 + 2 * 2  # theta once, then two points per direction


@pytest.mark.parametrize("kwargs,fragment", [
    ({"lambdas": (0.1, 0.2)}, "does not contain 0"),
    ({"lambdas": (0.0,)}, "no point besides 0"),
    ({"lambdas": (0.0, 0.1, 0.1)}, "distinct"),
    ({"lambdas": (0.0, math.inf)}, "finite"),
    ({"radius": 0.35}, "not the |lam| of a grid point"),
    ({"radius": -0.5}, "not the |lam|"),
    ({"directions": 0}, "directions"),
    ({"ignore": "all"}, "ignore"),
    ({"direction_norm": "weight"}, "direction norm"),
    ({"batch_size": 0}, "batch size"),
    ({"threat": (8, 255)}, "ThreatModel"),
])
def test_config_rejects_nonsense(kwargs, fragment):
    with pytest.raises(AtprobeError, match=fragment.replace("|", r"\|")):
        FlatnessConfig(**kwargs)


def test_config_defaults():
    config = FlatnessConfig()
    assert config.lambdas == tuple(round(-0.5 + 0.1 * i, 10) for i in range(11)) and config.radius == 0.5
    assert config.directions == 5 and config.threat.steps == 10 and config.threat.eps == 8 / 255
    assert FlatnessConfig(lambdas=(-1, 0, 0.5, 1), radius=0.5).radius == 0.5


# ---------------------------------------------------------------------------- CLI


def test_cli_writes_summary_and_curve_and_is_deterministic(cnn_ckpt, tmp_path):
    outs = [tmp_path / f"f{i}.csv" for i in range(2)]
    for out in outs:
        run_cli("flatness", cnn_ckpt, cnn_ckpt, "--n", "3", "--lambdas=-0.2,0,0.1,0.2", "--radius", "0.2",
                "--directions", "2", "--steps", "1", "--curve", "--device", "cpu", "--seed", "5", "-q", "-o", out)
    curves = [o.with_name(o.stem + ".curve.csv") for o in outs]
    assert outs[0].read_bytes() == outs[1].read_bytes() and curves[0].read_bytes() == curves[1].read_bytes()
    df = pd.read_csv(outs[0])
    assert list(df.columns) == ["checkpoint", "epoch", "split", "labels", *flatness.SUMMARY_COLUMNS]
    assert len(df) == 4 and df["loss"].tolist() == ["adv", "nat", "adv", "nat"] and set(df["radius"]) == {0.2}
    curve = pd.read_csv(curves[0])
    assert list(curve.columns) == ["checkpoint", "epoch", "split", "labels", *flatness.CURVE_COLUMNS]
    assert len(curve) == 2 * 2 * 4
    one = curve.iloc[:8]
    ring = one[one["lam"].abs() == 0.2]
    expected = ring["adv_loss"].mean() - one.loc[one["lam"] == 0, "adv_loss"].iloc[0]
    assert df.loc[0, "increase"] == pytest.approx(expected, rel=1e-12)
    meta = json.loads(outs[0].with_name("f0.meta.json").read_text())
    assert meta["config"]["lambdas"] == [-0.2, 0.0, 0.1, 0.2] and meta["config"]["radius"] == 0.2
    assert json.loads(curves[0].with_name("f0.curve.meta.json").read_text())["table"] == "curve"


@pytest.mark.parametrize("args,fragment", [
    (["--lambdas", "0.1:0.3:3"], "does not contain 0"),
    (["--lambdas", "-1:1"], "START:STOP:NUM"),
    (["--lambdas", "0"], "no point besides 0"),
    (["--radius", "0.35"], "not the |lam| of a grid point"),
    (["--directions", "0"], "directions"),
    (["--eps", "8"], "8/255"),
    (["--n", "100000000"], "larger than the split"),
])
def test_cli_bad_input_is_one_line_exit_2(cnn_ckpt, tmp_path, args, fragment):
    cli_rejects(fragment, "flatness", cnn_ckpt, *args, "--device", "cpu", "-q", output=tmp_path / "out" / "f.csv")


def test_help_of_the_three_commands():
    for name in ("curvature", "hessian", "flatness"):
        result = run_cli(name, "--help")
        assert f"Usage: atprobe {name}" in result.output and "Examples:" in result.output
        for option in ("--n", "--split", "--labels", "--seed", "--device", "--batch-size", "--eps", "--steps",
                       "--output", "--quiet"):
            assert option in result.output, (name, option)
    assert "curvature" in run_cli("--help").output
