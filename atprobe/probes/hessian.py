"""``hessian``: the weight-space Hessian of the adversarial loss (Dong et al., ICLR 2022,
Sec. 3.3, Fig. 6; Yao et al. 2020, "PyHessian").

For fixed samples ``(x'_i, y_i)`` (PGD examples crafted once against the model at its
parameters ``theta`` and then held fixed; or the natural ``x_i`` with ``at="natural"``):

    L(theta) = 1/N sum_i CE(f(x'_i; theta), y_i),      H = d^2 L / d theta^2   (P x P)

and, never forming ``H``, from Hessian-vector products ``H v = d/dtheta <dL/dtheta, v>``:

* the top-k eigenvalues (largest magnitude, signed; power iteration with deflation) and the
  trace (Hutchinson: ``tr H = E[v^T H v]`` for Rademacher ``v``) of the whole model, by
  ``pyhessian``: ``hessian(...).eigenvalues()`` as is, and ``.trace(maxIter=1)`` once per
  probe with the stopping decision taken here (:func:`hutchinson_samples`: pyhessian's own
  loop stops after two probes whenever the running mean is negative);
* the same two quantities for each *block* ``H_bb`` (the Hessian restricted to one layer's
  parameters, the others held fixed), by this module's own power iteration and Hutchinson
  estimator on block-restricted Hessian-vector products, with pyhessian's stopping rules;
  pyhessian has no way to restrict its products to a block. Applied to the block of all
  parameters, :func:`power_iteration` gives pyhessian's eigenvalues (tested);
* optionally the eigenvalue density by stochastic Lanczos quadrature (:func:`slq`):
  pyhessian 0.1's ``density()`` calls ``torch.eig``, which torch removed, so the Lanczos
  recursion runs here on the same Hessian-vector products and the tridiagonal matrix is
  diagonalized by ``scipy.linalg.eigh_tridiagonal``. torch is not patched.

``scope="batch"`` uses the first ``batch_size`` samples as one batch (the gradient graph is
built once and every product reuses it); ``scope="all"`` accumulates every product over
all samples in batches of ``batch_size`` (one forward and double backward per batch and
product: slower, lower variance), as pyhessian's ``dataloader`` mode does.

Eval mode throughout (each submodule's mode restored). The model's weights, buffers,
``.grad`` and ``requires_grad`` flags are as before afterwards; pyhessian writes ``.grad``
(``loss.backward(create_graph=True)``), so they are saved and put back around it.
Device: pyhessian moves its vectors and batches with a bare ``.to("cuda")`` / ``.cuda()``
or keeps them on the CPU (its ``cuda`` flag). For a model on ``cuda:N`` it runs with
``cuda=True`` inside ``torch.cuda.device(N)``, so ``"cuda"`` means that GPU; for a CPU model
with ``cuda=False``. Random draws: pyhessian draws from the global torch generators; they
are seeded with ``seed`` inside ``torch.random.fork_rng`` just before each pyhessian call,
so the global random state of the caller is left as it was. This module's own draws come
from local generators on the model's device, seeded with ``seed``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.func import functional_call

from atprobe import linalg, objectives
from atprobe.attacked import attack_batch
from atprobe.data import Split
from atprobe.distributed import ONE_PROCESS, SampleShare
from atprobe.errors import AtprobeError, check_choice
from atprobe.probes._gradutil import COMPLEXITY_COLUMNS, PGDFields, is_int, is_number, sample_batches
from atprobe.runtime import make_generator, module_mode

__all__ = [
    "BLOCK_MODES",
    "COLUMNS",
    "DENSITY_COLUMNS",
    "ENGINES",
    "HVP_MODES",
    "HessianConfig",
    "HessianResult",
    "LOSS_POINTS",
    "LossHessian",
    "SCOPES",
    "complexity_rows",
    "compute",
    "hutchinson",
    "hutchinson_samples",
    "loss_batches",
    "parameter_blocks",
    "probe",
    "pyhessian_top",
    "slq",
    "top_eigenvalues",
]

#: Per-block rows: ``none``; ``module`` (one block per module owning parameters: a conv
#: weight, a linear weight + bias, a BatchNorm weight + bias); ``tensor`` (one per parameter).
BLOCK_MODES = ("none", "module", "tensor")
#: ``batch``: the first ``batch_size`` samples; ``all``: every sample, products accumulated over batches.
SCOPES = ("batch", "all")
#: The loss's inputs: the PGD examples (``adv``) or the natural samples.
LOSS_POINTS = ("adv", "natural")

COLUMNS = ["block", "params", "quantity", "k", "value", "iterations", "converged", "std_error", "method"]
DENSITY_COLUMNS = ["run", "node", "eigenvalue", "weight"]

#: Who computes the whole model's rows: this module (:mod:`atprobe.linalg`) or pyhessian.
ENGINES = ("atprobe", "pyhessian")
#: Hessian-vector products: double backward or forward-over-reverse (:class:`LossHessian`).
HVP_MODES = ("reverse", "forward")

Vector = list[Tensor]
#: ``t -> t summed over the ranks of a torchrun job`` (``DistContext.sum_over_ranks``).
Reduce = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class HessianConfig(PGDFields):
    """What ``hessian`` measures.

    at: ``adv`` (the loss on PGD examples crafted once at theta with norm/eps/alpha/steps,
        default PGD-10 at 8/255, step eps/4) or ``natural``.
    scope, batch_size: one batch of ``batch_size`` samples, or ``all`` samples in batches.
    top_k: eigenvalues per block (and for the whole model), largest magnitude first.
    iterations, tol: power iteration: the most products per eigenvalue, and the relative
        change of the estimate that stops it (pyhessian's ``maxIter``/``tol``; its defaults).
    trace_samples, trace_tol: Hutchinson: the most Rademacher probes, and the relative change
        of the running mean that stops it (pyhessian's ``maxIter``/``tol``). Default 0: every
        probe is used; pyhessian's default 1e-3 often stops after a dozen probes by chance
        (the running mean happens to move little), leaving a standard error of several percent.
    blocks: per-block rows (:data:`BLOCK_MODES`).
    density, density_steps, density_runs: stochastic Lanczos quadrature of the whole model's
        spectrum: Lanczos steps per run (capped at the number of parameters) and runs.
    engine: who computes the whole model's rows: ``atprobe`` (default; the same
        :mod:`atprobe.linalg` code as the blocks) or ``pyhessian`` (the reference; blocks are
        always atprobe's, pyhessian cannot restrict its products to a block).
    seed: the PGD starts, pyhessian's draws and this module's own.
    """

    at: str = "adv"
    scope: str = "batch"
    batch_size: int = 128
    top_k: int = 1
    iterations: int = 100
    tol: float = 1e-3
    trace_samples: int = 100
    trace_tol: float = 0.0
    blocks: str = "module"
    density: bool = False
    density_steps: int = 100
    density_runs: int = 1
    engine: str = "atprobe"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.engine, ENGINES, "Hessian engine")
        check_choice(self.at, LOSS_POINTS, "loss point (--at)")
        check_choice(self.scope, SCOPES, "Hessian scope")
        check_choice(self.blocks, BLOCK_MODES, "block mode")
        for what, v in (("batch size", self.batch_size), ("top-k", self.top_k), ("iterations", self.iterations),
                        ("trace samples", self.trace_samples), ("density steps", self.density_steps),
                        ("density runs", self.density_runs)):
            if not is_int(v) or v < 1:
                raise AtprobeError(f"{what} must be an integer >= 1, got {v!r}")
        for what, v in (("tol", self.tol), ("trace tol", self.trace_tol)):
            if not is_number(v) or v < 0:
                raise AtprobeError(f"{what} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.density, bool):
            raise AtprobeError(f"density must be True or False, got {self.density!r}")


# ---------------------------------------------------------------------------- blocks and products


def parameter_blocks(model: nn.Module, mode: str = "module") -> list[tuple[str, list[str]]]:
    """``[(block name, [parameter names])]`` in ``named_parameters()`` order.

    ``module``: the parameters a module owns directly (``recurse=False``) form one block
    named after the module (``features.0``, ``fc``); ``tensor``: one block per parameter,
    named after it (``fc.weight``); ``none``: no blocks.
    """
    check_choice(mode, BLOCK_MODES, "block mode")
    if mode == "none":
        return []
    names = [n for n, _ in model.named_parameters()]
    if mode == "tensor":
        return [(n, [n]) for n in names]
    blocks: dict[str, list[str]] = {}
    for n in names:
        owner = n.rsplit(".", 1)[0] if "." in n else ""
        blocks.setdefault(owner, []).append(n)
    return [(owner or "(root)", group) for owner, group in blocks.items()]


class LossHessian:
    """Hessian-vector products of ``L(theta) = 1/N sum_i CE(f(x_i; theta), y_i)`` over fixed
    ``batches`` of ``(x, y)``, optionally restricted to a block of parameters.

    ``hvp(v, block)``: ``H_bb v`` for the parameters at positions ``block`` of
    :attr:`params` (all when None), ``v`` a list of tensors shaped like them;
    :meth:`operator` the same as an :data:`atprobe.linalg.Matvec` on flat ``(R, P_b)`` rows.
    With several batches each product sums the batches' products weighted by batch size (the
    Hessian of the mean over all samples). Eval mode; buffers are constants; ``.grad`` is not
    touched; the parameters must require grad (``mode="reverse"``).

    ``mode``: ``reverse`` (default): double backward, ``H v = d/dtheta <dL/dtheta, v>``, with
    the gradient graph built once per batch set and reused by every product (one batch: built
    here). ``forward``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` over
    ``torch.func.functional_call``, rows batched with ``torch.func.vmap``; it recomputes the
    forward and backward for every product. On the 2-core CPU the reverse mode measured about
    twice as fast per product (``benchmarks/hessian_speed.py``), so it is the default.
    """

    def __init__(self, model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], mode: str = "reverse", *,
                 reduce: Reduce | None = None) -> None:
        if not batches and reduce is None:
            raise AtprobeError("no samples for the Hessian")
        check_choice(mode, HVP_MODES, "Hessian-vector product mode")
        self.model = model
        self.mode = mode
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        if not self.params:
            raise AtprobeError("the model has no parameters")
        self.batches = [(x.detach(), y) for x, y in batches]
        self.reduce = reduce
        self.total = sum(int(y.shape[0]) for _, y in self.batches)
        if reduce is not None:  # the mean is over every rank's samples: one all-reduce of the count
            self.total = int(reduce(torch.tensor([float(self.total)], dtype=torch.float64,
                                                 device=self.params[0].device)).item())
        self.products = 0
        self._cached: tuple[Tensor, ...] | None = None
        if mode == "reverse" and len(self.batches) == 1:
            self._cached = self._grads(*self.batches[0], list(range(len(self.params))))

    def _loss(self, x: Tensor, y: Tensor) -> Tensor:
        return objectives.ce(self.model(x), y).sum() / self.total

    def _grads(self, x: Tensor, y: Tensor, block: list[int]) -> tuple[Tensor, ...]:
        with module_mode(self.model, False), torch.enable_grad():
            return torch.autograd.grad(self._loss(x, y), [self.params[i] for i in block], create_graph=True,
                                       materialize_grads=True)

    def _product(self, grads: Sequence[Tensor], block: list[int], v: Vector, retain: bool) -> Vector:
        outs = [(g, w) for g, w in zip(grads, v) if g.requires_grad]
        if not outs:
            return [torch.zeros_like(self.params[i]) for i in block]
        with torch.enable_grad():
            hv = torch.autograd.grad([g for g, _ in outs], [self.params[i] for i in block],
                                     grad_outputs=[w for _, w in outs], retain_graph=retain, materialize_grads=True)
        return [h.detach() for h in hv]

    def _forward_products(self, x: Tensor, y: Tensor, block: list[int], rows: Vector) -> Vector:
        """Forward-over-reverse products of one batch for ``rows`` (tensors with a leading row dim)."""
        names = [self.names[i] for i in block]
        fixed = {n: p.detach() for n, p in zip(self.names, self.params)}
        buffers = {n: b.detach() for n, b in self.model.named_buffers()}

        def loss(part: dict[str, Tensor]) -> Tensor:
            out = functional_call(self.model, ({**fixed, **part}, buffers), (x,))
            return objectives.ce(out, y).sum() / self.total

        grad = torch.func.grad(loss)
        primal = {n: fixed[n] for n in names}

        def one(*v: Tensor) -> tuple[Tensor, ...]:
            _, tangent = torch.func.jvp(grad, (primal,), (dict(zip(names, v)),))
            return tuple(tangent[n] for n in names)

        with module_mode(self.model, False):
            return list(torch.func.vmap(one)(*rows))

    def products_of(self, rows: Vector, block: Sequence[int] | None = None) -> Vector:
        """``H_bb v_r`` for a batch of ``R`` vectors, ``rows[j]`` of shape ``(R, *params[j].shape)``.
        With ``reduce`` (under ``torchrun``) this rank's batches' part, summed across the ranks
        in one all-reduce of all ``R`` products."""
        idx = list(range(len(self.params))) if block is None else list(block)
        count = int(rows[0].shape[0])
        self.products += count
        if self.reduce is None:
            return self._local_products(rows, idx, count)
        if not self.batches:  # an empty share adds nothing to the sum but joins the all-reduce
            local = [torch.zeros_like(t) for t in rows]
        else:
            local = self._local_products(rows, idx, count)
        flat = self.reduce(torch.cat([t.reshape(-1) for t in local]))
        return [t.view_as(p) for t, p in zip(flat.split([t.numel() for t in local]), local)]

    def _local_products(self, rows: Vector, idx: list[int], count: int) -> Vector:
        if self.mode == "forward":
            total: Vector | None = None
            for x, y in self.batches:
                hv = self._forward_products(x, y, idx, rows)
                total = hv if total is None else [a + b for a, b in zip(total, hv)]
            assert total is not None
            return total
        out = []
        for r in range(count):  # reverse mode: one double backward per vector (vmap was slower on the CPU)
            v = [t[r] for t in rows]
            if self._cached is not None:
                out.append(self._product([self._cached[i] for i in idx], idx, v, retain=True))
                continue
            acc: Vector | None = None
            for x, y in self.batches:
                hv = self._product(self._grads(x, y, idx), idx, v, retain=False)
                acc = hv if acc is None else [a + b for a, b in zip(acc, hv)]
            assert acc is not None
            out.append(acc)
        return [torch.stack(parts) for parts in zip(*out)]

    def hvp(self, v: Vector, block: Sequence[int] | None = None) -> Vector:
        idx = list(range(len(self.params))) if block is None else list(block)
        if len(v) != len(idx):
            raise AtprobeError(f"a vector of {len(v)} tensors for a block of {len(idx)} parameters")
        return [t[0] for t in self.products_of([t[None] for t in v], idx)]

    def operator(self, block: Sequence[int] | None = None) -> linalg.Matvec:
        """``V -> V H_bb`` on flat rows ``(R, P_b)`` (an :data:`atprobe.linalg.Matvec`)."""
        like = self.like(block)
        sizes = [p.numel() for p in like]

        def matvec(flat: Tensor) -> Tensor:
            rows = [t.reshape(flat.shape[0], *p.shape) for t, p in zip(flat.split(sizes, dim=1), like)]
            return torch.cat([t.reshape(flat.shape[0], -1) for t in self.products_of(rows, block)], dim=1)

        return matvec

    def like(self, block: Sequence[int] | None = None) -> Vector:
        return list(self.params) if block is None else [self.params[i] for i in block]


# ---------------------------------------------------------------------------- algorithms


def _size(like: Vector) -> int:
    return sum(p.numel() for p in like)


def top_eigenvalues(
    matvec: linalg.Matvec,
    like: Vector,
    *,
    top_k: int = 1,
    iterations: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator,
) -> list[tuple[float, int, bool]]:
    """The ``top_k`` eigenvalues of largest magnitude (signed) of the symmetric operator
    ``matvec`` (on flat rows of the size of ``like``), as ``(eigenvalue, products used,
    converged)``, largest first: pyhessian's algorithm with exact unit vectors, i.e.
    :func:`atprobe.linalg.power_iteration` from a Gaussian start, deflated against the
    eigenvectors already found, stopped when ``|lambda_t - lambda_{t-1}| <= tol |lambda_t|``."""
    like0 = like[0]
    found = like0.new_zeros((1, 0, _size(like)))
    out = []
    for _ in range(top_k):
        v0 = linalg.gaussian(1, _size(like), generator=generator, dtype=like0.dtype, device=like0.device)
        run = linalg.power_iteration(matvec, v0, iterations=iterations, tol=tol, basis=found)
        out.append((float(run.value[0]), int(run.iterations[0]), bool(run.converged[0])))
        found = torch.cat([found, run.vector[:, None]], dim=1)
    return out


def hutchinson_samples(draw: Callable[[], Sequence[float]], *, samples: int = 100, tol: float = 1e-3) -> list[float]:
    """Hutchinson probes ``v_j^T H v_j`` from ``draw()`` (one or more per call) until ``samples``
    of them or until the running mean changes by less than ``tol`` relative to the previous
    running mean (after at least two probes; ``tol = 0`` uses all ``samples``). pyhessian's
    stopping rule, with the absolute value of the previous mean as denominator: pyhessian
    divides by the signed mean plus 1e-6, so a negative running mean stops it after two probes."""
    values: list[float] = []
    mean = 0.0
    while len(values) < samples:
        for value in draw():
            values.append(float(value))
            new = float(np.mean(values))
            if len(values) > 1 and abs(new - mean) < tol * abs(mean):
                return values
            mean = new
            if len(values) == samples:
                break
    return values


def hutchinson(
    matvec: linalg.Matvec, like: Vector, *, samples: int = 100, tol: float = 1e-3, generator: torch.Generator,
    chunk: int = 1,
) -> tuple[float, float, int]:
    """Hutchinson's trace estimate ``mean_j v_j^T H v_j`` over Rademacher ``v_j`` drawn from
    ``generator`` (:func:`atprobe.linalg.hutchinson`, ``chunk`` probes per ``matvec`` call), as
    ``(estimate, standard error, probes used)``, stopped by :func:`hutchinson_samples`. The
    standard error is ``std(v^T H v, ddof=1) / sqrt(m)`` (NaN for m = 1)."""
    size, like0 = _size(like), like[0]

    def draw() -> list[float]:
        v = linalg.rademacher(chunk, size, generator=generator, dtype=like0.dtype, device=like0.device)
        return linalg.hutchinson(matvec, v).tolist()

    values = hutchinson_samples(draw, samples=samples, tol=tol)
    return float(np.mean(values)), _std_error(values), len(values)


def _std_error(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def slq(matvec: linalg.Matvec, like: Vector, *, steps: int = 100, runs: int = 1,
        generator: torch.Generator) -> pd.DataFrame:
    """Stochastic Lanczos quadrature (Ghorbani et al. 2019; pyhessian's ``density``) by
    :func:`atprobe.linalg.slq` from ``runs`` Rademacher starts (the runs are the rows of one
    batched Lanczos). The spectral density estimate is
    ``phi(t) = 1/runs sum_runs sum_j weight_j delta(t - node_j)`` (smooth it with a Gaussian
    kernel to plot); ``P sum_j weight_j node_j^k`` estimates ``tr H^k``. Rows (columns
    :data:`DENSITY_COLUMNS`): run, node (0-based, ascending eigenvalue), eigenvalue, weight
    (each run's weights sum to 1)."""
    size, like0 = _size(like), like[0]
    starts = linalg.rademacher(runs, size, generator=generator, dtype=like0.dtype, device=like0.device)
    rows = []
    for run, (nodes, weights) in enumerate(linalg.slq(matvec, starts, min(steps, size))):
        rows += [{"run": run, "node": j, "eigenvalue": float(t), "weight": float(w)}
                 for j, (t, w) in enumerate(zip(nodes, weights))]
    return pd.DataFrame(rows, columns=DENSITY_COLUMNS)


# ---------------------------------------------------------------------------- pyhessian


@contextlib.contextmanager
def _pyhessian_guard(model: nn.Module, seed: int) -> Iterator[bool]:
    """Eval mode, all parameters requiring grad, ``.grad`` saved and put back, the global
    generators seeded inside ``fork_rng``, and ``torch.cuda.device`` of the model's GPU.
    Yields pyhessian's ``cuda`` flag."""
    params = list(model.parameters())
    device = params[0].device
    saved = [(p, p.grad, p.requires_grad) for p in params]
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    try:
        for p in params:
            p.grad = None
            p.requires_grad_(True)
        with module_mode(model, False), torch.random.fork_rng(devices=[index] if cuda else []), \
                (torch.cuda.device(index) if cuda else contextlib.nullcontext()), torch.enable_grad():
            torch.default_generator.manual_seed(int(seed))
            if cuda:
                torch.cuda.manual_seed(int(seed))  # the current device: the model's
            yield cuda
    finally:
        for p, grad, flag in saved:
            p.grad = grad  # also breaks pyhessian's parameter <-> .grad graph cycle
            p.requires_grad_(flag)


def _criterion(logits: Tensor, y: Tensor) -> Tensor:
    return objectives.ce(logits, y).mean()


def pyhessian_top(
    model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], config: HessianConfig
) -> tuple[list[float], list[float]]:
    """pyhessian's top-``k`` eigenvalues and Hutchinson probes of the mean CE over ``batches``
    (one batch: pyhessian's ``data=`` mode; several: its ``dataloader=`` mode).

    Eigenvalues: ``hessian.eigenvalues(maxIter=iterations, tol=tol, top_n=top_k)`` as is.
    Its vectors are normalized as ``v / (||v|| + 1e-6)``, which biases each eigenvalue by
    about ``-2e-6`` in absolute value (negligible unless the eigenvalue is itself tiny).
    Trace: each probe is one ``hessian.trace(maxIter=1)`` call (pyhessian draws the
    Rademacher vector and computes ``v^T H v``), and :func:`hutchinson_samples` decides when to
    stop: pyhessian's own loop stops after two probes whenever the running mean is negative.
    """
    from pyhessian import hessian as PyHessian  # noqa: N812 (the library's class name)

    kwargs = {"data": batches[0]} if len(batches) == 1 else {"dataloader": list(batches)}
    with _pyhessian_guard(model, config.seed) as cuda, warnings.catch_warnings():
        # pyhessian calls loss.backward(create_graph=True); the guard resets .grad, which
        # breaks the parameter <-> gradient cycle torch warns about.
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
        hess = PyHessian(model, _criterion, cuda=cuda, **kwargs)
        eigenvalues, _ = hess.eigenvalues(maxIter=config.iterations, tol=config.tol, top_n=config.top_k)
        torch.default_generator.manual_seed(int(config.seed))
        if cuda:
            torch.cuda.manual_seed(int(config.seed))
        trace = hutchinson_samples(lambda h=hess: [h.trace(maxIter=1, tol=0.0)[0]], samples=config.trace_samples,
                                   tol=config.trace_tol)
        del hess
    return [float(e) for e in eigenvalues], [float(t) for t in trace]


# ---------------------------------------------------------------------------- probe


def loss_batches(model: nn.Module, data: Split, config: HessianConfig, *,
                 shared: bool = False) -> list[tuple[Tensor, Tensor]]:
    """The fixed ``(x, y)`` batches of the loss: ``scope="batch"`` the first ``batch_size``
    samples, ``"all"`` every sample in batches of ``batch_size``; PGD examples crafted once
    against the model at theta (``at="adv"``, per-sample starts) or the natural images.
    ``shared``: ``data`` is one rank's share, which may be empty."""
    if len(data) == 0:
        if shared:
            return []
        raise AtprobeError("no samples for the Hessian")
    if config.scope == "batch":
        data = data.subset(slice(0, config.batch_size))
    out = []
    for x, y, ids in sample_batches(model, data, config.batch_size):
        if config.at == "adv":
            x = attack_batch(model, x, y, ids, config.attack, seed=config.seed, amp=False)
        out.append((x.detach(), y))
    return out


@dataclass(frozen=True)
class HessianResult:
    """``table``: the rows of :func:`probe`; ``density``: :func:`slq`'s rows (None unless
    ``config.density``); ``n``: samples in the loss."""

    table: pd.DataFrame
    density: pd.DataFrame | None
    n: int


@contextlib.contextmanager
def _requiring_grad(model: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def check_split(config: HessianConfig) -> None:
    """A one-line error unless the config's loss can be split across ranks."""
    if config.scope != "all" or config.engine != "atprobe":
        raise AtprobeError("hessian splits its samples across ranks with --scope all and --engine atprobe only "
                           "(one batch, or pyhessian's own loop, cannot be split): run it in one process")


def compute(model: nn.Module, data: Split, config: HessianConfig = HessianConfig(), *, progress=None,
            reduce: Reduce | None = None) -> HessianResult:
    """Everything ``atprobe hessian`` writes: the eigenvalue/trace table and the density.

    Table rows (columns :data:`COLUMNS`), whole model first (``block="all"``), then per
    block (``config.blocks``): ``quantity="eigenvalue"`` for k = 1..top_k by
    :func:`top_eigenvalues` (with ``iterations`` and ``converged``) and ``"trace"`` by
    :func:`hutchinson` (``iterations`` = probes used, ``std_error`` their standard error),
    ``method="atprobe"``, all from one :class:`LossHessian`. With ``engine="pyhessian"``
    the whole model's rows are pyhessian's instead (``method="pyhessian"``;
    ``iterations``/``converged`` NA on its eigenvalue rows: pyhessian does not report them).

    ``params`` is the block's number of parameters; ``k`` is NA on trace rows. ``progress``:
    anything with ``update(n)``, advanced once per block (the whole model counts as one).

    ``reduce``: under ``torchrun`` (``scope="all"``, ``engine="atprobe"``), ``data`` is this
    rank's share (whole batches) and every Hessian-vector product is this rank's part summed
    across the ranks by ``reduce`` (``DistContext.sum_over_ranks``), one all-reduce per batch
    of products; the random vectors are drawn from the same seed on every rank, so every rank
    runs the same iterations. The values equal one process's up to the order of the sum.
    """
    if reduce is not None:
        check_split(config)
    batches = loss_batches(model, data, config, shared=reduce is not None)
    rows: list[dict] = []

    def add(block, params, quantity, k, value, iterations, converged, std_error, method):
        rows.append({"block": block, "params": params, "quantity": quantity, "k": k, "value": value,
                     "iterations": iterations, "converged": converged, "std_error": std_error, "method": method})

    if config.engine == "pyhessian":
        size = sum(p.numel() for p in model.parameters())
        eigenvalues, trace = pyhessian_top(model, batches, config)
        for k, e in enumerate(eigenvalues, 1):
            add("all", size, "eigenvalue", k, e, None, None, math.nan, "pyhessian")
        add("all", size, "trace", None, float(np.mean(trace)), len(trace), None, _std_error(trace), "pyhessian")
        if progress is not None:
            progress.update(1)

    density = None
    device = next(model.parameters()).device
    with _requiring_grad(model):
        hessian = LossHessian(model, batches, reduce=reduce)
        n = hessian.total
        position = {name: i for i, name in enumerate(hessian.names)}
        generator = make_generator(config.seed, device)
        blocks: list[tuple[str, list[int] | None]] = [("all", None)] if config.engine == "atprobe" else []
        blocks += [(name, [position[n] for n in names]) for name, names in parameter_blocks(model, config.blocks)]
        for name, block in blocks:
            op, like = hessian.operator(block), hessian.like(block)
            params = _size(like)
            for k, (e, used, conv) in enumerate(top_eigenvalues(op, like, top_k=config.top_k,
                                                                iterations=config.iterations, tol=config.tol,
                                                                generator=generator), 1):
                add(name, params, "eigenvalue", k, e, used, conv, math.nan, "atprobe")
            t, se, m = hutchinson(op, like, samples=config.trace_samples, tol=config.trace_tol, generator=generator)
            add(name, params, "trace", None, t, m, None, se, "atprobe")
            if progress is not None:
                progress.update(1)
        if config.density:
            density = slq(hessian.operator(), hessian.like(), steps=config.density_steps, runs=config.density_runs,
                          generator=make_generator(config.seed, device))
        del hessian
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["k"] = table["k"].astype("Int64")
    table["iterations"] = table["iterations"].astype("Int64")
    table["converged"] = table["converged"].astype("boolean")
    return HessianResult(table, density, n)


def probe(model: nn.Module, data: Split, config: HessianConfig = HessianConfig(), *, progress=None) -> pd.DataFrame:
    """The eigenvalue/trace table of :func:`compute` (columns :data:`COLUMNS`)."""
    return compute(model, data, config, progress=progress).table


def complexity_rows(model: nn.Module, samples: Split, config: HessianConfig = HessianConfig(), *,
                    share: SampleShare = ONE_PROCESS) -> pd.DataFrame:
    """The rows of ``atprobe complexity`` (columns :data:`~atprobe.probes.curvature.COMPLEXITY_COLUMNS`):
    measure ``hessian``, the whole model's values only (by ``config.engine``) (no per-block rows, no
    density, whatever ``config`` says): variants ``top<k>;at=<at>;scope=<scope>`` and
    ``trace;at=<at>;scope=<scope>``; ``reason`` '' or why the value is NaN.
    ``share``: under ``torchrun`` the whole-set loss (scope all, atprobe engine) is split
    across the ranks, each product summed over them; one batch, or pyhessian's own loop,
    cannot be split, so every rank computes the same values in full."""
    config = replace(config, blocks="none", density=False)
    split = share.gathered and config.scope == "all" and config.engine == "atprobe"
    if split:
        table = compute(model, share.mine(samples, config.batch_size), config, reduce=share.ctx.sum_over_ranks).table
    else:
        table = compute(model, samples, config).table
    rows = []
    for row in table.itertuples(index=False):
        stat = f"top{row.k}" if row.quantity == "eigenvalue" else "trace"
        value = float(row.value)
        reason = "" if math.isfinite(value) else "the Hessian products are not finite (non-finite loss or weights)"
        rows.append({"measure": "hessian", "variant": f"{stat};at={config.at};scope={config.scope}",
                     "value": value, "reason": reason})
    return pd.DataFrame(rows, columns=COMPLEXITY_COLUMNS)
