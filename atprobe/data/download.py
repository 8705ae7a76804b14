"""Downloading published files: resumable HTTP/file fetches, MD5 verification and safe,
atomic tar extraction. Knows nothing about any particular dataset (see ``published``)."""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from typing import IO, Any

from atprobe import __version__
from atprobe.errors import AtprobeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resource:
    """One published file: where to get it, what to call it, its MD5, whether to untar it."""

    url: str
    filename: str
    md5: str
    extract: bool = False


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


def extract_tar(archive: pathlib.Path, dest_dir: pathlib.Path) -> None:
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
