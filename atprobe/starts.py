"""Random draws keyed per sample: the one start rule of every attack.

Every random start (and every other per-sample random vector a probe needs) is a pure
function of ``(seed, sample index, stream...)``, never of a generator's position. So the
same sample gets the same start whatever batch it lands in, whatever ``--batch-size`` or
chunking, whichever process of a ``torchrun`` job holds it, and at every parameter point a
probe visits.

The draws come from a counter-based hash, not from a stateful generator: element ``j`` of
sample ``i``'s vector is ``pcg(pcg(j) ^ key_i)`` with ``key_i`` a hash of the seed, the
sample index and the stream, and PCG's 32-bit output permutation ("RXS M XS", O'Neill 2014)
as the mixer. It is computed with int64 tensor arithmetic whose products never exceed
2^62, so it is exact and identical on the CPU and on CUDA, vectorized over the whole batch
(no per-sample generator loop, no host syncs), and needs no state to save or restore.

Uniforms are ``(u32 >> 8 + 1/2) 2^-24`` in (0, 1); normals come from Box-Muller on two such
uniforms. 24 bits of resolution is far finer than any start needs (eps/2^23 at most).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from atprobe.errors import check_seed

__all__ = ["Starts", "keyed_normal", "keyed_uniform", "sample_keys", "splitmix64"]

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


def splitmix64(v: int) -> int:
    """The splitmix64 finalizer: a bijective scramble of a 64-bit integer (Python ints)."""
    v = (v + 0x9E3779B97F4A7C15) & _M64
    v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & _M64
    return v ^ (v >> 31)


def _pcg(v: Tensor) -> Tensor:
    """PCG's RXS-M-XS permutation of uint32 values held in an int64 tensor (no overflow:
    every product is below 2^62)."""
    state = (v * 747796405 + 2891336453) & _M32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _M32
    return (word >> 22) ^ word


def sample_keys(seed: int, ids: Tensor, *stream: int) -> Tensor:
    """One uint32 key (int64 tensor, shape of ``ids``) per sample: a hash of ``seed``,
    the sample index and the ``stream`` integers (e.g. a restart, an epoch, a purpose)."""
    h = splitmix64(check_seed(seed))
    key = _pcg((ids.to(torch.int64) + (h & _M32)) & _M32)
    key = _pcg(key ^ (h >> 32))
    for s in stream:
        key = _pcg(key ^ (splitmix64(int(s) & _M64) & _M32))
    return key


def _bits(keys: Tensor, n: int) -> Tensor:
    """(B, n) uint32 words: element j of row i is ``pcg(pcg(j) ^ key_i)``."""
    counters = _pcg(torch.arange(n, device=keys.device, dtype=torch.int64))
    return _pcg(counters[None, :] ^ keys.reshape(-1, 1))


def keyed_uniform(keys: Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """U(0, 1) draws of shape ``(len(keys), *shape)``, row i a function of ``keys[i]`` only."""
    n = math.prod(shape)
    u = ((_bits(keys, n) >> 8).to(torch.float64) + 0.5) * 2.0**-24
    return u.to(dtype).reshape(keys.shape[0], *shape)


def keyed_normal(keys: Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """N(0, 1) draws of shape ``(len(keys), *shape)`` by Box-Muller, row i a function of
    ``keys[i]`` only."""
    n = math.prod(shape)
    u = ((_bits(keys, 2 * n) >> 8).to(torch.float64) + 0.5) * 2.0**-24
    z = torch.sqrt(-2.0 * torch.log(u[:, 0::2])) * torch.cos(2.0 * math.pi * u[:, 1::2])
    return z.to(dtype).reshape(keys.shape[0], *shape)


@dataclass(frozen=True)
class Starts:
    """Where a batch's random starts come from: ``seed``, each sample's index ``ids`` (the
    dataset rows, ``Split.index``) and an optional ``stream`` (training passes its epoch,
    so every epoch draws fresh starts). Restart ``r`` of sample ``i`` draws with the key
    ``sample_keys(seed, ids[i], *stream, r)``."""

    seed: int
    ids: Tensor
    stream: tuple[int, ...] = ()

    def keys(self, restart: int = 0) -> Tensor:
        return sample_keys(self.seed, self.ids, *self.stream, restart)

    def rows(self, rows: Tensor | slice) -> Starts:
        """The starts of some rows of the batch (the same keys, so the same draws)."""
        return Starts(self.seed, self.ids[rows], self.stream)
