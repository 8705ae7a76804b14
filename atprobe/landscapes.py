"""The work of ``atprobe flatness --plane`` and ``--between`` as library calls (the
landscapes of ``atprobe.probes.flatness`` over the checkpoints of a study), beside
``atprobe.studies.flatness`` for the 1-d curve.

Both take ``points``: given the number of grid points, the indices to evaluate (default
all of them). Under ``torchrun`` the study's share splits them across the ranks, round robin
(``SampleShare.points``: each point's samples stay whole on one rank, so every point costs
what it costs in one process, BatchNorm recompute included), and each checkpoint's rows are
gathered back in grid order (``SampleShare.gather_rows``): the single-process table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from atprobe.errors import AtprobeError
from atprobe.probes import flatness as flatness_probe
from atprobe.studies import _fields
from atprobe.study import Progress, SampleSpec, Study, Tables, no_progress, per_checkpoint, prefix

__all__ = ["Points", "all_points", "between", "plane"]

#: ``total grid points -> the indices to evaluate here``.
Points = Callable[[int], Sequence[int]]


def all_points(total: int) -> Sequence[int]:
    """Every point: the single-process share."""
    return range(total)


def _mine(study: Study, wanted: Sequence[int]) -> list[int]:
    """This rank's points of ``wanted`` (all of them in one process)."""
    return [wanted[i] for i in study.share.points(len(wanted))]


def plane(study: Study, spec: SampleSpec, config: flatness_probe.PlaneConfig, device: torch.device, *,
          points: Points = all_points, progress: Progress = no_progress) -> Tables:
    """``atprobe flatness --plane``: one row per (checkpoint, pair, point) (``checkpoint, epoch,
    split, labels`` then :data:`~atprobe.probes.flatness.PLANE_COLUMNS`)."""
    wanted = list(points(len(flatness_probe.plane_grid(config))))
    chosen = _mine(study, wanted)
    position = {p: i for i, p in enumerate(wanted)}
    blocks = iter(range(len(study.checkpoints)))  # per_checkpoint visits them in order (a file may come twice)

    def probe(model, samples, ckpt, bar):
        rows = study.share.gather_rows(flatness_probe.plane(model, samples, config, points=chosen, progress=bar),
                                       "point")
        block = next(blocks)
        if study.share.part:  # the order of the rows in one process: (checkpoint, point)
            base = block * len(wanted)
            rows.insert(0, "unit", [base + position[int(p)] for p in rows["point"]])
        return {"": rows}

    tables = per_checkpoint(study, spec, probe, device, name="flatness --plane",
                            units=lambda m, s: len(chosen) * len(s), progress=progress)
    meta = study.meta(config, seed=config.seed, landscape="plane", points=len(wanted),
                      extra=study.share.point_meta(len(study.checkpoints) * len(wanted)),
                      **_fields(spec, len(study.base(spec)), config.batch_size, device))
    return Tables(tables[""], meta, main_name="part plane" if study.share.part else "plane")


def between(study: Study, spec: SampleSpec, config: flatness_probe.PathConfig, device: torch.device, *,
            points: Points = all_points, progress: Progress = no_progress) -> Tables:
    """``atprobe flatness --between A B``: one row per point of the path (``checkpoint`` =
    ``A -> B``, ``epoch`` of A and B, ``split, labels``, then
    :data:`~atprobe.probes.flatness.PATH_COLUMNS`). The samples carry A's labels, which must be
    B's too (else ``--labels true``)."""
    if len(study.checkpoints) != 2:
        raise AtprobeError(f"--between takes two checkpoints A B, got {len(study.checkpoints)}")
    a, b = study.checkpoints
    for what, pair in (("architectures", (a.arch, b.arch)), ("numbers of classes", (a.num_classes, b.num_classes))):
        if pair[0] != pair[1]:
            raise AtprobeError(f"--between: the checkpoints have different {what} ({pair[0]} and {pair[1]})")
    base = study.base(spec)
    samples = study.samples(a, spec, base)
    if not torch.equal(study.samples(b, spec, base).y, samples.y):
        raise AtprobeError(f"--between: {b.path} was trained on other labels than {a.path}: use --labels true")
    model_a, model_b = study.model(a, device), study.model(b, device)
    flatness_probe.check_same_architecture(model_a, model_b)
    wanted = list(points(len(flatness_probe.path_grid(config))))
    chosen = _mine(study, wanted)
    train = study.dataset.train  # the recompute images (drawn inside, from config.seed)
    with progress(len(chosen) * len(samples), f"flatness --between {a.name} {b.name}") as bar:
        table = flatness_probe.path(model_a, model_b, samples, config, train=train, points=chosen, progress=bar)
    table = study.share.gather_rows(table, "point")
    if study.share.part:  # the order of the rows in one process
        position = {p: i for i, p in enumerate(wanted)}
        table.insert(0, "unit", [position[int(p)] for p in table["point"]])
    table = prefix(table, {"checkpoint": f"{a.path} -> {b.path}", "checkpoint_a": str(a.path),
                           "checkpoint_b": str(b.path), "epoch_a": a.epoch, "epoch_b": b.epoch,
                           "split": spec.split, "labels": spec.labels})
    for column in ("epoch_a", "epoch_b"):
        table[column] = table[column].astype("Int64")
    meta = study.meta(config, seed=config.seed, landscape="between", points=len(wanted),
                      bn_stats=str(config.bn_stats), extra=study.share.point_meta(len(wanted)),
                      **_fields(spec, len(base), config.batch_size, device))
    return Tables(table, meta, main_name="part path" if study.share.part else "path")
