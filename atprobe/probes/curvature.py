"""``curvature``: the dominant eigenvalue of the input Hessian of the loss, per sample
(Moosavi-Dezfooli et al., CVPR 2019, "Robustness via curvature regularization, and vice
versa"; Dong et al., ICLR 2022, Sec. 3.3, Fig. 6).

For a sample ``(x_i, y_i)`` and the per-sample loss ``l_i(x) = CE(f(x), y_i)``,

    H_i = d^2 l_i / d x^2        (D x D, D = C * H * W, at x = x_i or at its PGD example x'_i)
    lambda_i = the eigenvalue of H_i of largest magnitude, with its sign

computed by Lanczos on Hessian-vector products (double backward, ``H_i v`` =
``d/dx <d l_i/dx, v>``), never forming ``H_i`` (``atprobe.linalg.lanczos``, full
reorthogonalization): from ``q_1 = v_0 / ||v_0||``, ``v_0 ~ N(0, I)``, the Krylov basis
``q_1..q_m`` of ``H_i`` and its tridiagonal ``T_m = Q_m^T H_i Q_m``; ``lambda_i`` is the Ritz
value of ``T_m`` of largest magnitude. Lanczos converges where power iteration stalls on a
small eigengap (on a trained cnn-small, power iteration's defaults left a sample 2.2% off the
dense eigenvalue). A sample stops when the dominant Ritz pair's residual
``beta_m |s_m| <= tol |lambda|`` or its Krylov space is invariant (``converged``), or after
``iterations`` Hessian-vector products (``converged = False``).

Batched. In eval mode the samples of a batch do not interact, so the gradient of the
*summed* loss with respect to the batch ``x`` holds every sample's own gradient, and one
double backward with a batch of vectors ``v`` gives every sample's ``H_i v_i`` at once.
The gradient graph is built once per batch and reused by every iteration; converged samples
keep their value, so the result is the per-sample loop's (``benchmarks/curvature.py``
measures both). Each sample's start is keyed by ``(seed, sample index)`` on its own stream
(``atprobe.starts``), so it does not depend on the batch.

ReLU networks have piecewise-linear logits ``z(x)`` (zero second derivative almost
everywhere), but the loss is not: ``H_i = J^T (diag(p) - p p^T) J + sum_k (p_k - [k = y]) d^2 z_k / dx^2``
with ``J = dz/dx`` and ``p = softmax(z)``; the second term vanishes for ReLU networks, the
first does not (the softmax curvature pulled back through ``J``). It is positive
semi-definite, so for ReLU networks ``lambda_i >= 0``; smooth activations (tanh, softplus)
can give negative dominant eigenvalues.

``probe(model, data, config)`` returns one row per sample; :func:`summarize` gives the
mean/median; :func:`complexity_rows` the rows of ``atprobe complexity``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn

from atprobe import linalg, objectives
from atprobe.attacked import attack_batch
from atprobe.data import Split
from atprobe.distributed import ONE_PROCESS, SampleShare
from atprobe.errors import AtprobeError, check_choice
from atprobe.probes._gradutil import COMPLEXITY_COLUMNS, PGDFields, is_int, is_number, sample_batches, stats
from atprobe.runtime import frozen_parameters, module_mode
from atprobe.starts import keyed_normal, sample_keys

__all__ = [
    "AT_CHOICES",
    "COMPLEXITY_COLUMNS",
    "CurvatureConfig",
    "SAMPLE_COLUMNS",
    "SUMMARY_COLUMNS",
    "complexity_rows",
    "input_hessian_eigenvalues",
    "probe",
    "summarize",
]

#: Where the Hessian is taken: at the natural samples or at their PGD examples.
AT_CHOICES = ("natural", "adv")
SAMPLE_COLUMNS = ["sample", "label", "eigenvalue", "iterations", "converged"]
SUMMARY_COLUMNS = ["statistic", "n", "value"]

#: The stream of the Lanczos starts, so they are another draw than the PGD starts.
_POWER_STREAM = 0x5EED_C0DE


@dataclass(frozen=True)
class CurvatureConfig(PGDFields):
    """What ``curvature`` measures.

    at: ``natural`` (the Hessian at x_i, default) or ``adv`` (at the PGD example x'_i,
        crafted under ``threat``; default PGD-10 at 8/255, step eps/4).
    iterations: the most Hessian-vector products per sample (Lanczos steps).
    tol: stop a sample when its dominant Ritz pair's residual is ``<= tol |lambda|``; 0 runs
        every sample for ``iterations`` steps (or until its Krylov space is invariant).
    batch_size: samples per double backward (memory: the batch's double-backward graph).
    seed: the Lanczos starts (per sample) and the PGD starts.
    """

    at: str = "natural"
    iterations: int = 20
    tol: float = 1e-3
    batch_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.at, AT_CHOICES, "curvature point (--at)")
        if not is_int(self.iterations) or self.iterations < 1:
            raise AtprobeError(f"iterations must be an integer >= 1, got {self.iterations!r}")
        if not is_number(self.tol) or self.tol < 0:
            raise AtprobeError(f"tol must be a finite number >= 0, got {self.tol!r}")
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise AtprobeError(f"batch size must be an integer >= 1, got {self.batch_size!r}")


def _starts(x: Tensor, seed: int, ids: Sequence[int] | Tensor) -> Tensor:
    """Unit Gaussian starts, one per sample, keyed by ``(seed, id, POWER_STREAM)``
    (``atprobe.starts``: another stream than the sample's PGD start)."""
    keys = sample_keys(seed, torch.as_tensor(ids, dtype=torch.int64).to(x.device), _POWER_STREAM)
    v = keyed_normal(keys, tuple(x.shape[1:]), x.dtype)
    return v / v.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def input_hessian_eigenvalues(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    iterations: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    sample_ids: Sequence[int] | Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dominant (largest-magnitude, signed) eigenvalue of each sample's input Hessian of
    ``CE(f(x_i), y_i)``, by batched Lanczos (see the module docstring).

    Args:
        model: eval mode is used (and each submodule's mode restored); its parameters are
            frozen during the computation (flags restored), so no weight-gradient graph is built.
        x, y: one batch (B, ...) on the model's device, in the model's dtype.
        iterations, tol: the most Hessian-vector products per sample; relative residual tolerance.
        seed, sample_ids: sample ``i``'s start is keyed by ``(seed, sample_ids[i])`` on its own
            stream (``atprobe.starts``; default ids: 0..B-1).

    Returns ``(eigenvalue, iterations, converged)``: (B,) tensors (x's dtype, int64, bool)
    on x's device. One host synchronization per iteration (to stop when all samples have converged).
    """
    if x.shape[0] != y.shape[0]:
        raise AtprobeError(f"x and y must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    ids = list(range(x.shape[0])) if sample_ids is None else (
        sample_ids.tolist() if isinstance(sample_ids, Tensor) else [int(i) for i in sample_ids])
    if len(ids) != x.shape[0]:
        raise AtprobeError(f"{len(ids)} sample ids for {x.shape[0]} samples")
    b = x.shape[0]
    with module_mode(model, False), frozen_parameters(model), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        loss = objectives.ce(model(xg), y).sum()  # sum: each sample's gradient keeps its own scale
        (grad,) = torch.autograd.grad(loss, xg, create_graph=True)
        held = [grad]  # matvec's reference to the gradient graph, cleared below with the del

        def matvec(v: Tensor) -> Tensor:  # row i: H_i v_i, one double backward for the batch
            (hv,) = torch.autograd.grad(held[0], xg, grad_outputs=v.view_as(xg), retain_graph=True)
            return hv.detach().reshape(b, -1)

        run = linalg.lanczos(matvec, _starts(xg, seed, ids).reshape(b, -1), iterations, tol=tol)
        held.clear()
        del grad, loss
    eig = [linalg.dominant_ritz(a, bt)[0] for a, bt in zip(run.alpha, run.beta)]
    return (torch.tensor(eig, dtype=torch.float64).to(device=x.device, dtype=x.dtype),
            torch.from_numpy(run.steps).to(x.device), torch.from_numpy(run.converged).to(x.device))


def probe(model: nn.Module, data: Split, config: CurvatureConfig = CurvatureConfig(), *, progress=None) -> pd.DataFrame:
    """One row per sample (columns :data:`SAMPLE_COLUMNS`): ``sample`` (its row in the
    original split, ``Split.index``), ``label`` (the label the loss uses, ``data.y``),
    ``eigenvalue`` (signed, nats per pixel^2 with pixels in [0, 1]), ``iterations``
    (Hessian-vector products used) and ``converged``. The model is not modified.
    ``progress``: anything with ``update(n)``, advanced by the samples of each batch."""
    eigs, iters, conv = [], [], []
    for x, y, ids in sample_batches(model, data, config.batch_size):
        id_list = ids.tolist()
        if config.at == "adv":
            x = attack_batch(model, x, y, ids, config.attack, seed=config.seed, amp=False)
        e, t, c = input_hessian_eigenvalues(model, x, y, iterations=config.iterations, tol=config.tol,
                                            seed=config.seed, sample_ids=id_list)
        eigs.append(e)
        iters.append(t)
        conv.append(c)
        if progress is not None:
            progress.update(len(y))
    return pd.DataFrame({
        "sample": data.index.cpu().numpy(),
        "label": data.y.cpu().numpy(),
        "eigenvalue": torch.cat(eigs).to("cpu", torch.float64).numpy(),
        "iterations": torch.cat(iters).cpu().numpy(),
        "converged": torch.cat(conv).cpu().numpy(),
    }, columns=SAMPLE_COLUMNS)


def summarize(samples: pd.DataFrame) -> pd.DataFrame:
    """Summary rows (columns :data:`SUMMARY_COLUMNS`) of a :func:`probe` table: ``mean``,
    ``median``, ``std`` (population) and ``mean_abs`` of the eigenvalues over the samples
    where it is finite (``n`` of them), and ``converged`` (fraction of all samples that
    met the tolerance, ``n`` = all samples)."""
    values = torch.from_numpy(samples["eigenvalue"].to_numpy(dtype="float64", copy=True))
    s = stats(values)
    finite = values[torch.isfinite(values)]
    mean_abs = float(finite.abs().mean()) if finite.numel() else math.nan
    rows = [{"statistic": k, "n": s["n"], "value": s[k]} for k in ("mean", "median", "std")]
    rows.append({"statistic": "mean_abs", "n": s["n"], "value": mean_abs})
    n = len(samples)
    rows.append({"statistic": "converged", "n": n,
                 "value": float(samples["converged"].astype(bool).mean()) if n else math.nan})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def complexity_rows(model: nn.Module, samples: Split, config: CurvatureConfig = CurvatureConfig(), *,
                    share: SampleShare = ONE_PROCESS) -> pd.DataFrame:
    """The rows of ``atprobe complexity`` (columns :data:`COMPLEXITY_COLUMNS`): measure
    ``curvature``, variants ``mean;at=<at>`` and ``median;at=<at>`` (mean/median over the
    samples of the signed dominant eigenvalue), ``reason`` '' or why the value is NaN.
    ``share``: under ``torchrun`` each rank takes its whole batches and the per-sample rows
    are gathered before the summary."""
    mine = share.mine(samples, config.batch_size)
    table = probe(model, mine, config) if len(mine) else pd.DataFrame(columns=SAMPLE_COLUMNS)
    summary = summarize(share.gather(table, len(mine))).set_index("statistic")
    rows = []
    for stat in ("mean", "median"):
        value = float(summary.loc[stat, "value"])
        reason = "" if math.isfinite(value) else "no sample has a finite input-Hessian eigenvalue (non-finite loss)"
        rows.append({"measure": "curvature", "variant": f"{stat};at={config.at}", "value": value, "reason": reason})
    return pd.DataFrame(rows, columns=COMPLEXITY_COLUMNS)
