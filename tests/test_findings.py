"""The verdict rules of atprobe.findings on hand-made tables: for every finding, a table that
should give each verdict gives it (and the statistic is the number computed by hand)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from atprobe import findings as f
from atprobe.errors import AtprobeError

R, N, C = f.REPRODUCED, f.NOT_AT_THIS_SIZE, f.CONTRADICTED


# --------------------------------------------------------------------------- Figs. 2 and 5


def curves(natural: float, robust: float, *, metric: str = "pgd3_acc", epochs=(5, 10)) -> pd.DataFrame:
    """A curves.csv whose last evaluated epoch has these training accuracies (earlier epochs at chance)."""
    rows = []
    for e in epochs:
        last = e == max(epochs)
        rows += [{"epoch": e, "split": "train", "metric": "natural_acc", "value": natural if last else 0.1},
                 {"epoch": e, "split": "train", "metric": metric, "value": robust if last else 0.1},
                 {"epoch": e, "split": "test", "metric": "natural_acc", "value": 0.1},
                 {"epoch": e, "split": "train", "metric": "lr", "value": 0.1}]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("leader, lagger, n, verdict", [
    ((0.95, 0.80), (0.20, 0.15), 512, R),       # TRADES fits, PGD-AT lags: Fig. 2
    ((0.45, 0.30), (0.20, 0.15), 512, N),       # ahead, but TRADES has not fitted (natural < 0.5)
    ((1.00, 0.99), (1.00, 0.98), 512, N),       # both fit: no lag at this size
    ((0.95, 0.80), (0.85, 0.60), 16, N),        # ahead by 10-20 points on 16 samples: within the noise
    ((0.95, 0.30), (0.90, 0.80), 512, C),       # PGD-AT robustly ahead
    ((0.20, 0.15), (0.95, 0.80), 512, C),       # PGD-AT fits, TRADES does not
])
def test_fits_where_other_lags(leader, lagger, n, verdict):
    m = f.fits_where_other_lags(curves(*leader), curves(*lagger), n, n, "pgd3_acc", ("TRADES", "PGD-AT"))
    assert m.verdict == verdict
    assert m.statistic == pytest.approx(100 * min(leader[0] - lagger[0], leader[1] - lagger[1]))
    assert "epoch 10" in m.detail


def test_fit_rule_se_by_hand():
    """The boundary is Z binomial standard errors of the difference: 0.6 vs 0.5 on n samples is
    an effect when 0.1 > 2 sqrt(0.24/n + 0.25/n)."""
    se = math.sqrt(0.6 * 0.4 / 400 + 0.5 * 0.5 / 400)  # 0.035: 0.1 > 2 se
    assert 0.1 > f.Z * se
    assert f.fits_where_other_lags(curves(0.6, 0.6), curves(0.5, 0.5), 400, 400, "pgd3_acc", ("a", "b")).verdict == R
    se = math.sqrt(0.6 * 0.4 / 100 + 0.5 * 0.5 / 100)  # 0.07: 0.1 < 2 se
    assert 0.1 < f.Z * se
    assert f.fits_where_other_lags(curves(0.6, 0.6), curves(0.5, 0.5), 100, 100, "pgd3_acc", ("a", "b")).verdict == N


def test_fit_rule_needs_the_metric():
    with pytest.raises(AtprobeError, match="pgd10_acc"):
        f.fits_where_other_lags(curves(1, 1), curves(0, 0), 10, 10, "pgd10_acc", ("a", "b"))


# --------------------------------------------------------------------------- Fig. 3(b)


def ratios(values) -> pd.DataFrame:
    return pd.DataFrame({"iteration": range(len(values)), "epoch": 0, "ratio": values})


@pytest.mark.parametrize("pgd, trades, verdict, share", [
    ([0.5] * 20, [0.1] * 20, R, 1.0),
    ([0.5] * 16 + [0.0] * 4, [0.1] * 20, R, 0.8),        # 16 of 20, p = 0.012
    ([0.5] * 3, [0.1] * 3, N, 1.0),                      # 3 of 3: p = 0.25, too few iterations
    ([0.5] * 10 + [0.0] * 10, [0.1] * 20, N, 0.5),
    ([0.0] * 20, [0.1] * 20, C, 0.0),
])
def test_gradratio_rule(pgd, trades, verdict, share):
    m = f.gradratio_rule(ratios(pgd), ratios(trades))
    assert (m.verdict, m.statistic) == (verdict, pytest.approx(share))


def test_gradratio_matches_iterations():
    """Only the iterations both runs logged are compared (a longer log is cut)."""
    m = f.gradratio_rule(ratios([0.5] * 20 + [0.0] * 30), ratios([0.1] * 20))
    assert m.verdict == R and m.statistic == 1.0 and "20 of 20" in m.detail


# --------------------------------------------------------------------------- Fig. 4(a)


def stability(pgd: float, trades: float, clean: float, std: float = 1.0, n: int = 64) -> pd.DataFrame:
    rows = []
    for loss, d in (("pgd_at", pgd), ("trades", trades), ("clean", clean)):
        for lam in (-0.05, 0.0, 0.05):
            for direction in (0, 1):
                rows.append({"checkpoint": "init:cnn-small", "loss": loss, "direction": direction, "lam": lam,
                             "n": n, "dist_mean": 0.0 if lam == 0 else d * (1 + 0.1 * direction),
                             "dist_std": 0.0 if lam == 0 else std, "cos_mean": 1.0, "cos_std": 0.0})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("dists, std, verdict", [
    ((3.0, 1.0, 1.0), 1.0, R),
    ((3.0, 2.9, 1.0), 1.0, N),      # TRADES almost as large: within the noise
    ((3.0, 1.0, 1.0), 40.0, N),     # a large spread over 64 samples
    ((1.0, 3.0, 1.0), 1.0, C),      # TRADES' gradient changes more
])
def test_stability_rule(dists, std, verdict):
    m = f.stability_rule(stability(*dists, std=std))
    assert m.verdict == verdict
    assert m.statistic == pytest.approx(dists[0] / max(dists[1:]))


def test_stability_se_by_hand():
    """se = sqrt(sum over lambdas of (var_pgd + var_other)) / #lambdas, var = mean over the
    directions of std^2 / n, divided by the directions."""
    table = stability(1.2, 1.0, 0.5, std=1.0, n=100)
    var = (1.0 / 100) / 2
    se = math.sqrt(2 * (var + var)) / 2
    assert 0.2 > f.Z * se  # 0.2 > 0.141
    assert f.stability_rule(table).verdict == R
    assert f.stability_rule(stability(1.2, 1.0, 0.5, std=2.0, n=100)).verdict == N  # 0.2 < 0.283


def test_stability_needs_the_three_losses():
    table = stability(3, 1, 1)
    with pytest.raises(AtprobeError, match="clean"):
        f.stability_rule(table[table["loss"] != "clean"])


# --------------------------------------------------------------------------- Fig. 4(b)


def cosines(values, std=0.1, n=64) -> pd.DataFrame:
    return pd.DataFrame({"pair": range(len(values)), "cos_mean": values, "cos_std": std, "n": n})


@pytest.mark.parametrize("pgd, trades, std, verdict", [
    ([0.2] * 10, [0.8] * 10, 0.1, R),
    ([0.78] * 10, [0.8] * 10, 0.3, N),
    ([0.2] * 2, [0.3] * 2, 2.0, N),
    ([0.8] * 10, [0.2] * 10, 0.1, C),
])
def test_gradcos_rule(pgd, trades, std, verdict):
    m = f.gradcos_rule(cosines(pgd, std), cosines(trades, std))
    assert m.verdict == verdict and m.statistic == pytest.approx(np.mean(trades) - np.mean(pgd))


# --------------------------------------------------------------------------- Fig. 6


def complexity(columns: dict[str, list[float]], gaps: list[float]) -> pd.DataFrame:
    variants = {"spectral": "log10_over_margin;method=operator;bn=fold;on=adv;q=0.1",
                "l1": "sum_over_margin;bn=fold;on=adv;q=0.1", "curvature": "mean;at=natural",
                "flatness": "radius=0.5;directions=5"}
    rows = []
    for i, gap in enumerate(gaps):
        ckpt = f"runs/m{i}/final.pt"
        rows.append({"checkpoint": ckpt, "measure": "gap", "variant": "robust_gap", "value": gap})
        rows.append({"checkpoint": ckpt, "measure": "spectral", "variant": "product;method=operator;bn=fold",
                     "value": 99.0 - gap})  # a variant the rule does not read
        for measure, values in columns.items():
            rows.append({"checkpoint": ckpt, "measure": measure, "variant": variants[measure], "value": values[i]})
    return pd.DataFrame(rows)


GAPS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
NOISE = [0.5, 0.1, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4]


def test_complexity_reproduced():
    m = f.complexity_rule(complexity({"flatness": GAPS, "spectral": NOISE, "l1": NOISE[::-1], "curvature": NOISE},
                                     GAPS))
    assert m.verdict == R
    from scipy.stats import kendalltau
    others = max(kendalltau(NOISE, GAPS).statistic, kendalltau(NOISE[::-1], GAPS).statistic)
    assert m.statistic == pytest.approx(1.0 - others)


def test_complexity_contradicted_and_not_at_this_size():
    m = f.complexity_rule(complexity({"flatness": NOISE, "spectral": GAPS, "l1": NOISE, "curvature": NOISE}, GAPS))
    assert m.verdict == C and m.statistic < 0
    # flatness first but on three models: tau 1 has p = 0.33
    m = f.complexity_rule(complexity({"flatness": [1, 2, 3], "spectral": [3, 1, 2], "l1": [3, 1, 2],
                                      "curvature": [3, 1, 2]}, [0.1, 0.2, 0.3]))
    assert m.verdict == N and m.statistic > 0


def test_complexity_skips_undefined_values():
    """A measure that is NaN on some models is ranked over the others; one NaN everywhere is undefined."""
    nan = float("nan")
    m = f.complexity_rule(complexity({"flatness": GAPS, "spectral": [nan] * 8, "l1": [nan] * 4 + NOISE[4:],
                                      "curvature": NOISE}, GAPS))
    assert m.verdict == R and "spectral undefined" in m.detail and math.isfinite(m.statistic)


# --------------------------------------------------------------------------- Sec. 4.1


@pytest.mark.parametrize("tau, n, verdict", [
    (0.85, 1000, R),
    (0.55, 1000, R),     # 0.55 - 2 * 0.021 >= 0.5
    (0.52, 1000, N),
    (0.85, 12, N),       # se 0.22: 0.85 - 0.44 < 0.5
    (0.3, 1000, N),
    (-0.05, 1000, C),
    (0.0, 1000, N),      # tau + 2 se > 0: no agreement, yet not shown to be none
])
def test_hardness_rule(tau, n, verdict):
    table = pd.DataFrame([{"model_a": "a", "model_b": "b", "n": n, "kendall_tau": tau, "kendall_p": 0.01}])
    m = f.hardness_rule(table)
    assert (m.verdict, m.statistic) == (verdict, tau)


def test_kendall_se_by_hand():
    assert f.kendall_tau_se(10) == pytest.approx(math.sqrt(2 * 25 / (9 * 10 * 9)))


# --------------------------------------------------------------------------- Table 1


def table1(plain: tuple[float, float], te: tuple[float, float], n: int = 10000) -> pd.DataFrame:
    rows = []
    for run, (best, final) in (("runs/pgd_at-true", plain), ("runs/pgd_at-te-true", te)):
        rows.append({"run": run, "attack": "natural", "n": n, "best": 0.8, "final": 0.8, "diff": 0.0})
        rows.append({"run": run, "attack": "pgd10", "n": n, "best": best, "final": final, "diff": best - final})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("plain, te, n, verdict", [
    ((0.5264, 0.4492), (0.5579, 0.5483), 10000, R),   # the paper's Table 1
    ((0.5264, 0.4492), (0.5579, 0.5483), 200, N),     # the same on 200 images: se ~5 pt
    ((0.50, 0.50), (0.50, 0.50), 10000, N),           # no robust overfitting to mitigate
    ((0.50, 0.49), (0.55, 0.45), 10000, C),           # TE overfits more
])
def test_overfitting_rule(plain, te, n, verdict):
    m = f.overfitting_rule(table1(plain, te, n), "runs/pgd_at-true", "runs/pgd_at-te-true", "pgd10")
    assert m.verdict == verdict
    assert m.statistic == pytest.approx(100 * ((plain[0] - plain[1]) - (te[0] - te[1])))


def test_overfitting_rule_names_a_missing_row():
    with pytest.raises(AtprobeError, match="pgd20"):
        f.overfitting_rule(table1((0.5, 0.4), (0.5, 0.5)), "runs/pgd_at-true", "runs/pgd_at-te-true", "pgd20")


# --------------------------------------------------------------------------- the list


def test_eight_findings_and_the_table():
    assert [x.number for x in f.FINDINGS] == list(range(1, 9))
    assert len({x.key for x in f.FINDINGS}) == 8
    measured = {x.key: f.Measured(float(i), f.VERDICTS[i % 3], "d") for i, x in enumerate(f.FINDINGS)}
    table = f.findings_table(measured)
    assert list(table["finding"]) == list(range(1, 9))
    assert set(table["verdict"]) <= set(f.VERDICTS)
    with pytest.raises(AtprobeError):
        f.Measured(0.0, "green", "")


def test_docs_state_every_rule():
    """docs/demo.md states each finding's statistic and rule as the code does (and its constants)."""
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "demo.md").read_text()
    for x in f.FINDINGS:
        assert x.rule in page and x.statistic in page, x.key
    for name in ("Z = 2", "P_VALUE = 0.05", "FIT = 0.5", "HARDNESS_TAU = 0.5", "MAJORITY = 0.75"):
        assert name in page
    assert (f.Z, f.P_VALUE, f.FIT, f.HARDNESS_TAU, f.MAJORITY) == (2.0, 0.05, 0.5, 0.5, 0.75)
