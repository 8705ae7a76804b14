"""Memory-mapped extra data: the zip/npy layout reader against np.load, the mapped path (a file
larger than the budget) against the resident one bit for bit, the per-batch ratio against the
file's own rows, determinism, and one-line errors for bad files and fractions."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from atprobe.data.batches import extra_count, extra_positions, extra_rows, iterate_mixed_batches, original_rows
from atprobe.data.memmap import (
    AUTO_BUDGET_FRACTION,
    MappedRows,
    ResidentRows,
    image_rows,
    load_extra_data,
    map_npy,
    map_npz_member,
    memory_budget,
)
from atprobe.data.types import make_split
from atprobe.errors import AtprobeError
from atprobe.runtime import make_generator

CPU = torch.device("cpu")


def _images(n: int, h: int = 8, w: int = 8, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def _write_extra(path, n: int, h: int = 8, w: int = 8, classes: int = 10, seed: int = 1, **extra_arrays):
    images = _images(n, h, w, seed=seed)
    labels = np.random.default_rng(seed + 1).integers(0, classes, size=n)
    np.savez(path, image=images, label=labels, **extra_arrays)
    return images, labels


def _split(n: int, h: int = 8, w: int = 8, seed: int = 5):
    x = torch.from_numpy(_images(n, h, w, seed=seed).transpose(0, 3, 1, 2).copy())
    return make_split(x, torch.arange(n) % 10)


def _batches(split, extra, source, **kw):
    args = dict(batch_size=20, fraction=0.7, seed=3, first_batch=0, n_batches=6, index_base=1000)
    args.update(kw)
    return list(iterate_mixed_batches(split, source, extra.labels, **args))


# ---------------------------------------------------------------------------- the layout reader


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.float32, ">f8"])
def test_npz_members_map_to_the_arrays_np_load_reads(tmp_path, dtype):
    arrays = {"a": np.arange(6000).reshape(20, 300).astype(dtype), "b": np.arange(7).astype(dtype),
              "scalar": np.array(3, dtype=dtype), "f": np.asfortranarray(np.arange(12.0).reshape(3, 4))}
    np.savez(tmp_path / "d.npz", **arrays)
    with np.load(tmp_path / "d.npz") as ref:
        for name in arrays:
            mapped = map_npz_member(tmp_path / "d.npz", name)
            assert mapped.dtype == ref[name].dtype and mapped.shape == ref[name].shape
            np.testing.assert_array_equal(mapped, ref[name])
            if mapped.size:
                assert isinstance(mapped, np.memmap), name  # mapped, not read


def test_npy_is_mapped(tmp_path):
    a = _images(5)
    np.save(tmp_path / "a.npy", a)
    mapped = map_npy(tmp_path / "a.npy")
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, a)


def test_a_folder_of_npy_files_is_the_same_extra_data(tmp_path):
    images, labels = _write_extra(tmp_path / "e.npz", 40)
    (tmp_path / "dir").mkdir()
    np.save(tmp_path / "dir" / "image.npy", images)
    np.save(tmp_path / "dir" / "label.npy", labels)
    a, b = (load_extra_data(p, (3, 8, 8), 10) for p in (tmp_path / "e.npz", tmp_path / "dir"))
    assert isinstance(b.images, np.memmap)
    np.testing.assert_array_equal(a.images, b.images)
    assert torch.equal(a.labels, b.labels)
    (tmp_path / "dir" / "label.npy").unlink()
    with pytest.raises(AtprobeError, match="needs image.npy and label.npy"):
        load_extra_data(tmp_path / "dir", (3, 8, 8), 10)


def test_the_budget_is_the_option_or_a_share_of_the_memory():
    assert memory_budget(CPU, 3) == 3 * 2**20 and memory_budget(CPU, 0) == 0
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert memory_budget(CPU) == int(AUTO_BUDGET_FRACTION["cpu"] * physical)
    assert isinstance(image_rows(_images(10), CPU), ResidentRows)  # 1.9 kB: resident by default
    assert isinstance(image_rows(_images(10), CPU, budget_mb=0), MappedRows)


def test_compressed_or_missing_members_are_one_line_errors(tmp_path):
    np.savez_compressed(tmp_path / "c.npz", image=_images(3), label=np.zeros(3, dtype=np.int64))
    with pytest.raises(AtprobeError, match=r"image\.npy is compressed.*np\.savez.*\.npy") as e:
        load_extra_data(tmp_path / "c.npz", (3, 8, 8), 10)
    assert "\n" not in str(e.value)
    np.savez(tmp_path / "k.npz", pixels=_images(3))
    with pytest.raises(AtprobeError, match="needs arrays 'image'/'label' or 'x'/'y', found pixels"):
        load_extra_data(tmp_path / "k.npz", (3, 8, 8), 10)
    (tmp_path / "t.npz").write_bytes(b"not a zip")
    with pytest.raises(AtprobeError, match="not an .npz archive"):
        load_extra_data(tmp_path / "t.npz", (3, 8, 8), 10)
    with pytest.raises(AtprobeError, match="extra data not found"):
        load_extra_data(tmp_path / "none.npz", (3, 8, 8), 10)


def test_a_truncated_member_is_a_one_line_error(tmp_path):
    _write_extra(tmp_path / "e.npz", 50)
    raw = (tmp_path / "e.npz").read_bytes()
    # Cut the first member (image) short but keep a valid archive: rewrite it with a shorter payload.
    import zipfile

    with zipfile.ZipFile(tmp_path / "e.npz") as z:
        data = z.read("image.npy")
    with zipfile.ZipFile(tmp_path / "cut.npz", "w", zipfile.ZIP_STORED) as z:
        z.writestr("image.npy", data[:-100])
        z.writestr("label.npy", b"")
    assert len(raw) > 0
    with pytest.raises(AtprobeError, match="shorter than its .npy header says"):
        map_npz_member(tmp_path / "cut.npz", "image")


@pytest.mark.parametrize("make,pattern", [
    (lambda p: np.savez(p, image=_images(4, 16, 8), label=np.zeros(4, dtype=int)),
     r"shape \(H, W, C\) = \(16, 8, 3\), the training images \(8, 8, 3\)"),
    (lambda p: np.savez(p, image=_images(4).astype(np.float32), label=np.zeros(4, dtype=int)), "must be uint8"),
    (lambda p: np.savez(p, image=_images(4), label=np.array([0, 1, 2, 10])), r"labels must be in 0\.\.9, got 0\.\.10"),
    (lambda p: np.savez(p, image=_images(4), label=np.array([0, -1, 2, 3])), r"in 0\.\.9, got -1\.\.3"),
    (lambda p: np.savez(p, image=_images(4), label=np.zeros(3, dtype=int)), "4 extra images but 3 labels"),
    (lambda p: np.savez(p, image=_images(4), label=np.zeros(4)), "integer vector"),
    (lambda p: np.savez(p, image=_images(0), label=np.zeros(0, dtype=int)), "no extra images"),
])
def test_bad_extra_files_are_one_line_errors(tmp_path, make, pattern):
    make(tmp_path / "bad.npz")
    with pytest.raises(AtprobeError, match=pattern) as e:
        load_extra_data(tmp_path / "bad.npz", (3, 8, 8), 10)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.1, float("nan"), "a"])
def test_fractions_outside_0_1_are_one_line_errors(fraction):
    with pytest.raises(AtprobeError, match=r"extra fraction must be (in|a number in) \[0, 1\)"):
        extra_count(128, fraction)


def test_extra_count_is_the_floor_of_batch_times_fraction():
    assert [extra_count(b, f) for b, f in [(128, 0.7), (1024, 0.7), (100, 0.29), (10, 0.0), (3, 0.99)]] == \
        [89, 716, 29, 0, 2]
    assert all(extra_count(b, f) == math.floor(b * f) for b in (7, 64, 512) for f in (0.1, 0.5, 0.75))


# ---------------------------------------------------------------------------- batches


def test_mapped_path_on_a_file_larger_than_the_budget_equals_the_resident_path(tmp_path):
    images, labels = _write_extra(tmp_path / "big.npz", 4000, 32, 32)  # 12.3 MB of images
    assert images.nbytes > 10 * 2**20
    extra = load_extra_data(tmp_path / "big.npz", (3, 32, 32), 10)
    assert isinstance(extra.images, np.memmap)
    mapped = image_rows(extra.images, CPU, budget_mb=2)
    resident = image_rows(extra.images, CPU, budget_mb=64)
    assert isinstance(mapped, MappedRows) and isinstance(resident, ResidentRows)
    split = _split(100, 32, 32)
    kw = dict(augment=True, channels_last=True)
    a = _batches(split, extra, mapped, generator=make_generator(9), **kw)
    b = _batches(split, extra, resident, generator=make_generator(9), **kw)
    c = _batches(split, extra, ResidentRows(extra.images, CPU, chunk=333), generator=make_generator(9), **kw)
    with np.load(tmp_path / "big.npz") as whole:  # numpy's own reader, the whole array in memory
        loaded = ResidentRows(whole["image"], CPU)
    d = _batches(split, extra, loaded, generator=make_generator(9), **kw)
    assert len(a) == 6
    for batches in zip(a, b, c, d):
        for name in ("x", "y", "true_y", "index"):
            assert all(torch.equal(getattr(batches[0], name), getattr(other, name)) for other in batches[1:]), name


def test_each_batch_has_the_exact_ratio_and_the_right_images(tmp_path):
    images, labels = _write_extra(tmp_path / "e.npz", 300)
    extra = load_extra_data(tmp_path / "e.npz", (3, 8, 8), 10)
    split = _split(50)
    batches = _batches(split, extra, image_rows(extra.images, CPU, budget_mb=0), n_batches=20)
    n_extra = 14  # floor(20 * 0.7)
    originals = []
    for g, b in enumerate(batches):
        assert len(b) == 20
        is_extra = b.index >= 1000
        assert int(is_extra.sum()) == n_extra
        assert torch.equal(is_extra, extra_positions(20, n_extra))  # spread: 14 of 20 = 7 of every 10 rows
        assert int(is_extra[:10].sum()) == 7
        rows = (b.index[is_extra] - 1000).numpy()
        np.testing.assert_array_equal(rows, extra_rows(3, g, n_extra, 300))  # batch g's own draw
        expected = torch.from_numpy(images[rows].transpose(0, 3, 1, 2).astype(np.float32)) / 255
        assert torch.equal(b.x[is_extra], expected)
        assert torch.equal(b.y[is_extra], torch.from_numpy(labels[rows]))
        orig = b.index[~is_extra]
        assert torch.equal(b.x[~is_extra], split.x[orig].float() / 255)
        assert torch.equal(b.y[~is_extra], split.y[orig])
        originals.append(orig)
    stream = torch.cat(originals)  # 120 original draws: passes of 50, each a permutation
    for p in range(2):
        assert sorted(stream[50 * p:50 * (p + 1)].tolist()) == list(range(50))
    assert not torch.equal(stream[:50], stream[50:100])  # a fresh order each pass


def test_batches_are_a_function_of_seed_and_batch_number(tmp_path):
    _write_extra(tmp_path / "e.npz", 300)
    extra = load_extra_data(tmp_path / "e.npz", (3, 8, 8), 10)
    split, source = _split(50), image_rows(extra.images, CPU, budget_mb=0)
    whole = _batches(split, extra, source, n_batches=8)
    parts = _batches(split, extra, source, n_batches=3) + _batches(split, extra, source, first_batch=3, n_batches=5)
    again = _batches(split, extra, source, n_batches=8)
    other = _batches(split, extra, source, n_batches=8, seed=4)
    for a, b, c in zip(whole, parts, again):
        assert torch.equal(a.x, b.x) and torch.equal(a.index, b.index) and torch.equal(a.x, c.x)
    assert not all(torch.equal(a.index, d.index) for a, d in zip(whole, other))
    # The keyed draws themselves: uniform rows with replacement, original order per pass.
    assert torch.equal(torch.from_numpy(extra_rows(3, 5, 14, 300)), torch.from_numpy(extra_rows(3, 5, 14, 300)))
    assert torch.equal(original_rows(3, 8, 6, 50, CPU), torch.cat([original_rows(3, 8, 6, 50, CPU)]))


@pytest.mark.parametrize("batch,n_extra", [(20, 14), (128, 89), (7, 3), (5, 0), (9, 8)])
def test_extra_positions_spread_the_ratio_over_every_run_of_rows(batch, n_extra):
    mask = extra_positions(batch, n_extra).tolist()
    assert sum(mask) == n_extra
    for start in range(batch):
        for stop in range(start + 1, batch + 1):  # any contiguous share holds its proportion within one image
            assert abs(sum(mask[start:stop]) - (stop - start) * n_extra / batch) < 1 + 1e-9


def test_fraction_zero_gives_original_batches_only(tmp_path):
    _write_extra(tmp_path / "e.npz", 30)
    extra = load_extra_data(tmp_path / "e.npz", (3, 8, 8), 10)
    batches = _batches(_split(50), extra, image_rows(extra.images, CPU, budget_mb=0), fraction=0.0, n_batches=3)
    assert all(len(b) == 20 and bool((b.index < 1000).all()) for b in batches)
