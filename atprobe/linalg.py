"""Matrix-free eigenvalues and traces of symmetric operators: power iteration, Lanczos,
stochastic Lanczos quadrature and Hutchinson traces.

Every function takes a *matvec*: a callable ``A(V)`` mapping a batch of vectors ``V`` of
shape ``(B, n)`` to ``(B, n)``. What the rows mean is the caller's choice:

* independent problems, row ``b`` multiplied by its own operator ``A_b`` (the per-sample
  input Hessians of a batch: one double backward gives every sample's ``H_i v_i``);
* several vectors of the same operator (Hutchinson probes, the starts of an operator norm).

So nothing here knows whether ``A`` is an input Hessian, a weight Hessian or ``W^T W`` of a
convolution. Vectors are flat; callers reshape. Rows stop independently (converged rows keep
their value; their later products are computed but ignored, which keeps the batch shape and
costs nothing extra on a GPU). Every loop takes one host synchronization per step (the stop
decision, and for Lanczos the small tridiagonal eigenproblem, solved on the host with
``scipy.linalg.eigh_tridiagonal``); the products dominate.

Float64 operators give float64 results; float32 operators are accumulated in their dtype
(Lanczos coefficients in float64 on the host).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import Tensor

__all__ = [
    "Lanczos",
    "Matvec",
    "Power",
    "block_power_iteration",
    "dominant_ritz",
    "gaussian",
    "hutchinson",
    "lanczos",
    "power_iteration",
    "quadrature",
    "rademacher",
    "slq",
    "unit",
]

#: ``(B, n) -> (B, n)``: row ``b`` of the result is ``A_b v_b``.
Matvec = Callable[[Tensor], Tensor]


def unit(v: Tensor) -> Tensor:
    """Rows of ``v`` scaled to unit 2-norm (zero rows stay zero)."""
    return v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def gaussian(rows: int, n: int, *, generator: torch.Generator, dtype=torch.float32, device=None) -> Tensor:
    """``(rows, n)`` standard normal draws from ``generator`` (on its device), moved to ``device``."""
    return torch.randn((rows, n), generator=generator, device=generator.device, dtype=dtype).to(device)


def rademacher(rows: int, n: int, *, generator: torch.Generator, dtype=torch.float32, device=None) -> Tensor:
    """``(rows, n)`` independent +-1 draws from ``generator`` (on its device), moved to ``device``."""
    bits = torch.randint(0, 2, (rows, n), generator=generator, device=generator.device)
    return (bits * 2 - 1).to(device=device, dtype=dtype)


def _project_out(w: Tensor, basis: Tensor | None) -> Tensor:
    """``w - Q Q^T w`` per row for orthonormal ``basis`` ``(B, k, n)``, twice (classical
    Gram-Schmidt repeated is as stable as modified Gram-Schmidt, and is two GEMVs)."""
    if basis is None or basis.shape[1] == 0:
        return w
    for _ in range(2):
        w = w - torch.einsum("bkn,bk->bn", basis, torch.einsum("bkn,bn->bk", basis, w))
    return w


# ---------------------------------------------------------------------------- power iteration


@dataclass(frozen=True)
class Power:
    """:func:`power_iteration`'s result, one entry per row: ``value`` (B,) the last Rayleigh
    quotient, ``vector`` (B, n) the last unit iterate, ``iterations`` (B,) products used,
    ``converged`` (B,) whether the stopping rule was met."""

    value: Tensor
    vector: Tensor
    iterations: Tensor
    converged: Tensor


def power_iteration(
    matvec: Matvec,
    v0: Tensor,
    *,
    iterations: int = 100,
    tol: float = 1e-3,
    check_every: int = 1,
    basis: Tensor | None = None,
) -> Power:
    """Signed eigenvalue of largest magnitude of each row's symmetric operator.

    ``v_0 = v0 / ||v0||``; each step ``w_t = A (P v_{t-1})``, ``lambda_t = <w_t, P v_{t-1}>``
    (the Rayleigh quotient of a unit vector), ``v_t = w_t / ||w_t||``, where ``P`` projects
    out the orthonormal rows of ``basis`` ``(B, k, n)`` (deflation: the eigenvectors already
    found). ``lambda_t`` converges to the dominant eigenvalue at the rate
    ``(lambda_2 / lambda_1)^{2t}``: slow when the eigengap is small (use :func:`lanczos`).

    A row stops (``converged``) when ``|lambda_t - lambda_{t-c}| <= tol |lambda_t|`` with ``c =
    check_every`` (checked every ``c`` steps, one host sync per check), or when ``A v = 0``
    (eigenvalue 0); else after ``iterations`` products (``converged`` False; ``tol = 0`` runs
    them all). For an operator norm pass ``A = M^T M`` and take ``sqrt(value)``.
    """
    b = v0.shape[0]
    dev = v0.device
    v = unit(_project_out(v0, basis))
    value = torch.zeros(b, dtype=v0.dtype, device=dev)
    prev = torch.full((b,), math.nan, dtype=v0.dtype, device=dev)
    count = torch.zeros(b, dtype=torch.int64, device=dev)
    converged = torch.zeros(b, dtype=torch.bool, device=dev)
    active = torch.ones(b, dtype=torch.bool, device=dev)
    for t in range(1, iterations + 1):
        v = unit(_project_out(v, basis))
        w = matvec(v)
        lam = (w * v).sum(dim=1)
        norm = w.norm(dim=1)
        count += active.long()
        value = torch.where(active, lam, value)
        zero = active & (norm == 0)
        v = torch.where((active & ~zero)[:, None], w / norm.clamp_min(torch.finfo(w.dtype).tiny)[:, None], v)
        if t % check_every == 0 or t == iterations:
            done = zero | (active & ((lam - prev).abs() <= tol * lam.abs()))
            prev = torch.where(active, lam, prev)
            converged |= done
            active &= ~done
            if not bool(active.any()):  # the one host sync per check
                break
        else:
            converged |= zero
            active &= ~zero
    return Power(value, v, count, converged)


def block_power_iteration(
    matvec: Matvec,
    v0: Tensor,
    *,
    iterations: int = 500,
    tol: float = 1e-6,
    check_every: int = 10,
) -> tuple[Tensor, int, bool]:
    """Signed eigenvalue of largest magnitude of *one* symmetric operator by power iteration on
    a block of ``k`` vectors (the rows of ``v0``; subspace iteration): ``V_t = orth(A V_{t-1})``
    (QR), with the Rayleigh-Ritz estimate ``lambda_t`` = the largest-magnitude eigenvalue of
    ``V^T A V``. It converges at the rate ``(lambda_{k+1} / lambda_1)^t`` instead of
    ``(lambda_2 / lambda_1)^t``, so clustered top eigenvalues (a convolution's singular values)
    do not slow it down. For a positive semi-definite ``A`` the estimate increases to ``lambda_1``.

    Stops when ``|lambda_t - lambda_{t-c}| <= tol |lambda_t|`` (``c = check_every``, checked
    every ``c`` steps: one host sync per check) or after ``iterations`` products of the block.
    Returns ``(value (0-dim tensor), iterations, converged)``.
    """
    k = v0.shape[0]

    def orth(t: Tensor) -> Tensor:
        q, _ = torch.linalg.qr(t.T)
        return q.T

    v = orth(v0)
    value = v0.new_zeros(())
    previous = None
    for t in range(1, iterations + 1):
        w = matvec(v)
        if t % check_every == 0 or t == iterations:
            small = v @ w.T
            ritz = torch.linalg.eigvalsh((small + small.T) / 2) if k > 1 else small.reshape(1)
            value = ritz[ritz.abs().argmax()]
            current = float(value)  # the one host sync per check
            if previous is not None and abs(current - previous) <= tol * abs(current):
                return value, t, True
            previous = current
        v = orth(w)
    return value, iterations, False


# ---------------------------------------------------------------------------- Lanczos


@dataclass(frozen=True)
class Lanczos:
    """:func:`lanczos`'s result per row ``b``: the tridiagonal ``T_b = Q_b^T A_b Q_b`` as
    ``alpha[b]`` (m_b,) and ``beta[b]`` (m_b - 1,) (float64 numpy), ``residual[b]`` the norm
    of the next Lanczos vector before normalization (``beta_{m_b}``; 0 when the Krylov space
    is invariant), ``steps`` (B,) products used and ``converged`` (B,) (numpy)."""

    alpha: list[np.ndarray]
    beta: list[np.ndarray]
    residual: np.ndarray
    steps: np.ndarray
    converged: np.ndarray


def dominant_ritz(alpha: np.ndarray, beta: np.ndarray, residual: float = 0.0) -> tuple[float, float]:
    """The Ritz value of largest magnitude of the tridiagonal ``(alpha, beta)`` and its
    residual bound ``||A y - theta y|| = residual * |s_m|`` (``s`` the Ritz vector of ``T``,
    ``y = Q s``; exact in exact arithmetic). The eigenvalue error is at most that, and about
    its square divided by the gap to the rest of the spectrum."""
    if len(alpha) == 1:
        return float(alpha[0]), abs(float(residual))
    theta, s = eigh_tridiagonal(alpha, beta)
    j = int(np.argmax(np.abs(theta)))
    return float(theta[j]), abs(float(residual) * float(s[-1, j]))


def lanczos(matvec: Matvec, v0: Tensor, steps: int, *, tol: float | None = None) -> Lanczos:
    """Lanczos with full reorthogonalization, every row its own problem.

    ``q_1 = v0 / ||v0||``; step ``j``: ``w = A q_j - beta_{j-1} q_{j-1}``, ``alpha_j = <w, q_j>``,
    ``w -= alpha_j q_j``, then ``w`` is orthogonalized against all of ``q_1..q_j`` (twice; in
    floating point the three-term recurrence alone loses orthogonality and produces copies of
    converged eigenvalues), ``beta_j = ||w||``, ``q_{j+1} = w / beta_j``. Then ``A Q_m = Q_m T_m
    + beta_m q_{m+1} e_m^T``: the eigenvalues of ``T_m`` (Ritz values) approximate the extreme
    eigenvalues of ``A`` after few steps, much faster than power iteration when the gap is small.

    A row stops when ``beta_j <= 100 eps scale`` (the Krylov space is invariant: ``T`` holds
    exact eigenvalues; ``converged``) or, with ``tol``, when the dominant Ritz pair's residual
    ``beta_m |s_m| <= tol |theta|`` (:func:`dominant_ritz`; ``converged``), or after ``steps``
    products (``steps`` is capped at ``n``). Memory: ``steps`` vectors per row.
    """
    b, n = v0.shape
    steps = max(1, min(int(steps), n))
    q = unit(v0)
    basis = q.new_zeros((b, steps, n))
    q_prev = torch.zeros_like(q)
    beta_prev = q.new_zeros(b)
    alphas = np.zeros((b, steps))
    betas = np.zeros((b, steps))
    lengths = np.zeros(b, dtype=np.int64)
    converged = np.zeros(b, dtype=bool)
    active = np.ones(b, dtype=bool)
    scale = np.zeros(b)
    eps = float(torch.finfo(v0.dtype).eps)
    for j in range(steps):
        basis[:, j] = q
        w = matvec(q) - beta_prev[:, None] * q_prev
        a = (w * q).sum(dim=1)
        w = w - a[:, None] * q
        w = _project_out(w, basis[:, : j + 1])
        nb = w.norm(dim=1)
        a_host, b_host = torch.stack([a, nb]).double().cpu().numpy()  # the one host sync per step
        for i in np.flatnonzero(active):
            alphas[i, j], betas[i, j] = a_host[i], b_host[i]
            lengths[i] = j + 1
            scale[i] = max(scale[i], abs(a_host[i]), b_host[i])
            if not b_host[i] > 100 * eps * scale[i]:  # invariant subspace (or a non-finite product)
                converged[i], active[i] = bool(np.isfinite(b_host[i])), False
            elif tol is not None:
                theta, res = dominant_ritz(alphas[i, : j + 1], betas[i, :j], b_host[i])
                if res <= tol * abs(theta):
                    converged[i], active[i] = True, False
        if not active.any():
            break
        q_prev, beta_prev = q, nb
        q = w / nb.clamp_min(torch.finfo(w.dtype).tiny)[:, None]
    return Lanczos(
        alpha=[alphas[i, : lengths[i]].copy() for i in range(b)],
        beta=[betas[i, : lengths[i] - 1].copy() for i in range(b)],
        residual=np.array([betas[i, lengths[i] - 1] for i in range(b)]),
        steps=lengths,
        converged=converged,
    )


def quadrature(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature of one Lanczos run: nodes = eigenvalues of ``T`` (ascending), weights =
    squared first components of its eigenvectors (they sum to 1). For the start ``q_1``,
    ``sum_j w_j t_j^k = q_1^T A^k q_1`` exactly for ``k <= 2m - 1``."""
    if len(alpha) == 1:
        return np.asarray(alpha, dtype=np.float64).copy(), np.ones(1)
    nodes, vectors = eigh_tridiagonal(alpha, beta)
    return nodes, vectors[0, :] ** 2


def slq(matvec: Matvec, v0: Tensor, steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stochastic Lanczos quadrature (Ghorbani et al. 2019; Lin et al. 2016): one
    :func:`lanczos` run and its :func:`quadrature` per row of ``v0`` (random starts, e.g.
    Rademacher), as ``[(nodes, weights)]``. For symmetric ``A`` (n x n) with eigenvalues
    ``lambda_i``, the spectral density ``phi(t) = 1/n sum_i delta(t - lambda_i)`` is estimated by
    ``1/R sum_r sum_j w_rj delta(t - t_rj)``; ``n sum_j w_j t_j^k`` estimates ``tr A^k``
    (unbiased for ``k <= 2m - 1`` with Rademacher or Gaussian starts)."""
    run = lanczos(matvec, v0, steps)
    return [quadrature(a, bt) for a, bt in zip(run.alpha, run.beta)]


# ---------------------------------------------------------------------------- Hutchinson


def hutchinson(matvec: Matvec, probes: Tensor) -> Tensor:
    """Hutchinson's per-probe trace estimates ``v_j^T A v_j`` (R,) for the rows ``v_j`` of
    ``probes`` (R, n), all of the same operator: ``E[v^T A v] = tr A`` for any ``v`` with
    ``E[v v^T] = I``. With Rademacher entries the variance of one probe is
    ``2 sum_{i != j} A_ij^2`` (the smallest among such distributions). The rows go through
    ``matvec`` together (batch them with ``torch.func.vmap`` there)."""
    return (matvec(probes) * probes).sum(dim=1)
