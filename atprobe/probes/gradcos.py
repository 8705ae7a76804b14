"""``gradcos``: cosine similarity of per-sample gradients between successive checkpoints
of a training run (Dong et al., ICLR 2022, Sec. 3.2, Fig. 4(b)).

For checkpoints ``theta_0, theta_1, ...`` (ordered by epoch) and a fixed sample set,
per successive pair (t, t+1) and sample i:

    cos_i = < g_i(theta_t), g_i(theta_{t+1}) > / (||g_i(theta_t)|| ||g_i(theta_{t+1})||)
    dist_i = || g_i(theta_t) - g_i(theta_{t+1}) ||

with ``g_i`` the gradient of the chosen objective (default ``pgd_at``) for sample i. Each
checkpoint is evaluated as itself: its own parameters *and* its own buffers (BatchNorm
running statistics), and its own adversarial examples, crafted against it from the same
per-sample random start. So a checkpoint compared with itself gives cosine exactly 1.
A low cosine between epochs means the per-sample gradients keep changing direction, the
paper's evidence that adversarial training converges poorly.

Only two models are alive at a time: ``probe`` takes any iterable (e.g. a generator that
loads checkpoints one by one).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass

import pandas as pd
from torch import nn

from atprobe.data import Split
from atprobe.directions import model_parameters
from atprobe.errors import AtprobeError, check_choice
from atprobe.pergrad import OBJECTIVES, per_sample_grad_distance
from atprobe.probes import _gradutil
from atprobe.probes._gradutil import AttackOptions, Gather, make_objective, stats

__all__ = ["COLUMNS", "GradCosConfig", "check_same_architecture", "order_by_epoch", "probe"]

COLUMNS = ["pair", "checkpoint_a", "checkpoint_b", "epoch_a", "epoch_b", "loss", "n",
           "cos_mean", "cos_std", "dist_mean", "dist_std"]

@dataclass(frozen=True)
class GradCosConfig(AttackOptions):
    """What ``gradcos`` measures.

    loss: the objective (``pergrad.OBJECTIVES``; default ``pgd_at``, the paper's).
    threat, beta: the attack's threat model and TRADES' beta.
    chunk_size: samples per per-sample-gradient chunk (two chunks alive at a time).
    seed: keys the per-sample random starts (the same start at every checkpoint).
    """

    loss: str = "pgd_at"

    def __post_init__(self) -> None:
        check_choice(self.loss, OBJECTIVES, "loss")
        super().__post_init__()


def order_by_epoch(checkpoints: Sequence) -> list:
    """Checkpoints (anything with an ``epoch`` attribute) sorted by epoch, stably; when
    some checkpoint does not record its epoch (foreign weights) the order is kept."""
    items = list(checkpoints)
    if any(getattr(c, "epoch", None) is None for c in items):
        return items
    return sorted(items, key=lambda c: int(c.epoch))


def check_same_architecture(a: nn.Module, b: nn.Module, name_a: str = "a", name_b: str = "b") -> None:
    """One-line error unless ``a`` and ``b`` have the same parameters and buffers (names,
    shapes, dtypes, devices): the condition for evaluating ``b`` as a point of ``a``."""

    def layout(m: nn.Module, what: str):
        items = m.named_parameters() if what == "parameters" else m.named_buffers()
        return [(k, tuple(v.shape), v.dtype, v.device) for k, v in items]

    for what in ("parameters", "buffers"):
        la, lb = layout(a, what), layout(b, what)
        if la != lb:
            diff = next(((x, y) for x, y in zip(la, lb) if x != y), None)
            detail = (f"{diff[0][0]} {diff[0][1]} vs {diff[1][0]} {diff[1][1]}" if diff is not None
                      else f"{len(la)} vs {len(lb)} {what}")
            raise AtprobeError(f"{name_a} and {name_b} have different architectures ({what}: {detail})")


def probe(
    models: Iterable[nn.Module],
    data: Split,
    config: GradCosConfig = GradCosConfig(),
    *,
    names: Sequence[str] | None = None,
    epochs: Sequence[int | None] | None = None,
    progress=None,
    gather: Gather = _gradutil.identity_gather,
    pairs: Container[int] | None = None,
) -> pd.DataFrame:
    """One row per pair of successive models (columns :data:`COLUMNS`), in the given order.

    ``models``: two or more models of one architecture, on one device (an iterable is
    consumed lazily; only the current pair is referenced). ``names``/``epochs`` label the
    rows (default: positions and no epoch). ``data.y`` are the labels the loss uses and
    ``data.index`` keys the random starts. ``progress``: ``update(n)`` per batch. ``pairs``:
    only these pairs (pair ``i`` = models ``i`` and ``i + 1``; a ``--shard`` part's), each row
    the one of all pairs.
    ``gather``: under ``torchrun``, ``data`` is this rank's share (whole chunks) and
    ``gather`` joins every rank's per-sample values before the statistics
    (``SampleShare.gather_values``: the single-process row bit for bit).
    """
    obj = make_objective(config.loss, config)
    rows = []
    prev: nn.Module | None = None
    batches = None
    count = 0
    for i, model in enumerate(models):
        count += 1
        if i == 0:
            prev = model
            batches = _gradutil.share_batches(model, data, config.chunk_size, gather)
            continue
        if pairs is not None and i - 1 not in pairs:
            prev = model
            continue
        name_a = names[i - 1] if names is not None else str(i - 1)
        name_b = names[i] if names is not None else str(i)
        check_same_architecture(prev, model, name_a, name_b)
        buffers_a, buffers_b = dict(prev.named_buffers()), dict(model.named_buffers())
        params_a, params_b = model_parameters(prev), model_parameters(model)
        dist, cos = [], []
        for x, y, ids in batches:
            # Both points through ``prev``'s module structure: b's parameters and buffers
            # make it exactly model b (check_same_architecture guarantees the layout).
            di, ci = per_sample_grad_distance(prev, obj, x, y, params_a, params_b, chunk_size=config.chunk_size,
                                              sample_ids=ids, buffers_a=buffers_a, buffers_b=buffers_b)
            dist.append(di.detach())
            cos.append(ci.detach())
            if progress is not None:
                progress.update(len(y))
        every_dist, every_cos = _gradutil.gathered(dist, gather), _gradutil.gathered(cos, gather)
        ds, cs = stats(every_dist), stats(every_cos)
        ea = epochs[i - 1] if epochs is not None else None
        eb = epochs[i] if epochs is not None else None
        rows.append({
            "pair": i - 1, "checkpoint_a": name_a, "checkpoint_b": name_b,
            "epoch_a": ea, "epoch_b": eb, "loss": config.loss, "n": len(every_dist),
            "cos_mean": cs["mean"], "cos_std": cs["std"], "dist_mean": ds["mean"], "dist_std": ds["std"],
        })
        del params_a, params_b, buffers_a, buffers_b
        prev = model
    if count < 2:
        raise AtprobeError(f"gradcos needs at least two checkpoints, got {count}")
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("epoch_a", "epoch_b"):
        df[col] = df[col].astype("Int64")
    return df
