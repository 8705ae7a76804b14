"""``gradnorm``: per-sample gradient norms of the parts of the adversarial-training
objectives and their ratios (Dong et al., ICLR 2022, Sec. 3.2, Fig. 3 and Fig. A.9).

PGD-AT and TRADES both split into the clean cross-entropy and a robust term,

    PGD-AT:  CE(f(x'), y)                 = CE(f(x), y) + R(x, x'),  R = CE(f(x'), y) - CE(f(x), y)
    TRADES:  CE(f(x), y) + beta KL(f(x) || f(x''))

and the paper compares how much of each sample's gradient comes from the robust term:
``||grad R_i|| / ||grad CE_i||`` and ``||grad beta KL_i|| / ||grad CE_i||``. For every sample
this module computes the parameter-gradient norms

    grad_ce      = || d CE(f(x_i), y_i) / d theta ||
    grad_adv_ce  = || d CE(f(x'_i), y_i) / d theta ||            x' = PGD on CE (PGD-AT's attack)
    grad_r       = || d [CE(f(x'_i), y_i) - CE(f(x_i), y_i)] / d theta ||
    grad_kl      = || d KL(f(x_i) || f(x''_i)) / d theta ||      x'' = PGD on KL (TRADES' attack)
    grad_beta_kl = beta * grad_kl                                (= || d beta KL_i / d theta ||)

with :mod:`atprobe.pergrad` (eval mode, chunked ``vmap(grad)``, adversarial examples crafted
at the model's parameters from a per-sample start, treated as constants: Danskin). The
KL term is its own per-sample loss (:class:`KLTerm`, TRADES' attack and ``objectives.trades_kl``),
not the TRADES objective minus CE: the norm of a difference is not a difference of norms.

``probe(model, data, config)`` returns the summary table; :func:`per_sample` the table of
per-sample norms, and :func:`summarize` turns the latter into the former.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn

from atprobe import objectives
from atprobe.data import Split
from atprobe.pergrad import Objective, PerSampleLoss, PointCall, per_sample_grad_norm_pair, per_sample_grad_norms
from atprobe.probes._gradutil import AttackOptions, make_objective, sample_batches, stats

__all__ = [
    "GradNormConfig",
    "KLTerm",
    "PARTS",
    "RATIOS",
    "SAMPLE_COLUMNS",
    "SUMMARY_COLUMNS",
    "part_losses",
    "per_sample",
    "probe",
    "summarize",
]

#: The per-sample gradient norms, as column suffixes: ``grad_<part>``.
PARTS = ("ce", "adv_ce", "r", "kl", "beta_kl")
#: ``ratio_<name>`` = ``grad_<numerator> / grad_<denominator>``.
RATIOS = {"r_ce": ("r", "ce"), "beta_kl_ce": ("beta_kl", "ce")}

SAMPLE_COLUMNS = [
    "sample", "label", "true_label", "noisy",
    *(f"grad_{p}" for p in PARTS),
    *(f"ratio_{r}" for r in RATIOS),
]
SUMMARY_COLUMNS = ["group", "quantity", "statistic", "n", "value"]


@dataclass(frozen=True)
class KLTerm:
    """TRADES' robust term alone as a per-sample loss: ``KL(softmax f(x) || softmax f(x''))``,
    gradient through both arguments (``objectives.trades_kl``), ``x''`` crafted by the
    TRADES objective's own attack and per-sample start (``trades.prepare``)."""

    trades: Objective

    def prepare(self, model_at: nn.Module, x: Tensor, y: Tensor, sample_ids: Sequence[int]) -> tuple[Tensor, ...]:
        return self.trades.prepare(model_at, x, y, sample_ids)

    def __call__(self, f: PointCall, x: Tensor, y: Tensor, *extra: Tensor) -> Tensor:
        (x_adv,) = extra
        logits = f(torch.cat([x, x_adv]))  # one forward for both: eval mode, samples do not mix
        return objectives.trades_kl(logits[: x.shape[0]], logits[x.shape[0] :])


@dataclass(frozen=True)
class GradNormConfig(AttackOptions):
    """What ``gradnorm`` measures.

    threat: the budget of both attacks (PGD on CE for ``adv_ce`` and ``r``, TRADES' PGD
        on KL for ``kl``); the default is the training attack (L-inf 8/255, eps/4, 10 steps).
    beta: TRADES' weight on the KL term (``grad_beta_kl = beta * grad_kl``).
    chunk_size: samples per per-sample-gradient chunk (memory: ``chunk_size x P`` floats).
    seed: keys the per-sample random starts of the attacks (with each sample's index).
    noisy_vs_clean: summaries also for the samples whose label differs from the true
        label (``noisy``) and the others (``clean``), Fig. A.9.
    """

    noisy_vs_clean: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()


def part_losses(config: GradNormConfig) -> dict[str, PerSampleLoss]:
    """The per-sample losses whose gradients are measured. ``r`` (R = CE(x') - CE(x)) is
    the difference of ``adv_ce`` and ``ce``; ``beta_kl`` is ``beta * kl``."""
    return {
        "ce": make_objective("clean", config),
        "adv_ce": make_objective("pgd_at", config),
        "kl": KLTerm(make_objective("trades", config)),
    }


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, NaN where ``den == 0`` (a sample with a zero clean gradient has no ratio)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.full_like(num, math.nan))


def per_sample(
    model: nn.Module, data: Split, config: GradNormConfig = GradNormConfig(), *, progress=None
) -> pd.DataFrame:
    """One row per sample (columns :data:`SAMPLE_COLUMNS`): its gradient norms and ratios.

    ``data.y`` are the labels the losses use (e.g. the labels a checkpoint was trained on),
    ``noisy`` is ``y != true_y``. The model is evaluated in eval mode and left unchanged.
    ``progress``: anything with ``update(n)`` (a tqdm bar), advanced by the samples of
    each batch and part (``4 x len(data)`` in all).
    """
    losses = part_losses(config)
    columns: dict[str, list[Tensor]] = {p: [] for p in ("ce", "adv_ce", "r", "kl")}
    for x, y, ids in sample_batches(model, data, config.chunk_size):
        # grad R = grad CE(x') - grad CE(x): one attack and two gradients give all three norms
        adv_ce, ce, r = per_sample_grad_norm_pair(model, losses["adv_ce"], losses["ce"], x, y,
                                                  chunk_size=config.chunk_size, sample_ids=ids)
        kl = per_sample_grad_norms(model, losses["kl"], x, y, chunk_size=config.chunk_size, sample_ids=ids)
        for part, value in (("ce", ce), ("adv_ce", adv_ce), ("r", r), ("kl", kl)):
            columns[part].append(value.detach())
            if progress is not None:
                progress.update(len(y))
    norms = {p: torch.cat(v).to("cpu", torch.float64) for p, v in columns.items()}
    norms["beta_kl"] = config.beta * norms["kl"]
    table: dict[str, object] = {
        "sample": data.index.cpu().numpy(),
        "label": data.y.cpu().numpy(),
        "true_label": data.true_y.cpu().numpy(),
        "noisy": (data.y != data.true_y).cpu().numpy(),
    }
    for p in PARTS:
        table[f"grad_{p}"] = norms[p].numpy()
    for name, (num, den) in RATIOS.items():
        table[f"ratio_{name}"] = _ratio(norms[num], norms[den]).numpy()
    return pd.DataFrame(table, columns=SAMPLE_COLUMNS)


def summarize(samples: pd.DataFrame, config: GradNormConfig = GradNormConfig()) -> pd.DataFrame:
    """Summary rows (columns :data:`SUMMARY_COLUMNS`) of a :func:`per_sample` table.

    Groups: ``all``, plus ``clean`` and ``noisy`` with ``config.noisy_vs_clean`` (a group
    without samples gives no rows). Per group and quantity (``grad_<part>``,
    ``ratio_<name>``): statistics ``mean``, ``std`` (population) and ``median`` over the
    samples where the quantity is finite (``n`` of them); for ratios also
    ``ratio_of_means`` = mean(grad_num) / mean(grad_den) over the whole group.
    """
    groups = [("all", samples)]
    if config.noisy_vs_clean:
        noisy = samples["noisy"].astype(bool)
        groups += [("clean", samples[~noisy]), ("noisy", samples[noisy])]
    rows = []
    for group, part in groups:
        if len(part) == 0:
            continue
        quantities = [f"grad_{p}" for p in PARTS] + [f"ratio_{r}" for r in RATIOS]
        for q in quantities:
            s = stats(torch.from_numpy(part[q].to_numpy(dtype="float64", copy=True)))
            for statistic in ("mean", "std", "median"):
                rows.append({"group": group, "quantity": q, "statistic": statistic, "n": s["n"], "value": s[statistic]})
            if q.startswith("ratio_"):
                num, den = RATIOS[q[len("ratio_") :]]
                mean_num = float(part[f"grad_{num}"].to_numpy(dtype="float64").mean())
                mean_den = float(part[f"grad_{den}"].to_numpy(dtype="float64").mean())
                value = mean_num / mean_den if mean_den > 0 else math.nan
                rows.append({"group": group, "quantity": q, "statistic": "ratio_of_means", "n": len(part),
                             "value": value})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def probe(model: nn.Module, data: Split, config: GradNormConfig = GradNormConfig()) -> pd.DataFrame:
    """The summary table of gradient norms and ratios of ``model`` on ``data``
    (``summarize(per_sample(model, data, config), config)``)."""
    return summarize(per_sample(model, data, config), config)
