"""Datasets, label corruption, validation splits and device-resident batches.

Everything a probe needs to get images in front of a model:

* :func:`load_dataset` reads CIFAR-10, CIFAR-100 and SVHN from their published
  archives (parsed here, no torchvision), user ``.npz`` files, or builds the
  built-in ``synthetic`` dataset that needs no download at all.
* Training labels can be partially corrupted (:func:`symmetric_label_noise`) or
  replaced by a stored vector, and a validation split can be carved from train
  (:func:`validation_split`); every sample keeps its row in the original split
  (``Split.index``) so per-sample probes can line results up across runs.
* :func:`iterate_batches` and :func:`random_crop_flip` serve batches straight
  from a split that already lives on the accelerator: slicing, gathering, the
  uint8 -> float conversion and augmentation all run on the device, with no
  host synchronisation inside the loop.
* :func:`download_dataset` / :func:`fetch_url` download with resume and MD5
  verification and extract archives safely.

See ``docs/data.md`` for the definitions (file layouts, synthetic data, noise).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import operator
import os
import pathlib
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F

from atprobe import __version__
from atprobe.errors import AtprobeError

__all__ = [
    "DATASETS",
    "SOURCES",
    "Batch",
    "Dataset",
    "Resource",
    "Split",
    "default_data_dir",
    "download_dataset",
    "fetch_url",
    "iterate_batches",
    "load_dataset",
    "make_synthetic",
    "random_crop_flip",
    "symmetric_label_noise",
    "validation_split",
]

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "svhn", "npz", "synthetic")

#: Published per-channel mean/std of the *train* images in [0, 1].
_PUBLISHED_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}

_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN"}


def default_data_dir() -> pathlib.Path:
    """Where datasets live unless a ``data_dir`` is given.

    ``$ATPROBE_DATA_DIR`` if set (and non-empty), else ``~/.cache/atprobe/data``.
    """
    env = os.environ.get("ATPROBE_DATA_DIR", "").strip()
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "atprobe" / "data"


def _resolve_dir(data_dir: str | os.PathLike[str] | None) -> pathlib.Path:
    return default_data_dir() if data_dir is None else pathlib.Path(data_dir).expanduser()


def _check_name(name: str) -> str:
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise AtprobeError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


# --------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """One split of a dataset, as whole tensors (keep it on the device you train on).

    Attributes:
        x: ``(N, C, H, W)`` images, uint8 pixel values 0..255 or float32 in [0, 1].
        y: int64 ``(N,)`` labels used for training/evaluation (possibly corrupted).
        true_y: int64 ``(N,)`` the dataset's original labels.
        index: int64 ``(N,)`` row of each sample in the original split; a validation
            split carved from train keeps the train rows.

    All tensors share one device and are made contiguous on construction.
    """

    x: torch.Tensor
    y: torch.Tensor
    true_y: torch.Tensor
    index: torch.Tensor

    def __post_init__(self) -> None:
        x = self.x
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise AtprobeError(f"Split.x must be an (N, C, H, W) tensor, got {shape}")
        if x.dtype not in (torch.uint8, torch.float32):
            raise AtprobeError(f"Split.x must be uint8 or float32, got {x.dtype}")
        n = x.shape[0]
        for name in ("y", "true_y", "index"):
            t = getattr(self, name)
            if (
                not isinstance(t, torch.Tensor)
                or t.dtype != torch.int64
                or t.ndim != 1
                or t.shape[0] != n
            ):
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise AtprobeError(f"Split.{name} must be an int64 vector of length {n}, got {got}")
            if t.device != x.device:
                raise AtprobeError(f"Split.{name} is on {t.device} but Split.x is on {x.device}")
        for name in ("x", "y", "true_y", "index"):
            t = getattr(self, name)
            if not t.is_contiguous():
                # Frozen dataclass: normalise in place once so every consumer can rely on it.
                object.__setattr__(self, name, t.contiguous())

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def device(self) -> torch.device:
        """The device all tensors of the split live on."""
        return self.x.device

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Split:
        """Copy of the split with every tensor on ``device`` (a no-op copy if already there).

        A whole CIFAR train split is 150 MB as uint8, so it fits on any GPU; batches
        are then sliced on the device (:func:`iterate_batches`).
        """
        return Split(
            x=self.x.to(device, non_blocking=non_blocking),
            y=self.y.to(device, non_blocking=non_blocking),
            true_y=self.true_y.to(device, non_blocking=non_blocking),
            index=self.index.to(device, non_blocking=non_blocking),
        )

    def subset(self, rows: torch.Tensor | slice | Sequence[int]) -> Split:
        """Rows of the split: a slice, integer row numbers (into *this* split), or a bool mask.

        ``index`` travels with the rows, so a subset still knows each sample's original row.
        Integer rows are not range-checked (that would need a host sync on a GPU).
        """
        if isinstance(rows, slice):
            return Split(self.x[rows], self.y[rows], self.true_y[rows], self.index[rows])
        r = torch.as_tensor(rows, device=self.x.device)
        if r.dtype == torch.bool:
            if r.shape != (len(self),):
                raise AtprobeError(f"subset mask must have shape ({len(self)},), got {tuple(r.shape)}")
            r = r.nonzero().squeeze(1)
        elif r.dtype.is_floating_point or r.dtype.is_complex:
            raise AtprobeError(f"subset rows must be integers or a bool mask, got {r.dtype}")
        r = r.reshape(-1).long()
        return Split(self.x[r], self.y[r], self.true_y[r], self.index[r])

    def with_labels(self, y: torch.Tensor | Sequence[int] | np.ndarray) -> Split:
        """Copy of the split whose used labels are ``y`` (``true_y`` and ``index`` unchanged)."""
        t = torch.as_tensor(y)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise AtprobeError(f"labels must be integers, got {t.dtype}")
        if t.shape != (len(self),):
            raise AtprobeError(f"labels must have shape ({len(self)},), got {tuple(t.shape)}")
        t = t.to(device=self.x.device, dtype=torch.int64)
        return Split(self.x, t, self.true_y, self.index)


@dataclass(frozen=True)
class Dataset:
    """A dataset: metadata plus its splits (tensors on the CPU unless moved with :meth:`to`).

    ``mean``/``std`` are per-channel statistics of the train images in [0, 1]: the
    published constants for CIFAR-10/100 and SVHN, computed over the whole original
    train split (before any validation carve-out) for ``npz`` and ``synthetic``.
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: Split
    test: Split
    val: Split | None = None

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes:
            raise AtprobeError(
                f"dataset {self.name!r} has {self.num_classes} classes but "
                f"{len(self.class_names)} class names"
            )
        channels = self.train.x.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise AtprobeError(
                f"dataset {self.name!r}: mean/std need {channels} entries, "
                f"got {len(self.mean)}/{len(self.std)}"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        _, c, h, w = self.train.x.shape
        return (c, h, w)

    def to(self, device: torch.device | str) -> Dataset:
        """Copy with every split on ``device``."""
        return dataclasses.replace(
            self,
            train=self.train.to(device),
            test=self.test.to(device),
            val=None if self.val is None else self.val.to(device),
        )


@dataclass(frozen=True)
class Batch:
    """One mini-batch, on the device of the split it came from.

    Attributes:
        x: float32 ``(B, C, H, W)`` in [0, 1] (a fresh tensor: safe to modify).
        y: int64 labels used for training.
        true_y: int64 original labels.
        index: int64 original-split row of each sample.
    """

    x: torch.Tensor
    y: torch.Tensor
    true_y: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]


def _make_split(x: torch.Tensor, y: torch.Tensor) -> Split:
    """A fresh split of an original dataset: used labels = true labels, index = row."""
    y = y.to(torch.int64)
    return Split(x=x, y=y, true_y=y.clone(), index=torch.arange(x.shape[0], dtype=torch.int64))


def _np_to_tensor(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # torch.from_numpy warns on read-only memory
        a = a.copy()
    return torch.from_numpy(a)


# --------------------------------------------------------------------------------------
# Label noise and validation split
# --------------------------------------------------------------------------------------


def _check_rate(rate: float) -> float:
    try:
        r = float(rate)
    except (TypeError, ValueError):
        raise AtprobeError(f"label noise rate must be a number in [0, 1], got {rate!r}") from None
    if not (0.0 <= r <= 1.0):  # also rejects NaN
        raise AtprobeError(f"label noise rate must be in [0, 1], got {rate!r}")
    return r


def _check_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise AtprobeError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise AtprobeError(f"{what} must be an integer, got {value!r}") from None


def _cpu_generator(seed: int) -> torch.Generator:
    # Local CPU generator: results independent of the global RNG and identical on
    # every machine/device (CUDA generators produce different streams).
    return torch.Generator(device="cpu").manual_seed(_check_int(seed, "seed"))


def symmetric_label_noise(y: torch.Tensor, rate: float, num_classes: int, seed: int) -> torch.Tensor:
    """Partially corrupted labels (Zhang et al. 2017, "Understanding deep learning
    requires rethinking generalization").

    Exactly ``round(rate * N)`` samples (Python rounding, half to even), chosen by a
    seeded permutation, get a label drawn uniformly from *all* ``num_classes`` classes.
    A resampled label equals the old one with probability ``1/num_classes``, so the
    expected fraction of labels that actually change is ``rate * (1 - 1/num_classes)``;
    ``rate=1`` gives completely random labels.

    Args:
        y: int ``(N,)`` clean labels (any device; the result is on the same device).
        rate: fraction in [0, 1] of samples whose label is resampled.
        num_classes: number of classes to draw from.
        seed: the corruption is a pure function of ``(y, rate, num_classes, seed)``.

    Returns:
        int64 ``(N,)`` labels.
    """
    r = _check_rate(rate)
    c = _check_int(num_classes, "num_classes")
    if c < 1:
        raise AtprobeError(f"num_classes must be >= 1, got {c}")
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    if y.ndim != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise AtprobeError(f"labels must be an integer vector, got {y.dtype} {tuple(y.shape)}")
    n = y.shape[0]
    k = int(round(r * n))
    g = _cpu_generator(seed)
    # Draw on the CPU (see _cpu_generator), then apply on y's device.
    rows = torch.randperm(n, generator=g)[:k]
    new = torch.randint(0, c, (k,), generator=g, dtype=torch.int64)
    out = y.to(torch.int64, copy=True)
    out[rows.to(out.device)] = new.to(out.device)
    return out


def validation_split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random partition of ``range(n)`` into ``(train_rows, val_rows)``.

    ``val_rows`` are the first ``val_size`` entries of a seeded permutation, the rest are
    train rows; both are returned sorted (int64, CPU) so carved splits keep data order.
    """
    n = _check_int(n, "n")
    val_size = _check_int(val_size, "val_size")
    if val_size < 0 or (val_size > 0 and val_size >= n):
        raise AtprobeError(f"val_size must be in [0, {n}) for a train split of {n} samples, got {val_size}")
    perm = torch.randperm(n, generator=_cpu_generator(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


# --------------------------------------------------------------------------------------
# Parsers for the published archives
# --------------------------------------------------------------------------------------

# Globals a CIFAR pickle may reference: numpy array reconstruction, and _codecs.encode
# which Python 3 emits for bytes in protocol-2 pickles. Anything else is refused, so a
# foreign or malicious "batch" file cannot run code when we load it.
_PICKLE_ALLOWED = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _text(v: Any) -> Any:
    return v.decode("latin1") if isinstance(v, bytes) else v


def _load_pickle(path: pathlib.Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (accepts bytes- or str-keyed files)."""
    try:
        with open(path, "rb") as f:
            # encoding="bytes" is what the CIFAR page prescribes for Python-2 pickles.
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise AtprobeError(f"missing file {path}") from None
    except OSError as e:
        raise AtprobeError(f"cannot read {path}: {e}") from e
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a foreign/corrupt file
        raise AtprobeError(f"cannot read {path}: not a CIFAR pickle ({e})") from e
    if not isinstance(obj, dict):
        raise AtprobeError(f"cannot read {path}: expected a pickled dict, got {type(obj).__name__}")
    return {_text(k): v for k, v in obj.items()}


def _cifar_batch(path: pathlib.Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _load_pickle(path)
    if "data" not in d or label_key not in d:
        raise AtprobeError(f"{path}: not a CIFAR batch (needs 'data' and '{label_key}' entries)")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise AtprobeError(f"{path}: 'data' must be a uint8 (N, 3072) array, got {got}")
    try:
        labels = np.asarray(d[label_key], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise AtprobeError(f"{path}: '{label_key}' is not a list of integers") from e
    if labels.shape != (data.shape[0],):
        raise AtprobeError(f"{path}: {data.shape[0]} images but '{label_key}' has shape {labels.shape}")
    # Rows are 1024 R, 1024 G, 1024 B values of a row-major 32x32 image -> (N, 3, 32, 32).
    return data.reshape(-1, 3, 32, 32), labels


def _class_names(path: pathlib.Path, key: str, num_classes: int) -> tuple[str, ...]:
    meta = _load_pickle(path)
    names = meta.get(key)
    if not isinstance(names, (list, tuple)) or len(names) != num_classes:
        raise AtprobeError(f"{path}: expected {num_classes} entries in '{key}'")
    return tuple(str(_text(n)) for n in names)


def _cifar_split(files: Sequence[pathlib.Path], label_key: str, num_classes: int) -> Split:
    parts = [_cifar_batch(p, label_key) for p in files]
    x = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    y = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise AtprobeError(
            f"{files[0].parent}: labels must be in 0..{num_classes - 1}, got {y.min()}..{y.max()}"
        )
    return _make_split(_np_to_tensor(x), _np_to_tensor(y))


def _parse_cifar10(folder: pathlib.Path) -> tuple[Split, Split, tuple[str, ...]]:
    train = _cifar_split([folder / f"data_batch_{i}" for i in range(1, 6)], "labels", 10)
    test = _cifar_split([folder / "test_batch"], "labels", 10)
    return train, test, _class_names(folder / "batches.meta", "label_names", 10)


def _parse_cifar100(folder: pathlib.Path) -> tuple[Split, Split, tuple[str, ...]]:
    train = _cifar_split([folder / "train"], "fine_labels", 100)
    test = _cifar_split([folder / "test"], "fine_labels", 100)
    return train, test, _class_names(folder / "meta", "fine_label_names", 100)


def _read_svhn_mat(path: pathlib.Path) -> Split:
    import scipy.io  # local: scipy import is slow and only SVHN needs it

    try:
        m = scipy.io.loadmat(path, variable_names=["X", "y"])
    except FileNotFoundError:
        raise AtprobeError(f"missing file {path}") from None
    except Exception as e:  # noqa: BLE001 - scipy raises many types for foreign files
        raise AtprobeError(f"cannot read SVHN file {path}: {e}") from e
    x, y = m.get("X"), m.get("y")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else "nothing"
        raise AtprobeError(f"{path}: 'X' must be uint8 (32, 32, 3, N), got {got}")
    n = x.shape[3]
    if not isinstance(y, np.ndarray) or y.size != n or (y.ndim == 2 and y.shape[1] != 1) or y.ndim > 2:
        got = y.shape if isinstance(y, np.ndarray) else "nothing"
        raise AtprobeError(f"{path}: 'y' must have shape ({n}, 1), got {got}")
    y = y.reshape(-1)
    if n and (not np.all(np.mod(y, 1) == 0) or y.min() < 1 or y.max() > 10):
        raise AtprobeError(f"{path}: SVHN labels must be integers in 1..10")
    # The .mat files label digit 0 as 10.
    labels = y.astype(np.int64) % 10
    return _make_split(_np_to_tensor(x.transpose(3, 2, 0, 1)), _np_to_tensor(labels))


def _parse_svhn(folder: pathlib.Path) -> tuple[Split, Split, tuple[str, ...]]:
    train = _read_svhn_mat(folder / "train_32x32.mat")
    test = _read_svhn_mat(folder / "test_32x32.mat")
    return train, test, tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class _Layout:
    subdirs: tuple[str, ...]  # candidate folders relative to data_dir, first = where downloads land
    files: tuple[str, ...]
    parse: Callable[[pathlib.Path], tuple[Split, Split, tuple[str, ...]]]
    size: str


_LAYOUTS: dict[str, _Layout] = {
    "cifar10": _Layout(
        ("cifar-10-batches-py", ""),
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
        _parse_cifar10,
        "163 MB",
    ),
    "cifar100": _Layout(("cifar-100-python", ""), ("train", "test", "meta"), _parse_cifar100, "161 MB"),
    # torchvision puts the .mat files directly in its root; also accept a svhn/ subfolder.
    "svhn": _Layout(("", "svhn"), ("train_32x32.mat", "test_32x32.mat"), _parse_svhn, "246 MB"),
}


def _locate(key: str, root: pathlib.Path) -> pathlib.Path | None:
    """The first candidate folder holding every file of the dataset, else None."""
    for sub in _LAYOUTS[key].subdirs:
        folder = root / sub if sub else root
        if all((folder / f).is_file() for f in _LAYOUTS[key].files):
            return folder
    return None


def _missing_error(key: str, root: pathlib.Path) -> AtprobeError:
    layout = _LAYOUTS[key]
    folders = " or ".join(str(root / s) if s else str(root) for s in layout.subdirs)
    return AtprobeError(
        f"{_PRETTY[key]} not found: looked for {', '.join(layout.files)} in {folders}; "
        f"pass --download (download=True) to fetch it ({layout.size}), "
        f"or point data_dir / ATPROBE_DATA_DIR at an existing copy"
    )


# --------------------------------------------------------------------------------------
# User .npz files
# --------------------------------------------------------------------------------------


def _npz_images(x: np.ndarray, where: str) -> torch.Tensor:
    if x.ndim != 4:
        raise AtprobeError(f"{where}: x must be 4-D (uint8 N,H,W,C or float N,C,H,W), got shape {x.shape}")
    if x.shape[0] == 0:
        raise AtprobeError(f"{where}: x holds no images")
    if x.dtype == np.uint8:
        if x.shape[3] not in (1, 3):
            raise AtprobeError(
                f"{where}: uint8 x must be NHWC (N, H, W, C) with C = 1 or 3, got shape {x.shape}"
            )
        return _np_to_tensor(x.transpose(0, 3, 1, 2))
    if x.dtype.kind == "f":
        if x.shape[1] not in (1, 3):
            raise AtprobeError(
                f"{where}: float x must be NCHW (N, C, H, W) with C = 1 or 3, got shape {x.shape}"
            )
        if not np.isfinite(x).all():
            raise AtprobeError(f"{where}: float x contains NaN or inf")
        lo, hi = x.min(), x.max()
        if lo < 0 or hi > 1:
            raise AtprobeError(f"{where}: float x must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
        return _np_to_tensor(x.astype(np.float32, copy=False))
    raise AtprobeError(
        f"{where}: x has dtype {x.dtype}; expected uint8 (N, H, W, C) or float (N, C, H, W) in [0, 1]"
    )


def _npz_labels(y: np.ndarray, n: int, where: str) -> torch.Tensor:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise AtprobeError(f"{where}: y must be an integer vector, got {y.dtype} {y.shape}")
    if y.shape[0] != n:
        raise AtprobeError(f"{where}: {n} images but {y.shape[0]} labels")
    if y.min() < 0:
        raise AtprobeError(f"{where}: labels must be >= 0, got {y.min()}")
    return _np_to_tensor(y.astype(np.int64))


def _npz_split(arrays: Any, xk: str, yk: str, source: pathlib.Path) -> Split:
    if xk not in arrays or yk not in arrays:
        found = ", ".join(arrays.files) or "none"
        raise AtprobeError(f"{source}: needs arrays '{xk}' and '{yk}', found {found}")
    x = _npz_images(arrays[xk], f"{source.name}:{xk}")
    y = _npz_labels(arrays[yk], x.shape[0], f"{source.name}:{yk}")
    return _make_split(x, y)


def _open_npz(path: pathlib.Path) -> Any:
    try:
        arrays = np.load(path, allow_pickle=False)  # never unpickle user files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise AtprobeError(f"cannot read {path}: not an .npz archive ({e})") from e
    if not hasattr(arrays, "files"):
        raise AtprobeError(f"cannot read {path}: a single .npy array, expected an .npz archive")
    return arrays


def _load_npz(data_dir: str | os.PathLike[str] | None) -> tuple[Split, Split]:
    if data_dir is None:
        raise AtprobeError("the npz dataset needs data_dir: a .npz file or a folder with train.npz/test.npz")
    path = pathlib.Path(data_dir).expanduser()
    try:
        if path.is_dir():
            tr, te = path / "train.npz", path / "test.npz"
            if not tr.is_file() and not te.is_file():
                raise AtprobeError(f"no train.npz or test.npz in {path}")
            splits = []
            for f in (tr, te):
                if f.is_file():
                    with _open_npz(f) as arrays:
                        splits.append(_npz_split(arrays, "x", "y", f))
                else:
                    splits.append(None)
            train, test = splits
            # A folder with only one file: that file serves as both splits.
            train, test = (train or test), (test or train)
        elif path.is_file():
            with _open_npz(path) as arrays:
                train = _npz_split(arrays, "x", "y", path)
                has_xt, has_yt = "x_test" in arrays, "y_test" in arrays
                if has_xt != has_yt:
                    raise AtprobeError(f"{path}: has {'x_test' if has_xt else 'y_test'} without its partner")
                test = _npz_split(arrays, "x_test", "y_test", path) if has_xt else train
        else:
            raise AtprobeError(f"npz data not found: {path} is neither a .npz file nor a folder")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:  # lazily read members
        raise AtprobeError(f"cannot read npz data at {path}: {e}") from e
    assert train is not None and test is not None
    if train.x.shape[1:] != test.x.shape[1:] or train.x.dtype != test.x.dtype:
        raise AtprobeError(
            f"{path}: train and test images differ: {train.x.dtype} {tuple(train.x.shape[1:])} vs "
            f"{test.x.dtype} {tuple(test.x.shape[1:])}"
        )
    return train, test


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


# --------------------------------------------------------------------------------------
# Synthetic dataset
# --------------------------------------------------------------------------------------

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
    seed = _check_int(seed, "synthetic seed")
    if seed < 0:
        raise AtprobeError(f"synthetic seed must be >= 0, got {seed}")
    n_train, n_test = _check_int(n_train, "n_train"), _check_int(n_test, "n_test")
    num_classes = _check_int(num_classes, "num_classes")
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
    return _make_split(x_tr, y_tr), _make_split(x_te, y_te)


# --------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    """One published file: where to get it, what to call it, its MD5, whether to untar it."""

    url: str
    filename: str
    md5: str
    extract: bool = False


#: Published sources. Tests (or mirrors) may substitute entries: ``SOURCES["cifar10"] = (...)``.
SOURCES: dict[str, tuple[Resource, ...]] = {
    "cifar10": (
        Resource(
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
            extract=True,
        ),
    ),
    "cifar100": (
        Resource(
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            "cifar-100-python.tar.gz",
            "eb9058c3a382ffc7106e4002c42a8d85",
            extract=True,
        ),
    ),
    "svhn": (
        Resource(
            "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
            "train_32x32.mat",
            "e26dedcc434d2e4c54c9b2d4a06d8373",
        ),
        Resource(
            "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
            "test_32x32.mat",
            "eb5a983be6a315427106f1b164d9cef3",
        ),
    ),
}

Fetcher = Callable[[str, int], IO[bytes]]


def _open_url(url: str, offset: int) -> IO[bytes]:
    """Default fetcher: a binary stream of ``url`` from byte ``offset`` (if the server agrees)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        # urllib ignores Range for file:// URLs, so open and seek ourselves.
        f = open(urllib.request.url2pathname(parts.path), "rb")  # noqa: SIM115 - caller closes
        f.seek(offset)
        return f
    req = urllib.request.Request(url, headers={"User-Agent": f"atprobe/{__version__}"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(req, timeout=60)  # noqa: S310 - URLs come from SOURCES


def _stream_start(stream: Any, requested: int) -> int | None:
    """Byte offset at which ``stream`` starts, or None if unknown.

    HTTP: 206 + Content-Range says where; 200 means the server ignored Range and sends
    everything. Streams without a status (files, custom fetchers) honour the offset.
    """
    if requested == 0:
        return 0
    status = getattr(stream, "status", None) or getattr(stream, "code", None)
    if status is None:
        return requested
    if status == 200:
        return 0
    if status == 206:
        headers = getattr(stream, "headers", None)
        content_range = headers.get("Content-Range", "") if headers is not None else ""
        try:  # "bytes START-END/TOTAL"
            return int(content_range.split()[1].split("-")[0])
        except (IndexError, ValueError):
            return None
    return None


def _md5_file(path: pathlib.Path, h: Any | None = None, chunk_size: int = 1 << 20) -> Any:
    h = hashlib.md5() if h is None else h  # noqa: S324 - integrity check against published MD5s
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h


def fetch_url(
    url: str,
    dest: str | os.PathLike[str],
    md5: str,
    *,
    fetch: Fetcher | None = None,
    chunk_size: int = 1 << 20,
) -> pathlib.Path:
    """Download ``url`` to ``dest``, resuming a partial download and verifying ``md5``.

    Data is streamed to ``dest + ".part"``; an existing part file is resumed (HTTP
    ``Range``; ``file://`` seeks), and if the server ignores the range the download
    restarts cleanly. Only after the MD5 matches is the part file renamed into place
    (atomically), so ``dest`` is either absent or complete. On an MD5 mismatch the part
    file is deleted (after one clean retry if the bad data came from a resumed part) and
    :class:`AtprobeError` is raised. If ``dest`` already exists with the right MD5 nothing
    is fetched.

    Args:
        url: http(s) or file URL.
        dest: final path of the file.
        md5: expected hex digest.
        fetch: ``(url, offset) -> binary file-like`` opener (tests inject their own);
            default uses urllib. A returned object without a ``status`` attribute is
            assumed to start at ``offset``; an HTTP-like ``status`` of 200 means "from 0".
        chunk_size: bytes per read.
    """
    dest = pathlib.Path(dest)
    md5 = md5.lower()
    if chunk_size < 1:
        raise AtprobeError(f"chunk_size must be >= 1, got {chunk_size}")
    if dest.is_file() and _md5_file(dest).hexdigest() == md5:
        return dest
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AtprobeError(f"cannot create {dest.parent}: {e}") from e
    opener = fetch if fetch is not None else _open_url

    for attempt in range(2):
        offset = part.stat().st_size if part.is_file() else 0
        digest = _download_part(url, part, offset, opener, chunk_size)
        if digest == md5:
            os.replace(part, dest)  # atomic: dest never holds a partial file
            log.info("downloaded %s to %s (md5 ok)", url, dest)
            return dest
        part.unlink(missing_ok=True)
        if offset == 0 or attempt == 1:
            break
        # The resumed prefix may have been stale: try once more from scratch.
        log.warning("md5 mismatch after resuming %s at %d bytes; restarting", url, offset)
    raise AtprobeError(f"MD5 mismatch for {url}: expected {md5}, got {digest}; deleted {part}")


def _open_stream(opener: Fetcher, url: str, offset: int) -> IO[bytes]:
    try:
        return opener(url, offset)
    except urllib.error.HTTPError:
        raise  # the caller interprets status codes (416 on resume)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise AtprobeError(f"cannot download {url}: {reason}") from e


def _download_part(url: str, part: pathlib.Path, offset: int, opener: Fetcher, chunk_size: int) -> str:
    """Fetch ``url`` into ``part`` starting at ``offset``; return the MD5 of the whole part file."""
    try:
        stream = _open_stream(opener, url, offset)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset > 0:
            # Range starts at/after the end: the part file is (probably) already complete.
            return _md5_file(part).hexdigest()
        raise AtprobeError(f"cannot download {url}: HTTP {e.code} {e.reason}") from e
    start = _stream_start(stream, offset)
    if start not in (0, offset):
        # Unknown or odd starting point: discard the part file and start over.
        stream.close()
        try:
            stream = _open_stream(opener, url, 0)
        except urllib.error.HTTPError as e:
            raise AtprobeError(f"cannot download {url}: HTTP {e.code} {e.reason}") from e
        start = 0
    if start:
        log.info("resuming %s at byte %d", url, start)
    h = _md5_file(part) if start else hashlib.md5()  # noqa: S324
    try:
        with closing(stream), open(part, "ab" if start else "wb") as f:
            while chunk := stream.read(chunk_size):
                f.write(chunk)
                h.update(chunk)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, urllib.error.URLError, ValueError) as e:
        done = part.stat().st_size if part.is_file() else 0
        raise AtprobeError(
            f"download of {url} interrupted after {done} bytes ({e}); run again to resume"
        ) from e
    return h.hexdigest()


def _safe_members(tf: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Fallback for Pythons without tarfile filters: plain files/dirs inside the target only."""
    members = []
    for m in tf.getmembers():
        p = pathlib.PurePosixPath(m.name)
        if p.is_absolute() or ".." in p.parts or not (m.isfile() or m.isdir()):
            raise AtprobeError(f"refusing to extract {m.name!r}: unsafe archive member")
        members.append(m)
    return members


def _extract_tar(archive: pathlib.Path, dest_dir: pathlib.Path) -> None:
    """Extract ``archive`` into ``dest_dir`` safely and (per top-level entry) atomically.

    Members are unpacked into a temporary folder first, so an interrupted extraction
    never leaves a truncated file where a loader would find it; top-level entries then
    replace whatever was at their names.
    """
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_dir))
    try:
        with tarfile.open(archive, "r:*") as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, filter="data")  # refuses traversal, links out, devices
            else:  # pragma: no cover - Python < 3.10.12
                tf.extractall(tmp, members=_safe_members(tf))
        for entry in tmp.iterdir():
            target = dest_dir / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(entry, target)
    except getattr(tarfile, "FilterError", ()) as e:
        raise AtprobeError(f"refusing to extract {archive}: {e}") from e
    except (tarfile.TarError, OSError, EOFError) as e:
        raise AtprobeError(f"cannot extract {archive}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    fetch: Fetcher | None = None,
    sources: Sequence[Resource] | None = None,
) -> pathlib.Path:
    """Make sure ``name`` (cifar10, cifar100 or svhn) is present under ``data_dir``.

    Returns the folder the parser reads (e.g. ``data_dir/cifar-10-batches-py``). A complete
    existing copy (torchvision layout) is used as is, without any network access;
    otherwise each file in ``sources`` (default ``SOURCES[name]``) is fetched with
    :func:`fetch_url` (resume + MD5) and archives are extracted into ``data_dir``.
    Archives are kept next to the data so a re-extraction needs no download.
    """
    key = _check_name(name)
    if key not in _LAYOUTS:
        raise AtprobeError(f"dataset {key!r} cannot be downloaded (only {', '.join(_LAYOUTS)})")
    root = _resolve_dir(data_dir)
    found = _locate(key, root)
    if found is not None:
        return found
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AtprobeError(f"cannot create data folder {root}: {e}") from e
    for res in SOURCES[key] if sources is None else sources:
        path = fetch_url(res.url, root / res.filename, res.md5, fetch=fetch)
        if res.extract:
            _extract_tar(path, root)
    found = _locate(key, root)
    if found is None:
        raise AtprobeError(
            f"downloaded {_PRETTY[key]} but {', '.join(_LAYOUTS[key].files)} are still missing under {root}"
        )
    return found


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


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
    key = _check_name(name)
    label_noise = _check_rate(label_noise)  # fail fast, before reading any data
    val_size = _check_int(val_size, "val_size")
    if key == "synthetic":
        train, test = make_synthetic(seed=synthetic_seed)
        num_classes = 10
        class_names = tuple(f"class{i}" for i in range(num_classes))
        mean, std = _channel_stats(train.x)
    elif key == "npz":
        train, test = _load_npz(data_dir)
        num_classes = int(max(train.true_y.max(), test.true_y.max())) + 1
        class_names = tuple(str(i) for i in range(num_classes))
        mean, std = _channel_stats(train.x)
    else:
        root = _resolve_dir(data_dir)
        folder = _locate(key, root)
        if folder is None:
            if not download:
                raise _missing_error(key, root)
            folder = download_dataset(key, root)
        train, test, class_names = _LAYOUTS[key].parse(folder)
        num_classes = len(class_names)
        mean, std = _PUBLISHED_STATS[key]

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


# --------------------------------------------------------------------------------------
# Device-resident batches and augmentation
# --------------------------------------------------------------------------------------


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise AtprobeError(
            f"generator is on {generator.device} but the data is on {device}; "
            f"use torch.Generator(device={str(device)!r})"
        )


def _draw_crop_flip(
    n: int, padding: int, generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample crop offsets ``(n, 2)`` in [0, 2*padding] (row, col) and flips ``(n,)``."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=device)
    flips = torch.rand(n, generator=generator, device=device) < 0.5
    return offsets, flips


def _crop_flip_with(
    x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int
) -> torch.Tensor:
    """Crop each zero-padded image at its offset, then mirror it where ``flips`` is set.

    ``out[i, :, r, c] = pad(x)[i, :, offsets[i, 0] + r, offsets[i, 1] + c']`` with
    ``c' = W - 1 - c`` for flipped samples: one vectorised gather, no per-sample loop.
    """
    n, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding)) if padding else x
    dev = x.device
    cols = torch.arange(w, device=dev)
    cols = torch.where(flips[:, None], (w - 1) - cols, cols) + offsets[:, 1:2]  # (n, w)
    rows = torch.arange(h, device=dev) + offsets[:, 0:1]  # (n, h)
    b = torch.arange(n, device=dev)[:, None, None, None]
    ch = torch.arange(c, device=dev)[None, :, None, None]
    return xp[b, ch, rows[:, None, :, None], cols[:, None, None, :]]


def random_crop_flip(
    x: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4
) -> torch.Tensor:
    """Standard CIFAR augmentation for a batch, on its device.

    Equivalent to torchvision ``RandomCrop(H, padding=padding)`` (zero fill) followed by
    ``RandomHorizontalFlip(0.5)`` per sample. ``generator`` must be on ``x``'s device.
    Works for uint8 or float images; the output has the input's dtype and shape.
    """
    padding = _check_int(padding, "padding")
    if padding < 0:
        raise AtprobeError(f"padding must be >= 0, got {padding}")
    if x.ndim != 4:
        raise AtprobeError(f"random_crop_flip expects (B, C, H, W) images, got shape {tuple(x.shape)}")
    _check_generator(generator, x.device)
    offsets, flips = _draw_crop_flip(x.shape[0], padding, generator, x.device)
    return _crop_flip_with(x, offsets, flips, padding)


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool = False,
    augment: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    channels_last: bool = False,
) -> Iterator[Batch]:
    """Mini-batches of a split that already lives on the target device.

    Each epoch (one call) visits every sample once (the last partial batch is dropped
    if ``drop_last``). Batches are slices (or, with ``shuffle``, gathers through a
    device-side ``randperm``) converted to float32 in [0, 1] on the device, optionally
    augmented with :func:`random_crop_flip` and laid out channels-last. No per-sample
    Python work and no host synchronisation happen inside the loop.

    Args:
        split: the data, already ``split.to(device)``.
        batch_size: samples per batch.
        shuffle: random order (``torch.randperm`` on the split's device).
        augment: random crop (padding 4) + horizontal flip.
        generator: RNG for the permutation and augmentation, on the split's device;
            ``None`` uses the device's global RNG.
        drop_last: skip a final batch smaller than ``batch_size``.
        channels_last: return ``x`` in ``torch.channels_last`` memory format.
    """
    # Validate eagerly (a generator function would only fail at the first next()).
    batch_size = _check_int(batch_size, "batch_size")
    if batch_size < 1:
        raise AtprobeError(f"batch_size must be >= 1, got {batch_size}")
    _check_generator(generator, split.x.device)
    return _batches(split, batch_size, shuffle, augment, generator, drop_last, channels_last)


def _batches(
    split: Split,
    batch_size: int,
    shuffle: bool,
    augment: bool,
    generator: torch.Generator | None,
    drop_last: bool,
    channels_last: bool,
) -> Iterator[Batch]:
    n = len(split)
    order = torch.randperm(n, generator=generator, device=split.x.device) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        if order is None:
            # Slices are views: copy labels so callers can never write into the split.
            x = split.x[start:end]
            y, true_y, index = (t[start:end].clone() for t in (split.y, split.true_y, split.index))
        else:
            rows = order[start:end]
            x = split.x.index_select(0, rows)
            y, true_y, index = (t.index_select(0, rows) for t in (split.y, split.true_y, split.index))
        if augment:  # crop before converting: uint8 moves 4x fewer bytes
            x = random_crop_flip(x, generator)
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div_(255)
        elif order is None and not augment:
            x = x.clone()  # a float32 slice is a view of the split: never hand that out
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield Batch(x=x, y=y, true_y=true_y, index=index)
