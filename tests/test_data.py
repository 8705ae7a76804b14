"""Tests for atprobe.data: parsers, download, label noise, splits, synthetic data, batches."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F

from atprobe import data
from atprobe.data import (
    DATASETS,
    Batch,
    Dataset,
    Resource,
    Split,
    default_data_dir,
    download_dataset,
    fetch_url,
    iterate_batches,
    load_dataset,
    make_synthetic,
    random_crop_flip,
    symmetric_label_noise,
    validation_split,
)
from atprobe.data import batches as data_batches
from atprobe.data import download as data_download
from atprobe.data import load as data_load
from atprobe.errors import AtprobeError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR_SUBSET = SHARED / "cifar-10-subset"
needs_cifar_subset = pytest.mark.skipif(
    not (CIFAR_SUBSET / "cifar-10-batches-py").is_dir(), reason="shared CIFAR-10 subset not present"
)

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# --------------------------------------------------------------------------------------
# Writers for the published formats
# --------------------------------------------------------------------------------------


def _dump(obj: object, path: Path) -> None:
    # Protocol 2 with bytes keys, like the original Python-2 CIFAR pickles.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _keys(d: dict, as_bytes: bool) -> dict:
    return {(k.encode() if as_bytes else k): v for k, v in d.items()}


def write_cifar10(
    folder: Path, per_batch: int = 3, n_test: int = 4, seed: int = 0, bytes_keys: bool = True
) -> dict[str, np.ndarray]:
    """A CIFAR-10 python-version folder with random images; returns NCHW arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    enc = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).tolist()
        _dump(_keys({"batch_label": enc(f"training batch {i} of 5"), "labels": y, "data": x,
                     "filenames": [enc(f"img{j}.png") for j in range(per_batch)]}, bytes_keys),
              folder / f"data_batch_{i}")
        xs.append(x)
        ys += y
    xt = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    yt = rng.integers(0, 10, n_test).tolist()
    _dump(_keys({"batch_label": enc("testing batch 1 of 1"), "labels": yt, "data": xt}, bytes_keys),
          folder / "test_batch")
    _dump(_keys({"num_cases_per_batch": 10000, "label_names": [enc(n) for n in CIFAR10_NAMES],
                 "num_vis": 3072}, bytes_keys), folder / "batches.meta")
    return {
        "x_train": np.concatenate(xs).reshape(-1, 3, 32, 32),
        "y_train": np.array(ys),
        "x_test": xt.reshape(-1, 3, 32, 32),
        "y_test": np.array(yt),
    }


def write_cifar100(folder: Path, n_train: int = 7, n_test: int = 5, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n)
        fine[0] = 99  # exercise the top of the range
        _dump({b"filenames": [f"f{i}.png".encode() for i in range(n)], b"batch_label": split.encode(),
               b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(), b"data": x},
              folder / split)
        out[f"x_{split}"], out[f"y_{split}"] = x.reshape(-1, 3, 32, 32), fine
    _dump({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
           b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, folder / "meta")
    return out


def write_svhn(folder: Path, n_train: int = 6, n_test: int = 4, seed: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10  # digit 0
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": X, "y": y})
        out[f"X_{split}"], out[f"y_{split}"] = X, y
    return out


def make_tar(src: Path, arcname: str, archive: Path) -> str:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname=arcname)
    return hashlib.md5(archive.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def synthetic() -> tuple[Split, Split]:
    return make_synthetic(0)


@pytest.fixture
def small_synthetic(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_dataset("synthetic") with 400 train / 100 test images, to keep tests fast."""
    original = data.make_synthetic
    # Patched where load_dataset looks it up.
    monkeypatch.setattr(data_load, "make_synthetic", lambda seed=0: original(seed, n_train=400, n_test=100))


# --------------------------------------------------------------------------------------
# Basics
# --------------------------------------------------------------------------------------


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ATPROBE_DATA_DIR", str(tmp_path / "d"))
    assert default_data_dir() == tmp_path / "d"
    monkeypatch.delenv("ATPROBE_DATA_DIR")
    assert default_data_dir() == Path.home() / ".cache" / "atprobe" / "data"


def test_unknown_dataset() -> None:
    assert DATASETS == ("cifar10", "cifar100", "svhn", "npz", "synthetic")
    with pytest.raises(AtprobeError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(AtprobeError, match="cannot be downloaded"):
        download_dataset("synthetic")


# --------------------------------------------------------------------------------------
# CIFAR-10 (real subset), CIFAR-100, SVHN parsers
# --------------------------------------------------------------------------------------


@needs_cifar_subset
def test_cifar10_real_subset() -> None:
    ds = load_dataset("cifar10", CIFAR_SUBSET)
    assert ds.name == "cifar10" and ds.num_classes == 10 and ds.class_names == CIFAR10_NAMES
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2471, 0.2435, 0.2616)
    assert ds.image_shape == (3, 32, 32) and ds.val is None
    for split, n in ((ds.train, 5000), (ds.test, 1000)):
        assert split.x.shape == (n, 3, 32, 32) and split.x.dtype == torch.uint8
        assert split.x.is_contiguous()
        for t in (split.y, split.true_y, split.index):
            assert t.dtype == torch.int64 and t.shape == (n,)
        assert torch.equal(split.y, split.true_y)
        assert torch.equal(split.index, torch.arange(n))
        assert int(split.y.min()) >= 0 and int(split.y.max()) <= 9
    assert ds.train.y[:2].tolist() == [6, 9]  # frog, truck
    counts = torch.bincount(ds.test.y, minlength=10)
    assert int(counts.min()) >= 79 and int(counts.max()) <= 119
    # Pixel layout: a row is the R plane, then G, then B, each 32x32 row-major.
    with open(CIFAR_SUBSET / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="latin1")["data"]
    img = ds.train.x[1000].numpy()
    for c in range(3):
        np.testing.assert_array_equal(img[c], raw[0, 1024 * c : 1024 * (c + 1)].reshape(32, 32))
    # Channel order sanity: the subset's statistics are close to the published ones.
    mean, std = data_load._channel_stats(ds.train.x)
    np.testing.assert_allclose(mean, ds.mean, atol=0.01)
    np.testing.assert_allclose(std, ds.std, atol=0.01)


@needs_cifar_subset
def test_cifar10_subset_direct_folder_and_download_is_noop() -> None:
    folder = CIFAR_SUBSET / "cifar-10-batches-py"
    # data_dir may also be the batches folder itself.
    ds = load_dataset("cifar10", folder)
    assert len(ds.train) == 5000

    def boom(url: str, offset: int) -> io.BytesIO:
        raise AssertionError("must not fetch")

    assert download_dataset("cifar10", CIFAR_SUBSET, fetch=boom) == folder


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar10_written_archive_roundtrip(tmp_path: Path, bytes_keys: bool) -> None:
    arrays = write_cifar10(tmp_path / "cifar-10-batches-py", bytes_keys=bytes_keys)
    ds = load_dataset("cifar10", tmp_path)
    np.testing.assert_array_equal(ds.train.x.numpy(), arrays["x_train"])
    np.testing.assert_array_equal(ds.train.y.numpy(), arrays["y_train"])
    np.testing.assert_array_equal(ds.test.x.numpy(), arrays["x_test"])
    np.testing.assert_array_equal(ds.test.y.numpy(), arrays["y_test"])
    assert ds.class_names == CIFAR10_NAMES


def test_cifar_pickle_refuses_foreign_globals(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # opening the marker for writing would create it
            return (open, (str(marker), "w"))

    _dump({b"data": Evil(), b"labels": []}, folder / "data_batch_3")
    with pytest.raises(AtprobeError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar10_bad_batch_shape(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    _dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, folder / "test_batch")
    with pytest.raises(AtprobeError, match=r"uint8 \(N, 3072\)"):
        load_dataset("cifar10", tmp_path)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(AtprobeError, match="test_batch"):
        load_dataset("cifar10", tmp_path)


def test_cifar100_roundtrip(tmp_path: Path) -> None:
    arrays = write_cifar100(tmp_path / "cifar-100-python")
    ds = load_dataset("cifar100", tmp_path)
    assert ds.num_classes == 100 and ds.class_names[:2] == ("fine0", "fine1")
    assert ds.mean == (0.5071, 0.4865, 0.4409) and ds.std == (0.2673, 0.2564, 0.2762)
    for split in ("train", "test"):
        s = getattr(ds, split)
        assert s.x.dtype == torch.uint8 and s.x.shape == arrays[f"x_{split}"].shape
        np.testing.assert_array_equal(s.x.numpy(), arrays[f"x_{split}"])
        np.testing.assert_array_equal(s.y.numpy(), arrays[f"y_{split}"])
        np.testing.assert_array_equal(s.true_y.numpy(), arrays[f"y_{split}"])


@pytest.mark.parametrize("sub", ["", "svhn"])
def test_svhn_roundtrip(tmp_path: Path, sub: str) -> None:
    arrays = write_svhn(tmp_path / sub if sub else tmp_path)
    ds = load_dataset("svhn", tmp_path)
    assert ds.num_classes == 10 and ds.class_names == tuple(str(i) for i in range(10))
    assert ds.mean == (0.4377, 0.4438, 0.4728) and ds.std == (0.1980, 0.2010, 0.1970)
    for split in ("train", "test"):
        s = getattr(ds, split)
        X, y = arrays[f"X_{split}"], arrays[f"y_{split}"]
        assert s.x.shape == (X.shape[3], 3, 32, 32) and s.x.dtype == torch.uint8
        for i in range(X.shape[3]):  # x[i, c, h, w] == X[h, w, c, i]
            np.testing.assert_array_equal(s.x[i].permute(1, 2, 0).numpy(), X[..., i])
        np.testing.assert_array_equal(s.y.numpy(), y[:, 0] % 10)
        assert int(s.y[0]) == 0


def test_svhn_bad_labels(tmp_path: Path) -> None:
    write_svhn(tmp_path)
    scipy.io.savemat(tmp_path / "test_32x32.mat",
                     {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [3]], np.uint8)})
    with pytest.raises(AtprobeError, match="1..10"):
        load_dataset("svhn", tmp_path)


@pytest.mark.parametrize("name,what", [("cifar10", "data_batch_1"), ("cifar100", "meta"),
                                       ("svhn", "train_32x32.mat")])
def test_missing_files_error(tmp_path: Path, name: str, what: str) -> None:
    with pytest.raises(AtprobeError) as info:
        load_dataset(name, tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "--download" in msg and what in msg and "\n" not in msg


# --------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------


@pytest.fixture
def cifar10_archive(tmp_path: Path) -> tuple[Path, str, dict[str, np.ndarray]]:
    src = tmp_path / "src"
    arrays = write_cifar10(src / "cifar-10-batches-py", seed=5)
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    md5 = make_tar(src / "cifar-10-batches-py", "cifar-10-batches-py", archive)
    return archive, md5, arrays


def test_download_verify_extract_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cifar10_archive: tuple[Path, str, dict]
) -> None:
    archive, md5, arrays = cifar10_archive
    monkeypatch.setitem(
        data.SOURCES, "cifar10", (Resource(archive.as_uri(), "cifar-10-python.tar.gz", md5, extract=True),)
    )
    root = tmp_path / "root"
    with pytest.raises(AtprobeError, match="--download"):
        load_dataset("cifar10", root)
    ds = load_dataset("cifar10", root, download=True)
    np.testing.assert_array_equal(ds.train.x.numpy(), arrays["x_train"])
    np.testing.assert_array_equal(ds.test.y.numpy(), arrays["y_test"])
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()
    assert (root / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()
    assert not list(root.glob("*.part")) and not list(root.glob(".extract-*"))
    # Second call: everything present, nothing fetched.
    calls: list[int] = []
    assert download_dataset("cifar10", root, fetch=lambda u, o: calls.append(o)) == root / "cifar-10-batches-py"
    assert calls == []


def test_existing_torchvision_folder_used_without_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10(tmp_path / "cifar-10-batches-py")
    monkeypatch.setitem(data.SOURCES, "cifar10", (Resource("file:///nonexistent.tar.gz", "x.tar.gz", "0" * 32, True),))

    def boom(url: str, offset: int) -> io.BytesIO:
        raise AssertionError("must not fetch")

    assert download_dataset("cifar10", tmp_path, fetch=boom) == tmp_path / "cifar-10-batches-py"
    assert len(load_dataset("cifar10", tmp_path, download=True).train) == 15


def test_svhn_download_two_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = write_svhn(tmp_path / "served")
    sources = tuple(
        Resource((tmp_path / "served" / f).as_uri(), f, hashlib.md5((tmp_path / "served" / f).read_bytes()).hexdigest())
        for f in ("train_32x32.mat", "test_32x32.mat")
    )
    monkeypatch.setitem(data.SOURCES, "svhn", sources)
    ds = load_dataset("svhn", tmp_path / "root", download=True)
    np.testing.assert_array_equal(ds.test.y.numpy(), arrays["y_test"][:, 0] % 10)


def _payload(n: int = 10_000) -> tuple[bytes, str]:
    blob = np.random.default_rng(3).integers(0, 256, n, dtype=np.uint8).tobytes()
    return blob, hashlib.md5(blob).hexdigest()


def test_fetch_resumes_partial_file(tmp_path: Path) -> None:
    blob, md5 = _payload()
    src = tmp_path / "blob.bin"
    src.write_bytes(blob)
    dest = tmp_path / "out" / "blob.bin"
    dest.parent.mkdir()
    Path(str(dest) + ".part").write_bytes(blob[:3000])  # truncated earlier download
    offsets: list[int] = []

    def fetch(url: str, offset: int):
        offsets.append(offset)
        return data_download._open_url(url, offset)  # the real file:// path (seek)

    assert fetch_url(src.as_uri(), dest, md5, fetch=fetch, chunk_size=999) == dest
    assert offsets == [3000]
    assert dest.read_bytes() == blob and not Path(str(dest) + ".part").exists()


def test_fetch_interrupted_then_resumed(tmp_path: Path) -> None:
    blob, md5 = _payload()
    dest = tmp_path / "f.bin"

    class Dropping(io.BytesIO):
        """Delivers 2500 bytes, then the connection drops."""

        def read(self, size: int = -1) -> bytes:
            if self.tell() >= 2500:
                raise ConnectionResetError("connection reset by peer")
            return super().read(min(size, 2500 - self.tell()))

    with pytest.raises(AtprobeError, match="interrupted after 2500 bytes"):
        fetch_url("http://example.invalid/f.bin", dest, md5, fetch=lambda u, o: Dropping(blob[o:]))
    assert Path(str(dest) + ".part").stat().st_size == 2500 and not dest.exists()
    offsets: list[int] = []

    def fetch(url: str, offset: int) -> io.BytesIO:
        offsets.append(offset)
        return io.BytesIO(blob[offset:])

    fetch_url("http://example.invalid/f.bin", dest, md5, fetch=fetch)
    assert offsets == [2500] and dest.read_bytes() == blob


class FakeResponse(io.BytesIO):
    """An HTTP-like response: ``status`` and ``headers`` like http.client.HTTPResponse."""

    def __init__(self, payload: bytes, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(payload)
        self.status = status
        self.headers = headers or {}


@pytest.mark.parametrize("honours_range", [True, False])
def test_fetch_http_range_semantics(tmp_path: Path, honours_range: bool) -> None:
    blob, md5 = _payload()
    dest = tmp_path / "f.bin"
    Path(str(dest) + ".part").write_bytes(blob[:4096])
    offsets: list[int] = []

    def server(url: str, offset: int) -> FakeResponse:
        offsets.append(offset)
        if offset and honours_range:
            return FakeResponse(blob[offset:], 206, {"Content-Range": f"bytes {offset}-{len(blob) - 1}/{len(blob)}"})
        return FakeResponse(blob, 200)  # a server that ignores Range sends everything

    fetch_url("http://example.invalid/f.bin", dest, md5, fetch=server, chunk_size=1000)
    assert dest.read_bytes() == blob and offsets == [4096]


def test_fetch_stale_part_restarts_once(tmp_path: Path) -> None:
    blob, md5 = _payload()
    dest = tmp_path / "f.bin"
    Path(str(dest) + ".part").write_bytes(b"\x00" * 2000)  # wrong prefix
    offsets: list[int] = []

    def fetch(url: str, offset: int) -> io.BytesIO:
        offsets.append(offset)
        return io.BytesIO(blob[offset:])

    fetch_url("http://example.invalid/f.bin", dest, md5, fetch=fetch)
    assert offsets == [2000, 0] and dest.read_bytes() == blob


def test_fetch_md5_mismatch_leaves_nothing(tmp_path: Path) -> None:
    blob, _ = _payload()
    src = tmp_path / "blob.bin"
    src.write_bytes(blob)
    dest = tmp_path / "out.bin"
    with pytest.raises(AtprobeError, match="MD5 mismatch"):
        fetch_url(src.as_uri(), dest, "0" * 32)
    assert not dest.exists() and not Path(str(dest) + ".part").exists()


def test_fetch_existing_file_and_errors(tmp_path: Path) -> None:
    blob, md5 = _payload()
    dest = tmp_path / "sub" / "f.bin"
    dest.parent.mkdir()
    dest.write_bytes(blob)

    def boom(url: str, offset: int) -> io.BytesIO:
        raise AssertionError("must not fetch")

    assert fetch_url("http://example.invalid/f", dest, md5, fetch=boom) == dest

    def offline(url: str, offset: int) -> io.BytesIO:
        raise urllib.error.URLError("no network")

    with pytest.raises(AtprobeError, match="no network"):
        fetch_url("http://example.invalid/g", tmp_path / "g", md5, fetch=offline)
    with pytest.raises(AtprobeError, match="cannot download"):
        fetch_url((tmp_path / "missing.bin").as_uri(), tmp_path / "h", md5)


def test_extract_refuses_path_traversal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tf:
        payload = b"gotcha"
        info = tarfile.TarInfo("../escaped.txt")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    md5 = hashlib.md5(evil.read_bytes()).hexdigest()
    monkeypatch.setitem(data.SOURCES, "cifar10", (Resource(evil.as_uri(), "c.tar.gz", md5, extract=True),))
    root = tmp_path / "a" / "root"
    with pytest.raises(AtprobeError, match="refusing to extract"):
        download_dataset("cifar10", root)
    assert not (tmp_path / "a" / "escaped.txt").exists()
    assert not list(root.glob(".extract-*"))


# --------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------


def _nhwc(n: int, seed: int, h: int = 8, c: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, h, c), dtype=np.uint8)


def test_npz_single_file_without_test(tmp_path: Path) -> None:
    x, y = _nhwc(6, 0), np.array([0, 1, 2, 3, 4, 2])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset("npz", tmp_path / "d.npz")
    np.testing.assert_array_equal(ds.train.x.numpy(), x.transpose(0, 3, 1, 2))
    assert ds.train.x.is_contiguous() and ds.image_shape == (3, 8, 8)
    assert torch.equal(ds.test.x, ds.train.x) and torch.equal(ds.test.y, ds.train.y)
    assert ds.num_classes == 5 and ds.class_names == ("0", "1", "2", "3", "4")
    xf = x.transpose(0, 3, 1, 2).astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, xf.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(ds.std, xf.std(axis=(0, 2, 3)), rtol=1e-9)


def test_npz_single_file_with_test_and_float(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.random((5, 1, 4, 4)).astype(np.float64)
    xt = rng.random((3, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 0, 1, 1]), x_test=xt, y_test=np.array([[6], [0], [1]]))
    ds = load_dataset("npz", tmp_path / "d.npz")
    assert ds.train.x.dtype == torch.float32 and ds.train.x.shape == (5, 1, 4, 4)
    np.testing.assert_allclose(ds.train.x.numpy(), x, rtol=1e-6)
    np.testing.assert_array_equal(ds.test.y.numpy(), [6, 0, 1])
    assert ds.num_classes == 7 and len(ds.mean) == 1


def test_npz_directory(tmp_path: Path) -> None:
    x, y = _nhwc(4, 2), np.array([1, 0, 1, 0], np.uint8)
    xt, yt = _nhwc(2, 3), np.array([2, 1])
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", x=xt, y=yt)
    ds = load_dataset("npz", tmp_path, val_size=1)
    np.testing.assert_array_equal(ds.test.x.numpy(), xt.transpose(0, 3, 1, 2))
    assert ds.num_classes == 3 and len(ds.train) == 3 and len(ds.val) == 1
    (tmp_path / "test.npz").unlink()
    only = load_dataset("npz", tmp_path)
    assert torch.equal(only.test.x, only.train.x)


@pytest.mark.parametrize(
    "arrays,match",
    [
        ({"x": np.zeros((2, 3, 8, 3), np.uint8), "y": np.zeros(2, int)}, "could be NHWC or NCHW"),
        ({"x": np.zeros((2, 8, 8, 4), np.float32), "y": np.zeros(2, int)}, r"\(N, H, W, C\) or \(N, C, H, W\)"),
        ({"x": np.full((2, 3, 8, 8), 2.0), "y": np.zeros(2, int)}, r"\[0, 1\]"),
        ({"x": np.full((2, 3, 8, 8), np.nan), "y": np.zeros(2, int)}, "NaN"),
        ({"x": np.zeros((2, 8, 8, 3), np.int64), "y": np.zeros(2, int)}, "dtype int64"),
        ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.zeros(2, int)}, "4-D"),
        ({"x": np.zeros((2, 8, 8, 3), np.uint8), "y": np.zeros(3, int)}, "2 images but 3 labels"),
        ({"x": np.zeros((2, 8, 8, 3), np.uint8), "y": np.zeros(2)}, "integer vector"),
        ({"x": np.zeros((2, 8, 8, 3), np.uint8), "y": np.array([0, -1])}, ">= 0"),
        ({"x": np.zeros((2, 8, 8, 3), np.uint8)}, "the file has x"),
        ({"x": np.zeros((2, 8, 8, 3), np.uint8), "y": np.zeros(2, int), "x_test": np.zeros((1, 8, 8, 3), np.uint8)},
         "without its partner"),
        ({"x": np.zeros((2, 8, 8, 3), np.uint8), "y": np.zeros(2, int), "x_test": np.zeros((1, 4, 4, 3), np.uint8),
          "y_test": np.zeros(1, int)}, "differ"),
        ({"x": np.array([None] * 2, dtype=object).reshape(2, 1, 1, 1), "y": np.zeros(2, int)}, "cannot read"),
    ],
)
def test_npz_rejects_bad_arrays(tmp_path: Path, arrays: dict, match: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(AtprobeError, match=match):
        load_dataset("npz", tmp_path / "bad.npz")


def test_npz_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(AtprobeError, match="needs data_dir"):
        load_dataset("npz")
    with pytest.raises(AtprobeError, match="not found"):
        load_dataset("npz", tmp_path / "nope.npz")
    with pytest.raises(AtprobeError, match="no train.npz or test.npz"):
        load_dataset("npz", tmp_path)
    (tmp_path / "junk.npz").write_bytes(b"definitely not a zip")
    with pytest.raises(AtprobeError, match="cannot read"):
        load_dataset("npz", tmp_path / "junk.npz")


# --------------------------------------------------------------------------------------
# Label noise, labels override, validation split
# --------------------------------------------------------------------------------------


def test_label_noise_rate_zero_is_identity() -> None:
    y = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(0))
    out = symmetric_label_noise(y, 0.0, 10, seed=3)
    assert torch.equal(out, y) and out.dtype == torch.int64 and out.data_ptr() != y.data_ptr()


@pytest.mark.parametrize("n,rate", [(1000, 0.3), (10, 0.25), (10, 0.35), (7, 1.0), (1, 0.5), (0, 0.5)])
def test_label_noise_resamples_exactly_round_rate_n(n: int, rate: float) -> None:
    # With an astronomically large class count a resampled label never equals the old
    # one, so the changed count *is* the resampled count.
    y = torch.zeros(n, dtype=torch.int64)
    out = symmetric_label_noise(y, rate, 2**40, seed=1)
    assert int((out != y).sum()) == round(rate * n)


def test_label_noise_statistics_and_determinism() -> None:
    n, c, rate = 20_000, 10, 0.4
    y = torch.arange(n) % c
    before = y.clone()
    torch.manual_seed(123)
    a = symmetric_label_noise(y, rate, c, seed=7)
    torch.manual_seed(456)  # the global RNG must not matter
    b = symmetric_label_noise(y, rate, c, seed=7)
    assert torch.equal(a, b) and torch.equal(y, before)
    assert not torch.equal(a, symmetric_label_noise(y, rate, c, seed=8))
    changed = (a != y).float().mean().item()
    assert abs(changed - rate * (1 - 1 / c)) < 0.015
    assert int(a.min()) >= 0 and int(a.max()) < c
    full = symmetric_label_noise(y, 1.0, c, seed=0)  # completely random labels
    assert abs((full != y).float().mean().item() - 0.9) < 0.015
    counts = torch.bincount(full, minlength=c).float()
    assert (counts / n - 1 / c).abs().max() < 0.01


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan"), "lots"])
def test_label_noise_bad_rate(rate: object) -> None:
    with pytest.raises(AtprobeError, match="rate"):
        symmetric_label_noise(torch.zeros(5, dtype=torch.int64), rate, 10, 0)  # type: ignore[arg-type]
    with pytest.raises(AtprobeError, match="rate"):  # checked before any data is read
        load_dataset("cifar10", "/nonexistent", label_noise=rate)  # type: ignore[arg-type]


def test_validation_split() -> None:
    tr, va = validation_split(100, 30, seed=0)
    assert tr.dtype == va.dtype == torch.int64 and len(tr) == 70 and len(va) == 30
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(100))
    assert torch.equal(tr, tr.sort().values) and torch.equal(va, va.sort().values)
    tr2, va2 = validation_split(100, 30, seed=0)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    assert not torch.equal(va, validation_split(100, 30, seed=1)[1])
    tr0, va0 = validation_split(10, 0, seed=0)
    assert torch.equal(tr0, torch.arange(10)) and len(va0) == 0
    for bad in (100, 101, -1):
        with pytest.raises(AtprobeError, match="val_size"):
            validation_split(100, bad, seed=0)


@pytest.mark.usefixtures("small_synthetic")
def test_load_with_noise_and_validation() -> None:
    clean = load_dataset("synthetic")
    ds = load_dataset("synthetic", label_noise=0.3, label_seed=4, val_size=50, val_seed=2)
    noisy_full = symmetric_label_noise(clean.train.true_y, 0.3, 10, 4)
    assert len(ds.train) == 350 and len(ds.val) == 50
    assert torch.equal(torch.cat([ds.train.index, ds.val.index]).sort().values, torch.arange(400))
    _, val_rows = validation_split(400, 50, 2)
    assert torch.equal(ds.val.index, val_rows)
    for s in (ds.train, ds.val):
        assert torch.equal(s.y, noisy_full[s.index])  # noise applied before carving
        assert torch.equal(s.true_y, clean.train.true_y[s.index])
        assert torch.equal(s.x, clean.train.x[s.index])
    assert not torch.equal(ds.train.y, ds.train.true_y)
    assert torch.equal(ds.test.y, ds.test.true_y) and torch.equal(ds.test.y, clean.test.y)
    assert ds.mean == clean.mean  # statistics of the whole original train split


@pytest.mark.usefixtures("small_synthetic")
def test_load_with_labels_override() -> None:
    labels = torch.arange(400) % 7
    ds = load_dataset("synthetic", labels=labels, label_noise=0.5, val_size=10)
    assert torch.equal(ds.train.y, labels[ds.train.index]) and torch.equal(ds.val.y, labels[ds.val.index])
    with pytest.raises(AtprobeError, match="whole original train split"):
        load_dataset("synthetic", labels=labels[:-1])
    with pytest.raises(AtprobeError, match=r"0\.\.9"):
        load_dataset("synthetic", labels=torch.full((400,), 10))
    with pytest.raises(AtprobeError, match="integers"):
        load_dataset("synthetic", labels=torch.zeros(400))
    with pytest.raises(AtprobeError, match="val_size"):
        load_dataset("synthetic", val_size=400)


# --------------------------------------------------------------------------------------
# Split / Dataset containers
# --------------------------------------------------------------------------------------


def _tiny_split(n: int = 10, dtype: torch.dtype = torch.uint8) -> Split:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 6, 6), generator=g, dtype=torch.uint8)
    if dtype == torch.float32:
        x = x.float() / 255
    y = torch.arange(n) % 3
    return Split(x=x, y=y, true_y=y.clone(), index=torch.arange(n) + 100)


def test_split_methods() -> None:
    s = _tiny_split()
    assert len(s) == 10 and s.device == torch.device("cpu")
    moved = s.to("cpu")
    assert torch.equal(moved.x, s.x) and torch.equal(moved.index, s.index)
    a = s.subset(slice(2, 8, 2))
    assert a.index.tolist() == [102, 104, 106] and a.x.is_contiguous()
    b = s.subset(torch.tensor([9, 0]))
    assert b.index.tolist() == [109, 100] and torch.equal(b.x[0], s.x[9])
    c = s.subset(torch.arange(10) >= 7)
    assert c.index.tolist() == [107, 108, 109]
    assert s.subset([1, 2]).index.tolist() == [101, 102]
    d = s.with_labels(torch.zeros(10, dtype=torch.int32))
    assert d.y.dtype == torch.int64 and int(d.y.sum()) == 0 and torch.equal(d.true_y, s.true_y)
    with pytest.raises(AtprobeError, match="shape"):
        s.with_labels(torch.zeros(9, dtype=torch.int64))
    with pytest.raises(AtprobeError, match="mask"):
        s.subset(torch.ones(3, dtype=torch.bool))
    with pytest.raises(AtprobeError, match="integers"):
        s.subset(torch.tensor([0.5]))


def test_split_validation() -> None:
    s = _tiny_split()
    with pytest.raises(AtprobeError, match="uint8 or float32"):
        Split(s.x.double(), s.y, s.true_y, s.index)
    with pytest.raises(AtprobeError, match=r"\(N, C, H, W\)"):
        Split(s.x[0], s.y, s.true_y, s.index)
    with pytest.raises(AtprobeError, match="Split.index"):
        Split(s.x, s.y, s.true_y, s.index[:5])
    with pytest.raises(AtprobeError, match="Split.y"):
        Split(s.x, s.y.int(), s.true_y, s.index)
    nc = Split(s.x.permute(0, 1, 3, 2), s.y, s.true_y, s.index)  # non-contiguous input
    assert nc.x.is_contiguous()


def test_dataset_container() -> None:
    s = _tiny_split()
    ds = Dataset("t", 3, ("a", "b", "c"), (0.5,) * 3, (0.2,) * 3, s, s)
    assert ds.to("cpu").train.x.shape == s.x.shape and ds.image_shape == (3, 6, 6)
    with pytest.raises(AtprobeError, match="class names"):
        Dataset("t", 4, ("a", "b", "c"), (0.5,) * 3, (0.2,) * 3, s, s)


# --------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------


def test_synthetic_shape_determinism_and_speed(synthetic: tuple[Split, Split]) -> None:
    train, test = synthetic
    assert train.x.shape == (4000, 3, 32, 32) and test.x.shape == (1000, 3, 32, 32)
    assert train.x.dtype == torch.uint8
    assert torch.bincount(train.y).tolist() == [400] * 10 and torch.bincount(test.y).tolist() == [100] * 10
    # Best of two runs: the bound is about the generator, not a busy CI machine.
    t = time.perf_counter()
    again_train, again_test = make_synthetic(0)
    best = time.perf_counter() - t
    if best >= 1.0:
        best = min(best, _timed(make_synthetic, 0))
    assert best < 1.0, f"synthetic generation took {best:.2f}s"
    assert again_train.x.numpy().tobytes() == train.x.numpy().tobytes()
    assert torch.equal(again_train.y, train.y) and torch.equal(again_test.x, test.x)
    other_train, _ = make_synthetic(1)
    assert not torch.equal(other_train.x, train.x)
    # The test set is independent of n_train.
    assert torch.equal(make_synthetic(0, n_train=50, n_test=1000)[1].x, test.x)
    with pytest.raises(AtprobeError):
        make_synthetic(-1)
    ds = load_dataset("synthetic", synthetic_seed=0)
    assert torch.equal(ds.train.x, train.x) and torch.equal(ds.test.y, test.y)
    assert ds.class_names == tuple(f"class{i}" for i in range(10)) and ds.num_classes == 10
    assert all(0.3 < m < 0.7 for m in ds.mean) and all(0.1 < s < 0.4 for s in ds.std)


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def test_synthetic_is_learnable_but_not_trivial(synthetic: tuple[Split, Split]) -> None:
    train, test = synthetic
    xtr, xte = train.x.float().div(255), test.x.float().div(255)
    means = torch.stack([xtr[train.y == c].mean(0) for c in range(10)])
    # Nearest class mean on raw pixels.
    ncm = (torch.cdist(xte.flatten(1), means.flatten(1)).argmin(1) == test.y).float().mean().item()
    assert 0.6 <= ncm < 0.99, ncm
    # Ridge least-squares linear classifier on 4x4-pooled pixels.
    ftr = torch.cat([F.avg_pool2d(xtr, 4).flatten(1), torch.ones(len(xtr), 1)], 1)
    fte = torch.cat([F.avg_pool2d(xte, 4).flatten(1), torch.ones(len(xte), 1)], 1)
    w = torch.linalg.solve(ftr.T @ ftr + 1e-2 * torch.eye(ftr.shape[1]), ftr.T @ F.one_hot(train.y, 10).float())
    lin = ((fte @ w).argmax(1) == test.y).float().mean().item()
    assert 0.6 <= lin < 1.0, lin
    # Class structure is large compared with an L-inf budget of 8/255 (16/255 between means).
    dist = (means.flatten(1)[:, None] - means.flatten(1)[None]).abs().amax(-1)
    dist.fill_diagonal_(float("inf"))
    assert dist.min().item() > 32 / 255
    # No single pixel gives the class away: nearest class mean on one pixel's RGB value,
    # for the best of all 1024 pixel positions, stays far below the full-image accuracy.
    pix_means = means.flatten(2).permute(2, 0, 1)  # (1024, 10, 3)
    pix_test = xte.flatten(2).permute(2, 0, 1)  # (1024, 1000, 3)
    pred = torch.cdist(pix_test, pix_means).argmin(-1)  # (1024, 1000)
    assert (pred == test.y).float().mean(1).max().item() < 0.4


# --------------------------------------------------------------------------------------
# Batches and augmentation
# --------------------------------------------------------------------------------------


def test_batches_cover_each_sample_once(synthetic: tuple[Split, Split]) -> None:
    split = synthetic[1]
    g = torch.Generator().manual_seed(0)
    batches = list(iterate_batches(split, 128, shuffle=True, generator=g))
    assert [len(b) for b in batches] == [128] * 7 + [104]
    idx = torch.cat([b.index for b in batches])
    assert not torch.equal(idx, torch.arange(1000))  # shuffled
    assert torch.equal(idx.sort().values, torch.arange(1000))
    for b in batches[:2]:
        assert isinstance(b, Batch) and b.x.dtype == torch.float32
        assert torch.equal(b.x, split.x[b.index].float() / 255)
        assert torch.equal(b.y, split.y[b.index]) and torch.equal(b.true_y, split.true_y[b.index])
    dropped = list(iterate_batches(split, 128, shuffle=True, drop_last=True, generator=g))
    assert [len(b) for b in dropped] == [128] * 7
    plain = list(iterate_batches(split, 300))
    assert torch.equal(torch.cat([b.index for b in plain]), torch.arange(1000))


def test_batches_deterministic_with_generator(synthetic: tuple[Split, Split]) -> None:
    split = synthetic[1].subset(slice(0, 300))

    def epoch(seed: int) -> list[Batch]:
        g = torch.Generator().manual_seed(seed)
        return list(iterate_batches(split, 64, shuffle=True, augment=True, generator=g))

    a, b, c = epoch(1), epoch(1), epoch(2)
    assert all(torch.equal(p.x, q.x) and torch.equal(p.index, q.index) for p, q in zip(a, b))
    assert not torch.equal(a[0].index, c[0].index)
    assert a[0].x.shape == (64, 3, 32, 32) and 0 <= a[0].x.min() and a[0].x.max() <= 1
    assert not torch.equal(a[0].x, split.x[a[0].index].float() / 255)  # augmented


def test_batches_float_split_channels_last_and_errors() -> None:
    split = _tiny_split(10, torch.float32)
    (b,) = list(iterate_batches(split, 16, channels_last=True))
    assert b.x.is_contiguous(memory_format=torch.channels_last) and torch.equal(b.x, split.x)
    b.x.zero_()
    b.y.zero_()
    assert split.x.sum() > 0 and int(split.y.sum()) > 0  # batches never alias the split
    empty = split.subset(slice(0, 0))
    assert list(iterate_batches(empty, 4, shuffle=True)) == []
    with pytest.raises(AtprobeError, match="batch_size"):
        iterate_batches(split, 0)  # raised at the call, not at the first batch


def _reference_crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    out = torch.empty_like(x)
    h, w = x.shape[2:]
    for i in range(x.shape[0]):
        p = F.pad(x[i], (padding,) * 4)
        oy, ox = int(offsets[i, 0]), int(offsets[i, 1])
        crop = p[:, oy : oy + h, ox : ox + w]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_crop_flip_matches_reference(dtype: torch.dtype) -> None:
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = x if dtype == torch.uint8 else x.float() / 255
    out = random_crop_flip(x, torch.Generator().manual_seed(5), padding=4)
    offsets, flips = data_batches._draw_crop_flip(64, 4, torch.Generator().manual_seed(5), x.device)
    assert int(offsets.min()) == 0 and int(offsets.max()) == 8 and 0 < int(flips.sum()) < 64
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, _reference_crop_flip(x, offsets, flips, 4))
    assert torch.equal(data_batches._crop_flip_with(x, offsets, flips, 4), out)


def test_crop_flip_identity_and_pure_flip() -> None:
    x = torch.rand(5, 3, 7, 9)
    zeros, no = torch.zeros(5, 2, dtype=torch.int64), torch.zeros(5, dtype=torch.bool)
    assert torch.equal(data_batches._crop_flip_with(x, zeros, no, 0), x)
    assert torch.equal(data_batches._crop_flip_with(x, zeros, ~no, 0), x.flip(-1))
    centre = torch.full((5, 2), 2, dtype=torch.int64)  # offset == padding: no shift
    assert torch.equal(data_batches._crop_flip_with(x, centre, no, 2), x)
    with pytest.raises(AtprobeError, match="padding"):
        random_crop_flip(x, padding=-1)
