"""covidct.stats against independent references: textbook formulas written out here with plain
loops, scikit-learn and scipy. Nothing here compares the code with numbers it produced itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st
from sklearn.calibration import calibration_curve as sk_calibration_curve
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score, roc_auc_score

from covidct.analysis import stats


# ----------------------------------------------------------------------------- references
def psi(x: float, y: float) -> float:
    """Mann-Whitney kernel: 1 if the positive scores higher, 1/2 on a tie."""
    return 1.0 if x > y else 0.5 if x == y else 0.0


def delong_1988(y, scores):
    """DeLong, DeLong & Clarke-Pearson (1988) with loops: AUCs and the structural-component
    covariance S = S10/m + S01/n, O(k^2 m n)."""
    y = list(y)
    scores = [list(s) for s in scores]
    k = len(scores)
    pos = [i for i, v in enumerate(y) if v == 1]
    neg = [i for i, v in enumerate(y) if v == 0]
    m, n = len(pos), len(neg)
    v10 = [[sum(psi(s[i], s[j]) for j in neg) / n for i in pos] for s in scores]
    v01 = [[sum(psi(s[i], s[j]) for i in pos) / m for j in neg] for s in scores]
    aucs = [sum(v) / m for v in v10]
    cov = [[0.0] * k for _ in range(k)]
    for r in range(k):
        for s in range(k):
            s10 = sum((v10[r][i] - aucs[r]) * (v10[s][i] - aucs[s]) for i in range(m)) / (m - 1)
            s01 = sum((v01[r][j] - aucs[r]) * (v01[s][j] - aucs[s]) for j in range(n)) / (n - 1)
            cov[r][s] = s10 / m + s01 / n
    return aucs, cov


def tied_scores(rng, n, levels=12):
    """Random labels and scores rounded to a few levels, so there are many ties across classes."""
    y = rng.integers(0, 2, n)
    y[:2], y[2:4] = 1, 0
    p = np.round(np.clip(0.5 + 0.25 * (y - 0.5) + rng.normal(0, 0.25, n), 0, 1) * levels) / levels
    return y, p


# ----------------------------------------------------------------------------- DeLong
@pytest.mark.parametrize("seed,n", [(0, 40), (1, 73), (2, 120)])
def test_delong_variance_matches_1988_formula(seed, n):
    rng = np.random.default_rng(seed)
    y, p = tied_scores(rng, n)
    assert len(np.unique(p)) < n // 2                      # the data really have ties
    auc, var = stats.delong_roc_variance(y, p)
    ref_aucs, ref_cov = delong_1988(y, [p])
    ref_auc = ref_aucs[0]
    assert auc == pytest.approx(ref_auc, abs=1e-12)
    assert auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert var == pytest.approx(ref_cov[0][0], abs=1e-10, rel=1e-10)
    # the CI is the normal interval around the AUC, clipped to [0, 1]
    a, low, high = stats.auc_ci_delong(y, p)
    z = st.norm.ppf(0.975)
    assert low == pytest.approx(max(0.0, ref_auc - z * math.sqrt(ref_cov[0][0])), abs=1e-10)
    assert high == pytest.approx(min(1.0, ref_auc + z * math.sqrt(ref_cov[0][0])), abs=1e-10)


def test_delong_paired_test_matches_1988_covariance():
    rng = np.random.default_rng(7)
    y, p1 = tied_scores(rng, 90)
    p2 = np.round(np.clip(p1 + rng.normal(0, 0.3, p1.size), 0, 1) * 8) / 8
    aucs, cov = stats.delong_covariance(y, np.vstack([p1, p2]))
    ref_aucs, ref_cov = delong_1988(y, [p1, p2])
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-10)
    res = stats.delong_roc_test(y, p1, p2)
    var = ref_cov[0][0] + ref_cov[1][1] - 2 * ref_cov[0][1]
    zval = (ref_aucs[0] - ref_aucs[1]) / math.sqrt(var)
    assert res["difference"] == pytest.approx(ref_aucs[0] - ref_aucs[1], abs=1e-12)
    assert res["p"] == pytest.approx(2 * st.norm.sf(abs(zval)), abs=1e-10)
    assert res["ci"][0] < res["difference"] < res["ci"][1]


def test_delong_perfect_separation_and_one_class():
    y = np.array([0, 0, 0, 1, 1, 1])
    auc, low, high = stats.auc_ci_delong(y, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    assert (auc, low, high) == (1.0, 1.0, 1.0)             # variance 0: a degenerate interval
    assert stats.auc_ci_delong([1, 1, 1], [0.2, 0.5, 0.9]) == (None, None, None)
    assert stats.auc_ci_bootstrap([0, 0], [0.2, 0.5]) == (None, None, None)
    with pytest.raises(ValueError, match="at least 2 positives"):
        stats.delong_roc_variance([0, 0, 1], [0.1, 0.2, 0.3])


def test_bootstrap_ci_close_to_delong():
    rng = np.random.default_rng(3)
    n = 300
    y = (rng.random(n) < 0.5).astype(int)
    p = 1 / (1 + np.exp(-(1.2 * (2 * y - 1) + rng.normal(0, 1.3, n))))
    auc, dlow, dhigh = stats.auc_ci_delong(y, p)
    bauc, blow, bhigh = stats.auc_ci_bootstrap(y, p, n_bootstrap=2000, seed=11)
    assert bauc == pytest.approx(auc, abs=1e-12)
    assert 0.7 < auc < 0.95
    assert blow == pytest.approx(dlow, abs=0.02) and bhigh == pytest.approx(dhigh, abs=0.02)
    assert blow < auc < bhigh
    # seeded: the same seed gives the same interval, another seed a (slightly) different one
    assert stats.auc_ci_bootstrap(y, p, n_bootstrap=500, seed=5) == \
        stats.auc_ci_bootstrap(y, p, n_bootstrap=500, seed=5)
    assert stats.auc_ci_bootstrap(y, p, n_bootstrap=500, seed=5) != \
        stats.auc_ci_bootstrap(y, p, n_bootstrap=500, seed=6)
    # the unstratified bootstrap agrees as well
    _, ulow, uhigh = stats.auc_ci_bootstrap(y, p, n_bootstrap=2000, seed=11, stratified=False)
    assert ulow == pytest.approx(dlow, abs=0.025) and uhigh == pytest.approx(dhigh, abs=0.025)


# ----------------------------------------------------------------------------- thresholds
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_threshold_metrics_match_sklearn(threshold):
    rng = np.random.default_rng(int(threshold * 10))
    y = rng.integers(0, 2, 150)
    p = np.clip(0.3 * y + rng.random(150) * 0.7, 0, 1)
    p[:5] = threshold                                       # exactly at the threshold: positive
    pred = (p >= threshold).astype(int)
    m = stats.threshold_metrics(y, p, threshold)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert m["confusion"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(f1_score(y, pred))


def test_threshold_metrics_one_class_undefined():
    m = stats.threshold_metrics([1, 1, 1, 1], [0.9, 0.2, 0.85, 0.7], 0.8)
    assert m["specificity"] is None
    assert m["sensitivity"] == 0.5 and m["accuracy"] == 0.5
    assert m["confusion"] == {"tn": 0, "fp": 0, "fn": 2, "tp": 2}


def test_youden_threshold_by_exhaustive_search():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 80)
    p = np.round(0.35 * y + 0.65 * rng.random(80), 2)
    res = stats.youden_threshold(y, p)
    # exhaustive: every cut between two distinct scores, J with scikit-learn's recall
    best = -1.0
    for t in np.unique(p)[1:]:
        pred = (p >= t).astype(int)
        best = max(best, recall_score(y, pred) + recall_score(y, pred, pos_label=0) - 1)
    assert res["j"] == pytest.approx(best, abs=1e-12)
    pred = (p >= res["threshold"]).astype(int)
    assert res["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert res["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    # the threshold lies strictly between two observed scores
    assert res["threshold"] not in set(p)
    assert stats.youden_threshold([1, 1], [0.2, 0.3]) is None


def test_youden_perfect_split():
    res = stats.youden_threshold([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.9])
    assert res["threshold"] == pytest.approx(0.45) and res["j"] == 1.0


# ----------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_calibration_curve_matches_sklearn(strategy):
    rng = np.random.default_rng(9)
    p = rng.random(200) ** 1.5
    y = (rng.random(200) < p).astype(int)
    cal = stats.calibration_curve(y, p, n_bins=10, strategy=strategy)
    frac, mean = sk_calibration_curve(y, p, n_bins=10, strategy=strategy)
    np.testing.assert_allclose(cal["bin_fraction_positive"], frac, atol=1e-12)
    np.testing.assert_allclose(cal["bin_mean_predicted"], mean, atol=1e-12)
    assert sum(cal["bin_count"]) == 200
    if strategy == "quantile":
        assert set(cal["bin_count"]) <= {19, 20, 21}


# ----------------------------------------------------------------------------- Hosmer-Lemeshow
def test_hosmer_lemeshow_hand_computed():
    # 12 patients, 4 groups of 3 by increasing risk (the quartile cut points fall between groups)
    p = np.array([0.05, 0.10, 0.15, 0.30, 0.35, 0.40, 0.55, 0.60, 0.65, 0.80, 0.85, 0.90])
    y = np.array([0, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1, 1])
    # observed / expected positives per group, by hand:
    # g1: O=1, E=0.30   g2: O=1, E=1.05   g3: O=2, E=1.80   g4: O=3, E=2.55
    hand = 0.0
    for o1, e1, size in [(1, 0.30, 3), (1, 1.05, 3), (2, 1.80, 3), (3, 2.55, 3)]:
        o0, e0 = size - o1, size - e1
        hand += (o1 - e1) ** 2 / e1 + (o0 - e0) ** 2 / e0
    res = stats.hosmer_lemeshow(y, p, g=4)
    assert res["groups"] == 4 and res["df"] == 2
    assert [row["n"] for row in res["table"]] == [3, 3, 3, 3]
    assert [row["observed"] for row in res["table"]] == [1, 1, 2, 3]
    np.testing.assert_allclose([row["expected"] for row in res["table"]],
                               [0.30, 1.05, 1.80, 2.55], atol=1e-12)
    assert res["statistic"] == pytest.approx(hand, abs=1e-12)
    assert res["p"] == pytest.approx(st.chi2.sf(hand, 2), abs=1e-12)


def test_hosmer_lemeshow_deciles_equivalent_form_and_ties():
    rng = np.random.default_rng(2)
    p = np.round(rng.random(250), 3)
    y = (rng.random(250) < p).astype(int)
    res = stats.hosmer_lemeshow(y, p)
    # the other textbook form: sum (O - n pbar)^2 / (n pbar (1 - pbar)) over the decile groups
    edges = np.quantile(p, np.linspace(0, 1, 11))
    ref = 0.0
    for k in range(10):
        lo, hi = edges[k], edges[k + 1]
        sel = (p <= hi) & ((p > lo) if k else (p >= lo))
        nk, o, pbar = sel.sum(), y[sel].sum(), p[sel].mean()
        ref += (o - nk * pbar) ** 2 / (nk * pbar * (1 - pbar))
    assert res["groups"] == 10 and res["df"] == 8
    assert res["statistic"] == pytest.approx(ref, rel=1e-10)
    # a well-calibrated model (y drawn from p) is not rejected
    assert res["p"] > 0.01
    # massive ties: 3 distinct probabilities -> 3 groups, df 1; 2 -> undefined
    ties = stats.hosmer_lemeshow([0, 1, 0, 1, 1, 1], [0.2, 0.2, 0.5, 0.5, 0.9, 0.9])
    assert ties["groups"] == 3 and ties["df"] == 1 and ties["statistic"] is not None
    assert stats.hosmer_lemeshow([0, 1, 1, 1], [0.2, 0.2, 0.9, 0.9])["statistic"] is None


def test_hosmer_lemeshow_detects_miscalibration():
    rng = np.random.default_rng(4)
    p = rng.random(400)
    y = (rng.random(400) < p).astype(int)
    p_bad = np.clip(p * 0.5 + 0.45, 0, 1)                   # squeezed towards 0.7: miscalibrated
    assert stats.hosmer_lemeshow(y, p_bad)["p"] < 1e-6
