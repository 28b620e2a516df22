"""Pure statistics of the diagnostic evaluation: AUC confidence intervals, threshold metrics,
the Youden threshold, calibration and the Hosmer-Lemeshow test.

Every function takes plain arrays (``y`` in {0, 1}, ``p`` a score or probability) and returns
plain Python numbers, so results go straight into JSON. Where a quantity is undefined (one class
only, no patients) the function returns ``None`` for it instead of raising or returning NaN.

References
----------
- DeLong ER, DeLong DM, Clarke-Pearson DL (1988). Comparing the areas under two or more correlated
  receiver operating characteristic curves: a nonparametric approach. Biometrics 44:837-845.
- Sun X, Xu W (2014). Fast implementation of DeLong's algorithm for comparing the areas under
  correlated receiver operating characteristic curves. IEEE Signal Processing Letters 21:1389-1393.
- Hosmer DW, Lemeshow S (1980). Goodness of fit tests for the multiple logistic regression model.
  Communications in Statistics 9:1043-1069. Groups are the deciles of risk, cut at the quantiles
  of the predicted probability (as R's ResourceSelection::hoslem.test), df = groups - 2.
- Wilson EB (1927). Probable inference, the law of succession, and statistical inference. JASA
  22:209-212; Newcombe RG (1998). Two-sided confidence intervals for the single proportion:
  comparison of seven methods. Stat Med 17:857-872 (method 3, the score interval).
- Brier GW (1950). Verification of forecasts expressed in terms of probability. Monthly Weather
  Review 78:1-3.
- Cox DR (1958). Two further applications of a model for binary regression. Biometrika 45:562-565;
  Steyerberg EW (2019). Clinical Prediction Models, 2nd ed., ch. 15: the calibration slope is the
  coefficient of logit(p) in a logistic regression of y on logit(p); the calibration intercept
  (calibration-in-the-large) is the intercept of a logistic regression of y with logit(p) as an
  offset (slope fixed at 1).
- Vickers AJ, Elkin EB (2006). Decision curve analysis. Med Decis Making 26:565-574: net benefit
  NB(pt) = TP/n - FP/n * pt/(1 - pt), against treating all (and none, NB = 0).
- Cochran WG (1954). The combination of estimates from different experiments. Biometrics
  10:101-129; Higgins JPT, Thompson SG (2002). Quantifying heterogeneity in a meta-analysis. Stat
  Med 21:1539-1558 (I^2 = (Q - df) / Q, floored at 0); DerSimonian R, Laird N (1986).
  Meta-analysis in clinical trials. Control Clin Trials 7:177-188 (tau^2 by moments).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as _st

__all__ = [
    "midrank", "delong_covariance", "delong_roc_variance", "auc_normal_ci", "auc_ci_delong",
    "delong_roc_test",
    "auc_ci_bootstrap", "threshold_metrics", "youden_threshold", "calibration_curve",
    "hosmer_lemeshow", "class_counts", "wilson_interval", "rate_intervals", "brier_score",
    "logit", "calibration_slope", "calibration_intercept", "net_benefit", "decision_curve",
    "DECISION_THRESHOLDS", "inverse_variance_meta",
]

CALIBRATION_CLIP = 1e-6
"""Probabilities are clipped to [CALIBRATION_CLIP, 1 - CALIBRATION_CLIP] before the logit (a
float32 sigmoid saturates at exactly 0 or 1), so logit(p) stays within about +/- 13.8."""

DECISION_THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(1, 100))
"""Threshold probabilities of the decision curve: 0.01, 0.02, ..., 0.99."""


def _as_arrays(y, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=float).ravel()
    p = np.asarray(p, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y and p differ in length ({y.size} vs {p.size})")
    if y.size and not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y must hold only 0 and 1")
    if not np.isfinite(p).all():
        raise ValueError("p holds NaN or infinite values")
    return y.astype(np.int8), p


def class_counts(y) -> tuple[int, int]:
    """(number of positives, number of negatives)."""
    y = np.asarray(y).ravel()
    m = int((y == 1).sum())
    return m, int(y.size - m)


def midrank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x`` along the last axis, ties sharing their mean rank."""
    return _st.rankdata(np.asarray(x, dtype=float), method="average", axis=-1)


def delong_covariance(y, scores) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of one or more scores on the same patients and their DeLong covariance matrix.

    ``scores`` is (n,) or (k, n). Uses the O(n log n) midrank algorithm of Sun & Xu (2014), which
    gives exactly DeLong's structural-component estimate (unbiased, ddof=1).
    Returns (aucs (k,), covariance (k, k)); raises ValueError unless both classes have at least
    two patients (the structural components' variance needs two of each).
    """
    y = np.asarray(y, dtype=float).ravel()
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    if scores.shape[1] != y.size:
        raise ValueError(f"scores have {scores.shape[1]} columns for {y.size} labels")
    pos = y == 1
    m, n = int(pos.sum()), int((~pos).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least 2 positives and 2 negatives (got {m} and {n})")
    x, z = scores[:, pos], scores[:, ~pos]           # positives X (k, m), negatives Y (k, n)
    tx, tz = midrank(x), midrank(z)
    t_all = midrank(np.concatenate([x, z], axis=1))
    aucs = t_all[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v10 = (t_all[:, :m] - tx) / n                    # structural components of the positives
    v01 = 1.0 - (t_all[:, m:] - tz) / m              # ... and of the negatives
    s10 = np.atleast_2d(np.cov(v10, ddof=1))
    s01 = np.atleast_2d(np.cov(v01, ddof=1))
    return aucs, s10 / m + s01 / n


def delong_roc_variance(y, p) -> tuple[float, float]:
    """(AUC, DeLong variance of the AUC) for one score."""
    y, p = _as_arrays(y, p)
    aucs, cov = delong_covariance(y, p)
    return float(aucs[0]), float(cov[0, 0])


def _normal_ci(estimate: float, variance: float, level: float) -> tuple[float, float]:
    half = float(_st.norm.ppf(0.5 + level / 2.0)) * math.sqrt(max(variance, 0.0))
    return max(0.0, estimate - half), min(1.0, estimate + half)


def auc_normal_ci(auc: float, variance: float, level: float = 0.95) -> tuple[float, float]:
    """AUC +/- z * sqrt(variance), clipped to [0, 1] (the interval of auc_ci_delong)."""
    return _normal_ci(auc, variance, level)


def auc_ci_delong(y, p, level: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """(AUC, low, high): the AUC with DeLong's normal-approximation CI, clipped to [0, 1] (as pROC).

    With one class only every value is None; with a single patient in one class the AUC is
    returned and the CI is None (DeLong's variance needs two of each).
    """
    y, p = _as_arrays(y, p)
    m, n = class_counts(y)
    if m == 0 or n == 0:
        return None, None, None
    if m < 2 or n < 2:
        return _auc(y, p), None, None
    auc, var = delong_roc_variance(y, p)
    low, high = _normal_ci(auc, var, level)
    return auc, low, high


def delong_roc_test(y, p1, p2, level: float = 0.95) -> dict:
    """Paired DeLong test of two scores on the same patients: AUC1 - AUC2, its CI and the
    two-sided p."""
    y, p1 = _as_arrays(y, p1)
    _, p2 = _as_arrays(y, p2)
    aucs, cov = delong_covariance(y, np.vstack([p1, p2]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    if var <= 0:
        z, pval = (0.0, 1.0) if diff == 0 else (math.inf, 0.0)
    else:
        z = diff / math.sqrt(var)
        pval = float(2.0 * _st.norm.sf(abs(z)))
    half = float(_st.norm.ppf(0.5 + level / 2.0)) * math.sqrt(max(var, 0.0))
    return {"auc1": float(aucs[0]), "auc2": float(aucs[1]), "difference": diff,
            "ci": [diff - half, diff + half], "z": float(z), "p": pval}


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count one half)."""
    m, n = class_counts(y)
    ranks = midrank(p)
    return float((ranks[y == 1].sum() - m * (m + 1) / 2.0) / (m * n))


def auc_ci_bootstrap(y, p, n_bootstrap: int = 2000, level: float = 0.95, seed: int = 0,
                     stratified: bool = True) -> tuple[float | None, float | None, float | None]:
    """(AUC, low, high) with a percentile bootstrap CI (seeded; stratified by class like pROC).

    Unstratified resamples that hold one class only are drawn again.
    """
    y, p = _as_arrays(y, p)
    m, n = class_counts(y)
    if m == 0 or n == 0:
        return None, None, None
    auc = _auc(y, p)
    rng = np.random.default_rng(seed)
    xs, zs = p[y == 1], p[y == 0]
    aucs = np.empty(n_bootstrap)
    chunk = max(1, int(2_000_000 // (m + n)))         # resamples per vectorised block
    done = 0
    while done < n_bootstrap:
        b = min(chunk, n_bootstrap - done)
        if stratified:
            xb = xs[rng.integers(0, m, size=(b, m))]
            zb = zs[rng.integers(0, n, size=(b, n))]
            mb = np.full(b, m)
            scores = np.concatenate([xb, zb], axis=1)
            labels = np.concatenate([np.ones((b, m)), np.zeros((b, n))], axis=1)
        else:
            idx = rng.integers(0, m + n, size=(b, m + n))
            scores, labels = p[idx], y[idx].astype(float)
            mb = labels.sum(axis=1)
            ok = (mb > 0) & (mb < m + n)
            scores, labels, mb = scores[ok], labels[ok], mb[ok]
            b = int(ok.sum())
            if b == 0:
                continue
        nb = (m + n) - mb
        ranks = midrank(scores)
        aucs[done:done + b] = ((ranks * labels).sum(axis=1) - mb * (mb + 1) / 2.0) / (mb * nb)
        done += b
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(aucs, [alpha, 1.0 - alpha])
    return auc, float(low), float(high)


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def threshold_metrics(y, p, threshold: float) -> dict:
    """Accuracy, sensitivity, specificity, precision, F1 and the confusion matrix at a threshold.

    A patient is called positive when ``p >= threshold``. Undefined ratios (no positives for the
    sensitivity, no negatives for the specificity, nothing positive at all for F1) are None.
    """
    y, p = _as_arrays(y, p)
    pred = p >= threshold
    pos = y == 1
    tp = int((pred & pos).sum())
    fp = int((pred & ~pos).sum())
    fn = int((~pred & pos).sum())
    tn = int((~pred & ~pos).sum())
    return {
        "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, y.size),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


def youden_threshold(y, p) -> dict | None:
    """The threshold that maximises Youden's J = sensitivity + specificity - 1.

    Candidates are the midpoints between consecutive distinct scores (as pROC), used with the rule
    ``p >= threshold``; on ties in J the lowest candidate wins. None with one class or one score.
    """
    y, p = _as_arrays(y, p)
    m, n = class_counts(y)
    values = np.unique(p)
    if m == 0 or n == 0 or values.size < 2:
        return None
    cuts = (values[:-1] + values[1:]) / 2.0
    # positives / negatives at or above each cut, from the sorted scores
    tp = m - np.searchsorted(np.sort(p[y == 1]), cuts, side="left")
    fp = n - np.searchsorted(np.sort(p[y == 0]), cuts, side="left")
    j = tp / m + (n - fp) / n - 1.0
    best = int(np.argmax(j))
    return {"threshold": float(cuts[best]), "j": float(j[best]),
            "sensitivity": float(tp[best] / m), "specificity": float((n - fp[best]) / n)}


def calibration_curve(y, p, n_bins: int = 10, strategy: str = "quantile") -> dict:
    """Mean predicted probability, observed fraction of positives and count per non-empty bin.

    ``strategy`` "uniform" cuts [0, 1] into equal widths (as scikit-learn's calibration_curve);
    "quantile" cuts at the quantiles of ``p`` so the bins hold about equal numbers of patients.
    """
    y, p = _as_arrays(y, p)
    if strategy == "quantile":
        edges = (
            np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1)) if p.size else np.array([0.0, 1.0])
        )
    elif strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    else:
        raise ValueError(f"unknown calibration strategy {strategy!r} (quantile or uniform)")
    # right-closed bins as scikit-learn: bin i holds edges[i] < p <= edges[i+1], the first closed
    which = np.searchsorted(edges[1:-1], p, side="left")
    out = {"bin_mean_predicted": [], "bin_fraction_positive": [], "bin_count": [],
           "strategy": strategy, "n_bins": int(n_bins)}
    for b in range(len(edges) - 1):
        sel = which == b
        if sel.any():
            out["bin_mean_predicted"].append(float(p[sel].mean()))
            out["bin_fraction_positive"].append(float(y[sel].mean()))
            out["bin_count"].append(int(sel.sum()))
    return out


def hosmer_lemeshow(y, p, g: int = 10) -> dict:
    """Hosmer-Lemeshow goodness-of-fit over ``g`` groups of risk (deciles by default).

    Groups are cut at the quantiles of ``p`` (R type-7 quantiles, right-closed intervals, the
    lowest included), so tied probabilities always share a group; duplicate cut points merge
    groups and the df is (groups formed - 2). The statistic sums (O - E)^2 / E over the observed
    and expected positives and negatives of every group. Returns statistic, p, df, groups and the
    per-group table; statistic and p are None with fewer than 3 groups.
    """
    y, p = _as_arrays(y, p)
    if p.size == 0:
        return {"statistic": None, "p": None, "df": None, "groups": 0, "table": []}
    edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, g + 1)))
    group = (
        np.searchsorted(edges[1:-1], p, side="left") if edges.size > 2 else np.zeros(p.size, int)
    )
    table = []
    stat = 0.0
    for k in np.unique(group):
        sel = group == k
        n_k = int(sel.sum())
        obs1, exp1 = float(y[sel].sum()), float(p[sel].sum())
        obs0, exp0 = n_k - obs1, n_k - exp1
        for o, e in ((obs1, exp1), (obs0, exp0)):
            if e > 0:
                stat += (o - e) ** 2 / e
            elif o > 0:
                stat = math.inf
        table.append({"n": n_k, "observed": obs1, "expected": exp1,
                      "p_low": float(p[sel].min()), "p_high": float(p[sel].max())})
    groups = len(table)
    df = groups - 2
    if df < 1:
        return {"statistic": None, "p": None, "df": df, "groups": groups, "table": table}
    return {"statistic": float(stat), "p": float(_st.chi2.sf(stat, df)), "df": df,
            "groups": groups, "table": table}



# --------------------------------------------------------------------------- intervals of rates
def _z(level: float) -> float:
    return float(_st.norm.ppf(0.5 + level / 2.0))


def wilson_interval(successes: int, trials: int, level: float = 0.95
                    ) -> tuple[float, float] | None:
    """Wilson's score interval (low, high) for ``successes`` out of ``trials``; None when
    ``trials`` is 0. It stays inside [0, 1] and is never of zero width (Newcombe 1998)."""
    if trials <= 0:
        return None
    if not 0 <= successes <= trials:
        raise ValueError(f"{successes} successes out of {trials} trials")
    z2 = _z(level) ** 2
    centre = (successes + z2 / 2.0) / (trials + z2)
    half = math.sqrt(z2) / (trials + z2) * math.sqrt(
        successes * (trials - successes) / trials + z2 / 4.0)
    low = 0.0 if successes == 0 else max(0.0, centre - half)     # exact at the ends: the
    high = 1.0 if successes == trials else min(1.0, centre + half)  # rounding of centre - half
    return low, high


RATE_COUNTS = {
    "accuracy": (("tp", "tn"), ("tp", "tn", "fp", "fn")),
    "sensitivity": (("tp",), ("tp", "fn")),
    "specificity": (("tn",), ("tn", "fp")),
    "ppv": (("tp",), ("tp", "fp")),
    "npv": (("tn",), ("tn", "fn")),
}
"""Each threshold rate as (confusion cells of its numerator, of its denominator)."""


def rate_intervals(confusion: dict, level: float = 0.95) -> dict[str, list[float] | None]:
    """The Wilson interval [low, high] of accuracy, sensitivity, specificity, PPV and NPV from a
    confusion matrix {tn, fp, fn, tp}; None where the rate is undefined (a zero denominator)."""
    out: dict[str, list[float] | None] = {}
    for rate, (num, den) in RATE_COUNTS.items():
        ci = wilson_interval(sum(confusion[k] for k in num), sum(confusion[k] for k in den),
                             level)
        out[rate] = None if ci is None else [ci[0], ci[1]]
    return out


# --------------------------------------------------------------------------- calibration
def brier_score(y, p) -> float | None:
    """Mean squared difference between the probability and the outcome; None with no patients."""
    y, p = _as_arrays(y, p)
    return float(np.mean((p - y) ** 2)) if y.size else None


def logit(p, clip: float = CALIBRATION_CLIP) -> np.ndarray:
    """log(p / (1 - p)) of ``p`` clipped to [clip, 1 - clip]."""
    p = np.clip(np.asarray(p, dtype=float), clip, 1.0 - clip)
    return np.log(p) - np.log1p(-p)


def _log_likelihood(y: np.ndarray, eta: np.ndarray) -> float:
    return float(np.sum(y * eta - np.logaddexp(0.0, eta)))


def _logistic_mle(y: np.ndarray, design: np.ndarray, offset: np.ndarray,
                  max_iter: int = 100, tol: float = 1e-10) -> np.ndarray | None:
    """Unpenalised logistic regression by Newton-Raphson with step halving: the coefficients of
    ``design`` (n, k) given an ``offset``; None if it does not converge."""
    beta = np.zeros(design.shape[1])
    ll = _log_likelihood(y, offset)
    for _ in range(max_iter):
        eta = offset + design @ beta
        mu = 1.0 / (1.0 + np.exp(-eta))
        hessian = design.T @ (design * (mu * (1.0 - mu))[:, None])
        try:
            step = np.linalg.solve(hessian, design.T @ (y - mu))
        except np.linalg.LinAlgError:
            return None
        for _ in range(40):                              # halve until the likelihood rises
            new_ll = _log_likelihood(y, offset + design @ (beta + step))
            if new_ll >= ll - 1e-12:
                break
            step = step / 2.0
        beta, ll = beta + step, new_ll
        if np.max(np.abs(step)) < tol:
            return beta
    return None


def calibration_slope(y, p, clip: float = CALIBRATION_CLIP) -> float | None:
    """The coefficient of logit(p) in a logistic regression of y on logit(p) (with an
    intercept): 1 when the predictions are well spread, < 1 when too extreme. None with one
    class or when logit(p) separates the classes (the estimate is then infinite)."""
    y, p = _as_arrays(y, p)
    x = logit(p, clip)
    pos = y == 1
    if not pos.any() or pos.all():
        return None
    if x[pos].min() >= x[~pos].max() or x[pos].max() <= x[~pos].min():
        return None                                      # (quasi-)complete separation
    beta = _logistic_mle(y.astype(float), np.column_stack([np.ones_like(x), x]),
                         np.zeros_like(x))
    return None if beta is None else float(beta[1])


def calibration_intercept(y, p, clip: float = CALIBRATION_CLIP) -> float | None:
    """Calibration-in-the-large: the intercept of a logistic regression of y with logit(p) as an
    offset (the slope fixed at 1); 0 when the mean risk is right, > 0 when the predictions are too
    low. None with one class (the estimate is then infinite)."""
    y, p = _as_arrays(y, p)
    if y.size == 0 or y.min() == y.max():
        return None
    x = logit(p, clip)
    beta = _logistic_mle(y.astype(float), np.ones((y.size, 1)), x)
    return None if beta is None else float(beta[0])


# --------------------------------------------------------------------------- decision curve
def net_benefit(y, p, threshold: float) -> dict:
    """Net benefit at threshold probability ``threshold`` of treating the patients with
    p >= threshold, and of treating everybody: TP/n - FP/n * pt / (1 - pt)."""
    y, p = _as_arrays(y, p)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold probability {threshold} is not in (0, 1)")
    n = y.size
    if n == 0:
        return {"threshold": float(threshold), "model": None, "treat_all": None,
                "treat_none": 0.0}
    odds = threshold / (1.0 - threshold)
    treated = p >= threshold
    tp = int((treated & (y == 1)).sum())
    fp = int((treated & (y == 0)).sum())
    prevalence = float(y.mean())
    return {"threshold": float(threshold), "model": tp / n - fp / n * odds,
            "treat_all": prevalence - (1.0 - prevalence) * odds, "treat_none": 0.0}


def decision_curve(y, p, thresholds=DECISION_THRESHOLDS) -> dict:
    """Net benefit of the model, of treating all and of treating none over threshold
    probabilities (lists in the order of ``thresholds``)."""
    points = [net_benefit(y, p, t) for t in thresholds]
    return {"thresholds": [pt["threshold"] for pt in points],
            "model": [pt["model"] for pt in points],
            "treat_all": [pt["treat_all"] for pt in points],
            "treat_none": [pt["treat_none"] for pt in points]}


# --------------------------------------------------------------------------- meta-analysis
def _pooled(estimates: np.ndarray, weights: np.ndarray, level: float) -> dict:
    estimate = float(np.sum(weights * estimates) / np.sum(weights))
    se = float(1.0 / math.sqrt(np.sum(weights)))
    half = _z(level) * se
    return {"estimate": estimate, "se": se, "ci": [estimate - half, estimate + half],
            "weights": (weights / weights.sum()).tolist()}


def inverse_variance_meta(estimates, variances, level: float = 0.95) -> dict:
    """Fixed-effect (inverse-variance) and DerSimonian-Laird random-effects pooling of k
    estimates with their within-study variances, with Cochran's Q on k - 1 df, its p, I^2 and
    tau^2. I^2 and tau^2 are None with fewer than 2 estimates; everything is None with none.
    Variances must be positive."""
    y = np.asarray(estimates, dtype=float).ravel()
    v = np.asarray(variances, dtype=float).ravel()
    if y.shape != v.shape:
        raise ValueError(f"{y.size} estimates but {v.size} variances")
    if not (np.isfinite(y).all() and np.isfinite(v).all() and (v > 0).all()):
        raise ValueError("estimates must be finite and variances positive")
    k = int(y.size)
    empty = {"estimate": None, "se": None, "ci": None, "weights": []}
    if k == 0:
        return {"k": 0, "fixed": empty, "random": empty, "q": None, "df": None, "q_p": None,
                "i_squared": None, "tau_squared": None}
    w = 1.0 / v
    fixed = _pooled(y, w, level)
    if k == 1:
        return {"k": 1, "fixed": fixed, "random": dict(fixed), "q": None, "df": 0,
                "q_p": None, "i_squared": None, "tau_squared": None}
    df = k - 1
    q = float(np.sum(w * (y - fixed["estimate"]) ** 2))
    c = float(w.sum() - np.sum(w ** 2) / w.sum())
    tau2 = max(0.0, (q - df) / c)
    i2 = max(0.0, (q - df) / q) if q > 0 else 0.0
    return {"k": k, "fixed": fixed, "random": _pooled(y, 1.0 / (v + tau2), level),
            "q": q, "df": df, "q_p": float(_st.chi2.sf(q, df)), "i_squared": i2,
            "tau_squared": tau2}
