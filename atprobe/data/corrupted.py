"""CIFAR-10-C and CIFAR-100-C (Hendrycks & Dietterich 2019, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations"): the test split of one corruption at one
severity, with the clean train split of CIFAR-10/100 beside it.

The release is a folder (``CIFAR-10-C/``, ``CIFAR-100-C/``) with one ``<corruption>.npy`` per
corruption, uint8 NHWC ``(50000, 32, 32, 3)``: the 10,000 test images corrupted at severity
1, then at 2, ... then at 5, and one ``labels.npy`` with the 50,000 matching labels. Severity
K is the K-th of the five equal blocks, rows ``(K-1)·N/5 : K·N/5``; only those rows are read
(the files are memory-mapped).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from atprobe.data.arrays import images_to_tensor, labels_to_tensor
from atprobe.data.catalog import NUM_CLASSES, resolve_dir
from atprobe.data.npz import load_npy
from atprobe.data.published import load_published, locate_published
from atprobe.data.types import Split, make_split
from atprobe.errors import AtprobeError

#: The 15 corruptions of the benchmark, then the 4 extra ones the release also holds.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate",
)
SEVERITIES = (1, 2, 3, 4, 5)

#: Corrupted dataset -> (its release folder, the clean dataset its images and train split come from).
CORRUPTED: dict[str, tuple[str, str]] = {
    "cifar10c": ("CIFAR-10-C", "cifar10"),
    "cifar100c": ("CIFAR-100-C", "cifar100"),
}
_RELEASES = {"cifar10c": "https://zenodo.org/records/2535967", "cifar100c": "https://zenodo.org/records/3555552"}


def check_corruption(dataset: str | None, corruption: str | None, severity: int | None) -> None:
    """The one check of ``corruption``/``severity`` against the dataset: both given for a corrupted
    dataset (a known name, a severity in 1..5), neither for any other."""
    if dataset not in CORRUPTED:
        if corruption is not None or severity is not None:
            raise AtprobeError(f"--corruption/--severity apply to {', '.join(CORRUPTED)} only, not to "
                               f"{dataset or 'the dataset the checkpoints record'} (pass --dataset cifar10c)")
        return
    if corruption is None:
        raise AtprobeError(f"{dataset} needs --corruption NAME, one of {', '.join(CORRUPTIONS)}")
    if corruption not in CORRUPTIONS:
        raise AtprobeError(f"unknown corruption {corruption!r}: choose from {', '.join(CORRUPTIONS)}")
    if severity is None:
        raise AtprobeError(f"{dataset} needs --severity K, one of 1, 2, 3, 4, 5")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise AtprobeError(f"--severity must be one of 1, 2, 3, 4, 5, got {severity!r}")


def _release_folder(key: str, root: pathlib.Path) -> pathlib.Path:
    sub = CORRUPTED[key][0]
    for folder in (root / sub, root):
        if (folder / "labels.npy").is_file():
            return folder
    raise AtprobeError(f"{sub} not found: no labels.npy in {root / sub} or {root}; download {sub}.tar from "
                       f"{_RELEASES[key]} and extract it into {root}")


def corrupted_test(key: str, folder: pathlib.Path, corruption: str, severity: int) -> Split:
    """The ``severity`` block of ``folder/<corruption>.npy`` with its rows of ``labels.npy``."""
    path = folder / f"{corruption}.npy"
    if not path.is_file():
        present = sorted(p.stem for p in folder.glob("*.npy") if p.stem in CORRUPTIONS)
        raise AtprobeError(f"{path} is missing; {folder} holds {', '.join(present) or 'no corruption files'}")
    x, y = load_npy(path), load_npy(folder / "labels.npy")
    if x.ndim != 4 or x.shape[0] % len(SEVERITIES):
        raise AtprobeError(f"{path}: expected the five severities stacked, (5 x 10000, 32, 32, 3), got shape {x.shape}")
    if y.shape[:1] != x.shape[:1]:
        raise AtprobeError(f"{folder / 'labels.npy'}: {x.shape[0]} images in {path.name} but {y.shape[0]} labels")
    rows = x.shape[0] // len(SEVERITIES)
    block = slice((severity - 1) * rows, severity * rows)
    images = images_to_tensor(x[block], f"{path.name}[severity {severity}]")
    labels = labels_to_tensor(np.asarray(y[block]), rows, f"labels.npy[severity {severity}]")
    classes = NUM_CLASSES[key]
    if int(labels.max()) >= classes:
        raise AtprobeError(f"{folder / 'labels.npy'}: labels must be in 0..{classes - 1}, "
                           f"got up to {int(labels.max())}")
    return make_split(images, labels)


def load_corrupted(
    key: str, data_dir: str | os.PathLike[str] | None, corruption: str | None, severity: int | None, *, download: bool
) -> tuple[Split, Split, tuple[str, ...], tuple[float, ...], tuple[float, ...]]:
    """``(train, test, class_names, mean, std)`` of ``key`` (``cifar10c``/``cifar100c``).

    test: the corrupted images; train, class names and statistics: the clean dataset's, read
    from ``data_dir`` or from the folder above the release folder (``--download`` fetches it
    into ``data_dir``), so train-split probes, BatchNorm recomputation and trained labels work
    as for the clean dataset.
    """
    check_corruption(key, corruption, severity)
    assert corruption is not None and severity is not None
    root = resolve_dir(data_dir)
    folder = _release_folder(key, root)
    test = corrupted_test(key, folder, corruption, int(severity))
    clean = CORRUPTED[key][1]
    clean_root = next((r for r in (root, folder.parent) if locate_published(clean, r) is not None), root)
    try:
        train, clean_test, class_names, mean, std = load_published(clean, clean_root, download=download)
    except AtprobeError as e:
        raise AtprobeError(f"{key} takes its train split from the clean {clean}: {e}") from None
    if clean_test.x.shape[1:] != test.x.shape[1:]:
        raise AtprobeError(f"{folder}: images of shape {tuple(test.x.shape[1:])}, but {clean} has "
                           f"{tuple(clean_test.x.shape[1:])}")
    return train, test, class_names, mean, std
