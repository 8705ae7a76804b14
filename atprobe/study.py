"""The study layer: checkpoints, their data and samples, a probe run over them, tables written.

Every command and the demo go through here, so "which checkpoints does this argument
mean", "which samples with which labels" and "how is a table written" have one answer:

* :func:`expand_checkpoints` is the one rule that turns ``CKPT | RUN_DIR`` arguments into
  checkpoints (see its docstring);
* :class:`Study` holds the checkpoints as weightless stubs (metadata, labels, SHA-256),
  loads the dataset they belong to once, and builds a model only when asked, checking that
  the file still has the hash it had when the study opened (:meth:`Study.model`,
  :class:`LazyModels`);
* :class:`SampleSpec` is the sample choice (split, first ``n``, trained or true labels);
* :func:`per_checkpoint` runs a probe function on every checkpoint and prefixes its rows
  with ``checkpoint, epoch, split, labels``;
* :attr:`Study.share` is which whole batches of the samples this process computes (one
  process: all; ``torchrun``: its rank's, gathered back; ``--shard I/N``: its part), see
  ``atprobe.distributed.SampleShare`` and docs/scaling.md;
* :class:`Tables` is what a command produces (a main table and named extra tables) and
  writes them atomically with their ``.meta.json`` (extra tables first, the main one
  last, so the main CSV exists only when everything was written).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from atprobe import bnstats
from atprobe.checkpoint import Checkpoint, load_checkpoint
from atprobe.data import Dataset, Split, check_corruption, check_labels, load_dataset, read_label_file
from atprobe.distributed import SampleShare, is_main_process
from atprobe.errors import AtprobeError, check_choice
from atprobe.io import config_record, run_meta, write_tables
from atprobe.outputs import EPOCH_FILE, is_run_directory, sibling
from atprobe.runtime import prepare_model

__all__ = [
    "DEFAULT_N",
    "DataSource",
    "LABEL_MODES",
    "LazyModels",
    "ModelSource",
    "SPLITS",
    "SampleSpec",
    "Study",
    "Tables",
    "check_labels_option",
    "config_record",
    "expand_checkpoints",
    "model_names",
    "no_progress",
    "per_checkpoint",
    "prefix",
]

SPLITS = ("train", "test", "val")
LABEL_MODES = ("trained", "true")
#: Samples probed when no ``n`` is given (or the whole split, if it is smaller).
DEFAULT_N = 1000


# ---------------------------------------------------------------------------- what to read


@dataclass(frozen=True)
class ModelSource:
    """How to read checkpoints atprobe did not write (bare state dicts): their ``arch``,
    ``num_classes`` (default: read off the classifier) and input ``normalize``
    (``none``: the weights take [0, 1] images; ``dataset``: the dataset's mean/std)."""

    arch: str | None = None
    num_classes: int | None = None
    normalize: str = "none"

    def __post_init__(self) -> None:
        check_choice(self.normalize, ("none", "dataset"), "normalization")


@dataclass(frozen=True)
class DataSource:
    """Which dataset (default: the one the checkpoints record), where it lives, whether
    a missing one may be downloaded, and for ``cifar10c``/``cifar100c`` which corruption at
    which severity (checked here, before any work)."""

    dataset: str | None = None
    data_dir: str | None = None
    download: bool = False
    corruption: str | None = None
    severity: int | None = None

    def __post_init__(self) -> None:
        check_corruption(self.dataset, self.corruption, self.severity)

    def load(self, name: str | None = None, **options: Any) -> Dataset:
        """``load_dataset`` of ``name`` (default this source's dataset) from here, with ``options``."""
        return load_dataset(name or self.dataset, self.data_dir, download=self.download, corruption=self.corruption,
                            severity=self.severity, **options)


def check_labels_option(labels: str | os.PathLike) -> str | os.PathLike:
    """``labels`` if it is a label mode (:data:`LABEL_MODES`) or names a ``.npy`` file (read later)."""
    if labels not in LABEL_MODES and not str(labels).lower().endswith(".npy"):
        raise AtprobeError(f"the labels must be trained, true or the path of a .npy file of labels, "
                           f"got {str(labels)!r}")
    return labels


@dataclass(frozen=True)
class SampleSpec:
    """The samples a probe sees: the first ``n`` of ``split`` (default ``default_n``, or the
    whole split when it is smaller; ``default_n=None``: the whole split) with the
    ``trained`` labels of each checkpoint (train/val rows; test labels are never
    corrupted), the ``true`` ones, or those of a label file: ``labels`` is then the path of
    a ``.npy`` vector with one label per row of the original train split (the noisy labels
    a run saved, e.g. memorization-AT's ``noisy_label.npy``), read and checked here."""

    split: str = "train"
    n: int | None = None
    labels: str = "trained"
    default_n: int | None = DEFAULT_N

    def __post_init__(self) -> None:
        check_choice(self.split, SPLITS, "split")
        if self.n is not None and (isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1):
            raise AtprobeError(f"--n must be >= 1, got {self.n}")
        if check_labels_option(self.labels) not in LABEL_MODES:
            if self.split == "test":
                raise AtprobeError(f"--labels {self.labels}: a label file relabels the train split (train/val "
                                   "rows); the test split keeps its true labels")
            _ = self.file_labels  # read and checked now, before any work

    @cached_property
    def file_labels(self) -> torch.Tensor | None:
        """The labels of the label file (int64, one per original train row), or None."""
        return None if self.labels in LABEL_MODES else read_label_file(self.labels)

    def labels_used(self, ckpt: Checkpoint) -> str:
        """Which labels ``ckpt`` gets: ``trained``, ``true`` or ``file``."""
        if self.labels not in LABEL_MODES:
            return "file"
        if self.labels == "trained" and self.split != "test" and ckpt.labels is not None:
            return "trained"
        return "true"


# ---------------------------------------------------------------------------- the expansion rule


def stub(ckpt: Checkpoint) -> Checkpoint:
    """The checkpoint without its weights (metadata, labels, hash): many can be held at once."""
    return dataclasses.replace(ckpt, state_dict={}, raw={})


def _relative(ckpt: Checkpoint, shown: Path) -> Checkpoint:
    return ckpt if ckpt.path == shown else dataclasses.replace(ckpt, path=shown)


def _run_directory(path: Path, load: Callable[[Path], Checkpoint]) -> list[Checkpoint]:
    """An ``atprobe train`` run directory: its ``epoch_*.pt``, then ``final.pt`` and
    ``best.pt`` unless they hold an epoch already listed, all in epoch order."""
    found = []
    for p in sorted(path.glob("epoch_*.pt")):
        m = EPOCH_FILE.match(p.name)
        if m and p.is_file():
            found.append(stub(load(p)))
    epochs = {c.epoch for c in found}
    for name in ("final.pt", "best.pt"):  # final first: when both hold one epoch, final.pt names it
        p = path / name
        if p.is_file():
            c = stub(load(p))
            if c.epoch is None or c.epoch not in epochs:
                found.append(c)
                epochs.add(c.epoch)
    if any(c.epoch is None for c in found):
        return found
    return sorted(found, key=lambda c: int(c.epoch))  # stable: ties keep the order above


def expand_checkpoints(args: Sequence[str | os.PathLike], load: Callable[[Path], Checkpoint],
                       root: str | os.PathLike | None = None) -> list[Checkpoint]:
    """The checkpoints named by ``args`` (stubs, see :func:`stub`), in order: the one rule
    of every command.

    * a file is itself;
    * an ``atprobe train`` run directory (it has ``config.json`` or ``epoch_*.pt`` files)
      stands for its ``epoch_*.pt`` checkpoints, and ``final.pt`` and ``best.pt`` unless they
      hold an epoch already listed (they are copies then), all ordered by epoch; ``last.pt``
      (the resume copy of the newest epoch) never;
    * any other directory stands for its ``*.pt`` files by name, ``last.pt`` left out.

    ``root``: relative arguments are read from there (and keep their relative names in the
    tables), as if the command ran inside ``root``.

    A file given twice is listed twice (``gradcos a.pt a.pt`` is a valid check); commands
    that compare models by name refuse that (:func:`model_names`).
    """
    if not args:
        raise AtprobeError("no checkpoint given")
    base = None if root is None else Path(root)

    def where(p: Path) -> Path:
        return p if base is None or p.is_absolute() else base / p

    def shown(p: Path) -> Path:
        return p if base is None or not p.is_relative_to(base) else p.relative_to(base)

    def read(p: Path) -> Checkpoint:
        return _relative(load(p), shown(p))

    out: list[Checkpoint] = []
    for arg in args:
        path = where(Path(arg))
        if path.is_dir():
            if is_run_directory(path):
                found = _run_directory(path, read)
            else:
                found = [stub(read(p)) for p in sorted(path.glob("*.pt")) if p.is_file() and p.name != "last.pt"]
            if not found:
                raise AtprobeError(f"{shown(path)}: no checkpoints in this directory (last.pt is left out)")
            out.extend(found)
        else:
            out.append(stub(read(path)))
    return out


def model_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """A short unique name per checkpoint: its path relative to the deepest folder that
    holds them all (``runs/a/best.pt``, ``runs/b/best.pt`` -> ``a/best.pt``, ``b/best.pt``),
    with ``/`` separators."""
    absolute = [os.path.abspath(p) for p in paths]
    if len(set(absolute)) != len(absolute):
        dup = next(p for p, a in zip(paths, absolute) if absolute.count(a) > 1)
        raise AtprobeError(f"{dup}: the same checkpoint is given twice")
    if not absolute:
        return []
    common = os.path.commonpath([os.path.dirname(a) for a in absolute])
    return [Path(os.path.relpath(a, common)).as_posix() for a in absolute]


# ---------------------------------------------------------------------------- the study


def _loader(models: ModelSource, data: DataSource) -> Callable[[Path], Checkpoint]:
    mean = std = None
    if models.normalize == "dataset":
        if data.dataset is None:
            raise AtprobeError("--normalize dataset needs --dataset")
        stats = data.load()
        mean, std = stats.mean, stats.std

    def load(path: Path) -> Checkpoint:
        return load_checkpoint(path, arch=models.arch, num_classes=models.num_classes, dataset=data.dataset,
                               mean=mean, std=std)

    return load


class Study:
    """Checkpoints (weightless stubs) and the dataset they belong to.

    ``checkpoints``: ``CKPT | RUN_DIR`` arguments (:func:`expand_checkpoints`); empty for a
    study of fresh models on ``data.dataset``. ``root``: where relative arguments live (the
    tables keep them relative). ``share``: the samples this process computes (default all of
    them; ``atprobe.distributed.SampleShare``). Opening a study reads every checkpoint once
    (metadata and hash) and keeps no weights; the dataset is read on first use.
    """

    def __init__(self, checkpoints: Sequence[str | os.PathLike] = (), models: ModelSource = ModelSource(),
                 data: DataSource = DataSource(), *, root: str | os.PathLike | None = None,
                 share: SampleShare | None = None) -> None:
        self.share = share or SampleShare()
        self.models_source = models
        self.data_source = data
        self.root = None if root is None else Path(root)
        self._load = _loader(models, data)
        self.checkpoints: list[Checkpoint] = (expand_checkpoints(checkpoints, self._load, root) if checkpoints
                                              else [])
        for ckpt in self.checkpoints:  # what loading decided unasked (--arch auto, saved normalization): said once
            if ckpt.notes and is_main_process():  # once per torchrun job, in every --shard part
                print(f"{ckpt.path}: {'; '.join(ckpt.notes.values())}", file=sys.stderr)

    # ------------------------------------------------------------------ data

    @property
    def dataset_name(self) -> str:
        if self.data_source.dataset:
            return self.data_source.dataset
        names = {c.dataset for c in self.checkpoints}
        if not self.checkpoints:
            return "synthetic"
        if None in names:
            foreign = next(c for c in self.checkpoints if c.dataset is None)
            raise AtprobeError(f"{foreign.path}: the checkpoint does not say its dataset: pass --dataset NAME")
        if len(names) > 1:
            raise AtprobeError(f"the checkpoints were trained on different datasets ({', '.join(sorted(names))}): "
                               "pass --dataset to choose one")
        return names.pop()

    @cached_property
    def dataset(self) -> Dataset:
        """The checkpoints' dataset with its true labels (trained labels come per checkpoint),
        with the validation split the first checkpoint's run carved (``val_size``/``val_seed``)."""
        cfg = self.checkpoints[0].train_config if self.checkpoints else {}
        cfg = cfg or {}
        return self.data_source.load(self.dataset_name, val_size=int(cfg.get("val_size", 0) or 0),
                                     val_seed=int(cfg.get("val_seed", 0) or 0),
                                     synthetic_seed=int(cfg.get("synthetic_seed", 0) or 0))

    def base(self, spec: SampleSpec) -> Split:
        """The samples of ``spec`` with the true labels."""
        split = getattr(self.dataset, spec.split)
        if split is None:
            raise AtprobeError(f"dataset {self.dataset.name} has no {spec.split} split here "
                               "(train with --val-size to hold one out)")
        n = spec.n
        if n is None:
            n = len(split) if spec.default_n is None else min(spec.default_n, len(split))
        if n > len(split):
            raise AtprobeError(f"--n {n} is larger than the split ({len(split)} samples)")
        chosen = split.subset(slice(0, n))
        for ckpt in self.checkpoints:  # every checkpoint meets these samples: its classes checked before any work
            self.samples(ckpt, spec, chosen)
        return chosen

    def shared(self, samples: Split, batch_size: int) -> Split:
        """This process's share of ``samples`` (whole batches of ``batch_size``; :attr:`share`)."""
        return self.share.mine(samples, batch_size)

    def samples(self, ckpt: Checkpoint, spec: SampleSpec, base: Split | None = None) -> Split:
        """``base`` (default ``self.base(spec)``) with the labels ``spec`` gives ``ckpt``; a
        one-line error when a label is not one of the model's classes."""
        base = self.base(spec) if base is None else base
        used = spec.labels_used(ckpt)
        if used == "true":
            return self._check_classes(ckpt, base.with_labels(base.true_y), spec, "true")
        if used == "file":
            ds = self.dataset
            n = len(ds.train) + (0 if ds.val is None else len(ds.val))
            labels = check_labels(spec.file_labels, n, ds.num_classes, f"--labels {spec.labels}")
            samples = base.with_labels(labels.to(base.index.device)[base.index])
            return self._check_classes(ckpt, samples, spec, f"{spec.labels}")
        labels = ckpt.labels
        if labels.numel() <= int(base.index.max()):
            raise AtprobeError(f"{ckpt.path}: it stores {labels.numel()} training labels, fewer than the "
                               "dataset's train split")
        samples = base.with_labels(labels.to(base.index.device)[base.index].to(torch.int64))
        return self._check_classes(ckpt, samples, spec, "trained")

    def _check_classes(self, ckpt: Checkpoint, samples: Split, spec: SampleSpec, which: str) -> Split:
        """``samples`` if every label is one of ``ckpt``'s classes (``max(label) + 1 <= num_classes``)."""
        if len(samples) and int(samples.y.max()) >= ckpt.num_classes:
            needed = int(samples.y.max()) + 1
            raise AtprobeError(
                f"{ckpt.path}: the model has {ckpt.num_classes} classes, but the {which} labels of the "
                f"{len(samples)} {spec.split} samples of {self.dataset_name} need {needed} (labels up to "
                f"{needed - 1}); give the dataset it was trained on (--dataset), or a model with {needed} classes")
        return samples

    # ------------------------------------------------------------------ models

    def model(self, ckpt: Checkpoint, device: torch.device) -> nn.Module:
        """``ckpt``'s model on ``device`` (channels-last), read now; a one-line error if the
        file changed since the study opened."""
        path = ckpt.path if self.root is None or Path(ckpt.path).is_absolute() else self.root / ckpt.path
        full = self._load(path)
        if full.sha256 != ckpt.sha256:
            raise AtprobeError(f"{ckpt.path} changed while the study was running")
        return prepare_model(full.build_model(), device)

    def bn_model(self, model: nn.Module, spec: bnstats.BNStats, *, seed: int, batch_size: int,
                 chunk_size: int | None = None) -> tuple[nn.Module, str]:
        """``model`` with the BatchNorm statistics ``spec`` asks for and the resolved label
        (``running``, ``recompute:N``, ``batch:K``): :func:`atprobe.bnstats.prepare` on this
        study's training split, the one place ``auto`` is resolved (once per model)."""
        needs_train = spec.mode == "recompute" or (spec.mode == "auto" and bnstats.fresh_batchnorm(model))
        return bnstats.prepare(model, spec, self.dataset.train if needs_train else None, seed=seed,
                               batch_size=batch_size, chunk_size=chunk_size)

    def lazy_models(self, device: torch.device, names: Sequence[str] | None = None) -> LazyModels:
        """name -> model, built on each access (one in memory at a time)."""
        names = list(names) if names is not None else [str(c.path) for c in self.checkpoints]
        return LazyModels(self, dict(zip(names, self.checkpoints)), device)

    def meta(self, config: Any, *, seed: int, threat: Any = None, extra: Mapping[str, Any] | None = None,
             **fields: Any) -> dict[str, Any]:
        """The ``.meta.json`` record of a table of this study: the config (as JSON values),
        the threat model at the top level (the same key in every command), the dataset,
        ``fields`` and the ``world_size`` the table was computed with."""
        record = {**config_record(config), **fields}
        if "dataset" in self.__dict__:  # read by the study (a cached property): never loaded just for this
            record.setdefault("dataset", self.dataset.name)
        else:
            record.setdefault("dataset", None)
        threat = threat if threat is not None else getattr(config, "threat", None)
        top = {"threat": None if threat is None else dataclasses.asdict(threat),
               "world_size": self.share.count if self.share.gathered else 1}
        return run_meta(seed=seed, checkpoints=self.checkpoints, config=record, extra={**top, **dict(extra or {})})


class LazyModels(Mapping[str, nn.Module]):
    """name -> model, loaded, hash-checked and moved to the device on each access (never
    cached): a probe that visits each once holds one model in memory at a time."""

    def __init__(self, study: Study, checkpoints: Mapping[str, Checkpoint], device: torch.device) -> None:
        self._study, self._checkpoints, self._device = study, dict(checkpoints), device

    def __getitem__(self, name: str) -> nn.Module:
        return self._study.model(self._checkpoints[name], self._device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._checkpoints)

    def __len__(self) -> int:
        return len(self._checkpoints)


# ---------------------------------------------------------------------------- running and writing


#: ``probe(model, samples, ckpt, bar) -> {suffix: table}``: "" is the main table; ``bar``
#: is the progress bar of this checkpoint (anything with ``update(n)``, or None).
CheckpointProbe = Callable[[nn.Module, Split, Checkpoint, Any], Mapping[str, pd.DataFrame]]
#: ``progress(total, description)``: a context manager giving a bar (``update(n)``) or None.
Progress = Callable[[int, str], contextlib.AbstractContextManager]


def no_progress(total: int, description: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext(None)


#: The columns :func:`per_checkpoint` puts first by default.
PREFIX = ("checkpoint", "epoch", "split", "labels")


def prefix(df: pd.DataFrame, values: Mapping[str, Any]) -> pd.DataFrame:
    """``df`` with ``values`` as its first columns, in order (``epoch`` as nullable Int64)."""
    for column, value in reversed(list(values.items())):
        if column == "epoch":
            value = pd.array([value] * len(df), dtype="Int64")
        df.insert(0, column, value)
    return df


def per_checkpoint(study: Study, spec: SampleSpec, probe: CheckpointProbe, device: torch.device, *,
                   columns: Sequence[str] = PREFIX, name: str = "probe",
                   units: Callable[[nn.Module, Split], int] = lambda model, samples: len(samples),
                   progress: Progress = no_progress) -> dict[str, pd.DataFrame]:
    """``probe`` on every checkpoint of ``study`` (its model on ``device``, its samples of
    ``spec``), rows prefixed with ``columns`` (of ``checkpoint, epoch, split, labels``);
    the tables of all checkpoints concatenated per suffix. ``progress(units(model,
    samples), "<name> <checkpoint>")`` gives each checkpoint's bar."""
    base = study.base(spec)
    tables: dict[str, list[pd.DataFrame]] = {}
    for ckpt in study.checkpoints:
        model = study.model(ckpt, device)
        samples = study.samples(ckpt, spec, base)
        with progress(units(model, samples), f"{name} {ckpt.name}") as bar:
            out = probe(model, samples, ckpt, bar)
        del model
        known = {"checkpoint": str(ckpt.path), "epoch": ckpt.epoch, "split": spec.split, "labels": spec.labels}
        for suffix, df in out.items():
            tables.setdefault(suffix, []).append(prefix(df, {c: known[c] for c in columns}))
    return {suffix: pd.concat(dfs, ignore_index=True) for suffix, dfs in tables.items()}


@dataclass
class Tables:
    """What a command writes: ``main`` (to OUTPUT) and ``extra`` tables (to OUTPUT's stem +
    suffix + ``.csv``), each with ``meta`` plus ``{"table": name}``; ``shown`` is the part of
    the main table a command echoes."""

    main: pd.DataFrame
    meta: dict[str, Any]
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # suffix -> table name in the meta
    main_name: str = "main"
    shown: pd.DataFrame | None = None

    def paths(self, output: str | os.PathLike) -> dict[str, Path]:
        return {suffix: sibling(output, suffix) for suffix in self.extra}

    def write(self, output: str | os.PathLike) -> Path:
        """Every table with its meta, all as one (``atprobe.io.write_tables``: either every
        file is replaced or none is), the extra tables first."""
        extra = [(self.extra[suffix], target, {**self.meta, "table": self.names.get(suffix, suffix.lstrip("."))})
                 for suffix, target in self.paths(output).items()]
        return write_tables([*extra, (self.main, output, {**self.meta, "table": self.main_name})])[-1]
