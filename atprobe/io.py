"""Writing tables: atomic CSVs with a ``.meta.json`` beside each.

The meta file records what made the table (command line, versions, seed, device,
checkpoint hashes) so a CSV found months later can be traced and re-made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd

from atprobe.errors import AtprobeError


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, fsync, then rename it into place:
    readers see the old file or the whole new one, never a half-written one."""
    return atomic_write_all({Path(path): write})[0]


def atomic_write_all(files: Mapping[Path, Callable[[BinaryIO], None]]) -> list[Path]:
    """Write several files as one: every ``write(f)`` goes to a temp file beside its path
    (fsynced) first, and only when all of them are complete are they renamed into place, in
    order. A write that fails (a full disk, an interrupt) removes every temp file and leaves
    every old file as it was: nothing of the set is written, not even its first files."""
    temps: list[tuple[str, Path]] = []
    current: Path | str = ""
    try:
        for path, write in files.items():
            path = current = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append((tmp, path))
            # mkstemp creates the file 0600; give it the permissions a plain open() would.
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException as exc:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
            raise AtprobeError(f"cannot write {current}: {exc.strerror} (a full disk, a quota or a file-size limit): "
                               "free some space or write elsewhere; nothing was written") from None
        raise
    return [path for _, path in temps]


#: The errors of a write that does not fit: a full disk, a quota, a file-size limit (RLIMIT_FSIZE).
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore at once
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def meta_path(csv_path: str | os.PathLike) -> Path:
    """``out/eval.csv`` -> ``out/eval.meta.json``."""
    p = Path(csv_path)
    return p.with_name(p.stem + ".meta.json") if p.suffix else p.with_name(p.name + ".meta.json")


def versions() -> dict[str, str]:
    import numpy
    import torch

    import atprobe

    out = {
        "atprobe": atprobe.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pandas": pd.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def run_meta(
    *,
    seed: int | None,
    checkpoints: Iterable[Any] = (),
    config: Mapping[str, Any] | None = None,
    argv: list[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``.meta.json`` record. ``checkpoints`` are ``atprobe.checkpoint.Checkpoint``s."""
    return {
        "command": list(sys.argv if argv is None else argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "versions": versions(),
        "checkpoints": [
            {"path": str(c.path), "sha256": c.sha256, "arch": c.arch, "native": c.native,
             **({"load": dict(c.notes)} if getattr(c, "notes", None) else {})}
            for c in checkpoints
        ],
        "config": dict(config or {}),
        **dict(extra or {}),
    }


def write_table(df: pd.DataFrame, path: str | os.PathLike, meta: Mapping[str, Any]) -> Path:
    """Write ``df`` as CSV and its meta record as one (:func:`write_tables`)."""
    return write_tables([(df, path, meta)])[0]


def write_tables(tables: Iterable[tuple[pd.DataFrame, str | os.PathLike, Mapping[str, Any]]],
                 also: Mapping[str | os.PathLike, bytes] | None = None) -> list[Path]:
    """Write each ``(df, path, meta)`` as CSV with its meta record, and the files ``also``
    (path -> bytes, e.g. figures), all of them as one (:func:`atomic_write_all`): either every
    file is replaced, or none is. Each meta is renamed into place just before its CSV, so a
    CSV never exists without its record. Under ``torchrun`` only rank 0 writes (every rank
    holds the same gathered tables; the others return the paths and write nothing)."""
    from atprobe.distributed import is_main_process  # here: distributed imports the heavy torch modules

    if not is_main_process():
        return [Path(path) for _, path, _ in tables]
    files: dict[Path, Callable[[BinaryIO], None]] = {}
    paths = []
    for df, path, meta in tables:
        path = Path(path)
        record = {**meta, "rows": int(len(df)), "columns": [str(c) for c in df.columns]}
        meta_bytes = (json.dumps(record, indent=2, default=str) + "\n").encode()
        csv_bytes = df.to_csv(index=False, lineterminator="\n").encode()
        files[meta_path(path)] = lambda f, b=meta_bytes: f.write(b)
        files[path] = lambda f, b=csv_bytes: f.write(b)
        paths.append(path)
    for path, data in (also or {}).items():
        files[Path(path)] = lambda f, b=data: f.write(b)
    atomic_write_all(files)
    return paths


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def config_record(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON values (tuples as lists, nested dataclasses as dicts), for
    the ``config`` record of a ``.meta.json``."""
    if config is None:
        return {}
    if not dataclasses.is_dataclass(config):
        return dict(config)
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if dataclasses.is_dataclass(v):
            v = dataclasses.asdict(v)
        elif isinstance(v, tuple):
            v = [dataclasses.asdict(i) if dataclasses.is_dataclass(i) else i for i in v]
        out[f.name] = v
    return out
