"""Device, precision and seeding: the few runtime choices every command shares."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from atprobe.errors import AtprobeError, check_seed


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` picks the first CUDA device when there is one, else the CPU.

    ``cpu``, ``cuda`` and ``cuda:N`` are taken literally and checked, so a typo or a
    missing GPU is a one-line error instead of a crash deep inside a forward pass.
    """
    if isinstance(spec, torch.device):
        return spec
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise AtprobeError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AtprobeError(f"device {spec!r} asked for, but no CUDA GPU is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AtprobeError(
                f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type != "cpu":
        raise AtprobeError(f"device type {device.type!r} is not supported: use auto, cpu or cuda[:N]")
    return device


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the speed path); a no-op on the CPU, where tests want exact float math."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A local generator, so no command touches (or depends on) the global RNG stream."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(check_seed(seed))
    return g


def set_determinism(seed: int, deterministic: bool = True) -> None:
    """Seed the global torch RNGs (layers that draw from them, e.g. dropout) and pin the
    cuDNN algorithm choice, so the same seed gives the same CSV.

    CPU kernels are deterministic already. ``torch.use_deterministic_algorithms`` is not
    called: it imports the compiler stack (about 5 s per command) and raises on CUDA ops
    without a deterministic kernel; cuDNN is pinned instead, which is what varies there.
    """
    torch.manual_seed(check_seed(seed))
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move a model to its device in channels_last (NHWC) memory format.

    NHWC is the fast layout for convolutions on CUDA (tensor cores) and on the CPU
    (oneDNN): a forward+backward of cnn-small on 64 images ran about 4x faster in NHWC
    on the 2-core CI machine. Feed it ``iterate_batches(..., channels_last=True)``.
    """
    return model.to(device).to(memory_format=torch.channels_last)


@contextlib.contextmanager
def module_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put every submodule in train or eval mode and restore each one's own flag afterwards.

    Restoring per submodule (not just ``model.train(prev)``) keeps a deliberately mixed
    state, e.g. a frozen BatchNorm inside a training model, intact.
    """
    previous = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, flag in previous:
            m.training = flag


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Turn off ``requires_grad`` on the parameters while only input gradients are wanted.

    The forward pass then saves nothing for weight gradients: less memory traffic in
    every attack step. Flags are restored even if the body raises.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
