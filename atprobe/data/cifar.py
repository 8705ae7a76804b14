"""Parser of the CIFAR-10/100 "python version" pickles, through an unpickler that only
rebuilds numpy arrays (a foreign or malicious batch file cannot run code)."""

from __future__ import annotations

import pathlib
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np

from atprobe.data.types import Split, make_split, np_to_tensor
from atprobe.errors import AtprobeError

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
    return make_split(np_to_tensor(x), np_to_tensor(y))


def parse_cifar10(folder: pathlib.Path) -> tuple[Split, Split, tuple[str, ...]]:
    train = _cifar_split([folder / f"data_batch_{i}" for i in range(1, 6)], "labels", 10)
    test = _cifar_split([folder / "test_batch"], "labels", 10)
    return train, test, _class_names(folder / "batches.meta", "label_names", 10)


def parse_cifar100(folder: pathlib.Path) -> tuple[Split, Split, tuple[str, ...]]:
    train = _cifar_split([folder / "train"], "fine_labels", 100)
    test = _cifar_split([folder / "test"], "fine_labels", 100)
    return train, test, _class_names(folder / "meta", "fine_label_names", 100)
