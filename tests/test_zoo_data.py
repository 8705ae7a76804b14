"""The data formats people publish: each written here in its exact released layout (small N),
read back through ``load_dataset`` (and the CLI), and compared with the arrays written (numpy).

* generated-data ``.npz`` (Wang et al. 2023 / DeepMind ``1m.npz``): ``image`` uint8 NHWC, ``label``;
* ``x``/``y`` and torchvision-style ``data``/``targets`` archives, NCHW or NHWC;
* TRADES' ``data_attack/cifar10_X.npy`` (float32 NHWC in [0, 1]) + ``cifar10_Y.npy``;
* CIFAR-10-C / CIFAR-100-C: ``<corruption>.npy`` (5 severities stacked, uint8 NHWC) + ``labels.npy``;
* ``--labels FILE.npy``: memorization-AT's ``noisy_label.npy`` (int64, one label per train image).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from atprobe.checkpoint import load_checkpoint
from atprobe.data import CORRUPTIONS, PROBE_DATASETS, TEST_ONLY_DATASETS, load_dataset, read_label_file
from atprobe.data.corrupted import CORRUPTED
from atprobe.data.npz import label_file_of
from atprobe.errors import AtprobeError
from atprobe.study import SampleSpec, Study
from tests.conftest import cli_error, run_cli, save_seeded_checkpoint
from tests.test_data import write_cifar10, write_cifar100

RNG = np.random.default_rng(18)


def _nhwc(n: int, h: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, (n, h, h, 3), dtype=np.uint8)


def _nchw(x_nhwc: np.ndarray) -> np.ndarray:
    return x_nhwc.transpose(0, 3, 1, 2)


# ---------------------------------------------------------------------------- archives


@pytest.mark.parametrize("label_dtype", [np.int64, np.uint8, np.int32])
def test_generated_data_npz_image_label(tmp_path: Path, label_dtype) -> None:
    """The generated-data releases: ``np.savez(image=uint8 (N, 32, 32, 3), label=(N,))``."""
    image, label = _nhwc(12), RNG.integers(0, 10, 12).astype(label_dtype)
    np.savez(tmp_path / "1m.npz", image=image, label=label)
    ds = load_dataset("npz", tmp_path / "1m.npz")
    assert ds.train.x.dtype == torch.uint8 and ds.train.x.shape == (12, 3, 32, 32) and ds.train.x.is_contiguous()
    np.testing.assert_array_equal(ds.train.x.numpy(), _nchw(image))
    assert ds.train.y.dtype == torch.int64
    np.testing.assert_array_equal(ds.train.y.numpy(), label.astype(np.int64))
    assert torch.equal(ds.test.x, ds.train.x)  # no test arrays: the file is both splits
    assert ds.num_classes == int(label.max()) + 1


def test_data_targets_and_test_partners(tmp_path: Path) -> None:
    """torchvision-style ``data``/``targets`` (NHWC uint8), with ``data_test``/``targets_test``."""
    data, targets, data_t, targets_t = _nhwc(6), np.arange(6) % 3, _nhwc(4), np.array([2, 1, 0, 1])
    np.savez(tmp_path / "d.npz", data=data, targets=targets, data_test=data_t, targets_test=targets_t)
    ds = load_dataset("npz", tmp_path / "d.npz")
    np.testing.assert_array_equal(ds.train.x.numpy(), _nchw(data))
    np.testing.assert_array_equal(ds.test.x.numpy(), _nchw(data_t))
    np.testing.assert_array_equal(ds.test.y.numpy(), targets_t)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_x_y_either_layout_either_dtype(tmp_path: Path, dtype, layout: str) -> None:
    nhwc = _nhwc(5)
    x = nhwc if dtype == np.uint8 else (nhwc / 255).astype(dtype)
    if layout == "nchw":
        x = _nchw(x).copy()
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 3, 4]))
    got = load_dataset("npz", tmp_path / "d.npz").train.x
    assert got.shape == (5, 3, 32, 32)
    if dtype == np.uint8:
        assert got.dtype == torch.uint8
        np.testing.assert_array_equal(got.numpy(), _nchw(nhwc))
    else:
        assert got.dtype == torch.float32
        np.testing.assert_array_equal(got.numpy(), _nchw((nhwc / 255).astype(dtype)).astype(np.float32))


def test_uint8_channel_stats_match_numpy() -> None:
    """The histogram statistics of uint8 images against float64 numpy, over several chunks,
    on skewed channels (a near-constant one, a two-valued one)."""
    from atprobe.data.load import _channel_stats

    x = RNG.integers(0, 256, (37, 3, 5, 7), dtype=np.uint8)
    x[:, 1] = 200
    x[0, 1, 0, 0] = 3
    x[:, 2] = np.where(RNG.random((37, 5, 7)) < 0.1, 255, 0)
    mean, std = _channel_stats(torch.from_numpy(x), chunk=8)
    xf = x.astype(np.float64) / 255
    np.testing.assert_allclose(mean, xf.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(std, xf.std(axis=(0, 2, 3)), rtol=1e-11)


# ---------------------------------------------------------------------------- .npy pairs (TRADES)


def test_trades_npy_pair(tmp_path: Path) -> None:
    """TRADES' ``data_attack/cifar10_X.npy``: float32 (N, 32, 32, 3) in [0, 1]; ``cifar10_Y.npy``: (N,) int64."""
    folder = tmp_path / "data_attack"
    folder.mkdir()
    x = RNG.random((7, 32, 32, 3), dtype=np.float32)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 0.0, 1.0  # both ends of the range are valid
    y = RNG.integers(0, 10, 7).astype(np.int64)
    np.save(folder / "cifar10_X.npy", x)
    np.save(folder / "cifar10_Y.npy", y)
    ds = load_dataset("npz", folder / "cifar10_X.npy")
    assert ds.test.x.dtype == torch.float32 and ds.test.x.shape == (7, 3, 32, 32) and ds.test.x.is_contiguous()
    np.testing.assert_array_equal(ds.test.x.numpy(), _nchw(x))
    np.testing.assert_array_equal(ds.test.y.numpy(), y)
    assert torch.equal(ds.train.x, ds.test.x)
    ds.test.x[0, 0, 0, 0] = 0.5  # the tensor owns its memory: the memory-mapped file is untouched
    assert np.load(folder / "cifar10_X.npy")[0, 0, 0, 0] == 0.0


@pytest.mark.parametrize("name,labels", [("cifar10_X.npy", "cifar10_Y.npy"), ("x.npy", "y.npy"),
                                         ("x_test.npy", "y_test.npy"), ("my_X_set.npy", "my_Y_set.npy")])
def test_label_file_of(name: str, labels: str) -> None:
    assert label_file_of(Path("d") / name) == Path("d") / labels


# ---------------------------------------------------------------------------- bad archives and arrays


@pytest.mark.parametrize(
    "arrays,match",
    [
        ({"images": np.zeros((2, 32, 32, 3), np.uint8), "labels": np.zeros(2, int)},
         "named x/y, image/label, data/targets; the file has images, labels"),
        ({"x": np.zeros((2, 32, 32, 3), np.uint8), "y": np.zeros(2, int), "image": np.zeros((2, 32, 32, 3), np.uint8),
          "label": np.zeros(2, int)}, r"several image/label pairs \(x/y, image/label\)"),
        ({"image": np.zeros((2, 32, 32, 5), np.uint8), "label": np.zeros(2, int)}, r"N x 32 x 32 x 3"),
        ({"image": np.zeros((2, 3, 32, 3), np.uint8), "label": np.zeros(2, int)}, "could be NHWC or NCHW"),
        ({"image": np.full((2, 32, 32, 3), 255.0, np.float32), "label": np.zeros(2, int)},
         r"\[0, 1\], got values in \[255, 255\].*store them as uint8"),
        ({"image": np.full((2, 3, 32, 32), -0.5, np.float32), "label": np.zeros(2, int)}, r"\[-0.5, -0.5\]"),
        ({"image": np.zeros((2, 32, 32, 3), np.uint8), "label": np.zeros(3, int)}, "2 images but 3 labels"),
        ({"image": np.zeros((2, 32, 32, 3), np.uint8), "label": np.zeros(2)}, "integer vector"),
        ({"image": np.zeros((2, 32, 32, 3), np.uint8), "label": np.zeros(2, int),
          "image_test": np.zeros((1, 32, 32, 3))}, "image_test without its partner"),
    ],
)
def test_bad_archives_one_line(tmp_path: Path, arrays: dict, match: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(AtprobeError, match=match) as err:
        load_dataset("npz", tmp_path / "bad.npz")
    assert "\n" not in str(err.value)


def test_bad_npy_pairs(tmp_path: Path) -> None:
    np.save(tmp_path / "images.npy", np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(AtprobeError, match="call the pair like cifar10_X.npy and cifar10_Y.npy"):
        load_dataset("npz", tmp_path / "images.npy")
    np.save(tmp_path / "a_X.npy", np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(AtprobeError, match="missing file .*a_Y.npy"):
        load_dataset("npz", tmp_path / "a_X.npy")
    np.save(tmp_path / "a_Y.npy", np.zeros(3, np.int64))
    with pytest.raises(AtprobeError, match="a_X.npy: 2 images but 3 labels|a_Y.npy: 2 images but 3 labels"):
        load_dataset("npz", tmp_path / "a_X.npy")
    np.save(tmp_path / "b_X.npy", np.array([None, None], dtype=object), allow_pickle=True)
    with pytest.raises(AtprobeError, match="b_X.npy: not a .npy array"):  # never unpickled
        load_dataset("npz", tmp_path / "b_X.npy")
    np.savez(tmp_path / "c_X.npy", x=np.zeros(1))  # savez appends .npz
    (tmp_path / "c_X.npy.npz").rename(tmp_path / "c_X.npy")
    with pytest.raises(AtprobeError, match="an .npz archive, expected one .npy array"):
        load_dataset("npz", tmp_path / "c_X.npy")


# ---------------------------------------------------------------------------- CIFAR-10-C / CIFAR-100-C


def write_corrupted(folder: Path, corruptions: tuple[str, ...], per_severity: int, classes: int = 10,
                    label_dtype=np.uint8) -> dict[str, np.ndarray]:
    """A CIFAR-10-C-style folder: ``<corruption>.npy`` uint8 (5 * per_severity, 32, 32, 3) and
    ``labels.npy`` (5 * per_severity,), the test labels repeated once per severity as released."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {"labels": np.tile(RNG.integers(0, classes, per_severity), 5).astype(label_dtype)}
    np.save(folder / "labels.npy", out["labels"])
    for c in corruptions:
        out[c] = _nhwc(5 * per_severity)
        np.save(folder / f"{c}.npy", out[c])
    return out


def test_corruption_names() -> None:
    assert len(CORRUPTIONS) == 19 and len(set(CORRUPTIONS)) == 19
    assert CORRUPTIONS[:3] == ("gaussian_noise", "shot_noise", "impulse_noise")
    assert CORRUPTIONS[15:] == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert tuple(CORRUPTED) == TEST_ONLY_DATASETS and set(TEST_ONLY_DATASETS) <= set(PROBE_DATASETS)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_cifar10c_severity_rows(tmp_path: Path, severity: int) -> None:
    clean = write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=2, n_test=4)
    c = write_corrupted(tmp_path / "CIFAR-10-C", ("fog", "gaussian_noise"), per_severity=4)
    ds = load_dataset("cifar10c", tmp_path, corruption="fog", severity=severity)
    rows = slice((severity - 1) * 4, severity * 4)
    assert ds.test.x.dtype == torch.uint8 and ds.test.x.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(ds.test.x.numpy(), _nchw(c["fog"][rows]))
    assert ds.test.y.dtype == torch.int64
    np.testing.assert_array_equal(ds.test.y.numpy(), c["labels"][rows])
    np.testing.assert_array_equal(ds.test.index.numpy(), np.arange(4))
    # train, class names and statistics: the clean CIFAR-10's
    np.testing.assert_array_equal(ds.train.x.numpy(), clean["x_train"])
    np.testing.assert_array_equal(ds.train.y.numpy(), clean["y_train"])
    assert ds.num_classes == 10 and ds.class_names[0] == "airplane"
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.name == f"cifar10c:fog:{severity}"
    other = load_dataset("cifar10c", tmp_path, corruption="gaussian_noise", severity=severity)
    np.testing.assert_array_equal(other.test.x.numpy(), _nchw(c["gaussian_noise"][rows]))


def test_cifar10c_folder_given_directly_and_cifar100c(tmp_path: Path) -> None:
    """``data_dir`` may be the release folder itself: the clean dataset is then looked up above it."""
    write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=1, n_test=2)
    c = write_corrupted(tmp_path / "CIFAR-10-C", ("saturate",), per_severity=2, label_dtype=np.int64)
    ds = load_dataset("cifar10c", tmp_path / "CIFAR-10-C", corruption="saturate", severity=2, val_size=2)
    np.testing.assert_array_equal(ds.test.x.numpy(), _nchw(c["saturate"][2:4]))
    assert len(ds.train) == 3 and len(ds.val) == 2  # carved from the clean train split

    clean = write_cifar100(tmp_path / "cifar-100-python", n_train=5, n_test=3)
    c = write_corrupted(tmp_path / "CIFAR-100-C", ("jpeg_compression",), per_severity=3, classes=100)
    ds = load_dataset("cifar100c", tmp_path, corruption="jpeg_compression", severity=4)
    np.testing.assert_array_equal(ds.test.x.numpy(), _nchw(c["jpeg_compression"][9:12]))
    np.testing.assert_array_equal(ds.test.y.numpy(), c["labels"][9:12])
    np.testing.assert_array_equal(ds.train.y.numpy(), clean["y_train"])
    assert ds.num_classes == 100


def test_cifar10c_bad_input_one_line(tmp_path: Path) -> None:
    def fails(match: str, name: str = "cifar10c", root: Path = tmp_path, **kw) -> None:
        with pytest.raises(AtprobeError, match=match) as err:
            load_dataset(name, root, **kw)
        assert "\n" not in str(err.value)

    fails("unknown corruption 'fogg': choose from gaussian_noise, shot_noise, .*, saturate", corruption="fogg",
          severity=1)
    fails("cifar10c needs --corruption NAME, one of gaussian_noise", severity=1)
    fails("cifar10c needs --severity K", corruption="fog")
    for bad in (0, 6, 2.0, True):
        fails(r"--severity must be one of 1, 2, 3, 4, 5", corruption="fog", severity=bad)
    fails("apply to cifar10c, cifar100c only, not to cifar10", name="cifar10", corruption="fog", severity=1)
    fails("CIFAR-10-C not found: no labels.npy in .*zenodo.org/records/2535967", corruption="fog", severity=1)
    write_corrupted(tmp_path / "CIFAR-10-C", ("fog",), per_severity=2)
    fails("snow.npy is missing; .* holds fog", corruption="snow", severity=1)
    fails("cifar10c takes its train split from the clean cifar10: CIFAR-10 not found", corruption="fog", severity=1)
    write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=1, n_test=2)
    np.save(tmp_path / "CIFAR-10-C" / "frost.npy", _nhwc(7))
    fails(r"five severities stacked.*\(7, 32, 32, 3\)", corruption="frost", severity=1)
    np.save(tmp_path / "CIFAR-10-C" / "frost.npy", _nhwc(5))
    fails("5 images in frost.npy but 10 labels", corruption="frost", severity=1)
    np.save(tmp_path / "CIFAR-10-C" / "labels.npy", np.full(10, 10, np.uint8))
    fails(r"labels must be in 0..9, got up to 10", corruption="fog", severity=1)


# ---------------------------------------------------------------------------- --labels FILE.npy


@pytest.fixture
def synthetic_ckpt(tmp_path: Path) -> Path:
    return save_seeded_checkpoint(tmp_path / "m" / "a.pt", seed=3, dataset="synthetic", epoch=1)


def test_label_file_relabels_train_and_val(tmp_path: Path, synthetic_ckpt: Path) -> None:
    """memorization-AT's ``noisy_label.npy``: ``np.save`` of an int64 (N,) vector of the train labels."""
    n_train = len(load_dataset("synthetic").train)
    noisy = RNG.integers(0, 10, n_train).astype(np.int64)
    np.save(tmp_path / "noisy_label.npy", noisy)
    assert torch.equal(read_label_file(tmp_path / "noisy_label.npy"), torch.from_numpy(noisy))
    spec = SampleSpec(split="train", n=50, labels=str(tmp_path / "noisy_label.npy"))
    study = Study([synthetic_ckpt])
    ckpt = study.checkpoints[0]
    assert spec.labels_used(ckpt) == "file"
    samples = study.samples(ckpt, spec)
    np.testing.assert_array_equal(samples.y.numpy(), noisy[:50])
    np.testing.assert_array_equal(samples.true_y.numpy(), study.dataset.train.true_y[:50].numpy())
    # a (N, 1) column works too, and a carved validation split keeps each row's label
    np.save(tmp_path / "col.npy", noisy.reshape(-1, 1).astype(np.int32))
    val_ckpt = save_seeded_checkpoint(tmp_path / "v" / "b.pt", seed=3, dataset="synthetic",
                                      train_config={"val_size": 100, "val_seed": 5})
    val_study = Study([val_ckpt])
    val = val_study.samples(val_study.checkpoints[0], SampleSpec(split="val", n=20, labels=str(tmp_path / "col.npy")))
    np.testing.assert_array_equal(val.y.numpy(), noisy[val.index.numpy()])


def test_label_file_bad_input_one_line(tmp_path: Path, synthetic_ckpt: Path) -> None:
    n_train = len(load_dataset("synthetic").train)
    study = Study([synthetic_ckpt])

    def fails(match: str, array: np.ndarray | None = None, name: str = "l.npy", split: str = "train") -> None:
        path = tmp_path / name
        if array is not None:
            np.save(path, array)
        with pytest.raises(AtprobeError, match=match) as err:
            study.base(SampleSpec(split=split, n=10, labels=str(path)))
        assert "\n" not in str(err.value)

    fails(r"--labels .*l.npy must cover the whole original train split \(4000,\), got \(3999,\)",
          np.zeros(n_train - 1, np.int64))
    fails("labels must be integers, got dtype float32", np.zeros(n_train, np.float32))
    fails(r"labels must be a vector \(N,\), got shape \(2, 2000\)", np.zeros((2, n_train // 2), np.int64))
    fails(r"must be in 0..9, got 0..10", np.r_[np.zeros(n_train - 1, np.int64), [10]])
    fails("missing file", name="nope.npy")
    fails("a label file relabels the train split", np.zeros(n_train, np.int64), split="test")
    fails("the labels must be trained, true or the path of a .npy file of labels, got '.*treu'", name="treu")


# ---------------------------------------------------------------------------- through the CLI


def _natural(ckpt: Path, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Accuracy and mean CE of the checkpoint's model on NCHW images in [0, 1], by hand."""
    model = load_checkpoint(ckpt).build_model().eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(x, dtype=torch.float32))
    target = torch.as_tensor(y, dtype=torch.int64)
    acc = (logits.argmax(1) == target).double().mean().item()
    return acc, torch.nn.functional.cross_entropy(logits.double(), target).item()


def _eval(ckpt: Path, out: Path, *args) -> pd.Series:
    run_cli("eval", ckpt, "--attack", "natural", "--device", "cpu", "-q", "-o", out, *args)
    return pd.read_csv(out).iloc[0]


def test_cli_generated_npz_and_trades_npy(tmp_path: Path, synthetic_ckpt: Path) -> None:
    image, label = _nhwc(24), RNG.integers(0, 10, 24)
    label[:10] = np.arange(10)
    np.savez(tmp_path / "1m.npz", image=image, label=label)
    row = _eval(synthetic_ckpt, tmp_path / "gen.csv", "--dataset", "npz", "--data-dir", tmp_path / "1m.npz")
    acc, loss = _natural(synthetic_ckpt, _nchw(image) / 255, label)
    assert row["n"] == 24 and row["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert row["loss"] == pytest.approx(loss, rel=1e-5)

    x = (_nhwc(16) / 255).astype(np.float32)
    np.save(tmp_path / "cifar10_X.npy", x)
    np.save(tmp_path / "cifar10_Y.npy", np.r_[np.arange(10), np.arange(6)].astype(np.int64))
    row = _eval(synthetic_ckpt, tmp_path / "trades.csv", "--dataset", "npz", "--data-dir", tmp_path / "cifar10_X.npy")
    acc, loss = _natural(synthetic_ckpt, _nchw(x), np.r_[np.arange(10), np.arange(6)])
    assert row["n"] == 16 and row["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert row["loss"] == pytest.approx(loss, rel=1e-5)


def test_cli_cifar10c(tmp_path: Path, synthetic_ckpt: Path) -> None:
    write_cifar10(tmp_path / "data" / "cifar-10-batches-py", per_batch=1, n_test=2)
    c = write_corrupted(tmp_path / "data" / "CIFAR-10-C", ("motion_blur",), per_severity=6)
    out = tmp_path / "c.csv"
    row = _eval(synthetic_ckpt, out, "--dataset", "cifar10c", "--data-dir", tmp_path / "data",
                "--corruption", "motion_blur", "--severity", "2")
    acc, loss = _natural(synthetic_ckpt, _nchw(c["motion_blur"][6:12]) / 255, c["labels"][6:12])
    assert row["n"] == 6 and row["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert row["loss"] == pytest.approx(loss, rel=1e-5)
    meta = json.loads(out.with_name("c.meta.json").read_text())
    assert meta["config"]["dataset"] == "cifar10c:motion_blur:2"

    base = ["eval", synthetic_ckpt, "--device", "cpu", "-o", tmp_path / "bad.csv", "--data-dir", tmp_path / "data"]
    assert "unknown corruption 'blur': choose from gaussian_noise" in cli_error(
        *base, "--dataset", "cifar10c", "--corruption", "blur", "--severity", "2")
    assert "--severity must be one of 1, 2, 3, 4, 5, got 9" in cli_error(
        *base, "--dataset", "cifar10c", "--corruption", "fog", "--severity", "9")
    assert "apply to cifar10c, cifar100c only" in cli_error(*base, "--corruption", "fog", "--severity", "1")
    assert not (tmp_path / "bad.csv").exists()


def test_cli_labels_file(tmp_path: Path, synthetic_ckpt: Path) -> None:
    ds = load_dataset("synthetic")
    noisy = RNG.integers(0, 10, len(ds.train)).astype(np.int64)
    np.save(tmp_path / "noisy_label.npy", noisy)
    out = tmp_path / "l.csv"
    row = _eval(synthetic_ckpt, out, "--split", "train", "--n", "40", "--labels", tmp_path / "noisy_label.npy")
    acc, loss = _natural(synthetic_ckpt, ds.train.x[:40].numpy() / 255, noisy[:40])
    assert json.loads(out.with_name("l.meta.json").read_text())["config"]["labels"] == str(tmp_path / "noisy_label.npy")
    assert row["accuracy"] == pytest.approx(acc, abs=1e-12) and row["loss"] == pytest.approx(loss, rel=1e-5)
    np.save(tmp_path / "short.npy", noisy[:-1])
    line = cli_error("eval", synthetic_ckpt, "--split", "train", "--labels", tmp_path / "short.npy",
                     "--device", "cpu", "-o", tmp_path / "bad.csv")
    assert "must cover the whole original train split (4000,), got (3999,)" in line
    line = cli_error("eval", synthetic_ckpt, "--labels", tmp_path / "noisy_label.npy", "--device", "cpu",
                     "-o", tmp_path / "bad.csv")
    assert "the test split keeps its true labels" in line
    line = cli_error("eval", synthetic_ckpt, "--labels", "noisy", "--device", "cpu", "-o", tmp_path / "bad.csv")
    assert line.endswith("Invalid value for '--labels': the labels must be trained, true or the path of a .npy file "
                         "of labels, got 'noisy'")
    assert not (tmp_path / "bad.csv").exists()
