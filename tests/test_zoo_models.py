"""The robust-model zoo architectures against their public definitions.

For each of ``dm-wrn-D-W``, ``dm-preact-resnet18/34``, ``preact_resnet18_nobn`` and
``resnet50``:

* the exact ``state_dict`` layout (keys in order, shapes), written out here from the
  public class (DeepMind's ``model_zoo.py`` / RobustBench's ``dm_wide_resnet.py``,
  RobustBench's ``resnet.py`` ``PreActResNet(PreActBlock, ...)`` and Andriushchenko &
  Flammarion's ``models.py``, kuangliu's ``resnet.py``);
* random tensors in that layout, saved as a plain state_dict and read back through
  ``load_checkpoint(path, arch=NAME)``, give the logits of a hand-written functional
  forward pass (``F.conv2d``/``F.batch_norm``/``F.pad``/``x * sigmoid(x)``) of the same
  tensors, in float64;
* the functional forward with one detail changed (symmetric padding, ReLU for Swish, the
  shortcut branch from the other tensor, a final BN-ReLU) gives *different* logits, so
  the comparison above would catch each of those mistakes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from atprobe.checkpoint import load_checkpoint
from atprobe.errors import AtprobeError
from atprobe.models import (
    DM_CIFAR10_MEAN,
    DM_CIFAR10_STD,
    DM_CIFAR100_MEAN,
    DM_CIFAR100_STD,
    DM_WRN_PATTERN,
    build_model,
    canonical_arch,
    list_architectures,
    weight_layers,
)

EPS_BN = 1e-5  # nn.BatchNorm2d's default, which every public class here keeps
TIGHT = {"rtol": 1e-10, "atol": 1e-10}

# --------------------------------------------------------------------------- #
# Layouts written out from the public definitions
# --------------------------------------------------------------------------- #

Layout = list[tuple[str, tuple[int, ...]]]


def _bn(prefix: str, c: int) -> Layout:
    return [
        (f"{prefix}.weight", (c,)),
        (f"{prefix}.bias", (c,)),
        (f"{prefix}.running_mean", (c,)),
        (f"{prefix}.running_var", (c,)),
        (f"{prefix}.num_batches_tracked", ()),
    ]


def dm_wrn_layout(depth: int, width: int, classes: int = 10) -> Layout:
    """DMWideResNet: init_conv, layer.<g>.block.<i>.{batchnorm_0, conv_0, batchnorm_1, conv_1, shortcut}, ..."""
    ch = [16, 16 * width, 32 * width, 64 * width]
    n = (depth - 4) // 6
    out: Layout = [("init_conv.weight", (16, 3, 3, 3))]
    for g in range(3):
        for i in range(n):
            cin = ch[g] if i == 0 else ch[g + 1]
            cout = ch[g + 1]
            p = f"layer.{g}.block.{i}"
            out += _bn(f"{p}.batchnorm_0", cin)
            out += [(f"{p}.conv_0.weight", (cout, cin, 3, 3))]
            out += _bn(f"{p}.batchnorm_1", cout)
            out += [(f"{p}.conv_1.weight", (cout, cout, 3, 3))]
            if cin != cout:
                out += [(f"{p}.shortcut.weight", (cout, cin, 1, 1))]
    out += _bn("batchnorm", ch[3])
    out += [("logits.weight", (classes, ch[3])), ("logits.bias", (classes,))]
    return out


def _stages(blocks, expansion: int = 1):
    """``(stage, index, in_channels, planes, stride)`` of every block of a four-stage CIFAR ResNet."""
    cin = 64
    for s, planes in enumerate((64, 128, 256, 512)):
        for i in range(blocks[s]):
            yield s, i, cin, planes, (2 if (s > 0 and i == 0) else 1)
            cin = planes * expansion


def dm_preact_layout(depth: int, classes: int = 10) -> Layout:
    """DMPreActResNet: conv_2d, layer_<s>.<i>.{batchnorm_0, conv_2d_1, batchnorm_1, conv_2d_2, shortcut}, ..."""
    out: Layout = [("conv_2d.weight", (64, 3, 3, 3))]
    for s, i, cin, cout, stride in _stages({18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}[depth]):
        p = f"layer_{s}.{i}"
        out += _bn(f"{p}.batchnorm_0", cin) + [(f"{p}.conv_2d_1.weight", (cout, cin, 3, 3))]
        out += _bn(f"{p}.batchnorm_1", cout) + [(f"{p}.conv_2d_2.weight", (cout, cout, 3, 3))]
        if stride != 1 or cin != cout:
            out += [(f"{p}.shortcut.weight", (cout, cin, 3, 3))]  # 3x3, unlike every other ResNet here
    return out + _bn("batchnorm", 512) + [("logits.weight", (classes, 512)), ("logits.bias", (classes,))]


def preact_nobn_layout(blocks=(2, 2, 2, 2), classes: int = 10) -> Layout:
    """PreActResNet without ``bn``: conv1, layer<s>.<i>.{bn1, conv1, bn2, conv2, shortcut.0}, linear."""
    out: Layout = [("conv1.weight", (64, 3, 3, 3))]
    for s, i, cin, cout, stride in _stages(blocks):
        p = f"layer{s + 1}.{i}"
        out += _bn(f"{p}.bn1", cin) + [(f"{p}.conv1.weight", (cout, cin, 3, 3))]
        out += _bn(f"{p}.bn2", cout) + [(f"{p}.conv2.weight", (cout, cout, 3, 3))]
        if stride != 1 or cin != cout:
            out += [(f"{p}.shortcut.0.weight", (cout, cin, 1, 1))]
    return out + [("linear.weight", (classes, 512)), ("linear.bias", (classes,))]


def resnet_bottleneck_layout(blocks=(3, 4, 6, 3), classes: int = 10) -> Layout:
    """kuangliu ResNet(Bottleneck): conv1, bn1, layer<s>.<i>.{conv1..3, bn1..3, shortcut.0/1}, linear."""
    out: Layout = [("conv1.weight", (64, 3, 3, 3))] + _bn("bn1", 64)
    for s, i, cin, mid, stride in _stages(blocks, expansion=4):
        cout, p = 4 * mid, f"layer{s + 1}.{i}"
        out += [(f"{p}.conv1.weight", (mid, cin, 1, 1))] + _bn(f"{p}.bn1", mid)
        out += [(f"{p}.conv2.weight", (mid, mid, 3, 3))] + _bn(f"{p}.bn2", mid)
        out += [(f"{p}.conv3.weight", (cout, mid, 1, 1))] + _bn(f"{p}.bn3", cout)
        if stride != 1 or cin != cout:
            out += [(f"{p}.shortcut.0.weight", (cout, cin, 1, 1))] + _bn(f"{p}.shortcut.1", cout)
    return out + [("linear.weight", (classes, 2048)), ("linear.bias", (classes,))]


LAYOUTS = {
    "dm-wrn-28-10": lambda: dm_wrn_layout(28, 10),
    "dm-wrn-70-16": lambda: dm_wrn_layout(70, 16),
    "dm-wrn-106-16": lambda: dm_wrn_layout(106, 16),
    "dm-wrn-16-1": lambda: dm_wrn_layout(16, 1),  # width 1: the first block of group 0 has no shortcut
    "dm-preact-resnet18": lambda: dm_preact_layout(18),
    "dm-preact-resnet34": lambda: dm_preact_layout(34),
    "preact_resnet18_nobn": lambda: preact_nobn_layout(),
    "resnet50": lambda: resnet_bottleneck_layout(),
}


def _meta(arch: str, **kw) -> nn.Module:
    with torch.device("meta"):
        return build_model(arch, **kw)


@pytest.mark.parametrize("arch", list(LAYOUTS))
def test_state_dict_layout_is_the_public_one(arch: str) -> None:
    sd = _meta(arch, mean=DM_CIFAR10_MEAN, std=DM_CIFAR10_STD).state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == LAYOUTS[arch]()  # keys, order, shapes


def test_dm_wrn_any_depth_and_width_and_100_classes() -> None:
    assert [(k, tuple(v.shape)) for k, v in _meta("dm-wrn-34-20", num_classes=100).state_dict().items()] == (
        dm_wrn_layout(34, 20, classes=100)
    )


@pytest.mark.parametrize(
    ("arch", "params"),
    [
        # 267M and 415M: the "WRN-70-16" and "WRN-106-16" of Gowal et al. / Rebuffi et al.
        ("dm-wrn-70-16", 266_796_506),
        ("dm-wrn-106-16", 415_475_162),
        ("dm-wrn-28-10", 36_479_194),  # same count as TRADES' wrn-28-10 (same shapes, other names)
        ("resnet50", 23_520_842),  # kuangliu's ResNet50 for CIFAR
        ("preact_resnet18_nobn", 11_171_146),  # Rice's preact_resnet18 minus the 512-channel bn (1,024)
    ],
)
def test_parameter_counts(arch: str, params: int) -> None:
    assert sum(p.numel() for p in _meta(arch).parameters()) == params


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("DM-WRN-70-16", "dm-wrn-70-16"),
        ("dm_wrn_28_10", "dm-wrn-28-10"),
        ("DMWideResNet-106-16", "dm-wrn-106-16"),
        ("dm-wrn-34-20", "dm-wrn-34-20"),
        ("DMPreActResNet18", "dm-preact-resnet18"),
        ("dm_preact_resnet34", "dm-preact-resnet34"),
        ("PreActResNet18_nobn", "preact_resnet18_nobn"),
        ("preact-resnet18-nobn", "preact_resnet18_nobn"),
        ("ResNet-50", "resnet50"),
        ("WRN-34-20", "wrn-34-20"),  # the TRADES layout keeps any depth/width
        ("wrn_70_16", "wrn-70-16"),
    ],
)
def test_aliases(alias: str, canonical: str) -> None:
    assert canonical_arch(alias) == canonical


@pytest.mark.parametrize("bad", ["dm-wrn-30-10", "dm-wrn-28-0", "dm-preact-resnet50"])
def test_bad_dm_names_rejected(bad: str) -> None:
    with pytest.raises(AtprobeError) as info:
        canonical_arch(bad)
    assert "\n" not in str(info.value)


def test_error_names_the_dm_pattern() -> None:
    with pytest.raises(AtprobeError, match=DM_WRN_PATTERN):
        canonical_arch("dm-resnet18")


def test_listed() -> None:
    assert set(LAYOUTS) - {"dm-wrn-16-1"} <= set(list_architectures())


# --------------------------------------------------------------------------- #
# Hand-written functional forward passes of the public definitions
# --------------------------------------------------------------------------- #


def _bn_eval(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        training=False, eps=EPS_BN)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _normalized(x: torch.Tensor, mean, std) -> torch.Tensor:
    if mean is None:
        return x
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def _tf_same_pad(x: torch.Tensor, stride: int, symmetric: bool = False) -> torch.Tensor:
    """The explicit pad DeepMind's blocks apply before every unpadded 3x3 conv_0 / conv_2d_1 / shortcut."""
    if stride == 1 or symmetric:
        return F.pad(x, (1, 1, 1, 1))
    return F.pad(x, (0, 1, 0, 1))


def ref_dm_wrn(sd: dict, x: torch.Tensor, depth: int, width: int, mean=DM_CIFAR10_MEAN, std=DM_CIFAR10_STD, *,
               act=_swish, symmetric_pad: bool = False, shortcut_from_input: bool = False) -> torch.Tensor:
    """DMWideResNet.forward, from the public definition."""
    ch = [16, 16 * width, 32 * width, 64 * width]
    n = (depth - 4) // 6
    out = F.conv2d(_normalized(x, mean, std), sd["init_conv.weight"], padding=1)
    for g in range(3):
        for i in range(n):
            p = f"layer.{g}.block.{i}"
            stride = 2 if (g > 0 and i == 0) else 1
            has_shortcut = (ch[g] if i == 0 else ch[g + 1]) != ch[g + 1]
            a = act(_bn_eval(out, sd, f"{p}.batchnorm_0"))
            h = F.conv2d(_tf_same_pad(a, stride, symmetric_pad), sd[f"{p}.conv_0.weight"], stride=stride)
            h = F.conv2d(act(_bn_eval(h, sd, f"{p}.batchnorm_1")), sd[f"{p}.conv_1.weight"], padding=1)
            if has_shortcut:
                src = out if shortcut_from_input else a
                out = F.conv2d(src, sd[f"{p}.shortcut.weight"], stride=stride) + h
            else:
                out = out + h
    out = act(_bn_eval(out, sd, "batchnorm"))
    out = F.avg_pool2d(out, 8).flatten(1)
    return F.linear(out, sd["logits.weight"], sd["logits.bias"])


def ref_dm_preact(sd: dict, x: torch.Tensor, depth: int, mean=DM_CIFAR10_MEAN, std=DM_CIFAR10_STD, *,
                  act=_swish, symmetric_pad: bool = False, shortcut_from_input: bool = True) -> torch.Tensor:
    """DMPreActResNet.forward, from the public definition."""
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}[depth]
    out = F.conv2d(_normalized(x, mean, std), sd["conv_2d.weight"], padding=1)
    for s, i, _, _, stride in _stages(blocks):
        p = f"layer_{s}.{i}"
        a = act(_bn_eval(out, sd, f"{p}.batchnorm_0"))
        h = F.conv2d(_tf_same_pad(a, stride, symmetric_pad), sd[f"{p}.conv_2d_1.weight"], stride=stride)
        h = F.conv2d(act(_bn_eval(h, sd, f"{p}.batchnorm_1")), sd[f"{p}.conv_2d_2.weight"], padding=1)
        if f"{p}.shortcut.weight" in sd:
            src = out if shortcut_from_input else a
            short = F.conv2d(_tf_same_pad(src, stride, symmetric_pad), sd[f"{p}.shortcut.weight"], stride=stride)
        else:
            short = out
        out = h + short
    out = act(_bn_eval(out, sd, "batchnorm"))
    out = F.avg_pool2d(out, 4).flatten(1)
    return F.linear(out, sd["logits.weight"], sd["logits.bias"])


def ref_preact_nobn(sd: dict, x: torch.Tensor, blocks=(2, 2, 2, 2), mean=None, std=None, *,
                    shortcut_from_input: bool = True, final_relu: bool = False) -> torch.Tensor:
    """RobustBench ``PreActResNet(PreActBlock, [2,2,2,2])`` / Andriushchenko & Flammarion's
    PreActResNet18: the projection shortcut reads the raw block input; no final bn or relu."""
    out = F.conv2d(_normalized(x, mean, std), sd["conv1.weight"], padding=1)
    for s, i, _, _, stride in _stages(blocks):
        p = f"layer{s + 1}.{i}"
        a = F.relu(_bn_eval(out, sd, f"{p}.bn1"))
        h = F.conv2d(a, sd[f"{p}.conv1.weight"], stride=stride, padding=1)
        h = F.conv2d(F.relu(_bn_eval(h, sd, f"{p}.bn2")), sd[f"{p}.conv2.weight"], padding=1)
        if f"{p}.shortcut.0.weight" in sd:
            src = out if shortcut_from_input else a
            short = F.conv2d(src, sd[f"{p}.shortcut.0.weight"], stride=stride)
        else:
            short = out
        out = h + short
    if final_relu:
        out = F.relu(out)
    out = F.avg_pool2d(out, 4).flatten(1)
    return F.linear(out, sd["linear.weight"], sd["linear.bias"])


def ref_resnet_bottleneck(sd: dict, x: torch.Tensor, blocks=(3, 4, 6, 3), mean=None, std=None) -> torch.Tensor:
    """kuangliu ``ResNet(Bottleneck, blocks)``.forward, from the public definition."""
    out = F.relu(_bn_eval(F.conv2d(_normalized(x, mean, std), sd["conv1.weight"], padding=1), sd, "bn1"))
    for s, i, _, _, stride in _stages(blocks, expansion=4):
        p = f"layer{s + 1}.{i}"
        h = F.relu(_bn_eval(F.conv2d(out, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
        h = F.relu(_bn_eval(F.conv2d(h, sd[f"{p}.conv2.weight"], stride=stride, padding=1), sd, f"{p}.bn2"))
        h = _bn_eval(F.conv2d(h, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
        if f"{p}.shortcut.0.weight" in sd:
            short = _bn_eval(F.conv2d(out, sd[f"{p}.shortcut.0.weight"], stride=stride), sd, f"{p}.shortcut.1")
        else:
            short = out
        out = F.relu(h + short)
    out = F.avg_pool2d(out, 4).flatten(1)
    return F.linear(out, sd["linear.weight"], sd["linear.bias"])


def random_state(layout: Layout, seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 tensors in ``layout`` as a public checkpoint would hold them: conv/linear
    weights at roughly He scale, BN with non-trivial affine and running statistics."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in layout:
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(100, dtype=torch.long)
        elif key.endswith("running_var"):
            sd[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("running_mean") or key.endswith(".bias"):
            sd[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # BN weight
            sd[key] = 0.5 + torch.rand(shape, generator=g)
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            sd[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return sd


def _load(tmp_path, arch: str, sd: dict, mean=None, std=None) -> nn.Module:
    """Save ``sd`` as a plain state_dict and load it the way ``atprobe eval CKPT --arch NAME`` does."""
    path = tmp_path / "foreign.pt"
    torch.save(sd, path)
    ck = load_checkpoint(path, arch=arch, mean=mean, std=std)
    assert not ck.native and ck.arch == canonical_arch(arch)
    return ck.build_model().double()


def _x(seed: int = 1, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _as64(sd: dict) -> dict[str, torch.Tensor]:
    return {k: (v.double() if v.is_floating_point() else v) for k, v in sd.items()}


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-6 * (1 + b.abs().max()))


@pytest.mark.parametrize(("depth", "width"), [(16, 1), (10, 2)])
def test_dm_wrn_matches_functional_forward(tmp_path, depth: int, width: int) -> None:
    arch = f"dm-wrn-{depth}-{width}"
    sd = random_state(dm_wrn_layout(depth, width))
    model = _load(tmp_path, arch, sd, mean=DM_CIFAR10_MEAN, std=DM_CIFAR10_STD)
    x, sd64 = _x(), _as64(sd)
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(ours, ref_dm_wrn(sd64, x, depth, width), **TIGHT)
        # Each of these mistakes changes the logits, so the comparison above catches it.
        assert _differs(ours, ref_dm_wrn(sd64, x, depth, width, symmetric_pad=True))
        assert _differs(ours, ref_dm_wrn(sd64, x, depth, width, act=F.relu))
        assert _differs(ours, ref_dm_wrn(sd64, x, depth, width, shortcut_from_input=True))
        assert _differs(ours, ref_dm_wrn(sd64, x, depth, width, mean=None, std=None))


def test_dm_preact_matches_functional_forward(tmp_path) -> None:
    sd = random_state(dm_preact_layout(18))
    model = _load(tmp_path, "dm-preact-resnet18", sd, mean=DM_CIFAR10_MEAN, std=DM_CIFAR10_STD)
    x, sd64 = _x(), _as64(sd)
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(ours, ref_dm_preact(sd64, x, 18), **TIGHT)
        assert _differs(ours, ref_dm_preact(sd64, x, 18, symmetric_pad=True))
        assert _differs(ours, ref_dm_preact(sd64, x, 18, act=F.relu))
        assert _differs(ours, ref_dm_preact(sd64, x, 18, shortcut_from_input=False))


def test_dm_preact34_computes_like_its_definition() -> None:
    torch.manual_seed(0)
    model = build_model("dm-preact-resnet34", mean=DM_CIFAR100_MEAN, std=DM_CIFAR100_STD, num_classes=100)
    sd = random_state(dm_preact_layout(34, classes=100), seed=3)
    model.load_state_dict(sd, strict=True)
    x = _x(n=1)
    with torch.no_grad():
        ours = model.double().eval()(x)
    torch.testing.assert_close(ours, ref_dm_preact(_as64(sd), x, 34, DM_CIFAR100_MEAN, DM_CIFAR100_STD), **TIGHT)


def test_preact_nobn_matches_functional_forward_and_the_naive_variant_does_not(tmp_path) -> None:
    sd = random_state(preact_nobn_layout())
    model = _load(tmp_path, "preact_resnet18_nobn", sd)
    x, sd64 = _x(), _as64(sd)
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(ours, ref_preact_nobn(sd64, x), **TIGHT)
        # Shortcut from bn1-relu (Rice's/kuangliu's block) or a final relu: same keys, other function.
        assert _differs(ours, ref_preact_nobn(sd64, x, shortcut_from_input=False))
        assert _differs(ours, ref_preact_nobn(sd64, x, final_relu=True))
        # The naive port: Rice's PreActResNet with `bn` dropped (shortcut from bn1-relu,
        # relu before the pool). The very same file loads into it...
        naive = build_model("preact_resnet18")
        naive.bn = nn.Identity()
        naive.load_state_dict(sd, strict=True)
        naive_logits = naive.double().eval()(x)
        assert _differs(naive_logits, ours)  # ...and computes something else.
        torch.testing.assert_close(naive_logits, ref_preact_nobn(sd64, x, shortcut_from_input=False,
                                                                 final_relu=True), **TIGHT)


def test_resnet50_matches_functional_forward(tmp_path) -> None:
    sd = random_state(resnet_bottleneck_layout())
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # Engstrom et al.'s constants
    model = _load(tmp_path, "resnet50", sd, mean=mean, std=std)
    x = _x(n=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_resnet_bottleneck(_as64(sd), x, mean=mean, std=std), **TIGHT)


# --------------------------------------------------------------------------- #
# Normalization, dtypes, hooks (torch.func and dropout: tests/test_models.py)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("arch", ["dm-wrn-28-10", "dm-preact-resnet18"])
def test_dm_normalization_is_not_in_the_state_dict(arch: str) -> None:
    normed = _meta(arch, mean=DM_CIFAR10_MEAN, std=DM_CIFAR10_STD)
    assert list(normed.state_dict()) == list(_meta(arch).state_dict())
    assert not any(k in normed.state_dict() for k in ("mean", "std", "normalize.mean", "normalize.std"))
    assert {"normalize.mean", "normalize.std"} <= {n for n, _ in normed.named_buffers()}


def test_dm_constants_are_the_dataset_statistics(cifar_dir) -> None:
    from atprobe.data import load_dataset

    stats = load_dataset("cifar10", cifar_dir)
    assert tuple(stats.mean) == pytest.approx(DM_CIFAR10_MEAN, abs=0) and tuple(stats.std) == pytest.approx(
        DM_CIFAR10_STD, abs=0)


@pytest.mark.parametrize("arch", ["dm-wrn-16-1", "preact_resnet18_nobn"])
def test_channels_last_and_float32(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, mean=DM_CIFAR10_MEAN, std=DM_CIFAR10_STD)
    layout = dm_wrn_layout(16, 1) if arch.startswith("dm") else preact_nobn_layout()
    model.load_state_dict(random_state(layout), strict=True)
    model.eval()
    x = _x().float()
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        ref64 = model.double()(x.double())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ref, ref64.float(), rtol=1e-4, atol=1e-4)


def test_weight_layers_see_the_padded_input() -> None:
    # Hooks on a stride-2 SAME conv see the padded 33x33 input and padding 0: per-sample
    # gradient and operator-norm code that rebuilds the conv from its module is then exact.
    model = build_model("dm-wrn-10-1").eval()
    conv = dict(weight_layers(model))["layer.1.block.0.conv_0"]
    seen = {}
    conv.register_forward_pre_hook(lambda m, i: seen.__setitem__("shape", tuple(i[0].shape)))
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    assert seen["shape"] == (1, 16, 33, 33) and conv.padding == (0, 0) and conv.stride == (2, 2)


def test_documented_eval_command_runs_and_agrees(tmp_path, cifar_dir) -> None:
    """``atprobe eval CKPT --arch dm-wrn-... --normalize dataset`` (docs/models.md) on a bare
    state_dict gives, image by image, the prediction and loss of the functional forward."""
    import pandas as pd
    from conftest import run_cli

    from atprobe.data import load_dataset

    n = 8
    sd = random_state(dm_wrn_layout(10, 1), seed=5)
    torch.save(sd, tmp_path / "dm.pt")
    run_cli("eval", tmp_path / "dm.pt", "--arch", "dm-wrn-10-1", "--normalize", "dataset", "--dataset", "cifar10",
            "--data-dir", cifar_dir, "--split", "test", "--n", n, "--attack", "natural", "--device", "cpu",
            "--per-sample", "-o", tmp_path / "eval.csv", "--quiet")
    rows = pd.read_csv(tmp_path / "eval.samples.csv").sort_values("index")
    test = load_dataset("cifar10", cifar_dir).test
    with torch.no_grad():
        logits = ref_dm_wrn(_as64(sd), test.x[:n].double() / 255, 10, 1)
    assert rows["index"].tolist() == list(range(n))
    assert rows["prediction"].tolist() == logits.argmax(1).tolist()
    # Random weights predict one class for most images; the per-image loss is the sharp check.
    loss = F.cross_entropy(logits, test.y[:n], reduction="none")
    torch.testing.assert_close(torch.tensor(rows["loss"].to_numpy()), loss, rtol=1e-4, atol=1e-5)
