"""Checkpoint round trip, atomic writes, foreign layouts and every malformed case."""

from __future__ import annotations

import collections
import os
import pickle

import pytest
import torch

from atprobe.checkpoint import FORMAT, load_checkpoint, make_checkpoint, save_checkpoint
from atprobe.errors import AtprobeError
from atprobe.models import build_model


class NotAllowed:  # a class torch.load(weights_only=True) must refuse to construct
    def __init__(self):
        self.payload = 1


def _native(tmp_path, arch="mlp", num_classes=10):
    torch.manual_seed(0)
    kwargs = {"num_classes": num_classes, "dropout": 0.0, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    model = build_model(arch, **kwargs)
    labels = torch.randint(0, num_classes, (50,))
    ckpt = make_checkpoint(model, arch=arch, arch_kwargs=kwargs, dataset="synthetic", labels=labels,
                           label_spec={"label_noise": 0.5, "label_seed": 3}, train_config={"lr": 0.1},
                           epoch=7, optimizer={"state": {}, "param_groups": []},
                           rng={"torch": torch.get_rng_state()})
    path = save_checkpoint(ckpt, tmp_path / "model.pt")
    return model, labels, path


def test_native_round_trip(tmp_path):
    model, labels, path = _native(tmp_path)
    raw = torch.load(path, weights_only=True)  # the documented promise
    assert raw["format"] == FORMAT and raw["epoch"] == 7
    ck = load_checkpoint(path)
    assert ck.native and ck.arch == "mlp" and ck.num_classes == 10 and ck.dataset == "synthetic"
    assert torch.equal(ck.labels, labels) and ck.label_spec == {"label_noise": 0.5, "label_seed": 3}
    assert ck.train_config == {"lr": 0.1} and len(ck.sha256) == 64
    rebuilt = ck.build_model()
    x = torch.rand(3, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_native_disagreements_are_errors(tmp_path):
    _, _, path = _native(tmp_path)
    with pytest.raises(AtprobeError, match="not a cnn-small"):
        load_checkpoint(path, arch="cnn-small")
    with pytest.raises(AtprobeError, match="classes"):
        load_checkpoint(path, num_classes=100)


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "module_prefix", "compiled", "ordered"])
def test_foreign_layouts(tmp_path, layout):
    torch.manual_seed(1)
    model = build_model("cnn-small", num_classes=7)
    state = model.state_dict()
    if layout == "state_dict":
        obj = {"state_dict": state, "epoch": 3, "best_acc": 0.5}
    elif layout == "model":
        obj = {"model": state}
    elif layout == "module_prefix":
        obj = {"state_dict": {"module." + k: v for k, v in state.items()}}
    elif layout == "compiled":
        obj = {"_orig_mod." + k: v for k, v in state.items()}
    elif layout == "ordered":
        obj = collections.OrderedDict(state)
    else:
        obj = dict(state)
    torch.save(obj, tmp_path / "foreign.pt")
    ck = load_checkpoint(tmp_path / "foreign.pt", arch="cnn-small", dataset="cifar10")
    assert not ck.native and ck.num_classes == 7 and ck.dataset == "cifar10"
    x = torch.rand(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(ck.build_model()(x), model(x), rtol=0, atol=0)


def test_foreign_needs_arch(tmp_path):
    torch.save(build_model("mlp").state_dict(), tmp_path / "w.pt")
    with pytest.raises(AtprobeError, match="--arch"):
        load_checkpoint(tmp_path / "w.pt")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize("case,pattern", [
    ("missing_keys", "missing key"),
    ("unexpected_keys", "unexpected key"),
    ("wrong_shape", "shape mismatch"),
    ("wrong_arch", "do not fit"),
])
def test_weights_that_do_not_fit(tmp_path, case, pattern):
    state = build_model("mlp").state_dict()
    if case == "missing_keys":
        state.pop(next(iter(state)))
    elif case == "unexpected_keys":
        state["extra.weight"] = torch.zeros(3)
    elif case == "wrong_shape":
        key = next(k for k in state if k.endswith("weight"))
        state[key] = torch.zeros(5, 5)
    torch.save(state, tmp_path / "w.pt")
    arch = "cnn-small" if case == "wrong_arch" else "mlp"
    with pytest.raises(AtprobeError, match=pattern) as exc:
        load_checkpoint(tmp_path / "w.pt", arch=arch, num_classes=10)
    _one_line(exc)


def test_malformed_files(tmp_path):
    cases = {}
    (tmp_path / "random.pt").write_bytes(os.urandom(2000))
    cases["random.pt"] = "not a readable"
    _, _, good = _native(tmp_path)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    cases["truncated.pt"] = "not a readable"
    (tmp_path / "text.pt").write_text("hello\n")
    cases["text.pt"] = "not a readable"
    torch.save({"net": NotAllowed()}, tmp_path / "code.pt")
    cases["code.pt"] = "would run code"
    with open(tmp_path / "plain_pickle.pt", "wb") as f:
        pickle.dump(NotAllowed(), f)
    cases["plain_pickle.pt"] = "would run code"
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    cases["tensor.pt"] = "not a checkpoint"
    torch.save({"epoch": 3, "acc": 0.5}, tmp_path / "nostate.pt")
    cases["nostate.pt"] = "no state_dict"
    cases["absent.pt"] = "not found"
    for name, pattern in cases.items():
        with pytest.raises(AtprobeError, match=pattern) as exc:
            load_checkpoint(tmp_path / name, arch="mlp")
        _one_line(exc)
    with pytest.raises(AtprobeError, match="directory"):
        load_checkpoint(tmp_path, arch="mlp")


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    _, _, path = _native(tmp_path)
    before = path.read_bytes()
    model = build_model("mlp")
    ckpt = make_checkpoint(model, arch="mlp", arch_kwargs={"num_classes": 10}, dataset="synthetic")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ckpt, path)
    assert path.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
