"""``stability``: how much per-sample gradients change along random filter-normalized
directions in weight space (Dong et al., ICLR 2022, Sec. 3.2, Fig. 4(a) and Fig. A.8).

For an objective J (``clean``, ``pgd_at``, ``trades``, ``R``; see ``atprobe.pergrad``),
directions ``d_1..d_K`` (``atprobe.directions``: Gaussian, each filter rescaled to its
weight filter's norm, 1-d parameters zeroed by default) and a grid of ``lam``:

    dist_i(k, lam) = || grad J_i(theta + lam d_k) - grad J_i(theta) ||_2
    cos_i(k, lam)  = < grad J_i(theta + lam d_k), grad J_i(theta) > / (||.|| ||.||)

and one row per (objective, direction, lam) with the mean and population std of both over
the samples. Adversarial examples are re-crafted at every point from the same per-sample
random start, so ``lam = 0`` gives distance exactly 0 and cosine exactly 1. A larger
distance for the same ``lam`` means a less smooth (less stable) gradient: the paper finds
the adversarial objectives' gradients far less stable than the clean one's, already at
initialization.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from atprobe.data import Split
from atprobe.directions import IGNORES, NORMS, directions, model_parameters, parse_lambdas, perturbed_parameters
from atprobe.errors import AtprobeError, check_choice
from atprobe.models import build_model
from atprobe.pergrad import OBJECTIVES, per_sample_grad_distances
from atprobe.probes._gradutil import (
    AttackOptions,
    Gather,
    gathered,
    identity_gather,
    make_objective,
    share_batches,
    stats,
)

# parse_lambdas lives in atprobe.directions (the flatness probe uses it too); re-exported here for the
# callers of stability.parse_lambdas.
__all__ = ["COLUMNS", "DEFAULT_LAMBDAS", "StabilityConfig", "init_model", "parse_lambdas", "probe"]

COLUMNS = ["loss", "direction", "lam", "n", "dist_mean", "dist_std", "cos_mean", "cos_std"]


DEFAULT_LAMBDAS = parse_lambdas("-0.05:0.05:21")


@dataclass(frozen=True)
class StabilityConfig(AttackOptions):
    """What ``stability`` measures.

    losses: objectives from ``pergrad.OBJECTIVES`` (clean, pgd_at, trades, R).
    lambdas: step sizes along each direction; must contain 0 (see :func:`parse_lambdas`).
    directions: number K of random directions, drawn one after the other from a CPU
        generator seeded with ``seed`` (the same directions on every machine).
    ignore, direction_norm: ``atprobe.directions`` options (``biasbn`` zeroes 1-d
        parameters; ``filter`` normalization as Li et al.).
    threat, beta: the attacks' threat model and TRADES' beta (defaults: the training
        attacks, L-inf 8/255, step eps/4, 10 steps, beta 6).
    chunk_size: samples per per-sample-gradient chunk (two chunks are alive at a time).
    seed: directions and the attacks' per-sample random starts.
    """

    losses: tuple[str, ...] = ("pgd_at", "trades", "clean")
    lambdas: tuple[float, ...] = field(default=DEFAULT_LAMBDAS)
    directions: int = 1
    ignore: str = "biasbn"
    direction_norm: str = "filter"

    def __post_init__(self) -> None:
        object.__setattr__(self, "losses", tuple(self.losses))
        object.__setattr__(self, "lambdas", tuple(float(v) for v in self.lambdas))
        if not self.losses:
            raise AtprobeError("no loss given: name at least one of " + ", ".join(OBJECTIVES))
        for name in self.losses:
            check_choice(name, OBJECTIVES, "loss")
        if len(set(self.losses)) != len(self.losses):
            raise AtprobeError(f"a loss is named twice: {','.join(self.losses)}")
        if not self.lambdas or any(not math.isfinite(v) for v in self.lambdas):
            raise AtprobeError("lambdas must be finite numbers")
        if len(set(self.lambdas)) != len(self.lambdas):
            raise AtprobeError("lambdas must be distinct")
        if 0.0 not in self.lambdas:
            raise AtprobeError("the lam grid does not contain 0, the reference point")
        if isinstance(self.directions, bool) or not isinstance(self.directions, int) or self.directions < 1:
            raise AtprobeError(f"number of directions must be an integer >= 1, got {self.directions!r}")
        check_choice(self.ignore, IGNORES, "direction ignore option")
        check_choice(self.direction_norm, NORMS, "direction norm")
        super().__post_init__()


def init_model(arch: str, num_classes: int = 10, seed: int = 0, **kwargs) -> nn.Module:
    """A freshly initialized ``atprobe.models`` model: ``build_model`` under
    ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng`` (the global RNG is left as
    it was). On the CPU, so the same seed gives the same weights on every machine; move
    it afterwards. BatchNorm buffers are fresh (mean 0, var 1): eval mode would make every
    BatchNorm the identity, so ``atprobe stability --init`` recomputes them on training images
    first (``atprobe.bnstats``, ``--bn-stats``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build_model(arch, num_classes, **kwargs)


class _Grid(Sequence):
    """The points ``theta + lam d`` of a lam grid, built when indexed (not all held)."""

    def __init__(self, model: nn.Module, direction, lambdas: tuple[float, ...]) -> None:
        self.model, self.direction, self.lambdas = model, direction, lambdas

    def __len__(self) -> int:
        return len(self.lambdas)

    def __getitem__(self, k):
        return perturbed_parameters(self.model, self.direction, self.lambdas[k])


def probe(model: nn.Module, data: Split, config: StabilityConfig = StabilityConfig(), *, progress=None,
          gather: Gather = identity_gather, units: Container[int] | None = None) -> pd.DataFrame:
    """One row per (loss, direction, lam), columns :data:`COLUMNS`, in the order
    ``config.losses`` x directions x ``config.lambdas``.

    ``data.y`` are the labels the losses use; samples are keyed by ``data.index`` for
    their random starts. The model's weights and buffers are not modified. ``progress``:
    anything with ``update(n)`` (a tqdm bar), advanced by the samples of each point.
    ``gather``: under ``torchrun``, ``data`` is this rank's share (whole chunks) and
    ``gather`` joins every rank's per-sample distances before the statistics, which are
    then the single-process ones bit for bit (``SampleShare.gather_values``).
    ``units``: only these (loss, direction) units, unit ``i * directions + k`` for loss ``i``
    and direction ``k`` (a ``--shard`` part's; default all), each row the one of all units.
    """
    dirs = directions(model, config.directions, config.seed, config.ignore, norm=config.direction_norm,
                      device="cpu")
    theta = model_parameters(model)
    batches = share_batches(model, data, config.chunk_size, gather)
    rows = []
    for i, loss in enumerate(config.losses):
        obj = make_objective(loss, config)
        for k, d in enumerate(dirs):
            if units is not None and i * len(dirs) + k not in units:
                continue
            grid = _Grid(model, d, config.lambdas)
            dist: list[list[torch.Tensor]] = [[] for _ in config.lambdas]
            cos: list[list[torch.Tensor]] = [[] for _ in config.lambdas]
            for x, y, ids in batches:
                # theta's gradients once per chunk, compared with every lam's
                pairs = per_sample_grad_distances(model, obj, x, y, theta, grid, chunk_size=config.chunk_size,
                                                  sample_ids=ids)
                for j, (di, ci) in enumerate(pairs):
                    dist[j].append(di.detach())
                    cos[j].append(ci.detach())
                if progress is not None:
                    progress.update(len(y) * len(config.lambdas))
            for j, lam in enumerate(config.lambdas):
                every_dist, every_cos = gathered(dist[j], gather), gathered(cos[j], gather)
                ds, cs = stats(every_dist), stats(every_cos)
                rows.append({
                    "loss": loss, "direction": k, "lam": lam, "n": len(every_dist),
                    "dist_mean": ds["mean"], "dist_std": ds["std"],
                    "cos_mean": cs["mean"], "cos_std": cs["std"],
                })
    return pd.DataFrame(rows, columns=COLUMNS)
