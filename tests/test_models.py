"""Tests for atprobe.models: shapes, public-checkpoint layouts, normalization, dtypes, torch.func.

Speed: the big networks are checked on the ``meta`` device (shapes only, no
arithmetic), so only the small models and a handful of batch-of-2 forwards of
the mid-sized ones actually compute.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from atprobe.errors import AtprobeError
from atprobe.models import (
    WRN_PATTERN,
    BasicBlock,
    DenseNet,
    Normalize,
    PreActBlock,
    PreActResNet,
    ResNet,
    WideResNet,
    build_model,
    canonical_arch,
    list_architectures,
    weight_layers,
)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)

# Small enough to compute on CPU in milliseconds. wrn-16-1 has both WRN block
# kinds (identity shortcut in block1, convShortcut in block2/3) at 1/4 of wrn-16-2's cost.
TINY = ["cnn-small", "mlp", "wrn-16-1"]
# Mid-sized: a real batch-of-2 forward takes ~0.5-1 s each on two cores.
MEDIUM = ["resnet18", "preact_resnet18", "vgg16", "dense121"]
# Giant: built and run on the meta device only.
GIANT = ["wrn-28-10", "wrn-34-10"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Batch-of-2 tensors gain nothing from intra-op threads, and on a busy 2-core
    # box OpenMP barriers waiting for a descheduled thread made this file 2-3x slower.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _meta_model(arch: str, **kw) -> nn.Module:
    """Build on the meta device: parameters have shapes but no storage or init cost."""
    with torch.device("meta"):
        return build_model(arch, **kw)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Give BN layers non-trivial affine params and running stats, so eval mode is a real test."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


# --------------------------------------------------------------------------- #
# Registry and option validation
# --------------------------------------------------------------------------- #


def test_list_architectures_is_canonical_and_complete() -> None:
    archs = list_architectures()
    assert archs == [
        "resnet18",
        "resnet50",
        "preact_resnet18",
        "preact_resnet18_nobn",
        "wrn-28-10",
        "wrn-34-10",
        "dm-wrn-28-10",
        "dm-wrn-70-16",
        "dm-wrn-106-16",
        "dm-preact-resnet18",
        "dm-preact-resnet34",
        "vgg16",
        "dense121",
        "cnn-small",
        "mlp",
    ]
    assert all(canonical_arch(a) == a for a in archs)
    assert WRN_PATTERN == "wrn-D-W"


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("ResNet18", "resnet18"),
        ("resnet-18", "resnet18"),
        ("PreActResNet18", "preact_resnet18"),
        ("preact-resnet18", "preact_resnet18"),
        (" VGG16 ", "vgg16"),
        ("DenseNet121", "dense121"),
        ("cnn_small", "cnn-small"),
        ("SmallCNN", "cnn-small"),
        ("MLP", "mlp"),
        ("WRN-34-10", "wrn-34-10"),
        ("wrn_28_10", "wrn-28-10"),
        ("WideResNet-16-4", "wrn-16-4"),
        ("wrn-10-1", "wrn-10-1"),
    ],
)
def test_canonical_arch_aliases(alias: str, canonical: str) -> None:
    assert canonical_arch(alias) == canonical


def test_unknown_arch_error_lists_choices() -> None:
    with pytest.raises(AtprobeError) as info:
        build_model("resnet51")
    msg = str(info.value)
    assert "'resnet51'" in msg and "\n" not in msg
    for arch in list_architectures():
        assert arch in msg
    assert WRN_PATTERN in msg


@pytest.mark.parametrize("bad", ["wrn-30-10", "wrn-4-2", "wrn-28-0"])
def test_bad_wrn_names_rejected(bad: str) -> None:
    with pytest.raises(AtprobeError, match="WideResNet"):
        canonical_arch(bad)


def test_numpy_scalars_accepted() -> None:
    np = pytest.importorskip("numpy")
    model = build_model("mlp", num_classes=np.int64(7), dropout=np.float32(0.25))
    assert model.num_classes == 7 and type(model.num_classes) is int
    assert model.dropout.p == 0.25


def test_non_string_arch_rejected() -> None:
    with pytest.raises(AtprobeError, match="string"):
        canonical_arch(18)  # type: ignore[arg-type]


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), "0.1", True])
def test_dropout_validation(p: object) -> None:
    with pytest.raises(AtprobeError, match="dropout"):
        build_model("mlp", dropout=p)  # type: ignore[arg-type]


@pytest.mark.parametrize("c", [1, 0, -3, 2.5, True])
def test_num_classes_validation(c: object) -> None:
    with pytest.raises(AtprobeError, match="num_classes"):
        build_model("mlp", num_classes=c)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mean", "std", "match"),
    [
        (CIFAR_MEAN, None, "both"),
        (None, CIFAR_STD, "both"),
        ((0.5, 0.5), CIFAR_STD, "3 values"),
        (CIFAR_MEAN, (0.2, 0.0, 0.2), "> 0"),
        (CIFAR_MEAN, (0.2, -1.0, 0.2), "> 0"),
        ((0.5, float("inf"), 0.5), CIFAR_STD, "finite"),
        (("a", "b", "c"), CIFAR_STD, "numbers"),
    ],
)
def test_normalization_validation(mean, std, match: str) -> None:
    with pytest.raises(AtprobeError, match=match):
        build_model("mlp", mean=mean, std=std)


# --------------------------------------------------------------------------- #
# Sizes and shapes
# --------------------------------------------------------------------------- #

# (exact count of the public implementation, the commonly quoted figure) for 10 classes.
PARAM_COUNTS = {
    "resnet18": (11_173_962, 11.17e6),
    "preact_resnet18": (11_172_170, 11.17e6),
    "vgg16": (14_728_266, 14.7e6),
    "dense121": (6_956_298, 6.96e6),
    "wrn-28-10": (36_479_194, 36.5e6),
    "wrn-34-10": (46_160_474, 46.2e6),
}


@pytest.mark.parametrize("arch", list(PARAM_COUNTS))
def test_parameter_counts(arch: str) -> None:
    exact, quoted = PARAM_COUNTS[arch]
    n = _n_params(_meta_model(arch))
    assert n == exact
    assert abs(n - quoted) / quoted < 0.01


def test_parameter_counts_small_models() -> None:
    # mlp: 3072*512+512 + 512*256+256 + 256*10+10
    assert _n_params(build_model("mlp")) == 1_707_274
    assert _n_params(build_model("cnn-small")) == 330_730
    assert _n_params(build_model("wrn-16-2")) == 691_674


@pytest.mark.parametrize("arch", GIANT + MEDIUM)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_logit_shapes_meta(arch: str, num_classes: int) -> None:
    model = _meta_model(arch, num_classes=num_classes)
    x = torch.empty(2, 3, 32, 32, device="meta")
    for mode in (True, False):
        model.train(mode)
        assert model(x).shape == (2, num_classes)


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_logit_shapes_compute(arch: str, num_classes: int) -> None:
    model = build_model(arch, num_classes=num_classes)
    assert model.training and model.arch == canonical_arch(arch) and model.num_classes == num_classes
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        for mode in (True, False):
            model.train(mode)
            out = model(x)
            assert out.shape == (2, num_classes)
            assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


@pytest.mark.parametrize(
    ("arch", "num_classes", "train"),
    [("resnet18", 100, True), ("preact_resnet18", 10, False), ("vgg16", 100, True)],
)
def test_logit_values_medium(arch: str, num_classes: int, train: bool) -> None:
    # One real forward each; shapes for every class count and mode are covered on
    # meta. DenseNet-121 computes only in its reduced form below: its ~120 distinct
    # conv shapes make a first CPU forward take several seconds.
    model = build_model(arch, num_classes=num_classes).train(train)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, num_classes)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


# --------------------------------------------------------------------------- #
# Public checkpoint layouts
# --------------------------------------------------------------------------- #

PRESENT = {
    "resnet18": [
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv1.weight",
        "layer1.1.bn2.num_batches_tracked",
        "layer2.0.shortcut.0.weight",
        "layer2.0.shortcut.1.running_mean",
        "layer4.0.shortcut.0.weight",
        "layer4.1.conv2.weight",
        "linear.weight",
        "linear.bias",
    ],
    "preact_resnet18": [
        "conv1.weight",
        "layer1.0.bn1.weight",
        "layer2.0.shortcut.0.weight",
        "layer4.1.bn2.running_mean",
        "bn.weight",
        "linear.weight",
    ],
    "wrn-34-10": [
        "conv1.weight",
        "block1.layer.0.bn1.weight",
        "block1.layer.0.convShortcut.weight",
        "block1.layer.4.conv2.weight",
        "block2.layer.0.convShortcut.weight",
        "block3.layer.4.bn2.running_var",
        "bn1.weight",
        "fc.weight",
        "fc.bias",
    ],
    "vgg16": [
        "features.0.weight",
        "features.0.bias",  # kuangliu's VGG convs keep their bias
        "features.1.running_mean",
        "features.40.weight",  # the 13th conv...
        "features.41.num_batches_tracked",  # ...and its BN (42 ReLU, 43 max-pool, 44 avg-pool)
        "classifier.weight",
    ],
    "dense121": [
        "conv1.weight",
        "dense1.0.bn1.weight",
        "dense1.5.conv2.weight",
        "trans1.conv.weight",
        "trans3.bn.running_var",
        "dense4.15.conv2.weight",
        "bn.weight",
        "linear.weight",
    ],
}
ABSENT = {
    "resnet18": ["layer1.0.shortcut.0.weight", "layer4.1.shortcut.0.weight", "fc.weight", "bn.weight"],
    "preact_resnet18": [
        "bn1.weight",
        "layer1.0.shortcut.0.weight",
        "layer4.1.shortcut.0.weight",
        "layer2.0.shortcut.1.weight",  # projection has no BN in the pre-act layout
    ],
    "wrn-34-10": [
        "block1.layer.1.convShortcut.weight",
        "sub_block1.layer.0.conv1.weight",  # TRADES' dead stage is not built
        "block1.layer.5.conv1.weight",  # n = (34 - 4) / 6 = 5 blocks per stage
        "linear.weight",
    ],
    "vgg16": ["features.0.running_mean", "features.42.weight", "features.44.weight", "linear.weight"],
    "dense121": ["dense1.6.conv1.weight", "trans4.conv.weight"],
}


@pytest.mark.parametrize("arch", list(PRESENT))
def test_state_dict_spot_keys(arch: str) -> None:
    keys = set(_meta_model(arch).state_dict())
    assert set(PRESENT[arch]) <= keys
    assert not set(ABSENT[arch]) & keys


@pytest.mark.parametrize("arch", list_architectures())
def test_normalize_buffers_not_in_state_dict(arch: str) -> None:
    plain = _meta_model(arch)
    normed = _meta_model(arch, mean=CIFAR_MEAN, std=CIFAR_STD)
    assert list(normed.state_dict()) == list(plain.state_dict())
    assert not any("normalize" in k for k in normed.state_dict())
    # ...but they are real buffers, so .to()/.double()/functional_call carry them.
    names = {n for n, _ in normed.named_buffers()}
    assert {"normalize.mean", "normalize.std"} <= names


# Faithful copies of the public implementations (in-place ReLUs, ``+=``, ``view``,
# TRADES' dead ``sub_block1``): checkpoints saved by them must load strictly and
# give the same logits.


class _KuangliuBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class _KuangliuResNet(nn.Module):
    def __init__(self, num_blocks, num_classes=10) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(_KuangliuBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


class _RicePreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class _RicePreActResNet(nn.Module):
    def __init__(self, num_blocks, num_classes=10) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(_RicePreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


class _TradesBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride, dropRate=0.0) -> None:  # noqa: N803
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.droprate = dropRate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (not self.equalInOut) and nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False) or None

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class _TradesNetworkBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, stride) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                _TradesBlock(i == 0 and in_planes or out_planes, out_planes, i == 0 and stride or 1)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x):
        return self.layer(x)


class _TradesWideResNet(nn.Module):
    def __init__(self, depth=34, num_classes=10, widen_factor=10) -> None:
        super().__init__()
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = _TradesNetworkBlock(n, ch[0], ch[1], 1)
        self.sub_block1 = _TradesNetworkBlock(n, ch[0], ch[1], 1)  # dead weight in TRADES/MART checkpoints
        self.block2 = _TradesNetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = _TradesNetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        return self.fc(out.view(-1, self.nChannels))


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize(
    ("arch", "reference"),
    [
        ("resnet18", lambda: _KuangliuResNet((2, 2, 2, 2))),
        ("preact_resnet18", lambda: _RicePreActResNet((2, 2, 2, 2))),
        ("wrn-34-10", lambda: _TradesWideResNet(34, 10, 10)),
    ],
)
def test_full_layout_matches_reference(arch: str, reference) -> None:
    with torch.device("meta"):
        ref_sd = reference().state_dict()
    ref_sd = {k: v for k, v in ref_sd.items() if not k.startswith("sub_block1.")}
    mine = _meta_model(arch).state_dict()
    assert list(mine) == list(ref_sd)  # same keys, same order
    assert _shapes(mine) == _shapes(ref_sd)


# (number of keys, sha256[:16] of "key (shape)" lines in state_dict order) per architecture,
# recorded from the single-module models.py before it became a package. Checkpoints on
# disk and foreign zoo checkpoints load by these keys: a refactor must not move them.
PINNED_STATE_DICT_LAYOUT = {
    "resnet18": (122, '60df589497195d3c'),
    "preact_resnet18": (107, '60f686c61bd3cc86'),
    "wrn-28-10": (155, '5dcb7163345fc9b3'),
    "wrn-34-10": (191, 'e1e47ba5ef4db7cc'),
    "vgg16": (93, '65ce1bb8741d403f'),
    "dense121": (722, '617320bbde7d5eda'),
    "cnn-small": (28, 'ffe946236a357b46'),
    "mlp": (6, 'a5a400152864eb42'),
    "wrn-16-1": (82, '3ec72f9ac1b71272'),
    # The zoo layouts, recorded when they were added (tests/test_zoo_models.py derives them
    # key by key from the public definitions).
    "resnet50": (320, '1c92fb35fd9a17e5'),
    "preact_resnet18_nobn": (102, '0398a9d7e8c61c4b'),
    "dm-wrn-28-10": (155, 'b90096af5bd9e339'),
    "dm-wrn-70-16": (407, '62373a5f03f997ad'),
    "dm-wrn-106-16": (623, '505e307ded209294'),
    "dm-preact-resnet18": (107, 'b8835d34ad2ec9fb'),
    "dm-preact-resnet34": (203, '51473b6a92c55ca5'),
}


def _state_dict_digest(model: nn.Module) -> tuple[int, str]:
    sd = model.state_dict()
    text = "\n".join(f"{k} {tuple(v.shape)}" for k, v in sd.items())
    return len(sd), hashlib.sha256(text.encode()).hexdigest()[:16]


def test_pinned_layout_covers_every_listed_architecture() -> None:
    assert set(list_architectures()) <= set(PINNED_STATE_DICT_LAYOUT)


@pytest.mark.parametrize("arch", list(PINNED_STATE_DICT_LAYOUT))
def test_state_dict_layout_is_pinned(arch: str) -> None:
    assert _state_dict_digest(_meta_model(arch)) == PINNED_STATE_DICT_LAYOUT[arch]


def _load_and_compare(ours: nn.Module, ref: nn.Module, drop_prefix: str | None = None) -> None:
    _randomize_bn(ref)
    sd = ref.state_dict()
    if drop_prefix is not None:
        sd = {k: v for k, v in sd.items() if not k.startswith(drop_prefix)}
    ours.load_state_dict(sd, strict=True)
    ours.eval()
    ref.eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-10)


def test_foreign_trades_wrn_checkpoint_loads_and_agrees() -> None:
    ref = _TradesWideResNet(16, 10, 1).double()
    _load_and_compare(build_model("wrn-16-1").double(), ref, drop_prefix="sub_block1.")


def test_foreign_kuangliu_resnet_checkpoint_loads_and_agrees() -> None:
    # One block per stage keeps it cheap while exercising both shortcut kinds.
    ref = _KuangliuResNet((1, 1, 1, 1), num_classes=7).double()
    _load_and_compare(ResNet(BasicBlock, (1, 1, 1, 1), 7).double(), ref)


def test_foreign_rice_preact_checkpoint_loads_and_agrees() -> None:
    ref = _RicePreActResNet((2, 1, 1, 1), num_classes=7).double()  # layer1.1 has an identity shortcut
    _load_and_compare(PreActResNet(PreActBlock, (2, 1, 1, 1), 7).double(), ref)


def test_small_densenet_computes() -> None:
    # Same Bottleneck/Transition code as dense121, a fraction of the cost.
    model = DenseNet((1, 2, 1, 1), growth_rate=8, num_classes=5)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        for mode in (True, False):
            out = model.train(mode)(x)
            assert out.shape == (2, 5) and bool(torch.isfinite(out).all())


def test_wrn_init_follows_trades() -> None:
    model = WideResNet(16, 10, 2)
    assert torch.count_nonzero(model.fc.bias) == 0
    conv = model.block2.layer[0].conv1
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.05)


# --------------------------------------------------------------------------- #
# Normalization inside the model
# --------------------------------------------------------------------------- #


def test_normalize_module() -> None:
    ident = Normalize()
    x = torch.rand(2, 3, 4, 4)
    assert ident(x) is x
    assert "identity" in repr(ident)
    norm = Normalize(CIFAR_MEAN, CIFAR_STD)
    assert norm.state_dict() == {}
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), (x - mean) / std)
    # dtype changes re-derive the constants exactly (no float32 rounding carried into float64).
    norm.double()
    assert norm.mean.dtype == torch.float64
    assert norm.std.flatten().tolist() == list(CIFAR_STD)
    assert norm.float().std.dtype == torch.float32
    # Meta construction + to_empty() gives the real constants back.
    with torch.device("meta"):
        lazy = Normalize(CIFAR_MEAN, CIFAR_STD)
    lazy.to_empty(device="cpu")
    assert lazy.mean.flatten().tolist() == pytest.approx(list(CIFAR_MEAN))


@pytest.mark.parametrize("arch", TINY)
def test_normalization_inside_model_equals_normalized_input(arch: str) -> None:
    normed = _randomize_bn(build_model(arch, mean=CIFAR_MEAN, std=CIFAR_STD)).double().eval()
    plain = build_model(arch).double().eval()
    plain.load_state_dict(normed.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    mean = torch.tensor(CIFAR_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(normed(x), plain((x - mean) / std), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(normed(x), plain(x))


# --------------------------------------------------------------------------- #
# Memory format, dtype, torch.func
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("arch", TINY + ["resnet18"])
def test_channels_last_matches_default(arch: str) -> None:
    model = _randomize_bn(build_model(arch, mean=CIFAR_MEAN, std=CIFAR_STD)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", TINY + ["preact_resnet18"])
def test_float64_matches_float32(arch: str) -> None:
    model = _randomize_bn(build_model(arch, mean=CIFAR_MEAN, std=CIFAR_STD)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = model.double()(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", TINY)
def test_functional_call_matches_module(arch: str) -> None:
    model = _randomize_bn(build_model(arch, mean=CIFAR_MEAN, std=CIFAR_STD)).double().eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        torch.testing.assert_close(functional_call(model, params, (x,)), model(x))
        params = {k: v * 1.5 for k, v in params.items()}
        assert not torch.allclose(functional_call(model, params, (x,)), model(x))


class _InplaceRecorder(TorchDispatchMode):
    """Records every in-place aten op (``relu_``, ``add_``, ...) dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.inplace: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.endswith("_") and not func._schema.name.endswith("__"):
            self.inplace.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _inplace_ops(model: nn.Module) -> list[str]:
    x = torch.empty(2, 3, 32, 32, device="meta")
    with _InplaceRecorder() as rec:
        model.eval()(x)  # eval: no BN running-stat updates, which are legitimately in-place
    return rec.inplace


def test_inplace_recorder_catches_upstream_style() -> None:
    with torch.device("meta"):
        upstream = _TradesWideResNet(16, 10, 1)
    assert _inplace_ops(upstream)  # in-place ReLUs, as in the TRADES code


@pytest.mark.parametrize("arch", list_architectures() + ["wrn-16-1"])
def test_forward_has_no_inplace_ops(arch: str) -> None:
    # In-place ops on activations break torch.func transforms; checked on meta, so free.
    assert _inplace_ops(_meta_model(arch, mean=CIFAR_MEAN, std=CIFAR_STD)) == []


@pytest.mark.parametrize("arch", ["mlp", "cnn-small", "dm-wrn-10-1"])  # dm: Swish, SAME pads, shortcut convs
def test_per_sample_gradients_with_vmap(arch: str) -> None:
    """vmap(grad(functional_call)) works (no in-place ops) and matches a per-example loop."""
    model = _randomize_bn(build_model(arch, mean=CIFAR_MEAN, std=CIFAR_STD)).double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([3, 7])

    def loss(p, xi, yi):
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(2):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-9, atol=1e-12)


def test_input_gradient_in_pixel_space() -> None:
    """Attacks differentiate w.r.t. [0,1] pixels; the chain rule goes through Normalize."""
    normed = build_model("mlp", mean=CIFAR_MEAN, std=CIFAR_STD).double()
    plain = build_model("mlp").double()
    plain.load_state_dict(normed.state_dict())
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    g_normed = torch.autograd.grad(normed(x)[0, 0], x)[0]
    std = torch.tensor(CIFAR_STD, dtype=torch.float64).view(1, 3, 1, 1)
    mean = torch.tensor(CIFAR_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    z = ((x - mean) / std).detach().requires_grad_(True)
    g_plain = torch.autograd.grad(plain(z)[0, 0], z)[0]
    torch.testing.assert_close(g_normed, g_plain / std)


# --------------------------------------------------------------------------- #
# Dropout
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("arch", list_architectures())
def test_no_dropout_modules_when_p_is_zero(arch: str) -> None:
    model = _meta_model(arch)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


@pytest.mark.parametrize(
    ("arch", "head"),
    [
        ("mlp", "fc3"),
        ("cnn-small", "classifier"),
        ("resnet18", "linear"),
        ("preact_resnet18", "linear"),
        ("vgg16", "classifier"),
        ("dense121", "linear"),
        ("resnet50", "linear"),
        ("preact_resnet18_nobn", "linear"),
        ("dm-wrn-16-1", "logits"),
        ("dm-preact-resnet18", "logits"),
    ],
)
def test_dropout_sits_before_the_classifier(arch: str, head: str) -> None:
    model = _meta_model(arch, dropout=0.3)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 1 and drops[0].p == 0.3 and model.dropout is drops[0]
    assert list(model.state_dict()) == list(_meta_model(arch).state_dict())
    # The dropout's output is exactly the head's input.
    seen: dict[str, torch.Tensor] = {}
    model.dropout.register_forward_hook(lambda m, i, o: seen.__setitem__("drop_out", o))
    getattr(model, head).register_forward_pre_hook(lambda m, i: seen.__setitem__("head_in", i[0]))
    model.eval()(torch.empty(2, 3, 32, 32, device="meta"))
    assert seen["drop_out"] is seen["head_in"]


def test_dropout_behaviour_mlp() -> None:
    model = build_model("mlp", dropout=0.5).double()
    plain = build_model("mlp").double()
    plain.load_state_dict(model.state_dict())
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x))
        model.train()
        assert not torch.allclose(model(x), model(x))


def test_wrn_dropout_inside_blocks() -> None:
    model = build_model("wrn-10-1", dropout=0.4)
    rates = {b.droprate for b in model.modules() if hasattr(b, "droprate")}
    assert rates == {0.4}
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    plain = build_model("wrn-10-1")
    plain.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x))
        model.train()
        assert not torch.allclose(model(x), model(x))


# --------------------------------------------------------------------------- #
# weight_layers
# --------------------------------------------------------------------------- #


def test_weight_layers_mlp_and_cnn_small() -> None:
    assert [n for n, _ in weight_layers(build_model("mlp"))] == ["fc1", "fc2", "fc3"]
    cnn = weight_layers(build_model("cnn-small", dropout=0.2))
    assert [n for n, _ in cnn] == ["features.0", "features.4", "features.8", "features.11", "fc", "classifier"]
    assert [type(m) for _, m in cnn] == [nn.Conv2d] * 4 + [nn.Linear] * 2


@pytest.mark.parametrize("arch", list_architectures() + ["wrn-16-2"])
def test_weight_layers_follow_execution_order(arch: str) -> None:
    model = _meta_model(arch).eval()
    layers = weight_layers(model)
    name_of = {id(m): n for n, m in layers}
    executed: list[str] = []
    for _, m in layers:
        m.register_forward_pre_hook(lambda mod, inp: executed.append(name_of[id(mod)]))
    model(torch.empty(1, 3, 32, 32, device="meta"))
    assert executed == [n for n, _ in layers]
    assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()) == len(layers)
