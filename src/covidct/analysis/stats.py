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
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as _st

__all__ = [
    "midrank", "delong_covariance", "delong_roc_variance", "auc_ci_delong", "delong_roc_test",
    "auc_ci_bootstrap", "threshold_metrics", "youden_threshold", "calibration_curve",
    "hosmer_lemeshow", "class_counts",
]


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
