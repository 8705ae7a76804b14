"""AutoAttack (Croce & Hein 2020) through the optional extra ``pyautoattack``: the one adapter.

``pip install 'atprobe[autoattack]'`` installs ``pyautoattack`` 0.2.0, the official
implementation as a package (no dependencies). This module is the only place that imports
it, and only when an AutoAttack name is parsed (``autoattack_config``) or run (``perturb``),
so atprobe works without it; without it an AutoAttack name is a one-line ``AtprobeError``.

Names (``NAMES``): ``aa`` (the standard version: APGD-CE, APGD-T, FAB-T, Square, each on
the points still robust), ``aa-plus`` (the plus version) and the single attacks of the
standard version (``apgd-ce``, ``apgd-t``, ``fab-t``, ``square``) with their standard
settings. The norm and eps are the threat model's; its alpha, steps, restarts and start do
not apply. Iteration counts are read from the package's own objects (``_counts``).

``perturb`` runs one batch: the model in float32 at its inputs and outputs (the package's
arithmetic is float32; the model itself runs in its own dtype and device), seeded with the
command's seed (the package seeds torch's global generator at every call; the caller's
generator state is restored afterwards), silent (its logger is ``atprobe.autoattack``,
which has a ``NullHandler``: configure logging to see its checks' warnings), no state file.
The package draws its random starts for the batch as a whole, so unlike atprobe's PGD a
sample's adversarial example depends on the other samples of its batch (docs/attacks.md).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from atprobe.errors import AtprobeError
from atprobe.runtime import frozen_parameters

PACKAGE = "pyautoattack"
INSTALL = "AutoAttack needs the optional extra: pip install 'atprobe[autoattack]'"

#: name -> (the package's version, the attacks run; None = all of that version, in its order)
NAMES: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "aa": ("standard", None),
    "aa-plus": ("plus", None),
    "apgd-ce": ("standard", ("apgd-ce",)),
    "apgd-t": ("standard", ("apgd-t",)),
    "fab-t": ("standard", ("fab-t",)),
    "square": ("standard", ("square",)),
}
_NORMS = {"linf": "Linf", "l2": "L2"}
#: classes the targeted attacks need: the true class and n_target_classes others
_TARGETED = ("apgd-t", "fab-t")

LOG = logging.getLogger("atprobe.autoattack")
LOG.addHandler(logging.NullHandler())


@dataclass(frozen=True)
class AutoAttackConfig:
    """One AutoAttack run: ``version`` of the package running ``attacks`` in order (each on
    the samples still classified correctly) in the ``norm`` ball of radius ``eps``.

    steps, restarts: the iteration count per run and the runs per sample, read from the
        package (``_counts``); for several attacks the sums over them of ``steps x restarts``
        and of ``restarts`` (what a sample that survives every attack goes through).
    components: ``(attack, steps, restarts)`` per attack.
    target_classes: target classes of the targeted attacks (they need that many + 1 classes).
    """

    name: str
    version: str
    attacks: tuple[str, ...]
    norm: str
    eps: float
    steps: int
    restarts: int
    components: tuple[tuple[str, int, int], ...]
    target_classes: int
    package_version: str

    @property
    def alpha(self) -> float:
        """No fixed step (APGD adapts its own): 0, as for ``natural``."""
        return 0.0


def _package():
    """The ``pyautoattack`` module, or the one-line error saying how to install it."""
    try:
        return importlib.import_module(PACKAGE)
    except ImportError:
        raise AtprobeError(INSTALL) from None


def _adversary(package, model: nn.Module, version: str, attacks: tuple[str, ...] | None, norm: str, eps: float,
               seed: int, device):
    """The package's ``AutoAttack`` of ``version`` running ``attacks`` (None: the version's), quiet."""
    adversary = package.AutoAttack(model, device=device, eps=eps, norm=_NORMS[norm], seed=seed, version=version)
    if attacks is not None:  # one attack with the version's settings, as the package's own
        adversary.attacks_to_run = list(attacks)  # run_standard_evaluation_individual does
    adversary.verbose = False
    adversary.logger = adversary.apgd.logger = adversary.apgd_targeted.logger = LOG
    return adversary


def _counts(adversary, attack: str) -> tuple[int, int]:
    """``(iterations per run, runs per sample)`` of one attack, from the package's objects:
    APGD's ``n_iter`` x ``n_restarts`` (x ``n_target_classes`` for APGD-T), FAB's likewise
    (FAB-T runs one restart per target class: the package sets ``n_restarts = 1`` for it),
    Square's ``n_queries`` x ``n_restarts``."""
    if attack in ("apgd-ce", "apgd-dlr"):
        return adversary.apgd.n_iter, adversary.apgd.n_restarts
    if attack == "apgd-t":
        t = adversary.apgd_targeted
        return t.n_iter, t.n_restarts * t.n_target_classes
    if attack == "fab":
        return adversary.fab.n_iter, adversary.fab.n_restarts
    if attack == "fab-t":
        return adversary.fab.n_iter, adversary.fab.n_target_classes
    if attack == "square":
        return adversary.square.n_queries, adversary.square.n_restarts
    raise AtprobeError(f"AutoAttack attack {attack!r} is not supported")


def autoattack_config(name: str, norm: str, eps: float) -> AutoAttackConfig:
    """The config of AutoAttack name ``name`` (a key of ``NAMES``) in the ``norm`` ball of
    radius ``eps``; the missing extra is an ``AtprobeError`` here, before any work."""
    package = _package()
    adversary = _adversary(package, nn.Identity(), *NAMES[name], norm, eps, 0, "cpu")
    attacks = tuple(adversary.attacks_to_run)
    components = tuple((a, *_counts(adversary, a)) for a in attacks)
    targets = max([adversary.apgd_targeted.n_target_classes if "apgd-t" in attacks else 0,
                   adversary.fab.n_target_classes if "fab-t" in attacks else 0])
    return AutoAttackConfig(
        name=name, version=NAMES[name][0], attacks=attacks, norm=norm, eps=float(eps),
        steps=components[0][1] if len(components) == 1 else sum(s * r for _, s, r in components),
        restarts=sum(r for _, _, r in components),
        components=components, target_classes=targets, package_version=str(package.__version__),
    )


class _Float32Logits(nn.Module):
    """``model`` as the package wants it: float32 images in, float32 logits out; the model
    itself runs in ``dtype`` (its own)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.to(self.dtype)).float()


@contextlib.contextmanager
def _isolated(device: torch.device):
    """The package reseeds torch's global generators and swaps ``sys.settrace`` (its check
    for dynamic defenses): restore both, so nothing outside the attack notices."""
    trace = sys.gettrace()
    devices = sorted({device.index or 0, torch.cuda.current_device()}) if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        sys.settrace(trace)


def perturb(model: nn.Module, x: Tensor, y: Tensor, config: AutoAttackConfig, *, seed: int = 0) -> Tensor:
    """AutoAttack's adversarial examples of the batch ``(x, y)`` against ``model`` (in the
    mode it is in: ``atprobe.attacked`` puts it in eval mode), seeded by ``seed``. Samples
    the model already misclassifies come back unchanged. Returns ``x``'s dtype and layout;
    for a model that is not float32 the examples are projected back into the ball in that
    dtype (the package rounds them to float32)."""
    package = _package()
    from atprobe.attacks import project  # attacks imports this module

    classes = _classes(model, x)
    if config.target_classes and classes < config.target_classes + 1:
        raise AtprobeError(f"AutoAttack's {config.name!r} attacks {config.target_classes} target classes and needs a "
                           f"model with at least {config.target_classes + 1} classes, not {classes}")
    forward = _Float32Logits(model, x.dtype)
    adversary = _adversary(package, forward, config.version, config.attacks, config.norm, config.eps, seed, x.device)
    x32, y = x.detach().float().contiguous(), y.to(x.device)  # NCHW: the package views its tensors
    with _isolated(x.device), frozen_parameters(model):
        x_adv, _ = adversary.run_standard_evaluation(x32, y, batch_size=x.shape[0])
    x_adv = x_adv.to(x.dtype)
    if x.dtype != torch.float32:
        x_adv = x + project(x_adv - x, x, config.norm, config.eps)
    return torch.empty_like(x).copy_(x_adv)


def _classes(model: nn.Module, x: Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[-1])
