"""``covidct tables``: Table 2, Table S2, the combined Figures 3a/3b, the forest plot of AUC
across sites with its heterogeneity table, and the sex and age-band subgroups, from per-site
metrics.

Sites are the ``site`` keys of the metrics.json files (or ``--site-names``), in the order given;
the random-init ablation's files are matched to them by their own ``site`` key. ROC curves, the
paired DeLong comparison and Table 2's pooled column read the predictions.csv files each
metrics.json lists. Undefined cells read "n/a (one class)" or "n/a (no patients)".

Pooling (Table 2's pooled column, the forest plot's pooled AUC) takes the external sites only:
a site whose role includes ``train`` was measured on the patients the model learnt from, so its
optimistic figures are shown but never pooled.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from covidct.analysis import stats
from covidct.errors import CovidctError
from covidct.io.atomic import write_csv, write_text
from covidct.io.results import read_metrics, read_predictions
from covidct.params import EvaluationParams, TrackingParams, add_options, from_args

log = logging.getLogger(__name__)

PRETRAINED = "DL system (EGFR-pretrained)"
RANDOM_INIT = "Random-init DL system"
DIFFERENCE = "Difference (pretrained - random init)"
METRIC_ROWS = (("accuracy", "Accuracy (%)"), ("sensitivity", "Sensitivity (%)"),
               ("specificity", "Specificity (%)"), ("f1", "F1-score (%)"))
RATE_ROWS = (("accuracy", "Accuracy (%, 95% CI)"), ("sensitivity", "Sensitivity (%, 95% CI)"),
             ("specificity", "Specificity (%, 95% CI)"), ("ppv", "PPV (%, 95% CI)"),
             ("npv", "NPV (%, 95% CI)"))
"""Table 2's rates with their Wilson interval, as metrics.json's ``ci`` holds them."""
POOLED = "Pooled external sites"
OUTPUTS = ("table2.md", "table2.csv", "table_s2.md", "table_s2.csv", "table_heterogeneity.md",
           "table_heterogeneity.csv", "table_subgroups.md", "table_subgroups.csv",
           "figure3a_roc.png", "figure3b_calibration.png", "figure_forest_auc.png")
NOT_CALLED = {"ppv": "n/a (nobody called COVID-19)", "npv": "n/a (nobody called non-COVID)"}


# --------------------------------------------------------------------------- loading
def prediction_files(metrics: Mapping[str, Any]) -> list[Path]:
    """The predictions.csv files a metrics.json was computed from, where they still exist."""
    listed = [Path(p) for p in metrics.get("predictions") or []]
    found = [p for p in listed if p.is_file()]
    if listed and len(found) == len(listed):
        return found
    beside = Path(metrics["_path"]).parent / "predictions.csv"
    return [beside] if beside.is_file() else []


def load_predictions(metrics: Mapping[str, Any]) -> pd.DataFrame | None:
    files = prediction_files(metrics)
    return read_predictions(files) if files else None


# --------------------------------------------------------------------------- cells
def undefined(metrics: Mapping[str, Any]) -> str:
    n, npos = metrics.get("n") or 0, metrics.get("n_positive") or 0
    if n == 0:
        return "n/a (no patients)"
    if npos in (0, n):
        return "n/a (one class)"
    return "n/a"


def auc_cell(metrics: Mapping[str, Any]) -> str:
    if metrics.get("auc") is None:
        return undefined(metrics)
    ci = metrics.get("auc_ci")
    return f"{metrics['auc']:.2f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else " (CI n/a)")


def percent_cell(metrics: Mapping[str, Any], key: str) -> str:
    value = metrics.get(key)
    return undefined(metrics) if value is None else f"{100.0 * value:.2f}"


def hl_cell(metrics: Mapping[str, Any]) -> str:
    hl = metrics.get("hosmer_lemeshow") or {}
    if hl.get("p") is None:
        return "n/a (no patients)" if not metrics.get("n") else "n/a (< 3 risk groups)"
    return f"{hl['statistic']:.2f} (p={hl['p']:.3f})"


def youden_cell(metrics: Mapping[str, Any]) -> str:
    yd = metrics.get("youden") or {}
    if yd.get("threshold") is None:
        return "n/a (one class in its source)"
    return f"{yd['threshold']:.3f}"


def youden_rates_cell(metrics: Mapping[str, Any]) -> str:
    yd = metrics.get("youden") or {}
    if yd.get("threshold") is None:
        return "n/a (one class in its source)"
    return " / ".join(undefined(metrics) if yd.get(k) is None else f"{100.0 * yd[k]:.2f}"
                      for k in ("sensitivity", "specificity"))


def rate_cell(metrics: Mapping[str, Any], key: str) -> str:
    """A rate in percent with its Wilson 95% CI, e.g. 85.00 (76.12-90.95)."""
    value = metrics.get(key)
    if value is None:
        return NOT_CALLED[key] if key in NOT_CALLED and metrics.get("n") else undefined(metrics)
    ci = (metrics.get("ci") or {}).get(key)
    return f"{100.0 * value:.2f}" + (f" ({100.0 * ci[0]:.2f}-{100.0 * ci[1]:.2f})" if ci else "")


def number_cell(metrics: Mapping[str, Any], key: str, digits: int = 3) -> str:
    """A plain number; undefined calibration with both classes present means separated
    classes."""
    value = metrics.get(key)
    if value is not None:
        return f"{value:.{digits}f}"
    if key not in metrics:
        return "n/a (not recorded)"
    n, npos = metrics.get("n") or 0, metrics.get("n_positive") or 0
    return "n/a (classes separated)" if 0 < npos < n else undefined(metrics)


def metric_column(metrics: Mapping[str, Any]) -> dict[str, str]:
    """One column of Table 2."""
    col = {"n": str(metrics["n"]), "COVID-19 (n)": str(metrics["n_positive"]),
           "AUC (95% CI)": auc_cell(metrics)}
    for key, row in RATE_ROWS:
        col[row] = rate_cell(metrics, key)
    col["F1-score (%)"] = percent_cell(metrics, "f1")
    col["Threshold"] = f"{metrics['threshold']:.3f}" if metrics.get("threshold") is not None \
        else "n/a"
    col["Brier score"] = number_cell(metrics, "brier")
    col["Calibration intercept"] = number_cell(metrics, "calibration_intercept", 2)
    col["Calibration slope"] = number_cell(metrics, "calibration_slope", 2)
    col["Hosmer-Lemeshow statistic (p)"] = hl_cell(metrics)
    col["Youden threshold"] = youden_cell(metrics)
    col["Sensitivity / specificity at Youden (%)"] = youden_rates_cell(metrics)
    return col


# --------------------------------------------------------------------------- tables
def table2(sites: Sequence[tuple[str, Mapping[str, Any]]], subgroups: bool = True,
           pooled: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Table 2: rows are the paper's metrics, columns the sites (and their subgroups), then the
    pooled external sites where given."""
    columns: dict[str, dict[str, str]] = {}
    for name, metrics in sites:
        columns[name] = metric_column(metrics)
        if subgroups:
            for sub_name, sub in (metrics.get("subgroups") or {}).items():
                columns[f"{name} {sub_name}"] = metric_column({**sub, "youden": sub.get("youden")})
    if pooled is not None:
        columns[POOLED] = metric_column(pooled)
    df = pd.DataFrame(columns)
    df.index.name = "metric"
    return df


def _difference_row(site: str, pre: Mapping[str, Any], rnd: Mapping[str, Any],
                    paired: dict | None) -> dict[str, str]:
    row = {"Method": DIFFERENCE, "Dataset": site, "n": f"{pre['n']} / {rnd['n']}"}
    if pre.get("auc") is None or rnd.get("auc") is None:
        row["AUC (95% CI)"] = undefined(pre if pre.get("auc") is None else rnd)
    elif paired is not None:
        lo, hi = paired["ci"]
        row["AUC (95% CI)"] = (f"{paired['difference']:+.3f} ({lo:+.3f} to {hi:+.3f}), "
                               f"p={paired['p']:.3g} (paired DeLong)")
    else:
        row["AUC (95% CI)"] = f"{pre['auc'] - rnd['auc']:+.3f} (not paired: predictions missing)"
    for key, name in METRIC_ROWS:
        a, b = pre.get(key), rnd.get(key)
        row[name] = undefined(pre if a is None else rnd) if a is None or b is None \
            else f"{100.0 * (a - b):+.2f}"
    return row


def paired_delong(pre: Mapping[str, Any], rnd: Mapping[str, Any]) -> dict | None:
    """Paired DeLong test of the two models on the site's patients, where both predictions exist."""
    a, b = load_predictions(pre), load_predictions(rnd)
    if a is None or b is None:
        return None
    merged = a[["patient", "y", "probability"]].merge(
        b[["patient", "y", "probability"]], on="patient", suffixes=("_pre", "_rnd"))
    if len(merged) != len(a) or len(merged) != len(b) or \
            (merged["y_pre"] != merged["y_rnd"]).any():
        log.warning("paired DeLong skipped: the two models' predictions cover different patients")
        return None
    m, n = stats.class_counts(merged["y_pre"].to_numpy())
    if m < 2 or n < 2:
        return None
    return stats.delong_roc_test(merged["y_pre"], merged["probability_pre"],
                                 merged["probability_rnd"])


def table_s2(sites: Sequence[tuple[str, Mapping[str, Any]]],
             ablation: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Table S2: random-init and pretrained per site, then the measured difference per site
    (only the sites that have ablation metrics)."""
    rows = []
    for method, source in ((RANDOM_INIT, ablation), (PRETRAINED, dict(sites))):
        for name, _ in sites:
            metrics = source.get(name)
            if metrics is None or name not in ablation:
                continue
            row = {"Method": method, "Dataset": name, "n": str(metrics["n"]),
                   "AUC (95% CI)": auc_cell(metrics)}
            row.update({label: percent_cell(metrics, key) for key, label in METRIC_ROWS})
            rows.append(row)
    for name, pre in sites:
        rnd = ablation.get(name)
        if rnd is not None:
            rows.append(_difference_row(name, pre, rnd, paired_delong(pre, rnd)))
    columns = ["Method", "Dataset", "n", "AUC (95% CI)", *[label for _, label in METRIC_ROWS]]
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------- pooling
def is_training_site(metrics: Mapping[str, Any]) -> bool:
    """Whether the site's role (as covidct evaluate recorded it) includes train."""
    return "train" in [r.strip() for r in str(metrics.get("role") or "").split(",")]


def external_sites(sites: Sequence[tuple[str, Mapping[str, Any]]]
                   ) -> list[tuple[str, Mapping[str, Any]]]:
    return [(name, m) for name, m in sites if not is_training_site(m)]


def _common(values: Sequence[Any]) -> tuple[bool, Any]:
    """(True, the value) when every value is the same, else (False, None)."""
    distinct = {repr(v): v for v in values}
    return (True, next(iter(distinct.values()))) if len(distinct) == 1 else (False, None)


def pooled_metrics(sites: Sequence[tuple[str, Mapping[str, Any]]],
                   params: EvaluationParams = EvaluationParams()) -> dict[str, Any] | None:
    """Table 2's pooled column: the external sites' predictions together, measured as one site at
    ``params`` and the sites' common Youden threshold. None without an external site or when a
    site's predictions.csv is missing."""
    from covidct.analysis.evaluate import diagnostic_metrics

    external = external_sites(sites)
    if not external:
        log.info("pooled column: no external site (every site is a training site)")
        return None
    frames = []
    for name, metrics in external:
        df = load_predictions(metrics)
        if df is None:
            log.warning("pooled column left out: no predictions.csv found for site %s", name)
            return None
        frames.append(df[["y", "probability"]])
    df = pd.concat(frames, ignore_index=True)
    notes = []
    same, youden = _common([(m.get("youden") or {}).get("threshold") for _, m in external])
    if not same:
        notes.append("the sites' Youden thresholds differ: none applied to the pooled patients")
    same_t, _ = _common([m.get("threshold") for _, m in external] + [params.threshold])
    if not same_t:
        notes.append(f"a site was evaluated at another threshold than the pooled column's "
                     f"{params.threshold}")
    sources = {(m.get("youden") or {}).get("source") for _, m in external}
    pooled = diagnostic_metrics(df["y"].to_numpy(), df["probability"].to_numpy(), params,
                                youden_threshold=youden,
                                youden_source=sources.pop() if len(sources) == 1 else None)
    pooled["sites"] = [name for name, _ in external]
    pooled["notes"] = pooled["notes"] + notes
    for note in pooled["notes"]:
        log.warning("pooled column: %s", note)
    return pooled


def auc_forest(sites: Sequence[tuple[str, Mapping[str, Any]]], level: float = 0.95
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The forest plot's rows (every site's AUC with its DeLong CI, whether it is pooled and
    why not) and the inverse-variance meta-analysis of the pooled ones' AUCs and DeLong
    variances (stats.inverse_variance_meta; the pooled CIs clipped to [0, 1])."""
    rows, estimates, variances = [], [], []
    for name, metrics in sites:
        auc, variance = metrics.get("auc"), metrics.get("auc_variance")
        if auc is None:
            reason = "no patients" if not metrics.get("n") else "one class only: no AUC"
        elif is_training_site(metrics):
            reason = "training site: not pooled"
        elif variance is None:
            reason = "DeLong variance undefined (< 2 patients in a class): not pooled"
        elif variance <= 0:
            reason = "DeLong variance 0 (classes separated): not pooled"
        else:
            reason = None
        ci = list(stats.auc_normal_ci(auc, variance, level)) \
            if auc is not None and variance is not None else metrics.get("auc_ci")
        rows.append({"name": name, "n": metrics.get("n"), "auc": auc, "ci": ci,
                     "variance": variance, "pooled": reason is None, "note": reason})
        if reason is None:
            estimates.append(auc)
            variances.append(variance)
    meta = stats.inverse_variance_meta(estimates, variances, level)
    meta["sites"] = [r["name"] for r in rows if r["pooled"]]
    for key in ("fixed", "random"):
        if meta[key]["ci"] is not None:
            meta[key]["ci"] = [max(0.0, meta[key]["ci"][0]), min(1.0, meta[key]["ci"][1])]
    pooled_rows = [r for r in rows if r["pooled"]]
    for i, row in enumerate(pooled_rows):
        row["weight_fixed"] = meta["fixed"]["weights"][i]
        row["weight_random"] = meta["random"]["weights"][i]
        row["note"] = (f"{row['auc']:.3f} ({row['ci'][0]:.3f}-{row['ci'][1]:.3f}), weight "
                       f"{100 * row['weight_random']:.0f}%")
    return rows, meta


def _pooled_cell(pooled: Mapping[str, Any]) -> str:
    if pooled.get("estimate") is None:
        return "n/a (no site pooled)"
    lo, hi = pooled["ci"]
    return f"{pooled['estimate']:.3f} ({lo:.3f}-{hi:.3f})"


def heterogeneity_table(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]
                        ) -> pd.DataFrame:
    """The forest plot's numbers: the pooled AUC (fixed and random effects), Cochran's Q with
    its df and p, I^2 and tau^2, and which sites were pooled."""
    few = f"n/a ({meta['k']} site(s) pooled, needs 2)"

    def value(key: str, fmt: str) -> str:
        return few if meta.get(key) is None else format(meta[key], fmt)

    left_out = [f"{r['name']} ({r['note']})" for r in rows if not r["pooled"]]
    table = [
        ("Sites pooled", ", ".join(meta["sites"]) or "none"),
        ("Sites not pooled", "; ".join(left_out) or "none"),
        ("k", str(meta["k"])),
        ("Pooled AUC, fixed effect, inverse variance (95% CI)", _pooled_cell(meta["fixed"])),
        ("Pooled AUC, random effects, DerSimonian-Laird (95% CI)",
         _pooled_cell(meta["random"])),
        ("Cochran's Q", value("q", ".3f")),
        ("df", str(meta["df"]) if meta.get("df") is not None else few),
        ("p (Q)", value("q_p", ".4g")),
        ("I^2 (%)", few if meta.get("i_squared") is None else f"{100 * meta['i_squared']:.1f}"),
        ("tau^2", value("tau_squared", ".5f")),
    ]
    return pd.DataFrame(table, columns=["statistic", "value"])


def demographic_table(sites: Sequence[tuple[str, Mapping[str, Any]]]) -> pd.DataFrame:
    """One row per site and sex or age band (metrics.json's subgroups_demographic)."""
    columns = ["Site", "Subgroup", "n", "COVID-19 (n)", "AUC (95% CI)",
               *[label for _, label in RATE_ROWS[:3]]]
    rows = []
    for name, metrics in sites:
        for factor, groups in (metrics.get("subgroups_demographic") or {}).items():
            for key, sub in groups.items():
                label = sub.get("sex", key) if factor == "sex" else key
                rows.append([name, f"{factor} {label}", str(sub["n"]), str(sub["n_positive"]),
                             auc_cell(sub), *[rate_cell(sub, k) for k, _ in RATE_ROWS[:3]]])
    return pd.DataFrame(rows, columns=columns)


def to_markdown(df: pd.DataFrame, index: bool = True, caption: str | None = None) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    frame = df.reset_index() if index else df
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "/") for v in row) + " |")
    text = "\n".join(lines) + "\n"
    return (caption + "\n\n" + text) if caption else text


# --------------------------------------------------------------------------- figures
def combined_figures(sites: Sequence[tuple[str, Mapping[str, Any]]], out_dir: Path,
                     ) -> tuple[Path, Path]:
    """Figure 3a (ROC, one curve per site) and 3b (calibration, one curve per site)."""
    from covidct.analysis.figures import calibration_figure, roc_figure

    curves = []
    for name, metrics in sites:
        df = load_predictions(metrics)
        if df is None:
            log.warning("figure 3a: no predictions.csv found for site %s; its curve is left out",
                        name)
            continue
        curves.append({"name": name, "y": df["y"], "p": df["probability"],
                       "auc": metrics.get("auc"), "auc_ci": metrics.get("auc_ci")})
    roc = roc_figure(curves, out_dir / "figure3a_roc.png", title="ROC of the DL system")
    cal = calibration_figure([{"name": name, "calibration": m["calibration"],
                               "hosmer_lemeshow": m.get("hosmer_lemeshow")}
                              for name, m in sites if m.get("calibration")],
                             out_dir / "figure3b_calibration.png",
                             title="Calibration of the DL system")
    return roc, cal


# --------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    parser.add_argument("--metrics", nargs="+", required=True, type=Path, metavar="JSON",
                        help="metrics.json of each site (pretrained model), in column order")
    parser.add_argument("--site-names", nargs="+", default=None, metavar="NAME",
                        help="column names for --metrics, in order (default: their 'site' key)")
    parser.add_argument("--ablation", nargs="+", default=[], type=Path, metavar="JSON",
                        help="metrics.json of the random-init model per site (Table S2)")
    parser.add_argument("--ablation-site-names", nargs="+", default=None, metavar="NAME",
                        help="site names for --ablation, in order (default: their 'site' key)")
    parser.add_argument("--no-subgroups", action="store_true",
                        help="leave the subgroup columns out of Table 2")
    parser.add_argument("--out-dir", required=True, type=Path, help="folder for the tables")
    add_options(parser, EvaluationParams)
    add_options(parser, TrackingParams)


def _named(paths: Sequence[Path], names: Sequence[str] | None) -> list[tuple[str, dict]]:
    if names is not None and len(names) != len(paths):
        raise CovidctError(f"--site-names gives {len(names)} names for {len(paths)} files")
    out = []
    for i, path in enumerate(paths):
        metrics = read_metrics(path)
        name = names[i] if names else (metrics.get("site") or path.parent.name)
        if name in dict(out):
            raise CovidctError(f"site {name!r} appears twice (use --site-names)", path=path)
        out.append((name, metrics))
    return out


def write_table(out: Path, stem: str, table: pd.DataFrame, caption: str,
                index: bool = False) -> None:
    """``out/stem.csv`` and ``out/stem.md`` (the table under ``caption``)."""
    write_csv(out / f"{stem}.csv", table, index=index)
    write_text(out / f"{stem}.md", to_markdown(table, index=index, caption=caption))


def write_heterogeneity(sites: Sequence[tuple[str, Mapping[str, Any]]], out: Path,
                        level: float = 0.95) -> dict[str, Any]:
    """figure_forest_auc.png and table_heterogeneity.csv|md; returns the meta-analysis."""
    from covidct.analysis.figures import forest_figure

    rows, meta = auc_forest(sites, level)
    table = heterogeneity_table(rows, meta)
    write_table(out, "table_heterogeneity", table,
                "AUC across the external sites: inverse-variance pooling of each site's AUC with "
                "its DeLong variance (fixed effect, and DerSimonian-Laird random effects), "
                "Cochran's Q, I^2 = max(0, (Q - df) / Q) and tau^2. Training sites and sites "
                "without a DeLong variance are not pooled.")
    forest_figure(rows, meta, out / "figure_forest_auc.png",
                  title="AUC of the DL system across sites")
    log.info("heterogeneity: %s", "; ".join(f"{s}: {v}" for s, v in table.itertuples(index=False)))
    return meta


def run(args) -> int:
    sites = _named(args.metrics, args.site_names)
    ablation = dict(_named(args.ablation, args.ablation_site_names)) if args.ablation else {}
    unknown = sorted(set(ablation) - set(dict(sites)))
    if unknown:
        raise CovidctError(f"ablation metrics for site(s) {', '.join(unknown)} that --metrics "
                           f"lacks (known: {', '.join(n for n, _ in sites)})",
                           path=", ".join(ablation[u]["_path"] for u in unknown))
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)

    params = from_args(EvaluationParams, args)
    pooled = pooled_metrics(sites, params)
    t2 = table2(sites, subgroups=not args.no_subgroups, pooled=pooled)
    pooled_note = (f" {POOLED}: the patients of {', '.join(pooled['sites'])} together (training "
                   "sites are never pooled)." if pooled else "")
    write_table(out, "table2", t2,
                "Table 2. Diagnostic performance of the DL system. Rates at the threshold "
                "with their Wilson score 95% CI; the calibration intercept (calibration-in-"
                "the-large) and slope of a logistic recalibration on logit(p). Threshold and "
                "Youden threshold as recorded by covidct evaluate." + pooled_note, index=True)
    log.info("Table 2: %d columns (%s)", t2.shape[1], ", ".join(t2.columns))

    write_heterogeneity(sites, out, level=params.ci_level)
    subgroups = demographic_table(sites)
    write_table(out, "table_subgroups", subgroups,
                "Diagnostic performance by sex and age band per site (the site sheet's age and "
                "sex; age bands lower <= age < upper). Rates with their Wilson 95% CI."
                + ("" if len(subgroups) else " No site has these subgroups (covidct evaluate "
                                             "ran without --sheet)."))

    if ablation:
        s2 = table_s2(sites, ablation)
        write_table(out, "table_s2", s2,
                    "Table S2. DL system without auxiliary EGFR training (random init) and with "
                    "it. Differences are pretrained minus random init, as measured; AUC "
                    "differences with the paired DeLong 95% CI and p where both models' "
                    "predictions are available.")
        for row in s2[s2["Method"] == DIFFERENCE].itertuples():
            log.info("Table S2: %s: AUC difference %s", row.Dataset, row[4])
    else:
        log.info("no --ablation given: Table S2 not written")

    combined_figures(sites, out)
    log.info("wrote tables and figures to %s", out)
    from covidct.io.tracking import log_files

    log_files(from_args(TrackingParams, args), "tables", "tables",
              [out / name for name in OUTPUTS if (out / name).exists()])
    return 0
