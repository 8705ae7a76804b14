"""``hessian``: pyhessian's eigenvalues and trace, the per-block rows and the stochastic Lanczos
density against the dense weight Hessian of a tiny MLP (float64, CPU), and ``atprobe hessian``
end to end."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from atprobe import linalg
from atprobe.attacks import pgd
from atprobe.data import Split
from atprobe.errors import AtprobeError
from atprobe.models import build_model
from atprobe.probes import hessian
from atprobe.probes.hessian import HessianConfig, LossHessian
from atprobe.threat import ThreatModel
from tests.conftest import cli_rejects, keyed_start, run_cli


@pytest.fixture(autouse=True)
def _one_thread_and_restore_global_torch_state():
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def _mlp(seed: int = 0, hidden: int = 6) -> nn.Module:
    """48 -> hidden -> tanh -> 3, float64: 315 parameters for hidden = 6."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double().eval()


def _split(n: int = 10, seed: int = 0, offset: int = 7) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (n,), generator=g)
    return Split(x=x, y=y, true_y=y.clone(), index=torch.arange(offset, offset + n))


STEPS = 3


def _adversarial(model: nn.Module, split: Split, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss's fixed inputs, crafted independently: PGD from each sample's own start."""
    x = split.x.float().div(255).double()
    attack = HessianConfig(threat=ThreatModel(steps=STEPS)).attack
    x_adv = pgd(model, x, split.y, attack, delta_init=keyed_start(x, attack, seed, split.index.tolist()),
                amp=False)
    return x_adv, split.y


def _dense(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str] | None = None) -> torch.Tensor:
    """The dense Hessian of mean CE(f(x; theta), y) over the flattened parameters ``names``
    (default all), by torch.autograd.functional.hessian through functional_call."""
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def loss(flat):
        point = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, point, (x,)), y)

    flat = torch.cat([params[n].detach().flatten() for n in names])
    return torch.autograd.functional.hessian(loss, flat)


def _by_magnitude(h: torch.Tensor) -> torch.Tensor:
    ev = torch.linalg.eigvalsh(h)
    return ev[ev.abs().argsort(descending=True)]


def _hutchinson_sigma(h: torch.Tensor) -> float:
    """Std of one Rademacher probe v^T H v: sqrt(2 sum_{i != j} H_ij^2)."""
    off = h - torch.diag(torch.diag(h))
    return math.sqrt(2 * float((off**2).sum()))


def test_loss_batches_are_the_independently_crafted_adversarial_examples():
    model, split = _mlp(), _split()
    batches = hessian.loss_batches(model, split, HessianConfig(batch_size=4, scope="all", seed=3,
                                                               threat=ThreatModel(steps=STEPS)))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    x_adv, _ = _adversarial(model, split, seed=3)
    torch.testing.assert_close(torch.cat([x for x, _ in batches]), x_adv, rtol=0, atol=1e-15)
    one = hessian.loss_batches(model, split, HessianConfig(batch_size=4, scope="batch", seed=3,
                                                           threat=ThreatModel(steps=STEPS)))
    assert len(one) == 1 and torch.equal(one[0][1], split.y[:4])
    nat = hessian.loss_batches(model, split, HessianConfig(at="natural", batch_size=10))
    torch.testing.assert_close(nat[0][0], split.x.float().div(255).double(), rtol=0, atol=0)


def test_pyhessian_top_eigenvalues_and_trace_match_the_dense_hessian():
    model, split = _mlp(), _split()
    x, y = _adversarial(model, split, seed=0)
    h = _dense(model, x, y)
    dense = _by_magnitude(h)
    config = HessianConfig(batch_size=10, top_k=2, iterations=3000, tol=1e-13, trace_samples=1000,
                           trace_tol=0.0, threat=ThreatModel(steps=STEPS))
    eigs, trace = hessian.pyhessian_top(model, [(x, y)], config)
    # pyhessian normalizes v / (||v|| + 1e-6): an absolute bias of about 2e-6
    assert eigs == pytest.approx(dense[:2].tolist(), rel=0, abs=1e-5)
    assert abs(dense[0]) > 1.05 * abs(dense[1])  # a real gap: the check is about the top one
    assert len(trace) == 1000
    sigma = _hutchinson_sigma(h)
    assert np.std(trace) == pytest.approx(sigma, rel=0.15)
    # Hutchinson: 4 standard errors (a 6e-5 chance of a false failure for a correct estimator)
    assert abs(np.mean(trace) - float(torch.trace(h))) < 4 * sigma / math.sqrt(1000)


def test_rows_whole_model_and_blocks_match_the_dense_hessian():
    model, split = _mlp(), _split()
    config = HessianConfig(batch_size=10, top_k=1, iterations=3000, tol=1e-13, trace_samples=600,
                           trace_tol=0.0, blocks="module", seed=0, threat=ThreatModel(steps=STEPS), engine="pyhessian")
    table = hessian.probe(model, split, config)
    assert list(table.columns) == hessian.COLUMNS
    assert table[["block", "quantity"]].values.tolist() == [
        ["all", "eigenvalue"], ["all", "trace"], ["1", "eigenvalue"], ["1", "trace"], ["3", "eigenvalue"],
        ["3", "trace"]]
    assert table["params"].tolist() == [315, 315, 294, 294, 21, 21]
    assert table["method"].tolist() == ["pyhessian"] * 2 + ["atprobe"] * 4
    x, y = _adversarial(model, split, seed=0)
    for block, names in (("all", None), ("1", ["1.weight", "1.bias"]), ("3", ["3.weight", "3.bias"])):
        h = _dense(model, x, y, names)
        rows = table[table["block"] == block].set_index("quantity")
        tol = 1e-5 if block == "all" else 1e-9  # pyhessian's normalization bias; ours is exact
        assert rows.loc["eigenvalue", "value"] == pytest.approx(float(_by_magnitude(h)[0]), rel=tol, abs=tol)
        sigma = _hutchinson_sigma(h)
        assert abs(rows.loc["trace", "value"] - float(torch.trace(h))) < 4 * sigma / math.sqrt(600), block
        assert rows.loc["trace", "std_error"] == pytest.approx(sigma / math.sqrt(600), rel=0.2)
        assert rows.loc["trace", "iterations"] == 600
        if block != "all":
            assert bool(rows.loc["eigenvalue", "converged"]) and rows.loc["eigenvalue", "iterations"] < 3000
    # the dense blocks' traces add up to the whole trace (a sanity check of the restriction)
    whole = torch.trace(_dense(model, x, y))
    parts = sum(torch.trace(_dense(model, x, y, names)) for names in (["1.weight", "1.bias"], ["3.weight", "3.bias"]))
    assert float(parts) == pytest.approx(float(whole), rel=1e-12)


def test_one_block_agrees_with_the_whole_model_and_own_power_iteration_with_pyhessian():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3, bias=False)).double().eval()
    split = _split(n=8)
    config = HessianConfig(batch_size=8, top_k=2, iterations=2000, tol=1e-12, trace_samples=5,
                           blocks="tensor", threat=ThreatModel(steps=STEPS), engine="pyhessian")
    table = hessian.probe(model, split, config)
    eig = table[table["quantity"] == "eigenvalue"]
    whole, block = eig[eig["block"] == "all"], eig[eig["block"] == "1.weight"]
    assert whole["value"].tolist() == pytest.approx(block["value"].tolist(), rel=0, abs=1e-5)

    # the module's power iteration on the block of all parameters = pyhessian's, on the MLP
    mlp = _mlp(1)
    x, y = _adversarial(mlp, _split(), seed=0)
    op = LossHessian(mlp, [(x, y)])
    ours = hessian.top_eigenvalues(op.operator(), op.like(), top_k=2, iterations=3000, tol=1e-13,
                                   generator=torch.Generator().manual_seed(0))
    theirs, _ = hessian.pyhessian_top(mlp, [(x, y)], HessianConfig(top_k=2, iterations=3000, tol=1e-13,
                                                                   trace_samples=1))
    assert [e for e, _, _ in ours] == pytest.approx(theirs, rel=0, abs=1e-5)
    assert all(c for _, _, c in ours)


def test_scope_all_accumulates_over_batches():
    model, split = _mlp(), _split()
    x, y = _adversarial(model, split, seed=0)
    one = LossHessian(model, [(x, y)])
    many = LossHessian(model, [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])])
    v = [torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
         for i, p in enumerate(one.params)]
    for block in (None, [0, 1], [3]):
        idx = block or list(range(4))
        a, b = one.hvp([v[i] for i in idx], block), many.hvp([v[i] for i in idx], block)
        for s, t in zip(a, b):
            torch.testing.assert_close(s, t, rtol=1e-12, atol=1e-15)
    h = _dense(model, x, y)
    hv = one.hvp(v)
    torch.testing.assert_close(torch.cat([t.flatten() for t in hv]), h @ torch.cat([t.flatten() for t in v]),
                               rtol=1e-10, atol=1e-13)

    # the probe: scope=all in batches of 4 is the same Hessian as one batch of 10 (pyhessian's dataloader mode)
    common = {"threat": ThreatModel(steps=STEPS), "iterations": 3000, "tol": 1e-13, "trace_samples": 2,
              "blocks": "module"}
    all_scope = hessian.probe(model, split, HessianConfig(scope="all", batch_size=4, **common))
    batch_scope = hessian.probe(model, split, HessianConfig(scope="batch", batch_size=10, **common))
    pick = all_scope["quantity"] == "eigenvalue"
    assert all_scope.loc[pick, "value"].tolist() == pytest.approx(batch_scope.loc[pick, "value"].tolist(), abs=1e-5)


def test_slq_density_is_a_quadrature_of_the_dense_spectrum():
    model, split = _mlp(hidden=3), _split()
    x, y = _adversarial(model, split, seed=0)
    op = LossHessian(model, [(x, y)])
    h = _dense(model, x, y)
    ev = torch.linalg.eigvalsh(h)
    size = h.shape[0]

    density = hessian.slq(op.operator(), op.like(), steps=30, runs=3, generator=torch.Generator().manual_seed(0))
    assert list(density.columns) == hessian.DENSITY_COLUMNS
    assert density["run"].unique().tolist() == [0, 1, 2]
    np.testing.assert_allclose(density.groupby("run")["weight"].sum().to_numpy(), 1.0, rtol=0, atol=1e-12)
    assert (density["weight"] >= 0).all()
    span = float(ev.abs().max())
    assert density["eigenvalue"].min() >= float(ev.min()) - 1e-10 * span
    assert density["eigenvalue"].max() <= float(ev.max()) + 1e-10 * span

    # Gauss quadrature of v's spectral measure: sum_j w_j t_j^k = v^T H^k v / v^T v for k <= 2m - 1
    v0 = [torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9 + i))
          for i, p in enumerate(op.params)]
    flat = torch.cat([t.flatten() for t in v0])
    flat = flat / flat.norm()
    run = linalg.lanczos(op.operator(), flat[None], 6)
    alpha, beta = run.alpha[0], run.beta[0]
    nodes, weights = linalg.quadrature(alpha, beta)
    assert len(alpha) == 6 and len(beta) == 5
    for k in range(12):
        moment = float(flat @ torch.linalg.matrix_power(h, k) @ flat)
        assert float((weights * nodes**k).sum()) == pytest.approx(moment, rel=1e-8, abs=1e-12 * span**k), k

    # run to the end (up to m = P; it stops once the Krylov space is invariant, here after as
    # many steps as v sees distinct eigenvalues): every node that carries weight is an
    # eigenvalue, and the weight of each is v's squared projection on that eigenspace
    run = linalg.lanczos(op.operator(), flat[None], size)
    alpha, beta = run.alpha[0], run.beta[0]
    assert 10 < len(alpha) < size
    nodes, weights = linalg.quadrature(alpha, beta)
    heavy = weights > 1e-10
    assert weights[heavy].sum() == pytest.approx(1.0, abs=1e-8)
    evals, evecs = torch.linalg.eigh(h)
    proj = (evecs.T @ flat) ** 2
    for t, w in zip(nodes[heavy], weights[heavy]):
        near = (evals - t).abs() < 1e-7 * span
        assert near.any(), t
        assert w == pytest.approx(float(proj[near].sum()), rel=1e-5, abs=1e-9), t


def test_compute_density_rows_and_determinism():
    model, split = _mlp(hidden=3), _split()
    config = HessianConfig(batch_size=10, iterations=20, trace_samples=10, blocks="tensor", density=True,
                           density_steps=8, density_runs=2, seed=5, threat=ThreatModel(steps=1))
    a, b = hessian.compute(model, split, config), hessian.compute(model, split, config)
    pd.testing.assert_frame_equal(a.table, b.table)
    pd.testing.assert_frame_equal(a.density, b.density)
    assert a.n == 10 and len(a.density) == 16 and a.table["block"].tolist()[2::2] == [
        "1.weight", "1.bias", "3.weight", "3.bias"]
    other = hessian.compute(model, split, HessianConfig(**{**config.__dict__, "seed": 6}))
    assert not a.density["eigenvalue"].equals(other.density["eigenvalue"])
    assert hessian.compute(model, split, HessianConfig(blocks="none", density=False, trace_samples=2,
                                                       iterations=3)).density is None


def test_model_grads_flags_modes_and_global_rng_are_left_alone():
    model, split = _mlp(), _split()
    model.train()
    model[3].bias.requires_grad_(False)
    model[1].weight.grad = torch.full_like(model[1].weight, 0.5)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    hessian.compute(model, split, HessianConfig(iterations=5, trace_samples=3, density=True,
                                                density_steps=4, threat=ThreatModel(steps=1)))
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(m.training for m in model.modules())
    assert not model[3].bias.requires_grad and model[1].weight.requires_grad
    assert torch.equal(model[1].weight.grad, torch.full_like(model[1].weight, 0.5))
    assert model[1].weight.grad.grad_fn is None
    assert all(p.grad is None for n, p in model.named_parameters() if n != "1.weight")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_parameter_blocks():
    model = build_model("cnn-small")
    blocks = dict(hessian.parameter_blocks(model, "module"))
    assert list(blocks)[:3] == ["features.0", "features.1", "features.4"]
    assert blocks["features.1"] == ["features.1.weight", "features.1.bias"] and blocks["fc"] == ["fc.weight", "fc.bias"]
    assert len(hessian.parameter_blocks(model, "tensor")) == len(list(model.parameters()))
    assert hessian.parameter_blocks(model, "none") == []


def test_complexity_rows():
    model, split = _mlp(), _split()
    config = HessianConfig(top_k=2, iterations=50, trace_samples=20, blocks="module", density=True,
                           threat=ThreatModel(steps=1))
    rows = hessian.complexity_rows(model, split, config)
    assert list(rows.columns) == ["measure", "variant", "value", "reason"]
    assert rows["variant"].tolist() == ["top1;at=adv;scope=batch", "top2;at=adv;scope=batch",
                                        "trace;at=adv;scope=batch"]
    assert (rows["measure"] == "hessian").all() and (rows["reason"] == "").all()
    table = hessian.probe(model, split, config)
    assert rows["value"].tolist() == table.loc[table["block"] == "all", "value"].tolist()


@pytest.mark.parametrize("kwargs,fragment", [
    ({"at": "clean"}, "unknown loss point"),
    ({"scope": "epoch"}, "unknown Hessian scope"),
    ({"blocks": "layers"}, "unknown block mode"),
    ({"top_k": 0}, "top-k"),
    ({"iterations": 0}, "iterations"),
    ({"trace_samples": 0}, "trace samples"),
    ({"density_steps": 0}, "density steps"),
    ({"density_runs": 0}, "density runs"),
    ({"tol": -1.0}, "tol"),
    ({"trace_tol": math.inf}, "trace tol"),
    ({"batch_size": 0}, "batch size"),
    ({"threat": (8, 255)}, "ThreatModel"),
])
def test_config_rejects_nonsense(kwargs, fragment):
    with pytest.raises(AtprobeError, match=fragment):
        HessianConfig(**kwargs)


# ---------------------------------------------------------------------------- CLI


def test_cli_on_the_cpu_writes_table_density_and_is_deterministic(cnn_ckpt, tmp_path):
    outs = [tmp_path / f"h{i}.csv" for i in range(2)]
    for out in outs:
        run_cli("hessian", cnn_ckpt, "--n", "4", "--batch-size", "4", "--steps", "1", "--iterations", "3",
                "--trace-samples", "3", "--top-k", "2", "--density", "--density-steps", "4",
                "--device", "cpu", "--seed", "3", "-q", "-o", out)
    dens = [o.with_name(o.stem + ".density.csv") for o in outs]
    assert outs[0].read_bytes() == outs[1].read_bytes() and dens[0].read_bytes() == dens[1].read_bytes()
    df = pd.read_csv(outs[0])
    prefix = ["checkpoint", "epoch", "split", "labels", "at", "scope", "n"]
    assert list(df.columns) == [*prefix, *hessian.COLUMNS]
    blocks = [b for b, _ in hessian.parameter_blocks(build_model("cnn-small"), "module")]
    assert df["block"].unique().tolist() == ["all", *blocks]
    assert len(df) == 3 * (1 + len(blocks)) and set(df["n"]) == {4} and set(df["at"]) == {"adv"}
    density = pd.read_csv(dens[0])
    assert list(density.columns) == [*prefix, *hessian.DENSITY_COLUMNS]
    assert density["weight"].sum() == pytest.approx(1.0, abs=1e-9)
    meta = json.loads(outs[0].with_name("h0.meta.json").read_text())
    assert meta["config"]["device"] == "cpu" and meta["config"]["top_k"] == 2 and meta["table"] == "main"


@pytest.mark.parametrize("args,fragment", [
    (["--top-k", "0"], "--top-k"),
    (["--scope", "epoch"], "--scope"),
    (["--blocks", "layer"], "--blocks"),
    (["--tol", "-0.5"], "tol"),
    (["--trace-tol", "-1"], "trace tol"),
    (["--eps", "8"], "8/255"),
    (["--device", "tpu"], "device"),
    (["--n", "0"], "--n"),
])
def test_cli_bad_input_is_one_line_exit_2(cnn_ckpt, tmp_path, args, fragment):
    cli_rejects(fragment, "hessian", cnn_ckpt, *args, "-q", output=tmp_path / "out" / "h.csv")


def test_default_engine_is_atprobe_for_every_row_and_matches_the_dense_hessian():
    model, split = _mlp(), _split()
    config = HessianConfig(batch_size=10, iterations=3000, tol=1e-13, trace_samples=300, blocks="none",
                           threat=ThreatModel(steps=STEPS))
    table = hessian.probe(model, split, config)
    assert table["method"].tolist() == ["atprobe", "atprobe"] and table["block"].tolist() == ["all", "all"]
    x, y = _adversarial(model, split, seed=0)
    h = _dense(model, x, y)
    rows = table.set_index("quantity")
    assert rows.loc["eigenvalue", "value"] == pytest.approx(float(_by_magnitude(h)[0]), rel=1e-9)
    assert bool(rows.loc["eigenvalue", "converged"])
    assert abs(rows.loc["trace", "value"] - float(torch.trace(h))) < 4 * _hutchinson_sigma(h) / math.sqrt(300)


def test_forward_over_reverse_products_equal_double_backward():
    model, split = _mlp(), _split()
    x, y = _adversarial(model, split, seed=0)
    for batches in ([(x, y)], [(x[:4], y[:4]), (x[4:], y[4:])]):
        rev, fwd = LossHessian(model, batches), LossHessian(model, batches, mode="forward")
        for block in (None, [0, 1], [3]):
            n = sum(p.numel() for p in rev.like(block))
            v = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            torch.testing.assert_close(fwd.operator(block)(v), rev.operator(block)(v), rtol=1e-10, atol=1e-13)
