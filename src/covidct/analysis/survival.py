"""Survival statistics of the prognosis, as pure functions over pandas and numpy data.

lifelines' Cox model (Efron ties, Wald p-values), covariate selection, the cross-validated ridge
penalizer, Kaplan-Meier, log-rank and the C-index. The event is discharge, so the risk score is
the negative linear predictor: high risk = longer hospital stay.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from covidct.analysis.scoring import SurvivalError

log = logging.getLogger(__name__)

METHODS = ("forward", "backward", "stepwise", "aic")


# --------------------------------------------------------------------------- Cox model

def fit_cox(df: pd.DataFrame, duration: str, event: str, covariates: Sequence[str],
            penalizer: float = 0.0):
    """Fit a Cox proportional-hazards model (lifelines, Efron ties) on ``covariates``.

    Returns the fitted :class:`lifelines.CoxPHFitter`. Raises :class:`SurvivalError` with a
    readable message when the model cannot be fitted (no events, no covariates, no convergence).
    """
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    covariates = list(covariates)
    if not covariates:
        raise SurvivalError("a Cox model needs at least one covariate")
    data = df[[duration, event] + covariates].astype(float)
    if data.isna().any().any():
        bad = [c for c in data.columns if data[c].isna().any()]
        raise SurvivalError(f"missing values in {', '.join(bad)}")
    if data[event].sum() < 1:
        raise SurvivalError("no events: a Cox model cannot be fitted")
    cph = CoxPHFitter(penalizer=penalizer)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lifelines' convergence hints; we check below
            cph.fit(data, duration_col=duration, event_col=event)
    except (ConvergenceError, np.linalg.LinAlgError) as err:
        raise SurvivalError(f"the Cox model on {len(covariates)} covariate(s) did not converge "
                            f"({str(err).splitlines()[0]}); try fewer covariates or "
                            f"a small penalizer") from err
    return cph


def null_log_likelihood(durations: Sequence[float], events: Sequence[int]) -> float:
    """Partial log-likelihood of the Cox model with no covariates (Efron ties, as lifelines).

    With every risk score equal to 1, Efron's term for ``d`` tied events among ``n`` at risk is
    ``-sum_{j<d} log(n - j)``.
    """
    t = np.asarray(durations, float)
    e = np.asarray(events, float) > 0
    ll = 0.0
    for time in np.unique(t[e]):
        d = int(np.sum(e & (t == time)))
        n = int(np.sum(t >= time))
        ll -= float(np.sum(np.log(n - np.arange(d))))
    return ll


def information_criterion(df: pd.DataFrame, duration: str, event: str,
                          covariates: Sequence[str], penalty: float = 2.0,
                          penalizer: float = 0.0) -> float:
    """``-2 log partial likelihood + penalty * len(covariates)``; the empty model is allowed."""
    if not covariates:
        return -2.0 * null_log_likelihood(df[duration], df[event])
    cph = fit_cox(df, duration, event, covariates, penalizer)
    return -2.0 * float(cph.log_likelihood_) + penalty * len(covariates)


def _wald_p(df, duration, event, covariates, penalizer) -> pd.Series:
    return fit_cox(df, duration, event, covariates, penalizer).summary["p"]


def stepwise_select(df: pd.DataFrame, duration: str, event: str, candidates: Sequence[str],
                    method: str = "stepwise", p_enter: float = 0.05, p_stay: float = 0.10,
                    max_features: int | None = None, penalizer: float = 0.0,
                    ic_penalty: float = 2.0) -> tuple[list[str], list[str]]:
    """Select Cox covariates among ``candidates``; returns ``(selected, trace)``.

    ``trace`` is a list of human-readable lines, one per decision (what entered or left, at
    which p-value or criterion value), so the selection can be audited from the outputs.
    ``max_features`` caps the model size (entries stop once it is reached). Candidates that
    make the fit fail are skipped. The methods:

    - ``forward``: start empty; add the candidate with the smallest Wald p-value (given those
      already in) while it is below ``p_enter``;
    - ``backward``: start with every candidate; drop the largest Wald p-value while it is above
      ``p_stay``;
    - ``stepwise``: forward entry at ``p_enter``, after each entry backward removal at
      ``p_stay`` (a repeated model state stops the search);
    - ``aic``: bidirectional search on ``-2 log L + ic_penalty * n_params``, the single move that
      lowers it most, until none does (2 = AIC; log(n_events) is BIC-like).
    """
    if method not in METHODS:
        raise SurvivalError(f"unknown selection method {method!r} (expected one of "
                            f"{', '.join(METHODS)})")
    if not 0 < p_enter <= 1 or not 0 < p_stay <= 1:
        raise SurvivalError("p_enter and p_stay must be in (0, 1]")
    candidates = list(dict.fromkeys(candidates))
    cap = len(candidates) if max_features is None else int(max_features)
    trace: list[str] = [f"method={method} p_enter={p_enter} p_stay={p_stay} "
                        f"max_features={max_features} candidates={len(candidates)}"]

    def best_entry(selected):
        best = None
        for cand in candidates:
            if cand in selected:
                continue
            try:
                p = float(_wald_p(df, duration, event, selected + [cand], penalizer)[cand])
            except SurvivalError:
                continue
            if not math.isnan(p) and (best is None or p < best[1]):
                best = (cand, p)
        return best

    def worst_stay(selected):
        if not selected:
            return None
        pvals = _wald_p(df, duration, event, selected, penalizer)
        name = str(pvals.idxmax())
        return name, float(pvals[name])

    if method == "forward":
        selected: list[str] = []
        while len(selected) < cap:
            best = best_entry(selected)
            if best is None or best[1] >= p_enter:
                if best is not None:
                    trace.append(f"stop: best candidate {best[0]} p={best[1]:.3g} >= p_enter")
                break
            selected.append(best[0])
            trace.append(f"enter {best[0]} p={best[1]:.3g}")
        return selected, trace

    if method == "backward":
        selected = list(candidates)
        while selected:
            worst = worst_stay(selected)
            if worst[1] <= p_stay and len(selected) <= cap:
                trace.append(f"stop: worst covariate {worst[0]} p={worst[1]:.3g} <= p_stay")
                break
            selected.remove(worst[0])
            trace.append(f"remove {worst[0]} p={worst[1]:.3g}")
        return selected, trace

    if method == "stepwise":
        selected = []
        seen = {()}
        while True:
            changed = False
            if len(selected) < cap:
                best = best_entry(selected)
                if best is not None and best[1] < p_enter:
                    selected.append(best[0])
                    trace.append(f"enter {best[0]} p={best[1]:.3g}")
                    changed = True
            while selected:
                worst = worst_stay(selected)
                if worst[1] <= p_stay:
                    break
                selected.remove(worst[0])
                trace.append(f"remove {worst[0]} p={worst[1]:.3g}")
                changed = True
            state = tuple(sorted(selected))
            if not changed:
                trace.append("stop: no covariate enters or leaves")
                break
            if state in seen and changed:
                trace.append("stop: model state repeats")
                break
            seen.add(state)
        return selected, trace

    # method == "aic": bidirectional search on -2 logL + k * p
    selected = []
    current = information_criterion(df, duration, event, selected, ic_penalty, penalizer)
    trace.append(f"criterion -2logL+{ic_penalty:g}k; empty model {current:.3f}")
    while True:
        moves = []
        if len(selected) < cap:
            for cand in candidates:
                if cand not in selected:
                    try:
                        moves.append((information_criterion(df, duration, event, selected + [cand],
                                                            ic_penalty, penalizer), "enter", cand))
                    except SurvivalError:
                        continue
        for cand in selected:
            rest = [c for c in selected if c != cand]
            try:
                moves.append((information_criterion(df, duration, event, rest, ic_penalty,
                                                    penalizer), "remove", cand))
            except SurvivalError:
                continue
        if not moves:
            break
        value, kind, cand = min(moves)
        if value >= current - 1e-9:
            trace.append(f"stop: no move lowers the criterion ({current:.3f})")
            break
        selected = selected + [cand] if kind == "enter" else [c for c in selected if c != cand]
        trace.append(f"{kind} {cand} criterion {current:.3f} -> {value:.3f}")
        current = value
    return selected, trace


RIDGE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
RIDGE_FOLDS, RIDGE_REPEATS = 5, 3


def ridge_penalizer_cv(df: pd.DataFrame, duration: str, event: str, covariates: Sequence[str],
                       grid: Sequence[float] = RIDGE_GRID, k: int = RIDGE_FOLDS,
                       repeats: int = RIDGE_REPEATS,
                       seed: int = 0) -> tuple[float, dict[float, float]]:
    """The L2 penalizer of a Cox model on all ``covariates`` with the best cross-validated fit.

    For each penalizer in ``grid``, lifelines' ``k_fold_cross_validation`` scores the mean
    held-out partial log-likelihood per patient, averaged over ``repeats`` seeded shuffles
    (``seed``, ``seed + 1``, ...). Returns ``(best, {penalizer: score})``; a penalizer whose fits
    fail scores ``-inf``; ties go to the larger penalizer (the simpler model).
    """
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError
    from lifelines.utils import k_fold_cross_validation

    covariates = list(covariates)
    data = df[[duration, event] + covariates].astype(float).reset_index(drop=True)
    n_events = int(data[event].sum())
    k = min(int(k), len(data) // 2)
    if k < 2 or n_events < 2 * k:
        raise SurvivalError(f"too few patients ({len(data)}) or discharges ({n_events}) to "
                            f"cross-validate a penalizer; give one instead")
    if not grid or any(not g > 0 for g in grid):
        raise SurvivalError(f"the penalizer grid must hold positive values, got {list(grid)}")
    scores: dict[float, float] = {}
    for pen in grid:
        runs = []
        for r in range(int(repeats)):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    runs.extend(k_fold_cross_validation(
                        CoxPHFitter(penalizer=float(pen)), data, duration, event, k=k,
                        scoring_method="log_likelihood", seed=int(seed) + r))
            except (ConvergenceError, np.linalg.LinAlgError, ValueError):
                runs = [-math.inf]
                break
        scores[float(pen)] = float(np.mean(runs))
    best = max(scores, key=lambda pen: (scores[pen], pen))
    if not math.isfinite(scores[best]):
        raise SurvivalError("no penalizer in the grid gave a Cox model that could be fitted")
    return best, scores


def best_univariate(df: pd.DataFrame, duration: str, event: str, candidates: Sequence[str],
                    penalizer: float = 0.0) -> tuple[str, float]:
    """The candidate with the smallest univariate Wald p-value: ``(name, p)``."""
    best = None
    for cand in candidates:
        try:
            p = float(_wald_p(df, duration, event, [cand], penalizer)[cand])
        except SurvivalError:
            continue
        if not math.isnan(p) and (best is None or p < best[1]):
            best = (cand, p)
    if best is None:
        raise SurvivalError("no candidate covariate could be fitted in a univariate Cox model")
    return best


def univariate_table(df: pd.DataFrame, duration: str, event: str, covariates: Sequence[str],
                     penalizer: float = 0.0) -> pd.DataFrame:
    """Univariate Cox fit per covariate: coef, HR (of discharge) with 95% CI, p.

    The HR is per unit of the covariate as given (pass raw values for per-year/per-unit HRs).
    """
    rows = []
    for cov in covariates:
        s = fit_cox(df, duration, event, [cov], penalizer).summary.loc[cov]
        rows.append({"covariate": cov, "coef": float(s["coef"]), "hr": float(s["exp(coef)"]),
                     "hr_low": float(s["exp(coef) lower 95%"]),
                     "hr_high": float(s["exp(coef) upper 95%"]), "p": float(s["p"])})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- risk scores

def standardise(df: pd.DataFrame, columns: Sequence[str], mean: Sequence[float] | None = None,
                sd: Sequence[float] | None = None):
    """Z-score ``columns``; with no ``mean``/``sd`` they are computed (sd with ddof=1).

    Returns ``(z_frame, mean, sd)`` as a DataFrame and two numpy arrays.
    """
    x = df[list(columns)].astype(float)
    mean = x.mean().to_numpy() if mean is None else np.asarray(mean, float)
    sd = x.std(ddof=1).to_numpy() if sd is None else np.asarray(sd, float)
    safe = np.where(sd > 0, sd, 1.0)
    return (x - mean) / safe, mean, sd


def split_by_cutoff(risk: Sequence[float], cutoff: float) -> np.ndarray:
    """Boolean array: True = high risk (``risk > cutoff``), False = low risk (``<= cutoff``)."""
    return np.asarray(risk, float) > float(cutoff)


# --------------------------------------------------------------------------- KM and log-rank

def _median(kmf) -> float | None:
    m = float(kmf.median_survival_time_)
    return None if math.isinf(m) or math.isnan(m) else m


def km_logrank_per_group(durations: Sequence[float], events: Sequence[int],
                         high: Sequence[bool]) -> tuple[dict, dict]:
    """Kaplan-Meier fits of the high/low groups and the log-rank test between them.

    Returns ``(stats, fitters)``: ``stats`` has n, n_events, n_high, n_low, median_stay_high,
    median_stay_low (None where the curve never reaches 0.5), logrank_statistic, p (None when a
    group is empty or there are no events); ``fitters`` maps "high"/"low" to fitted
    :class:`lifelines.KaplanMeierFitter` objects (absent for an empty group).
    """
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    t = np.asarray(durations, float)
    e = np.asarray(events, int)
    h = np.asarray(high, bool)
    stats = {"n": int(t.size), "n_events": int(e.sum()), "n_high": int(h.sum()),
             "n_low": int((~h).sum()), "median_stay_high": None, "median_stay_low": None,
             "logrank_statistic": None, "p": None}
    fitters = {}
    for name, mask in (("high", h), ("low", ~h)):
        if mask.any():
            kmf = KaplanMeierFitter(label=f"{name} risk (n={int(mask.sum())})")
            kmf.fit(t[mask], e[mask])
            fitters[name] = kmf
            stats[f"median_stay_{name}"] = _median(kmf)
    if h.any() and (~h).any() and e.sum() > 0:
        res = logrank_test(t[h], t[~h], e[h], e[~h])
        stats["logrank_statistic"] = float(res.test_statistic)
        stats["p"] = float(res.p_value)
    return stats, fitters


def c_index(durations: Sequence[float], risk: Sequence[float], events: Sequence[int]) -> float:
    """Harrell's C for ``risk`` where high risk = longer stay (lifelines' convention)."""
    from lifelines.utils import concordance_index

    return float(concordance_index(np.asarray(durations, float), np.asarray(risk, float),
                                   np.asarray(events, int)))


def c_index_ci(durations: Sequence[float], risk: Sequence[float], events: Sequence[int],
               n_boot: int = 1000, seed: int = 0,
               level: float = 0.95) -> tuple[float | None, list[float] | None]:
    """Harrell's C and its percentile bootstrap CI (``n_boot`` resamples, seeded).

    Resamples without an event or a comparable pair are skipped. Returns ``(None, None)`` when
    the data have no comparable pair at all.
    """
    from lifelines.utils import concordance_index

    t = np.asarray(durations, float)
    r = np.asarray(risk, float)
    e = np.asarray(events, int)
    try:
        c = float(concordance_index(t, r, e))
    except ZeroDivisionError:
        return None, None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(n_boot)):
        idx = rng.integers(0, t.size, t.size)
        if e[idx].sum() == 0:
            continue
        try:
            values.append(concordance_index(t[idx], r[idx], e[idx]))
        except ZeroDivisionError:
            continue
    if len(values) < 10:
        return c, None
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return c, [float(low), float(high)]
