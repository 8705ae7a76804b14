"""The eight findings of Dong et al., *Exploring Memorization in Adversarial Training*
(ICLR 2022) that ``atprobe demo`` measures, each with the statistic it computes and the rule
that turns the statistic into a verdict (docs/demo.md states the same rules).

A rule is a plain function of the tables the demo's commands write (``curves.csv``,
``gradratio.csv``, ``stability.csv``, ``gradcos.csv``, ``complexity.csv``,
``hardness/consistency.csv``, ``table.csv``, read with pandas) that returns a
:class:`Measured`: the statistic, the verdict and one line with the numbers behind it. The
verdict is one of :data:`VERDICTS`:

- ``reproduced``: the paper's effect, in the paper's direction, larger than the noise of the
  measurement (two standard errors, or a p-value below 0.05) and past the size the finding
  names (a run that "fits" the random labels has at least half of them right);
- ``contradicted``: the opposite effect, just as clearly;
- ``not at this size``: anything else: an effect within the noise, or a precondition the
  experiment did not reach (no robust overfitting to mitigate, a model that fitted nothing).

The thresholds are constants of this module, fixed before any measurement and the same for
every budget; nothing here knows which budget made a table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from atprobe.errors import AtprobeError

__all__ = [
    "FINDINGS",
    "FIT",
    "Finding",
    "HARDNESS_TAU",
    "Measured",
    "P_VALUE",
    "VERDICTS",
    "Z",
    "complexity_rule",
    "findings_table",
    "final_train_accuracy",
    "fits_where_other_lags",
    "gradcos_rule",
    "gradratio_rule",
    "hardness_rule",
    "overfitting_rule",
    "stability_rule",
]

REPRODUCED, NOT_AT_THIS_SIZE, CONTRADICTED = "reproduced", "not at this size", "contradicted"
VERDICTS = (REPRODUCED, NOT_AT_THIS_SIZE, CONTRADICTED)
#: an effect counts when it exceeds Z standard errors of the measurement
Z = 2.0
#: ... or when its two-sided p-value is below this
P_VALUE = 0.05
#: a run "fits" its training labels when at least this fraction is right (natural accuracy)
FIT = 0.5
#: "the seeds rank the samples consistently": Kendall's tau at least this far above 0
HARDNESS_TAU = 0.5
#: an iteration-by-iteration comparison is one-sided when this fraction goes one way (sign test)
MAJORITY = 0.75


@dataclass(frozen=True)
class Measured:
    """What a rule found: ``statistic`` (the number the findings table shows, its unit in the
    finding's ``unit``), ``verdict`` (one of :data:`VERDICTS`) and ``detail``, one line of the
    numbers behind it."""

    statistic: float
    verdict: str
    detail: str

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise AtprobeError(f"verdict {self.verdict!r} is not one of {', '.join(VERDICTS)}")


@dataclass(frozen=True)
class Finding:
    """One finding: what the paper claims and what it reports, the statistic measured (with
    its ``unit``) and the verdict rule in words (the code is the rule function the demo
    calls with the finding's tables)."""

    key: str
    number: int
    source: str        # where in the paper
    claim: str
    paper: str         # the paper's value
    statistic: str     # what the measured number is
    unit: str
    rule: str          # the verdict rule, in words


def _choose(reproduced: bool, contradicted: bool) -> str:
    """The verdict of a rule's two conditions (contradicted wins; neither: not at this size)."""
    return CONTRADICTED if contradicted else REPRODUCED if reproduced else NOT_AT_THIS_SIZE


def _verdict(effect: float, se: float, *, precondition: bool = True) -> str:
    """reproduced when ``effect > Z * se`` (and the precondition holds), contradicted when
    ``effect < -Z * se``, otherwise not at this size."""
    if not math.isfinite(effect) or not math.isfinite(se):
        return NOT_AT_THIS_SIZE
    if effect < -Z * se:
        return CONTRADICTED
    if effect > Z * se and precondition:
        return REPRODUCED
    return NOT_AT_THIS_SIZE


def _proportion_se(p: float, n: int) -> float:
    """Binomial standard error of an accuracy ``p`` measured on ``n`` samples, at least that of
    one sample in ``n`` (so a run at 0 or 1 does not claim zero noise)."""
    if n <= 0:
        return math.inf
    p = min(max(p, 1 / n), 1 - 1 / n) if n > 1 else 0.5
    return math.sqrt(p * (1 - p) / n)


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> pd.DataFrame:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise AtprobeError(f"{what}: the table has no column {missing[0]!r}")
    if df.empty:
        raise AtprobeError(f"{what}: the table has no rows")
    return df


# --------------------------------------------------------------------------- Figs. 2 and 5


def final_train_accuracy(curves: pd.DataFrame, metric: str) -> tuple[int, float]:
    """``(epoch, value)`` of ``metric`` (``natural_acc``, ``pgd10_acc``, ...) on the training
    split at the last epoch ``curves.csv`` evaluated it."""
    _require(curves, ["epoch", "split", "metric", "value"], "curves.csv")
    rows = curves[(curves["split"] == "train") & (curves["metric"] == metric)].dropna(subset=["value"])
    if rows.empty:
        raise AtprobeError(f"curves.csv has no train {metric} (the run's --eval-attack names the robust metric)")
    last = rows.loc[rows["epoch"].idxmax()]
    return int(last["epoch"]), float(last["value"])


def fits_where_other_lags(leader: pd.DataFrame, lagger: pd.DataFrame, n_leader: int, n_lagger: int,
                          robust_metric: str, names: tuple[str, str]) -> Measured:
    """Figs. 2 and 5: ``leader`` (TRADES; PGD-AT with Eq. 6) fits the random labels while
    ``lagger`` (PGD-AT) lags. From each run's ``curves.csv`` at its last evaluated epoch:
    the natural and the robust (``robust_metric``) training accuracy on the trained labels,
    measured on ``n_leader``/``n_lagger`` training samples.

    statistic: ``min`` over natural and robust of (leader - lagger), in points.
    reproduced: the leader fits (natural accuracy >= FIT) and both differences exceed Z
    standard errors (binomial, the two runs' errors combined); contradicted: the lagger is
    ahead by more than Z standard errors on either; otherwise not at this size (both fit
    alike, or neither fits yet)."""
    a, b = names
    diffs, ses, parts = [], [], []
    for metric in ("natural_acc", robust_metric):
        _, pa = final_train_accuracy(leader, metric)
        epoch, pb = final_train_accuracy(lagger, metric)
        diffs.append(pa - pb)
        ses.append(math.hypot(_proportion_se(pa, n_leader), _proportion_se(pb, n_lagger)))
        parts.append(f"{metric.removesuffix('_acc')} train acc {a} {pa:.3f} vs {b} {pb:.3f}")
    _, fit = final_train_accuracy(leader, "natural_acc")
    verdict = _choose(all(d > Z * s for d, s in zip(diffs, ses)) and fit >= FIT,
                      any(-d > Z * s for d, s in zip(diffs, ses)))
    statistic = 100 * min(diffs)
    detail = (f"epoch {epoch}: " + "; ".join(parts)
              + f" (2 SE {200 * max(ses):.1f} pt; fits means natural >= {FIT:g})")
    return Measured(statistic, verdict, detail)


# --------------------------------------------------------------------------- Fig. 3(b)


def gradratio_rule(pgd_at: pd.DataFrame, trades: pd.DataFrame) -> Measured:
    """Fig. 3(b): over the logged first iterations (``gradratio.csv`` of the two random-label
    runs, matched by iteration), PGD-AT's ||grad R|| / ||grad CE|| exceeds TRADES'
    ||grad beta KL|| / ||grad CE||.

    statistic: the fraction of the matched iterations where PGD-AT's ratio is the larger.
    reproduced: at least MAJORITY of them and a two-sided sign test p < P_VALUE;
    contradicted: at most 1 - MAJORITY and p < P_VALUE; otherwise not at this size."""
    from scipy.stats import binomtest

    for df, name in ((pgd_at, "PGD-AT"), (trades, "TRADES")):
        _require(df, ["iteration", "ratio"], f"gradratio.csv of {name}")
    both = pgd_at[["iteration", "ratio"]].merge(trades[["iteration", "ratio"]], on="iteration",
                                                 suffixes=("_pgd", "_trades"))
    both = both[np.isfinite(both["ratio_pgd"]) & np.isfinite(both["ratio_trades"])]
    if both.empty:
        raise AtprobeError("gradratio.csv: the two runs share no logged iteration with finite ratios")
    m = len(both)
    k = int((both["ratio_pgd"] > both["ratio_trades"]).sum())
    share = k / m
    p = binomtest(k, m, 0.5).pvalue
    verdict = _choose(share >= MAJORITY and p < P_VALUE, share <= 1 - MAJORITY and p < P_VALUE)
    detail = (f"PGD-AT's ratio is the larger at {k} of {m} iterations (sign test p = {p:.2g}); median ratio "
              f"PGD-AT {both['ratio_pgd'].median():.3f}, TRADES {both['ratio_trades'].median():.3f}")
    return Measured(share, verdict, detail)


# --------------------------------------------------------------------------- Fig. 4(a)


def stability_rule(stability: pd.DataFrame) -> Measured:
    """Fig. 4(a): at initialization the PGD-AT gradient changes more along the random
    filter-normalized directions than the TRADES and the clean gradient. From
    ``stability.csv`` (losses pgd_at, trades, clean): at every lambda != 0 the mean ``dist``
    over the directions, and its standard error ``dist_std / sqrt(n)`` (per direction,
    combined over directions and lambdas).

    statistic: mean over lambda of dist(pgd_at) / max(dist(trades), dist(clean)).
    reproduced: mean over lambda of dist(pgd_at) - max(others) exceeds Z standard errors;
    contradicted: below -Z standard errors; otherwise not at this size."""
    _require(stability, ["loss", "lam", "direction", "n", "dist_mean", "dist_std"], "stability.csv")
    df = stability[stability["lam"] != 0].copy()
    losses = set(df["loss"])
    if not {"pgd_at", "trades", "clean"} <= losses:
        raise AtprobeError("stability.csv needs the losses pgd_at, trades and clean (atprobe stability's default)")
    df["var"] = df["dist_std"] ** 2 / df["n"]
    per = df.groupby(["loss", "lam"]).agg(dist=("dist_mean", "mean"), var=("var", "mean"),
                                          directions=("direction", "nunique"))
    per["var"] = per["var"] / per["directions"]
    lams = sorted(set(df["lam"]))
    diffs, ratios, variances = [], [], []
    for lam in lams:
        pgd = per.loc[("pgd_at", lam)]
        other = max((per.loc[(name, lam)] for name in ("trades", "clean")), key=lambda r: r["dist"])
        diffs.append(pgd["dist"] - other["dist"])
        ratios.append(pgd["dist"] / other["dist"] if other["dist"] > 0 else math.inf)
        variances.append(pgd["var"] + other["var"])
    effect = float(np.mean(diffs))
    se = math.sqrt(sum(variances)) / len(lams)
    mean_of = {name: float(per.loc[name]["dist"].mean()) for name in ("pgd_at", "trades", "clean")}
    detail = (f"mean gradient distance over {len(lams)} lambdas != 0: PGD-AT {mean_of['pgd_at']:.4g}, "
              f"TRADES {mean_of['trades']:.4g}, clean {mean_of['clean']:.4g} (PGD-AT - larger other "
              f"{effect:.4g}, 2 SE {Z * se:.2g})")
    return Measured(float(np.mean(ratios)), _verdict(effect, se), detail)


# --------------------------------------------------------------------------- Fig. 4(b)


def gradcos_rule(pgd_at: pd.DataFrame, trades: pd.DataFrame) -> Measured:
    """Fig. 4(b): on random labels the cosine between each sample's gradients at successive
    epochs is lower for PGD-AT than for TRADES. From each run's ``gradcos.csv``: the mean of
    ``cos_mean`` over the epoch pairs, its standard error from ``cos_std / sqrt(n)``.

    statistic: mean cosine of TRADES - mean cosine of PGD-AT.
    reproduced: above Z standard errors; contradicted: below -Z; otherwise not at this size."""
    means, variances = [], []
    for df, name in ((trades, "TRADES"), (pgd_at, "PGD-AT")):
        _require(df, ["cos_mean", "cos_std", "n"], f"gradcos.csv of {name}")
        means.append(float(df["cos_mean"].mean()))
        variances.append(float((df["cos_std"] ** 2 / df["n"]).sum()) / len(df) ** 2)
    effect = means[0] - means[1]
    se = math.sqrt(sum(variances))
    detail = (f"mean cosine of successive epochs' gradients: TRADES {means[0]:.3f} over {len(trades)} pairs, "
              f"PGD-AT {means[1]:.3f} over {len(pgd_at)} pairs (2 SE {Z * se:.2g})")
    return Measured(effect, _verdict(effect, se), detail)


# --------------------------------------------------------------------------- Fig. 6

#: the four measures of Fig. 6 as ``atprobe complexity`` names them: (measure, variant prefix)
FIG6_MEASURES: dict[str, tuple[str, str]] = {
    "spectral": ("spectral", "log10_over_margin"),
    "l1": ("l1", "sum_over_margin"),
    "curvature": ("curvature", "mean"),
    "flatness": ("flatness", "radius="),
}


def complexity_rule(complexity: pd.DataFrame) -> Measured:
    """Fig. 6: across the models (true and random labels), flatness ranks the robust
    generalization gap better than spectral norm over margin, l1 norm over margin and
    input-space curvature. From ``complexity.csv``: each measure's Kendall tau-b against
    ``gap``/``robust_gap`` over the models where both are finite (scipy, two-sided p).

    statistic: tau(flatness) - max(tau(spectral), tau(l1), tau(curvature)).
    reproduced: flatness has the largest tau and its p < P_VALUE; contradicted: another
    measure has a larger tau with p < P_VALUE; otherwise not at this size."""
    from scipy.stats import kendalltau

    _require(complexity, ["checkpoint", "measure", "variant", "value"], "complexity.csv")
    df = complexity.copy()
    df["variant"] = df["variant"].astype(str)
    gap = df[(df["measure"] == "gap") & (df["variant"] == "robust_gap")].drop_duplicates("checkpoint")
    if gap.empty:
        raise AtprobeError("complexity.csv has no robust gap (measure gap, variant robust_gap)")
    gap = gap.set_index("checkpoint")["value"]
    taus: dict[str, tuple[float, float, int]] = {}
    for name, (measure, prefix) in FIG6_MEASURES.items():
        rows = df[(df["measure"] == measure) & df["variant"].str.startswith(prefix)]
        if rows.empty:
            raise AtprobeError(f"complexity.csv has no {measure} measure ({prefix}...)")
        rows = rows[rows["variant"] == rows["variant"].iloc[0]].drop_duplicates("checkpoint")
        both = pd.DataFrame({"value": rows.set_index("checkpoint")["value"], "gap": gap}).dropna()
        both = both[np.isfinite(both["value"]) & np.isfinite(both["gap"])]
        if len(both) >= 3 and both["value"].nunique() > 1 and both["gap"].nunique() > 1:
            res = kendalltau(both["value"], both["gap"])
            taus[name] = (float(res.statistic), float(res.pvalue), len(both))
        else:
            taus[name] = (math.nan, math.nan, len(both))
    flat_tau, flat_p, _ = taus["flatness"]
    others = {k: v for k, v in taus.items() if k != "flatness" and math.isfinite(v[0])}
    best_name = max(others, key=lambda k: others[k][0]) if others else None
    best_tau = others[best_name][0] if best_name else math.nan
    verdict = _choose(
        math.isfinite(flat_tau) and (best_name is None or flat_tau > best_tau) and flat_p < P_VALUE,
        best_name is not None and (not math.isfinite(flat_tau) or best_tau > flat_tau)
        and others[best_name][1] < P_VALUE)
    statistic = flat_tau - best_tau if math.isfinite(flat_tau) and best_name else math.nan
    models = max(v[2] for v in taus.values())
    detail = f"Kendall tau with the robust gap over {models} models: " + ", ".join(
        f"{k} {t:.2f} (p {p:.2g})" if math.isfinite(t) else f"{k} undefined" for k, (t, p, _) in taus.items())
    return Measured(statistic, verdict, detail)


# --------------------------------------------------------------------------- Sec. 4.1


def kendall_tau_se(n: int) -> float:
    """Standard error of Kendall's tau of ``n`` independent pairs under no association
    (sqrt(2 (2n + 5) / (9 n (n - 1)))), the scale of tau's noise at this n."""
    return math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1))) if n > 1 else math.inf


def hardness_rule(consistency: pd.DataFrame) -> Measured:
    """Sec. 4.1: two PGD-AT seeds rank the training samples consistently by adversarial loss
    (paper: Kendall tau 0.85). From ``hardness/consistency.csv`` (the first pair of models).

    statistic: Kendall's tau-b.
    reproduced: tau - Z * se >= HARDNESS_TAU (se: tau's standard error at this n under no
    association); contradicted: tau + Z * se <= 0 (no positive agreement); otherwise not at
    this size."""
    _require(consistency, ["n", "kendall_tau"], "hardness/consistency.csv")
    row = consistency.iloc[0]
    tau, n = float(row["kendall_tau"]), int(row["n"])
    se = kendall_tau_se(n)
    finite = math.isfinite(tau)
    verdict = _choose(finite and tau - Z * se >= HARDNESS_TAU, finite and tau + Z * se <= 0)
    detail = (f"Kendall tau {tau:.3f} over {n} training samples (2 SE {Z * se:.2g}; consistent means >= "
              f"{HARDNESS_TAU:g})")
    return Measured(tau, verdict, detail)


# --------------------------------------------------------------------------- Table 1


def overfitting_rule(table: pd.DataFrame, plain: str, te: str, attack: str) -> Measured:
    """Table 1: with a learning-rate decay, PGD-AT's best - final robust test accuracy is
    larger than PGD-AT+TE's. From ``table.csv`` (``atprobe table``): the rows of the runs
    ``plain`` and ``te`` under ``attack``; each accuracy's standard error is binomial at the
    row's ``n``.

    statistic: diff(PGD-AT) - diff(PGD-AT+TE), in points.
    reproduced: PGD-AT overfits (its diff exceeds Z standard errors) and the statistic exceeds
    Z standard errors; contradicted: the statistic is below -Z standard errors; otherwise not
    at this size (no robust overfitting to mitigate, or a difference within the noise)."""
    _require(table, ["run", "attack", "n", "best", "final", "diff"], "table.csv")
    rows = {}
    for run in (plain, te):
        part = table[(table["run"].astype(str) == run) & (table["attack"] == attack)]
        if part.empty:
            raise AtprobeError(f"table.csv has no row for run {run} under {attack}")
        rows[run] = part.iloc[0]

    def diff_se(row) -> float:
        n = int(row["n"])
        return math.hypot(_proportion_se(float(row["best"]), n), _proportion_se(float(row["final"]), n))

    se_plain, se_te = diff_se(rows[plain]), diff_se(rows[te])
    d_plain, d_te = float(rows[plain]["diff"]), float(rows[te]["diff"])
    effect, se = d_plain - d_te, math.hypot(se_plain, se_te)
    verdict = _verdict(effect, se, precondition=d_plain > Z * se_plain)
    detail = (f"{attack} best - final: PGD-AT {100 * d_plain:.1f} pt (best {100 * rows[plain]['best']:.1f}, final "
              f"{100 * rows[plain]['final']:.1f}), PGD-AT+TE {100 * d_te:.1f} pt on {int(rows[plain]['n'])} test "
              f"images (2 SE of the difference {200 * se:.1f} pt)")
    return Measured(100 * effect, verdict, detail)


# --------------------------------------------------------------------------- the list

FINDINGS: tuple[Finding, ...] = (
    Finding("fig2_random_labels", 1, "Fig. 2",
            "On completely random labels TRADES fits the training set (natural and robust training accuracy) "
            "while PGD-AT lags.",
            "TRADES reaches ~100% natural and robust training accuracy on random labels; PGD-AT stays near "
            "chance (10%)",
            "TRADES - PGD-AT training accuracy on the random labels at the last epoch, the smaller of the natural "
            "and robust differences", "points",
            f"reproduced: TRADES fits (natural >= {FIT:g}) and leads on both by > {Z:g} SE; contradicted: PGD-AT "
            f"leads on either by > {Z:g} SE"),
    Finding("fig3b_gradient_ratio", 2, "Fig. 3(b)",
            "Early in training ||grad R|| / ||grad CE|| of PGD-AT exceeds ||grad beta KL|| / ||grad CE|| of TRADES "
            "(random labels).",
            "PGD-AT's ratio is consistently higher over the first 1000 iterations",
            "fraction of the logged first iterations where PGD-AT's ratio is the larger", "fraction",
            f"reproduced: >= {MAJORITY:g} and sign test p < {P_VALUE:g}; contradicted: <= {1 - MAJORITY:g} and "
            f"p < {P_VALUE:g}"),
    Finding("fig4a_stability_init", 3, "Fig. 4(a)",
            "At initialization (BatchNorm statistics recomputed) the PGD-AT gradient changes more along "
            "filter-normalized directions than the TRADES and clean gradients.",
            "PGD-AT's gradient distance jumps at small lambda; TRADES and clean change smoothly",
            "mean over lambda != 0 of dist(PGD-AT) / max(dist(TRADES), dist(clean))", "ratio",
            f"reproduced: mean dist(PGD-AT) - max(other) > {Z:g} SE; contradicted: < -{Z:g} SE"),
    Finding("fig4b_gradcos", 4, "Fig. 4(b)",
            "On random labels the cosine between successive epochs' gradients is lower for PGD-AT than for "
            "TRADES.",
            "PGD-AT's cosine stays well below TRADES' over the first 20 epochs",
            "mean cosine of TRADES - mean cosine of PGD-AT over the epoch pairs", "cosine",
            f"reproduced: > {Z:g} SE; contradicted: < -{Z:g} SE"),
    Finding("fig5_clean_loss", 5, "Fig. 5 (Eq. 6)",
            "PGD-AT with the clean-loss ramp (Eq. 6) fits random labels where plain PGD-AT does not.",
            "Eq. 6 reaches ~100% natural and robust training accuracy on random labels; PGD-AT stays near chance",
            "PGD-AT (Eq. 6) - PGD-AT training accuracy on the random labels at the last epoch, the smaller of the "
            "natural and robust differences", "points",
            f"reproduced: Eq. 6 fits (natural >= {FIT:g}) and leads on both by > {Z:g} SE; contradicted: plain "
            f"PGD-AT leads on either by > {Z:g} SE"),
    Finding("fig6_flatness", 6, "Fig. 6",
            "Across models trained on true and random labels, flatness ranks the robust generalization gap better "
            "(Kendall tau) than spectral, l1 (over margin) and curvature.",
            "flatness tracks the robust gap; the norm and curvature measures do not",
            "Kendall tau(flatness, robust gap) - the largest tau of spectral, l1 and curvature", "tau",
            f"reproduced: flatness has the largest tau with p < {P_VALUE:g}; contradicted: another measure has a "
            f"larger tau with p < {P_VALUE:g}"),
    Finding("sec41_hardness", 7, "Sec. 4.1",
            "The per-sample adversarial losses of two PGD-AT seeds rank the training samples consistently.",
            "Kendall tau = 0.85",
            "Kendall tau between the two seeds' per-sample adversarial training losses", "tau",
            f"reproduced: tau - {Z:g} SE >= {HARDNESS_TAU:g}; contradicted: tau + {Z:g} SE <= 0"),
    Finding("table1_te", 8, "Table 1",
            "With a learning-rate decay, PGD-AT's best - final robust test accuracy is larger than PGD-AT+TE's.",
            "7.72 vs 0.96 points (PGD-10, CIFAR-10, ResNet-18)",
            "best - final robust test accuracy of PGD-AT minus that of PGD-AT+TE", "points",
            f"reproduced: PGD-AT overfits (best - final > {Z:g} SE) and the difference > {Z:g} SE; contradicted: "
            f"< -{Z:g} SE"),
)

def findings_table(measured: Mapping[str, Measured]) -> pd.DataFrame:
    """The findings table (``findings.csv``): one row per finding of :data:`FINDINGS`, in order,
    with what the paper reports, the statistic measured and its verdict."""
    rows = []
    for f in FINDINGS:
        m = measured[f.key]
        rows.append({"finding": f.number, "key": f.key, "source": f.source, "claim": f.claim, "paper": f.paper,
                     "statistic": f.statistic, "unit": f.unit, "measured": m.statistic, "verdict": m.verdict,
                     "detail": m.detail, "rule": f.rule})
    return pd.DataFrame(rows)
