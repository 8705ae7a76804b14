"""atprobe.plot and `atprobe plot`: every kind drawn from CSVs the commands really wrote
(tiny runs, once per module), PNG sizes, what is drawn against the tables, errors."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from atprobe import plot
from atprobe.errors import AtprobeError
from tests.conftest import cli_error, run_cli

DPI = 40
TRAIN = ["train", "--arch", "mlp", "--train-n", "192", "--batch-size", "64", "--eval-n", "48", "--steps", "1",
         "--eval-attack", "pgd2", "--save-every", "1", "--log-grad-ratio", "4", "--device", "cpu", "-q"]
PROBE = ["--steps", "1", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def csvs(tmp_path_factory):
    """Every CSV kind, written by the commands on two tiny runs (PGD-AT on half-noisy labels,
    3 epochs; TRADES on true labels, 2 epochs)."""
    root = tmp_path_factory.mktemp("plot")
    pgd, trades = root / "pgd", root / "trades"
    run_cli(*TRAIN, "--method", "pgd_at", "--epochs", "3", "--label-noise", "0.5", "--out", pgd)
    run_cli(*TRAIN, "--method", "trades", "--epochs", "2", "--out", trades)
    out = {"curves": pgd / "curves.csv", "curves2": trades / "curves.csv",
           "gradratio": pgd / "gradratio.csv", "gradratio2": trades / "gradratio.csv"}
    out["eval"] = root / "eval.csv"
    run_cli("eval", pgd / "final.pt", trades / "final.pt", "--attack", "natural,pgd2,fgsm", "--n", "32",
            "--device", "cpu", "-q", "-o", out["eval"])
    out["gradnorm"] = root / "gradnorm.csv"
    run_cli("gradnorm", *(pgd / f"epoch_{e:04d}.pt" for e in (1, 2, 3)), "--n", "12", "--noisy-vs-clean",
            "--per-sample", *PROBE, "-o", out["gradnorm"])
    out["gradnorm_samples"] = root / "gradnorm.samples.csv"
    out["gradnorm1"] = root / "gradnorm_one.csv"  # one checkpoint: bars, not lines
    run_cli("gradnorm", trades / "final.pt", "--n", "8", *PROBE, "-o", out["gradnorm1"])
    out["stability"] = root / "stability_final.csv"
    run_cli("stability", pgd / "final.pt", "--n", "4", "--losses", "pgd_at,trades,clean", "--lambdas", "-0.05:0.05:5",
            *PROBE, "-o", out["stability"])
    out["stability2"] = root / "stability_init.csv"  # two directions: averaged
    run_cli("stability", "--init", "mlp", "--n", "4", "--losses", "pgd_at,clean", "--lambdas", "-0.05:0.05:3",
            "--directions", "2", *PROBE, "-o", out["stability2"])
    out["gradcos"] = root / "gradcos.csv"
    run_cli("gradcos", pgd, "--n", "6", *PROBE, "-o", out["gradcos"])
    out["gradcos2"] = root / "gradcos_trades.csv"
    run_cli("gradcos", trades, "--n", "6", "--loss", "trades", *PROBE, "-o", out["gradcos2"])
    out["runs"] = (pgd, trades)
    return out


@pytest.fixture(scope="module")
def more(csvs):
    """The CSVs of the Sec. 3.3 / 4.1 probes on the same runs."""
    pgd, trades = csvs["runs"]
    root = pgd.parent
    out = {"complexity": root / "complexity.csv"}
    run_cli("complexity", pgd, trades / "final.pt", "--measures", "spectral,l1,margin,gap", "--margin", "--n", "8",
            "--steps", "1", "--device", "cpu", "-q", "-o", out["complexity"])
    run_cli("hardness", pgd / "final.pt", trades / "final.pt", pgd / "epoch_0001.pt", "--n", "16", "--attack", "pgd1",
            "--top-k", "5", "--gallery-k", "2", "--device", "cpu", "-q", "--out", root / "hard")
    out["hardness"], out["hardness_consistency"] = root / "hard" / "per_sample.csv", root / "hard" / "consistency.csv"
    run_cli("curvature", pgd / "final.pt", trades / "final.pt", "--n", "8", "--iterations", "10", "--per-sample",
            "--device", "cpu", "-q", "-o", root / "curv.csv")
    out["curvature"], out["curvature_samples"] = root / "curv.csv", root / "curv.samples.csv"
    run_cli("hessian", pgd / "final.pt", "--n", "8", "--batch-size", "8", "--top-k", "2", "--trace-samples", "4",
            "--iterations", "20", "--density", "--density-steps", "8", *PROBE, "-o", root / "hess.csv")
    out["hessian"], out["hessian_density"] = root / "hess.csv", root / "hess.density.csv"
    run_cli("flatness", pgd / "final.pt", trades / "final.pt", "--n", "6", "--directions", "2", "--lambdas",
            "-0.2:0.2:5", "--curve", *PROBE, "-o", root / "flat.csv")
    out["flatness"], out["flatness_curve"] = root / "flat.csv", root / "flat.curve.csv"
    return out


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def _check_png(path: Path, fig) -> None:
    """A PNG of figsize * dpi pixels with a real drawing on it (not blank)."""
    import matplotlib.image

    w, h = fig.get_size_inches() * DPI
    assert _png_size(path) == (round(w), round(h))
    pixels = matplotlib.image.imread(str(path))[..., :3]
    ink = (pixels < 0.9).any(axis=2).mean()
    assert 0.02 < ink < 0.9, ink  # some, not all, of the image is drawn on
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # colours, text, lines


# every kind: (CSV names in the fixture, the kind)
# (one run of curves, gradratio, gradcos: drawn in the tests of their values below)
CASES = {
    "curves two runs": (["curves", "curves2"], "curves"),
    "gradratio two runs": (["gradratio", "gradratio2"], "gradratio"),
    "gradnorm over epochs": (["gradnorm"], "gradnorm"),
    "gradnorm one checkpoint": (["gradnorm1"], "gradnorm"),
    "gradnorm_samples": (["gradnorm_samples"], "gradnorm_samples"),
    "stability": (["stability"], "stability"),
    "stability two checkpoints": (["stability", "stability2"], "stability"),
    "gradcos two runs": (["gradcos", "gradcos2"], "gradcos"),
    "eval": (["eval"], "eval"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_kind_is_recognized_and_drawn_by_the_command(csvs, tmp_path, case):
    names, kind = CASES[case]
    paths = [csvs[n] for n in names]
    for p in paths:
        assert plot.detect_kind(pd.read_csv(p)) == kind
    out = tmp_path / "fig.png"
    result = run_cli("plot", *paths, "-o", out, "--dpi", DPI)
    assert f"wrote {out}" in result.output
    fig = plot.plot(paths, kind=kind)
    _check_png(out, fig)
    assert fig._suptitle is not None and fig._suptitle.get_text()
    for ax in fig.axes:  # every panel says what its axes are
        assert ax.get_xlabel() or ax.get_xticklabels(), case
        assert ax.get_ylabel(), case
    if len(paths) > 1:  # several runs: told apart in one legend, by their file or folder names
        text = " ".join(t.get_text() for leg in fig.legends for t in leg.get_texts())
        sources = plot.short_names([str(p) for p in paths])
        assert all(s in text for s in sources), (sources, text)


MORE = ["complexity", "hardness", "hardness_consistency", "curvature", "curvature_samples", "hessian",
        "hessian_density", "flatness", "flatness_curve"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", MORE)
def test_the_probe_kinds_are_recognized_and_drawn_by_the_command(more, tmp_path, kind):
    path = more[kind]
    assert plot.detect_kind(pd.read_csv(path)) == kind
    out = tmp_path / "fig.png"
    run_cli("plot", path, "-o", out, "--dpi", DPI)
    fig = plot.plot(path)
    _check_png(out, fig)
    visible = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    assert all(ax.get_xlabel() for ax in visible) and all(ax.get_ylabel() for ax in visible[:1]), kind
    if kind != "hardness":  # the hardness probe's own figure names its figure in the axes title
        assert fig._suptitle is not None and fig._suptitle.get_text()


@pytest.mark.slow
def test_complexity_points_are_measure_against_robust_gap(more):
    df = pd.read_csv(more["complexity"])
    fig = plot.complexity(more["complexity"])
    panels = [ax for ax in fig.axes if ax.get_visible()]
    titles = [ax.get_title() for ax in panels]
    assert any(t.startswith("spectral: log10") for t in titles)
    assert not any(t.startswith("spectral: product (") for t in titles)  # the log10 twin is drawn instead
    gap = df[df.variant == "robust_gap"].set_index("checkpoint")["value"]
    ax = panels[[t.startswith("l1: sum (bn") for t in titles].index(True)]
    l1 = df[(df.measure == "l1") & df.variant.str.startswith("sum;")].set_index("checkpoint")["value"]
    drawn = sorted(tuple(np.round(p, 9)) for c in ax.collections for p in c.get_offsets())
    assert drawn == sorted((round(gap[c], 9), round(l1[c], 9)) for c in l1.index)
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "pgd" in legend and "trades" in legend  # the runs tell the points apart
    labelled = pd.read_csv(more["complexity"]).assign(  # a label-kind column gives the markers
        label_noise=lambda d: np.where(d.checkpoint.str.contains("pgd"), 0.5, 0.0))
    legend = " ".join(t.get_text() for t in plot.complexity(labelled).legends[0].get_texts())
    assert "true labels" in legend and "label noise 0.5" in legend  # markers: the label kind
    assert "pgd" in legend and "trades" in legend  # colours: still the runs


def test_slq_density_is_a_smoothed_quadrature():
    from scipy.stats import norm

    grid = np.linspace(-5, 5, 4001)
    one = plot.slq_density(np.array([1.0]), np.array([1.0]), np.array([0]), grid, 0.3)
    assert np.allclose(one, norm.pdf(grid, 1.0, 0.3), rtol=1e-12)
    nodes, weights = np.array([-1.0, 0.0, 2.0, 0.5]), np.array([0.2, 0.8, 0.6, 0.4])
    two = plot.slq_density(nodes, weights, np.array([0, 0, 1, 1]), grid, 0.2)
    want = 0.5 * (0.2 * norm.pdf(grid, -1, 0.2) + 0.8 * norm.pdf(grid, 0, 0.2)
                  + 0.6 * norm.pdf(grid, 2, 0.2) + 0.4 * norm.pdf(grid, 0.5, 0.2))
    assert np.allclose(two, want, rtol=1e-12) and abs(np.sum((two[1:] + two[:-1]) / 2 * np.diff(grid)) - 1) < 1e-6


def test_the_figure_functions_take_frames_paths_lists_and_dicts(csvs):
    df = pd.read_csv(csvs["eval"])
    for data in (df, csvs["eval"], str(csvs["eval"]), [csvs["eval"]], {"mine": df}):
        fig = plot.eval_bars(data)
        assert len(fig.axes) == 1
    kind, both = plot.load({"pgd": csvs["curves"], "trades": csvs["curves2"]})
    assert kind == "curves" and list(dict.fromkeys(both["source"])) == ["pgd", "trades"]
    kind, both = plot.load([csvs["curves"], csvs["curves2"]])
    assert list(dict.fromkeys(both["source"])) == ["pgd", "trades"]  # folders, since both are curves.csv
    assert len(both) == len(pd.read_csv(csvs["curves"])) + len(pd.read_csv(csvs["curves2"]))
    with pytest.raises(AtprobeError, match="gradnorm"):  # the function checks its own columns
        plot.stability(csvs["gradnorm"])


def test_learning_curves_draw_the_tables_values(csvs):
    fig = plot.learning_curves(csvs["curves"])
    natural, robust = fig.axes
    df = pd.read_csv(csvs["curves"])
    for ax, metric in ((natural, "natural_acc"), (robust, "pgd2_acc")):
        drawn = sorted(tuple(np.round(line.get_ydata(), 12)) for line in ax.get_lines() if len(line.get_xdata()) > 1)
        want = sorted(tuple(np.round(g.sort_values("epoch")["value"].to_numpy(), 12))
                      for _, g in df[df.metric == metric].groupby("split"))
        assert drawn == want
    assert "PGD2" in robust.get_title() and "Fig. 2" in fig._suptitle.get_text()


def test_eval_bars_are_the_accuracies(csvs):
    df = pd.read_csv(csvs["eval"])
    fig = plot.eval_bars(csvs["eval"])
    heights = sorted(round(p.get_height(), 12) for c in fig.axes[0].containers for p in c.patches)
    assert heights == sorted(np.round(df["accuracy"].to_numpy(), 12))
    assert "8/255" in fig.axes[0].get_title()


def test_gradient_norms_use_log_scales_and_the_paper_ratio(csvs):
    fig = plot.gradnorm(csvs["gradnorm"])
    norms, ratios = fig.axes
    assert norms.get_yscale() == "log" and norms.get_xlabel().startswith("epoch")
    df = pd.read_csv(csvs["gradnorm"])
    want = df[(df.quantity == "ratio_r_ce") & (df.statistic == "ratio_of_means")]
    ys = {round(y, 12) for line in ratios.get_lines() for y in line.get_ydata()}
    assert {round(v, 12) for v in want["value"]} <= ys  # the ratio of means, every group
    assert "noisy" in " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert plot.gradnorm(csvs["gradnorm1"]).axes[0].get_yscale() == "log"
    assert plot.gradnorm_samples(csvs["gradnorm_samples"]).axes[0].get_yscale() == "log"
    assert plot.grad_ratio(csvs["gradratio"]).axes[0].get_yscale() == "log"


def _curves(ax, points):
    return sorted(tuple(np.round(line.get_ydata(), 12)) for line in ax.get_lines() if len(line.get_xdata()) == points)


@pytest.mark.parametrize("name,points", [("stability", 5), ("stability2", 3)])
def test_stability_panels_are_distance_and_cosine_per_loss(csvs, name, points):
    df = pd.read_csv(csvs[name])
    fig = plot.stability(csvs[name])
    dist, cos = fig.axes
    for ax, col in ((dist, "dist_mean"), (cos, "cos_mean")):  # mean over directions, one line per loss
        mean = df.groupby(["loss", "lam"])[col].mean()
        assert _curves(ax, points) == sorted(tuple(np.round(mean[loss].to_numpy(), 12)) for loss in set(df["loss"]))
    assert "cos" in cos.get_ylabel() and "λ" in cos.get_xlabel()
    assert ("2 directions" in dist.get_ylabel()) == (name == "stability2")


def test_gradcos_is_drawn_at_the_later_epoch(csvs):
    df = pd.read_csv(csvs["gradcos"])
    fig = plot.gradcos(csvs["gradcos"])
    line = next(ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) == len(df))
    assert line.get_xdata().tolist() == df["epoch_b"].tolist()
    assert np.allclose(line.get_ydata(), df["cos_mean"])


@pytest.mark.slow
def test_pdf_and_svg_are_written_and_reproducible(csvs, tmp_path):
    for suffix, magic in ((".pdf", b"%PDF"), (".svg", b"<?xml")):
        a, b = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
        run_cli("plot", csvs["gradcos"], "-o", a, "--title", "my title", "-q")
        run_cli("plot", csvs["gradcos"], "-o", b, "--title", "my title", "-q")
        assert a.read_bytes().startswith(magic) and a.read_bytes() == b.read_bytes()


def test_list_kinds_prints_the_registry():
    result = run_cli("plot", "--list-kinds")
    for name, kind in plot.KINDS.items():
        assert name in result.output and kind.description in result.output
        assert ", ".join(kind.columns) in result.output


def _error(tmp_path, *args, fragment):
    out = tmp_path / "fig.png"
    last = cli_error("plot", *args, "-o", out) if "-o" not in args else cli_error("plot", *args)
    assert fragment in last, last
    assert not out.exists() and not list(tmp_path.glob(".fig.png.*"))  # nothing written, no temp left
    return last


def test_unknown_and_mixed_kinds_are_clear_errors(csvs, tmp_path):
    odd = tmp_path / "odd.csv"
    odd.write_text("alpha,beta\n1,2\n")
    last = _error(tmp_path, odd, fragment="match no known kind")
    assert all(k in last for k in plot.KINDS)  # the error lists the kinds
    last = _error(tmp_path, csvs["eval"], csvs["stability"], fragment="different kinds")
    assert "'eval'" in last and "'stability'" in last
    _error(tmp_path, csvs["eval"], "--kind", "bogus", fragment="unknown kind 'bogus'")
    _error(tmp_path, csvs["eval"], "--kind", "stability", fragment="lacks the columns")
    with pytest.raises(AtprobeError, match="match no known kind"):
        plot.detect_kind(pd.DataFrame({"x": [1]}))
    with pytest.raises(AtprobeError, match="different kinds"):
        plot.plot([csvs["eval"], csvs["gradcos"]])


def test_bad_files_and_formats_are_one_line_errors(csvs, tmp_path):
    _error(tmp_path, tmp_path / "missing.csv", fragment="no such file")
    broken = tmp_path / "broken.csv"
    broken.write_text('a,b\n"1,2\n')
    _error(tmp_path, broken, fragment="cannot read it as a CSV")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    _error(tmp_path, empty, fragment="cannot read it as a CSV")
    header_only = tmp_path / "header.csv"
    header_only.write_text("checkpoint,split,attack,n,accuracy\n")
    _error(tmp_path, header_only, fragment="no rows")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    _error(tmp_path, binary, fragment="binary.csv")
    notnum = tmp_path / "notnum.csv"
    notnum.write_text("checkpoint,split,attack,n,accuracy\na.pt,test,natural,10,high\n")
    _error(tmp_path, notnum, fragment="'accuracy'")
    _error(tmp_path, csvs["eval"], "-o", tmp_path / "fig.jpg", fragment="end the name with .png, .pdf, .svg")
    assert not (tmp_path / "fig.jpg").exists()
    assert "-o FIG" in cli_error("plot", csvs["eval"])
    with pytest.raises(AtprobeError, match="format"):
        plot.save_figure(plot.eval_bars(csvs["eval"]), tmp_path / "fig.gif")


def test_an_existing_figure_is_replaced_only_by_a_whole_new_one(csvs, tmp_path):
    out = tmp_path / "fig.png"
    run_cli("plot", csvs["eval"], "-o", out, "--dpi", DPI, "-q")
    before = out.read_bytes()
    cli_error("plot", csvs["eval"], "--kind", "stability", "-o", out)
    assert out.read_bytes() == before
    run_cli("plot", csvs["eval"], "-o", out, "--dpi", 2 * DPI, "-q")
    assert _png_size(out) == tuple(round(v) for v in plot.eval_bars(csvs["eval"]).get_size_inches() * 2 * DPI)


def test_short_names_tell_paths_apart():
    assert plot.short_names(["runs/pgd/curves.csv", "runs/trades/curves.csv"]) == ["pgd", "trades"]
    assert plot.short_names(["s_init.csv", "s_final.csv"]) == ["s_init", "s_final"]
    assert plot.short_names(["a/x.csv", "b/y.csv"]) == ["a/x", "b/y"]
    assert plot.short_names(["run/epoch_0001.pt", "run/epoch_0002.pt"]) == ["epoch_0001", "epoch_0002"]
    assert plot.short_names(["one/two.csv"]) == ["two"]
    assert plot.short_names(["a/b.csv", "a/c/b.csv"]) == ["b", "c/b"]
    assert plot.short_names(["x.csv", "x.csv"]) == ["x", "x (2)"]


def test_no_backend_or_style_is_chosen_on_import_or_left_behind(csvs):
    code = ("import sys, atprobe, atprobe.plot, atprobe.cli.plot; "
            "print(sorted(m for m in ('matplotlib', 'seaborn', 'matplotlib.pyplot') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    import matplotlib

    before = {k: v for k, v in matplotlib.rcParams.items() if k != "backend"}
    plot.stability(csvs["stability"])
    after = {k: v for k, v in matplotlib.rcParams.items() if k != "backend"}
    assert [k for k in before if before[k] != after[k]] == []
