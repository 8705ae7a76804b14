"""Per-sample gradients against plain single-sample backward passes (float64, CPU)."""

from __future__ import annotations

import copy
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atprobe import pergrad
from atprobe.attacks import PGDConfig, pgd
from atprobe.directions import ModelAt, directions, model_parameters, perturbed_parameters
from atprobe.errors import AtprobeError
from atprobe.models import build_model
from atprobe.pergrad import (
    chunk_size_for,
    objective,
    per_sample_grad_distance,
    per_sample_grad_norm_pair,
    per_sample_grad_norms,
    per_sample_grads,
)
from tests.conftest import keyed_start, randomize_bn

# Short attacks keep the file fast; the math does not depend on the step count.
PGD3 = PGDConfig(steps=3)
TRADES3 = PGDConfig(steps=3, loss="kl", init="normal")


def ce64(f, x, y):
    """CE in the logits' own dtype (atprobe.objectives.ce computes in float32), so the
    float64 comparisons below test the gradient machinery to 1e-10, not a float32 CE."""
    return F.cross_entropy(f(x), y, reduction="none")


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.rand(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g)


def _at(model: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    """A real copy of the model with its weights set to ``params``."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if name in params:
                p.copy_(params[name])
    return moved


def loop_grads(model, loss, x, y, extra=()) -> torch.Tensor:
    """The reference: one ``loss_i.backward()`` per sample, flat .grad fields stacked (N, P)."""
    model.eval()
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        loss(model, x[i : i + 1], y[i : i + 1], *(e[i : i + 1] for e in extra)).sum().backward()
        rows.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                               for p in model.parameters()]))
    return torch.stack(rows)


# ---------------------------------------------------------------------------- against the loop


METHODS = ["hooks", "vmap"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_grads_and_norms_match_the_loop(arch, method, cnn, mlp, data):
    model = cnn if arch == "cnn" else mlp
    x, y = data
    ref = loop_grads(model, ce64, x, y)
    chunks = list(per_sample_grads(model, ce64, x, y, chunk_size=3, method=method))
    assert [c.shape for c in chunks] == [(3, ref.shape[1]), (1, ref.shape[1])]
    torch.testing.assert_close(torch.cat(chunks), ref, rtol=1e-10, atol=1e-12)
    norms = per_sample_grad_norms(model, ce64, x, y, chunk_size=3, method=method)
    torch.testing.assert_close(norms, ref.norm(dim=1), rtol=1e-10, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_distance_and_cosine_match_the_loop(method, cnn, data):
    x, y = data
    d = directions(cnn, 1, seed=0, ignore="none")[0]
    a, b = model_parameters(cnn), perturbed_parameters(cnn, d, 0.2)
    ga, gb = loop_grads(cnn, ce64, x, y), loop_grads(_at(cnn, b), ce64, x, y)
    dist, cos = per_sample_grad_distance(cnn, ce64, x, y, a, b, chunk_size=3, method=method)
    torch.testing.assert_close(dist, (ga - gb).norm(dim=1), rtol=1e-10, atol=0)
    torch.testing.assert_close(cos, F.cosine_similarity(ga, gb, dim=1), rtol=0, atol=1e-12)
    assert (dist > 0).all() and (cos < 1).all()


@pytest.mark.parametrize("method", METHODS)
def test_builtin_objectives_match_the_loop(method, cnn, data):
    """clean/pgd_at/trades/R by either method equal single-sample backward passes with x'
    held fixed (Danskin), the x' being the objective's own at that point (TRADES and R
    stack [x, x'] in one call: the hooks method must add both rows of a sample)."""
    x, y = data[0][:2], data[1][:2]
    view = ModelAt(cnn, model_parameters(cnn))
    for name, attack in [("clean", None), ("pgd_at", PGD3), ("trades", TRADES3), ("R", PGD3)]:
        obj = objective(name, attack=attack, seed=11)
        extra = obj.prepare(view, x, y, range(x.shape[0]))
        ref = loop_grads(cnn, obj, x, y, extra)
        got = torch.cat(list(per_sample_grads(cnn, obj, x, y, chunk_size=2, method=method)))
        torch.testing.assert_close(per_sample_grad_norms(cnn, obj, x, y, chunk_size=2, method=method), got.norm(dim=1),
                                   rtol=1e-10, atol=0)
        # objectives.ce evaluates in float32: agreement to float32 rounding of the logits.
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7, msg=name)


def test_norm_pair_gives_the_norms_of_both_losses_and_of_R(cnn, data):
    """||g_adv||, ||g_clean||, ||g_adv - g_clean|| equal the norms of pgd_at, clean and R."""
    x, y = data[0][:3], data[1][:3]
    adv, clean, r = (objective(n, attack=a, seed=5) for n, a in [("pgd_at", PGD3), ("clean", None), ("R", PGD3)])
    got = per_sample_grad_norm_pair(cnn, adv, clean, x, y, chunk_size=2)
    for value, loss in zip(got, (adv, clean, r)):
        torch.testing.assert_close(value, per_sample_grad_norms(cnn, loss, x, y, chunk_size=2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_chunk_size_does_not_change_results(arch, cnn, mlp, data):
    model = cnn if arch == "cnn" else mlp
    x, y = data
    for obj in (ce64, objective("pgd_at", attack=PGD3)) if arch == "mlp" else (ce64,):
        n1 = per_sample_grad_norms(model, obj, x, y, chunk_size=1)
        n4 = per_sample_grad_norms(model, obj, x, y, chunk_size=64)
        torch.testing.assert_close(n1, n4, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("bias", [False, True])
def test_linear_model_matches_the_closed_form(bias):
    """For f(x) = W x (+ b): grad_W CE = (softmax(W x) - onehot(y)) x^T, grad_b = softmax - onehot."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5, bias=bias)).double()
    x = torch.rand(6, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    a = model_parameters(model)
    b = {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in a.items()}

    def closed_form(point):
        flat = x.flatten(1)
        logits = flat @ point["1.weight"].T + (point["1.bias"] if bias else 0)
        r = logits.softmax(dim=1) - F.one_hot(y, 5).double()
        parts = [(r[:, :, None] * flat[:, None, :]).flatten(1)] + ([r] if bias else [])
        return torch.cat(parts, dim=1)

    ga, gb = closed_form(a), closed_form(b)
    torch.testing.assert_close(torch.cat(list(per_sample_grads(model, ce64, x, y, params=b))), gb,
                               rtol=1e-12, atol=1e-14)
    for loss, tol in [(ce64, 1e-12), (objective("clean"), 1e-5)]:  # objectives.ce: float32 CE
        dist, cos = per_sample_grad_distance(model, loss, x, y, a, b, chunk_size=4)
        torch.testing.assert_close(dist, (ga - gb).norm(dim=1), rtol=tol, atol=0)
        torch.testing.assert_close(cos, F.cosine_similarity(ga, gb, dim=1), rtol=0, atol=tol)


# ---------------------------------------------------------------------------- adversarial objectives


@pytest.mark.parametrize("name,attack", [("pgd_at", PGD3), ("trades", TRADES3), ("R", PGD3)])
def test_lam_zero_gives_distance_zero(name, attack, mlp, data):
    x, y = data
    obj = objective(name, attack=attack, seed=5)
    d = directions(mlp, 1, seed=2)[0]
    dist, cos = per_sample_grad_distance(mlp, obj, x, y, model_parameters(mlp), perturbed_parameters(mlp, d, 0.0))
    assert torch.equal(dist, torch.zeros_like(dist))
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-12)
    dist, _ = per_sample_grad_distance(mlp, obj, x, y, model_parameters(mlp), perturbed_parameters(mlp, d, 0.5))
    assert (dist > 0).all()


def test_adversarial_examples_are_crafted_at_the_probed_point(cnn, data):
    x, y = data
    obj = objective("pgd_at", attack=PGD3, seed=9)
    point = perturbed_parameters(cnn, directions(cnn, 1, seed=4)[0], 0.5)
    (x_adv,) = obj.prepare(ModelAt(cnn, point), x, y, [10, 11, 12, 13])
    start = keyed_start(x, PGD3, 9, [10, 11, 12, 13])
    expected = pgd(_at(cnn, point), x, y, PGD3, delta_init=start)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-12)
    (x_adv_theta,) = obj.prepare(ModelAt(cnn, model_parameters(cnn)), x, y, [10, 11, 12, 13])
    assert not torch.allclose(x_adv, x_adv_theta)  # x' follows the parameters
    assert (x_adv - x).abs().max() <= PGD3.eps + 1e-12


def test_random_starts_are_per_sample():
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = keyed_start(x, PGD3, 1, [7, 8, 9])
    # A sample's start depends on (seed, id, x_i) only: not on its batch.
    torch.testing.assert_close(keyed_start(x[1:2], PGD3, 1, [8]), s[1:2], rtol=0, atol=0)
    assert not torch.equal(s[0], s[1])
    assert not torch.equal(keyed_start(x, PGD3, 2, [7, 8, 9]), s)
    assert s.abs().max() <= PGD3.eps
    assert torch.equal(keyed_start(x, PGDConfig(init="zero"), 1, [7, 8, 9]), torch.zeros_like(x))


def test_sample_ids_key_the_starts(mlp, data):
    """Rows keep their start when reordered, if the ids travel with them."""
    x, y = data
    obj = objective("pgd_at", attack=PGD3, seed=3)
    ids = torch.tensor([40, 41, 42, 43])
    perm = torch.tensor([2, 0, 3, 1])
    n = per_sample_grad_norms(mlp, obj, x, y, sample_ids=ids, chunk_size=3)
    n_perm = per_sample_grad_norms(mlp, obj, x[perm], y[perm], sample_ids=ids[perm], chunk_size=2)
    torch.testing.assert_close(n_perm, n[perm], rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------- modes, subsets, memory


def test_eval_mode_is_used_and_restored(data):
    torch.manual_seed(0)
    model = randomize_bn(build_model("cnn-small").double())  # train mode
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = data
    norms = per_sample_grad_norms(model, ce64, x[:2], y[:2])
    assert all(m.training for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN stats untouched
    torch.testing.assert_close(norms, loop_grads(copy.deepcopy(model), ce64, x[:2], y[:2]).norm(dim=1),
                               rtol=1e-10, atol=0)


def test_a_subset_of_parameters(cnn, data):
    x, y = data
    full = torch.cat(list(per_sample_grads(cnn, ce64, x, y)))
    names = [n for n, _ in cnn.named_parameters()]
    sizes = [p.numel() for _, p in cnn.named_parameters()]
    offset = sum(sizes[: names.index("classifier.weight")])
    sub = torch.cat(list(per_sample_grads(cnn, ce64, x, y, params={"classifier.weight": cnn.classifier.weight})))
    assert sub.shape == (4, cnn.classifier.weight.numel())
    torch.testing.assert_close(sub, full[:, offset : offset + sub.shape[1]], rtol=1e-12, atol=1e-14)


def _track(monkeypatch):
    """Wrap the chunk generator: record chunk sizes and how many chunks are alive
    (referenced anywhere) each time a new one is produced."""
    real = pergrad.api._grad_chunks
    alive: set[int] = set()
    record = {"peak": 0, "rows": []}
    counter = iter(range(10**6))

    def tracked(*args, **kwargs):
        for grads in real(*args, **kwargs):
            token = next(counter)
            alive.add(token)
            first = grads if isinstance(grads, torch.Tensor) else next(iter(grads.values()))  # norms or gradients
            weakref.finalize(first, alive.discard, token)
            record["peak"] = max(record["peak"], len(alive))
            record["rows"].append(first.shape[0])
            yield grads
            del grads

    monkeypatch.setattr(pergrad.api, "_grad_chunks", tracked)
    return record


def test_memory_is_bounded_by_chunks(monkeypatch):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(7, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (7,), generator=g)
    record = _track(monkeypatch)
    per_sample_grad_norms(mlp, ce64, x, y, chunk_size=3)
    # Chunks of 3; what leaves the generator is each chunk's (3,) norms (the gradients
    # are reduced inside it, and per_sample_grads below shows those are 3 x P).
    assert record["rows"] == [3, 3, 1]

    record = _track(monkeypatch)
    d = directions(mlp, 1, seed=0)[0]
    per_sample_grad_distance(mlp, ce64, x, y, model_parameters(mlp), perturbed_parameters(mlp, d, 0.1), chunk_size=2)
    assert record["rows"] == [2, 2, 2, 2, 2, 2, 1, 1] and record["peak"] == 2  # one chunk per point

    p = sum(q.numel() for q in mlp.parameters())
    assert all(c.shape[0] <= 3 and c.shape[1] == p for c in per_sample_grads(mlp, ce64, x, y, chunk_size=3))


def test_chunk_size_for_wrn():
    with torch.device("meta"):
        model = build_model("wrn-28-10")
    p = sum(q.numel() for q in model.parameters())
    assert p == 36_479_194
    assert chunk_size_for(model, 40e9, copies=2) == math.floor(40e9 / (2 * 2 * 4 * p))
    assert chunk_size_for(model, 1.0) == 1


def test_bad_arguments_raise(mlp, data):
    x, y = data
    with pytest.raises(AtprobeError, match="objective"):
        objective("madry")
    with pytest.raises(AtprobeError, match="kl"):
        objective("trades", attack=PGD3)
    # Restarts are keyed per sample too, so they keep "same start at every point".
    assert objective("pgd_at", attack=PGDConfig(restarts=2)).attack.restarts == 2
    with pytest.raises(AtprobeError, match="no attack"):
        objective("clean", attack=PGD3)
    with pytest.raises(AtprobeError, match="chunk_size"):
        per_sample_grad_norms(mlp, ce64, x, y, chunk_size=0)
    with pytest.raises(AtprobeError, match="same number"):
        per_sample_grad_norms(mlp, ce64, x, y[:2])
    with pytest.raises(AtprobeError, match="same parameters"):
        per_sample_grad_distance(mlp, ce64, x, y, model_parameters(mlp), {"fc3.weight": mlp.fc3.weight})
    with pytest.raises(AtprobeError, match="sample ids"):
        per_sample_grad_norms(mlp, ce64, x, y, sample_ids=[1, 2])


def test_float32_reductions_are_accurate():
    """Norms of float32 gradients with millions of entries: the blocked reduction keeps
    ~1e-7 relative accuracy (a single CPU vector_norm over 10^7 entries is off by ~1e-4)."""
    g = torch.Generator().manual_seed(0)
    grads = {"w": 1e-3 * torch.randn(2, 3_000_001, generator=g), "b": torch.randn(2, 7, generator=g)}
    ref = torch.cat([v.double().flatten(1) for v in grads.values()], dim=1).norm(dim=1)
    got = pergrad.api._norms(grads)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------- the hooks method


class _Layers(nn.Module):
    """Every case the per-layer identities handle: strided, dilated and unpadded
    convolutions with and without bias, 1x1 convolutions, eval-mode BatchNorm, a linear
    layer applied over a sequence dimension, a layer called twice (shared weights), and a
    layer whose output never reaches the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.c3 = nn.Conv2d(6, 6, 3, dilation=2, padding=2)
        self.c4 = nn.Conv2d(6, 5, 1)
        self.c5 = nn.Conv2d(5, 5, (2, 3), padding=0)
        self.seq = nn.Linear(5, 7)
        self.head = nn.Linear(7, 3)
        self.dead = nn.Linear(7, 2)

    def forward(self, x):
        h = F.softplus(self.bn1(self.c1(x)))
        h = torch.tanh(self.c3(torch.tanh(self.c2(h))))
        h = self.c3(h) + h  # called twice
        h = self.c5(F.softplus(self.c4(h)))  # (n, 5, 3, 2)
        h = torch.tanh(self.seq(h.flatten(2).transpose(1, 2)))  # (n, 6, 7): a sequence of 6
        self.dead(h)
        return self.head(h.mean(1))


def test_hooks_cover_every_layer_kind():
    torch.manual_seed(0)
    model = randomize_bn(_Layers().double()).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 8, 8, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (5,), generator=g)
    ref = loop_grads(model, ce64, x, y)
    got = torch.cat(list(per_sample_grads(model, ce64, x, y, chunk_size=3, method="hooks")))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)
    names = [n for n, _ in model.named_parameters()]
    offset = sum(p.numel() for p in list(model.parameters())[: names.index("dead.weight")])
    assert not got[:, offset : offset + 7 * 2 + 2].any()  # the unused layer: exactly zero
    assert got[:, :offset].abs().sum(0).gt(0).float().mean() > 0.9  # the others mostly not
    norms = per_sample_grad_norms(model, ce64, x, y, chunk_size=2, method="hooks")
    torch.testing.assert_close(norms, ref.norm(dim=1), rtol=1e-10, atol=0)


def test_ghost_and_direct_norms_agree():
    """Each layer's squared norm by the ghost identity and by the materialized gradient."""
    from atprobe.pergrad import hooks as H

    torch.manual_seed(1)
    model = _Layers().double().eval()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    point = model_parameters(model)
    plan = H.layer_plan(model, list(point))
    leaves = {k: v.detach().requires_grad_() for k, v in point.items()}

    def run_loss():
        return ce64(lambda inp: torch.func.functional_call(model, leaves, (inp,)), x, y)

    outs = H._backward(plan, run_loss, 4)
    for layer, layer_outs in H._per_layer(plan, outs):
        if not H._has_weight_matrix(layer) or all(o is None for o in layer_outs):
            continue
        w = H._layer_grads(layer, 4, torch.float64, layer_outs)["weight"]
        pairs = [H._positions(layer.module, a.double(), g.double(), 4)
                 for a, g, _ in H._calls(layer, torch.float64, layer_outs)]
        pa, pg = torch.cat([p for p, _ in pairs], 1), torch.cat([q for _, q in pairs], 1)
        ghost = (torch.bmm(pa, pa.transpose(1, 2)) * torch.bmm(pg, pg.transpose(1, 2))).sum((1, 2))
        torch.testing.assert_close(ghost, w.flatten(1).square().sum(1), rtol=1e-10, atol=1e-15)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "preact_resnet18", "wrn-10-2", "dense121", "dm-wrn-10-1",
                                  "preact_resnet18_nobn"])
def test_hooks_equal_vmap_on_every_architecture(arch):
    torch.manual_seed(0)
    model = randomize_bn(build_model(arch, 10, mean=(0.5,) * 3, std=(0.25,) * 3).double()).eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([1, 7])
    obj = objective("trades", attack=PGDConfig(steps=1, loss="kl", init="normal"))
    hooks = torch.cat(list(per_sample_grads(model, obj, x, y, method="hooks")))
    vmapped = torch.cat(list(per_sample_grads(model, obj, x, y, method="vmap")))
    torch.testing.assert_close(hooks, vmapped, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(per_sample_grad_norms(model, obj, x, y), vmapped.norm(dim=1), rtol=1e-10, atol=0)


def test_method_choice():
    torch.manual_seed(0)
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double().eval()
    x, y = torch.rand(3, 2, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2])
    assert pergrad.resolve_method(grouped, objective("clean"), model_parameters(grouped), "auto") == "vmap"
    with pytest.raises(AtprobeError, match="grouped convolution"):
        per_sample_grad_norms(grouped, ce64, x, y, method="hooks")
    torch.testing.assert_close(per_sample_grad_norms(grouped, ce64, x, y), loop_grads(grouped, ce64, x, y).norm(dim=1),
                               rtol=1e-10, atol=0)
    cnn = build_model("cnn-small")
    assert pergrad.resolve_method(cnn, objective("clean"), model_parameters(cnn), "auto") == "hooks"
    assert pergrad.resolve_method(cnn, ce64, model_parameters(cnn), "auto") == "vmap"  # a loss it cannot vouch for
    with pytest.raises(AtprobeError, match="method"):
        pergrad.resolve_method(cnn, ce64, model_parameters(cnn), "ghost")


def test_distances_to_many_points_equal_the_pairwise_ones(mlp, data):
    """The reference gradients computed once per chunk give what one call per point gives."""
    x, y = data
    obj = objective("pgd_at", attack=PGD3, seed=2)
    d = directions(mlp, 1, seed=0)[0]
    theta = model_parameters(mlp)
    points = [perturbed_parameters(mlp, d, lam) for lam in (-0.3, 0.0, 0.2)]
    many = pergrad.per_sample_grad_distances(mlp, obj, x, y, theta, points, chunk_size=3)
    for (dist, cos), point in zip(many, points):
        ref_dist, ref_cos = per_sample_grad_distance(mlp, obj, x, y, theta, point, chunk_size=3)
        torch.testing.assert_close(dist, ref_dist, rtol=1e-12, atol=0)
        torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-12)
    assert torch.equal(many[1][0], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(many[1][1], torch.ones(4, dtype=torch.float64))
    with pytest.raises(AtprobeError, match="same order"):
        pergrad.per_sample_grad_distances(mlp, obj, x, y, theta, [{"fc3.weight": mlp.fc3.weight}])
