"""What a command studies: checkpoints, the dataset they belong to, the sample set.

Shared by ``eval`` and every probe so that "which samples, with which labels" means
the same thing everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from atprobe.checkpoint import Checkpoint, load_checkpoint
from atprobe.data import Dataset, Split, load_dataset
from atprobe.errors import AtprobeError

SPLITS = ("train", "test", "val")
LABEL_MODES = ("trained", "true")


def checkpoint_loader(
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    dataset: str | None = None,
    normalize: str = "none",
    data_dir: str | None = None,
) -> Callable[[str | Path], Checkpoint]:
    """A function that loads one checkpoint with these options. Foreign ones (bare weights)
    need ``arch``; with ``normalize="dataset"`` they get the dataset's mean/std as input
    normalization (read once, here)."""
    mean = std = None
    if normalize == "dataset":
        if dataset is None:
            raise AtprobeError("--normalize dataset needs --dataset")
        stats = load_dataset(dataset, data_dir)
        mean, std = stats.mean, stats.std
    elif normalize != "none":
        raise AtprobeError(f"unknown normalization {normalize!r}: use none or dataset")

    def load(path: str | Path) -> Checkpoint:
        return load_checkpoint(path, arch=arch, num_classes=num_classes, dataset=dataset, mean=mean, std=std)

    return load


def load_checkpoints(paths: Sequence[str], **options) -> list[Checkpoint]:
    """Load checkpoints in order (options as ``checkpoint_loader``)."""
    if not paths:
        raise AtprobeError("no checkpoint given")
    load = checkpoint_loader(**options)
    return [load(p) for p in paths]


def dataset_name_for(checkpoints: Sequence[Checkpoint], override: str | None = None) -> str:
    """The dataset the checkpoints were trained on; all must agree unless ``override`` is given."""
    if override:
        return override
    names = {c.dataset for c in checkpoints}
    if None in names:
        foreign = next(c for c in checkpoints if c.dataset is None)
        raise AtprobeError(f"{foreign.path}: the checkpoint does not say its dataset: pass --dataset NAME")
    if len(names) > 1:
        raise AtprobeError(
            f"the checkpoints were trained on different datasets ({', '.join(sorted(names))}): pass --dataset to choose one"
        )
    return names.pop()


def load_for_checkpoints(
    checkpoints: Sequence[Checkpoint],
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    download: bool = False,
    val_size: int | None = None,
) -> Dataset:
    """Load the checkpoints' dataset with its true labels (trained labels come per checkpoint).

    A validation split is carved as the first checkpoint's training run did (its
    ``val_size``/``val_seed`` in ``train_config``) unless ``val_size`` is given.
    """
    name = dataset_name_for(checkpoints, dataset)
    cfg = checkpoints[0].train_config if checkpoints else {}
    size = int(cfg.get("val_size", 0) or 0) if val_size is None else int(val_size)
    synthetic_seed = int(cfg.get("synthetic_seed", 0) or 0)
    return load_dataset(
        name,
        data_dir,
        download=download,
        val_size=size,
        val_seed=int(cfg.get("val_seed", 0) or 0),
        synthetic_seed=synthetic_seed,
    )


def pick_split(dataset: Dataset, split: str) -> Split:
    if split not in SPLITS:
        raise AtprobeError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    chosen = getattr(dataset, split)
    if chosen is None:
        raise AtprobeError(f"dataset {dataset.name} has no {split} split here (train with --val-size to hold one out)")
    return chosen


def first_n(split: Split, n: int | None) -> Split:
    """The first ``n`` samples (all when ``n`` is None); ``n`` larger than the split is an error."""
    if n is None:
        return split
    if n < 1:
        raise AtprobeError(f"--n must be >= 1, got {n}")
    if n > len(split):
        raise AtprobeError(f"--n {n} is larger than the split ({len(split)} samples)")
    return split.subset(slice(0, n))


def with_checkpoint_labels(split: Split, checkpoint: Checkpoint, mode: str, split_name: str) -> Split:
    """``trained``: the labels the checkpoint was trained on (train/val rows only; test
    labels are never corrupted); ``true``: the dataset's labels."""
    if mode not in LABEL_MODES:
        raise AtprobeError(f"unknown label mode {mode!r}: choose from {', '.join(LABEL_MODES)}")
    if mode == "true" or split_name == "test" or checkpoint.labels is None:
        return split.with_labels(split.true_y)
    labels = checkpoint.labels
    if labels.numel() <= int(split.index.max()):
        raise AtprobeError(
            f"{checkpoint.path}: it stores {labels.numel()} training labels, fewer than the dataset's train split"
        )
    return split.with_labels(labels.to(split.index.device)[split.index].to(torch.int64))
