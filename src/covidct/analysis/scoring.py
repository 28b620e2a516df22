"""Scoring patients with a fitted Cox model (cox.json): numpy only, so that ``covidct predict``
scores one patient without importing pandas or lifelines.

**risk = -log partial hazard of discharge; high risk = longer hospital stay.**
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from covidct.io.results import FEATURE_RE

DIRECTION = "risk = -log partial hazard of discharge; high risk = longer hospital stay"


class SurvivalError(ValueError):
    """A survival analysis that cannot be done on the given data (too few events, ...)."""


def code_sex(value: Any) -> float:
    """1 = male, 0 = female; NaN when missing. Raises ValueError for anything else."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return float("nan")
    text = str(value).strip().lower()
    if text in ("", "nan", "na", "<na>"):
        return float("nan")
    if text in ("m", "male", "1", "1.0"):
        return 1.0
    if text in ("f", "female", "0", "0.0"):
        return 0.0
    raise ValueError(f"sex {value!r} is not M or F")


# --------------------------------------------------------------------------- scoring API

def covariate_vector(cox: dict, features_64: Sequence[float], age: float, sex: Any,
                     comorbidity: float) -> np.ndarray:
    """The raw values of ``cox['covariates']`` for one patient, in model order."""
    features = np.asarray(features_64, float).ravel()
    values = []
    for cov in cox["covariates"]:
        m = FEATURE_RE.match(cov)
        if m:
            idx = int(m.group(1))
            if idx >= features.size:
                raise ValueError(f"the Cox model uses {cov} but only {features.size} DL features "
                                 f"were given")
            values.append(features[idx])
        elif cov == "age":
            values.append(float(age))
        elif cov == "sex":
            values.append(code_sex(sex))
        elif cov == "comorbidity":
            values.append(float(comorbidity))
        else:
            raise ValueError(f"unknown covariate {cov!r} in the Cox model")
    x = np.asarray(values, float)
    if np.isnan(x).any():
        missing = [c for c, v in zip(cox["covariates"], x) if math.isnan(v)]
        raise ValueError(f"missing value(s) for {', '.join(missing)}, needed by the Cox model")
    return x


def risk(cox: dict, x) -> np.ndarray:
    """The risk of patients with the raw covariates ``x`` ((n, k) in ``cox['covariates']``
    order): ``-sum_j beta_j (x_j - mean_j) / sd_j`` with the training mean and sd of cox.json
    (= -log partial hazard of discharge; high risk = longer hospital stay)."""
    mean, sd = np.asarray(cox["mean"], float), np.asarray(cox["sd"], float)
    z = (np.atleast_2d(np.asarray(x, float)) - mean) / np.where(sd > 0, sd, 1.0)
    return risk_scores(cox["coefficients"], z)


def risk_from_features(cox: dict, features_64: Sequence[float], age: float, sex: Any,
                       comorbidity: float) -> tuple[float, str]:
    """Score one patient with a model from cox.json: ``(risk, "high" | "low")``; the group is
    "high" when ``risk > cutoff`` (the median training risk). ``sex`` is "M"/"F" or 1/0."""
    value = float(risk(cox, covariate_vector(cox, features_64, age, sex, comorbidity))[0])
    return value, ("high" if value > float(cox["cutoff"]) else "low")


def risk_scores(coefficients: Sequence[float], z) -> np.ndarray:
    """Risk = the negative linear predictor ``-(z @ beta)`` (``z`` standardised covariates).

    High risk = low hazard of discharge = longer hospital stay.
    """
    z = np.asarray(z, float)
    beta = np.asarray(coefficients, float)
    if z.ndim == 1:
        z = z[None, :]
    if z.shape[1] != beta.size:
        raise SurvivalError(f"{z.shape[1]} covariate(s) given for {beta.size} coefficient(s)")
    return -(z @ beta)
