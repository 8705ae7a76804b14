"""Filter-normalized random directions and evaluation at theta + lam * d (float64, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from atprobe.directions import (
    ModelAt,
    call_at,
    directions,
    filter_normalized_direction,
    functional_state,
    iter_points,
    model_parameters,
    normalize_direction,
    perturbed_parameters,
    random_direction,
)
from atprobe.errors import AtprobeError
from atprobe.models import build_model
from atprobe.runtime import make_generator
from tests.conftest import randomize_bn


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_filter_norms_match_weights(arch, cnn, mlp):
    model = cnn if arch == "cnn" else mlp
    d = filter_normalized_direction(model, generator=make_generator(0))
    params = dict(model.named_parameters())
    assert list(d) == list(params)  # every parameter, named_parameters() order
    for name, w in params.items():
        assert d[name].shape == w.shape and d[name].dtype == torch.float64 and not d[name].requires_grad
        if w.dim() >= 2:
            torch.testing.assert_close(
                d[name].flatten(1).norm(dim=1), w.detach().flatten(1).norm(dim=1), rtol=1e-13, atol=0
            )
        else:  # biasbn: biases and BN weight/bias are not moved
            assert torch.count_nonzero(d[name]) == 0


def test_ignore_none_and_layer_norm(cnn):
    params = model_parameters(cnn)
    d = filter_normalized_direction(cnn, generator=make_generator(0), ignore="none")
    d_layer = filter_normalized_direction(cnn, generator=make_generator(0), ignore="none", norm="layer")
    for name, w in params.items():
        # ignore="none": 1-d parameters stay random, scaled to the vector's norm.
        if w.dim() <= 1:
            torch.testing.assert_close(d[name].norm(), w.norm(), rtol=1e-13, atol=0)
            assert torch.count_nonzero(d[name]) == w.numel()
        torch.testing.assert_close(d_layer[name].norm(), w.norm(), rtol=1e-13, atol=0)
    # The draws do not depend on the option: the same filters point the same way.
    d_bb = filter_normalized_direction(cnn, generator=make_generator(0))
    assert torch.equal(d["features.0.weight"], d_bb["features.0.weight"])


def test_random_direction_is_gaussian_and_skips_buffers(cnn):
    d = random_direction(cnn, generator=make_generator(5), ignore="none")
    buffers = {name for name, _ in cnn.named_buffers()}
    assert not buffers & set(d)  # running statistics are not directions
    big = d["fc.weight"]
    assert abs(big.mean().item()) < 0.01 and abs(big.std().item() - 1) < 0.01


def test_same_seed_same_directions_different_seed_different(cnn):
    a = directions(cnn, 2, seed=3)
    b = directions(cnn, 2, seed=3)
    c = directions(cnn, 2, seed=4)
    for da, db in zip(a, b):
        assert all(torch.equal(da[k], db[k]) for k in da)
    assert not torch.equal(a[0]["fc.weight"], c[0]["fc.weight"])
    assert not torch.equal(a[0]["fc.weight"], a[1]["fc.weight"])  # k directions, not k copies
    # A prefix of a longer list is the shorter list.
    assert all(torch.equal(a[0][k], directions(cnn, 1, seed=3)[0][k]) for k in a[0])


def test_lam_zero_gives_exactly_the_model(cnn, images):
    d = directions(cnn, 1, seed=0)[0]
    point = perturbed_parameters(cnn, d, 0.0)
    assert all(torch.equal(point[k], p) for k, p in cnn.named_parameters())
    with torch.no_grad():
        assert torch.equal(call_at(cnn, point, images), cnn(images))
        assert torch.equal(ModelAt(cnn, point)(images), cnn(images))


@pytest.mark.parametrize("lam", [0.3, torch.tensor(-0.7, dtype=torch.float64)])
def test_functional_call_equals_a_perturbed_copy(cnn, images, lam):
    d = directions(cnn, 1, seed=1, ignore="none")[0]
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    moved = copy.deepcopy(cnn)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            p.copy_(p + lam * d[name])
        expected = moved(images)
        got = call_at(cnn, perturbed_parameters(cnn, d, lam), images)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, cnn(images).detach())  # the point really moved
    # The model itself is untouched (weights and BN running statistics).
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())


def test_two_directions_and_iter_points(mlp):
    d1, d2 = directions(mlp, 2, seed=7)
    point = perturbed_parameters(mlp, [d1, d2], [0.5, -2.0])
    for name, w in mlp.named_parameters():
        torch.testing.assert_close(point[name], w.detach() + 0.5 * d1[name] + -2.0 * d2[name], rtol=0, atol=0)
    lams = [x for x, _ in iter_points(mlp, d1, [0.0, 0.1])]
    assert lams == [0.0, 0.1]


def test_call_at_runs_in_eval_mode_and_restores_modes(images):
    torch.manual_seed(0)
    model = randomize_bn(build_model("cnn-small").double())  # train mode
    model.features[1].eval()  # a deliberately mixed state survives
    stats = model.features[1].running_mean.clone()
    out = call_at(model, model_parameters(model), images)
    assert model.training and not model.features[1].training and model.features[5].training
    assert torch.equal(model.features[1].running_mean, stats)
    with torch.no_grad():
        torch.testing.assert_close(out, copy.deepcopy(model).eval()(images), rtol=0, atol=0)


def test_partial_points_keep_the_rest(mlp, images):
    w = mlp.fc3.weight.detach()
    out = call_at(mlp, {"fc3.weight": 2 * w}, images)
    moved = copy.deepcopy(mlp)
    with torch.no_grad():
        moved.fc3.weight.mul_(2)
        torch.testing.assert_close(out, moved(images), rtol=0, atol=0)
    params, consts = functional_state(mlp, {"fc3.weight": w})
    assert set(params) == {"fc3.weight"} and "fc1.weight" in consts and not consts["fc1.weight"].requires_grad


def test_bad_options_raise(cnn):
    g = make_generator(0)
    with pytest.raises(AtprobeError, match="ignore"):
        random_direction(cnn, generator=g, ignore="bn")
    with pytest.raises(AtprobeError, match="norm"):
        filter_normalized_direction(cnn, generator=g, norm="global")
    d = directions(cnn, 1, 0)[0]
    with pytest.raises(AtprobeError, match="coefficient"):
        perturbed_parameters(cnn, [d, d], [1.0])
    with pytest.raises(AtprobeError, match="not model parameters"):
        perturbed_parameters(cnn, {"nope": d["fc.weight"]}, 1.0)
    with pytest.raises(AtprobeError, match="shape"):
        normalize_direction({"fc.weight": d["classifier.weight"]}, model_parameters(cnn))
    with pytest.raises(AtprobeError, match="not parameters"):
        call_at(cnn, {"features.1.running_mean": torch.zeros(32)}, torch.zeros(1, 3, 32, 32))
