"""The work of each command, as a library call: ``atprobe COMMAND`` parses its options,
builds these typed arguments, calls the function named after it and writes the
:class:`~atprobe.study.Tables` it returns. The demo and notebooks call the same functions.

Each function takes a :class:`~atprobe.study.Study` (the checkpoints and their data), a
:class:`~atprobe.study.SampleSpec` where it probes samples, the probe's frozen config, the
device and a progress factory, runs the probe over the checkpoints through the study layer
and returns its tables with their meta record (docs/probes/ for each table's columns).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from atprobe import plot
from atprobe import runs as runs_layout
from atprobe.attacks import AttackSpec
from atprobe.autoattack import AutoAttackConfig
from atprobe.bnstats import BNStats
from atprobe.data import Split
from atprobe.distributed import ONE_PROCESS, SampleShare
from atprobe.errors import AtprobeError
from atprobe.evaluate import SAMPLE_COLUMNS, EvalConfig, attack_fields, evaluate_samples, summarize_samples
from atprobe.io import write_tables
from atprobe.models import canonical_arch
from atprobe.outputs import table_files
from atprobe.probes import complexity as complexity_probe
from atprobe.probes import curvature as curvature_probe
from atprobe.probes import flatness as flatness_probe
from atprobe.probes import gradcos as gradcos_probe
from atprobe.probes import gradnorm as gradnorm_probe
from atprobe.probes import hardness as hardness_probe
from atprobe.probes import hessian as hessian_probe
from atprobe.probes import stability as stability_probe
from atprobe.probes._gradutil import auto_chunk_size
from atprobe.runtime import prepare_model
from atprobe.study import (
    PREFIX,
    DataSource,
    ModelSource,
    Progress,
    SampleSpec,
    Study,
    Tables,
    model_names,
    no_progress,
    per_checkpoint,
    prefix,
)

__all__ = [
    "complexity",
    "curvature",
    "evaluation",
    "flatness",
    "gradcos",
    "gradnorm",
    "hardness",
    "hessian",
    "stability",
    "table",
    "write_hardness",
]


def _chunk(model: torch.nn.Module, chunk_size: int | None, batch_size: int, copies: int) -> int:
    """An explicit chunk size, or the batch size capped to fit the device's budget."""
    return chunk_size if chunk_size is not None else auto_chunk_size(model, batch_size, copies)


class _BNStats:
    """A command's ``--bn-stats``: each model prepared through :meth:`Study.bn_model` (where
    ``auto`` is resolved, once per model), its label kept for the ``bn_stats`` column and
    the meta record (``bn_stats``: as asked; ``bn_stats_resolved``: one label per model)."""

    def __init__(self, study: Study, spec: BNStats | str, *, seed: int, batch_size: int,
                 batch: bool = True) -> None:
        self.study, self.spec, self.seed, self.batch_size = study, BNStats.parse(spec), seed, batch_size
        if self.spec.mode == "batch" and not batch:
            raise AtprobeError("--bn-stats batch is not defined for this probe: its per-sample quantities come "
                               "from one batched backward, which batch statistics would couple (use running or "
                               "recompute)")
        self.labels: list[str] = []

    def __call__(self, model: torch.nn.Module, chunk_size: int | None = None) -> tuple[torch.nn.Module, str]:
        model, label = self.study.bn_model(model, self.spec, seed=self.seed, batch_size=self.batch_size,
                                           chunk_size=chunk_size)
        self.labels.append(label)
        return model, label

    def meta(self) -> dict[str, Any]:
        return {"bn_stats": str(self.spec), "bn_stats_resolved": list(self.labels)}


def _tag(tables: dict[str, pd.DataFrame], label: str) -> dict[str, pd.DataFrame]:
    """Every table with the resolved BatchNorm statistics as its first column, ``bn_stats``
    (after the study's prefix columns once :func:`per_checkpoint` adds them)."""
    for df in tables.values():
        df.insert(0, "bn_stats", label)
    return tables


def point_units(study: Study, samples: Split, batch_size: int, units: int) -> tuple[Split, list[int] | None]:
    """``(samples, units)`` this process computes of a probe that reduces over samples:
    under ``torchrun``, this rank's share of the samples (whole batches) and every unit; a
    ``--shard`` part, every sample and its units (round robin of ``units``: directions,
    checkpoint pairs...), so each of its rows is the single-process row; in one process,
    everything (``None``: every unit)."""
    if study.share.part:
        return samples, list(study.share.points(units))
    return study.shared(samples, batch_size), None


def _no_parts(study: Study, command: str) -> None:
    """A one-line error for a ``--shard`` part of a probe that splits across ``torchrun`` ranks
    but has no part format (it reduces over samples inside: a part of it is not a table)."""
    if study.share.part:
        raise AtprobeError(f"{command} does not take --shard parts yet: run it under torchrun across GPUs, "
                           "or in one process (docs/scaling.md)")


def _fields(spec: SampleSpec, n: int, batch_size: int, device: torch.device) -> dict[str, Any]:
    """The sample choice and run fields of a table's meta record."""
    return {"split": spec.split, "n": n, "labels": spec.labels, "batch_size": batch_size, "device": str(device)}


# ---------------------------------------------------------------------------- eval


def evaluation(study: Study, spec: SampleSpec, config: EvalConfig, device: torch.device, *, threat=None,
               seed: int = 0, per_sample: bool = False, progress: Progress = no_progress) -> Tables:
    """``atprobe eval``: one row per (checkpoint, attack); columns checkpoint, split, then
    ``atprobe.evaluate.EVAL_COLUMNS``; with ``per_sample`` also ``.samples``, one row per
    (checkpoint, attack, sample): checkpoint, split, then ``atprobe.evaluate.SAMPLE_COLUMNS``.
    A ``--shard`` part (``study.share.part``) is the per-sample rows of its share alone, for
    ``atprobe merge`` (:func:`eval_from_samples`)."""
    fields = [attack_fields(a) for a in config.attacks]
    extra = {"per_sample": per_sample, "attack_fields": fields} if study.share.part else None
    tables = _evaluated(study, spec, config, device, ("checkpoint", "split"), "eval", progress)
    meta = _eval_meta(study, spec, config, device, threat, seed, extra)
    if study.share.part:
        return Tables(tables[".samples"], meta, main_name="part eval")
    return eval_from_samples(tables[".samples"], fields, meta, per_sample)


def eval_from_samples(samples: pd.DataFrame, fields: Sequence[dict], meta: dict[str, Any],
                      per_sample: bool) -> Tables:
    """``atprobe eval``'s tables from its per-sample rows (one block of ``meta["config"]["n"]``
    rows per checkpoint and attack, in order): the summary of each checkpoint
    (``atprobe.evaluate.summarize_samples``), the rows as ``.samples`` with ``per_sample``.
    One process, ``torchrun`` and ``atprobe merge`` all end here."""
    size = int(meta["config"]["n"]) * len(fields)
    summaries = []
    for start in range(0, len(samples), size):
        rows = samples.iloc[start:start + size]
        summary = summarize_samples(rows, fields)
        summaries.append(prefix(summary, {"checkpoint": rows["checkpoint"].iloc[0], "split": rows["split"].iloc[0]}))
    main = pd.concat(summaries, ignore_index=True)
    if not per_sample:
        return Tables(main, meta)
    return Tables(main, meta, {".samples": samples}, names={".samples": "per-sample"})


def _evaluated(study: Study, spec: SampleSpec, config: EvalConfig, device: torch.device, columns: Sequence[str],
               name: str, progress: Progress) -> dict[str, pd.DataFrame]:
    """``evaluate_samples`` on every checkpoint of the study (on this process's share of the
    samples, gathered back), rows prefixed with ``columns``: the summary under ``""``, the
    per-sample rows under ``".samples"`` (a part: those alone)."""
    fields = [attack_fields(a) for a in config.attacks]

    def probe(model, samples, ckpt, bar):
        mine = study.shared(samples, config.batch_size)
        rows = (evaluate_samples(model, mine, config, progress=bar)[1] if len(mine)
                else pd.DataFrame(columns=SAMPLE_COLUMNS))  # a share with no batch: an empty part
        rows = study.share.gather(rows, len(mine))
        if study.share.part:
            return {".samples": rows}
        return {"": summarize_samples(rows, fields), ".samples": rows}

    return per_checkpoint(study, spec, probe, device, columns=columns, name=name,
                          units=lambda m, s: len(study.shared(s, config.batch_size)) * len(config.attacks),
                          progress=progress)


def _eval_meta(study: Study, spec: SampleSpec, config: EvalConfig, device: torch.device, threat, seed: int,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    packages = {a.config.package_version for a in config.attacks if isinstance(a.config, AutoAttackConfig)}
    autoattack = {"autoattack": {"package": "pyautoattack", "version": packages.pop()}} if packages else {}
    n = len(study.base(spec))
    extra = {**study.share.meta(n, config.batch_size), **(extra or {})}
    return study.meta({"attacks": [a.name for a in config.attacks], "amp": config.amp, **autoattack}, seed=seed,
                      threat=threat, extra=extra, **_fields(spec, n, config.batch_size, device))


def table(runs: Sequence[str], spec: SampleSpec, config: EvalConfig, device: torch.device, *,
          data: DataSource | None = None, threat=None, seed: int = 0, root: str | os.PathLike | None = None,
          share: SampleShare = ONE_PROCESS, progress: Progress = no_progress) -> Tables:
    """``atprobe table``: Table 1 of the paper, one row per (run, attack) with the accuracy of
    each run's ``best.pt`` and ``final.pt`` and their difference (``atprobe.runs.best_final``).
    The run directories are checked before anything is read; the checkpoints are evaluated
    as ``atprobe eval`` evaluates them (same samples, same keyed starts). ``root``: where
    relative run directories are read from, their names kept in the table (the demo).
    ``share``: this rank's share of a ``torchrun`` job: each checkpoint's samples are split
    across the ranks and gathered as ``eval`` gathers them."""
    if share.part:
        raise AtprobeError("table does not take --shard parts: run it under torchrun, or in one process")
    runs_layout.check_runs([runs_layout.at_root(r, root) for r in runs])
    runs = [str(r) for r in runs]
    study = Study(runs_layout.table_checkpoints(runs), ModelSource(), data or DataSource(), root=root, share=share)
    if _check_same_data(study.checkpoints, study.dataset_name, spec.split):
        raise AtprobeError(f"the runs carved different validation splits: their {spec.split} samples differ "
                           "(use --split test)")
    evaluated = _evaluated(study, spec, config, device, ("checkpoint",), "table", progress)[""]
    main = runs_layout.best_final(evaluated, runs, study.checkpoints, root=root)
    selection = {run: runs_layout.best_selection(runs_layout.at_root(run, root)) for run in runs}
    meta = _eval_meta(study, spec, config, device, threat, seed, {"runs": list(runs), "best_selected_by": selection})
    shown = main[["run", "attack", "best", "final", "diff", "best_epoch", "final_epoch"]]
    return Tables(main, meta, main_name="table", shown=shown)


# ---------------------------------------------------------------------------- gradient probes


def gradnorm(study: Study, spec: SampleSpec, config: gradnorm_probe.GradNormConfig, device: torch.device, *,
             chunk_size: int | None = None, batch_size: int = 256, per_sample: bool = False,
             bn_stats: BNStats | str = "auto", progress: Progress = no_progress) -> Tables:
    """``atprobe gradnorm``: the summary (main) and, with ``per_sample``, one row per sample
    (``.samples``). ``bn_stats``: the BatchNorm statistics (``atprobe.bnstats``). A ``--shard``
    part is its share's per-sample rows alone (whole chunks of the explicit ``chunk_size``),
    for ``atprobe merge`` (:func:`gradnorm_from_samples`)."""
    if study.share.part and chunk_size is None:
        raise AtprobeError("gradnorm --shard needs an explicit --chunk-size: every part must cut the samples into "
                           "the same chunks")
    if config.noisy_vs_clean and (spec.labels == "true" or spec.split == "test"):
        raise AtprobeError("--noisy-vs-clean compares trained with true labels: use --labels trained (or a label "
                           "file) on the train or val split")
    chunks: list[int] = []
    bn = _BNStats(study, bn_stats, seed=config.seed, batch_size=batch_size)

    def probe(model, samples, ckpt, bar):
        cfg = dataclasses.replace(config, chunk_size=_chunk(model, chunk_size, batch_size, copies=1))
        chunks.append(cfg.chunk_size)
        model, label = bn(model, cfg.chunk_size)
        mine = study.shared(samples, cfg.chunk_size)  # whole chunks: each row is the one-process row
        table = (gradnorm_probe.per_sample(model, mine, cfg, progress=bar) if len(mine)
                 else pd.DataFrame(columns=gradnorm_probe.SAMPLE_COLUMNS))
        return _tag({".samples": study.share.gather(table, len(mine))}, label)

    tables = per_checkpoint(study, spec, probe, device, name="gradnorm",
                            units=lambda m, s: 4 * len(study.shared(s, _chunk(m, chunk_size, batch_size, copies=1))),
                            progress=progress)
    n = len(study.base(spec))
    part = {**study.share.meta(n, chunk_size), "per_sample": per_sample} if study.share.part else None
    meta = study.meta(config, seed=config.seed, chunk_size=chunks, **bn.meta(), extra=part,
                      **_fields(spec, n, batch_size, device))
    if study.share.part:
        return Tables(tables[".samples"], meta, main_name="part gradnorm")
    return gradnorm_from_samples(tables[".samples"], meta, per_sample)


def _blocks(samples: pd.DataFrame, n: int) -> list[pd.DataFrame]:
    """The per-checkpoint blocks of ``n`` rows of a per-sample table, in order."""
    return [samples.iloc[start:start + n].reset_index(drop=True) for start in range(0, len(samples), max(n, 1))]


def _lead(rows: pd.DataFrame, columns: Sequence[str]) -> dict[str, Any]:
    """A block's leading columns (one value each), to prefix its summary rows with."""
    values = {c: rows[c].iloc[0] for c in columns}
    if pd.isna(values.get("epoch", 0)):
        values["epoch"] = None
    return values


#: The leading columns of gradnorm's and curvature's per-sample rows, one value per checkpoint.
GRADNORM_LEAD = ["checkpoint", "epoch", "split", "labels", "bn_stats"]
CURVATURE_LEAD = [*GRADNORM_LEAD, "at"]


def gradnorm_from_samples(samples: pd.DataFrame, meta: dict[str, Any], per_sample: bool) -> Tables:
    """``atprobe gradnorm``'s tables from its per-sample rows (one block of ``meta["config"]["n"]``
    rows per checkpoint, in order): each block's ``gradnorm.summarize`` with the block's leading
    columns. One process, ``torchrun`` and ``atprobe merge`` all end here."""
    config = gradnorm_probe.GradNormConfig(noisy_vs_clean=bool(meta["config"]["noisy_vs_clean"]))
    summary = pd.concat([prefix(gradnorm_probe.summarize(rows, config), _lead(rows, GRADNORM_LEAD))
                         for rows in _blocks(samples, int(meta["config"]["n"]))], ignore_index=True)
    shown = summary[(summary["group"] == "all") & (summary["statistic"].isin(["mean", "ratio_of_means"]))]
    extra = {".samples": samples} if per_sample else {}
    return Tables(summary, meta, extra, names={".samples": "per-sample"}, main_name="summary", shown=shown)


def stability(study: Study, spec: SampleSpec, config: stability_probe.StabilityConfig, device: torch.device, *,
              init_arch: str | None = None, chunk_size: int | None = None, batch_size: int = 256,
              bn_stats: BNStats | str = "auto", progress: Progress = no_progress) -> Tables:
    """``atprobe stability`` of the study's one checkpoint, or of a fresh ``init_arch`` model
    (seeded by ``config.seed``, on the study's dataset with its true labels). ``bn_stats``:
    the BatchNorm statistics (``atprobe.bnstats``; ``auto`` recomputes a fresh model's).
    A ``--shard`` part computes its (loss, direction) units on every sample (:func:`point_units`)."""
    if (len(study.checkpoints) == 1) == (init_arch is not None) or len(study.checkpoints) > 1:
        raise AtprobeError("give either a CHECKPOINT or --init ARCH (one of them)")
    bn = _BNStats(study, bn_stats, seed=config.seed, batch_size=batch_size)
    extra: dict[str, Any] = {}
    base = study.base(spec)
    if init_arch is None:
        ckpt = study.checkpoints[0]
        samples, model, name = study.samples(ckpt, spec, base), study.model(ckpt, device), str(ckpt.path)
        labels = spec.labels
    else:
        if study.models_source.arch is not None:
            raise AtprobeError("--arch names the architecture of foreign checkpoints; "
                               "with --init give it as --init ARCH")
        arch, data = canonical_arch(init_arch), study.dataset
        if study.models_source.num_classes not in (None, data.num_classes):
            raise AtprobeError(f"--num-classes {study.models_source.num_classes} does not match dataset {data.name} "
                               f"({data.num_classes} classes)")
        norm = {"mean": data.mean, "std": data.std} if study.models_source.normalize == "dataset" else {}
        samples = base.with_labels(base.true_y)  # a fresh model was trained on nothing
        model = prepare_model(stability_probe.init_model(arch, data.num_classes, config.seed, **norm), device)
        name, labels = f"init:{arch}", "true"
        extra = {"init": {"arch": arch, "seed": config.seed, "num_classes": data.num_classes,
                          "normalize": study.models_source.normalize}}
    config = dataclasses.replace(config, chunk_size=_chunk(model, chunk_size, batch_size, copies=2))
    model, label = bn(model, config.chunk_size)
    units = len(config.losses) * config.directions
    mine, kept = point_units(study, samples, config.chunk_size, units)
    total = len(mine) * len(range(units) if kept is None else kept) * len(config.lambdas)
    with progress(total, f"stability {name}") as bar:
        table = stability_probe.probe(model, mine, config, progress=bar, gather=study.share.gather_values,
                                      units=kept)
    table = prefix(_tag({"": table}, label)[""], {"checkpoint": name, "split": spec.split, "labels": labels})
    if kept is not None:
        losses = list(config.losses)
        extra = {**extra, **study.share.point_meta(units)}
        table.insert(0, "unit", [losses.index(loss) * config.directions + int(k)
                                 for loss, k in zip(table["loss"], table["direction"])])
    meta = study.meta(config, seed=config.seed, extra=extra, **bn.meta(),
                      **_fields(spec, len(samples), batch_size, device))
    return Tables(table, meta, main_name="main" if kept is None else "part stability")


def gradcos(study: Study, spec: SampleSpec, config: gradcos_probe.GradCosConfig, device: torch.device, *,
            chunk_size: int | None = None, batch_size: int = 256, bn_stats: BNStats | str = "auto",
            progress: Progress = no_progress) -> Tables:
    """``atprobe gradcos``: successive checkpoints of the study, ordered by epoch, each pair
    on the same samples with the first checkpoint's labels. ``bn_stats``: the BatchNorm
    statistics of each checkpoint (``atprobe.bnstats``, resolved per checkpoint). A
    ``--shard`` part computes its pairs on every sample (:func:`point_units`)."""
    stubs = gradcos_probe.order_by_epoch(study.checkpoints)
    if len(stubs) < 2:
        raise AtprobeError(f"gradcos needs at least two checkpoints (or a run directory), got {len(stubs)}")
    for what, values in (("architectures", {s.arch for s in stubs}),
                         ("numbers of classes", {s.num_classes for s in stubs})):
        if len(values) > 1:
            raise AtprobeError(f"the checkpoints have different {what} ({', '.join(map(str, sorted(values)))})")
    base = study.base(spec)
    samples = study.samples(stubs[0], spec, base)
    for s in stubs[1:]:
        if not torch.equal(study.samples(s, spec, base).y, samples.y):
            raise AtprobeError(f"{s.path} was trained on other labels than {stubs[0].path}: use --labels true")
    bn = _BNStats(study, bn_stats, seed=config.seed, batch_size=batch_size)
    first = study.model(stubs[0], device)
    config = dataclasses.replace(config, chunk_size=_chunk(first, chunk_size, batch_size, copies=2))

    units = len(stubs) - 1
    mine, kept = point_units(study, samples, config.chunk_size, units)

    def models():  # every model, in a part too: each one's BatchNorm resolution is in the meta record
        yield bn(first, config.chunk_size)[0]
        for s in stubs[1:]:
            yield bn(study.model(s, device), config.chunk_size)[0]

    with progress(len(mine) * len(range(units) if kept is None else kept), "gradcos") as bar:
        table = gradcos_probe.probe(models(), mine, config, names=[str(s.path) for s in stubs],
                                    epochs=[s.epoch for s in stubs], progress=bar, gather=study.share.gather_values,
                                    pairs=kept)
    pairs = [int(p) for p in table["pair"]]
    table.insert(5, "bn_stats_b", [bn.labels[p + 1] for p in pairs])
    table.insert(5, "bn_stats_a", [bn.labels[p] for p in pairs])
    table.insert(5, "labels", spec.labels)
    table.insert(5, "split", spec.split)
    extra = None
    if kept is not None:
        extra = study.share.point_meta(units)
        table.insert(0, "unit", pairs)
    meta = study.meta(config, seed=config.seed, extra=extra, **bn.meta(),
                      **_fields(spec, len(samples), batch_size, device))
    return Tables(table, meta, main_name="main" if kept is None else "part gradcos")


# ---------------------------------------------------------------------------- landscape probes


def curvature(study: Study, spec: SampleSpec, config: curvature_probe.CurvatureConfig, device: torch.device, *,
              per_sample: bool = False, bn_stats: BNStats | str = "auto",
              progress: Progress = no_progress) -> Tables:
    """``atprobe curvature``: the summary, and with ``per_sample`` one row per sample (``.samples``).
    ``bn_stats``: running, recompute or auto (``atprobe.bnstats``; batch is refused). A
    ``--shard`` part is its share's per-sample rows alone, for ``atprobe merge``
    (:func:`curvature_from_samples`)."""
    bn = _BNStats(study, bn_stats, seed=config.seed, batch_size=config.batch_size, batch=False)

    def probe(model, samples, ckpt, bar):
        model, label = bn(model)
        mine = study.shared(samples, config.batch_size)  # whole batches: each row is the one-process row
        table = (curvature_probe.probe(model, mine, config, progress=bar) if len(mine)
                 else pd.DataFrame(columns=curvature_probe.SAMPLE_COLUMNS))
        table = study.share.gather(table, len(mine))
        table.insert(0, "at", config.at)
        return _tag({".samples": table}, label)

    tables = per_checkpoint(study, spec, probe, device, name="curvature",
                            units=lambda m, s: len(study.shared(s, config.batch_size)), progress=progress)
    n = len(study.base(spec))
    part = {**study.share.meta(n, config.batch_size), "per_sample": per_sample} if study.share.part else None
    meta = study.meta(config, seed=config.seed, **bn.meta(), extra=part, **_fields(spec, n, config.batch_size, device))
    if study.share.part:
        return Tables(tables[".samples"], meta, main_name="part curvature")
    return curvature_from_samples(tables[".samples"], meta, per_sample)


def curvature_from_samples(samples: pd.DataFrame, meta: dict[str, Any], per_sample: bool) -> Tables:
    """``atprobe curvature``'s tables from its per-sample rows (one block of ``meta["config"]["n"]``
    rows per checkpoint): each block's ``curvature.summarize`` with its leading columns. One
    process, ``torchrun`` and ``atprobe merge`` all end here."""
    main = pd.concat([prefix(curvature_probe.summarize(rows), _lead(rows, CURVATURE_LEAD))
                      for rows in _blocks(samples, int(meta["config"]["n"]))], ignore_index=True)
    return Tables(main, meta, {".samples": samples} if per_sample else {})


def hessian(study: Study, spec: SampleSpec, config: hessian_probe.HessianConfig, device: torch.device, *,
            progress: Progress = no_progress) -> Tables:
    """``atprobe hessian``: eigenvalues and traces (main) and the density (``.density``).
    Under ``torchrun`` (``scope="all"``) each rank holds its whole batches of the samples and
    every Hessian-vector product is summed across the ranks (``hessian.compute``'s ``reduce``)."""
    _no_parts(study, "hessian")
    reduce = study.share.ctx.sum_over_ranks if study.share.gathered else None
    if reduce is not None:  # refused before any checkpoint is read
        hessian_probe.check_split(config)

    def probe(model, samples, ckpt, bar):
        mine = samples if reduce is None else study.shared(samples, config.batch_size)
        result = hessian_probe.compute(model, mine, config, progress=bar, reduce=reduce)
        out = {"": result.table}
        if result.density is not None:
            out[".density"] = result.density
        for df in out.values():
            df.insert(0, "n", result.n)
            df.insert(0, "scope", config.scope)
            df.insert(0, "at", config.at)
        return out

    def units(model, samples):
        return 1 + len(hessian_probe.parameter_blocks(model, config.blocks))

    tables = per_checkpoint(study, spec, probe, device, name="hessian", units=units, progress=progress)
    meta = study.meta(config, seed=config.seed, **_fields(spec, len(study.base(spec)), config.batch_size,
                                                             device))
    main = tables[""]
    shown = main[["checkpoint", "block", "quantity", "k", "value", "iterations", "method"]]
    return Tables(main, meta, {k: v for k, v in tables.items() if k}, shown=shown)


def flatness(study: Study, spec: SampleSpec, config: flatness_probe.FlatnessConfig, device: torch.device, *,
             curve: bool = False, progress: Progress = no_progress) -> Tables:
    """``atprobe flatness``: the summary, and with ``curve`` the whole landscape (``.curve``).
    A ``--shard`` part is the curve of its directions on every sample (:func:`point_units`;
    theta in every part), finished by :func:`flatness_from_curve` as one process finishes."""
    directions = config.directions
    kept = list(study.share.points(directions)) if study.share.part else None
    position = iter(range(len(study.checkpoints)))  # per_checkpoint visits them in order (a file may come twice)

    def probe(model, samples, ckpt, bar):
        mine, _ = point_units(study, samples, config.batch_size, directions)
        table = flatness_probe.probe(model, mine, config, progress=bar, gather=study.share.gather_values, kept=kept)
        block = next(position)
        if kept is not None:  # the curve's rows in order of (checkpoint, direction)
            table.insert(0, "unit", [block * directions + int(k) for k in table["direction"]])
        return {".curve": table}

    evaluated = 1 + sum(1 for v in config.lambdas if v != 0) * len(kept if kept is not None else range(directions))
    table = per_checkpoint(study, spec, probe, device, name="flatness", progress=progress,
                           units=lambda m, s: evaluated * len(point_units(study, s, config.batch_size, 1)[0]))[".curve"]
    part = None
    if study.share.part:
        part = study.share.point_meta(len(study.checkpoints) * directions)
        part["part"]["curve"] = curve
    meta = study.meta(config, seed=config.seed, extra=part,
                      **_fields(spec, len(study.base(spec)), config.batch_size, device))
    if study.share.part:
        return Tables(table, meta, main_name="part flatness")
    return flatness_from_curve(table, meta, curve)


def flatness_from_curve(curve: pd.DataFrame, meta: dict[str, Any], keep_curve: bool) -> Tables:
    """``atprobe flatness``'s tables from its curve (every checkpoint's rows in order, each
    checkpoint ``directions x lambdas`` rows): each checkpoint's ``flatness.summarize`` with
    its leading columns, and with ``keep_curve`` the curve as ``.curve``. One process, and
    ``atprobe merge`` of ``--shard`` parts, end here."""
    record = meta["config"]
    config = flatness_probe.FlatnessConfig(lambdas=tuple(record["lambdas"]), radius=record["radius"],
                                           directions=int(record["directions"]))
    size = config.directions * len(config.lambdas)
    summaries = []
    for start in range(0, len(curve), size):
        block = curve.iloc[start:start + size]
        lead = {c: block[c].iloc[0] for c in PREFIX}
        summaries.append(prefix(flatness_probe.summarize(block, config), lead))
    main = pd.concat(summaries, ignore_index=True)
    return Tables(main, meta, {".curve": curve} if keep_curve else {})


# ---------------------------------------------------------------------------- complexity


def label_noise(ckpt) -> float | None:
    """The fraction of training labels the checkpoint's run replaced by random ones (0 = true
    labels, 1 = random labels; Fig. 6 marks the two kinds apart); None when unrecorded."""
    value = (ckpt.label_spec or {}).get("label_noise")
    return None if value is None else float(value)


#: Columns of the complexity table.
COMPLEXITY_CSV_COLUMNS = ["checkpoint", "epoch", "label_noise", "measure", "variant", "value", "reason", "n"]


def complexity(study: Study, config: complexity_probe.ComplexityConfig, device: torch.device, *,
               n: int | None = None, progress: Progress = no_progress) -> Tables:
    """``atprobe complexity``: every measure of every checkpoint; the data-dependent measures
    on the first ``n`` training samples (trained labels) and, for ``gap``, test samples.
    Under ``torchrun`` every measure is split across the ranks (``complexity.probe``'s
    ``share``) and rank 0 writes the single-process table."""
    train = test = None
    if config.needs_data:
        train = study.base(SampleSpec(split="train", n=n))
        if "gap" in config.measures:
            test = study.base(SampleSpec(split="test", n=n))
    spec = SampleSpec(split="train", n=n, labels="trained")
    frames = []
    with progress(len(study.checkpoints), "complexity") as bar:
        for ckpt in study.checkpoints:
            model = study.model(ckpt, device)
            samples = None if train is None else study.samples(ckpt, spec, train)
            df = complexity_probe.probe(model, samples, config, test=test, share=study.share)
            df.insert(0, "label_noise", pd.array([label_noise(ckpt)] * len(df), dtype="Float64"))
            frames.append(prefix(df, {"checkpoint": str(ckpt.path), "epoch": ckpt.epoch}))
            del model
            if bar is not None:
                bar.update(1)
    table = pd.concat(frames, ignore_index=True)[COMPLEXITY_CSV_COLUMNS]
    meta = study.meta(config, seed=config.seed,
                      n_train=None if train is None else len(train), n_test=None if test is None else len(test),
                      labels="trained (train), true (test)", batch_size=config.batch_size, device=str(device))
    return Tables(table, meta)


# ---------------------------------------------------------------------------- hardness


@dataclass(frozen=True)
class HardnessOutput:
    """What ``hardness`` writes besides its tables: the two figures, as PNG bytes."""

    gallery_png: bytes
    sorted_png: bytes


def hardness(study: Study, spec: SampleSpec, config: hardness_probe.HardnessConfig, device: torch.device, *,
             gallery_k: int = 10, gallery_size: tuple[int, int] | None = None,
             progress: Progress = no_progress) -> tuple[Tables, HardnessOutput, list[str]]:
    """``atprobe hardness``: per-sample losses (``.per_sample`` is the main table's sibling),
    the consistency table, the figures, and notes for the user. Model names are the paths
    relative to their common folder."""
    stubs = study.checkpoints
    if len(stubs) < 2:
        raise AtprobeError(f"hardness compares at least two checkpoints (or a directory of them), got {len(stubs)}")
    if gallery_k < 1:
        raise AtprobeError(f"--gallery-k must be >= 1, got {gallery_k}")
    names = model_names([s.path for s in stubs])
    by_name = dict(zip(names, stubs))
    classes = {name: s.num_classes for name, s in by_name.items()}
    if len(set(classes.values())) > 1:
        listed = ", ".join(f"{name}: {c}" for name, c in classes.items())
        raise AtprobeError(f"the checkpoints have different numbers of classes ({listed})")
    notes = _check_same_data(stubs, study.dataset_name, spec.split)
    base = study.base(spec)
    samples = {name: study.samples(s, spec, base) for name, s in by_name.items()}
    used = {name: spec.labels_used(s) for name, s in by_name.items()}
    differ = {name: int((samples[name].y != samples[name].true_y).sum()) for name in by_name}
    models = study.lazy_models(device, names)
    mine = {name: study.shared(s, config.batch_size) for name, s in samples.items()}
    size = len(mine[names[0]])
    with progress(size * len(stubs), "hardness") as bar:
        part = (hardness_probe.per_sample_losses(models, mine, config, progress=bar).drop(columns="rank")
                if size else pd.DataFrame(columns=hardness_probe.COLUMNS[:-1]))  # no batch: an empty part
    per_sample = study.share.gather(part, size)  # ranks need every sample: taken after the gather
    spec_attack: AttackSpec = config.spec
    meta = study.meta(config, seed=config.seed, attack_name=spec_attack.name,
                      attack_config=None if spec_attack.config is None else dataclasses.asdict(spec_attack.config),
                      split=spec.split, n=len(base), labels=spec.labels, gallery_k=gallery_k,
                      gallery_size=list(gallery_size or plot.default_gallery_size(min(gallery_k, len(base)))),
                      device=str(device),
                      extra={"models": {name: str(s.path) for name, s in by_name.items()}, "labels_used": used,
                             "labels_differing_from_true": differ, **study.share.meta(len(base), config.batch_size)})
    if study.share.part:
        notes.append(f"hardness: part {study.share.index}/{study.share.count} ({size} of {len(base)} samples); "
                     "join the parts with atprobe merge")
        return Tables(per_sample, meta, main_name="part hardness"), None, notes
    per_sample, table = hardness_from_samples(per_sample, config.top_k)
    first = names[0]
    top, top_samples = hardness_probe.hardest_samples(samples[first], per_sample, gallery_k)
    adversarial = hardness_probe.adversarial_examples(models[first], top_samples, config)
    gallery = plot.hardest_gallery(top, top_samples, adversarial, attack=config.attack,
                                   class_names=study.dataset.class_names, size=gallery_size, model_name=first)
    figures = HardnessOutput(plot.png_bytes(gallery), plot.png_bytes(plot.sorted_loss_figure(per_sample)))

    def why(name: str) -> str:
        if used[name] in ("trained", "file"):
            return f" ({differ[name]} of {len(base)} differ from the true labels)"
        if spec.labels == "true":
            return ""
        return " (test split)" if spec.split == "test" else " (no stored training labels)"

    notes.append(f"hardness: {len(stubs)} models, {len(base)} {spec.split} samples of {study.dataset.name}, "
                 f"{spec_attack.name} ({config.threat.describe()}); labels: "
                 + "; ".join(f"{name} {used[name]}{why(name)}" for name in by_name))
    tables = Tables(table, meta, {"per_sample": per_sample}, names={"per_sample": "per-sample"},
                    main_name="consistency")
    return tables, figures, notes


def hardness_from_samples(losses: pd.DataFrame, top_k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(per_sample, consistency)`` of ``atprobe hardness`` from its per-sample losses
    without ranks (every sample of every model, in order): each model's ``rank``
    (``atprobe.probes.hardness.ranks``), then the consistency table. One process,
    ``torchrun`` and ``atprobe merge`` all end here."""
    per_sample = losses.copy()
    per_sample["rank"] = np.concatenate([hardness_probe.ranks(rows["adv_loss"].to_numpy())
                                         for _, rows in per_sample.groupby("model", sort=False)])
    return per_sample, hardness_probe.consistency(per_sample, top_k)


#: What ``atprobe hardness --out DIR`` writes into DIR (with a ``.meta.json`` beside each CSV).
HARDNESS_FILES = ("per_sample.csv", "consistency.csv", "hardest.png", "sorted.png")


def hardness_files(out_dir) -> list[Path]:
    """Every file :func:`write_hardness` writes into ``out_dir`` (the output rule checks them
    before the probe runs: ``atprobe.outputs.check_outputs``)."""
    out = Path(out_dir)
    return [f for name in HARDNESS_FILES for f in (table_files(out / name) if name.endswith(".csv") else [out / name])]


def write_hardness(out_dir, tables: Tables, figures: HardnessOutput | None) -> Path:
    """``per_sample.csv``, ``consistency.csv`` (each with its .meta.json), ``hardest.png`` and
    ``sorted.png`` in ``out_dir``, all written as one (``atprobe.io.write_tables``); a
    ``--shard`` part (``figures`` None): its ``per_sample.csv`` alone."""
    out = Path(out_dir)
    if figures is None:
        write_tables([(tables.main, out / "per_sample.csv", {**tables.meta, "table": tables.main_name})])
        return out
    write_tables([(tables.extra["per_sample"], out / "per_sample.csv", {**tables.meta, "table": "per-sample"}),
                  (tables.main, out / "consistency.csv", {**tables.meta, "table": "consistency"})],
                 also={out / "hardest.png": figures.gallery_png, out / "sorted.png": figures.sorted_png})
    return out


def _check_same_data(stubs: Sequence, dataset: str, split: str) -> list[str]:
    """One-line error if the checkpoints were trained on different synthetic data; notes
    (returned) if they carved different validation splits off the training set."""
    notes = []
    cfgs = [(s.train_config or {}) for s in stubs]
    if dataset == "synthetic":
        seeds = {int(c.get("synthetic_seed", 0) or 0) for c in cfgs}
        if len(seeds) > 1:
            raise AtprobeError(f"the checkpoints were trained on different synthetic data (synthetic seeds "
                               f"{', '.join(map(str, sorted(seeds)))}): they share no samples")
    carve = {(int(c.get("val_size", 0) or 0), int(c.get("val_seed", 0) or 0)) for c in cfgs}
    if len(carve) > 1 and split != "test":
        notes.append(f"note: the checkpoints carved different validation splits; the {split} split is "
                     f"{stubs[0].path}'s")
    return notes

