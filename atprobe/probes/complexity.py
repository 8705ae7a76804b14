"""``complexity``: the complexity measures of the generalization analysis of Dong et al.
(ICLR 2022, Sec. 3.3, Fig. 6, Table A.1), side by side with the generalization gaps.

Measures (one row each per variant; docs/probes/complexity.md gives the exact definitions):

* ``spectral``: prod_l ||W_l||_2 over the layers of :func:`atprobe.foldbn.norm_layers`
  (conv and linear layers, eval-mode BatchNorm folded in), with the true convolution
  operator's norm (``operator``, block power iteration at the input size the layer sees) or
  the norm of the ``c_out x (c_in k k)`` reshaped kernel (``reshape``); reported as the
  product and as log10 of the product.
* ``l1``: sum_l sum_ij |W_l,ij| (weights only, no biases) over the same layers.
* ``margin``: the q-quantile over training samples of f(x)_y - max_{j != y} f(x)_j, on PGD
  examples (default) or clean ones, with the labels the model was trained on. With
  ``margin=True`` the spectral and l1 rows are also reported divided by it.
* ``gap``: natural and robust (PGD) accuracy on train (trained labels) and test, and the
  train-minus-test gaps, through :func:`atprobe.evaluate.evaluate`.
* ``curvature``, ``hessian``, ``flatness``: delegated to ``atprobe.probes.curvature`` /
  ``hessian`` / ``flatness`` (their ``complexity_rows(model, samples, config)``), imported
  when asked for.

``probe(model, samples, config, test=...)`` returns the tidy table ``COLUMNS``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atprobe import linalg
from atprobe.attacked import attacked_batches, model_device_dtype
from atprobe.attacks import PGDConfig, parse_attack
from atprobe.data import Split
from atprobe.distributed import ONE_PROCESS, SampleShare
from atprobe.errors import SEED_MAX, AtprobeError, check_choice
from atprobe.evaluate import EvalConfig, attack_fields, evaluate_samples, summarize_samples
from atprobe.foldbn import DEFAULT_INPUT_SHAPE, NormLayer, norm_layers
from atprobe.objectives import cw_margin
from atprobe.probes._gradutil import check_threat
from atprobe.runtime import make_generator, module_mode
from atprobe.threat import ThreatModel

__all__ = [
    "COLUMNS",
    "ComplexityConfig",
    "EXTERNAL",
    "GAP_VARIANTS",
    "LAYER_COLUMNS",
    "MARGIN_ON",
    "MEASURES",
    "SPECTRAL_METHODS",
    "conv_operator",
    "conv_operator_norm",
    "external_module",
    "gap_rows",
    "layer_table",
    "margin_quantile",
    "margin_variant",
    "margins",
    "norm_rows",
    "parse_measures",
    "probe",
]

#: Every measure, in the default order.
MEASURES = ("spectral", "l1", "margin", "curvature", "hessian", "flatness", "gap")
#: Measures computed by another module: name -> (module, config class).
EXTERNAL = {
    "curvature": ("atprobe.probes.curvature", "CurvatureConfig"),
    "hessian": ("atprobe.probes.hessian", "HessianConfig"),
    "flatness": ("atprobe.probes.flatness", "FlatnessConfig"),
}
SPECTRAL_METHODS = ("operator", "reshape")
MARGIN_ON = ("adv", "clean")
GAP_VARIANTS = ("natural_train", "robust_train", "natural_test", "robust_test", "natural_gap", "robust_gap")
#: Columns of :func:`probe`'s table.
COLUMNS = ["measure", "variant", "value", "reason", "n"]
#: Columns of :func:`layer_table`.
LAYER_COLUMNS = ["layer", "kind", "bn", "weight_shape", "input_shape", "spectral", "l1", "iterations"]


@dataclass(frozen=True)
class ComplexityConfig:
    """What :func:`probe` computes.

    measures: names from :data:`MEASURES`, in the order of the output rows.
    spectral_method: ``operator`` (power iteration on the convolution operator) or
        ``reshape`` (``||W.reshape(c_out, -1)||_2``); linear layers are exact either way.
    fold_bn: fold eval-mode BatchNorm into the layer before it (standalone BatchNorms
        become diagonal layers); False: raw conv/linear weights, BatchNorm ignored.
    margin: also report spectral and l1 divided by the margin quantile.
    margin_quantile: q in (0, 1) (linear interpolation, numpy's default).
    margin_on: ``adv`` (PGD examples) or ``clean``.
    threat: the PGD attack on CE of the margin and of the robust accuracies (default
        PGD-10, L-inf 8/255, step eps/4).
    power_iterations, power_tol, power_block: the block power iteration of the operator
        norm: at most this many iterations, stopped when the estimate changes by less than
        ``power_tol`` (relative) over ``10`` iterations; ``power_block`` vectors at once.
    batch_size, seed, amp: batches of the data-dependent measures; seed of the attacks'
        random starts and of the power iteration's start; bf16 autocast for attacks on CUDA.
    curvature, hessian, flatness: the other modules' configs (None: their defaults).
    """

    measures: tuple[str, ...] = MEASURES
    spectral_method: str = "operator"
    fold_bn: bool = True
    margin: bool = False
    margin_quantile: float = 0.1
    margin_on: str = "adv"
    threat: ThreatModel = ThreatModel()
    power_iterations: int = 500
    power_tol: float = 1e-6
    power_block: int = 4
    batch_size: int = 256
    seed: int = 0
    amp: bool = True
    curvature: Any = None
    hessian: Any = None
    flatness: Any = None

    def __post_init__(self) -> None:
        measures = parse_measures(self.measures)
        object.__setattr__(self, "measures", measures)
        check_choice(self.spectral_method, SPECTRAL_METHODS, "spectral method")
        check_choice(self.margin_on, MARGIN_ON, "margin-on (where the margin is measured)")
        q = self.margin_quantile
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not (0.0 < float(q) < 1.0):
            raise AtprobeError(f"--margin-quantile must be a number strictly between 0 and 1, got {q!r}")
        check_threat(self.threat)
        if self.threat.steps < 1:
            raise AtprobeError(f"attack steps must be an integer >= 1, got {self.threat.steps!r}")
        for name, lo in (("power_iterations", 1), ("power_block", 1), ("batch_size", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise AtprobeError(f"{name.replace('_', ' ')} must be an integer >= {lo}, got {v!r}")
        if not (isinstance(self.power_tol, (int, float)) and math.isfinite(self.power_tol) and self.power_tol > 0):
            raise AtprobeError(f"power tol must be a finite number > 0, got {self.power_tol!r}")

    def attack(self) -> PGDConfig:
        """The PGD attack of the margin (``adv``) and of the robust accuracies."""
        return self.threat.attack("ce")

    @property
    def needs_margin(self) -> bool:
        return "margin" in self.measures or (self.margin and bool({"spectral", "l1"} & set(self.measures)))

    @property
    def needs_data(self) -> bool:
        return self.needs_margin or bool(set(self.measures) - {"spectral", "l1"})


def parse_measures(measures: str | Sequence[str]) -> tuple[str, ...]:
    """``"spectral,l1"`` or a sequence -> validated tuple (order kept, repeats dropped)."""
    items = ([m.strip() for m in measures.split(",")] if isinstance(measures, str)
             else [str(m).strip() for m in measures])
    items = [m for m in items if m]
    if not items:
        raise AtprobeError(f"--measures: give at least one of {', '.join(MEASURES)}")
    for m in items:
        if m not in MEASURES:
            raise AtprobeError(f"unknown measure {m!r}: choose from {', '.join(MEASURES)}")
    return tuple(dict.fromkeys(items))


# ---------------------------------------------------------------------------- operator norm


def conv_operator(conv: nn.Conv2d, weight: Tensor, input_shape: Sequence[int]) -> tuple[
        Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], tuple[int, ...]]:
    """``(A, A^T, output_shape)`` of the linear map ``x -> conv(x)`` (no bias) with kernel
    ``weight`` and ``conv``'s stride, padding, dilation and groups, on batches of inputs of
    per-sample shape ``input_shape`` ``(C, H, W)``.

    Zero padding: ``A`` is ``conv2d`` and ``A^T`` is ``conv_transpose2d`` with the
    ``output_padding`` that restores ``(H, W)``. Other padding modes (and string padding):
    ``A`` is the module's own convolution and ``A^T`` its vector-Jacobian product.
    """
    c, h, w = (int(s) for s in input_shape)
    probe_in = torch.zeros((1, c, h, w), dtype=weight.dtype, device=weight.device)
    zero_pad = conv.padding_mode == "zeros" and not isinstance(conv.padding, str)

    if zero_pad:
        def forward(x: Tensor) -> Tensor:
            return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    else:
        def forward(x: Tensor) -> Tensor:
            return conv._conv_forward(x, weight, None)

    with torch.no_grad():
        out_shape = tuple(forward(probe_in).shape[1:])

    if zero_pad:
        ho, wo = out_shape[1:]
        k = weight.shape[2:]
        s, p, d = conv.stride, conv.padding, conv.dilation
        out_pad = tuple(size - ((o - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + 1)
                        for i, (size, o) in enumerate(((h, ho), (w, wo))))

        def adjoint(y: Tensor) -> Tensor:
            return F.conv_transpose2d(y, weight, None, s, p, out_pad, conv.groups, d)
    else:
        def adjoint(y: Tensor) -> Tensor:  # the map is linear: its VJP at any point is A^T y
            x = torch.zeros((y.shape[0], c, h, w), dtype=y.dtype, device=y.device, requires_grad=True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(forward(x), x, y)
            return grad

    return forward, adjoint, out_shape


def conv_operator_norm(
    conv: nn.Conv2d,
    weight: Tensor,
    input_shape: Sequence[int],
    *,
    iterations: int = 500,
    tol: float = 1e-6,
    block: int = 4,
    seed: int = 0,
    check_every: int = 10,
) -> tuple[float, int]:
    """Largest singular value of the convolution operator (:func:`conv_operator`) and the
    iterations used: ``||A||_2 = sqrt(lambda_max(A^T A))`` by
    :func:`atprobe.linalg.block_power_iteration` on ``A^T A`` with ``block`` vectors (a batch
    of ``block`` rows per product; the Rayleigh-Ritz estimate, the largest eigenvalue of
    ``V^T A^T A V`` for orthonormal ``V``, is a lower bound that increases to ``||A||_2^2``).
    Stops after ``iterations`` or when the estimate of ``||A||_2^2`` changed by less than
    ``tol`` (relative) over the last ``check_every`` iterations (one host sync per check).
    The start is drawn from a CPU generator seeded with ``seed``, so they are the same on every device.
    """
    forward, adjoint, _ = conv_operator(conv, weight, input_shape)
    shape = tuple(int(s) for s in input_shape)
    n = math.prod(shape)
    k = max(1, min(block, n))
    g = make_generator(seed, "cpu")
    v0 = torch.randn((k, n), generator=g, dtype=torch.float64).to(weight.dtype).to(weight.device)

    def gram(v: Tensor) -> Tensor:  # rows: A^T A v
        return adjoint(forward(v.reshape(k, *shape))).reshape(k, n)

    with torch.no_grad():
        value, done, _ = linalg.block_power_iteration(gram, v0, iterations=iterations, tol=tol,
                                                      check_every=check_every)
    return float(value.clamp_min(0).sqrt()), done


# ---------------------------------------------------------------------------- norm measures


def _spectral(layer: NormLayer, config: ComplexityConfig, seed: int) -> tuple[float, int]:
    w = layer.weight
    if layer.kind == "bn":
        return float(w.abs().max()), 0
    if layer.kind == "linear" or config.spectral_method == "reshape":
        return float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), 2)), 0
    return conv_operator_norm(layer.module, w, layer.input_shape, iterations=config.power_iterations,
                              tol=config.power_tol, block=config.power_block, seed=seed)


def layer_table(model: nn.Module, config: ComplexityConfig = ComplexityConfig(),
                input_shape: Sequence[int] | None = None, *, share: SampleShare = ONE_PROCESS) -> pd.DataFrame:
    """One row per layer of the norm measures (:func:`atprobe.foldbn.norm_layers`):
    ``LAYER_COLUMNS``: layer, kind (conv, linear, bn), the folded BatchNorm (empty if
    none), weight and input shapes, its spectral norm (by ``config.spectral_method``; a
    diagonal BatchNorm layer: max |s|), its l1 norm (sum |W|; BatchNorm: sum |s|), and the
    power iterations used (0 where the norm is exact). Under ``torchrun`` (``share``) the
    layers are split round robin across the ranks (each layer's seed is its position, so
    its row does not depend on the rank) and gathered back in layer order."""
    rows = []
    with torch.no_grad():
        layers = norm_layers(model, input_shape, fold=config.fold_bn)
        for i in share.points(len(layers)):
            layer = layers[i]
            spectral, iterations = _spectral(layer, config, seed=(config.seed + i) % (SEED_MAX + 1))  # a seed stays one
            rows.append({
                "position": i,
                "layer": layer.name,
                "kind": layer.kind,
                "bn": layer.bn or "",
                "weight_shape": "x".join(map(str, layer.weight.shape)),
                "input_shape": "x".join(map(str, layer.input_shape)),
                "spectral": spectral,
                "l1": float(layer.weight.double().abs().sum()),
                "iterations": iterations,
            })
    table = share.gather_rows(pd.DataFrame(rows, columns=["position", *LAYER_COLUMNS]), "position")
    return table.drop(columns="position")


def margin_variant(config: ComplexityConfig) -> str:
    """``on=adv;q=0.1``: where the margin is measured and its quantile (variant keys)."""
    return f"on={config.margin_on};q={config.margin_quantile:g}"


def norm_rows(layers: pd.DataFrame, config: ComplexityConfig, margin: float | None = None,
              n: int | None = None) -> list[dict]:
    """The spectral and l1 rows (those in ``config.measures``) from a :func:`layer_table`;
    with ``margin`` also the rows divided by it (NaN with a reason when ``margin <= 0``).

    Variants: ``product;method=M;bn=B``, ``log10;method=M;bn=B``, ``sum;bn=B`` and, divided
    by the margin, ``product_over_margin;method=M;bn=B;on=O;q=Q`` (likewise ``log10_over_margin``
    = log10 product - log10 margin, ``sum_over_margin``); B is ``fold`` or ``ignore``.
    """
    bn = f"bn={'fold' if config.fold_bn else 'ignore'}"
    method = f"method={config.spectral_method}"
    rows: list[dict] = []
    log10 = float(sum(math.log10(s) if s > 0 else -math.inf for s in layers["spectral"]))
    product = math.prod(float(s) for s in layers["spectral"])
    l1 = float(layers["l1"].sum())
    over = "" if margin is None else margin_variant(config)
    bad_margin = margin is not None and not (margin > 0)
    why_margin = (f"the margin ({over}) is {margin:.4g} <= 0: the normalized measure is undefined"
                  if bad_margin else "")
    overflow = "the product overflows float64: use the log10 variant"
    for measure in config.measures:
        if measure == "spectral":
            rows.append(_row("spectral", f"product;{method};{bn}", product, overflow if math.isinf(product) else ""))
            rows.append(_row("spectral", f"log10;{method};{bn}", log10))
            if margin is not None:
                divided = math.nan if bad_margin else product / margin
                reason = why_margin or (overflow if math.isinf(divided) else "")
                rows.append(_row("spectral", f"product_over_margin;{method};{bn};{over}", divided, reason, n))
                rows.append(_row("spectral", f"log10_over_margin;{method};{bn};{over}",
                                 math.nan if bad_margin else log10 - math.log10(margin), why_margin, n))
        elif measure == "l1":
            rows.append(_row("l1", f"sum;{bn}", l1))
            if margin is not None:
                rows.append(_row("l1", f"sum_over_margin;{bn};{over}", math.nan if bad_margin else l1 / margin,
                                 why_margin, n))
    return rows


def _row(measure: str, variant: str, value: float, reason: str = "", n: int | None = None) -> dict:
    return {"measure": measure, "variant": variant, "value": float(value), "reason": reason, "n": n}


# ---------------------------------------------------------------------------- margin


def margins(model: nn.Module, samples: Split, config: ComplexityConfig, progress=None, *,
            share: SampleShare = ONE_PROCESS) -> Tensor:
    """Per-sample margins f(x)_y - max_{j != y} f(x)_j (``samples.y`` labels), on
    ``config.attack()`` examples (``margin_on="adv"``) or on the clean images, through the
    attacked-data path (``atprobe.attacked``: eval mode, starts keyed by sample index, so
    the margins do not depend on the batch size); the logits in full precision (``amp``
    applies to the attack only). Returns a vector on the model's device, in the samples' order.
    Under ``torchrun`` (``share``) each rank attacks its whole batches and the margins of
    every rank are gathered: the single-process vector."""
    if len(samples) == 0:
        raise AtprobeError("the margin needs at least one sample")
    device, dtype = model_device_dtype(model)
    attack = config.attack() if config.margin_on == "adv" else None
    mine = share.mine(samples, config.batch_size)
    out = torch.empty(len(mine), dtype=dtype, device=device)
    if len(mine):
        for b in attacked_batches(model, mine, attack, seed=config.seed, batch_size=config.batch_size,
                                  amp=config.amp, exact_logits=True, progress=progress):
            out[b.rows] = -cw_margin(b.logits, b.y).to(dtype)
    return share.gather_values(out)


def margin_quantile(values: Tensor, q: float) -> float:
    """The q-quantile with linear interpolation (numpy's default), in float64."""
    return float(torch.quantile(values.detach().double(), float(q)))


# ---------------------------------------------------------------------------- gap


def gap_rows(model: nn.Module, train: Split, test: Split, config: ComplexityConfig, progress=None, *,
             share: SampleShare = ONE_PROCESS) -> list[dict]:
    """Natural and robust accuracy on ``train`` (its labels: pass the trained ones) and
    ``test`` as :func:`atprobe.evaluate.evaluate` computes them (natural and
    ``config.attack()``), and the gaps train - test. Accuracies are fractions in [0, 1].
    Under ``torchrun`` (``share``) each rank evaluates its whole batches and the per-sample
    rows are gathered before the accuracies are summed (``summarize_samples``), so they are
    the single-process ones bit for bit."""
    spec = parse_attack("pgd", config.threat)
    eval_config = EvalConfig(attacks=(parse_attack("natural"), spec), batch_size=config.batch_size,
                             seed=config.seed, amp=config.amp)
    fields = [attack_fields(a) for a in eval_config.attacks]
    acc = {}
    for name, split in (("train", train), ("test", test)):
        if len(split) == 0:
            raise AtprobeError("the evaluation split is empty")
        mine = share.mine(split, config.batch_size)
        rows = evaluate_samples(model, mine, eval_config, progress)[1] if len(mine) else None
        df = summarize_samples(share.gather(rows, len(mine)), fields)
        acc["natural", name] = (float(df["accuracy"].iloc[0]), len(split))
        acc["robust", name] = (float(df["accuracy"].iloc[1]), len(split))
    rows = []  # in GAP_VARIANTS order: natural_train, robust_train, natural_test, robust_test, the gaps
    for name in ("train", "test"):
        for kind in ("natural", "robust"):
            value, n = acc[kind, name]
            rows.append(_row("gap", f"{kind}_{name}", value, n=n))
    for kind in ("natural", "robust"):
        rows.append(_row("gap", f"{kind}_gap", acc[kind, "train"][0] - acc[kind, "test"][0]))
    return rows


# ---------------------------------------------------------------------------- other modules


def external_module(measure: str):
    """The module computing ``measure`` (curvature, hessian, flatness), imported now; a
    one-line error when it is not part of this installation."""
    module_name, _ = EXTERNAL[measure]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the module exists but one of its own imports is missing: a real bug
        raise AtprobeError(f"measure {measure!r} needs {module_name}, which is not available here") from None


def _external_rows(measure: str, model: nn.Module, samples: Split, config: ComplexityConfig,
                   share: SampleShare) -> list[dict]:
    module = external_module(measure)
    _, class_name = EXTERNAL[measure]
    cls = getattr(module, class_name)
    sub = getattr(config, measure)
    if sub is None:  # the sub-measure attacks under the same threat model and seed
        sub = cls(threat=config.threat, seed=config.seed)
    elif not isinstance(sub, cls):
        raise AtprobeError(f"config.{measure} must be a {module.__name__}.{class_name}, got {type(sub).__name__}")
    df = module.complexity_rows(model, samples, sub, share=share)
    missing = [c for c in ("measure", "variant", "value", "reason") if c not in df.columns]
    if missing:
        raise AtprobeError(f"{module.__name__}.complexity_rows returned no {', '.join(missing)} column")
    rows = []
    for rec in df.to_dict("records"):
        n = rec.get("n")
        reason = rec.get("reason")
        rows.append({
            "measure": str(rec["measure"]),
            "variant": str(rec["variant"]),
            "value": float(rec["value"]),
            "reason": "" if reason is None or (isinstance(reason, float) and math.isnan(reason)) else str(reason),
            "n": None if n is None or pd.isna(n) else int(n),
        })
    return rows


# ---------------------------------------------------------------------------- probe


def probe(
    model: nn.Module,
    samples: Split | None,
    config: ComplexityConfig = ComplexityConfig(),
    *,
    test: Split | None = None,
    input_shape: Sequence[int] | None = None,
    progress=None,
    share: SampleShare = ONE_PROCESS,
) -> pd.DataFrame:
    """The measures of ``config`` for one model, as rows ``COLUMNS`` (measure, variant,
    value, reason, n) in the order of ``config.measures``.

    samples: training samples with the labels the model was trained on (margin, gap's train
        accuracies, curvature/hessian/flatness); may be None when only spectral and l1 are
        asked for without ``config.margin``.
    test: test samples (gap's test accuracies).
    input_shape: per-sample input shape for the operator norms (default: ``samples``' image
        shape, else ``(3, 32, 32)``).
    ``reason`` is empty when the value is fine; ``n`` is the number of samples a
    data-dependent value was computed on (empty for the data-free ones).
    The model is used in eval mode and left as it was.
    share: this rank's share of a ``torchrun`` job (``atprobe.distributed.SampleShare``): the
    layers of the norm measures and the samples of every data-dependent measure are split
    across the ranks and gathered back before any statistic, so every rank returns the
    single-process table (docs/scaling.md).
    """
    if share.part:
        raise AtprobeError("complexity does not take --shard parts: run it under torchrun, or in one process")
    for measure in config.measures:  # fail before any work when a module is missing
        if measure in EXTERNAL:
            external_module(measure)
    if config.needs_data and samples is None:
        raise AtprobeError(f"measures {', '.join(config.measures)} need training samples")
    if "gap" in config.measures and test is None:
        raise AtprobeError("the gap measure needs test samples")
    if input_shape is None:
        input_shape = tuple(samples.x.shape[1:]) if samples is not None else DEFAULT_INPUT_SHAPE

    margin_value: float | None = None
    n_margin: int | None = None
    if config.needs_margin:
        assert samples is not None
        margin_value = margin_quantile(margins(model, samples, config, progress, share=share),
                                       config.margin_quantile)
        n_margin = len(samples)

    rows: list[dict] = []
    layers: pd.DataFrame | None = None
    with module_mode(model, False):
        for measure in config.measures:
            if measure in ("spectral", "l1"):
                if layers is None:  # one layer table for both
                    layers = layer_table(model, config, input_shape, share=share)
                rows += norm_rows(layers, dataclasses.replace(config, measures=(measure,)),
                                  margin_value if config.margin else None, n_margin)
            elif measure == "margin":
                rows.append(_margin_row(margin_value, config, n_margin))
            elif measure == "gap":
                assert samples is not None and test is not None
                rows += gap_rows(model, samples, test, config, progress, share=share)
            else:
                assert samples is not None
                rows += _external_rows(measure, model, samples, config, share)
    if config.margin and "margin" not in config.measures and margin_value is not None:
        rows.append(_margin_row(margin_value, config, n_margin))  # the divisor, for the record
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["n"] = pd.array([None if v is None or pd.isna(v) else int(v) for v in df["n"]], dtype="Int64")
    return df


def _margin_row(value: float | None, config: ComplexityConfig, n: int | None) -> dict:
    assert value is not None
    return _row("margin", f"quantile;{margin_variant(config)}", value, n=n)
