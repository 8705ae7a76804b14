"""``load_dataset``: one entry point over every source, plus label replacement/noise and
the validation carve-out applied the same way to all of them."""

from __future__ import annotations

import os
from typing import Any

import torch

from atprobe.data.catalog import check_name
from atprobe.data.checks import check_int, check_rate
from atprobe.data.labels import symmetric_label_noise, validation_split
from atprobe.data.npz import load_npz
from atprobe.data.published import load_published
from atprobe.data.synthetic import make_synthetic
from atprobe.data.types import Dataset
from atprobe.errors import AtprobeError


def _channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of images in [0, 1], in float64, chunked."""
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64, device=x.device)
    sq = torch.zeros(c, dtype=torch.float64, device=x.device)
    scale = 1 / 255 if x.dtype == torch.uint8 else 1.0
    for part in x.split(chunk):
        v = part.to(torch.float64) * scale
        s += v.sum(dim=(0, 2, 3))
        sq += (v * v).sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / count
    std = (sq / count - mean * mean).clamp_min(0).sqrt()
    return tuple(float(v) for v in mean.tolist()), tuple(float(v) for v in std.tolist())


def _check_labels(labels: Any, n: int, num_classes: int) -> torch.Tensor:
    t = torch.as_tensor(labels).detach().cpu()
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise AtprobeError(f"labels must be integers, got {t.dtype}")
    if t.shape != (n,):
        raise AtprobeError(f"labels must cover the whole original train split ({n},), got {tuple(t.shape)}")
    t = t.to(torch.int64)
    if n and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise AtprobeError(f"labels must be in 0..{num_classes - 1}, got {int(t.min())}..{int(t.max())}")
    return t


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    val_size: int = 0,
    val_seed: int = 0,
    label_noise: float = 0.0,
    label_seed: int = 0,
    labels: torch.Tensor | None = None,
    synthetic_seed: int = 0,
) -> Dataset:
    """Load a dataset with all splits as CPU tensors (move with :meth:`Dataset.to`).

    Args:
        name: one of :data:`DATASETS`.
        data_dir: root folder for cifar10/cifar100/svhn (default :func:`default_data_dir`);
            for ``npz`` the ``.npz`` file or a folder with ``train.npz``/``test.npz``;
            ignored for ``synthetic``.
        download: fetch cifar10/cifar100/svhn if missing (ignored for npz/synthetic).
        val_size: rows carved from train into ``Dataset.val`` (0: no validation split).
        val_seed: seed of the validation permutation.
        label_noise: fraction of train labels resampled (:func:`symmetric_label_noise`).
        label_seed: seed of the label corruption.
        labels: full-length labels of the original train split (e.g. from a checkpoint);
            they replace the train labels and take precedence over ``label_noise``.
        synthetic_seed: seed of the synthetic dataset.

    Noise/labels apply to the whole original train split before the validation split is
    carved, so a sample's label does not depend on ``val_size``. Test labels are clean.
    """
    key = check_name(name)
    label_noise = check_rate(label_noise)  # fail fast, before reading any data
    val_size = check_int(val_size, "val_size")
    if key == "synthetic":
        train, test = make_synthetic(seed=synthetic_seed)
        num_classes = 10
        class_names = tuple(f"class{i}" for i in range(num_classes))
        mean, std = _channel_stats(train.x)
    elif key == "npz":
        train, test = load_npz(data_dir)
        num_classes = int(max(train.true_y.max(), test.true_y.max())) + 1
        class_names = tuple(str(i) for i in range(num_classes))
        mean, std = _channel_stats(train.x)
    else:
        train, test, class_names, mean, std = load_published(key, data_dir, download=download)
        num_classes = len(class_names)

    if labels is not None:
        train = train.with_labels(_check_labels(labels, len(train), num_classes))
    elif label_noise > 0:
        train = train.with_labels(symmetric_label_noise(train.true_y, label_noise, num_classes, label_seed))

    val = None
    if val_size:
        train_rows, val_rows = validation_split(len(train), val_size, val_seed)
        train, val = train.subset(train_rows), train.subset(val_rows)
    return Dataset(
        name=key,
        num_classes=num_classes,
        class_names=class_names,
        mean=tuple(mean),
        std=tuple(std),
        train=train,
        test=test,
        val=val,
    )
