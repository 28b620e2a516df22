"""``covidct tables``: Table 2, Table S2 and the combined Figures 3a/3b from per-site metrics.

Sites are the ``site`` keys of the metrics.json files (or ``--site-names``), in the order given;
the random-init ablation's files are matched to them by their own ``site`` key. ROC curves and
the paired DeLong comparison read the predictions.csv files each metrics.json lists. Undefined
cells read "n/a (one class)" or "n/a (no patients)".
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

log = logging.getLogger(__name__)

PRETRAINED = "DL system (EGFR-pretrained)"
RANDOM_INIT = "Random-init DL system"
DIFFERENCE = "Difference (pretrained - random init)"
METRIC_ROWS = (("accuracy", "Accuracy (%)"), ("sensitivity", "Sensitivity (%)"),
               ("specificity", "Specificity (%)"), ("f1", "F1-score (%)"))


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


def metric_column(metrics: Mapping[str, Any]) -> dict[str, str]:
    """One column of Table 2."""
    col = {"n": str(metrics["n"]), "COVID-19 (n)": str(metrics["n_positive"]),
           "AUC (95% CI)": auc_cell(metrics)}
    for key, row in METRIC_ROWS:
        col[row] = percent_cell(metrics, key)
    col["Threshold"] = f"{metrics['threshold']:.3f}" if metrics.get("threshold") is not None \
        else "n/a"
    col["Hosmer-Lemeshow statistic (p)"] = hl_cell(metrics)
    col["Youden threshold"] = youden_cell(metrics)
    col["Sensitivity / specificity at Youden (%)"] = youden_rates_cell(metrics)
    return col


# --------------------------------------------------------------------------- tables
def table2(sites: Sequence[tuple[str, Mapping[str, Any]]], subgroups: bool = True) -> pd.DataFrame:
    """Table 2: rows are the paper's metrics, columns the sites (and their subgroups)."""
    columns: dict[str, dict[str, str]] = {}
    for name, metrics in sites:
        columns[name] = metric_column(metrics)
        if subgroups:
            for sub_name, sub in (metrics.get("subgroups") or {}).items():
                columns[f"{name} {sub_name}"] = metric_column({**sub, "youden": sub.get("youden")})
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

    t2 = table2(sites, subgroups=not args.no_subgroups)
    write_csv(out / "table2.csv", t2, index=True)
    write_text(out / "table2.md", to_markdown(
        t2, caption="Table 2. Diagnostic performance of the DL system. Threshold and Youden "
                    "threshold as recorded by covidct evaluate."))
    log.info("Table 2: %d columns (%s)", t2.shape[1], ", ".join(t2.columns))

    if ablation:
        s2 = table_s2(sites, ablation)
        write_csv(out / "table_s2.csv", s2)
        write_text(out / "table_s2.md", to_markdown(
            s2, index=False,
            caption="Table S2. DL system without auxiliary EGFR training (random init) and with "
                    "it. Differences are pretrained minus random init, as measured; AUC "
                    "differences with the paired DeLong 95% CI and p where both models' "
                    "predictions are available."))
        for row in s2[s2["Method"] == DIFFERENCE].itertuples():
            log.info("Table S2: %s: AUC difference %s", row.Dataset, row[4])
    else:
        log.info("no --ablation given: Table S2 not written")

    combined_figures(sites, out)
    log.info("wrote tables and figures to %s", out)
    return 0
