"""``complexity`` (spectral, l1, margin, gap, dispatch) and ``foldbn`` against independent
computations: dense matrices of convolutions, hand-folded BatchNorm, numpy quantiles,
``evaluate``; and ``atprobe complexity`` end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from atprobe.attacks import parse_attack, pgd
from atprobe.checkpoint import load_checkpoint
from atprobe.data import Split, load_dataset, symmetric_label_noise
from atprobe.errors import AtprobeError
from atprobe.evaluate import EvalConfig, evaluate
from atprobe.foldbn import bn_affine, fold_bn, norm_layers, trace_layers
from atprobe.models import build_model, weight_layers
from atprobe.probes import complexity as cx
from atprobe.starts import Starts
from atprobe.threat import ThreatModel
from tests.conftest import cli_rejects, randomize_bn, run_cli, save_seeded_checkpoint, tiny_net


@pytest.fixture(autouse=True)
def _restore_global_torch_state():
    """The CLI seeds the global RNG: undo that."""
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    yield
    torch.set_rng_state(rng)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _dense(forward, shape) -> torch.Tensor:
    """The matrix of a linear map of (C, H, W) inputs: its images of the identity basis."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        return forward(basis).reshape(n, -1).T


def _sigma_max(matrix: torch.Tensor) -> float:
    return float(np.linalg.svd(matrix.numpy(), compute_uv=False)[0])


EXACT = dict(iterations=5000, tol=1e-14)


# ------------------------------------------------------------------------- operator norm

CONVS = [
    dict(stride=1, padding=1),
    dict(stride=2, padding=1),
    dict(stride=2, padding=0, dilation=2),
    dict(stride=1, padding=2, groups=2, out=4),
    dict(stride=1, padding=1, padding_mode="circular"),
    dict(stride=1, padding="same"),
]


@pytest.mark.parametrize("kw", CONVS, ids=[str(i) for i in range(len(CONVS))])
@pytest.mark.parametrize("shape", [(2, 6, 6), (2, 7, 5)])
def test_operator_norm_is_the_dense_matrix_largest_singular_value(kw, shape):
    kw = dict(kw)
    out = kw.pop("out", 3)
    torch.manual_seed(len(str(kw)))
    conv = nn.Conv2d(2, out, 3, bias=True, **kw).double()  # the bias is not part of the operator
    w = conv.weight.detach()
    dense = _dense(lambda x: conv._conv_forward(x, w, None), shape)  # the module's own convolution
    value, iterations = cx.conv_operator_norm(conv, w, shape, **EXACT)
    assert value == pytest.approx(_sigma_max(dense), rel=1e-10)
    assert 0 < iterations < EXACT["iterations"]


@pytest.mark.parametrize("kw", CONVS, ids=[str(i) for i in range(len(CONVS))])
def test_conv_adjoint_is_the_transpose(kw):
    kw = dict(kw)
    out = kw.pop("out", 3)
    torch.manual_seed(3)
    conv = nn.Conv2d(2, out, 3, bias=False, **kw).double()
    shape = (2, 7, 5)
    forward, adjoint, out_shape = cx.conv_operator(conv, conv.weight.detach(), shape)
    dense = _dense(forward, shape)
    y = torch.randn((1, *out_shape), dtype=torch.float64)
    assert adjoint(y).shape == (1, *shape)
    torch.testing.assert_close(adjoint(y).reshape(-1), dense.T @ y.reshape(-1), rtol=1e-12, atol=1e-12)


def test_operator_norm_of_a_cnn_layer_at_the_size_it_sees(cnn):
    """cnn-small's third conv sees 32x8x8 maps: the table's value (default power iteration)
    is the operator norm of the hand-folded kernel at that size (converged power iteration,
    which the tests above check against dense matrices), from below."""
    table = cx.layer_table(cnn, cx.ComplexityConfig()).set_index("layer")
    assert table["input_shape"].tolist() == ["3x32x32", "32x16x16", "32x8x8", "64x8x8", "1024", "256"]
    assert table["bn"].tolist() == ["features.1", "features.5", "features.9", "features.12", "", ""]
    conv, bn = cnn.features[8], cnn.features[9]
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # hand fold
    w = (conv.weight * s.view(-1, 1, 1, 1)).detach()
    exact, iterations = cx.conv_operator_norm(conv, w, (32, 8, 8), **EXACT)
    assert iterations < EXACT["iterations"]
    assert exact * (1 - 2e-5) < table.loc["features.8", "spectral"] <= exact * (1 + 1e-12)
    # at another input size the operator is another one (the size matters)
    assert cx.conv_operator_norm(conv, w, (32, 3, 3), **EXACT)[0] < exact * (1 - 1e-3)


def test_reshape_method_and_linear_layers(cnn):
    config = cx.ComplexityConfig(spectral_method="reshape", fold_bn=False)
    table = cx.layer_table(cnn, config)
    layers = weight_layers(cnn)
    assert table["layer"].tolist() == [name for name, _ in layers]
    for (_name, module), spectral, l1 in zip(layers, table["spectral"], table["l1"]):
        w = module.weight.detach()
        assert spectral == pytest.approx(float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), 2)), rel=1e-12)
        assert l1 == pytest.approx(float(w.abs().sum()), rel=1e-12)
    assert (table["iterations"] == 0).all()


def test_linear_layers_are_exact_with_either_method():
    model = tiny_net()
    op = cx.layer_table(model, cx.ComplexityConfig(), (3, 8, 8))
    reshape = cx.layer_table(model, cx.ComplexityConfig(spectral_method="reshape"), (3, 8, 8))
    assert op["layer"].tolist() == ["1", "3"] and (op["iterations"] == 0).all()
    assert op["spectral"].tolist() == reshape["spectral"].tolist()
    for name, value in zip(op["layer"], op["spectral"]):
        w = model[int(name)].weight.detach().numpy()
        assert value == pytest.approx(float(np.linalg.svd(w, compute_uv=False)[0]), rel=1e-12)


def test_spectral_and_l1_rows_are_the_product_and_sum(cnn):
    config = cx.ComplexityConfig(measures=("spectral", "l1"), spectral_method="reshape")
    df = cx.probe(cnn, None, config)
    table = cx.layer_table(cnn, config)
    rows = df.set_index("variant")["value"]
    product = float(np.prod(table["spectral"].to_numpy()))
    assert rows["product;method=reshape;bn=fold"] == pytest.approx(product, rel=1e-12)
    assert rows["log10;method=reshape;bn=fold"] == pytest.approx(math.log10(product), rel=1e-12)
    l1 = sum(float((m.weight * _fold_scale(cnn, i)).detach().abs().sum())
             for i, (_, m) in enumerate(weight_layers(cnn)))
    assert rows["sum;bn=fold"] == pytest.approx(l1, rel=1e-12)
    assert list(df.columns) == cx.COLUMNS and df["reason"].eq("").all() and df["n"].isna().all()


def _fold_scale(cnn, i):
    """Hand fold: the scale of the BN after cnn-small's i-th weight layer (1 for fc/classifier)."""
    bns = [cnn.features[j] for j in (1, 5, 9, 12)]
    if i >= len(bns):
        return torch.ones(())
    bn = bns[i]
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(-1, 1, 1, 1)


def test_product_overflow_is_inf_with_a_reason_and_log10_is_finite():
    layers = pd.DataFrame({"spectral": [1e200, 1e200], "l1": [1.0, 1.0]})
    rows = pd.DataFrame(cx.norm_rows(layers, cx.ComplexityConfig(measures=("spectral",)), margin=2.0, n=5))
    product = rows.set_index("variant").loc["product;method=operator;bn=fold"]
    assert math.isinf(product["value"]) and "log10" in product["reason"]
    log10 = rows.set_index("variant").loc["log10_over_margin;method=operator;bn=fold;on=adv;q=0.1"]
    assert log10["value"] == pytest.approx(400 - math.log10(2.0)) and log10["reason"] == ""


# ------------------------------------------------------------------------- BN folding


@pytest.mark.parametrize("arch", ["cnn-small", "resnet18", "preact_resnet18", "dm-wrn-10-1", "dm-preact-resnet18",
                                  "preact_resnet18_nobn"])
def test_folding_leaves_eval_outputs_unchanged(arch, cnn):
    if arch == "cnn-small":
        model = cnn
    else:
        torch.manual_seed(0)
        model = randomize_bn(build_model(arch).double()).eval()
    folded = fold_bn(model)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    left = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    # block-opening BNs (their input is a residual sum) and a final BN stay: preact 8 + 1; DeepMind WRN-10-1
    # 3 + 1, PreActResNet-18 8 + 1; the fast-AT PreActResNet-18 has no final BN: 8
    expected_left = {"cnn-small": 0, "resnet18": 0, "preact_resnet18": 9, "dm-wrn-10-1": 4, "dm-preact-resnet18": 9,
                     "preact_resnet18_nobn": 8}[arch]
    assert left == expected_left and n_bn > left
    # the norm layers of the model, folded, are the raw layers of the folded copy
    a = norm_layers(model, fold=True)
    b = norm_layers(folded, fold=True)
    assert [layer.name for layer in a] == [layer.name for layer in b]
    for la, lb in zip(a, b):
        torch.testing.assert_close(la.weight, lb.weight, rtol=1e-13, atol=0)


def test_which_batchnorms_fold():
    torch.manual_seed(0)
    preact = build_model("preact_resnet18").double().eval()
    traced = {t.name: t for t in trace_layers(preact)}
    assert traced["layer1.0.conv1"].folds == "layer1.0.bn2"  # conv -> bn inside the block
    assert traced["layer1.0.bn1"].folds is None  # opens the block: its input is the stem's output and x
    assert traced["conv1"].folds is None  # the stem feeds bn1 and the identity shortcut
    assert traced["bn"].folds is None  # the final bn follows a residual sum
    wrn = build_model("wrn-16-2").double().eval()
    traced = {t.name: t for t in trace_layers(wrn)}
    assert traced["conv1"].folds == "block1.layer.0.bn1"  # width changes: x feeds only bn1
    assert traced["block1.layer.1.bn1"].folds is None  # identity shortcut also reads its input


class _TwoConsumers(nn.Module):
    """conv -> BN, but the conv output is also added to the result: not foldable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 8 * 8, 4)
        self.bn1d = nn.BatchNorm1d(4)

    def forward(self, x):
        z = self.conv(x)
        out = self.bn(z) + z
        return self.bn1d(self.fc(torch.flatten(out, 1)))


def test_a_shared_conv_output_is_not_folded_and_bn1d_after_linear_is():
    torch.manual_seed(0)
    model = randomize_bn(_TwoConsumers().double()).eval()
    with torch.no_grad():
        model.bn1d.running_mean.uniform_(-1, 1)
        model.bn1d.running_var.uniform_(0.5, 2)
        model.bn1d.weight.uniform_(0.5, 2)
    traced = {t.name: t for t in trace_layers(model, (3, 8, 8))}
    assert traced["conv"].folds is None and traced["bn"].folds is None
    assert traced["fc"].folds == "bn1d"
    x = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fold_bn(model, (3, 8, 8))(x), model(x), rtol=1e-12, atol=1e-12)
    layers = {layer.name: layer for layer in norm_layers(model, (3, 8, 8), fold=True)}
    assert set(layers) == {"conv", "bn", "fc"}
    s, _ = bn_affine(model.bn)
    table = cx.layer_table(model, cx.ComplexityConfig(), (3, 8, 8)).set_index("layer")
    # a standalone BN is the diagonal layer s: spectral max |s|, l1 sum |s|
    hand = model.bn.weight / torch.sqrt(model.bn.running_var + model.bn.eps)
    assert table.loc["bn", "kind"] == "bn"
    hand = hand.detach()
    assert table.loc["bn", "spectral"] == pytest.approx(float(hand.abs().max()), rel=1e-14)
    assert table.loc["bn", "l1"] == pytest.approx(float(hand.abs().sum()), rel=1e-14)
    torch.testing.assert_close(s, hand)
    # --no-fold-bn: raw weights, BN ignored
    raw = cx.layer_table(model, cx.ComplexityConfig(fold_bn=False), (3, 8, 8))
    assert raw["layer"].tolist() == ["conv", "fc"] and raw["bn"].eq("").all()


def test_bn_without_running_stats_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten(),
                          nn.Linear(2 * 6 * 6, 3)).double().eval()
    with pytest.raises(AtprobeError, match="running statistics"):
        norm_layers(model, (3, 8, 8))


# ------------------------------------------------------------------------- margin


def _split(n: int, seed: int = 0, classes: int = 10, size: int = 32) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, classes, (n,), generator=g)
    return Split(x=x, y=y, true_y=y.clone(), index=torch.arange(n))


def _relu_net(seed: int = 0) -> nn.Module:
    """A BN-free ReLU network with a conv and two linear layers, float64, for 3x8x8 inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 16),
                         nn.ReLU(), nn.Linear(16, 10)).double().eval()


@pytest.mark.parametrize("q", [0.1, 0.37, 0.5])
def test_margin_quantile_is_numpys_on_the_logits(mlp, q):
    split = _split(23)
    config = cx.ComplexityConfig(measures=("margin",), margin_on="clean", margin_quantile=q)
    df = cx.probe(mlp, split, config)
    x = (split.x.float() / 255).double()  # the batches are float32 pixels
    with torch.no_grad():
        logits = mlp(x).numpy()
    y = split.y.numpy()
    others = logits.copy()
    others[np.arange(len(y)), y] = -np.inf
    margins = logits[np.arange(len(y)), y] - others.max(1)
    assert df["variant"].tolist() == [f"quantile;on=clean;q={q:g}"]
    assert df["value"].iloc[0] == pytest.approx(float(np.quantile(margins, q)), rel=1e-12)
    assert df["n"].iloc[0] == 23


def test_adversarial_margin_uses_pgd_examples_in_batches(mlp):
    split = _split(10)
    config = cx.ComplexityConfig(measures=("margin",), batch_size=4, seed=5, threat=ThreatModel(steps=3))
    got = cx.margins(mlp, split, config)
    attack = parse_attack("pgd3").config
    expected = []
    for i in range(10):  # one sample at a time, its start keyed by (seed, its index)
        x = (split.x[i:i + 1].float() / 255).double()
        y = split.y[i:i + 1]
        x_adv = pgd(mlp, x, y, attack, starts=Starts(5, split.index[i:i + 1]))
        with torch.no_grad():
            z = mlp(x_adv)
        others = z.scatter(1, y[:, None], float("-inf"))
        expected.append(z.gather(1, y[:, None]).squeeze(1) - others.amax(1))
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-12, atol=1e-12)
    clean = cx.margins(mlp, split, cx.ComplexityConfig(margin_on="clean"))
    assert (got < clean).all()  # PGD lowers every margin


def test_scale_of_the_last_layer_cancels_in_spectral_over_margin():
    model = _relu_net()
    split = _split(40, seed=1, size=8)
    with torch.no_grad():  # labels the model gets right, so the margin quantile is > 0
        split = split.with_labels(model((split.x.float() / 255).double()).argmax(1))
    config = cx.ComplexityConfig(measures=("spectral", "l1"), margin=True, margin_on="clean", margin_quantile=0.2)
    base = cx.probe(model, split, config).set_index("variant")["value"]
    scaled = _relu_net()
    c = 3.7
    with torch.no_grad():
        scaled[5].weight.mul_(c)
        scaled[5].bias.mul_(c)
    other = cx.probe(scaled, split, config).set_index("variant")["value"]
    over = "method=operator;bn=fold;on=clean;q=0.2"
    assert base[f"product_over_margin;{over}"] > 0
    assert other[f"product_over_margin;{over}"] == pytest.approx(base[f"product_over_margin;{over}"], rel=1e-10)
    assert other[f"log10_over_margin;{over}"] == pytest.approx(base[f"log10_over_margin;{over}"], rel=1e-10)
    assert other["product;method=operator;bn=fold"] == pytest.approx(c * base["product;method=operator;bn=fold"],
                                                                     rel=1e-10)
    l1 = "sum_over_margin;bn=fold;on=clean;q=0.2"
    assert other[l1] != pytest.approx(base[l1])  # a sum, not a product: not scale-invariant


def test_nonpositive_margin_gives_nan_with_a_reason(mlp):
    split = _split(30, seed=2)  # random labels: an untrained model misclassifies most
    config = cx.ComplexityConfig(measures=("spectral", "l1", "margin"), margin=True, threat=ThreatModel(steps=1))
    df = cx.probe(mlp, split, config)
    margin = df[df["measure"] == "margin"].iloc[0]
    assert margin["value"] <= 0 and margin["reason"] == "" and margin["n"] == 30
    divided = df[df["variant"].str.contains("over_margin")]
    assert len(divided) == 3 and divided["value"].isna().all()
    assert divided["reason"].str.contains("<= 0").all()
    assert df[~df["variant"].str.contains("over_margin")]["value"].notna().all()


def test_margin_row_is_added_when_only_dividing_and_rows_follow_measures(mlp):
    split = _split(8)
    config = cx.ComplexityConfig(measures=("l1",), margin=True, margin_on="clean")
    df = cx.probe(mlp, split, config)
    assert df["measure"].tolist() == ["l1", "l1", "margin"]
    config = cx.ComplexityConfig(measures=("l1", "margin", "spectral"), spectral_method="reshape", margin_on="clean")
    assert cx.probe(mlp, split, config)["measure"].tolist() == ["l1", "margin", "spectral", "spectral"]


# ------------------------------------------------------------------------- gap


def test_gap_rows_are_evaluates_numbers():
    torch.manual_seed(0)
    model = build_model("cnn-small").eval()
    train, test = _split(24, seed=3), _split(20, seed=4)
    config = cx.ComplexityConfig(measures=("gap",), batch_size=16, seed=3, threat=ThreatModel(steps=2))
    df = cx.probe(model, train, config, test=test).set_index("variant")
    assert list(df.index) == list(cx.GAP_VARIANTS)
    eval_config = EvalConfig(attacks=(parse_attack("natural"), parse_attack("pgd2")), batch_size=16, seed=3)
    tr, te = evaluate(model, train, eval_config), evaluate(model, test, eval_config)
    assert df.loc["natural_train", "value"] == tr["accuracy"].iloc[0]
    assert df.loc["robust_train", "value"] == tr["accuracy"].iloc[1]
    assert df.loc["natural_test", "value"] == te["accuracy"].iloc[0]
    assert df.loc["robust_test", "value"] == te["accuracy"].iloc[1]
    assert df.loc["natural_gap", "value"] == tr["accuracy"].iloc[0] - te["accuracy"].iloc[0]
    assert df.loc["robust_gap", "value"] == tr["accuracy"].iloc[1] - te["accuracy"].iloc[1]
    assert df.loc["natural_train", "n"] == 24 and df.loc["robust_test", "n"] == 20
    assert df.loc["robust_gap", "n"] is pd.NA


def test_gap_needs_test_samples_and_data_needs_samples(mlp):
    with pytest.raises(AtprobeError, match="test samples"):
        cx.probe(mlp, _split(4), cx.ComplexityConfig(measures=("gap",)))
    with pytest.raises(AtprobeError, match="training samples"):
        cx.probe(mlp, None, cx.ComplexityConfig(measures=("margin",)))


# ------------------------------------------------------------------------- config, dispatch


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(margin_quantile=0.0), "strictly between 0 and 1"),
    (dict(margin_quantile=1.0), "strictly between 0 and 1"),
    (dict(margin_quantile=-0.5), "strictly between 0 and 1"),
    (dict(margin_quantile=float("nan")), "strictly between 0 and 1"),
    (dict(measures=("spectral", "bogus")), "unknown measure 'bogus'"),
    (dict(measures=()), "at least one"),
    (dict(spectral_method="fft"), "spectral method"),
    (dict(margin_on="both"), "margin-on"),
    (dict(threat=None), "ThreatModel"),
    (dict(threat=ThreatModel(steps=0)), "steps"),
    (dict(power_iterations=0), "power iterations"),
    (dict(power_tol=0.0), "power tol"),
])
def test_config_rejects_nonsense(kwargs, fragment):
    with pytest.raises(AtprobeError, match=fragment):
        cx.ComplexityConfig(**kwargs)


def test_parse_measures():
    assert cx.parse_measures("l1, spectral,l1") == ("l1", "spectral")
    assert cx.ComplexityConfig(measures="gap,margin").measures == ("gap", "margin")


def test_missing_external_module_is_a_one_line_error(mlp, monkeypatch):
    monkeypatch.setitem(sys.modules, "atprobe.probes.flatness", None)
    with pytest.raises(AtprobeError, match="needs atprobe.probes.flatness"):
        cx.probe(mlp, _split(4), cx.ComplexityConfig(measures=("spectral", "flatness")))


def _available(name: str) -> bool:
    try:
        return importlib.util.find_spec(f"atprobe.probes.{name}") is not None
    except ImportError:
        return False


@pytest.mark.parametrize("measure", ["curvature", "hessian", "flatness"])
def test_dispatch_to_the_other_modules(measure, monkeypatch):
    if not _available(measure):
        pytest.skip(f"atprobe.probes.{measure} is not there yet")
    module = cx.external_module(measure)
    calls = []

    def fake(model, samples, config, *, share):
        calls.append((model, len(samples), config))
        assert not share.gathered and share.count == 1  # one process: the whole share
        return pd.DataFrame({"measure": [measure], "variant": ["x;at=natural"], "value": [1.5], "reason": [""]})

    monkeypatch.setattr(module, "complexity_rows", fake)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).double()
    df = cx.probe(model, _split(6), cx.ComplexityConfig(measures=(measure,)))
    assert df[["measure", "variant", "value", "reason"]].values.tolist() == [[measure, "x;at=natural", 1.5, ""]]
    assert calls[0][0] is model and calls[0][1] == 6
    assert type(calls[0][2]).__name__ == cx.EXTERNAL[measure][1]  # None -> the module's defaults
    with pytest.raises(AtprobeError, match=f"config.{measure} must be"):
        cx.probe(model, _split(6), cx.ComplexityConfig(measures=(measure,), **{measure: object()}))


def test_real_dispatch_to_curvature_on_a_tiny_model():
    if not _available("curvature"):
        pytest.skip("atprobe.probes.curvature is not there yet")
    module = cx.external_module("curvature")
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8), nn.Tanh(), nn.Linear(8, 10)).double().eval()
    config = cx.ComplexityConfig(measures=("curvature",), curvature=module.CurvatureConfig(iterations=3))
    df = cx.probe(model, _split(4), config)
    assert set(df["measure"]) == {"curvature"} and len(df) >= 1
    assert list(df.columns) == cx.COLUMNS


# ------------------------------------------------------------------------- CLI

CSV_COLUMNS = ["checkpoint", "epoch", "label_noise", "measure", "variant", "value", "reason", "n"]
FAST = ["--n", "16", "--steps", "1", "--device", "cpu", "-q"]


def _save(path, seed: int = 0, epoch: int = 1, **fields):
    return save_seeded_checkpoint(path, seed, random_bn=True, epoch=epoch, **fields)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cx")
    synthetic = load_dataset("synthetic")
    noisy = symmetric_label_noise(synthetic.train.true_y, 1.0, 10, seed=0)
    run = root / "run"
    run.mkdir()
    for epoch in (1, 2):
        _save(run / f"epoch_{epoch:04d}.pt", seed=epoch, epoch=epoch)
    _save(run / "final.pt", seed=2, epoch=2)  # same epoch as epoch_0002.pt: not measured twice
    _save(run / "best.pt", seed=1, epoch=1)  # a copy: never read from a run dir
    return {"a": _save(root / "a.pt", seed=0),
            "noisy": _save(root / "noisy.pt", seed=3, labels=noisy, label_spec={"label_noise": 1.0, "label_seed": 0}),
            "run": run, "data": synthetic, "labels": noisy}


def test_cli_writes_the_table_of_the_library(ckpts, tmp_path):
    out = tmp_path / "c.csv"
    args = ["complexity", ckpts["a"], ckpts["noisy"], "--measures", "spectral,l1,margin,gap", "--margin",
            "--spectral-method", "reshape", "-o", out, *FAST]
    run_cli(*args)
    df = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert list(df.columns) == CSV_COLUMNS
    assert df["checkpoint"].unique().tolist() == [str(ckpts["a"]), str(ckpts["noisy"])]
    assert (df["epoch"] == 1).all()
    # label kind for Fig. 6: unrecorded for a.pt, 1.0 (random labels) for noisy.pt
    assert df.groupby("checkpoint")["label_noise"].first().tolist() == [pytest.approx(float("nan"), nan_ok=True), 1.0]
    config = cx.ComplexityConfig(measures=("spectral", "l1", "margin", "gap"), margin=True,
                                 spectral_method="reshape", threat=ThreatModel(steps=1))
    data = ckpts["data"]
    for path, labels in ((ckpts["a"], data.train.true_y), (ckpts["noisy"], ckpts["labels"])):
        model = load_checkpoint(path).build_model()
        train = data.train.subset(slice(0, 16)).with_labels(labels[:16])  # the trained labels
        expected = cx.probe(model, train, config, test=data.test.subset(slice(0, 16)))
        got = df[df["checkpoint"] == str(path)].reset_index(drop=True)
        assert got["variant"].tolist() == expected["variant"].tolist()
        np.testing.assert_allclose(got["value"].to_numpy(float), expected["value"].to_numpy(float), rtol=1e-6)
    meta = json.loads(out.with_name("c.meta.json").read_text())
    assert meta["command"][:2] == ["atprobe", "complexity"] and meta["seed"] == 0
    assert meta["config"]["n_train"] == 16 and meta["config"]["n_test"] == 16
    assert meta["config"]["spectral_method"] == "reshape" and meta["config"]["margin"] is True
    assert len(meta["checkpoints"]) == 2 and meta["rows"] == len(df)


def test_cli_run_directory_and_determinism(ckpts, tmp_path):
    outs = [tmp_path / f"r{i}.csv" for i in range(2)]
    for out in outs:
        run_cli("complexity", ckpts["run"], "--measures", "spectral,margin", "--spectral-method", "reshape",
                "--seed", "4", "-o", out, *FAST)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    df = pd.read_csv(outs[0])
    names = [p.rsplit("/", 1)[-1] for p in df["checkpoint"].unique()]
    assert names == ["epoch_0001.pt", "epoch_0002.pt"]  # final.pt = epoch 2 again, best.pt a copy
    assert df.groupby("checkpoint")["epoch"].first().tolist() == [1, 2]


def test_cli_only_norms_needs_no_data(ckpts, tmp_path):
    out = tmp_path / "n.csv"
    run_cli("complexity", ckpts["a"], "--measures", "l1", "--no-fold-bn", "--dataset", "npz",
            "--data-dir", tmp_path / "nowhere", "-o", out, "--device", "cpu", "-q")
    df = pd.read_csv(out)
    assert df["variant"].tolist() == ["sum;bn=ignore"]
    model = load_checkpoint(ckpts["a"]).build_model()
    assert df["value"].iloc[0] == pytest.approx(
        sum(float(m.weight.detach().abs().sum()) for _, m in weight_layers(model)), rel=1e-6)


def _bad_inputs(root, ckpts):
    empty_dir = root / "empty_run"
    empty_dir.mkdir(exist_ok=True)
    a = ckpts["a"]
    return {
        "unknown measure": ([a, "--measures", "spectral,bogus"], "unknown measure 'bogus'"),
        "empty measures": ([a, "--measures", ","], "--measures"),
        "quantile 0": ([a, "--measures", "margin", "--margin-quantile", "0"], "strictly between 0 and 1"),
        "quantile 1.5": ([a, "--measures", "margin", "--margin-quantile", "1.5"], "strictly between 0 and 1"),
        "quantile abc": ([a, "--margin-quantile", "abc"], "not a number"),
        "margin-on bogus": ([a, "--margin-on", "both"], "Invalid value"),
        "n 0": ([a, "--measures", "margin", "--n", "0"], "--n"),
        "n too large": ([a, "--measures", "margin", "--n", str(10**6)], "larger than the split"),
        "missing": ([root / "nope.pt", "--measures", "l1"], "not found"),
        "empty run dir": ([empty_dir, "--measures", "l1"], "no checkpoints in this directory"),
        "eps 8": ([a, "--measures", "margin", "--eps", "8"], "8/255"),
    }


BAD = ["unknown measure", "empty measures", "quantile 0", "quantile 1.5", "quantile abc", "margin-on bogus", "n 0",
       "n too large", "missing", "empty run dir", "eps 8"]


@pytest.mark.parametrize("case", BAD)
def test_cli_bad_input_is_one_line_exit_2(case, ckpts, tmp_path):
    args, fragment = _bad_inputs(tmp_path, ckpts)[case]
    cli_rejects(fragment, "complexity", *args, "--device", "cpu", "-q", output=tmp_path / "out" / "c.csv")


def test_cli_help():
    result = run_cli("complexity", "--help")
    assert "Usage: atprobe complexity" in result.output and "Examples:" in result.output
    assert "complexity" in run_cli("--help").output
