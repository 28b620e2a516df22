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


# ----------------------------------------------------------------------------- Wilson interval
# Newcombe RG (1998) Stat Med 17:857-872, Table I, method 3 (score interval without continuity
# correction), its worked examples, to the 4 decimals printed there.
NEWCOMBE_TABLE_I = [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605),
                    (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)]


@pytest.mark.parametrize("successes, trials, low, high", NEWCOMBE_TABLE_I)
def test_wilson_interval_reproduces_newcombe_1998_table_1(successes, trials, low, high):
    lo, hi = stats.wilson_interval(successes, trials)
    assert round(lo, 4) == low and round(hi, 4) == high


def test_wilson_interval_edges_and_the_confusion_rates():
    assert stats.wilson_interval(0, 0) is None
    lo, hi = stats.wilson_interval(20, 20)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.1611, abs=5e-5)   # mirror of 0/20
    assert [stats.wilson_interval(0, n)[0] for n in (3, 7, 11)] == [0.0] * 3   # exactly 0
    with pytest.raises(ValueError):
        stats.wilson_interval(5, 4)
    # every rate with its numerator and denominator out of the confusion matrix, by name
    confusion = {"tp": 81, "fn": 182, "tn": 133, "fp": 15}
    ci = stats.rate_intervals(confusion)
    assert ci["sensitivity"] == pytest.approx(list(stats.wilson_interval(81, 263)))
    assert ci["specificity"] == pytest.approx(list(stats.wilson_interval(133, 148)))
    assert ci["ppv"] == pytest.approx(list(stats.wilson_interval(81, 96)))
    assert ci["npv"] == pytest.approx(list(stats.wilson_interval(133, 315)))
    assert ci["accuracy"] == pytest.approx(list(stats.wilson_interval(214, 411)))
    assert [round(v, 4) for v in ci["sensitivity"]] == [0.2553, 0.3662]
    none_called = stats.rate_intervals({"tp": 0, "fp": 0, "fn": 3, "tn": 4})
    assert none_called["ppv"] is None and none_called["npv"] is not None


# ----------------------------------------------------------------------------- Brier, recalibration
def newton_intercept_with_offset(y, offset, iterations=50):
    """The maximum-likelihood intercept of logit P(y=1) = a + offset, by scalar Newton-Raphson:
    a <- a + sum(y - mu) / sum(mu (1 - mu))."""
    a = 0.0
    for _ in range(iterations):
        mu = 1.0 / (1.0 + np.exp(-(a + offset)))
        a += float(np.sum(y - mu) / np.sum(mu * (1.0 - mu)))
    return a


def simulated(n, seed, scale=1.0, shift=0.0):
    """Outcomes drawn from true risks expit(eta); the model predicts expit(scale*eta + shift)."""
    rng = np.random.default_rng(seed)
    eta = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-eta))).astype(int)
    return y, 1.0 / (1.0 + np.exp(-(scale * eta + shift)))


def test_brier_score_matches_sklearn():
    from sklearn.metrics import brier_score_loss

    y, p = simulated(300, 1)
    assert stats.brier_score(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-15)
    assert stats.brier_score([1, 0], [1.0, 0.0]) == 0.0
    assert stats.brier_score([1, 0, 1, 0], [0.5] * 4) == 0.25
    assert stats.brier_score([], []) is None


def test_calibration_slope_matches_unpenalised_sklearn():
    from sklearn.linear_model import LogisticRegression

    y, p = simulated(500, 2, scale=1.4, shift=0.3)
    x = np.log(p / (1 - p))
    sk = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(x[:, None], y)
    assert stats.calibration_slope(y, p) == pytest.approx(float(sk.coef_[0, 0]), abs=1e-5)


def test_calibration_intercept_matches_newton_and_the_score_equation():
    from scipy.optimize import brentq

    y, p = simulated(500, 3, shift=-0.7)
    offset = np.log(p / (1 - p))
    newton = newton_intercept_with_offset(y, offset)
    # the MLE solves the score equation sum(y - expit(a + offset)) = 0 (a root finder)
    root = brentq(lambda a: np.sum(y - 1 / (1 + np.exp(-(a + offset)))), -10, 10, xtol=1e-14)
    got = stats.calibration_intercept(y, p)
    assert got == pytest.approx(newton, abs=1e-9) and got == pytest.approx(root, abs=1e-9)


def test_recalibration_recovers_known_truth_on_simulated_data():
    n = 40_000
    y, p = simulated(n, 4)                                   # perfectly calibrated
    assert stats.calibration_slope(y, p) == pytest.approx(1.0, abs=0.04)
    assert stats.calibration_intercept(y, p) == pytest.approx(0.0, abs=0.04)
    y, p = simulated(n, 5, scale=2.0)                        # logits doubled: too extreme
    assert stats.calibration_slope(y, p) == pytest.approx(0.5, abs=0.02)
    assert stats.calibration_intercept(y, p) == pytest.approx(0.0, abs=0.04)
    y, p = simulated(n, 6, shift=-1.0)                       # risks too low by 1 logit
    assert stats.calibration_intercept(y, p) == pytest.approx(1.0, abs=0.05)
    assert stats.calibration_slope(y, p) == pytest.approx(1.0, abs=0.04)


def test_recalibration_undefined_without_two_overlapping_classes():
    assert stats.calibration_slope([1, 1, 1], [0.2, 0.5, 0.9]) is None
    assert stats.calibration_intercept([1, 1, 1], [0.2, 0.5, 0.9]) is None
    assert stats.calibration_intercept([], []) is None
    # perfectly separated: the slope is infinite, the intercept (slope fixed at 1) still exists
    y, p = [0, 0, 1, 1], [0.1, 0.3, 0.6, 0.9]
    assert stats.calibration_slope(y, p) is None
    assert stats.calibration_intercept(y, p) == pytest.approx(
        newton_intercept_with_offset(np.array(y), np.log(np.array(p) / (1 - np.array(p)))))
    # probabilities of exactly 0 and 1 are clipped, never an infinite logit
    y, p = [0, 1, 0, 1, 1, 0], [0.0, 1.0, 0.4, 0.3, 0.8, 0.6]
    assert math.isfinite(stats.calibration_slope(y, p))
    assert math.isfinite(stats.calibration_intercept(y, p))


# ----------------------------------------------------------------------------- decision curve
def test_net_benefit_hand_worked():
    # 10 patients, 4 with COVID-19 (prevalence 0.4)
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    p = [0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.1, 0.05]
    # pt = 0.5, odds 1: treated p >= 0.5 -> 0.9, 0.8, 0.6 (TP 3) and 0.7 (FP 1)
    #   model 3/10 - 1/10 * 1 = 0.2; treat all 4/10 - 6/10 * 1 = -0.2
    nb = stats.net_benefit(y, p, 0.5)
    assert nb["model"] == pytest.approx(0.2) and nb["treat_all"] == pytest.approx(-0.2)
    assert nb["treat_none"] == 0.0
    # pt = 0.25, odds 1/3: treated -> 0.9, 0.8, 0.6, 0.3 (TP 4) and 0.7, 0.4 (FP 2)
    #   model 4/10 - 2/10 / 3 = 0.33333; treat all 4/10 - 6/10 / 3 = 0.2
    nb = stats.net_benefit(y, p, 0.25)
    assert nb["model"] == pytest.approx(1 / 3) and nb["treat_all"] == pytest.approx(0.2)
    # pt = 0.8, odds 4: treated -> 0.9, 0.8 (TP 2, FP 0): model 0.2; treat all 0.4 - 2.4 = -2.0
    nb = stats.net_benefit(y, p, 0.8)
    assert nb["model"] == pytest.approx(0.2) and nb["treat_all"] == pytest.approx(-2.0)

    curve = stats.decision_curve(y, p, thresholds=(0.25, 0.5, 0.8))
    assert curve["thresholds"] == [0.25, 0.5, 0.8]
    assert curve["model"] == pytest.approx([1 / 3, 0.2, 0.2])
    assert curve["treat_all"] == pytest.approx([0.2, -0.2, -2.0])
    assert curve["treat_none"] == [0.0, 0.0, 0.0]
    full = stats.decision_curve(y, p)
    assert full["thresholds"][0] == 0.01 and full["thresholds"][-1] == 0.99
    assert len(full["thresholds"]) == 99
    # one class only is no error: no COVID-19, treating anybody only costs
    assert stats.net_benefit([0, 0], [0.9, 0.1], 0.5)["model"] == pytest.approx(-0.5)
    assert stats.net_benefit([], [], 0.5)["model"] is None
    with pytest.raises(ValueError):
        stats.net_benefit(y, p, 1.0)


# ----------------------------------------------------------------------------- meta-analysis
# BCG vaccine trials (Colditz et al. 1994, JAMA 271:698; metafor's dat.bcg): TB cases and
# non-cases, vaccinated (tpos, tneg) and not (cpos, cneg). metafor's rma(measure = "RR",
# method = "DL") on them reports Q(df = 12) = 152.2330, I^2 = 92.12%, tau^2 = 0.3088 and the
# pooled log risk ratio -0.7141 (SE 0.1787).
BCG = [(4, 119, 11, 128), (6, 300, 29, 274), (3, 228, 11, 209), (62, 13536, 248, 12619),
       (33, 5036, 47, 5761), (180, 1361, 372, 1079), (8, 2537, 10, 619),
       (505, 87886, 499, 87892), (29, 7470, 45, 7232), (17, 1699, 65, 1600),
       (186, 50448, 141, 27197), (5, 2493, 3, 2338), (27, 16886, 29, 17825)]


def bcg_log_risk_ratios():
    a, b, c, d = (np.array(col, dtype=float) for col in zip(*BCG))
    yi = np.log((a / (a + b)) / (c / (c + d)))
    vi = 1 / a - 1 / (a + b) + 1 / c - 1 / (c + d)
    return yi, vi


def test_meta_analysis_reproduces_metafor_bcg():
    yi, vi = bcg_log_risk_ratios()
    meta = stats.inverse_variance_meta(yi, vi)
    assert meta["k"] == 13 and meta["df"] == 12
    assert meta["q"] == pytest.approx(152.2330, abs=5e-5)
    assert round(100 * meta["i_squared"], 2) == 92.12
    assert round(meta["tau_squared"], 4) == 0.3088
    assert round(meta["random"]["estimate"], 4) == -0.7141
    assert round(meta["random"]["se"], 4) == 0.1787
    assert meta["q_p"] < 1e-20
    assert sum(meta["random"]["weights"]) == pytest.approx(1.0)


def test_meta_analysis_homogeneous_single_and_empty():
    # identical estimates: Q = 0, I^2 = 0, tau^2 = 0, random = fixed = the plain weighted mean
    meta = stats.inverse_variance_meta([0.8, 0.8, 0.8], [0.01, 0.02, 0.04])
    assert meta["q"] == 0.0 and meta["i_squared"] == 0.0 and meta["tau_squared"] == 0.0
    assert meta["random"]["estimate"] == pytest.approx(0.8)
    # Q below its df: I^2 and tau^2 floored at 0; the fixed estimate is sum(w y) / sum(w)
    meta = stats.inverse_variance_meta([0.80, 0.82], [0.01, 0.01])
    assert meta["q"] == pytest.approx(0.02 ** 2 / 0.02) and meta["i_squared"] == 0.0
    assert meta["fixed"]["estimate"] == pytest.approx(0.81)
    assert meta["fixed"]["se"] == pytest.approx(math.sqrt(0.005))
    one = stats.inverse_variance_meta([0.7], [0.01])
    assert one["random"]["estimate"] == 0.7 and one["i_squared"] is None and one["q"] is None
    none = stats.inverse_variance_meta([], [])
    assert none["k"] == 0 and none["random"]["estimate"] is None
    with pytest.raises(ValueError):
        stats.inverse_variance_meta([0.7, 0.9], [0.0, 0.01])
