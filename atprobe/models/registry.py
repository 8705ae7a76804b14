"""The architecture registry: names, aliases and the builder behind each name.

:func:`build_model` looks a canonical name up in a table of builders (one entry per
fixed architecture; WideResNets are built from the depth/width parsed out of
``wrn-D-W`` and ``dm-wrn-D-W``), so adding an architecture is one table entry plus its aliases.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Sequence

import torch.nn as nn

from atprobe.errors import AtprobeError
from atprobe.models.densenet import DenseNet
from atprobe.models.dm_preact_resnet import DMPreActResNet
from atprobe.models.dm_wide_resnet import DMWideResNet
from atprobe.models.preact_resnet import InputShortcutPreActBlock, PreActBlock, PreActResNet
from atprobe.models.resnet import BasicBlock, ResNet, ResNetBottleneck
from atprobe.models.small import MLP, SmallCNN
from atprobe.models.vgg import VGG
from atprobe.models.wide_resnet import WideResNet

#: The generic WideResNet name patterns accepted by :func:`canonical_arch`: the TRADES
#: layout and DeepMind's.
WRN_PATTERN = "wrn-D-W"
DM_WRN_PATTERN = "dm-wrn-D-W"

_Builder = Callable[..., nn.Module]

# Builders take (num_classes, dropout=, mean=, std=); WRN is handled by pattern.
_BUILDERS: dict[str, _Builder] = {
    "resnet18": lambda c, **kw: ResNet(BasicBlock, (2, 2, 2, 2), c, **kw),
    "resnet50": lambda c, **kw: ResNet(ResNetBottleneck, (3, 4, 6, 3), c, **kw),
    "preact_resnet18": lambda c, **kw: PreActResNet(PreActBlock, (2, 2, 2, 2), c, **kw),
    "preact_resnet18_nobn": lambda c, **kw: PreActResNet(InputShortcutPreActBlock, (2, 2, 2, 2), c, final_bn=False,
                                                         **kw),
    "dm-preact-resnet18": lambda c, **kw: DMPreActResNet(18, c, **kw),
    "dm-preact-resnet34": lambda c, **kw: DMPreActResNet(34, c, **kw),
    "vgg16": lambda c, **kw: VGG("VGG16", c, **kw),
    "dense121": lambda c, **kw: DenseNet((6, 12, 24, 16), 32, 0.5, c, **kw),
    "cnn-small": lambda c, **kw: SmallCNN(c, **kw),
    "mlp": lambda c, **kw: MLP(c, **kw),
}

# WideResNets listed by list_architectures(); any (dm-)wrn-D-W with D = 6n+4 also builds.
_WRN_EXAMPLES = ("wrn-28-10", "wrn-34-10")
_DM_WRN_EXAMPLES = ("dm-wrn-28-10", "dm-wrn-70-16", "dm-wrn-106-16")

# Alias keys are compared after lower-casing and mapping "_"/" " to "-".
_ALIASES: dict[str, str] = {
    "resnet18": "resnet18",
    "resnet-18": "resnet18",
    "rn18": "resnet18",
    "resnet50": "resnet50",
    "resnet-50": "resnet50",
    "rn50": "resnet50",
    "preact-resnet18": "preact_resnet18",
    "preact-resnet-18": "preact_resnet18",
    "preactresnet18": "preact_resnet18",
    "preactresnet-18": "preact_resnet18",
    "prn18": "preact_resnet18",
    "preact-resnet18-nobn": "preact_resnet18_nobn",
    "preact-resnet-18-nobn": "preact_resnet18_nobn",
    "preactresnet18-nobn": "preact_resnet18_nobn",
    "dm-preact-resnet18": "dm-preact-resnet18",
    "dm-preact-resnet-18": "dm-preact-resnet18",
    "dm-preactresnet18": "dm-preact-resnet18",
    "dmpreactresnet18": "dm-preact-resnet18",
    "dm-preact-resnet34": "dm-preact-resnet34",
    "dm-preact-resnet-34": "dm-preact-resnet34",
    "dm-preactresnet34": "dm-preact-resnet34",
    "dmpreactresnet34": "dm-preact-resnet34",
    "vgg16": "vgg16",
    "vgg-16": "vgg16",
    "vgg16-bn": "vgg16",
    "dense121": "dense121",
    "densenet121": "dense121",
    "densenet-121": "dense121",
    "cnn-small": "cnn-small",
    "cnnsmall": "cnn-small",
    "small-cnn": "cnn-small",
    "smallcnn": "cnn-small",
    "mlp": "mlp",
}

# Group 1: the DeepMind prefix ("dm-"), if any; groups 2-3: depth and width.
_WRN_RE = re.compile(r"^(dm-?)?(?:wrn|wide-?resnet)-?(\d+)-(\d+)$")


def list_architectures() -> list[str]:
    """Canonical names of the registered architectures, in a stable order.

    Every name is buildable as is. Besides the listed WideResNets, any ``wrn-D-W``
    or ``dm-wrn-D-W`` with D = 6n+4, n >= 1 and W >= 1 is accepted (e.g. ``wrn-16-4``,
    ``wrn-34-20``, ``dm-wrn-34-10``); see :data:`WRN_PATTERN`, :data:`DM_WRN_PATTERN`.
    """
    return [
        "resnet18",
        "resnet50",
        "preact_resnet18",
        "preact_resnet18_nobn",
        *_WRN_EXAMPLES,
        *_DM_WRN_EXAMPLES,
        "dm-preact-resnet18",
        "dm-preact-resnet34",
        "vgg16",
        "dense121",
        "cnn-small",
        "mlp",
    ]


def _choices_text() -> str:
    return (", ".join(list_architectures())
            + f", or {WRN_PATTERN} / {DM_WRN_PATTERN} with D = 6n+4 (e.g. wrn-16-4, dm-wrn-34-10)")


def _parse_wrn(name: str) -> tuple[str, int, int] | None:
    """``(prefix, depth, width)`` of a (DeepMind) WideResNet name: prefix ``""`` or ``"dm-"``."""
    m = _WRN_RE.match(name)
    if m is None:
        return None
    return ("dm-" if m.group(1) else ""), int(m.group(2)), int(m.group(3))


def canonical_arch(arch: str) -> str:
    """Normalize an architecture name (case, ``_``/``-``, known aliases) and validate it.

    ``"ResNet-18"`` -> ``"resnet18"``, ``"PreActResNet18"`` -> ``"preact_resnet18"``,
    ``"WRN_34_10"`` / ``"WideResNet-34-10"`` -> ``"wrn-34-10"``, ``"DM_WRN_70_16"`` ->
    ``"dm-wrn-70-16"``. Raises
    :class:`AtprobeError` naming the choices for anything else, and for a WRN
    depth that is not 6n+4.
    """
    if not isinstance(arch, str):
        raise AtprobeError(f"architecture must be a string, got {type(arch).__name__}")
    key = re.sub(r"[\s_]+", "-", arch.strip().lower())
    if key in _ALIASES:
        return _ALIASES[key]
    wrn = _parse_wrn(key)
    if wrn is not None:
        prefix, depth, width = wrn
        if depth < 10 or (depth - 4) % 6 != 0:
            raise AtprobeError(
                f"bad WideResNet {arch!r}: depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth}"
            )
        if width < 1:
            raise AtprobeError(f"bad WideResNet {arch!r}: widen factor must be >= 1, got {width}")
        return f"{prefix}wrn-{depth}-{width}"
    raise AtprobeError(f"unknown architecture {arch!r}; choose one of: {_choices_text()}")


def _check_options(num_classes: int, dropout: float) -> tuple[int, float]:
    """Validate and normalize (numpy scalars welcome) the numeric options."""
    # bool is an int subclass; ``num_classes=True`` is always a mistake.
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise AtprobeError(f"num_classes must be an integer, got {num_classes!r}")
    if num_classes < 2:
        raise AtprobeError(f"num_classes must be >= 2, got {num_classes}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise AtprobeError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if not (0.0 <= float(dropout) < 1.0):  # also rejects NaN
        raise AtprobeError(f"dropout must be in [0, 1), got {dropout}")
    return int(num_classes), float(dropout)


def build_model(
    arch: str,
    num_classes: int = 10,
    *,
    dropout: float = 0.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Build a float32 CIFAR classifier for ``[0, 1]`` inputs of shape ``(B, 3, 32, 32)``.

    Args:
        arch: a name from :func:`list_architectures`, an alias, ``wrn-D-W`` or ``dm-wrn-D-W``.
        num_classes: number of logits (>= 2).
        dropout: probability in [0, 1). TRADES WideResNets use it inside every block
            (upstream ``dropRate``); the other models (DeepMind ones included) apply ``nn.Dropout`` right
            before the final classifier (no module at all when 0).
        mean, std: per-channel input normalization applied inside the model
            (``model.normalize``); both or neither. None means identity.

    Returns:
        The model in train mode, with ``model.arch`` set to the canonical name.
    """
    name = canonical_arch(arch)
    num_classes, p = _check_options(num_classes, dropout)
    model: nn.Module
    wrn = _parse_wrn(name)
    if wrn is not None:
        prefix, depth, width = wrn
        if prefix:
            model = DMWideResNet(depth, width, num_classes, dropout=p, mean=mean, std=std)
        else:
            model = WideResNet(depth, num_classes, width, p, mean=mean, std=std)
    else:
        model = _BUILDERS[name](num_classes, dropout=p, mean=mean, std=std)
    model.arch = name  # informational; a plain attribute, not in state_dict
    return model


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``nn.Conv2d`` and ``nn.Linear`` layers of ``model`` with qualified names.

    Order is module registration order (``named_modules``). For every
    architecture built here this equals the order in which the layers run in
    ``forward``; a residual block's shortcut projection (``shortcut.0``,
    ``convShortcut``) comes after that block's main-branch convs, where it runs.
    Names are ``state_dict`` prefixes, e.g. ``layer1.0.conv1`` or ``fc``.
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
