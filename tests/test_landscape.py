"""``flatness --plane`` and ``--between``: the 2-d plane and the path between two checkpoints
against hand-built moved models evaluated with a plain PGD loop (float64, CPU), their CLI
(tables, determinism, one-line errors) and their figures."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from atprobe import plot
from atprobe.bnstats import prepare
from atprobe.directions import directions
from atprobe.errors import AtprobeError
from atprobe.models import build_model
from atprobe.probes import flatness
from atprobe.probes.flatness import FlatnessConfig, PathConfig, PlaneConfig
from atprobe.threat import ThreatModel
from tests.conftest import cli_rejects, run_cli, save_seeded_checkpoint
from tests.test_flatness import _cnn, _images, _one_thread_and_restore_global_torch_state, _reference, _split

__all__ = ["_one_thread_and_restore_global_torch_state"]  # the autouse fixture, in force here too

LOSSES = ["adv_loss", "adv_acc", "nat_loss", "nat_acc"]


def _plane_config(**kw) -> PlaneConfig:
    base = dict(xs=(-0.3, 0.0, 0.2), ys=(0.0, 0.25), batch_size=3, seed=4, threat=ThreatModel(steps=2))
    return PlaneConfig(**{**base, **kw})


def _moved_copy(model: nn.Module, terms) -> nn.Module:
    """A deep copy with ``theta + sum c d`` written into its weights by hand."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(p + sum(c * d[name] for c, d in terms))
    return out


# ---------------------------------------------------------------------------- plane


def test_plane_origin_is_the_probe_at_theta_and_a_point_is_a_hand_moved_model():
    model, split = _cnn(), _split()
    config = _plane_config()
    before = copy.deepcopy(model.state_dict())
    table = flatness.plane(model, split, config)
    assert list(table.columns) == flatness.PLANE_COLUMNS and len(table) == 6
    assert table["point"].tolist() == list(range(6)) and (table["pair"] == 0).all() and (table["n"] == 5).all()
    assert table[["x", "y"]].values.tolist() == [[x, y] for x in config.xs for y in config.ys]
    for k, v in model.state_dict().items():  # the model is untouched
        assert torch.equal(v, before[k]), k

    origin = table[(table["x"] == 0) & (table["y"] == 0)].iloc[0]
    one_d = flatness.probe(model, split, FlatnessConfig(lambdas=(0.0, 0.1), directions=1, batch_size=3, seed=4,
                                                        threat=ThreatModel(steps=2)))
    ref = _reference(model, split, config)
    for col in LOSSES:  # the 1-d probe's lam = 0 and an independent PGD on the model itself
        assert origin[col] == one_d.loc[one_d["lam"] == 0, col].iloc[0], col
        assert origin[col] == pytest.approx(ref[col], rel=1e-12, abs=0), col

    d1, d2 = flatness.plane_directions(model, config)[0]
    for x, y in ((-0.3, 0.25), (0.2, 0.0)):
        row = table[(table["x"] == x) & (table["y"] == y)].iloc[0]
        hand = _reference(_moved_copy(model, [(x, d1), (y, d2)]), split, config)
        for col in LOSSES:
            assert row[col] == pytest.approx(hand[col], rel=1e-10, abs=1e-12), (x, y, col)
    assert table["adv_loss"].nunique() > 1  # the points differ: the grid is really moved


def test_plane_directions_are_filter_normalized_and_the_1d_probes_stream():
    model = _cnn()
    config = _plane_config(pairs=2)
    pairs = flatness.plane_directions(model, config)
    assert len(pairs) == 2
    drawn = directions(model, 4, config.seed, "biasbn", device="cpu")
    for k, (d1, d2) in enumerate(pairs):
        for j, d in enumerate((d1, d2)):
            for name, p in model.named_parameters():
                assert torch.equal(d[name], drawn[2 * k + j][name])
                if p.dim() <= 1:
                    assert not d[name].any(), name  # biases and BatchNorm zeroed (biasbn)
                else:
                    w = p.detach().flatten(1).norm(dim=1).numpy()
                    np.testing.assert_allclose(d[name].flatten(1).norm(dim=1).numpy(), w, rtol=1e-12)
    conv = next(n for n, p in model.named_parameters() if p.dim() == 4)
    assert not torch.allclose(pairs[0][0][conv], pairs[0][1][conv])
    # with one pair, d1 is the 1-d probe's direction 0 of the same seed
    first = directions(model, 1, config.seed, "biasbn", device="cpu")[0]
    assert all(torch.equal(pairs[0][0][n], first[n]) for n in first)


def test_plane_shares_of_points_add_up_to_the_grid_and_seed_decides():
    model, split = _cnn(), _split(n=4)
    config = _plane_config(pairs=2, xs=(0.0, 0.3), ys=(-0.2, 0.0), threat=ThreatModel(steps=1))
    grid = flatness.plane_grid(config)
    assert grid[5] == (1, 0.0, 0.0) and len(grid) == 8
    full = flatness.plane(model, split, config)
    shares = [flatness.plane(model, split, config, points=range(r, 8, 3)) for r in range(3)]
    joined = pd.concat(shares).sort_values("point").reset_index(drop=True)
    pd.testing.assert_frame_equal(joined, full)  # what a rank split gathers back, bit for bit
    assert flatness.plane(model, split, config, points=[6, 1])["point"].tolist() == [6, 1]
    pd.testing.assert_frame_equal(flatness.plane(model, split, config), full)  # deterministic
    other = flatness.plane(model, split, PlaneConfig(**{**config.__dict__, "seed": 5}))
    moved = full["x"].ne(0) | full["y"].ne(0)
    assert not np.allclose(other.loc[moved, "adv_loss"], full.loc[moved, "adv_loss"])
    with pytest.raises(AtprobeError, match="distinct indices"):
        flatness.plane(model, split, config, points=[8])


@pytest.mark.parametrize("kwargs,fragment", [
    ({"xs": ()}, "--x must be"),
    ({"ys": (0.0, 0.0)}, "--y values must be distinct"),
    ({"xs": (0.0, float("nan"))}, "--x must be"),
    ({"pairs": 0}, "pairs"),
    ({"ignore": "all"}, "ignore"),
])
def test_plane_config_rejects_nonsense(kwargs, fragment):
    with pytest.raises(AtprobeError, match=fragment):
        _plane_config(**kwargs)


# ---------------------------------------------------------------------------- path


def _hand_path_model(a: nn.Module, b: nn.Module, t: float, train_x: torch.Tensor) -> nn.Module:
    """``(1 - t) A + t B`` written by hand, then the BatchNorm statistics of one train-mode
    forward of all ``train_x`` with ``momentum=None`` (the documented recompute rule, by hand)."""
    out = copy.deepcopy(a)
    pb = dict(b.named_parameters())
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_((1 - t) * p + t * pb[name])
        out.eval()
        for m in out.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
                m.train()
        out(train_x)
    return out.eval()


def test_path_ends_are_the_checkpoints_with_recomputed_bn_and_midpoint_is_hand_interpolated():
    a, b, split, train = _cnn(0), _cnn(1), _split(), _split(n=6, seed=7, offset=0)
    config = PathConfig(ts=(0.0, 0.5, 1.0), bn_images=6, batch_size=3, seed=4, threat=ThreatModel(steps=2))
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    table = flatness.path(a, b, split, config, train=train)
    assert list(table.columns) == flatness.PATH_COLUMNS and table["t"].tolist() == [0.0, 0.5, 1.0]
    assert table["point"].tolist() == [0, 1, 2] and (table["n"] == 5).all()
    for m, sd in zip((a, b), before):
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())

    one = FlatnessConfig(lambdas=(0.0, 0.1), directions=1, batch_size=3, seed=4, threat=ThreatModel(steps=2))
    for t, model in ((0.0, a), (1.0, b)):  # each checkpoint's own value under --bn-stats recompute:6
        own, label = prepare(model, "recompute:6", train, seed=4, batch_size=3)
        assert label == "recompute:6"
        curve = flatness.probe(own, split, one)
        row = table[table["t"] == t].iloc[0]
        for col in LOSSES:
            assert row[col] == pytest.approx(curve.loc[curve["lam"] == 0, col].iloc[0], rel=1e-12), (t, col)
    for t in (0.0, 0.5, 1.0):
        hand = _reference(_hand_path_model(a, b, t, _images(train)), split, config)
        row = table[table["t"] == t].iloc[0]
        for col in LOSSES:
            assert row[col] == pytest.approx(hand[col], rel=1e-10, abs=1e-12), (t, col)
    assert table["adv_loss"].nunique() == 3
    share = flatness.path(a, b, split, config, train=train, points=[2])
    pd.testing.assert_frame_equal(share.reset_index(drop=True), table.iloc[[2]].reset_index(drop=True))


def test_path_rejects_other_architectures_and_needs_training_images_for_bn():
    a = _cnn(0)
    torch.manual_seed(0)
    other = build_model("mlp").double()
    with pytest.raises(AtprobeError, match="different architectures"):
        flatness.path(a, other, _split(), PathConfig(ts=(0.0,)), train=_split())
    with pytest.raises(AtprobeError, match="training split"):
        flatness.path(a, _cnn(1), _split(), PathConfig(ts=(0.0,)))
    with pytest.raises(AtprobeError, match="recompute:N"):
        PathConfig(bn_images=1)
    b = _cnn(1)
    for model, value in ((a, 0.5), (b, 0.25)):  # an input-normalization-like buffer, not a BatchNorm statistic
        model.register_buffer("scale", torch.full((3,), value, dtype=torch.float64))
    with pytest.raises(AtprobeError, match="differ in the buffer 'scale'"):
        flatness.path(a, b, _split(), PathConfig(ts=(0.0,)), train=_split())


# ---------------------------------------------------------------------------- CLI and figures


@pytest.fixture(scope="module")
def two_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("landscape")
    return (save_seeded_checkpoint(root / "a.pt", seed=0, epoch=1, random_bn=True),
            save_seeded_checkpoint(root / "b.pt", seed=1, epoch=2, random_bn=True))


FAST = ["--n", "3", "--steps", "1", "--device", "cpu", "-q"]


def test_cli_plane_table_meta_determinism_and_contour(two_ckpts, tmp_path):
    outs = [tmp_path / f"p{i}.csv" for i in range(2)]
    for out in outs:
        run_cli("flatness", two_ckpts[0], "--plane", "--x=-0.5,0,0.5", "--y=0:0.5:2", "--seed", "3", *FAST,
                "-o", out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    df = pd.read_csv(outs[0])
    assert list(df.columns) == ["checkpoint", "epoch", "split", "labels", *flatness.PLANE_COLUMNS]
    assert len(df) == 6 and df[["x", "y"]].values.tolist() == [[x, y] for x in (-0.5, 0, 0.5) for y in (0, 0.5)]
    meta = json.loads(outs[0].with_name("p0.meta.json").read_text())
    assert meta["table"] == "plane" and meta["config"]["xs"] == [-0.5, 0.0, 0.5] and meta["config"]["landscape"] \
        == "plane" and meta["threat"]["steps"] == 1

    from matplotlib.contour import ContourSet

    assert plot.detect_kind(df) == "flatness_plane"
    fig = plot.plot(outs[0])
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 2
    for ax in panels:
        assert "d1" in ax.get_xlabel() and "d2" in ax.get_ylabel()
        sets = [c for c in ax.get_children() if isinstance(c, ContourSet)]
        assert len(sets) == 2 and any(s.filled for s in sets)  # filled contour and its labelled isolines
        assert ax.texts  # the isoline labels
        star = [ln for ln in ax.get_lines() if ln.get_label() == "θ"]
        assert star and list(star[0].get_xdata()) == [0.0]
    run_cli("plot", outs[0], "-o", tmp_path / "plane.png", "--dpi", "40")
    assert (tmp_path / "plane.png").stat().st_size > 0


def test_cli_between_table_and_path_figure(two_ckpts, tmp_path):
    out = tmp_path / "path.csv"
    run_cli("flatness", "--between", *two_ckpts, "--t", "0,0.5,1", "--bn-images", "8", *FAST, "-o", out)
    df = pd.read_csv(out)
    assert list(df.columns) == ["checkpoint", "checkpoint_a", "checkpoint_b", "epoch_a", "epoch_b", "split",
                                "labels", *flatness.PATH_COLUMNS]
    assert df["t"].tolist() == [0.0, 0.5, 1.0]
    assert df["epoch_a"].tolist() == [1] * 3 and df["epoch_b"].tolist() == [2] * 3
    meta = json.loads(out.with_name("path.meta.json").read_text())
    assert meta["table"] == "path" and meta["config"]["bn_stats"] == "recompute:8"
    assert meta["config"]["ts"] == [0.0, 0.5, 1.0]

    assert plot.detect_kind(df) == "flatness_path"
    fig = plot.plot(out)
    assert len(fig.axes) == 2 and fig.axes[0].get_xlabel().startswith("t")
    curves = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) == 3]
    assert len(curves) == 2  # adversarial and natural loss against t
    assert sorted(curves[0].get_xdata()) == [0.0, 0.5, 1.0]
    ys = sorted(np.round(np.concatenate([c.get_ydata() for c in curves]), 10))
    assert ys == sorted(np.round(np.concatenate([df["adv_loss"], df["nat_loss"]]), 10))
    marks = [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == ":"]
    assert sorted(m.get_xdata()[0] for m in marks) == [0.0, 1.0]


@pytest.mark.parametrize("args,fragment", [
    (["--plane", "--x=-1:1"], "--x '-1:1': expected START:STOP:NUM"),
    (["--plane", "--y", "0:1:x"], "NUM must be an integer"),
    (["--plane", "--between"], "--plane and --between"),
    (["--x", "0,1"], "--x only applies with --plane"),
    (["--t", "0,1"], "--t only applies with --between"),
    (["--plane", "--curve"], "--curve"),
    (["--between"], "two checkpoints A B, got 1"),
])
def test_cli_bad_input_is_one_line_exit_2(two_ckpts, tmp_path, args, fragment):
    cli_rejects(fragment, "flatness", two_ckpts[0], *args, "--device", "cpu", "-q",
                output=tmp_path / "out" / "f.csv")


def test_cli_between_rejects_different_architectures(two_ckpts, tmp_path):
    mlp = save_seeded_checkpoint(tmp_path / "m" / "mlp.pt", arch="mlp")
    cli_rejects("different architectures", "flatness", "--between", two_ckpts[0], mlp, "--device", "cpu", "-q",
                output=tmp_path / "out" / "f.csv")
