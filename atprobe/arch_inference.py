"""Which architecture a foreign state_dict holds (``--arch auto``), read off its keys and shapes.

One table, :data:`SIGNATURES`, one entry per family of public code: the keys that identify
the family, and how depth and width follow from shapes and block counts. An entry names an
architecture only where atprobe builds it (:func:`atprobe.models.canonical_arch` accepts
the name), so entries for families atprobe does not build yet resolve to a one-line error
that says what the weights look like, and start resolving as soon as the registry has them.
Adding a family is one entry.

:func:`infer_arch` is the rule: exactly one family identifies the keys and names a buildable
size -> that architecture; none -> an error listing the candidates; more than one -> an
error listing the ones that fit. Loading the weights afterwards (strictly, in
``atprobe.checkpoint``) is the check that every key and shape fits the chosen architecture.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from atprobe.errors import AtprobeError
from atprobe.models import canonical_arch, list_architectures
from atprobe.models.registry import WRN_PATTERN

#: The value of ``--arch`` that asks for inference.
AUTO = "auto"

_State = Mapping[str, torch.Tensor]


def _count(state: _State, pattern: str) -> int:
    """How many distinct indices ``(\\d+)`` the keys matching ``pattern`` have."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.fullmatch(k))})


def _stages(state: _State, fmt: str, stages: range) -> tuple[int, ...]:
    """Blocks per stage: ``fmt.format(stage)`` is the pattern of a block's first weight."""
    return tuple(_count(state, fmt.format(s)) for s in stages)


def _width(state: _State, key: str, base: int) -> int | None:
    """``out_channels(key) / base`` when it divides exactly (a widen factor), else None."""
    channels = int(state[key].shape[0])
    return channels // base if channels % base == 0 and channels >= base else None


def _blocks_text(blocks: tuple[int, ...]) -> str:
    return "-".join(map(str, blocks))


# Block counts per stage of the standard depths (He et al. 2016; Huang et al. 2017).
_RESNET_BASIC = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}
_RESNET_BOTTLENECK = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
_DENSENET = {((6, 12, 24, 16), 32): 121, ((6, 12, 32, 32), 32): 169, ((6, 12, 48, 32), 32): 201,
             ((6, 12, 36, 24), 48): 161}
_VGG = {8: 11, 10: 13, 13: 16, 16: 19}


def _kuangliu_resnet(state: _State) -> tuple[str | None, str]:
    blocks = _stages(state, r"layer{}\.(\d+)\.conv1\.weight", range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in state
    depth = (_RESNET_BOTTLENECK if bottleneck else _RESNET_BASIC).get(blocks)
    kind = "Bottleneck" if bottleneck else "BasicBlock"
    return (None if depth is None else f"resnet{depth}"), f"{kind} blocks {_blocks_text(blocks)}"


def _rice_preact(state: _State) -> tuple[str | None, str]:
    blocks = _stages(state, r"layer{}\.(\d+)\.conv1\.weight", range(1, 5))
    depth = _RESNET_BASIC.get(blocks)
    final_bn = "bn.weight" in state
    suffix = "" if final_bn else "_nobn"
    detail = f"blocks {_blocks_text(blocks)}{'' if final_bn else ', no final bn'}"
    return (None if depth is None else f"preact_resnet{depth}{suffix}"), detail


def _wrn(state: _State, block: str, first_conv: str, fmt: str) -> tuple[str | None, str]:
    n = _count(state, rf"{block}\.(\d+)\.{first_conv}\.weight")
    width = _width(state, f"{block}.0.{first_conv}.weight", 16)
    depth = 6 * n + 4
    detail = f"{n} blocks per group, {int(state[f'{block}.0.{first_conv}.weight'].shape[0])} channels in the first"
    return (None if width is None or n < 1 else fmt.format(depth=depth, width=width)), detail


def _trades_wrn(state: _State) -> tuple[str | None, str]:
    return _wrn(state, "block1.layer", "conv1", "wrn-{depth}-{width}")


def _dm_wrn(state: _State) -> tuple[str | None, str]:
    return _wrn(state, "layer.0.block", "conv_0", "dm-wrn-{depth}-{width}")


def _dm_preact(state: _State) -> tuple[str | None, str]:
    blocks = _stages(state, r"layer_{}\.(\d+)\.conv_2d_1\.weight", range(4))
    depth = _RESNET_BASIC.get(blocks)
    return (None if depth is None else f"dm-preact-resnet{depth}"), f"blocks {_blocks_text(blocks)}"


def _vgg(state: _State) -> tuple[str | None, str]:
    convs = sum(1 for k, v in state.items() if re.fullmatch(r"features\.\d+\.weight", k) and v.dim() == 4)
    depth = _VGG.get(convs)
    return (None if depth is None else f"vgg{depth}"), f"{convs} conv layers"


def _densenet(state: _State) -> tuple[str | None, str]:
    blocks = _stages(state, r"dense{}\.(\d+)\.conv1\.weight", range(1, 5))
    growth = int(state["dense1.0.conv2.weight"].shape[0])
    depth = _DENSENET.get((blocks, growth))
    return (None if depth is None else f"dense{depth}"), f"blocks {_blocks_text(blocks)}, growth {growth}"


def _cnn_small(state: _State) -> tuple[str | None, str]:
    return "cnn-small", "features + fc + classifier"


def _mlp(state: _State) -> tuple[str | None, str]:
    inputs = int(state["fc1.weight"].shape[1])
    return ("mlp" if inputs == 3 * 32 * 32 else None), f"{inputs} inputs"


@dataclass(frozen=True)
class Signature:
    """One family: the keys that identify it (all of ``has``, none of ``lacks``) and
    ``size(state) -> (name or None, detail)``, the architecture the shapes and counts give
    (None: the family, at a size no standard name covers). ``normalizes_inside``: every
    public class of the family normalizes its inputs in ``forward`` (so weights saved
    without the values still expect normalized inputs)."""

    family: str
    has: tuple[str, ...]
    lacks: tuple[str, ...]
    size: Callable[[_State], tuple[str | None, str]]
    normalizes_inside: bool = False

    def identifies(self, state: _State) -> bool:
        return all(k in state for k in self.has) and not any(k in state for k in self.lacks)


SIGNATURES: tuple[Signature, ...] = (
    Signature("kuangliu ResNet", ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "linear.weight"), (),
              _kuangliu_resnet),
    Signature("PreActResNet (Rice et al. / Wong et al.)", ("conv1.weight", "layer1.0.bn1.weight", "linear.weight"),
              ("bn1.weight",), _rice_preact),
    Signature("WideResNet (TRADES / MART)", ("conv1.weight", "block1.layer.0.conv1.weight", "fc.weight"), (),
              _trades_wrn),
    Signature("DeepMind WideResNet (Gowal et al. / Rebuffi et al.)",
              ("init_conv.weight", "layer.0.block.0.conv_0.weight", "logits.weight"), (), _dm_wrn,
              normalizes_inside=True),
    Signature("DeepMind PreActResNet (Rebuffi et al.)",
              ("conv_2d.weight", "layer_0.0.conv_2d_1.weight", "logits.weight"), (), _dm_preact,
              normalizes_inside=True),
    Signature("kuangliu VGG", ("features.0.weight", "classifier.weight"), ("fc.weight",), _vgg),
    Signature("kuangliu DenseNet", ("conv1.weight", "dense1.0.conv1.weight", "trans1.conv.weight", "linear.weight"),
              (), _densenet),
    Signature("atprobe cnn-small", ("features.0.weight", "fc.weight", "classifier.weight"), (), _cnn_small),
    Signature("atprobe mlp", ("fc1.weight", "fc2.weight", "fc3.weight"), ("fc4.weight",), _mlp),
)


@dataclass(frozen=True)
class Inferred:
    """The chosen architecture and why: ``family`` and ``detail`` (what the keys showed)."""

    arch: str
    family: str
    detail: str

    @property
    def line(self) -> str:
        return f"--arch auto chose {self.arch} ({self.family}: {self.detail})"


def _buildable(name: str | None) -> str | None:
    """The canonical name when atprobe builds ``name`` (None otherwise)."""
    if name is None:
        return None
    try:
        return canonical_arch(name)
    except AtprobeError:
        return None


def _candidates_text() -> str:
    return ", ".join(list_architectures()) + f", {WRN_PATTERN}"


def identified(state: _State) -> list[Signature]:
    """The families whose keys ``state`` has."""
    return [sig for sig in SIGNATURES if sig.identifies(state)]


def infer_arch(state: _State, where: str = "the weights") -> Inferred:
    """The one architecture ``state`` (prefixes already stripped) identifies; a one-line
    :class:`AtprobeError` listing the candidates when none or several do. ``where`` names the
    weights in the message (the checkpoint's path)."""
    found: list[tuple[Signature, str | None, str]] = []
    for sig in identified(state):
        name, detail = sig.size(state)
        found.append((sig, name, detail))
    fits = [(sig, arch, detail) for sig, name, detail in found if (arch := _buildable(name))]
    if len(fits) == 1:
        sig, arch, detail = fits[0]
        return Inferred(arch, sig.family, detail)
    if len(fits) > 1:
        listed = "; ".join(f"{arch} ({sig.family})" for sig, arch, _ in fits)
        raise AtprobeError(f"{where}: --arch auto is ambiguous: the keys fit {listed}; pass --arch NAME")
    if found:
        seen = "; ".join(f"{sig.family}, {detail}" + (f" (= {name}, which atprobe does not build)" if name else "")
                         for sig, name, detail in found)
        raise AtprobeError(f"{where}: --arch auto found no architecture atprobe builds: the keys look like {seen}; "
                           f"candidates: {_candidates_text()}")
    keys = ", ".join(list(state)[:3])
    raise AtprobeError(f"{where}: --arch auto does not recognize the keys ({keys}, ...); candidates: "
                       f"{_candidates_text()}; pass --arch NAME")
