"""``covidct evaluate``: the diagnostic performance of one site (Table 2, Figure 3).

From the site's predictions.csv: AUC with its confidence interval, accuracy, sensitivity,
specificity and F1 at the threshold and at the training sites' Youden threshold, the calibration
curve and Hosmer-Lemeshow, for the site and its subgroups, into ``metrics.json`` (undefined
values are null with a note), ``roc.png`` and ``calibration.png``; one MLflow run per site.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidct.analysis import stats
from covidct.analysis.figures import calibration_figure, format_auc, roc_figure
from covidct.errors import CovidctError
from covidct.io.atomic import jsonable
from covidct.io.results import read_predictions, write_metrics
from covidct.params import EvaluationParams, TrackingParams, add_options, from_args

log = logging.getLogger(__name__)

METRIC_KEYS = ("accuracy", "sensitivity", "specificity", "f1")


# --------------------------------------------------------------------------- subgroups
def parse_subgroups(items: Iterable[str] | None) -> dict[str, list[str]]:
    """``NAME=label1,label2`` strings -> {NAME: [label1, label2]}."""
    groups: dict[str, list[str]] = {}
    for item in items or []:
        name, sep, labels = item.partition("=")
        name = name.strip()
        wanted = [lab.strip() for lab in labels.split(",") if lab.strip()]
        if not sep or not name or not wanted:
            raise CovidctError(f"subgroup {item!r} is not of the form NAME=label1,label2")
        groups[name] = wanted
    return groups


# --------------------------------------------------------------------------- metrics
def _one_class_note(n: int, n_positive: int, positive_name: str) -> str | None:
    if n == 0:
        return "no patients: every metric undefined"
    if n_positive == n:
        return f"only {positive_name} patients: AUC and specificity undefined"
    if n_positive == 0:
        return f"no {positive_name} patients: AUC and sensitivity undefined"
    return None


def diagnostic_metrics(y, p, params: EvaluationParams = EvaluationParams(), *,
                       youden_threshold: float | None = None, youden_source: str | None = None,
                       positive_name: str = "COVID-19") -> dict[str, Any]:
    """Every metric of metrics.json for one group of patients (the site or a subgroup)."""
    ci, level, threshold = params.ci, params.ci_level, params.threshold
    y = np.asarray(y, dtype=int)
    p = np.asarray(p, dtype=float)
    n = int(y.size)
    n_positive = int(y.sum())
    notes: list[str] = []
    note = _one_class_note(n, n_positive, positive_name)
    if note:
        notes.append(note)
    out: dict[str, Any] = {"n": n, "n_positive": n_positive}

    if ci == "bootstrap":
        auc, low, high = stats.auc_ci_bootstrap(y, p, n_bootstrap=params.n_bootstrap,
                                                level=level, seed=params.seed)
    elif ci == "delong":
        auc, low, high = stats.auc_ci_delong(y, p, level=level)
    else:
        raise CovidctError(f"unknown CI method {ci!r} (delong or bootstrap)")
    if auc is not None and low is None:
        notes.append("fewer than 2 patients in a class: AUC confidence interval undefined")
    out["auc"] = auc
    out["auc_ci"] = None if low is None else [low, high]

    at = stats.threshold_metrics(y, p, threshold)
    out.update({k: at[k] for k in (*METRIC_KEYS, "precision")})
    out["threshold"] = float(threshold)

    if youden_threshold is None:
        out["youden"] = {"threshold": None, "source": youden_source, "accuracy": None,
                         "sensitivity": None, "specificity": None, "f1": None}
    else:
        yd = stats.threshold_metrics(y, p, youden_threshold)
        out["youden"] = {"threshold": float(youden_threshold), "source": youden_source,
                         **{k: yd[k] for k in METRIC_KEYS}}

    hl = stats.hosmer_lemeshow(y, p, g=params.hl_groups) if n else {"statistic": None, "p": None,
                                                              "df": None, "groups": 0}
    if n and hl["statistic"] is None:
        notes.append(f"Hosmer-Lemeshow undefined: only {hl['groups']} distinct risk group(s)")
    out["hosmer_lemeshow"] = {"statistic": hl["statistic"], "p": hl["p"], "df": hl["df"],
                              "groups": hl["groups"]}
    out["confusion"] = at["confusion"]
    out["calibration"] = stats.calibration_curve(y, p, n_bins=params.calibration_bins,
                                                 strategy=params.calibration_strategy)
    out["notes"] = notes
    return out


def evaluate_predictions(df: pd.DataFrame, params: EvaluationParams = EvaluationParams(), *,
                         youden_from: pd.DataFrame | None = None,
                         youden_source: str | None = None, youden: float | None = None,
                         subgroups: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """metrics.json's content for a site's predictions.

    The Youden threshold is ``youden`` when given (a trained system's, from its training
    sites), else chosen on ``youden_from`` (the training sites' predictions) and applied to this
    site; without either, it is chosen on this site itself (optimistic, noted).
    """
    notes: list[str] = []
    source = youden_from if youden_from is not None else df
    chosen = stats.youden_threshold(source["y"].to_numpy(), source["probability"].to_numpy())
    if youden is not None:
        chosen = {"threshold": float(youden), "j": None}
    elif youden_from is None:
        youden_source = "this site (optimistic: chosen and measured on the same patients)"
    if chosen is None:
        notes.append("Youden threshold undefined: its source predictions hold one class only")
    yt = None if chosen is None else chosen["threshold"]

    metrics = diagnostic_metrics(df["y"].to_numpy(), df["probability"].to_numpy(), params,
                                 youden_threshold=yt, youden_source=youden_source)
    if chosen is not None and chosen["j"] is not None:
        metrics["youden"]["j_at_source"] = chosen["j"]
    metrics["notes"] = metrics["notes"] + notes

    metrics["subgroups"] = {}
    for name, labels in (subgroups or {}).items():
        if "label" not in df.columns:
            raise CovidctError(f"subgroup {name!r} needs a label column in the predictions",
                               path=", ".join(df["source"].unique()) if "source" in df else None)
        sel = df["label"].isin(list(labels))
        sub = diagnostic_metrics(df.loc[sel, "y"].to_numpy(),
                                 df.loc[sel, "probability"].to_numpy(), params,
                                 youden_threshold=yt, youden_source=youden_source)
        sub["labels"] = list(labels)
        if not sel.any():
            present = sorted(df["label"].dropna().unique()) if "label" in df.columns else []
            sub["notes"].append(f"no patient has label(s) {', '.join(labels)} "
                                f"(labels present: {', '.join(present)})")
        metrics["subgroups"][name] = sub
    return metrics


# --------------------------------------------------------------------------- MLflow
def _metric_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /:]", "_", name)


def flat_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric scalars of metrics.json as MLflow metric names (nulls left out)."""
    out: dict[str, float] = {}

    def put(key, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None \
                and math.isfinite(value):
            out[_metric_name(prefix + key)] = float(value)

    for key in ("n", "n_positive", "auc", *METRIC_KEYS, "precision", "threshold"):
        put(key, metrics.get(key))
    if metrics.get("auc_ci"):
        put("auc_ci_low", metrics["auc_ci"][0])
        put("auc_ci_high", metrics["auc_ci"][1])
    for key in ("threshold", *METRIC_KEYS):
        put(f"youden_{key}", (metrics.get("youden") or {}).get(key))
    put("hosmer_lemeshow_statistic", metrics["hosmer_lemeshow"]["statistic"])
    put("hosmer_lemeshow_p", metrics["hosmer_lemeshow"]["p"])
    for key, value in metrics["confusion"].items():
        put(f"confusion_{key}", value)
    for name, sub in (metrics.get("subgroups") or {}).items():
        out.update(flat_metrics(sub, prefix=f"{prefix}{name}/"))
    return out


def log_to_mlflow(metrics: Mapping[str, Any], files: Sequence[Path], *,
                  tracking: TrackingParams, run_name: str, tags: Mapping[str, Any],
                  params: Mapping[str, Any], config: str | Path | None = None) -> str:
    """One MLflow run with the metrics, params, tags and files as artifacts; returns its id."""
    import mlflow

    from covidct.io.tracking import mlflow_run

    with mlflow_run(tracking, run_name, tags=tags, params=params, config=config) as run:
        mlflow.log_metrics(flat_metrics(metrics))
        for f in files:
            mlflow.log_artifact(str(f))
        return run.info.run_id


# --------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    parser.add_argument("predictions", nargs="+", type=Path,
                        help="predictions.csv of the site (several are pooled, e.g. two training "
                             "sites); put these positional arguments before the options")
    parser.add_argument("outdir", type=Path,
                        help="folder for metrics.json, roc.png, calibration.png")
    add_options(parser, EvaluationParams)
    youden = parser.add_mutually_exclusive_group()
    youden.add_argument("--youden-from", nargs="+", type=Path, default=None, metavar="CSV",
                        help="training-site predictions on which the Youden threshold is chosen "
                             "(default: this site itself, optimistic)")
    youden.add_argument("--youden-threshold", type=float, default=None, metavar="T",
                        help="the Youden threshold as chosen elsewhere (a trained system's plan)")
    parser.add_argument("--youden-source", default=None,
                        help="where --youden-threshold was chosen (recorded in metrics.json)")
    parser.add_argument("--subgroup", action="extend", nargs="+", default=[],
                        metavar="NAME=LABELS",
                        help="stratified analysis, e.g. validation-viral=covid,viral")
    parser.add_argument("--site", default=None,
                        help="site name (default: the predictions' site column)")
    parser.add_argument("--role", default=None, help="the site's role, for the MLflow tag")
    parser.add_argument("--model-name", default=None,
                        help="model tag (default: the predictions' model column)")
    add_options(parser, TrackingParams)
    parser.add_argument("--config", default=None,
                        help="workflow config file (its hash tags the run)")
    parser.add_argument("--run-name", default=None,
                        help="MLflow run name (default 'evaluate SITE MODEL')")


def _single_value(df: pd.DataFrame, column: str) -> str | None:
    if column not in df.columns:
        return None
    values = sorted({str(v) for v in df[column].dropna().unique() if str(v)})
    return "+".join(values) if values else None


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def run(args) -> int:
    params = from_args(EvaluationParams, args)
    tracking = from_args(TrackingParams, args)
    df = read_predictions(args.predictions)
    if df.empty:
        raise CovidctError("no patients in the predictions",
                           path=", ".join(map(str, args.predictions)))
    subgroups = parse_subgroups(args.subgroup)
    youden_df = read_predictions(args.youden_from) if args.youden_from else None
    site = args.site or _single_value(df, "site") or args.outdir.name
    model = args.model_name or _single_value(df, "model") or ""

    log.info("evaluating site %s (model %s): %d patients, %d COVID-19, threshold %.3f",
             site, model or "?", len(df), int(df["y"].sum()), params.threshold)
    source = ", ".join(map(str, args.youden_from)) if args.youden_from else args.youden_source
    metrics = evaluate_predictions(df, params, youden_from=youden_df, youden_source=source,
                                   youden=args.youden_threshold, subgroups=subgroups)
    metrics = {"site": site, "model": model, "role": args.role,
               "predictions": [str(p) for p in args.predictions],
               "ci_method": params.ci, "ci_level": params.ci_level,
               **({"n_bootstrap": params.n_bootstrap, "seed": params.seed}
                  if params.ci == "bootstrap" else {}),
               **metrics}
    metrics = jsonable(metrics)
    for note in metrics["notes"]:
        log.warning("%s: %s", site, note)

    outdir = args.outdir
    outdir.mkdir(parents=True, exist_ok=True)
    points = {"threshold": params.threshold, "Youden": metrics["youden"]["threshold"]}
    curves = [{"name": site, "y": df["y"], "p": df["probability"], "auc": metrics["auc"],
               "auc_ci": metrics["auc_ci"], "points": points}]
    for name, labels in subgroups.items():
        sel = df["label"].isin(labels)
        sub = metrics["subgroups"][name]
        curves.append({"name": name, "y": df.loc[sel, "y"], "p": df.loc[sel, "probability"],
                       "auc": sub["auc"], "auc_ci": sub["auc_ci"], "ls": "--"})
    title = f"{site}" + (f" ({model})" if model else "")
    roc_png = roc_figure(curves, outdir / "roc.png", title=f"ROC: {title}")
    cal_png = calibration_figure([{"name": site, "calibration": metrics["calibration"],
                                   "hosmer_lemeshow": metrics["hosmer_lemeshow"]}],
                                 outdir / "calibration.png", title=f"Calibration: {title}")
    metrics_json = write_metrics(outdir / "metrics.json", metrics)

    hl_p = metrics["hosmer_lemeshow"]["p"]
    log.info("%s: AUC %s, accuracy %s, sensitivity %s, specificity %s, Hosmer-Lemeshow p %s",
             site, format_auc(metrics["auc"], metrics["auc_ci"]), _percent(metrics["accuracy"]),
             _percent(metrics["sensitivity"]), _percent(metrics["specificity"]),
             "n/a" if hl_p is None else f"{hl_p:.3f}")

    if tracking.enabled:
        tags = {"covidct.rule": "evaluate", "covidct.site": site, "covidct.model": model}
        if args.role:
            tags["covidct.role"] = args.role
        mlflow_params = {**{k: v for k, v in vars(params).items()},
                         "youden_source": metrics["youden"]["source"],
                         "subgroups": json.dumps(subgroups)}
        run_id = log_to_mlflow(metrics, [metrics_json, roc_png, cal_png], tracking=tracking,
                               config=args.config,
                               run_name=args.run_name or f"evaluate {site} {model}".strip(),
                               tags=tags, params=mlflow_params)
        log.info("MLflow run %s in %s", run_id, tracking.tracking_uri)
    return 0
