"""``covidct evaluate``: the diagnostic performance of one site (Table 2, Figure 3).

From the site's predictions.csv: AUC with its confidence interval (and its DeLong variance, for
pooling across sites), accuracy, sensitivity, specificity, PPV and NPV with Wilson intervals and
F1 at the threshold and at the training sites' Youden threshold, the Brier score, the calibration
intercept and slope, the calibration curve, Hosmer-Lemeshow and the decision curve, for the site,
its label subgroups and (with ``--sheet``) its sex and age-band subgroups, into ``metrics.json``
(undefined values are null with a note), ``roc.png``, ``calibration.png`` and ``decision.png``;
one MLflow run per site.
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
from covidct.analysis.figures import (
    calibration_figure,
    decision_curve_figure,
    format_auc,
    roc_figure,
)
from covidct.errors import CovidctError
from covidct.io.atomic import jsonable
from covidct.io.results import read_predictions, write_metrics
from covidct.params import EvaluationParams, TrackingParams, add_options, from_args

log = logging.getLogger(__name__)

METRIC_KEYS = ("accuracy", "sensitivity", "specificity", "f1")
SEXES = {"F": "female", "M": "male"}
UNKNOWN = "unknown"


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


def _rates(confusion: Mapping[str, int]) -> dict[str, float | None]:
    """PPV and NPV from a confusion matrix (None where nobody is called positive/negative)."""
    tp, fp, fn, tn = (confusion[k] for k in ("tp", "fp", "fn", "tn"))
    return {"ppv": tp / (tp + fp) if tp + fp else None,
            "npv": tn / (tn + fn) if tn + fn else None}


def calibration_metrics(y: np.ndarray, p: np.ndarray) -> tuple[dict[str, Any], list[str]]:
    """The Brier score and the logistic recalibration's intercept and slope, with notes where
    they are undefined or probabilities had to be clipped for the logit."""
    notes = []
    out = {"brier": stats.brier_score(y, p),
           "calibration_intercept": stats.calibration_intercept(y, p),
           "calibration_slope": stats.calibration_slope(y, p)}
    if y.size and 0 < y.sum() < y.size and out["calibration_slope"] is None:
        notes.append("calibration slope undefined: the probabilities separate the classes "
                     "completely")
    elif y.size and out["calibration_slope"] is None:
        notes.append("calibration intercept and slope undefined: one class only")
    clip = stats.CALIBRATION_CLIP
    clipped = int(((p < clip) | (p > 1.0 - clip)).sum())
    if clipped:
        notes.append(f"{clipped} probabilities clipped to [{clip:g}, 1 - {clip:g}] for the "
                     "calibration logit")
    return out, notes


def diagnostic_metrics(y, p, params: EvaluationParams = EvaluationParams(), *,
                       youden_threshold: float | None = None, youden_source: str | None = None,
                       positive_name: str = "COVID-19", decision_curve: bool = True
                       ) -> dict[str, Any]:
    """Every metric of metrics.json for one group of patients (the site or a subgroup); the
    decision curve only with ``decision_curve``."""
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
    n_pos, n_neg = stats.class_counts(y)
    out["auc_variance"] = (stats.delong_roc_variance(y, p)[1] if n_pos >= 2 and n_neg >= 2
                           else None)

    at = stats.threshold_metrics(y, p, threshold)
    out.update({k: at[k] for k in (*METRIC_KEYS, "precision")})
    out.update(_rates(at["confusion"]))
    out["ci"] = stats.rate_intervals(at["confusion"], level)
    out["rate_ci_method"] = "wilson"
    out["threshold"] = float(threshold)

    if youden_threshold is None:
        out["youden"] = {"threshold": None, "source": youden_source, "accuracy": None,
                         "sensitivity": None, "specificity": None, "f1": None}
    else:
        yd = stats.threshold_metrics(y, p, youden_threshold)
        out["youden"] = {"threshold": float(youden_threshold), "source": youden_source,
                         **{k: yd[k] for k in METRIC_KEYS}}

    calibration, calibration_notes = calibration_metrics(y, p)
    out.update(calibration)
    notes += calibration_notes
    hl = stats.hosmer_lemeshow(y, p, g=params.hl_groups) if n else {"statistic": None, "p": None,
                                                              "df": None, "groups": 0}
    if n and hl["statistic"] is None:
        notes.append(f"Hosmer-Lemeshow undefined: only {hl['groups']} distinct risk group(s)")
    out["hosmer_lemeshow"] = {"statistic": hl["statistic"], "p": hl["p"], "df": hl["df"],
                              "groups": hl["groups"]}
    out["confusion"] = at["confusion"]
    out["calibration"] = stats.calibration_curve(y, p, n_bins=params.calibration_bins,
                                                 strategy=params.calibration_strategy)
    if decision_curve:
        out["decision_curve"] = stats.decision_curve(y, p)
        if 0.0 < threshold < 1.0:
            out["decision_curve"]["at_threshold"] = stats.net_benefit(y, p, threshold)
    out["notes"] = notes
    return out


# --------------------------------------------------------------------------- demographics
def age_bands(cuts: Sequence[int]) -> list[tuple[str, int | None, int | None]]:
    """(label, lower, upper) of the bands lower <= age < upper cut at ``cuts``:
    (50, 65) -> <50, 50-64, >=65. No cuts, no bands."""
    if not cuts:
        return []
    edges = [None, *cuts, None]
    bands = []
    for lower, upper in zip(edges, edges[1:]):
        if lower is None:
            label = f"<{upper}"
        elif upper is None:
            label = f">={lower}"
        else:
            label = f"{lower}-{upper - 1}"
        bands.append((label, lower, upper))
    return bands


def join_demographics(df: pd.DataFrame, sheet: pd.DataFrame) -> pd.DataFrame:
    """The predictions with the sheet's age and sex of each patient; every patient must be in
    the sheet (at the same site where both name one)."""
    keys = ["patient", "site"] if "site" in df.columns and "site" in sheet.columns else ["patient"]
    people = sheet[[*keys, "age", "sex"]].drop_duplicates(keys)
    joined = df.drop(columns=[c for c in ("age", "sex") if c in df.columns]).merge(
        people, on=keys, how="left", indicator=True, validate="many_to_one")
    missing = joined.loc[joined["_merge"] == "left_only", "patient"].astype(str).tolist()
    if missing:
        listed = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more"
                                            if len(missing) > 10 else "")
        raise CovidctError(f"patient(s) {listed} of the predictions are not in the site sheet "
                           f"(needed for the sex and age subgroups)", patient=missing[0],
                           path=sheet.attrs.get("path"))
    return joined.drop(columns="_merge")


def demographic_groups(df: pd.DataFrame, cuts: Sequence[int]
                       ) -> dict[str, dict[str, tuple[np.ndarray, dict[str, Any]]]]:
    """{"sex": {F|M|unknown: (mask, description)}, "age": {band|unknown: (mask, description)}}
    over patients with age and sex columns; an unknown group only where some value is missing."""
    sex = df["sex"].fillna("").astype(str).str.upper()
    groups: dict[str, dict[str, tuple[np.ndarray, dict[str, Any]]]] = {"sex": {}, "age": {}}
    for code, name in SEXES.items():
        groups["sex"][code] = ((sex == code).to_numpy(), {"sex": name})
    unknown_sex = ~sex.isin(list(SEXES)).to_numpy()
    if unknown_sex.any():
        groups["sex"][UNKNOWN] = (unknown_sex, {"sex": UNKNOWN})
    age = pd.to_numeric(df["age"], errors="coerce").to_numpy(dtype=float)
    known = np.isfinite(age)
    for label, lower, upper in age_bands(cuts):
        sel = known.copy()
        if lower is not None:
            sel &= age >= lower
        if upper is not None:
            sel &= age < upper
        groups["age"][label] = (sel, {"age_range": [lower, upper]})
    if cuts and not known.all():
        groups["age"][UNKNOWN] = (~known, {"age_range": None})
    if not cuts:
        del groups["age"]
    return groups


def demographic_metrics(df: pd.DataFrame, params: EvaluationParams, *,
                        youden_threshold: float | None, youden_source: str | None
                        ) -> dict[str, dict[str, dict[str, Any]]]:
    """metrics["subgroups_demographic"]: every metric per sex and per age band, with n and
    n_positive (a subgroup without patients has null metrics and a note)."""
    y, p = df["y"].to_numpy(), df["probability"].to_numpy()
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for factor, groups in demographic_groups(df, params.age_bands).items():
        out[factor] = {}
        for name, (sel, description) in groups.items():
            sub = diagnostic_metrics(y[sel], p[sel], params, youden_threshold=youden_threshold,
                                     youden_source=youden_source, decision_curve=False)
            out[factor][name] = {**description, **sub}
    return out


def evaluate_predictions(df: pd.DataFrame, params: EvaluationParams = EvaluationParams(), *,
                         youden_from: pd.DataFrame | None = None,
                         youden_source: str | None = None, youden: float | None = None,
                         subgroups: Mapping[str, Sequence[str]] | None = None,
                         sheet: pd.DataFrame | None = None) -> dict[str, Any]:
    """metrics.json's content for a site's predictions.

    The Youden threshold is ``youden`` when given (a trained system's, from its training
    sites), else chosen on ``youden_from`` (the training sites' predictions) and applied to this
    site; without either, it is chosen on this site itself (optimistic, noted). With the site's
    ``sheet``, the sex and age-band subgroups are measured too.
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
                                 youden_threshold=yt, youden_source=youden_source,
                                 decision_curve=False)
        sub["labels"] = list(labels)
        if not sel.any():
            present = sorted(df["label"].dropna().unique()) if "label" in df.columns else []
            sub["notes"].append(f"no patient has label(s) {', '.join(labels)} "
                                f"(labels present: {', '.join(present)})")
        metrics["subgroups"][name] = sub
    metrics["subgroups_demographic"] = {} if sheet is None else demographic_metrics(
        join_demographics(df, sheet), params, youden_threshold=yt, youden_source=youden_source)
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

    for key in ("n", "n_positive", "auc", "auc_variance", *METRIC_KEYS, "precision", "ppv",
                "npv", "threshold", "brier", "calibration_intercept", "calibration_slope"):
        put(key, metrics.get(key))
    if metrics.get("auc_ci"):
        put("auc_ci_low", metrics["auc_ci"][0])
        put("auc_ci_high", metrics["auc_ci"][1])
    for rate, ci in (metrics.get("ci") or {}).items():
        if ci:
            put(f"{rate}_ci_low", ci[0])
            put(f"{rate}_ci_high", ci[1])
    at = (metrics.get("decision_curve") or {}).get("at_threshold") or {}
    put("net_benefit", at.get("model"))
    put("net_benefit_treat_all", at.get("treat_all"))
    for key in ("threshold", *METRIC_KEYS):
        put(f"youden_{key}", (metrics.get("youden") or {}).get(key))
    put("hosmer_lemeshow_statistic", metrics["hosmer_lemeshow"]["statistic"])
    put("hosmer_lemeshow_p", metrics["hosmer_lemeshow"]["p"])
    for key, value in metrics["confusion"].items():
        put(f"confusion_{key}", value)
    for name, sub in (metrics.get("subgroups") or {}).items():
        out.update(flat_metrics(sub, prefix=f"{prefix}{name}/"))
    for factor, groups in (metrics.get("subgroups_demographic") or {}).items():
        for name, sub in groups.items():
            out.update(flat_metrics(sub, prefix=f"{prefix}{factor}:{metric_group_name(name)}/"))
    return out


def metric_group_name(name: str) -> str:
    """An age band or sex as MLflow allows in a metric name: <50 -> lt50, >=65 -> ge65."""
    return name.replace(">=", "ge").replace("<", "lt")


def log_to_mlflow(metrics: Mapping[str, Any], files: Sequence[Path], *,
                  tracking: TrackingParams, run_name: str, tags: Mapping[str, Any],
                  params: Mapping[str, Any], config: str | Path | None = None,
                  predictions: pd.DataFrame | None = None, model: Mapping[str, Any] | None = None
                  ) -> str:
    """One MLflow run with the metrics, params, tags and files as artifacts, the site's patients
    as its evaluation dataset and its metrics linked to the evaluated model; returns its id."""
    import mlflow

    from covidct.io.tracking import log_sheet_inputs, mlflow_run

    model = dict(model or {})
    tags = {**tags, **{f"covidct.{k}": v for k, v in model.items()
                       if k in ("model_version", "model_run_id") and v}}
    with mlflow_run(tracking, run_name, tags=tags, params=params, config=config) as run:
        if predictions is not None:
            log_sheet_inputs(mlflow, predictions[[c for c in ("patient", "site", "label", "y")
                                                  if c in predictions.columns]],
                             ", ".join(sorted(set(predictions.get("source", [])))) or "predictions",
                             "evaluation", model_id=model.get("model_id"))
        mlflow.log_metrics(flat_metrics(metrics), model_id=model.get("model_id"))
        for f in files:
            mlflow.log_artifact(str(f))
        return run.info.run_id


def evaluated_model(folder: Path | None, tracking: TrackingParams) -> dict[str, Any]:
    """The evaluated model's MLflow identity from its folder's run.json (or a trained system's
    plan.json): its model version, logged-model id and training run."""
    from covidct.io.results import PLAN_JSON, read_plan, read_run
    from covidct.io.tracking import logged_model_exists, model_version_of

    if folder is None:
        return {}
    folder = Path(folder)
    record = read_run(folder)
    if record is None and (folder / PLAN_JSON).exists():
        record = read_plan(folder).get("training_run") or {}
    record = record or {}
    name, version = record.get("registered_model"), record.get("version")
    model_id = record.get("model_id")
    if model_id is None and name and version is not None:
        found = model_version_of(tracking, name, version)
        source = str(getattr(found, "source", "") or "")
        model_id = getattr(found, "model_id", None) or (
            source[len("models:/"):] if source.startswith("models:/m-") else None)
    if model_id is not None and not logged_model_exists(tracking, model_id):
        log.warning("the evaluated model %s is not in %s (trained with another tracking "
                    "store?): its metrics are not linked to it", model_id, tracking.tracking_uri)
        model_id = None
    return {"model_version": f"{name}/{version}" if name and version is not None else None,
            "model_run_id": record.get("run_id"), "model_id": model_id}


# --------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    parser.add_argument("predictions", nargs="+", type=Path,
                        help="predictions.csv of the site (several are pooled, e.g. two training "
                             "sites); put these positional arguments before the options")
    parser.add_argument("outdir", type=Path,
                        help="folder for metrics.json, roc.png, calibration.png, decision.png")
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
    parser.add_argument("--sheet", nargs="+", type=Path, default=None, metavar="SITE_SHEET",
                        help="the site's sample sheet(s): each patient's age and sex give the "
                             "sex and age-band subgroups (--age-bands)")
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
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="folder of the evaluated model (its run.json or plan.json): the "
                             "MLflow run is linked to that model version")


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
    sheet = None
    if args.sheet:
        from covidct.io.sheet import read_sheet

        sheet = read_sheet(args.sheet)
        sheet.attrs["path"] = ", ".join(map(str, args.sheet))
    site = args.site or _single_value(df, "site") or args.outdir.name
    model = args.model_name or _single_value(df, "model") or ""

    log.info("evaluating site %s (model %s): %d patients, %d COVID-19, threshold %.3f",
             site, model or "?", len(df), int(df["y"].sum()), params.threshold)
    source = ", ".join(map(str, args.youden_from)) if args.youden_from else args.youden_source
    metrics = evaluate_predictions(df, params, youden_from=youden_df, youden_source=source,
                                   youden=args.youden_threshold, subgroups=subgroups,
                                   sheet=sheet)
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
    dca_png = decision_curve_figure([{"name": site, "decision_curve": metrics["decision_curve"]}],
                          outdir / "decision.png", title=f"Decision curve: {title}",
                          threshold=params.threshold)
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
        run_id = log_to_mlflow(metrics, [metrics_json, roc_png, cal_png, dca_png],
                               tracking=tracking,
                               config=args.config,
                               run_name=args.run_name or f"evaluate {site} {model}".strip(),
                               tags=tags, params=mlflow_params, predictions=df,
                               model=evaluated_model(args.model_dir, tracking))
        log.info("MLflow run %s in %s", run_id, tracking.tracking_uri)
    return 0
