"""Where a command may write: the one output rule, checked before any work starts.

Every command names what it reads (checkpoint files, run directories, CSVs, the dataset)
and every path it will write (the main table, its siblings such as ``OUTPUT.samples.csv``,
each ``.meta.json``; a figure; a folder of them; a run directory) before it computes
anything, and :func:`check_outputs` refuses with one line (docs/checkpoints.md#outputs):

* an empty path, or one that names no file (``.``, ``..``);
* an output that is an existing directory, or whose nearest existing parent is a file;
* a location that cannot be written (no permission, a read-only file system): tested by
  ``os.access`` and by opening an unnamed temporary file there, which leaves nothing behind;
* an output that is one of the inputs (the same file after symlinks, or the same inode);
* an output inside a directory being read: a directory given as an input, or the run
  directory (:func:`is_run_directory`) holding an input file — any file of it, not only
  the ones the command reads;
* two outputs of one command that are the same file.

An existing output that is none of these is replaced (atomically, ``atprobe.io``), as
any command-line tool replaces its output file. Directories that must be new or empty
(``atprobe train --out``, ``atprobe demo --out``) are checked by :func:`check_new_directory`;
``atprobe train --overwrite`` replaces a run only once the new one is complete
(:func:`replace_directory`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from atprobe.errors import AtprobeError
from atprobe.io import meta_path

__all__ = ["ASIDE_SUFFIX", "EPOCH_FILE", "check_new_directory", "check_outputs", "inside", "is_run_directory",
           "named_path", "replace_directory", "sibling", "table_files"]

Input = str | os.PathLike | None

#: :func:`replace_directory` renames the folder it replaces to its name + this suffix, then deletes it.
ASIDE_SUFFIX = ".replaced"

#: The name of a run's per-epoch checkpoints (``epoch_0010.pt``).
EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


def is_run_directory(path: str | os.PathLike) -> bool:
    """An ``atprobe train`` run directory: a folder with ``config.json`` or ``epoch_*.pt`` files."""
    path = Path(path)
    return path.is_dir() and ((path / "config.json").is_file()
                              or any(EPOCH_FILE.match(p.name) for p in path.glob("epoch_*.pt")))


def named_path(output: str | os.PathLike, option: str, *, folder: bool = False) -> Path:
    """``output`` as a path; a one-line error if it is empty (or, for a file, names a folder)."""
    text = os.fspath(output)
    if not text.strip():
        raise AtprobeError(f"{option}: the path is empty: give a {'folder' if folder else 'file'} name")
    path = Path(text)
    if not folder and path.name in ("", ".", ".."):
        raise AtprobeError(f"{option} {text}: names a folder, not a file: give a file name")
    return path


def sibling(output: str | os.PathLike, suffix: str) -> Path:
    """The sibling table ``suffix`` of ``output``: its stem + suffix + ``.csv``
    (``eval.csv``, ``.samples`` -> ``eval.samples.csv``)."""
    path = Path(output)
    return path.with_name(path.stem + suffix + ".csv")


def table_files(output: str | os.PathLike, suffixes: Iterable[str] = (), *, option: str = "-o") -> list[Path]:
    """Every file a command writing ``output`` with sibling tables ``suffixes`` writes:
    ``output``, its ``.meta.json``, and each sibling with its ``.meta.json``."""
    main = named_path(output, option)
    files = [main, meta_path(main)]
    for suffix in suffixes:
        files += [sibling(main, suffix), meta_path(sibling(main, suffix))]
    return files


def _inputs(inputs: Iterable[Input]) -> tuple[list[Path], list[Path]]:
    """The files and the directories read: a directory input is read whole; a file inside a
    run directory makes that run directory read too."""
    files: list[Path] = []
    dirs: list[Path] = []
    for item in inputs:
        if item is None or not os.fspath(item):
            continue
        path = Path(item)
        if path.is_dir():
            dirs.append(path)
        else:
            files.append(path)
            if is_run_directory(path.parent):
                dirs.append(path.parent)
    return files, dirs


def _writable(folder: Path) -> bool:
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:  # root passes os.access everywhere; a read-only mount or /proc does not pass this
        with tempfile.TemporaryFile(dir=folder):  # O_TMPFILE on Linux: no name is ever created
            pass
    except OSError:
        return False
    return True


def _location(path: Path, option: str, *, directory: bool = False) -> None:
    """``path`` can be created where it is: not an existing directory (for a file), its
    nearest existing parent a writable folder."""
    if not directory and path.is_dir():
        raise AtprobeError(f"{path}: is a directory: give {option} a file name")
    if directory and path.exists() and not path.is_dir():
        raise AtprobeError(f"{path}: is a file, not a folder: choose another {option}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise AtprobeError(f"{path}: {parent} is a file, not a folder: choose another {option}")
    if not _writable(parent):
        raise AtprobeError(f"{path}: cannot write in {parent} (no permission or a read-only file system): "
                           f"choose another {option}")


def _same(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """``path`` is ``folder`` or lies under it (after symlinks)."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def check_outputs(outputs: Sequence[str | os.PathLike], inputs: Iterable[Input] = (), *,
                  option: str = "-o", directories: Sequence[str | os.PathLike] = ()) -> None:
    """The output rule (module docstring): a one-line ``AtprobeError`` for the first of
    ``outputs`` (files; ``directories``: folders it will create or fill) that cannot be
    written or would replace one of ``inputs`` or land inside a directory being read.
    ``option`` names the option in the messages (``-o``, ``--out``)."""
    files, dirs = _inputs(inputs)
    targets = [(named_path(p, option, folder=True), True) for p in directories]
    targets += [(named_path(p, option), False) for p in outputs]
    seen: dict[str, Path] = {}
    for path, is_dir in targets:
        _location(path, option, directory=is_dir)
        for f in files:
            if _same(path, f):
                raise AtprobeError(f"{path}: the output would replace an input of this command ({f}); "
                                   f"choose another {option}")
        for d in dirs:
            if inside(path, d):
                what = "run directory" if is_run_directory(d) else "folder"
                raise AtprobeError(f"{path}: the output would land inside {d}, a {what} this command reads; "
                                   f"choose another {option} outside it")
        if is_dir:
            continue
        key = os.path.realpath(path)
        if key in seen:
            raise AtprobeError(f"{path}: two outputs of this command are the same file ({seen[key]}); "
                               f"choose another {option}")
        seen[key] = path


def check_new_directory(path: str | os.PathLike, inputs: Iterable[Input] = (), *, option: str = "--out",
                        hint: str = "give a new or empty folder") -> Path:
    """``path`` is a folder a command fills from scratch: it does not exist or is empty
    (else a one-line error ending in ``hint``), and the output rule holds for it."""
    path = named_path(path, option, folder=True)
    check_outputs((), inputs, option=option, directories=[path])
    if path.is_dir() and any(path.iterdir()):
        raise AtprobeError(f"{path} already exists and is not an empty folder: {hint}")
    return path


def replace_directory(new: Path, old: Path) -> None:
    """Put the complete folder ``new`` in the place of ``old`` (same parent, so same file
    system): ``old`` is renamed aside to ``OLD.replaced``, ``new`` renamed in, then the
    old one deleted. Until the first rename ``old`` is untouched."""
    aside = old.with_name(old.name + ASIDE_SUFFIX)
    os.replace(old, aside)
    os.replace(new, old)
    shutil.rmtree(aside)
