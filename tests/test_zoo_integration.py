"""The zoo's architectures through the zoo's loading rules: ``--arch auto`` names every new
family from its public state_dict, and a DeepMind WideResNet file that saved its own
normalization (persistent ``mean``/``std`` of shape (3, 1, 1), as DeepMind's class registers
them) loads with ``arch="auto"`` and gives the logits of the model with that normalization."""

from __future__ import annotations

import pytest
import torch

from atprobe.arch_inference import infer_arch
from atprobe.checkpoint import load_checkpoint
from atprobe.errors import AtprobeError
from atprobe.models import DM_CIFAR10_MEAN, DM_CIFAR10_STD, build_model


@pytest.mark.parametrize("name", ["dm-wrn-28-10", "dm-wrn-70-16", "dm-wrn-106-16", "dm-preact-resnet18",
                                  "dm-preact-resnet34", "preact_resnet18_nobn", "resnet50", "wrn-34-20"])
def test_auto_names_every_zoo_architecture(name):
    with torch.device("meta"):  # shapes only: no 400M-parameter model is materialized
        state = build_model(name, 10).state_dict()
    assert infer_arch(state).arch == name


def test_deepmind_file_with_saved_normalization_loads_with_auto(tmp_path):
    torch.manual_seed(0)
    model = build_model("dm-wrn-10-1", 10, mean=DM_CIFAR10_MEAN, std=DM_CIFAR10_STD).double().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval logits depend on them
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    state = {k: v.float() for k, v in model.state_dict().items()}
    assert "mean" not in state  # atprobe keeps them out of the state_dict (non-persistent) ...
    state["mean"] = torch.tensor(DM_CIFAR10_MEAN).view(3, 1, 1)  # ... DeepMind's class saves them
    state["std"] = torch.tensor(DM_CIFAR10_STD).view(3, 1, 1)
    torch.save(state, tmp_path / "dm.pt")
    ckpt = load_checkpoint(tmp_path / "dm.pt", arch="auto")
    assert ckpt.arch == "dm-wrn-10-1"
    notes = " ".join(ckpt.notes.values())
    assert "dm-wrn-10-1" in notes and "normaliz" in notes
    loaded = ckpt.build_model().double().eval()
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.float().double()(x), rtol=1e-6, atol=1e-6)
    # the same weights without their normalization and without --normalize: refused, one line
    del state["mean"], state["std"]
    torch.save(state, tmp_path / "bare.pt")
    with pytest.raises(AtprobeError) as err:
        load_checkpoint(tmp_path / "bare.pt", arch="auto")
    assert "\n" not in str(err.value) and "normalize" in str(err.value)
