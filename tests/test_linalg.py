"""``atprobe.linalg`` against dense numpy/scipy eigen-decompositions (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from atprobe import linalg


def _symmetric(n: int, seed: int, spectrum: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ev = rng.standard_normal(n) if spectrum is None else spectrum
    return (q * ev) @ q.T


def _batched(mats: list[np.ndarray]):
    a = torch.from_numpy(np.stack(mats))
    return lambda v: torch.einsum("bij,bj->bi", a, v)


def _dominant(m: np.ndarray) -> float:
    ev = np.linalg.eigvalsh(m)
    return float(ev[np.argmax(np.abs(ev))])


def test_power_iteration_batched_matches_the_dense_dominant_eigenvalues():
    spectra = [np.r_[5.0, 2.0, np.linspace(-1, 1, 28)], np.r_[-4.0, np.linspace(-1, 1, 29)],
               np.r_[3.0, 0.1 * np.ones(29)]]
    mats = [_symmetric(30, i, s) for i, s in enumerate(spectra)]
    v0 = torch.randn(3, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    run = linalg.power_iteration(_batched(mats), v0, iterations=1000, tol=1e-14)
    assert run.converged.all() and (run.iterations < 1000).all()
    for i, m in enumerate(mats):
        assert run.value[i].item() == pytest.approx(_dominant(m), rel=1e-12)
        vec = run.vector[i].numpy()
        assert np.linalg.norm(m @ vec - run.value[i].item() * vec) < 1e-6
    # deflation: the second eigenvalue once the first eigenvector is projected out
    second = linalg.power_iteration(_batched(mats[:1]), v0[:1], iterations=2000, tol=1e-14,
                                    basis=run.vector[:1, None])
    assert second.value.item() == pytest.approx(2.0, rel=1e-8)
    # tol 0: every step runs, nothing converges
    fixed = linalg.power_iteration(_batched(mats), v0, iterations=7, tol=0.0)
    assert (fixed.iterations == 7).all() and not fixed.converged.any()


def test_block_power_iteration_handles_clustered_top_eigenvalues():
    m = _symmetric(40, 3, np.r_[2.0, 1.999, 1.998, np.linspace(0, 1, 37)])
    a = torch.from_numpy(m)
    v0 = torch.randn(4, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    value, iters, converged = linalg.block_power_iteration(lambda v: v @ a, v0, iterations=2000, tol=1e-14)
    assert converged and iters < 2000
    assert value.item() == pytest.approx(2.0, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_lanczos_extreme_eigenvalues_and_tridiagonal(seed):
    n = 60
    mats = [_symmetric(n, seed), _symmetric(n, seed + 10, np.r_[1.0, 0.99, np.linspace(-0.5, 0.5, n - 2)])]
    v0 = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    run = linalg.lanczos(_batched(mats), v0, n)
    for i, m in enumerate(mats):
        ev = np.linalg.eigvalsh(m)
        theta = np.linalg.eigvalsh(np.diag(run.alpha[i]) + np.diag(run.beta[i], 1) + np.diag(run.beta[i], -1))
        assert theta[0] == pytest.approx(ev[0], abs=1e-10) and theta[-1] == pytest.approx(ev[-1], abs=1e-10)
    # with a tolerance: few steps, converged, the dominant Ritz value within the residual bound
    run = linalg.lanczos(_batched(mats), v0, n, tol=1e-6)
    assert run.converged.all() and (run.steps < n).all()
    for i, m in enumerate(mats):
        theta, res = linalg.dominant_ritz(run.alpha[i], run.beta[i], run.residual[i])
        assert res <= 1e-6 * abs(theta)
        assert theta == pytest.approx(_dominant(m), rel=1e-6)


def test_lanczos_stops_on_an_invariant_subspace():
    m = _symmetric(20, 5, np.r_[3.0, -1.0, np.zeros(18)])  # rank 2: the Krylov space has dimension 3
    v0 = torch.randn(1, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    run = linalg.lanczos(_batched([m]), v0, 20)
    assert run.steps[0] == 3 and run.converged[0]
    nodes, _ = linalg.quadrature(run.alpha[0], run.beta[0])
    np.testing.assert_allclose(nodes, [-1.0, 0.0, 3.0], atol=1e-12)


def test_slq_integrates_to_one_and_matches_the_dense_spectral_moments():
    n, runs, steps = 80, 400, 10
    m = _symmetric(n, 7)
    ev = np.linalg.eigvalsh(m)
    a = torch.from_numpy(m)
    starts = linalg.rademacher(runs, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    quad = linalg.slq(lambda v: v @ a, starts, steps)
    for nodes, weights in quad:
        assert weights.sum() == pytest.approx(1.0, abs=1e-12) and (weights >= 0).all()
        assert nodes.min() >= ev.min() - 1e-10 and nodes.max() <= ev.max() + 1e-10
    # Rademacher starts (unit after normalization, ||v||^2 = n): n sum_j w_j t_j^k is an unbiased
    # estimate of tr A^k; averaged over runs it matches the dense moments of the spectral density
    for k in range(1, 5):
        estimate = np.mean([(w * t**k).sum() for t, w in quad])
        exact = float(np.mean(ev**k))
        spread = np.std([(w * t**k).sum() for t, w in quad]) / math.sqrt(runs)
        assert abs(estimate - exact) < 5 * spread + 1e-12, k
    # for each run, the quadrature is exact for its own start up to degree 2m - 1
    v = starts[0].numpy() / math.sqrt(n)
    t, w = quad[0]
    for k in range(2 * steps):
        assert (w * t**k).sum() == pytest.approx(v @ np.linalg.matrix_power(m, k) @ v, rel=1e-8,
                                                 abs=1e-10 * np.abs(ev).max() ** k), k


def test_hutchinson_trace_matches_the_exact_trace():
    n, probes = 50, 4000
    m = _symmetric(n, 9) + 0.5 * np.eye(n)
    a = torch.from_numpy(m)
    v = linalg.rademacher(probes, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    values = linalg.hutchinson(lambda t: t @ a, v).numpy()
    off = m - np.diag(np.diag(m))
    sigma = math.sqrt(2 * (off**2).sum())  # the std of one Rademacher probe
    assert np.std(values) == pytest.approx(sigma, rel=0.1)
    assert abs(values.mean() - np.trace(m)) < 4 * sigma / math.sqrt(probes)
    # a diagonal operator: every Rademacher probe is exact
    d = torch.arange(1.0, n + 1, dtype=torch.float64)
    exact = linalg.hutchinson(lambda t: t * d, v[:5])
    torch.testing.assert_close(exact, torch.full((5,), float(d.sum()), dtype=torch.float64))
