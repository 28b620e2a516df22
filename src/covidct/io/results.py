"""The result files the stages hand to each other, each with one reader and one writer.

- ``predictions.csv`` (per site): patient, site, label, y (1 = COVID-19), probability,
  feature_0..feature_63 (the 64-d DL feature), model;
- ``metrics.json`` (per site): what ``covidct evaluate`` measured;
- ``run.json`` (per trained model): the MLflow run and model that training produced;
- ``cox.json``: the Cox model, its standardisation and its risk cut-off;
- ``plan.json`` (per trained system): how its training scans were processed and its thresholds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from covidct.errors import CovidctError
from covidct.io.atomic import write_csv, write_json

if TYPE_CHECKING:                  # pandas is imported where a table is made (a slow import)
    import pandas as pd

FEATURE_RE = re.compile(r"^feature_(\d+)$")
PREDICTION_COLUMNS = ("patient", "site", "label", "y", "probability")
RUN_JSON = "run.json"
PLAN_JSON = "plan.json"
PLAN_FORMAT = "covidct trained system"


# --------------------------------------------------------------------------- predictions.csv

def feature_name(index: int) -> str:
    return f"feature_{index}"


def feature_columns(table: pd.DataFrame) -> list[str]:
    """The ``feature_k`` columns of a predictions table, in the order of k."""
    return sorted((c for c in table.columns if FEATURE_RE.match(c)),
                  key=lambda c: int(FEATURE_RE.match(c).group(1)))


def prediction_table(patients: Sequence[str], site: str, labels: Sequence[str],
                     y: Sequence[int], probability: np.ndarray, features: np.ndarray,
                     model: str) -> pd.DataFrame:
    """A predictions.csv table from its columns (``features`` is (n, 64))."""
    import pandas as pd

    table = pd.DataFrame({"patient": list(patients), "site": site, "label": list(labels),
                          "y": [int(v) for v in y], "probability": np.asarray(probability)})
    feats = pd.DataFrame(np.asarray(features),
                         columns=[feature_name(i) for i in range(np.shape(features)[1])])
    table = pd.concat([table, feats], axis=1)
    table["model"] = model
    return table


def write_predictions(path: str | Path, table: pd.DataFrame) -> Path:
    return write_csv(path, table)


def _read_one_predictions(path: Path, features: bool) -> pd.DataFrame:
    import pandas as pd

    if not path.is_file():
        raise CovidctError("predictions file not found", path=path)
    try:
        df = pd.read_csv(path, dtype={"patient": str, "site": str, "label": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CovidctError(f"cannot read predictions: {err}", path=path) from None
    missing = [c for c in ("patient", "site", "y", "probability") if c not in df.columns]
    if missing:
        raise CovidctError(f"predictions lack column(s) {', '.join(missing)}", path=path)
    prob = pd.to_numeric(df["probability"], errors="coerce")
    bad = ~(np.isfinite(prob) & (prob >= 0.0) & (prob <= 1.0))
    if bad.any():
        i = int(np.argmax(bad.to_numpy()))
        raise CovidctError(f"probability {df['probability'].iloc[i]!r} is not in [0, 1]",
                           patient=str(df["patient"].iloc[i]), path=path)
    bad = ~df["y"].astype(str).isin(("0", "1", "0.0", "1.0"))
    if bad.any():
        i = int(np.argmax(bad.to_numpy()))
        raise CovidctError(f"y {df['y'].iloc[i]!r} is not 0 or 1",
                           patient=str(df["patient"].iloc[i]), path=path)
    if features and not feature_columns(df):
        raise CovidctError("predictions have no feature_0.. columns (the DL feature)", path=path)
    df["probability"] = prob.astype(float)
    df["y"] = df["y"].astype(float).astype(int)
    df["source"] = str(path)
    return df


def read_predictions(paths: str | Path | Sequence[str | Path], *,
                     features: bool = False) -> pd.DataFrame:
    """One or more predictions.csv files as one table, checked: the columns, y in {0, 1},
    probability in [0, 1], each patient once; with ``features``, the same DL feature columns in
    every file. A column ``source`` names each row's file."""
    import pandas as pd

    if isinstance(paths, (str, Path)):
        paths = [paths]
    frames = [_read_one_predictions(Path(p), features) for p in paths]
    if not frames:
        raise CovidctError("no predictions file given")
    if features:
        reference = feature_columns(frames[0])
        for df in frames[1:]:
            if feature_columns(df) != reference:
                raise CovidctError(f"predictions have {len(feature_columns(df))} DL feature "
                                   f"columns, others have {len(reference)}",
                                   path=df["source"].iloc[0])
    out = pd.concat(frames, ignore_index=True)
    dup = out["patient"][out["patient"].duplicated()]
    if len(dup):
        raise CovidctError(f"patient id(s) appear more than once: "
                           f"{', '.join(map(str, dup.unique()))}",
                           patient=str(dup.iloc[0]), path=out.loc[dup.index[0], "source"])
    return out


# --------------------------------------------------------------------------- metrics.json

def write_metrics(path: str | Path, metrics: dict) -> Path:
    return write_json(path, metrics)


def read_metrics(path: str | Path) -> dict[str, Any]:
    """A metrics.json of ``covidct evaluate``; ``_path`` holds where it was read from."""
    path = Path(path)
    metrics = _read_json(path, "metrics file")
    missing = [k for k in ("n", "n_positive", "auc", "accuracy") if k not in metrics]
    if missing:
        raise CovidctError(f"not a metrics.json of covidct evaluate (lacks {', '.join(missing)})",
                           path=path)
    metrics["_path"] = str(path)
    return metrics


# --------------------------------------------------------------------------- run.json

def write_run(folder: str | Path, record: dict) -> Path:
    """``folder``/run.json: written last by training, so its presence means a finished run."""
    return write_json(Path(folder) / RUN_JSON, record)


def remove_run(folder: str | Path) -> None:
    """Remove a previous run's record before a re-run (a failed re-run must leave none)."""
    (Path(folder) / RUN_JSON).unlink(missing_ok=True)


def read_run(model_or_folder: str | Path) -> dict[str, Any] | None:
    """The run.json beside a model file (or in a folder); None when there is none."""
    path = Path(model_or_folder)
    path = (path if path.is_dir() else path.parent) / RUN_JSON
    if not path.is_file():
        return None
    record = _read_json(path, "run record")
    record["_path"] = str(path)
    return record


# --------------------------------------------------------------------------- cox.json

COX_KEYS = ("covariates", "coefficients", "mean", "sd", "cutoff")


def write_cox(path: str | Path, cox: dict) -> Path:
    return write_json(path, cox)


def read_cox(path: str | Path) -> dict[str, Any]:
    """A cox.json written by ``covidct prognosis``, checked for what scoring a patient needs."""
    path = Path(path)
    cox = _read_json(path, "Cox model file")
    missing = [k for k in COX_KEYS if k not in cox]
    if missing:
        raise CovidctError(f"not a cox.json from covidct prognosis (missing {', '.join(missing)})",
                           path=path)
    n = len(cox["covariates"])
    if any(len(cox[k]) != n for k in ("coefficients", "mean", "sd")):
        raise CovidctError("cox.json: covariates, coefficients, mean and sd differ in length",
                           path=path)
    return cox


# --------------------------------------------------------------------------- plan.json

def write_plan(folder: str | Path, plan: dict) -> Path:
    """``folder``/plan.json, the trained system's plan (written last: it completes the folder)."""
    return write_json(Path(folder) / PLAN_JSON, {"format": PLAN_FORMAT, "version": 1, **plan})


def read_plan(folder: str | Path) -> dict[str, Any]:
    """A trained system's plan.json, checked for what applying the system needs."""
    path = Path(folder) / PLAN_JSON
    plan = _read_json(path, "trained system's plan")
    if plan.get("format") != PLAN_FORMAT:
        raise CovidctError("not a covidct trained system's plan.json (no format "
                           f"{PLAN_FORMAT!r})", path=path)
    missing = [k for k in ("model", "input_shape", "preprocessing", "evaluation") if k not in plan]
    if missing:
        raise CovidctError(f"plan.json lacks {', '.join(missing)}", path=path)
    return plan


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CovidctError(f"{what} not found", path=path) from None
    except (OSError, ValueError) as err:
        raise CovidctError(f"cannot read the {what}: {err}", path=path) from None
    if not isinstance(value, dict):
        raise CovidctError(f"the {what} is not a JSON object", path=path)
    return value
