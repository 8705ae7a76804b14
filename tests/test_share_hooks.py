"""The probes' gather hooks in one process: two "ranks" run one after the other, the second
handing its per-sample values to the first through the hook, give the whole-data table bit
for bit (what ``SampleShare.gather_values`` does across real ranks; tests/test_scaling_probes.py
runs it under torchrun). Also the Hessian's reduce hook against one process."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from atprobe.distributed import DistContext, SampleShare
from atprobe.models import build_model
from atprobe.probes import flatness, gradcos, hessian, stability
from atprobe.threat import ThreatModel
from tests.conftest import randomize_bn
from tests.test_probes_grad import _split

STEPS = 2


def _two_ranks(run, data, rows: slice):
    """``run(data, gather)`` as rank 1 (rows after ``rows``) then rank 0 (``rows``): rank 0's
    hook appends what rank 1 computed at the same call, as an all-gather would."""
    later: list[torch.Tensor] = []

    def keep(values):
        later.append(values)
        return values

    run(data.subset(slice(rows.stop, len(data))), keep)
    return run(data.subset(rows), lambda values: torch.cat([values, later.pop(0).to(values.device)]))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return randomize_bn(build_model("cnn-small").double(), 3).eval()


def test_stability_hook_gives_the_whole_table(model):
    data = _split(n=7)
    config = stability.StabilityConfig(losses=("clean", "pgd_at"), lambdas=(-0.1, 0.0, 0.1), directions=2,
                                       chunk_size=2, seed=4, threat=ThreatModel(steps=STEPS))
    whole = stability.probe(model, data, config)
    split = _two_ranks(lambda d, g: stability.probe(model, d, config, gather=g), data, slice(0, 4))
    pd.testing.assert_frame_equal(split, whole, check_exact=True)
    assert (whole["n"] == 7).all()


def test_gradcos_hook_gives_the_whole_table(model):
    torch.manual_seed(4)
    other = randomize_bn(build_model("cnn-small").double(), 4).eval()
    data = _split(n=5)
    config = gradcos.GradCosConfig(loss="pgd_at", chunk_size=2, seed=1, threat=ThreatModel(steps=STEPS))
    whole = gradcos.probe([model, other], data, config)
    split = _two_ranks(lambda d, g: gradcos.probe([model, other], d, config, gather=g), data, slice(0, 2))
    pd.testing.assert_frame_equal(split, whole, check_exact=True)


def test_flatness_hook_gives_the_whole_curve(model):
    data = _split(n=5)
    config = flatness.FlatnessConfig(lambdas=(-0.1, 0.0, 0.1), radius=0.1, directions=2, batch_size=2, seed=2,
                                     threat=ThreatModel(steps=STEPS))
    whole = flatness.probe(model, data, config)
    split = _two_ranks(lambda d, g: flatness.probe(model, d, config, gather=g), data, slice(0, 4))
    pd.testing.assert_frame_equal(split, whole, check_exact=True)


def test_an_empty_share_joins_the_gathers(model):
    """More ranks than chunks: a rank with no sample still makes every gather call."""
    data = _split(n=3)
    config = stability.StabilityConfig(losses=("clean",), lambdas=(0.0, 0.1), directions=1, chunk_size=4, seed=0,
                                       threat=ThreatModel(steps=STEPS))
    whole = stability.probe(model, data, config)
    split = _two_ranks(lambda d, g: stability.probe(model, d, config, gather=g), data, slice(0, 3))
    pd.testing.assert_frame_equal(split, whole, check_exact=True)


def test_hessian_reduce_hook_sums_the_shares(model, monkeypatch):
    """Two shares of whole batches (1 and 2 batches), each product the sum of both (the
    all-reduce, played by hand with the other share's Hessian): the same eigenvalues and
    traces as one process, to float64 rounding."""
    data = _split(n=6)
    config = hessian.HessianConfig(scope="all", batch_size=2, top_k=2, iterations=30, tol=0.0, trace_samples=4,
                                   trace_tol=0.0, blocks="module", at="natural", seed=0)
    whole = hessian.compute(model, data, config).table
    with hessian._requiring_grad(model):
        other = hessian.LossHessian(model, hessian.loss_batches(model, data.subset(slice(2, 6)), config))
    other.total = len(data)
    seen = []
    local = hessian.LossHessian._local_products

    def spy(self, rows, idx, count):
        if self is not other:
            seen.append((rows, idx, count))
        return local(self, rows, idx, count)

    monkeypatch.setattr(hessian.LossHessian, "_local_products", spy)

    def reduce(t):
        if not seen:  # the sample count
            return t + 4
        rows, idx, count = seen.pop()
        with hessian._requiring_grad(model):
            theirs = local(other, rows, idx, count)
        return t + torch.cat([x.reshape(-1) for x in theirs])

    split = hessian.compute(model, data.subset(slice(0, 2)), config, reduce=reduce)
    assert split.n == 6 and not seen
    # iterations are not compared: with tol 0 a small block stops when its estimate stops changing
    # at all, which rounding decides
    torch.testing.assert_close(torch.tensor(split.table["value"].to_numpy()), torch.tensor(whole["value"].to_numpy()),
                               rtol=1e-9, atol=1e-12)


def test_points_and_gathers_of_one_process_are_the_identity():
    share = SampleShare()
    assert share.points(5) == range(5)
    t = torch.arange(3.0)
    assert share.gather_values(t) is t
    frame = pd.DataFrame({"point": [2, 0]})
    assert share.gather_rows(frame, "point") is frame
    ranks = [SampleShare.of(DistContext(r, 3)) for r in range(3)]
    assert sorted(p for s in ranks for p in s.points(7)) == list(range(7))
