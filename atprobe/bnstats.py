"""Which BatchNorm statistics a per-sample probe normalizes with: ``running``, ``recompute[:N]``
or ``batch`` (``--bn-stats``; docs/probes/stability.md, "BatchNorm statistics").

The per-sample probes run the model in eval mode, so BatchNorm normalizes with its running
buffers. A freshly initialized model's buffers are mean 0, variance 1: every BatchNorm is
then the identity (up to ``1/sqrt(1 + eps)``), and the probe measures a network training
never sees (training normalizes with batch statistics; on resnet18 at init the logits' std
is 0.017 in eval mode against 0.31 in train mode). The modes:

* ``running``: the model's buffers as they are (a trained checkpoint's).
* ``recompute:N`` (default N = :data:`DEFAULT_N`): the buffers re-estimated on N training
  images (a seeded draw, no augmentation) *exactly* as one train-mode batch of all N images
  would set them with ``momentum=None``: per layer the mean and the unbiased variance of
  its inputs over the N images, the earlier layers normalizing with the N images' batch
  statistics. Computed layer by layer in float64 with any batch size, so the result does
  not depend on it (:func:`recompute_batchnorm`).
* ``batch``: every forward normalizes with the statistics of its own inputs, buffers never
  read nor updated (:func:`batch_statistics_model`). The samples of a chunk are coupled:
  a "per-sample gradient" is the gradient of sample i's loss through the chunk's
  statistics (``atprobe.pergrad`` computes it as a Jacobian row), and depends on the chunk
  size and composition; the resolved label ``batch:K`` records the chunk size K.
* ``auto``: ``recompute`` when the model's buffers are fresh (:func:`fresh_batchnorm`),
  ``running`` otherwise, decided per model by :func:`prepare`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from atprobe.data import Split, iterate_batches
from atprobe.errors import AtprobeError
from atprobe.runtime import make_generator, module_mode

__all__ = [
    "DEFAULT_N",
    "MODES",
    "ONE_PASS",
    "BNStats",
    "batch_statistics_model",
    "batchnorm_layers",
    "couples_samples",
    "draw_images",
    "fresh_batchnorm",
    "prepare",
    "recompute_batchnorm",
]

MODES = ("auto", "running", "recompute", "batch")
#: Training images ``recompute`` re-estimates the statistics on, unless ``recompute:N`` says.
DEFAULT_N = 1024
#: Images up to which :func:`prepare` recomputes with one forward of all of them (no-grad
#: activations of 1024 CIFAR images: ~0.3 GB for resnet18, ~2-3 GB for WRN-34-10 at peak);
#: more are estimated layer by layer in batches of the command's batch size.
ONE_PASS = 1024


@dataclass(frozen=True)
class BNStats:
    """A ``--bn-stats`` choice: ``mode`` (one of :data:`MODES`) and, for ``recompute``
    (and ``auto``, should it resolve to recompute), the number ``n`` of training images."""

    mode: str = "auto"
    n: int = DEFAULT_N

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise AtprobeError(f"unknown BatchNorm statistics {self.mode!r}: use running, recompute[:N], batch "
                               "or auto")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 2:
            raise AtprobeError(f"recompute:N needs an integer N >= 2 (a variance needs two images), got {self.n!r}")

    @classmethod
    def parse(cls, text: str | BNStats) -> BNStats:
        """``running``, ``recompute``, ``recompute:N``, ``batch`` or ``auto``."""
        if isinstance(text, BNStats):
            return text
        mode, sep, count = str(text).strip().lower().partition(":")
        if not sep:
            return cls(mode)
        if mode != "recompute":
            raise AtprobeError(f"--bn-stats {text!r}: only recompute takes a count (recompute:N)")
        try:
            n = int(count)
        except ValueError:
            raise AtprobeError(f"--bn-stats {text!r}: N in recompute:N must be an integer") from None
        return cls("recompute", n)

    def __str__(self) -> str:
        return f"recompute:{self.n}" if self.mode == "recompute" else self.mode


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics, in module order."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None]


def fresh_batchnorm(model: nn.Module) -> bool:
    """True when ``model`` has BatchNorm layers and every one of them holds the buffers of a
    fresh layer: ``running_mean`` all 0, ``running_var`` all 1 and ``num_batches_tracked``
    0 (exactly; a checkpoint saved before any training step, or ``build_model``'s output).
    A model without BatchNorm is not fresh (there is nothing to recompute)."""
    layers = batchnorm_layers(model)
    if not layers:
        return False
    for m in layers:
        tracked = m.num_batches_tracked
        if tracked is not None and int(tracked) != 0:
            return False
        if not (bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all())):
            return False
    return True


def couples_samples(model: nn.Module) -> bool:
    """True when a BatchNorm of ``model`` normalizes with batch statistics even in eval
    mode (no running buffers: :func:`batch_statistics_model`), so the samples of a forward
    are coupled."""
    return any(isinstance(m, _BatchNorm) and (m.running_mean is None or m.running_var is None)
               for m in model.modules())


def batch_statistics_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose BatchNorm layers normalize every forward with the batch
    statistics of its input and keep no buffers (``track_running_stats = False``, running
    mean/var None: what ``torch.func.replace_all_batch_norm_modules_`` does), in eval mode
    as well as in train mode; ``model`` is left as it is."""
    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, _BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return out


def draw_images(train: Split, n: int, seed: int) -> Split:
    """``n`` images of ``train`` (all of them when it has fewer): the first ``n`` of a
    permutation drawn from a CPU generator seeded with ``seed``, in split order. The same
    on every machine and for every batch size."""
    n = min(int(n), len(train))
    rows = torch.randperm(len(train), generator=make_generator(seed))[:n].sort().values
    return train.subset(rows.to(train.x.device))


class _Stop(Exception):
    """Raised by the capture hook: the forward need not go past the layer being estimated."""


def _moments(x: Tensor) -> tuple[int, Tensor, Tensor]:
    """``(count, mean, M2)`` per channel (dim 1) of ``x`` in float64, M2 = sum of squared
    deviations from the mean."""
    dims = [0, *range(2, x.dim())]
    x = x.detach().to(torch.float64)
    mean = x.mean(dims)
    shape = [1, -1] + [1] * (x.dim() - 2)
    m2 = (x - mean.view(shape)).square().sum(dims)
    return x.numel() // x.shape[1], mean, m2


def _forward_order(model: nn.Module, layers: list[_BatchNorm], x: Tensor) -> list[_BatchNorm]:
    """``layers`` in the order a forward of ``x`` calls them; each must be called once."""
    calls: list[_BatchNorm] = []
    handles = [m.register_forward_pre_hook(lambda m, args: calls.append(m)) for m in layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    if len(calls) != len(layers) or len({id(m) for m in calls}) != len(layers):
        raise AtprobeError("recompute: a BatchNorm layer is used more or less than once per forward; "
                           "its statistics over one batch are not defined")
    return calls


def _one_forward(model: nn.Module, layers: list[_BatchNorm], x: Tensor) -> None:
    """The definition itself: fresh buffers, BatchNorm alone in train mode with
    ``momentum=None``, one forward of ``x`` (every other module stays in eval mode)."""
    momenta = [m.momentum for m in layers]
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        model(x)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
            m.eval()


def recompute_batchnorm(model: nn.Module, images: Split, *, batch_size: int = 256) -> nn.Module:
    """A copy of ``model`` (eval mode, same device and dtype) whose BatchNorm buffers are
    what one train-mode forward of all of ``images`` with ``momentum=None`` would leave:
    for each layer, the mean and the unbiased variance (``N/(N-1)`` times the biased one)
    of its inputs over the images' batch and spatial positions, and ``num_batches_tracked
    = 1``. In that forward every earlier layer normalizes with the batch's mean and biased
    variance.

    With ``len(images) <= batch_size`` that is what runs (BatchNorm alone in train mode,
    dropout and the rest in eval mode). Otherwise the layers are estimated one after the
    other in forward order, each from a pass over ``images`` in batches of ``batch_size``
    with the earlier layers already normalizing with the full set's mean and biased
    variance (in eval mode) and the forward stopped at the layer; moments merged in float64
    (Chan et al.). Both give the same buffers up to rounding, whatever ``batch_size``.
    ``model`` is left as it is."""
    if len(images) < 2:
        raise AtprobeError("recompute needs at least two images")
    out = copy.deepcopy(model).eval()
    layers = batchnorm_layers(out)
    if not layers:
        return out
    p = next(out.parameters())
    data = images.to(p.device)

    def batches():
        for b in iterate_batches(data, batch_size, channels_last=True):
            yield b.x.to(p.dtype)

    with module_mode(out, False), torch.no_grad():
        first = next(batches())
        if len(images) <= batch_size:
            _one_forward(out, layers, first)
            return out
        counts: dict[int, int] = {}
        for m in _forward_order(out, layers, first):
            total = 0
            mean = m2 = None

            def capture(module, args):
                nonlocal total, mean, m2
                nb, mb, m2b = _moments(args[0])
                if mean is None:
                    total, mean, m2 = nb, mb, m2b
                else:
                    delta = mb - mean
                    both = total + nb
                    mean = mean + delta * (nb / both)
                    m2 = m2 + m2b + delta.square() * (total * nb / both)
                    total = both
                raise _Stop

            handle = m.register_forward_pre_hook(capture)
            try:
                for x in batches():
                    try:
                        out(x)
                    except _Stop:
                        pass
            finally:
                handle.remove()
            # the biased variance: how a train-mode batch normalizes the later layers' inputs
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_((m2 / total).to(m.running_var.dtype))
            counts[id(m)] = total
        for m in layers:  # stored as torch stores a batch's statistics: the unbiased variance
            total = counts[id(m)]
            m.running_var.mul_(total / (total - 1))
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.fill_(1)
    return out


def prepare(model: nn.Module, spec: BNStats, train: Split | None, *, seed: int, batch_size: int,
            chunk_size: int | None = None) -> tuple[nn.Module, str]:
    """The model a probe should see under ``spec`` and the resolved label of its table's
    ``bn_stats`` column: ``running`` (``model`` itself), ``recompute:N`` (a copy,
    :func:`recompute_batchnorm` on :func:`draw_images` of ``train`` with ``seed``, in one
    forward up to :data:`ONE_PASS` images or ``batch_size``; N the images used),
    ``batch:K`` (a copy, :func:`batch_statistics_model`; K = ``chunk_size``, the samples
    that share statistics, or ``batch`` when the probe has no chunks). ``auto``
    is resolved here, once per model: recompute if :func:`fresh_batchnorm`, else running."""
    spec = BNStats.parse(spec)
    mode = spec.mode
    if mode == "auto":
        mode = "recompute" if fresh_batchnorm(model) else "running"
    if mode == "running":
        return model, "running"
    if mode == "batch":
        return batch_statistics_model(model), "batch" if chunk_size is None else f"batch:{chunk_size}"
    if train is None:
        raise AtprobeError("--bn-stats recompute needs the training split")
    images = draw_images(train, spec.n, seed)
    one_pass = max(batch_size, ONE_PASS)
    return recompute_batchnorm(model, images, batch_size=one_pass), f"recompute:{len(images)}"
