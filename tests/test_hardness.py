"""``atprobe hardness``: per-sample adversarial losses against a plain loop (float64), ranks,
the consistency table against scipy on the written CSV, self-comparison, the figures, the
command's errors, and two PGD-AT seeds that agree on which samples are hard."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Mapping

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from atprobe import plot
from atprobe.attacks import PGDConfig
from atprobe.checkpoint import load_checkpoint
from atprobe.data import Split, load_dataset, symmetric_label_noise
from atprobe.errors import AtprobeError
from atprobe.probes import hardness
from atprobe.probes.hardness import HardnessConfig
from atprobe.study import expand_checkpoints, model_names
from atprobe.threat import ThreatModel
from tests.conftest import keyed_start, run_cli, save_seeded_checkpoint, tiny_net


@pytest.fixture(autouse=True)
def _one_thread_and_restore_global_torch_state():
    """One thread (small workloads; the CI machine is shared) and the global RNG restored
    (the CLI seeds it)."""
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def _split(n: int = 11, classes: int = 5, seed: int = 3, offset: int = 40) -> Split:
    """uint8 3x8x8 images whose original rows (``index``, which key the random starts) are
    not their positions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, classes, (n,), generator=g)
    index = torch.randperm(n, generator=g) + offset
    return Split(x=x, y=y, true_y=y.clone(), index=index)


# ------------------------------------------------------------------------- library


def _plain_adv_loss(model: nn.Module, x: torch.Tensor, y: int, sample_id: int, attack: PGDConfig,
                    seed: int) -> tuple[float, bool]:
    """One sample: the textbook L-inf PGD loop from the per-sample start, then its CE."""
    x = x[None]
    target = torch.tensor([y])
    delta = keyed_start(x, attack, seed, [sample_id])
    for _ in range(attack.steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), target)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + attack.alpha * grad.sign()).clamp(-attack.eps, attack.eps)
        delta = (x + delta).clamp(0, 1) - x
    with torch.no_grad():
        logits = model(x + delta)
    return float(F.cross_entropy(logits, target)), bool(logits.argmax(1).item() == y)


def test_per_sample_losses_equal_an_independent_loop():
    data = _split()
    other_labels = (data.y + 2) % 5  # model b uses its own labels (as with --labels trained)
    models = {"a": tiny_net(seed=0).eval(), "b": tiny_net(seed=1).eval()}
    splits = {"a": data, "b": data.with_labels(other_labels)}
    config = HardnessConfig(attack="pgd3", batch_size=4, seed=5)  # batches of 4: samples cross batches
    df = hardness.per_sample_losses(models, splits, config)

    assert list(df.columns) == hardness.COLUMNS
    assert list(df["model"]) == ["a"] * 11 + ["b"] * 11
    attack = config.spec.config
    assert attack.steps == 3 and attack.eps == 8 / 255 and attack.alpha == 2 / 255
    images = data.x.float().div(255).double()  # the images as the probe sees them: float32 [0, 1], then float64
    for name, model in models.items():
        part = df[df["model"] == name]
        assert part["index"].tolist() == data.index.tolist()
        assert part["label"].tolist() == splits[name].y.tolist()
        assert part["true_label"].tolist() == data.true_y.tolist()
        for row, (i, y) in enumerate(zip(data.index.tolist(), splits[name].y.tolist())):
            loss, correct = _plain_adv_loss(model, images[row], y, i, attack, seed=5)
            assert part["adv_loss"].iloc[row] == pytest.approx(loss, rel=1e-12, abs=1e-14)
            assert bool(part["adv_correct"].iloc[row]) == correct
    # the attack did something: the adversarial loss is above the clean one everywhere
    with torch.no_grad():
        clean = F.cross_entropy(models["a"](images), data.y, reduction="none")  # same images
    assert (df[df["model"] == "a"]["adv_loss"].to_numpy() > clean.numpy()).all()


def test_same_seed_same_losses_other_seed_other_starts():
    data = _split()
    models = {"a": tiny_net(seed=0).eval(), "b": tiny_net(seed=1).eval()}
    one = hardness.per_sample_losses(models, data, HardnessConfig(attack="pgd2", seed=1))
    again = hardness.per_sample_losses(models, data, HardnessConfig(attack="pgd2", seed=1, batch_size=3))
    other = hardness.per_sample_losses(models, data, HardnessConfig(attack="pgd2", seed=2))
    assert one["adv_loss"].to_numpy() == pytest.approx(again["adv_loss"].to_numpy(), rel=1e-12)
    assert not np.allclose(one["adv_loss"].to_numpy(), other["adv_loss"].to_numpy(), rtol=1e-9)


def test_ranks_follow_the_loss_descending_with_ties_in_sample_order():
    assert hardness.ranks([1.0, 3.0, 3.0, float("nan"), 2.0]).tolist() == [4, 1, 2, 5, 3]
    # duplicated images under the natural "attack" tie exactly: the earlier row ranks first
    base = _split(n=6)
    rows = [0, 1, 2, 0, 3, 4, 5, 1]
    data = base.subset(rows)
    df = hardness.per_sample_losses({"a": tiny_net(seed=0).eval(), "b": tiny_net(seed=2).eval()}, data,
                                    HardnessConfig(attack="natural"))
    for _, part in df.groupby("model"):
        loss = part["adv_loss"].to_numpy()
        assert loss[0] == loss[3] and loss[1] == loss[7]
        rank = part["rank"].to_numpy()
        assert sorted(rank.tolist()) == list(range(1, 9))
        assert rank[0] < rank[3] and rank[1] < rank[7]
        by_rank = loss[np.argsort(rank)]
        assert (np.diff(by_rank) <= 0).all()  # rank 1 = the largest loss, then non-increasing


def test_consistency_hand_numbers_and_self_comparison():
    table = pd.DataFrame({
        "index": [7, 8, 9, 10] * 3,
        "model": ["a"] * 4 + ["b"] * 4 + ["c"] * 4,
        "adv_loss": [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 4.0, 3.0, 1.0, 2.0, 3.0, 4.0],
    })
    table["rank"] = np.concatenate([hardness.ranks(p["adv_loss"]) for _, p in table.groupby("model", sort=False)])
    out = hardness.consistency(table, top_k=2)
    assert list(out.columns) == hardness.CONSISTENCY_COLUMNS
    assert list(zip(out["model_a"], out["model_b"])) == [("a", "b"), ("a", "c"), ("b", "c")]
    ab = out.iloc[0]
    # one discordant pair of six: tau = (5 - 1) / 6; rho = 1 - 6 * 2 / (4 * 15)
    assert ab["kendall_tau"] == pytest.approx(2 / 3, rel=1e-12)
    assert ab["spearman_rho"] == pytest.approx(0.8, rel=1e-12)
    assert ab["top_k"] == 2 and ab["top_k_overlap"] == 1.0  # {9, 10} for both
    assert out.iloc[1]["kendall_tau"] == pytest.approx(1.0) and out.iloc[1]["top_k_overlap"] == 1.0
    one = hardness.consistency(table, top_k=1)
    assert one.iloc[0]["top_k_overlap"] == 0.0  # hardest: 10 for a, 9 for b
    assert (hardness.consistency(table, top_k=50)["top_k"] == 4).all()  # capped at n
    with pytest.raises(AtprobeError, match="at least two models"):
        hardness.consistency(table[table["model"] == "a"])
    with pytest.raises(AtprobeError, match="other samples"):
        hardness.consistency(table.iloc[[0, 1, 2, 3, 5, 4, 6, 7]])


def test_probe_visits_each_model_once_and_checks_classes():
    data = _split()
    visits: list[str] = []

    class Lazy(Mapping):  # builds a model on each access, as the CLI's LazyModels loads one
        def __getitem__(self, name):
            visits.append(name)
            return tiny_net(seed=int(name[-1])).eval()

        def __iter__(self):
            return iter(["m0", "m1", "m2"])

        def __len__(self):
            return 3

    lazy = Lazy()
    table = hardness.probe(lazy, data, HardnessConfig(attack="pgd1", top_k=3))
    assert visits == ["m0", "m1", "m2"]
    assert len(table) == 3 and (table["n"] == 11).all() and (table["top_k"] == 3).all()
    with pytest.raises(AtprobeError, match="different numbers of classes"):
        hardness.per_sample_losses({"a": tiny_net(classes=5), "b": tiny_net(classes=7)}, data,
                                   HardnessConfig(attack="natural"))
    with pytest.raises(AtprobeError, match="at least two models"):
        hardness.probe({"a": tiny_net()}, data)
    with pytest.raises(AtprobeError, match="other samples"):
        hardness.per_sample_losses({"a": tiny_net(), "b": tiny_net()}, {"a": data, "b": data.subset([1, 0, 2])})


@pytest.mark.parametrize("kwargs, fragment", [
    ({"attack": "pgd0"}, "at least one step"),
    ({"attack": "bogus"}, "unknown attack"),
    ({"threat": "8/255"}, "ThreatModel"),
    ({"top_k": 0}, "top-k"),
    ({"batch_size": 0}, "batch size"),
])
def test_config_errors_are_one_line(kwargs, fragment):
    with pytest.raises(AtprobeError, match=fragment) as info:
        HardnessConfig(**kwargs)
    assert "\n" not in str(info.value)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_figures_have_the_requested_pixel_size():
    k = 3
    natural = torch.rand(k, 3, 8, 8)
    fig = plot.gallery_figure(natural, natural.flip(1), ["a", "b", "c"], size=(437, 211))
    assert _png_size(plot.png_bytes(fig)) == (437, 211)
    assert _png_size(plot.png_bytes(plot.gallery_figure(natural, natural, ["a", "b", "c"]))) == \
        plot.default_gallery_size(k)
    assert plot.parse_size(" 640X480 ") == (640, 480)
    for bad in ("640", "0x10", "ax3", "10x99999"):
        with pytest.raises(AtprobeError):
            plot.parse_size(bad)


# ------------------------------------------------------------------------- CLI




@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardness_ckpts")
    synthetic = load_dataset("synthetic")
    noisy = symmetric_label_noise(synthetic.train.true_y, 0.5, 10, seed=0)
    paths = {
        "a": save_seeded_checkpoint(root / "runs" / "a" / "model.pt", seed=0),
        "b": save_seeded_checkpoint(root / "runs" / "b" / "model.pt", seed=1),
        "noisy": save_seeded_checkpoint(root / "runs" / "noisy.pt", seed=2, labels=noisy,
                       label_spec={"label_noise": 0.5, "label_seed": 0}),
        "classes5": save_seeded_checkpoint(root / "other" / "c5.pt", seed=3, classes=5),
        "cifar": save_seeded_checkpoint(root / "other" / "cifar.pt", seed=4, dataset="cifar10"),
        "synthetic1": save_seeded_checkpoint(root / "other" / "syn1.pt", seed=5, train_config={"synthetic_seed": 1}),
    }
    copy = root / "copy" / "a" / "model.pt"
    copy.parent.mkdir(parents=True)
    shutil.copyfile(paths["a"], copy)
    paths["a_copy"] = copy
    rundir = root / "rundir"
    rundir.mkdir()
    for name in ("epoch_0002.pt", "epoch_0001.pt", "last.pt", "final.pt"):
        shutil.copyfile(paths["a"], rundir / name)
    paths["rundir"] = rundir
    lonely = root / "lonely"
    lonely.mkdir()
    shutil.copyfile(paths["a"], lonely / "last.pt")
    paths["lonely"] = lonely
    paths["noisy_labels"] = noisy
    paths["root"] = root
    return paths


def checkpoint_paths(args):
    """The files the one expansion rule (``atprobe.study.expand_checkpoints``) reads."""
    return [c.path for c in expand_checkpoints(args, load_checkpoint)]


def test_checkpoint_paths_and_names(ckpts):
    paths = checkpoint_paths([str(ckpts["rundir"]), str(ckpts["a"])])
    # final.pt holds the epoch its epoch files hold (copies of one model here): left out as a copy
    assert [p.name for p in paths] == ["epoch_0001.pt", "epoch_0002.pt", "model.pt"]
    assert model_names([ckpts["a"], ckpts["b"], ckpts["noisy"]]) == ["a/model.pt", "b/model.pt", "noisy.pt"]
    assert model_names(paths[:2]) == ["epoch_0001.pt", "epoch_0002.pt"]
    with pytest.raises(AtprobeError, match="given twice"):
        model_names([ckpts["a"], ckpts["a"].parent / ".." / "a" / "model.pt"])


def test_hardness_writes_tables_that_match_scipy(ckpts, tmp_path):
    out = tmp_path / "out"
    args = ["hardness", ckpts["a"], ckpts["b"], ckpts["noisy"], "--n", "48", "--attack", "pgd2", "--top-k", "10",
            "--gallery-k", "4", "--gallery-size", "500x260", "--out", out, "--device", "cpu", "--seed", "3"]
    result = run_cli(*args)
    assert "labels: a/model.pt trained" not in result.output  # no stored labels: true ones
    assert "a/model.pt true" in result.output and "noisy.pt trained" in result.output

    per = pd.read_csv(out / "per_sample.csv")
    con = pd.read_csv(out / "consistency.csv")
    assert list(per.columns) == hardness.COLUMNS and list(con.columns) == hardness.CONSISTENCY_COLUMNS
    names = ["a/model.pt", "b/model.pt", "noisy.pt"]
    assert list(dict.fromkeys(per["model"])) == names and len(per) == 3 * 48
    assert list(zip(con["model_a"], con["model_b"])) == [(names[0], names[1]), (names[0], names[2]),
                                                         (names[1], names[2])]
    # each model's labels: the stored training labels for noisy.pt, the true ones otherwise
    noisy = per[per["model"] == "noisy.pt"]
    assert noisy["label"].tolist() == ckpts["noisy_labels"][torch.tensor(noisy["index"].tolist())].tolist()
    assert (noisy["label"] != noisy["true_label"]).any()
    clean = per[per["model"] == "a/model.pt"]
    assert (clean["label"] == clean["true_label"]).all() and clean["index"].tolist() == list(range(48))

    # every statistic recomputed with scipy from the written per-sample columns
    for _, row in con.iterrows():
        la = per[per["model"] == row["model_a"]]
        lb = per[per["model"] == row["model_b"]]
        tau, tau_p = stats.kendalltau(la["adv_loss"], lb["adv_loss"])
        rho, rho_p = stats.spearmanr(la["adv_loss"], lb["adv_loss"])
        assert row["n"] == 48 and row["top_k"] == 10
        assert row["kendall_tau"] == pytest.approx(tau, rel=1e-12)
        assert row["kendall_p"] == pytest.approx(tau_p, rel=1e-9)
        assert row["spearman_rho"] == pytest.approx(rho, rel=1e-12)
        assert row["spearman_p"] == pytest.approx(rho_p, rel=1e-9)
        top_a = set(la["index"][la["rank"] <= 10])
        top_b = set(lb["index"][lb["rank"] <= 10])
        assert row["top_k_overlap"] == len(top_a & top_b) / 10
    # the written ranks are the sort of the written losses
    for _, part in per.groupby("model"):
        order = np.argsort(-part["adv_loss"].to_numpy(), kind="stable")
        assert part["rank"].to_numpy()[order].tolist() == list(range(1, 49))

    with open(out / "hardest.png", "rb") as f:
        assert _png_size(f.read()) == (500, 260)
    import matplotlib.image

    assert matplotlib.image.imread(out / "hardest.png").shape[:2] == (260, 500)
    assert matplotlib.image.imread(out / "sorted.png").shape[:2] == plot.SORTED_SIZE[::-1]

    meta = json.loads((out / "per_sample.meta.json").read_text())
    assert meta["command"] == ["atprobe", *map(str, args)]
    assert meta["labels_used"] == {names[0]: "true", names[1]: "true", names[2]: "trained"}
    assert meta["models"][names[2]] == str(ckpts["noisy"])
    assert meta["config"]["attack"] == "pgd2" and meta["config"]["n"] == 48 and meta["config"]["seed"] == 3
    assert json.loads((out / "consistency.meta.json").read_text())["rows"] == 3
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    # same seed, same bytes
    again = tmp_path / "again"
    run_cli(*args[:-6], "--out", again, "--device", "cpu", "--seed", "3", "-q")
    assert (again / "per_sample.csv").read_bytes() == (out / "per_sample.csv").read_bytes()
    assert (again / "consistency.csv").read_bytes() == (out / "consistency.csv").read_bytes()


def test_a_model_compared_with_itself_has_tau_one(ckpts, tmp_path):
    out = tmp_path / "self"
    run_cli("hardness", ckpts["a"], ckpts["a_copy"], "--n", "40", "--attack", "pgd2", "--top-k", "5",
            "--out", out, "--device", "cpu", "-q")
    con = pd.read_csv(out / "consistency.csv")
    assert len(con) == 1
    row = con.iloc[0]
    assert row["model_a"] != row["model_b"]  # runs/a/model.pt and copy/a/model.pt
    assert row["kendall_tau"] == pytest.approx(1.0, abs=1e-12) and row["spearman_rho"] == pytest.approx(1.0, abs=1e-12)
    assert row["top_k_overlap"] == 1.0
    per = pd.read_csv(out / "per_sample.csv")
    a, b = (part for _, part in per.groupby("model", sort=False))
    assert a["adv_loss"].tolist() == b["adv_loss"].tolist()


def test_a_directory_gives_all_pairs(ckpts, tmp_path):
    """A plain folder of models (not a run directory) stands for its *.pt files by name."""
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("x.pt", "y.pt", "z.pt", "last.pt"):
        shutil.copyfile(ckpts["a"], folder / name)
    out = tmp_path / "dir"
    run_cli("hardness", folder, "--n", "8", "--attack", "fgsm", "--out", out, "--device", "cpu", "-q")
    con = pd.read_csv(out / "consistency.csv")
    assert len(con) == 3 and set(con["model_a"]) | set(con["model_b"]) == {"x.pt", "y.pt", "z.pt"}
    assert con["kendall_tau"].tolist() == pytest.approx([1.0] * 3, abs=1e-12)  # copies of one model
    assert (con["top_k_overlap"] == 1.0).all()


def _bad_cases(c):
    return {
        "one model": (["hardness", c["a"]], "at least two"),
        "directory of last.pt only": (["hardness", c["lonely"]], "no checkpoints in this directory"),
        "same file twice": (["hardness", c["a"], c["a"]], "given twice"),
        "classes differ": (["hardness", c["a"], c["classes5"]], "different numbers of classes"),
        "n too large": (["hardness", c["a"], c["b"], "--n", "4001"], "larger than the split"),
        "n and all": (["hardness", c["a"], c["b"], "--n", "5", "--all"], "not both"),
        "datasets differ": (["hardness", c["a"], c["cifar"]], "different datasets"),
        "synthetic data differ": (["hardness", c["a"], c["synthetic1"]], "different synthetic data"),
        "bad gallery size": (["hardness", c["a"], c["b"], "--gallery-size", "big"], "WIDTHxHEIGHT"),
        "top-k 0": (["hardness", c["a"], c["b"], "--top-k", "0"], "--top-k"),
        "bad attack": (["hardness", c["a"], c["b"], "--attack", "apgd"], "unknown attack"),
        "missing file": (["hardness", c["a"], c["a"].parent / "nope.pt"], "nope.pt"),
    }


@pytest.mark.parametrize("case", ["one model", "directory of last.pt only", "same file twice", "classes differ",
                                  "n too large", "n and all", "datasets differ", "synthetic data differ",
                                  "bad gallery size", "top-k 0",
                                  "bad attack", "missing file"])
def test_bad_input_is_one_line_exit_2(case, ckpts, tmp_path):
    args, fragment = _bad_cases(ckpts)[case]
    out_dir = tmp_path / "out"
    result = run_cli(*args, "--out", out_dir, "--device", "cpu", "-q", expect=2)
    assert len(result.output.strip().splitlines()) == 1, result.output  # not even a usage line
    assert fragment in result.output, result.output
    assert not out_dir.exists()


def test_dataset_override_passes_the_disagreement(ckpts, tmp_path):
    out = tmp_path / "override"
    run_cli("hardness", ckpts["a"], ckpts["cifar"], "--dataset", "synthetic", "--n", "6", "--attack",
            "natural", "--out", out, "--device", "cpu", "-q")
    assert len(pd.read_csv(out / "consistency.csv")) == 1


# ------------------------------------------------------------------------- the paper's finding, small


@pytest.mark.slow
def test_two_pgd_at_seeds_agree_on_the_hard_samples(tmp_path):
    """Two seeds of cnn-small trained with PGD-AT (PGD-2, 3 epochs, 500 synthetic images) rank
    those training images by adversarial loss alike: Kendall's tau about 0.6 (the paper:
    0.85 on CIFAR-10 with full training)."""
    from atprobe.train import TrainConfig, train

    runs = []
    for seed in (0, 1):
        config = TrainConfig(method="pgd_at", epochs=3, train_n=500, batch_size=64, lr=0.05,
                             schedule="cosine", eval_n=50, eval_attack="pgd1", seed=seed, threat=ThreatModel(steps=2))
        runs.append(train(config, tmp_path / f"seed{seed}", device="cpu") / "final.pt")
    out = tmp_path / "hard"
    run_cli("hardness", *runs, "--n", "500", "--attack", "pgd3", "--top-k", "50", "--out", out,
            "--device", "cpu", "-q")
    row = pd.read_csv(out / "consistency.csv").iloc[0]
    assert (row["model_a"], row["model_b"]) == ("seed0/final.pt", "seed1/final.pt")
    assert row["kendall_tau"] > 0.4, row
    assert row["kendall_p"] < 1e-10
    assert row["top_k_overlap"] > 3 * 50 / 500, row  # chance: k/n = 0.1


def test_training_run_directory_leaves_out_copies_of_its_epochs(tmp_path):
    """In an `atprobe train` directory best.pt/final.pt repeat an epoch_*.pt: left out, so
    a model is never compared with its own copy; a best.pt of another epoch stays."""
    run = tmp_path / "run"
    for name, epoch in (("epoch_0001.pt", 1), ("epoch_0002.pt", 2), ("final.pt", 2), ("best.pt", 1), ("last.pt", 2)):
        save_seeded_checkpoint(run / name, seed=epoch, epoch=epoch)
    (run / "config.json").write_text("{}")
    assert [p.name for p in checkpoint_paths([str(run)])] == ["epoch_0001.pt", "epoch_0002.pt"]
    save_seeded_checkpoint(run / "best.pt", seed=3, epoch=3)
    assert [p.name for p in checkpoint_paths([str(run)])] == ["epoch_0001.pt", "epoch_0002.pt", "best.pt"]
