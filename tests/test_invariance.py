"""Same seed, same table: whatever the batch size or chunk size, and one threat model that
means the same in every command (``atprobe.threat``, ``atprobe.starts``, ``atprobe.attacked``)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from atprobe.checkpoint import make_checkpoint, save_checkpoint
from atprobe.models import build_model
from tests.conftest import randomize_bn, run_cli

ARCH = {"num_classes": 10}


def _save(path, seed, epoch):
    torch.manual_seed(seed)
    model = randomize_bn(build_model("cnn-small", **ARCH), seed=seed)
    save_checkpoint(make_checkpoint(model, arch="cnn-small", arch_kwargs=ARCH, dataset="synthetic", epoch=epoch),
                    path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("inv")
    return {"a": _save(root / "a.pt", 0, 1), "b": _save(root / "b.pt", 1, 2)}


def _commands(c):
    a, b = str(c["a"]), str(c["b"])
    return {
        # name: (argv, output kind, relative tolerance of the float columns)
        "eval": (["eval", a, b, "--n", "30", "--attack", "natural,pgd3,pgd2x2,cw2"], "file", 1e-6),
        "hardness": (["hardness", a, b, "--n", "30", "--attack", "pgd2x2"], "dir", 1e-6),
        "complexity margin": (["complexity", a, "--measures", "margin,gap", "--n", "30", "--steps", "2",
                               "--restarts", "2"], "file", 1e-6),
        # per-sample gradients come out of batched GEMMs whose blocking follows the chunk. At
        # these untrained models TRADES' KL and its input gradient are ~1e-5: the sign step of
        # its attack follows rounding-level gradients, so KL rows agree to an absolute 2e-5
        "gradnorm": (["gradnorm", a, "--n", "12", "--steps", "1", "--per-sample"], "file", 1e-5),
        "stability": (["stability", a, "--n", "12", "--steps", "1", "--lambdas=-0.01,0,0.01",
                       "--losses", "pgd_at,trades,clean"], "file", 1e-5),
        "gradcos": (["gradcos", a, b, "--n", "12", "--steps", "1"], "file", 1e-5),
    }


def _tables(kind, out):
    files = sorted(out.glob("*.csv")) if kind == "dir" else sorted(out.parent.glob(out.stem + "*.csv"))
    assert files
    return {f.name: f for f in files}


def _run(argv, kind, out, *extra):
    target = ["--out", out] if kind == "dir" else ["-o", out]
    run_cli(*argv, *target, *extra, "--device", "cpu", "--seed", "3", "-q")
    return _tables(kind, out)


@pytest.mark.parametrize("name", ["eval", "hardness", "complexity margin", "gradnorm", "stability", "gradcos"])
def test_same_table_whatever_the_batch_size(name, ckpts, tmp_path):
    """--batch-size 7 and 64 (and, for the gradient probes, --chunk-size 3) give the same CSV:
    every count, label, rank, accuracy and name exactly, every float to the rounding of
    batched float32 kernels (CPU GEMM and convolution kernels block over the batch, so a
    logit can differ in its last bit between batch shapes). Before starts were keyed per
    sample, one generator per batch made the random starts, and with them every adversarial
    loss, depend on the batch size. Byte identity is not claimed: it would need
    batch-invariant BLAS kernels."""
    argv, kind, rtol = _commands(ckpts)[name]
    suffix = "" if kind == "dir" else ".csv"
    small = _run(argv, kind, tmp_path / f"b7{suffix}", "--batch-size", "7")
    large = _run(argv, kind, tmp_path / f"b64{suffix}", "--batch-size", "64")
    runs = [large]
    if name in ("gradnorm", "stability", "gradcos"):
        runs.append(_run(argv, kind, tmp_path / f"c3{suffix}", "--batch-size", "64", "--chunk-size", "3"))
    for other in runs:
        assert len(small) == len(other)
        for (fa, pa), (_fb, pb) in zip(sorted(small.items()), sorted(other.items())):
            ta, tb = pd.read_csv(pa), pd.read_csv(pb)
            assert list(ta.columns) == list(tb.columns)
            for col in ta.columns:
                if col in ("accuracy", "adv_correct", "rank", "n", "top_k_overlap"):
                    pd.testing.assert_series_equal(ta[col], tb[col], check_exact=True, obj=f"{name} {fa} {col}")
                elif pd.api.types.is_float_dtype(ta[col]):
                    atol = 1e-9 if rtol < 1e-5 else 2e-5
                    pd.testing.assert_series_equal(ta[col], tb[col], rtol=rtol, atol=atol, obj=f"{name} {fa} {col}")
                else:
                    assert ta[col].tolist() == tb[col].tolist(), (name, fa, col)


def test_an_eps_means_the_same_step_everywhere(ckpts, tmp_path):
    """--eps 16/255 gives step eps/4 = 4/255 in every command (read back from its record)."""
    a, b = str(ckpts["a"]), str(ckpts["b"])
    threat = ["--eps", "16/255", "--steps", "1"]
    commands = {
        "eval": ["eval", a, "--n", "4", "--attack", "pgd"],
        "hardness": ["hardness", a, b, "--n", "4", "--attack", "pgd"],
        "complexity": ["complexity", a, "--measures", "margin", "--n", "4"],
        "gradnorm": ["gradnorm", a, "--n", "2"],
        "stability": ["stability", a, "--n", "2", "--lambdas=-0.01,0,0.01", "--losses", "pgd_at"],
        "gradcos": ["gradcos", a, b, "--n", "2"],
        "curvature": ["curvature", a, "--n", "2", "--at", "adv", "--iterations", "2"],
        "hessian": ["hessian", a, "--n", "4", "--batch-size", "4", "--iterations", "2", "--trace-samples", "2",
                    "--blocks", "none"],
        "flatness": ["flatness", a, "--n", "4", "--lambdas=-0.1,0,0.1", "--directions", "1"],
    }
    steps = {}
    for name, argv in commands.items():
        if name == "hardness":
            out = tmp_path / name
            run_cli(*argv, *threat, "--out", out, "--device", "cpu", "-q")
            meta = json.loads((out / "consistency.meta.json").read_text())
        else:
            out = tmp_path / f"{name}.csv"
            run_cli(*argv, *threat, "-o", out, "--device", "cpu", "-q")
            meta = json.loads(out.with_name(f"{name}.meta.json").read_text())
        steps[name] = (meta["threat"]["norm"], meta["threat"]["eps"], meta["threat"]["alpha"])
    run = tmp_path / "run"
    run_cli("train", "--out", run, "--epochs", "1", "--train-n", "64", "--batch-size", "32", "--eval-n", "16",
            "--eval-attack", "pgd1", *threat, "--device", "cpu", "-q")
    saved = json.loads((run / "config.json").read_text())["threat"]
    steps["train"] = (saved["norm"], saved["eps"], saved["alpha"])
    assert set(steps.values()) == {("linf", 16 / 255, 4 / 255)}, steps
    eval_rows = pd.read_csv(tmp_path / "eval.csv")
    assert eval_rows["alpha"].tolist() == [4 / 255]  # the step the attack actually took
