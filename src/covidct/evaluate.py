"""``covidct evaluate``: the diagnostic performance of one site (Table 2, figure 3, Hosmer-Lemeshow).

Input is the site's ``predictions.csv`` from ``covidct predict-site`` (patient, site, label, y,
probability, feature_0..63). Output, in OUTDIR:

- ``metrics.json``: n, n_positive, auc, auc_ci [low, high], accuracy, sensitivity, specificity, f1,
  threshold, youden {threshold, accuracy, sensitivity, specificity, f1}, hosmer_lemeshow
  {statistic, p}, confusion {tn, fp, fn, tp}, calibration {bin_mean_predicted,
  bin_fraction_positive, bin_count}, subgroups {name: {same keys}}, notes [...];
- ``roc.png`` and ``calibration.png``.

Where a metric is undefined (a prognosis site with COVID-19 patients only, an empty subgroup) it is
``null`` and ``notes`` says why. Every file is written atomically, metrics.json last. With
``--tracking-uri`` one MLflow run per site receives the metrics, the json and the figures.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from covidct import stats
from covidct.errors import CovidctError
from covidct.zarrio import atomic_path

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("patient", "y", "probability")
METRIC_KEYS = ("accuracy", "sensitivity", "specificity", "f1")


# --------------------------------------------------------------------------- reading
def read_predictions(paths: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """Read one or more predictions.csv files into one table (checked: y in {0, 1}, p in [0, 1])."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    frames = []
    for path in map(Path, paths):
        if not path.is_file():
            raise CovidctError("predictions file not found", path=path)
        try:
            df = pd.read_csv(path, dtype={"patient": str, "site": str, "label": str})
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise CovidctError(f"cannot read predictions: {err}", path=path) from None
        missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
        if missing:
            raise CovidctError(f"predictions lack column(s) {', '.join(missing)}", path=path)
        for row in df.itertuples():
            prob = pd.to_numeric(row.probability, errors="coerce")
            if not (np.isfinite(prob) and 0.0 <= prob <= 1.0):
                raise CovidctError(f"probability {row.probability!r} is not in [0, 1]",
                                   patient=str(row.patient), path=path)
            if str(row.y) not in ("0", "1", "0.0", "1.0"):
                raise CovidctError(f"y {row.y!r} is not 0 or 1", patient=str(row.patient),
                                   path=path)
        df["probability"] = df["probability"].astype(float)
        df["y"] = df["y"].astype(float).astype(int)
        df["source"] = str(path)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    dup = out["patient"][out["patient"].duplicated()].unique()
    if len(dup):
        raise CovidctError(f"patient id(s) appear more than once: {', '.join(map(str, dup))}",
                           path=", ".join(map(str, paths)))
    return out


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


def diagnostic_metrics(y, p, threshold: float, *, youden_threshold: float | None = None,
                       youden_source: str | None = None, ci: str = "delong",
                       n_bootstrap: int = 2000, seed: int = 0, level: float = 0.95,
                       calibration_bins: int = 10, calibration_strategy: str = "quantile",
                       hl_groups: int = 10, positive_name: str = "COVID-19") -> dict[str, Any]:
    """Every metric of metrics.json for one group of patients (the site or a subgroup)."""
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
        auc, low, high = stats.auc_ci_bootstrap(y, p, n_bootstrap=n_bootstrap, level=level,
                                                seed=seed)
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

    hl = stats.hosmer_lemeshow(y, p, g=hl_groups) if n else {"statistic": None, "p": None,
                                                              "df": None, "groups": 0}
    if n and hl["statistic"] is None:
        notes.append(f"Hosmer-Lemeshow undefined: only {hl['groups']} distinct risk group(s)")
    out["hosmer_lemeshow"] = {"statistic": hl["statistic"], "p": hl["p"], "df": hl["df"],
                              "groups": hl["groups"]}
    out["confusion"] = at["confusion"]
    out["calibration"] = stats.calibration_curve(y, p, n_bins=calibration_bins,
                                                 strategy=calibration_strategy)
    out["notes"] = notes
    return out


def evaluate_predictions(df: pd.DataFrame, threshold: float = 0.5, *,
                         youden_from: pd.DataFrame | None = None,
                         youden_source: str | None = None,
                         subgroups: Mapping[str, Sequence[str]] | None = None,
                         **kwargs) -> dict[str, Any]:
    """metrics.json's content for a site's predictions (``kwargs`` go to diagnostic_metrics).

    The Youden threshold is chosen on ``youden_from`` (the training sites' predictions) and
    applied to this site; without it, it is chosen on this site itself (optimistic, noted).
    """
    notes: list[str] = []
    source = youden_from if youden_from is not None else df
    chosen = stats.youden_threshold(source["y"].to_numpy(), source["probability"].to_numpy())
    if youden_from is None:
        youden_source = "this site (optimistic: chosen and measured on the same patients)"
    if chosen is None:
        notes.append("Youden threshold undefined: its source predictions hold one class only")
    yt = None if chosen is None else chosen["threshold"]

    metrics = diagnostic_metrics(df["y"].to_numpy(), df["probability"].to_numpy(), threshold,
                                 youden_threshold=yt, youden_source=youden_source, **kwargs)
    if chosen is not None:
        metrics["youden"]["j_at_source"] = chosen["j"]
    metrics["notes"] = metrics["notes"] + notes

    metrics["subgroups"] = {}
    for name, labels in (subgroups or {}).items():
        if "label" not in df.columns:
            raise CovidctError(f"subgroup {name!r} needs a label column in the predictions",
                               path=", ".join(df["source"].unique()) if "source" in df else None)
        sel = df["label"].isin(list(labels))
        sub = diagnostic_metrics(df.loc[sel, "y"].to_numpy(), df.loc[sel, "probability"].to_numpy(),
                                 threshold, youden_threshold=yt, youden_source=youden_source,
                                 **kwargs)
        sub["labels"] = list(labels)
        if not sel.any():
            present = sorted(df["label"].dropna().unique()) if "label" in df.columns else []
            sub["notes"].append(f"no patient has label(s) {', '.join(labels)} "
                                f"(labels present: {', '.join(present)})")
        metrics["subgroups"][name] = sub
    return metrics


def clean_json(value):
    """Plain JSON values: numpy scalars to Python, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean_json(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return Path(path)


def format_auc(auc: float | None, ci: Sequence[float] | None) -> str:
    if auc is None:
        return "n/a"
    return f"{auc:.2f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")


def roc_figure(curves: Sequence[Mapping[str, Any]], path: str | Path, title: str = "ROC") -> Path:
    """ROC curves; each curve: name, y, p and optionally auc, auc_ci, points {label: threshold}."""
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls=":")
    drawn = 0
    for i, c in enumerate(curves):
        y, p = np.asarray(c["y"]), np.asarray(c["p"])
        if y.size == 0 or y.min() == y.max():
            log.info("ROC: %s skipped (one class only)", c["name"])
            continue
        fpr, tpr, _ = roc_curve(y, p)
        auc = c.get("auc")
        label = f"{c['name']}: AUC {format_auc(auc, c.get('auc_ci'))}" if auc is not None \
            else c["name"]
        line, = ax.plot(fpr, tpr, lw=1.8, ls=c.get("ls", "-"), label=label)
        for point_label, t in (c.get("points") or {}).items():
            if t is None:
                continue
            m = stats.threshold_metrics(y, p, t)
            ax.plot(1 - m["specificity"], m["sensitivity"], "o", color=line.get_color(), ms=5,
                    mfc="white" if "Youden" in point_label else line.get_color())
            ax.annotate(f"{point_label} {t:.2f}", (1 - m["specificity"], m["sensitivity"]),
                        textcoords="offset points", xytext=(6, -10), fontsize=7)
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "ROC undefined (one class only)", ha="center", va="center")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 - specificity",
           ylabel="sensitivity", title=title)
    ax.set_aspect("equal")
    if drawn:
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def calibration_figure(curves: Sequence[Mapping[str, Any]], path: str | Path,
                       title: str = "Calibration") -> Path:
    """Calibration curves; each curve: name, calibration {bin_*}, optional hosmer_lemeshow."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    for c in curves:
        cal = c["calibration"]
        if not cal["bin_count"]:
            continue
        hl = c.get("hosmer_lemeshow") or {}
        label = c["name"] + (f" (Hosmer-Lemeshow p={hl['p']:.3f})" if hl.get("p") is not None
                             else "")
        ax.plot(cal["bin_mean_predicted"], cal["bin_fraction_positive"], "o-", ms=4, lw=1.5,
                label=label)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="mean predicted probability",
           ylabel="observed fraction COVID-19", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


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


def log_to_mlflow(metrics: Mapping[str, Any], files: Sequence[Path], *, tracking_uri: str,
                  experiment: str, run_name: str, tags: Mapping[str, Any],
                  params: Mapping[str, Any], config: str | Path | None = None) -> str:
    """One MLflow run with the metrics, params, tags and files as artifacts; returns its id."""
    import mlflow

    from covidct.tracking import mlflow_run

    with mlflow_run(tracking_uri, run_name, experiment=experiment, tags=tags,
                    params=params, config=config) as run:
        mlflow.log_metrics(flat_metrics(metrics))
        for f in files:
            mlflow.log_artifact(str(f))
        return run.info.run_id


# --------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    parser.add_argument("predictions", nargs="+", type=Path,
                        help="predictions.csv of the site (several are pooled, e.g. two training "
                             "sites); put these positional arguments before the options")
    parser.add_argument("outdir", type=Path, help="folder for metrics.json, roc.png, calibration.png")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="probability at or above which a patient is called COVID-19 "
                             "(default 0.5; the authors' code used 0.8)")
    parser.add_argument("--youden-from", nargs="+", type=Path, default=None, metavar="CSV",
                        help="training-site predictions on which the Youden threshold is chosen "
                             "(default: this site itself, optimistic)")
    parser.add_argument("--ci", choices=("delong", "bootstrap"), default="delong",
                        help="AUC confidence interval method (default delong)")
    parser.add_argument("--ci-level", type=float, default=0.95, help="confidence level (0.95)")
    parser.add_argument("--n-bootstrap", type=int, default=2000,
                        help="bootstrap resamples with --ci bootstrap (2000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    parser.add_argument("--calibration-bins", type=int, default=10, help="calibration bins (10)")
    parser.add_argument("--calibration-strategy", choices=("quantile", "uniform"),
                        default="quantile", help="equal-count (quantile) or equal-width bins")
    parser.add_argument("--hl-groups", type=int, default=10,
                        help="Hosmer-Lemeshow groups g (10; df = g - 2)")
    parser.add_argument("--subgroup", action="extend", nargs="+", default=[],
                        metavar="NAME=LABELS",
                        help="stratified analysis, e.g. validation-viral=covid,viral")
    parser.add_argument("--site", default=None,
                        help="site name (default: the predictions' site column)")
    parser.add_argument("--role", default=None, help="the site's role, for the MLflow tag")
    parser.add_argument("--model-name", default=None,
                        help="model tag (default: the predictions' model column)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI, e.g. sqlite:///results/mlflow.db (none: no run)")
    parser.add_argument("--experiment", default="covidct", help="MLflow experiment (covidct)")
    parser.add_argument("--config", default=None, help="workflow config file (its hash tags the run)")
    parser.add_argument("--run-name", default=None,
                        help="MLflow run name (default 'evaluate SITE MODEL')")


def _single_value(df: pd.DataFrame, column: str) -> str | None:
    if column not in df.columns:
        return None
    values = sorted({str(v) for v in df[column].dropna().unique() if str(v)})
    return "+".join(values) if values else None


def run(args) -> int:
    if not 0.0 <= args.threshold <= 1.0:
        raise CovidctError(f"--threshold {args.threshold} is not a probability in [0, 1]")
    df = read_predictions(args.predictions)
    if df.empty:
        raise CovidctError("no patients in the predictions", path=", ".join(map(str, args.predictions)))
    subgroups = parse_subgroups(args.subgroup)
    youden_df = read_predictions(args.youden_from) if args.youden_from else None
    site = args.site or _single_value(df, "site") or args.outdir.name
    model = args.model_name or _single_value(df, "model") or ""

    log.info("evaluating site %s (model %s): %d patients, %d COVID-19, threshold %.3f",
             site, model or "?", len(df), int(df["y"].sum()), args.threshold)
    metrics = evaluate_predictions(
        df, args.threshold, youden_from=youden_df,
        youden_source=", ".join(map(str, args.youden_from)) if args.youden_from else None,
        subgroups=subgroups, ci=args.ci, n_bootstrap=args.n_bootstrap, seed=args.seed,
        level=args.ci_level, calibration_bins=args.calibration_bins,
        calibration_strategy=args.calibration_strategy, hl_groups=args.hl_groups)
    metrics = {"site": site, "model": model, "role": args.role,
               "predictions": [str(p) for p in args.predictions],
               "ci_method": args.ci, "ci_level": args.ci_level,
               **({"n_bootstrap": args.n_bootstrap, "seed": args.seed}
                  if args.ci == "bootstrap" else {}),
               **metrics}
    metrics = clean_json(metrics)
    for note in metrics["notes"]:
        log.warning("%s: %s", site, note)

    outdir = args.outdir
    outdir.mkdir(parents=True, exist_ok=True)
    points = {"threshold": args.threshold, "Youden": metrics["youden"]["threshold"]}
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
    metrics_json = outdir / "metrics.json"
    with atomic_path(metrics_json) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")

    auc_text = format_auc(metrics["auc"], metrics["auc_ci"])
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    log.info("%s: AUC %s, accuracy %s, sensitivity %s, specificity %s, Hosmer-Lemeshow p %s",
             site, auc_text, pct(metrics["accuracy"]), pct(metrics["sensitivity"]),
             pct(metrics["specificity"]),
             "n/a" if metrics["hosmer_lemeshow"]["p"] is None
             else f"{metrics['hosmer_lemeshow']['p']:.3f}")

    if args.tracking_uri:
        tags = {"site": site, "model": model, "covidct.stage": "evaluate"}
        if args.role:
            tags["role"] = args.role
        params = {"threshold": args.threshold, "ci_method": args.ci, "ci_level": args.ci_level,
                  "calibration_bins": args.calibration_bins,
                  "calibration_strategy": args.calibration_strategy,
                  "hl_groups": args.hl_groups, "youden_source": metrics["youden"]["source"],
                  "subgroups": json.dumps(subgroups)}
        if args.ci == "bootstrap":
            params.update(n_bootstrap=args.n_bootstrap, seed=args.seed)
        run_id = log_to_mlflow(metrics, [metrics_json, roc_png, cal_png],
                               tracking_uri=args.tracking_uri, experiment=args.experiment,
                               config=args.config,
                               run_name=args.run_name or f"evaluate {site} {model}".strip(),
                               tags=tags, params=params)
        log.info("MLflow run %s in %s", run_id, args.tracking_uri)
    return 0
