"""``atprobe table`` (Table 1 of run directories) and the figures of sets of runs
(``table``, ``noise_gap``, ``eps_curves``), checked against independent computations:
``atprobe eval`` of the same checkpoints, a plain forward pass, curves.csv read by hand."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from atprobe import plot
from atprobe.checkpoint import load_checkpoint
from atprobe.data import load_dataset
from atprobe.errors import AtprobeError
from atprobe.runs import TABLE_COLUMNS
from atprobe.threat import ThreatModel
from atprobe.train import TrainConfig
from tests.conftest import cli_error, cli_rejects, run_cli, save_seeded_checkpoint

TRAIN = ["train", "--arch", "mlp", "--train-n", "192", "--batch-size", "64", "--eval-n", "48", "--steps", "1",
         "--eval-attack", "pgd2", "--device", "cpu", "-q"]
ATTACKS = ["--attack", "natural,pgd2,cw2", "--n", "64", "--device", "cpu", "-q"]


def _made_run(path, *, method, noise, eps, curves, val_size=0):
    """A run directory without training: seeded mlp checkpoints as best.pt (epoch 1) and
    final.pt (epoch 3), the config of ``method``/``noise``/``eps``, and ``curves`` as
    ``{(epoch, split, metric): value}``."""
    config = TrainConfig(arch="mlp", method=method, label_noise=noise, epochs=3, threat=ThreatModel(eps=eps),
                         eval_attack="pgd2", eval_n=32, val_size=val_size)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config.to_json()))
    save_seeded_checkpoint(path / "best.pt", 1, arch="mlp", epoch=1, train_config=config.to_json())
    save_seeded_checkpoint(path / "final.pt", 2, arch="mlp", epoch=3, train_config=config.to_json())
    rows = [{"epoch": e, "split": sp, "metric": m, "value": v} for (e, sp, m), v in curves.items()]
    pd.DataFrame(rows).to_csv(path / "curves.csv", index=False)
    return path


def _curves(train_nat, test_nat, train_rob, test_rob, early=0.1):
    """Two epochs of curves: ``early`` everywhere at epoch 1, the given values at epoch 3."""
    out = {}
    for split, nat, rob in (("train", train_nat, train_rob), ("test", test_nat, test_rob)):
        out.update({(1, split, "natural_acc"): early, (1, split, "pgd2_acc"): early, (3, split, "natural_acc"): nat,
                    (3, split, "pgd2_acc"): rob, (3, split, "natural_loss"): 2.0})
    out[(3, "train", "running_acc")] = 0.99  # not an accuracy of the curves
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Three made runs (no training): PGD-AT at noise 0 and 0.4, TRADES at noise 0.4 and eps
    2/255, with curves whose gaps are known: 0.25/0.125, 0.5/0.25, 0.375/0.0625 (exact in binary)."""
    root = tmp_path_factory.mktemp("made")
    return (_made_run(root / "noise_0.9", method="pgd_at", noise=0.0, eps=8 / 255, curves=_curves(1, 0.75, 0.5, 0.375)),
            _made_run(root / "b", method="pgd_at", noise=0.4, eps=8 / 255, curves=_curves(0.75, 0.25, 0.5, 0.25)),
            _made_run(root / "c", method="trades", noise=0.4, eps=2 / 255, curves=_curves(0.875, 0.5, 0.5, 0.4375)))


def test_table_of_made_runs_is_their_eval(made, tmp_path):
    out, evaluated = tmp_path / "t.csv", tmp_path / "e.csv"
    args = ["--attack", "natural,pgd2", "--n", "32", "--device", "cpu", "-q"]
    run_cli("table", *made[:2], *args, "-o", out)
    run_cli("eval", *(r / f for r in made[:2] for f in ("best.pt", "final.pt")), *args, "-o", evaluated)
    df, ev = pd.read_csv(out), pd.read_csv(evaluated).set_index(["checkpoint", "attack"])["accuracy"]
    for row in df.itertuples():
        assert row.best == ev[(f"{row.run}/best.pt", row.attack)]
        assert row.final == ev[(f"{row.run}/final.pt", row.attack)]
        assert row.diff == pytest.approx(row.best - row.final, abs=1e-15)
        assert (row.best_epoch, row.final_epoch) == (1, 3)
    assert df["label_noise"].tolist() == [0.0, 0.0, 0.4, 0.4] and set(df["method"]) == {"pgd_at"}
    assert df["best"].ne(df["final"]).any()  # two different models: the comparison can fail
    fig = plot.table_bars(out)
    assert sorted(round(p.get_height(), 12) for c in fig.axes[0].containers for p in c.patches) == sorted(
        np.round(df[df["attack"] == "natural"][["best", "final"]].to_numpy().ravel(), 12))


def test_made_runs_gaps_and_eps_curves_are_the_known_numbers(made, tmp_path):
    gaps = plot.generalization_gaps(list(made)).set_index(["source", "accuracy"])["gap"]
    assert gaps.to_dict() == {("noise_0.9", "natural"): 0.25, ("noise_0.9", "robust"): 0.125,
                              ("b", "natural"): 0.5, ("b", "robust"): 0.25,
                              ("c", "natural"): 0.375, ("c", "robust"): 0.0625}
    assert plot.generalization_gaps(list(made))["label_noise"].tolist() == [0.0, 0.0, 0.4, 0.4, 0.4, 0.4]
    curves = plot.robust_test_curves(list(made))
    assert curves["budget"].tolist()[:2] == ["linf ε=2/255"] * 2 and curves["accuracy"].tolist()[:2] == [0.1, 0.4375]
    for kind in ("noise_gap", "eps_curves"):
        out = tmp_path / f"{kind}.png"
        run_cli("plot", *made, "--kind", kind, "-o", out, "-q")
        assert out.stat().st_size > 0
    assert "would land inside" in cli_error("table", made[0], "-o", made[0] / "best.pt")


def test_table_refuses_runs_whose_samples_differ(made, tmp_path):
    carved = _made_run(tmp_path / "v", method="pgd_at", noise=0.0, eps=8 / 255, curves=_curves(1, 1, 1, 1),
                       val_size=100)
    cli_rejects("different validation splits", "table", made[0], carved, "--split", "val", "--device", "cpu",
                output=tmp_path / "new" / "t.csv")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny runs whose folder names say nothing true: PGD-AT on true labels (3 epochs),
    PGD-AT on half-noisy labels, TRADES on half-noisy labels at eps 4/255 (2 epochs each)."""
    root = tmp_path_factory.mktemp("table")
    a, b, c = root / "x_noise9", root / "y_eps1", root / "z"
    run_cli(*TRAIN, "--method", "pgd_at", "--epochs", "3", "--out", a)
    run_cli(*TRAIN, "--method", "pgd_at", "--epochs", "2", "--label-noise", "0.5", "--out", b)
    run_cli(*TRAIN, "--method", "trades", "--epochs", "2", "--label-noise", "0.5", "--eps", "4/255", "--out", c)
    return a, b, c


@pytest.fixture(scope="module")
def table(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("table_out") / "table.csv"
    run_cli("table", runs[0], runs[1], *ATTACKS, "-o", out)
    return out


@pytest.mark.slow
def test_table_is_eval_of_best_and_final(runs, table, tmp_path):
    df = pd.read_csv(table)
    assert list(df.columns) == TABLE_COLUMNS
    evaluated = tmp_path / "eval.csv"  # the independent call: atprobe eval of the same checkpoints, same seed
    run_cli("eval", *(r / f for r in runs[:2] for f in ("best.pt", "final.pt")), *ATTACKS, "-o", evaluated)
    ev = pd.read_csv(evaluated)
    assert len(df) == 2 * 3
    for run in runs[:2]:
        config = json.loads((run / "config.json").read_text())
        rows = df[df["run"] == str(run)].set_index("attack")
        assert list(rows.index) == ["natural", "pgd2", "cw2"]
        for role in ("best", "final"):
            want = ev[ev["checkpoint"] == str(run / f"{role}.pt")].set_index("attack")["accuracy"]
            assert rows[role].to_dict() == want.to_dict()
            assert (rows[f"{role}_epoch"] == load_checkpoint(run / f"{role}.pt").epoch).all()
        np.testing.assert_allclose(rows["diff"], rows["best"] - rows["final"], rtol=0, atol=1e-15)
        assert (rows["final_epoch"] == config["epochs"]).all()
        assert (rows["method"] == config["method"]).all() and (rows["label_noise"] == config["label_noise"]).all()
        assert np.allclose(rows["train_eps"], config["threat"]["eps"]) and (rows["n"] == 64).all()
    # natural accuracy by hand: a plain forward pass over the first 64 test images
    test = load_dataset("synthetic").test
    x = test.x[:64].float() / 255 if test.x.dtype == torch.uint8 else test.x[:64]
    for run in runs[:2]:
        for role in ("best", "final"):
            model = load_checkpoint(run / f"{role}.pt").build_model()
            with torch.no_grad():
                acc = (model(x).argmax(1) == test.y[:64]).double().mean().item()
            got = df[(df["run"] == str(run)) & (df["attack"] == "natural")][role].item()
            assert got == pytest.approx(acc, abs=1e-12)


@pytest.mark.slow
def test_table_meta_records_the_checkpoints_and_the_selection(runs, table):
    meta = json.loads(table.with_name("table.meta.json").read_text())
    files = [str(r / f) for r in runs[:2] for f in ("best.pt", "final.pt")]
    assert [c["path"] for c in meta["checkpoints"]] == files
    for c in meta["checkpoints"]:
        assert c["sha256"] == hashlib.sha256(open(c["path"], "rb").read()).hexdigest()
    assert meta["best_selected_by"][str(runs[0])] == {"eval_attack": "pgd2", "split": "test", "n": 48}
    assert meta["table"] == "table" and meta["config"]["attacks"] == ["natural", "pgd2", "cw2"]


@pytest.mark.slow
def test_table_is_the_same_whatever_the_batch_size(runs, table, tmp_path):
    out = tmp_path / "t.csv"
    run_cli("table", runs[0], runs[1], *ATTACKS, "--batch-size", "24", "-o", out)
    assert out.read_text() == table.read_text()


@pytest.mark.slow
def test_table_refuses_what_is_not_a_run_before_any_work(runs, tmp_path):
    a = runs[0]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "best.pt").write_bytes(a.joinpath("best.pt").read_bytes())
    out = tmp_path / "new" / "t.csv"
    cli_rejects("no such directory", "table", a, tmp_path / "missing", output=out)
    cli_rejects("not a directory", "table", a / "best.pt", output=out)
    cli_rejects("no config.json, final.pt", "table", plain, output=out)
    cli_rejects("given twice", "table", a, f"{a}/", output=out)
    cli_rejects("unknown attack", "table", a, "--attack", "natural,bogus", output=out)
    before = a.joinpath("config.json").read_bytes()
    assert "would land inside" in cli_error("table", a, "-o", a / "config.json")
    assert "would land inside" in cli_error("table", a, runs[1], "-o", runs[1] / "curves.csv")
    assert a.joinpath("config.json").read_bytes() == before


@pytest.mark.slow
def test_table_bars_are_best_and_final(table, tmp_path):
    df = pd.read_csv(table)
    assert plot.detect_kind(df) == "table"
    out = tmp_path / "t.png"
    run_cli("plot", table, "-o", out, "-q")
    assert out.stat().st_size > 0
    fig = plot.table_bars(table)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["natural", "pgd2", "cw2"]
    for ax, attack in zip(panels, ["natural", "pgd2", "cw2"]):
        rows = df[df["attack"] == attack]
        best, final = (sorted(round(p.get_height(), 12) for p in c.patches) for c in ax.containers)
        assert best == sorted(np.round(rows["best"], 12)) and final == sorted(np.round(rows["final"], 12))
        assert all("Δ = " in t.get_text() for t in ax.get_xticklabels())


def _last(curves: pd.DataFrame, split: str, metric: str) -> float:
    rows = curves[(curves["split"] == split) & (curves["metric"] == metric)]
    return float(rows[rows["epoch"] == rows["epoch"].max()]["value"].item())


@pytest.mark.slow
def test_noise_gap_is_train_minus_test_at_the_end_with_the_configs_noise(runs, tmp_path):
    gaps = plot.generalization_gaps(list(runs))
    assert len(gaps) == 2 * len(runs)
    for run, noise, method in zip(runs, (0.0, 0.5, 0.5), ("PGD-AT", "PGD-AT", "TRADES")):
        curves = pd.read_csv(run / "curves.csv")  # by hand
        mine = gaps[gaps["source"] == run.name].set_index("accuracy")
        for accuracy, metric in (("natural", "natural_acc"), ("robust", "pgd2_acc")):
            train, test = _last(curves, "train", metric), _last(curves, "test", metric)
            assert mine.loc[accuracy, "gap"] == pytest.approx(train - test, abs=1e-15)
            assert mine.loc[accuracy, "train"] == train and mine.loc[accuracy, "test"] == test
        assert (mine["label_noise"] == noise).all() and (mine["method"] == method).all()  # not the folder name
        assert (mine["epoch"] == curves["epoch"].max()).all()
    fig = plot.noise_gap(list(runs))
    natural = fig.axes[0]
    pgd = gaps[(gaps["method"] == "PGD-AT") & (gaps["accuracy"] == "natural")].sort_values("label_noise")
    drawn = [line for line in natural.get_lines() if len(line.get_xdata()) == 2 and line.get_gid() != "zero"]
    assert len(drawn) == 1
    np.testing.assert_allclose(drawn[0].get_xdata(), pgd["label_noise"])
    np.testing.assert_allclose(drawn[0].get_ydata(), pgd["gap"])
    out = tmp_path / "gap.png"
    run_cli("plot", *runs, "--kind", "noise_gap", "-o", out, "-q")
    assert out.stat().st_size > 0


@pytest.mark.slow
def test_eps_curves_are_each_runs_robust_test_accuracy_at_its_eps(runs, tmp_path):
    curves = plot.robust_test_curves([runs[0], runs[2]])
    assert list(curves["budget"].unique()) == ["linf ε=4/255", "linf ε=8/255"]  # ordered by eps, from the config
    for run, eps in ((runs[0], 8 / 255), (runs[2], 4 / 255)):
        by_hand = pd.read_csv(run / "curves.csv")
        by_hand = by_hand[(by_hand["split"] == "test") & (by_hand["metric"] == "pgd2_acc")]
        mine = curves[curves["source"] == run.name]
        assert mine["epoch"].tolist() == by_hand["epoch"].tolist()
        assert mine["accuracy"].tolist() == by_hand["value"].tolist()
        assert np.allclose(mine["train_eps"], eps)
    fig = plot.eps_curves([runs[0], runs[2]])
    ys = sorted(tuple(line.get_ydata()) for line in fig.axes[0].get_lines() if len(line.get_xdata()) > 1)
    assert ys == sorted(tuple(g["accuracy"]) for _, g in curves.groupby("source"))
    out = tmp_path / "eps.svg"
    run_cli("plot", runs[0], runs[2], "--kind", "eps_curves", "-o", out, "-q")
    assert out.read_text().startswith("<?xml")


@pytest.mark.slow
def test_a_run_directory_is_drawn_as_curves_unless_a_kind_is_named(runs, tmp_path):
    from atprobe.runs import run_curves

    assert plot.detect_kind(run_curves(runs[0])) == "curves"  # noise_gap and eps_curves are named only
    run_cli("plot", runs[0], runs[1], "-o", tmp_path / "c.png", "-q")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "nor a run directory" in cli_error("plot", empty, "-o", tmp_path / "x.png")
    assert "lacks the columns" in cli_error("plot", runs[0] / "curves.csv", "--kind", "noise_gap", "-o",
                                            tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(AtprobeError, match="no train/test accuracy"):
        plot.generalization_gaps({"r": run_curves(runs[0]).assign(split="val")})
