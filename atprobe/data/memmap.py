"""Image arrays larger than device memory: memory-mapped ``.npy`` files and uncompressed
``.npz`` members, and the two ways their rows reach the device (resident or streamed).

A million generated 32x32 images are 3 GB as uint8: more than a small GPU should hold next
to a model. :func:`map_npy` and :func:`map_npz_member` map such an array without reading it
(``np.load(mmap_mode="r")``, or the offset of a zip STORED member's data); :func:`load_extra_data`
checks a file of generated images and labels; :func:`image_rows` chooses how its rows are
served: :class:`ResidentRows` (the whole array copied to the device once, rows gathered there)
when it fits the memory budget, else :class:`MappedRows` (rows read from the map into pinned
host buffers and copied with ``non_blocking`` on a side CUDA stream, one batch ahead). Both
return the same rows bit for bit; on the CPU the mapped path is the same code without streams.
"""

from __future__ import annotations

import os
import pathlib
import struct
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from atprobe.errors import AtprobeError

#: The array names a file of extra (generated) data may use, in order of preference:
#: ``image``/``label`` as in the released generated data (Rebuffi et al. 2021, Wang et al. 2023).
EXTRA_KEYS = (("image", "label"), ("x", "y"))
#: The share of free device memory (CUDA) or of physical memory (CPU) the resident path may
#: take when no budget is given.
AUTO_BUDGET_FRACTION = {"cuda": 0.5, "cpu": 0.25}

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # the 30-byte zip local file header
_LOCAL_MAGIC = b"PK\x03\x04"
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def map_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """A ``.npy`` file as a read-only memory map (nothing is read but its header)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise AtprobeError(f"cannot memory-map {path}: not a .npy array ({e})") from None


def map_npz_member(path: str | os.PathLike[str], name: str) -> np.ndarray:
    """Member ``name`` of an ``.npz`` archive as a read-only memory map.

    The member must be STORED (``np.savez``, not ``np.savez_compressed``): its ``.npy`` bytes
    then lie verbatim in the archive, after the zip local header (30 bytes + file name + extra
    field; the central directory's sizes are not needed, so zip64 members work) and the
    ``.npy`` header, which give the data's offset, dtype, shape and order.
    """
    path = pathlib.Path(path)
    member = name if name.endswith(".npy") else name + ".npy"
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            raise AtprobeError(f"{path}: member {member} is compressed; memory-mapping needs it stored: "
                               "decompress the archive (np.savez, not np.savez_compressed) or save the array as .npy")
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            fixed = f.read(_LOCAL_HEADER.size)
            if len(fixed) != _LOCAL_HEADER.size or fixed[:4] != _LOCAL_MAGIC:
                raise AtprobeError(f"{path}: member {member} has no zip local header at offset {info.header_offset}")
            *_, name_len, extra_len = _LOCAL_HEADER.unpack(fixed)
            start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            f.seek(start)
            version = np.lib.format.read_magic(f)
            if version not in _HEADER_READERS:
                raise AtprobeError(f"{path}: member {member} is a .npy of format {version}; save it with np.savez")
            shape, fortran, dtype = _HEADER_READERS[version](f)
            offset = f.tell()
            data_end = start + info.file_size
    except KeyError:
        raise AtprobeError(f"{path}: no array {name!r}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise AtprobeError(f"cannot memory-map {path}: not an .npz archive ({e})") from None
    if dtype.hasobject:
        raise AtprobeError(f"{path}: member {member} holds Python objects; it cannot be memory-mapped")
    if offset + dtype.itemsize * int(np.prod(shape)) > data_end:
        raise AtprobeError(f"{path}: member {member} is shorter than its .npy header says (a truncated file?)")
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _archive_names(path: pathlib.Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
    except (OSError, zipfile.BadZipFile) as e:
        raise AtprobeError(f"cannot read {path}: not an .npz archive ({e})") from None


def _map_pair(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """The (images, labels) arrays of an extra-data file: an ``.npz`` with ``image``/``label``
    (or ``x``/``y``), or a folder with ``image.npy`` and ``label.npy``."""
    if path.is_dir():
        files = {k: path / f"{k}.npy" for k in ("image", "label")}
        if not all(f.is_file() for f in files.values()):
            raise AtprobeError(f"{path}: a folder of extra data needs image.npy and label.npy")
        return map_npy(files["image"]), map_npy(files["label"])
    if not path.is_file():
        raise AtprobeError(f"extra data not found: {path}")
    names = _archive_names(path)
    for xk, yk in EXTRA_KEYS:
        if xk in names and yk in names:
            return map_npz_member(path, xk), map_npz_member(path, yk)
    wanted = " or ".join(f"'{x}'/'{y}'" for x, y in EXTRA_KEYS)
    raise AtprobeError(f"{path}: needs arrays {wanted}, found {', '.join(names) or 'none'}")


@dataclass(frozen=True)
class ExtraData:
    """Generated training images kept on disk: ``images`` a read-only ``(M, H, W, C)`` uint8
    map, ``labels`` int64 ``(M,)`` in memory (8 bytes an image), ``path`` the file."""

    images: np.ndarray
    labels: torch.Tensor
    path: pathlib.Path

    def __len__(self) -> int:
        return self.images.shape[0]


def load_extra_data(path: str | os.PathLike[str], image_shape: tuple[int, int, int], num_classes: int) -> ExtraData:
    """Map a file of extra training data and check it against the dataset it joins.

    Images must be uint8 ``(M, H, W, C)`` (the layout of the released generated CIFAR data)
    with ``(C, H, W) == image_shape``; labels an integer vector of length ``M`` in
    ``0..num_classes-1``. Only the labels are read; the images stay mapped.
    """
    path = pathlib.Path(path).expanduser()
    images, labels = _map_pair(path)
    c, h, w = image_shape
    if images.dtype != np.uint8 or images.ndim != 4:
        raise AtprobeError(f"{path}: extra images must be uint8 (M, H, W, C), got {images.dtype} {images.shape}")
    if images.shape[1:] != (h, w, c):
        raise AtprobeError(f"{path}: extra images have shape (H, W, C) = {images.shape[1:]}, "
                           f"the training images {(h, w, c)}")
    if images.shape[0] == 0:
        raise AtprobeError(f"{path}: holds no extra images")
    if not images.flags.c_contiguous:
        raise AtprobeError(f"{path}: extra images are stored in Fortran order; save them C-contiguous")
    labels = np.asarray(labels).reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise AtprobeError(f"{path}: extra labels must be an integer vector, got {labels.dtype} {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise AtprobeError(f"{path}: {images.shape[0]} extra images but {labels.shape[0]} labels")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise AtprobeError(f"{path}: extra labels must be in 0..{num_classes - 1}, got {lo}..{hi}")
    return ExtraData(images=images, labels=torch.from_numpy(labels.astype(np.int64)), path=path)


# ---------------------------------------------------------------------------- rows on the device


class ResidentRows:
    """All images copied to the device once (in chunks, never a whole host copy); a batch's
    rows are a device gather."""

    def __init__(self, images: np.ndarray, device: torch.device, chunk: int = 65536):
        self.device = device
        self.images = torch.empty(images.shape, dtype=torch.uint8, device=device)
        for start in range(0, images.shape[0], chunk):
            part = torch.from_numpy(np.array(images[start:start + chunk]))
            self.images[start:start + chunk].copy_(part)

    def fetch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows`` (int64, host) as device tensors: images ``(n, C, H, W)`` uint8 and the rows."""
        rows_dev = torch.from_numpy(rows).to(self.device, non_blocking=True)
        return self.images.index_select(0, rows_dev).permute(0, 3, 1, 2), rows_dev

    def ready(self, fetched: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return fetched


class MappedRows:
    """Rows read from the memory map and sent to the device asynchronously.

    ``fetch`` reads a batch's rows into a pinned host buffer (a ring of ``depth`` buffers) and
    queues their ``non_blocking`` copy on a side CUDA stream; ``ready`` makes the compute stream
    wait for that copy (an event, not a host sync). Fetching batch ``k + 1`` before batch ``k`` is
    consumed overlaps the disk read and the copy with the compute of the batches queued before.
    A ring buffer is refilled only after its previous copy has finished (a wait on that copy's
    event, long done by then). On the CPU there is no stream or pinning: each batch is a fresh
    host array.
    """

    def __init__(self, images: np.ndarray, device: torch.device, depth: int = 3):
        self.images, self.device = images, device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.ring: list[tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]] = []
        self.depth, self.turn = depth, 0

    def _buffers(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cuda:
            return torch.empty((n, *self.images.shape[1:]), dtype=torch.uint8), torch.empty(n, dtype=torch.int64)
        slot = self.turn % self.depth
        self.turn += 1
        if slot == len(self.ring) or self.ring[slot][0].shape[0] < n:
            pinned = (torch.empty((n, *self.images.shape[1:]), dtype=torch.uint8).pin_memory(),
                      torch.empty(n, dtype=torch.int64).pin_memory(), torch.cuda.Event())
            self.ring[slot:slot + 1] = [pinned]
        images, rows, copied = self.ring[slot]
        copied.synchronize()  # this buffer's previous copy (an event never recorded returns at once)
        return images[:n], rows[:n]

    def fetch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
        host_images, host_rows = self._buffers(len(rows))
        np.take(self.images, rows, axis=0, out=host_images.numpy(), mode="clip")  # rows are in range
        host_rows.numpy()[:] = rows
        if not self.cuda:
            return host_images.permute(0, 3, 1, 2), host_rows, None
        with torch.cuda.stream(self.stream):
            images = host_images.to(self.device, non_blocking=True)
            rows_dev = host_rows.to(self.device, non_blocking=True)
            copied = self.ring[(self.turn - 1) % self.depth][2]
            copied.record(self.stream)
        return images, rows_dev, copied

    def ready(self, fetched) -> tuple[torch.Tensor, torch.Tensor]:
        images, rows, copied = fetched
        if copied is None:
            return images, rows
        current = torch.cuda.current_stream(self.device)
        current.wait_event(copied)
        # Allocated on the side stream, used on this one: keep the caching allocator from reusing them early.
        images.record_stream(current)
        rows.record_stream(current)
        return images.permute(0, 3, 1, 2), rows


def memory_budget(device: torch.device, budget_mb: float | None = None) -> int:
    """Bytes the resident path may take: ``budget_mb`` if given, else ``AUTO_BUDGET_FRACTION``
    of the free device memory (CUDA) or of the physical memory (CPU)."""
    if budget_mb is not None:
        return int(budget_mb * 2**20)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(AUTO_BUDGET_FRACTION["cuda"] * free)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(AUTO_BUDGET_FRACTION["cpu"] * physical)


def image_rows(images: np.ndarray, device: torch.device, budget_mb: float | None = None) -> ResidentRows | MappedRows:
    """The resident path when the images fit :func:`memory_budget`, else the mapped one."""
    if images.nbytes <= memory_budget(device, budget_mb):
        return ResidentRows(images, device)
    return MappedRows(images, device)
