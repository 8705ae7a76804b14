"""Per-sample gradients of a per-sample loss with respect to the parameters.

For samples ``(x_i, y_i)`` and a parameter point ``theta`` this computes

    g_i(theta) = d/d theta  l(f(. ; theta), x_i, y_i)          (one flat vector of P entries)

and reductions of it: ``||g_i||`` and, for two points, ``||g_i(a) - g_i(b)||`` and
``cos(g_i(a), g_i(b))``, the quantities the gradient probes of Dong et al. (ICLR 2022)
compare between clean and adversarial objectives.

Eval mode. The model runs in eval mode (BatchNorm normalizes with its running
statistics, dropout is off), so ``f(x_i)`` depends on sample i alone and
``l_i`` has a well-defined gradient of its own. In train mode BatchNorm would normalize
with batch statistics, every ``l_i`` would depend on every sample of the batch, and a
"per-sample gradient" would depend on which samples it was batched with. Modes are
restored afterwards.

Method (``method=``, :data:`METHODS`). ``hooks`` (:mod:`atprobe.pergrad.hooks`): one
batched forward/backward per chunk and the per-layer identities ``dl_i/dW = sum_t g_t
a_t^T`` as batched GEMMs, with ghost norms where cheaper; used by default wherever every
probed parameter sits in a supported layer. ``vmap`` (:mod:`atprobe.pergrad.vmap`):
``torch.func.vmap(torch.func.grad(l_i))`` over ``torch.func.functional_call`` with the
buffers passed as constants; any layer, given
no in-place ops on activations. ``benchmarks/pergrad.py`` measures both against the
loop; see docs/pergrad.md.

Memory. A chunk of ``b`` samples holds ``b x P`` gradient entries (WRN-28-10:
P = 36.5M, so 146 MB per sample in float32 and 9.3 GB for ``chunk_size=64``).
Nothing ever holds ``N x P``: :func:`per_sample_grad_norms` keeps one chunk alive,
:func:`per_sample_grad_distance` two (one per point); :func:`chunk_size_for` turns a
memory budget into a chunk size.

Adversarial objectives. ``pgd_at``, ``trades`` and ``R`` craft ``x'`` with
``atprobe.attacks.pgd`` *at the parameter point being probed* (through
:class:`atprobe.directions.ModelAt`), from a random start that is a function of
``(seed, sample id)`` only, so a sample starts from the same point at every ``theta``
and at ``theta_a == theta_b`` the two gradients are bit-identical (on a GPU, where some
backward kernels accumulate in a nondeterministic order, only with
``torch.use_deterministic_algorithms(True)``; otherwise up to rounding). The gradient then
treats ``x'`` as a constant: by Danskin's theorem the gradient of
``max_{x'} l(theta, x')`` is ``d/d theta l(theta, x')`` at the maximizer, which is also
what PGD-AT and TRADES training step along.

Layout. :mod:`atprobe.pergrad.api`: the public functions (:func:`per_sample_grads`,
:func:`per_sample_grad_norms`, :func:`per_sample_grad_distance`,
:func:`per_sample_grad_distances`, :func:`per_sample_grad_norm_pair`,
:func:`chunk_size_for`, :data:`METHODS`, :func:`resolve_method`) and the chunk loop that
dispatches to one of the two methods; :mod:`atprobe.pergrad.objectives`: the per-sample
losses (:class:`Objective`, :func:`objective`, :func:`default_attack`, :data:`OBJECTIVES`);
:mod:`atprobe.pergrad.hooks`: the per-layer identities, one small set of functions per
layer kind in a registry; :mod:`atprobe.pergrad.vmap`: the ``torch.func`` path. Everything
public is importable from ``atprobe.pergrad`` itself.
"""

from atprobe.pergrad.api import (
    METHODS,
    chunk_size_for,
    per_sample_grad_distance,
    per_sample_grad_distances,
    per_sample_grad_norm_pair,
    per_sample_grad_norms,
    per_sample_grads,
    resolve_method,
)
from atprobe.pergrad.hooks import (
    BLOCK,
    layer_plan,
    per_sample_grads_hooks,
    per_sample_sq_norms_hooks,
    row_sq_norms,
    supports,
)
from atprobe.pergrad.objectives import OBJECTIVES, Objective, PerSampleLoss, PointCall, default_attack, objective
from atprobe.pergrad.vmap import per_sample_grads_vmap

__all__ = [
    "BLOCK",
    "METHODS",
    "OBJECTIVES",
    "Objective",
    "PerSampleLoss",
    "PointCall",
    "chunk_size_for",
    "default_attack",
    "layer_plan",
    "objective",
    "per_sample_grad_distance",
    "per_sample_grad_distances",
    "per_sample_grad_norm_pair",
    "per_sample_grad_norms",
    "per_sample_grads",
    "per_sample_grads_hooks",
    "per_sample_grads_vmap",
    "per_sample_sq_norms_hooks",
    "resolve_method",
    "row_sq_norms",
    "supports",
]
