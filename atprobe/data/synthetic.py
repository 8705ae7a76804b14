"""The built-in ``synthetic`` dataset: class prototypes plus nuisances, no download needed.

See ``docs/data.md`` for the definition."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from atprobe.data.checks import check_int
from atprobe.data.types import Split, make_split
from atprobe.errors import AtprobeError

# Generator parameters (pixel values in [0, 1]); see docs/data.md for the definition.
_SYN_SIZE = 32
_SYN_LOWRES = 5  # prototype detail: a 5x5 random grid upsampled bicubically
_SYN_AMPLITUDE = 0.35  # peak |prototype|; class structure far above 8/255
_SYN_SHIFT = 2  # random translation in [-2, 2] px (augmentation adds up to 4 more)
_SYN_CONTRAST = (0.5, 1.1)  # per-sample gain on the class prototype
_SYN_DISTRACT = 0.5  # max weight of another class's prototype mixed in
_SYN_BRIGHTNESS = 0.12  # per-sample global brightness offset, uniform +-
_SYN_COLOR = 0.04  # per-sample per-channel offset, uniform +-
_SYN_NUISANCE = 0.2  # scale of a per-sample smooth 4x4-upsampled random pattern
_SYN_NOISE = 0.08  # i.i.d. Gaussian pixel noise std


def _upsample_matrix(lo: int, hi: int) -> torch.Tensor:
    """(hi, lo) matrix that bilinearly upsamples a length-lo signal (U @ low @ U.T for 2-D)."""
    eye = torch.eye(lo)[:, None, :]
    return F.interpolate(eye, size=hi, mode="linear", align_corners=False)[:, 0, :].T.contiguous()


def _synthetic_images(
    bank: torch.Tensor, n: int, num_classes: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images from the prototype bank ``(C, 2, P, P, 3, s, s)``, already scaled by 255.

    Written as a few fused full-size passes (gathers, addcmul, one GEMM for the smooth
    nuisance) because this runs on every load of the default dataset.
    """
    s = _SYN_SIZE
    positions = bank.shape[2]
    flat = bank.reshape(-1, 3, s, s)

    def rows(cls: torch.Tensor) -> torch.Tensor:  # flat bank row of (class, mirror, dy, dx)
        mirror = torch.randint(0, 2, (n,), generator=g)
        off = torch.randint(0, positions, (n, 2), generator=g)
        return ((cls * 2 + mirror) * positions + off[:, 0]) * positions + off[:, 1]

    # Exactly balanced classes in random order.
    y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    contrast = torch.empty(n, 1, 1, 1).uniform_(*_SYN_CONTRAST, generator=g)
    x = flat.index_select(0, rows(y)).mul_(contrast)  # shifted own-class prototype
    # A weaker prototype of a different class: makes the task non-trivial for linear
    # models while the own-class prototype still dominates.
    other = (y + torch.randint(1, num_classes, (n,), generator=g)) % num_classes
    weight = torch.empty(n, 1, 1, 1).uniform_(0, _SYN_DISTRACT, generator=g)
    x.addcmul_(flat.index_select(0, rows(other)), weight)
    # Grey level 0.5 plus brightness/colour offsets, and a smooth 4x4 nuisance pattern
    # upsampled bilinearly: addmm computes offset + low @ kron(U, U).T in one GEMM.
    offset = torch.empty(n, 1).uniform_(-_SYN_BRIGHTNESS, _SYN_BRIGHTNESS, generator=g)
    offset = (offset + torch.empty(n, 3).uniform_(-_SYN_COLOR, _SYN_COLOR, generator=g) + 0.5) * 255
    u = _upsample_matrix(4, s)
    kron = torch.kron(u, u).mul_(255 * _SYN_NUISANCE)  # (s*s, 16)
    low = torch.randn(n * 3, 16, generator=g)
    x.add_(torch.addmm(offset.reshape(n * 3, 1), low, kron.T).view(n, 3, s, s))
    x.add_(torch.randn(n, 3, s, s, generator=g), alpha=255 * _SYN_NOISE)
    # Quantise like a real image: round(255 * clip(v, 0, 1)) (+0.5 then truncation).
    return x.add_(0.5).clamp_(0, 255).to(torch.uint8), y


def make_synthetic(
    seed: int = 0, n_train: int = 4000, n_test: int = 1000, num_classes: int = 10
) -> tuple[Split, Split]:
    """The built-in synthetic dataset: ``(train, test)`` splits of uint8 3x32x32 images.

    Each class has a smooth random prototype (a 5x5 Gaussian grid upsampled bicubically,
    peak amplitude 0.35). A sample is its class prototype, mirrored with probability 1/2,
    shifted by up to 2 px and scaled by a random contrast, plus a weaker prototype of
    another class, a random brightness/colour offset, a smooth random nuisance pattern
    and pixel noise, clipped to [0, 1] and quantised. Class-mean images differ by far
    more than 8/255 in L-inf, so adversarial training at that budget has something robust
    to learn, while the nuisances keep any single pixel from giving the class away.
    See ``docs/data.md`` for the exact definition.

    Deterministic in ``seed``: prototypes, train and test use independent child seeds,
    so the test set does not change with ``n_train`` (and vice versa).
    """
    seed = check_int(seed, "synthetic seed")
    if seed < 0:
        raise AtprobeError(f"synthetic seed must be >= 0, got {seed}")
    n_train, n_test = check_int(n_train, "n_train"), check_int(n_test, "n_test")
    num_classes = check_int(num_classes, "num_classes")
    if n_train < 1 or n_test < 1:
        raise AtprobeError(f"synthetic split sizes must be >= 1, got n_train={n_train}, n_test={n_test}")
    if num_classes < 2:
        raise AtprobeError(f"synthetic num_classes must be >= 2, got {num_classes}")
    k_proto, k_train, k_test = (
        int(child.generate_state(1, np.uint64)[0]) for child in np.random.SeedSequence(seed).spawn(3)
    )
    s, m = _SYN_SIZE, _SYN_SHIFT
    g = torch.Generator().manual_seed(k_proto)
    low = torch.randn(num_classes, 3, _SYN_LOWRES, _SYN_LOWRES, generator=g)
    protos = F.interpolate(low, size=(s + 2 * m, s + 2 * m), mode="bicubic", align_corners=False)
    protos = protos - protos.mean(dim=(1, 2, 3), keepdim=True)
    protos = (255 * _SYN_AMPLITUDE) * protos / protos.abs().amax(dim=(1, 2, 3), keepdim=True)
    # Mirror images too: classes are left-right symmetric in distribution, like natural
    # images, so the standard flip augmentation preserves labels.
    protos = torch.stack([protos, protos.flip(-1)], dim=1)  # (C, 2, 3, s+2m, s+2m)
    # Every (class, mirror, dy, dx) crop of the canvas, laid out so one gather fetches a
    # batch of prototypes as contiguous 3x32x32 blocks: (C, 2, 2m+1, 2m+1, 3, s, s).
    bank = protos.unfold(3, s, 1).unfold(4, s, 1).permute(0, 1, 3, 4, 2, 5, 6).contiguous()
    x_tr, y_tr = _synthetic_images(bank, n_train, num_classes, torch.Generator().manual_seed(k_train))
    x_te, y_te = _synthetic_images(bank, n_test, num_classes, torch.Generator().manual_seed(k_test))
    return make_split(x_tr, y_tr), make_split(x_te, y_te)
