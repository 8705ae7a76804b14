"""--bn-stats: which BatchNorm statistics the per-sample probes normalize with (atprobe.bnstats)."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import cli_error, randomize_bn, run_cli, save_seeded_checkpoint

from atprobe import bnstats
from atprobe.data import iterate_batches, load_dataset
from atprobe.errors import AtprobeError
from atprobe.models import build_model
from atprobe.pergrad import objective, per_sample_grads
from atprobe.probes import stability


@pytest.fixture(scope="module")
def train():
    return load_dataset("synthetic").train


def _floats(images):
    """The images as the library feeds them (one batch, channels-last float), in float64."""
    return next(iter(iterate_batches(images, len(images), channels_last=True))).x.double()


@pytest.mark.parametrize("text,mode,n,label", [
    ("running", "running", 1024, "running"), ("recompute", "recompute", 1024, "recompute:1024"),
    ("recompute:64", "recompute", 64, "recompute:64"), (" Batch ", "batch", 1024, "batch"),
    ("auto", "auto", 1024, "auto"),
])
def test_parse(text, mode, n, label):
    spec = bnstats.BNStats.parse(text)
    assert (spec.mode, spec.n, str(spec)) == (mode, n, label)


@pytest.mark.parametrize("text,fragment", [
    ("bogus", "unknown"), ("recompute:x", "integer"), ("recompute:1", ">= 2"), ("batch:4", "only recompute"),
    ("recompute:", "integer"),
])
def test_parse_rejects_nonsense(text, fragment):
    with pytest.raises(AtprobeError, match=fragment):
        bnstats.BNStats.parse(text)


def test_fresh_batchnorm_rule():
    torch.manual_seed(0)
    model = build_model("cnn-small")
    assert bnstats.fresh_batchnorm(model)
    assert not bnstats.fresh_batchnorm(build_model("mlp"))  # no BatchNorm: nothing to recompute
    assert not bnstats.fresh_batchnorm(randomize_bn(copy.deepcopy(model)))
    counted = copy.deepcopy(model)
    next(m for m in counted.modules() if isinstance(m, torch.nn.BatchNorm2d)).num_batches_tracked.fill_(3)
    assert not bnstats.fresh_batchnorm(counted)  # buffers 0/1 but the layer has seen batches


def test_draw_is_seeded_and_capped(train):
    a, b, c = (bnstats.draw_images(train, 50, s) for s in (0, 0, 1))
    assert torch.equal(a.index, b.index) and not torch.equal(a.index, c.index)
    assert len(a) == 50 and len(set(a.index.tolist())) == 50 and bool((a.index.diff() > 0).all())
    assert len(bnstats.draw_images(train.subset(slice(0, 10)), 50, 0)) == 10


@pytest.mark.parametrize("arch", ["cnn-small", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_recompute_is_one_train_mode_batch_of_all_images_whatever_the_batch_size(arch, train):
    """The buffers equal torch's own: fresh buffers, train mode, momentum=None, one forward
    of the N images (float64); the layer-by-layer estimate in batches of 5 agrees."""
    torch.manual_seed(0)
    model = build_model(arch).double().eval()
    before = copy.deepcopy(model.state_dict())
    images = bnstats.draw_images(train, 12 if arch == "resnet18" else 32, 3)
    reference = copy.deepcopy(model).train()
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    with torch.no_grad():
        reference(_floats(images))
    for batch_size in (5, 32):  # 32: the one-forward path
        out = bnstats.recompute_batchnorm(model, images, batch_size=batch_size)
        assert not out.training
        for (k, v), (_, r) in zip(out.state_dict().items(), reference.state_dict().items()):
            torch.testing.assert_close(v, r, rtol=1e-12, atol=1e-12, msg=f"{arch} {k} batch {batch_size}")
    for k, v in model.state_dict().items():  # the model itself untouched
        assert torch.equal(v, before[k]), k


def test_recompute_first_layer_by_hand(train):
    """The first BatchNorm's buffers are the mean and the unbiased variance of its inputs (a
    forward hook on the untouched model: they do not depend on any BatchNorm)."""
    torch.manual_seed(1)
    model = build_model("cnn-small").double().eval()
    images = bnstats.draw_images(train, 20, 0)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    handle = bn.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(_floats(images))
    handle.remove()
    a = seen[0].permute(1, 0, 2, 3).reshape(bn.num_features, -1)
    out = bnstats.recompute_batchnorm(model, images, batch_size=6)
    got = next(m for m in out.modules() if isinstance(m, torch.nn.BatchNorm2d))
    torch.testing.assert_close(got.running_mean, a.mean(1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.running_var, a.var(1, correction=1), rtol=1e-12, atol=1e-14)
    assert int(got.num_batches_tracked) == 1


def test_prepare_resolves_auto_once_per_model(train):
    torch.manual_seed(0)
    fresh = build_model("cnn-small").double()
    trained = randomize_bn(copy.deepcopy(fresh))
    model, label = bnstats.prepare(fresh, bnstats.BNStats("auto", 16), train, seed=0, batch_size=8)
    assert label == "recompute:16" and model is not fresh and not bnstats.fresh_batchnorm(model)
    assert bnstats.fresh_batchnorm(fresh)
    model, label = bnstats.prepare(trained, bnstats.BNStats(), train, seed=0, batch_size=8)
    assert label == "running" and model is trained
    model, label = bnstats.prepare(trained, bnstats.BNStats("batch"), None, seed=0, batch_size=8, chunk_size=5)
    assert label == "batch:5" and bnstats.couples_samples(model) and not bnstats.couples_samples(trained)


def test_batch_mode_per_sample_gradients_go_through_the_chunk_statistics():
    """batch: row i of a chunk's gradients is d l_i / d theta with the chunk's statistics (an
    autograd loop over one forward of the chunk); vmap over single samples would give each
    sample its own statistics, and is refused. The result depends on the chunk."""
    torch.manual_seed(0)
    model = bnstats.batch_statistics_model(build_model("cnn-small").double().eval())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=g)
    got = torch.cat(list(per_sample_grads(model, objective("clean"), x, y, chunk_size=3)))
    params = list(model.parameters())
    rows = []
    for start in (0, 3):
        losses = F.cross_entropy(model(x[start:start + 3]), y[start:start + 3], reduction="none")
        for i in range(3):
            rows.append(torch.cat([t.flatten() for t in torch.autograd.grad(losses[i], params, retain_graph=True)]))
    torch.testing.assert_close(got, torch.stack(rows), rtol=1e-10, atol=1e-12)
    whole = torch.cat(list(per_sample_grads(model, objective("clean"), x, y, chunk_size=6)))
    assert (whole - got).abs().max() > 1e-3  # other chunk, other statistics
    with pytest.raises(AtprobeError, match="batch statistics"):
        list(per_sample_grads(model, objective("clean"), x, y, chunk_size=3, method="vmap"))


def _meta(path):
    return json.loads(path.with_name(path.stem + ".meta.json").read_text())


def test_stability_init_recomputes_by_default(tmp_path, train):
    """The issue's fix: ``stability --init`` no longer probes the identity-BatchNorm network.
    Its rows are the probe's on the model recomputed on 1024 training images (seeded), not on
    the fresh one; ``--bn-stats running`` gives the old table."""
    common = ["--init", "cnn-small", "--seed", "2", "--n", "4", "--losses", "clean", "--lambdas=-0.05,0,0.05",
              "--device", "cpu", "-q"]
    auto, running = tmp_path / "auto.csv", tmp_path / "running.csv"
    run_cli("stability", *common, "-o", auto)
    run_cli("stability", *common, "--bn-stats", "running", "-o", running)
    a, r = pd.read_csv(auto), pd.read_csv(running)
    assert set(a["bn_stats"]) == {"recompute:1024"} and set(r["bn_stats"]) == {"running"}
    assert _meta(auto)["config"]["bn_stats_resolved"] == ["recompute:1024"]
    config = stability.StabilityConfig(losses=("clean",), lambdas=(-0.05, 0.0, 0.05), seed=2, chunk_size=4)
    fresh = stability.init_model("cnn-small", 10, 2)
    samples = train.subset(slice(0, 4)).with_labels(train.subset(slice(0, 4)).true_y)
    recomputed = bnstats.recompute_batchnorm(fresh, bnstats.draw_images(train, 1024, 2), batch_size=1024)
    want = stability.probe(recomputed, samples, config)
    old = stability.probe(fresh, samples, config)
    for col in ("dist_mean", "cos_mean"):
        assert a[col].to_numpy() == pytest.approx(want[col].to_numpy(), rel=1e-6, abs=1e-7), col
        assert r[col].to_numpy() == pytest.approx(old[col].to_numpy(), rel=1e-6, abs=1e-7), col
    assert abs(a["dist_mean"].iloc[0] - r["dist_mean"].iloc[0]) > 0.5 * r["dist_mean"].iloc[0]


def test_init_logits_match_train_mode_only_with_recomputed_statistics(train):
    """At init, eval mode with fresh buffers shrinks cnn-small's logits ~8x against train mode;
    recomputed statistics give the train-mode scale back (docs/probes/stability.md)."""
    model = stability.init_model("cnn-small", 10, 0).eval()
    x = _floats(train.subset(slice(0, 128))).float()
    with torch.no_grad():
        fresh = model(x).std().item()
        recomputed = bnstats.recompute_batchnorm(model, bnstats.draw_images(train, 256, 0), batch_size=256)(x).std()
        trained_mode = copy.deepcopy(model).train()(x).std().item()
    assert fresh < 0.25 * trained_mode
    assert recomputed.item() == pytest.approx(trained_mode, rel=0.1)


def test_gradcos_records_each_checkpoints_statistics(tmp_path):
    run = tmp_path / "run"
    save_seeded_checkpoint(run / "epoch_0000.pt", seed=0, epoch=0)
    save_seeded_checkpoint(run / "epoch_0001.pt", seed=1, epoch=1, random_bn=True)
    out = tmp_path / "c.csv"
    run_cli("gradcos", run, "--n", "2", "--steps", "1", "--loss", "clean", "--bn-stats", "auto", "--device", "cpu",
            "-q", "-o", out)
    df = pd.read_csv(out)
    assert df[["bn_stats_a", "bn_stats_b"]].values.tolist() == [["recompute:1024", "running"]]
    assert _meta(out)["config"]["bn_stats_resolved"] == ["recompute:1024", "running"]


def test_gradnorm_batch_mode_records_the_chunk(tmp_path):
    ckpt = save_seeded_checkpoint(tmp_path / "a.pt", seed=0, epoch=3, random_bn=True)
    out = tmp_path / "g.csv"
    run_cli("gradnorm", ckpt, "--n", "4", "--steps", "1", "--chunk-size", "2", "--bn-stats", "batch", "--device",
            "cpu", "-q", "-o", out)
    assert set(pd.read_csv(out)["bn_stats"]) == {"batch:2"}


@pytest.mark.parametrize("args,fragment", [
    (["gradnorm", "--bn-stats", "bogus"], "unknown BatchNorm statistics"),
    (["stability", "--init", "mlp", "--bn-stats", "recompute:1"], ">= 2"),
    (["curvature", "--bn-stats", "batch"], "not defined for this probe"),
])
def test_cli_rejects(args, fragment, tmp_path):
    ckpt = save_seeded_checkpoint(tmp_path / "a.pt", seed=0, epoch=1)
    command, rest = args[0], args[1:]
    line = cli_error(command, *([] if "--init" in rest else [ckpt]), *rest, "-o", tmp_path / "out" / "x.csv")
    assert fragment in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seed", [0, 1])
def test_fig4a_at_init_with_recomputed_statistics(seed, train):
    """Fig. 4(a) at small scale on a BatchNorm network with the statistics training sees:
    cnn-small at init, BatchNorm recomputed on 1024 training images, 16 samples, lam = +-0.05:
    the PGD-AT gradient changes clearly more than the clean one (ratio ~1.3; with the fresh
    identity BatchNorm it was ~1.1, docs/probes/stability.md)."""
    data = load_dataset("synthetic").train.subset(slice(0, 16))
    model, label = bnstats.prepare(stability.init_model("cnn-small", 10, seed), bnstats.BNStats(), train, seed=seed,
                                   batch_size=1024)
    assert label == "recompute:1024"
    df = stability.probe(model, data, stability.StabilityConfig(
        losses=("pgd_at", "clean"), lambdas=(-0.05, 0.0, 0.05), seed=seed, chunk_size=16))
    moved = df[df["lam"] != 0].groupby("loss")[["dist_mean", "cos_mean"]].mean()
    assert moved.loc["pgd_at", "dist_mean"] > 1.15 * moved.loc["clean", "dist_mean"], moved
    assert moved.loc["pgd_at", "cos_mean"] < moved.loc["clean", "cos_mean"], moved
