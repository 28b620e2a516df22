"""``covidct prognosis``: a Cox model of hospital stay, risk groups and Kaplan-Meier per site.

The 64-d DL feature of COVID-19Net with age, sex and comorbidity are the candidate covariates of
a Cox model of hospital stay (discharge = the event), fitted on the training sites' COVID-19
patients with follow-up: the paper's stepwise selection, or one cross-validated ridge model.
The median training risk splits high from low risk, unchanged at the validation sites.
**risk = -log partial hazard of discharge; high risk = longer hospital stay.** Outputs:
cox.json (for ``covidct predict``), {site}/km.png and {site}/logrank.json, and Table S3.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidct.analysis.scoring import DIRECTION, code_sex, risk, risk_scores
from covidct.analysis.survival import RIDGE_FOLDS, RIDGE_REPEATS
from covidct.errors import CovidctError
from covidct.io.atomic import write_csv, write_json, write_text
from covidct.io.results import FEATURE_RE, feature_columns, read_predictions, write_cox
from covidct.params import PrognosisParams, TrackingParams, add_options, from_args

log = logging.getLogger(__name__)

CLINICAL = ("age", "sex", "comorbidity")
DURATION = "stay_days"
EVENT = "discharged"
HR_NOTE = ("HR = univariate hazard ratio of discharge per unit of the covariate (age per year, "
           "sex male vs female, comorbidity yes vs no, DL features per unit of the feature); "
           "HR < 1 means a longer hospital stay.")


# --------------------------------------------------------------------------- names and coding

def display_name(covariate: str) -> str:
    """``feature_22`` -> ``DL feature-22``; clinical names are kept."""
    m = FEATURE_RE.match(covariate)
    return f"DL feature-{m.group(1)}" if m else covariate


# --------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", nargs="+", default=[], type=Path, metavar="PREDICTIONS.csv",
                        help="predictions.csv of the training site(s): the Cox model is fitted "
                             "on their COVID-19 patients with follow-up (pooled)")
    parser.add_argument("--cox", type=Path, default=None, metavar="COX.json",
                        help="apply this Cox model and cut-off (a trained system's) instead of "
                             "fitting one: only --validate sites, no Table S3")
    parser.add_argument("--validate", nargs="*", default=[], type=Path, metavar="PREDICTIONS.csv",
                        help="predictions.csv of validation site(s): scored with the training "
                             "model and cut-off, unchanged")
    parser.add_argument("--sheet", required=True, nargs="+", type=Path,
                        help="sample sheet(s) (TSV) with age, sex, comorbidity, stay_days, "
                             "discharged")
    parser.add_argument("--out-dir", type=Path, default=Path("results/prognosis"),
                        help="cox.json and {site}/km.png, {site}/logrank.json go here")
    parser.add_argument("--tables-dir", type=Path, default=Path("results/tables"),
                        help="where table_s3.csv and table_s3.md go")
    add_options(parser, PrognosisParams)
    add_options(parser, TrackingParams)
    parser.add_argument("--config", default=None,
                        help="workflow config file (hashed into the MLflow tags)")


# --------------------------------------------------------------------------- data

def load_cohort(train: Sequence[Path], validate: Sequence[Path], sheet_path: Path,
                min_follow_up_days: float = PrognosisParams.min_follow_up_days,
                ) -> tuple[pd.DataFrame, list[str], list[str], dict, dict]:
    """Join predictions with the sheet; returns ``(cohort, features, sites, notes, short)``.

    ``cohort`` holds the COVID-19 patients with at least ``min_follow_up_days`` of follow-up
    (columns patient, site, role, stay_days, discharged, age, sex (0/1), comorbidity,
    feature_*); ``sites`` lists every site of the inputs, training sites first; ``notes`` maps
    site -> list of notes (exclusions, ...); ``short`` maps site -> the number of COVID-19
    patients left out for a shorter follow-up.
    """
    from covidct.io.sheet import read_sheet

    sheet = read_sheet(sheet_path).set_index("patient", drop=False)
    frames, roles, feature_sets = [], {}, {}
    for role, paths in (("train", train), ("validate", validate)):
        for path in paths:
            df = read_predictions(path, features=True)
            for site in df["site"].unique():
                if site in roles and roles[site] != role:
                    raise CovidctError(f"site {site} is given both as training and validation "
                                       f"site", path=path)
                roles[site] = role
            feature_sets[str(path)] = feature_columns(df)
            df["role"] = role
            frames.append(df)
    reference = next(iter(feature_sets.values()))
    for path, cols in feature_sets.items():
        if set(cols) != set(reference):
            raise CovidctError(f"predictions have {len(cols)} DL feature columns, others have "
                               f"{len(reference)}", path=path)
    features = list(reference)
    preds = pd.concat(frames, ignore_index=True)
    dup = preds["patient"][preds["patient"].duplicated()]
    if len(dup):
        raise CovidctError("patient appears in more than one predictions row or file",
                           patient=str(dup.iloc[0]), path=preds.loc[dup.index[0], "source"])
    sites = ([s for s in dict.fromkeys(preds["site"]) if roles[s] == "train"]
             + [s for s in dict.fromkeys(preds["site"]) if roles[s] == "validate"])
    notes: dict[str, list[str]] = {s: [] for s in sites}
    short = dict.fromkeys(sites, 0)
    rows = []
    for rec in preds.itertuples(index=False):
        rec = rec._asdict()
        if int(rec["y"]) != 1:
            continue
        pid = str(rec["patient"])
        if pid not in sheet.index:
            raise CovidctError("patient of the predictions is not in the sample sheet",
                               patient=pid, path=sheet_path)
        info = sheet.loc[pid]
        stay, event = info[DURATION], info[EVENT]
        if pd.isna(stay) or pd.isna(event):
            continue  # no follow-up
        if not np.isfinite(stay) or stay < 0:
            raise CovidctError(f"stay_days {stay} is not a non-negative number", patient=pid,
                               path=sheet_path)
        if int(event) not in (0, 1):
            raise CovidctError(f"discharged {event} is not 0 or 1", patient=pid, path=sheet_path)
        if stay < min_follow_up_days:
            short[rec["site"]] += 1
            continue
        try:
            sex = code_sex(info["sex"])
        except ValueError as err:
            raise CovidctError(str(err), patient=pid, path=sheet_path) from err
        clinical = {"age": info["age"], "sex": sex, "comorbidity": info["comorbidity"]}
        missing = [k for k, v in clinical.items() if pd.isna(v)]
        if missing:
            raise CovidctError(f"{', '.join(missing)} missing (needed for the prognosis of a "
                               f"COVID-19 patient with follow-up)", patient=pid, path=sheet_path)
        row = {"patient": pid, "site": rec["site"], "role": rec["role"],
               DURATION: float(stay), EVENT: int(event),
               "age": float(clinical["age"]), "sex": float(sex),
               "comorbidity": float(clinical["comorbidity"])}
        row.update({f: float(rec[f]) for f in features})
        if any(not np.isfinite(row[f]) for f in features):
            raise CovidctError("DL feature values are missing or not finite", patient=pid,
                               path=rec["source"])
        rows.append(row)
    cohort = pd.DataFrame(rows, columns=["patient", "site", "role", DURATION, EVENT, *CLINICAL,
                                         *features])
    for site in sites:
        n_covid = int(((preds["site"] == site) & (preds["y"].astype(int) == 1)).sum())
        n_kept = int((cohort["site"] == site).sum())
        if n_kept < n_covid:
            why = "empty stay_days/discharged" + (
                f"; {short[site]} with stay_days < {min_follow_up_days:g}"
                if min_follow_up_days > 0 else "")
            notes[site].append(f"{n_covid - n_kept} of {n_covid} COVID-19 patients have no "
                               f"usable follow-up ({why}) and are left out")
    return cohort, features, sites, notes, short


def follow_up_record(min_follow_up_days: float, short: dict[str, int]) -> dict:
    """The follow-up rule of the prognosis cohort and how many patients it left out, per site."""
    return {"min_follow_up_days": float(min_follow_up_days),
            "excluded_short_follow_up": {s: int(n) for s, n in short.items()},
            "n_excluded_short_follow_up": int(sum(short.values()))}


# --------------------------------------------------------------------------- outputs

def _format_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def write_table_s3(tables_dir: Path, table: pd.DataFrame, n: int, n_events: int,
                   selection: dict | None = None) -> None:
    """Table S3: univariate HR (95% CI) and p of each model covariate on the training set.

    ``selection`` is cox.json's selection record: it names the method in the title and the
    footnote; a ridge model (every candidate) lists its covariates by the size of their
    multivariate coefficient, largest first.
    """
    method = (selection or {}).get("method", "stepwise")
    write_csv(tables_dir / "table_s3.csv", table, float_format="%.6g")
    rows = table
    if method == "ridge":
        title = "Prognostic covariates of the ridge Cox model"
        how = (f"Multivariate model: every candidate in one L2-penalised Cox model (penalizer "
               f"{selection['penalizer']:g}), rows by the size of their coefficient.")
        rows = table.iloc[np.argsort(-np.abs(table["multivariate_coef_per_sd"].to_numpy()),
                                     kind="stable")]
    else:
        title = "Selected prognostic features"
        how = f"Multivariate model: covariates selected by {method} selection."
    lines = [f"# Table S3. {title}", "",
             "| Feature name | Univariate HR (95% CI) | p-value | Model coefficient (per SD) |",
             "|---|---|---|---|"]
    for r in rows.itertuples():
        lines.append(f"| {r.feature} | {r.hr:.2f} ({r.hr_low:.2f}-{r.hr_high:.2f}) | "
                     f"{_format_p(r.p)} | {r.multivariate_coef_per_sd:+.3f} |")
    lines += ["", f"Univariate Cox models on the training set ({n} COVID-19 patients with "
                  f"follow-up, {n_events} discharged). {HR_NOTE}",
              f"{how} {DIRECTION}.", ""]
    write_text(tables_dir / "table_s3.md", "\n".join(lines))


# --------------------------------------------------------------------------- the stage

def fit_prognosis_model(train: pd.DataFrame, features: Sequence[str],
                        params: PrognosisParams = PrognosisParams(),
                        ) -> tuple[dict, Any, np.ndarray]:
    """Standardise, select and fit on the training cohort: ``(cox_json, fitter, train_risk)``.

    A selection method keeps at most ``max_features`` covariates and at most one per
    ``events_per_feature`` training discharges (0 = no such cap): with 64 DL features as
    candidates and a few dozen patients, stepwise selection otherwise keeps entering chance
    covariates that do not transfer to other sites. ``selection="ridge"`` selects nothing: every
    candidate enters one Cox model with the L2 penalizer ``ridge_penalizer`` ("auto": chosen by
    cross-validation on the training patients, :func:`covidct.analysis.survival.ridge_penalizer_cv`,
    seeded by ``seed``); the caps do not apply, the penalty does their work.
    """
    from covidct.analysis import survival

    selection, p_enter, p_stay = params.selection, params.p_enter, params.p_stay
    ic_penalty, max_features, penalizer = params.ic_penalty, params.max_features, params.penalizer
    min_events, events_per_feature = params.min_events, params.events_per_feature
    ridge_penalizer, seed = params.ridge_penalizer, params.seed

    n, n_events = len(train), int(train[EVENT].sum())
    if n_events < max(int(min_events), 2):
        raise CovidctError(f"too few events in the training set: {n_events} discharged among {n} "
                           f"COVID-19 patients with follow-up (need at least "
                           f"{max(int(min_events), 2)}; see --min-events)")
    cap = int(max_features)
    if events_per_feature and events_per_feature > 0:
        cap = max(1, min(cap, int(n_events // events_per_feature)))
    candidates = list(features) + list(CLINICAL)
    z, mean, sd = survival.standardise(train, candidates)
    notes = []
    constant = [c for c, s in zip(candidates, sd) if not s > 0]
    if constant:
        notes.append(f"constant in the training set, not candidates: {', '.join(constant)}")
    usable = [c for c in candidates if c not in constant]
    if not usable:
        raise CovidctError("no covariate varies in the training set")
    data = pd.concat([train[[DURATION, EVENT]].reset_index(drop=True),
                      z.reset_index(drop=True)], axis=1)
    ridge_cv = None
    if selection == "ridge":
        selected = list(usable)
        if ridge_penalizer == "auto":
            try:
                penalizer, scores = survival.ridge_penalizer_cv(data, DURATION, EVENT, selected,
                                                                seed=seed)
            except survival.SurvivalError as err:
                raise CovidctError(f"ridge Cox model: {err} (--ridge-penalizer)") from err
            ridge_cv = {"k": RIDGE_FOLDS, "repeats": RIDGE_REPEATS, "seed": int(seed),
                        "score": "mean held-out partial log-likelihood per patient",
                        "grid": list(scores), "scores": list(scores.values())}
            how = (f"chosen by {RIDGE_FOLDS}-fold cross-validated partial likelihood ("
                   + ", ".join(f"{k:g}: {v:.3f}" for k, v in scores.items()) + ")")
        else:
            penalizer, how = float(ridge_penalizer), "as configured"
        cap = len(selected)
        trace = [f"ridge: all {len(selected)} candidates in one L2-penalised Cox model, "
                 f"penalizer {penalizer:g} {how}; no selection, so max_features and "
                 f"events_per_feature do not apply"]
    else:
        try:
            selected, trace = survival.stepwise_select(
                data, DURATION, EVENT, usable, method=selection, p_enter=p_enter,
                p_stay=p_stay, max_features=cap, penalizer=penalizer, ic_penalty=ic_penalty)
        except survival.SurvivalError as err:
            raise CovidctError(f"covariate selection ({selection}) failed: {err}") from err
    fallback = False
    if not selected:
        name, p = survival.best_univariate(data, DURATION, EVENT, usable, penalizer)
        selected = [name]
        fallback = True
        msg = (f"the {selection} selection kept no covariate; falling back to the single best "
               f"univariate covariate {display_name(name)} (p={p:.3g})")
        notes.append(msg)
        trace.append(msg)
        log.warning(msg)
    try:
        cph = survival.fit_cox(data, DURATION, EVENT, selected, penalizer)
    except survival.SurvivalError as err:
        raise CovidctError(f"final Cox model failed: {err}") from err
    coefs = [float(cph.params_[c]) for c in selected]
    idx = [candidates.index(c) for c in selected]
    risk = risk_scores(coefs, z[selected].to_numpy())
    cutoff = float(np.median(risk))
    summary = cph.summary
    cox = {
        "model": "Cox proportional hazards (lifelines CoxPHFitter, Efron ties) on hospital stay "
                 "in days, event = discharge",
        "direction": DIRECTION,
        "risk_formula": "risk = -sum_j coefficients[j] * (x_j - mean[j]) / sd[j]; "
                        "group = 'high' if risk > cutoff else 'low'",
        "duration": DURATION, "event": EVENT,
        "covariates": list(selected),
        "names": [display_name(c) for c in selected],
        "coefficients": coefs,
        "hazard_ratios_per_sd": [float(math.exp(b)) for b in coefs],
        "p_values": [float(summary.loc[c, "p"]) for c in selected],
        "mean": [float(mean[i]) for i in idx],
        "sd": [float(sd[i]) for i in idx],
        "cutoff": cutoff,
        "cutoff_rule": "median risk of the training set",
        "sex_coding": "1 = male (M), 0 = female (F)",
        "feature_naming": "feature_k = DL feature-k, k = 0-based index of the 64-d DL feature",
        "selection": {"method": selection, "p_enter": p_enter, "p_stay": p_stay,
                      "ic_penalty": ic_penalty, "max_features": cap,
                      "max_features_option": int(max_features),
                      "events_per_feature": float(events_per_feature or 0),
                      "penalizer": penalizer, "ridge_cv": ridge_cv,
                      "fallback_to_best_univariate": fallback,
                      "n_candidates": len(usable), "trace": trace},
        "training": {"n": n, "n_events": n_events,
                     "concordance_index": float(cph.concordance_index_),
                     "log_likelihood": float(cph.log_likelihood_)},
        "notes": notes,
    }
    return cox, cph, risk


def site_result(cohort_site: pd.DataFrame, cox: dict, *, n_boot=PrognosisParams.n_boot,
                seed=PrognosisParams.seed) -> tuple[dict, dict]:
    """Risk groups, KM and log-rank and C-index for one site's cohort: ``(stats, fitters)``."""
    from covidct.analysis import survival

    stats_base = {"direction": DIRECTION, "cutoff": cox["cutoff"], "n": int(len(cohort_site))}
    if len(cohort_site) == 0:
        return {**stats_base, "n_events": 0, "n_high": 0, "n_low": 0, "median_stay_high": None,
                "median_stay_low": None, "logrank_statistic": None, "p": None, "c_index": None,
                "c_index_ci": None}, {}
    scores = risk(cox, cohort_site[cox["covariates"]].to_numpy(float))
    high = survival.split_by_cutoff(scores, cox["cutoff"])
    t = cohort_site[DURATION].to_numpy(float)
    e = cohort_site[EVENT].to_numpy(int)
    stats, fitters = survival.km_logrank_per_group(t, e, high)
    c, ci = survival.c_index_ci(t, scores, e, n_boot=n_boot, seed=seed)
    stats.update({"c_index": c, "c_index_ci": ci, "cutoff": cox["cutoff"],
                  "direction": DIRECTION})
    return stats, fitters


def site_notes(stats: dict, notes: Sequence[str]) -> list[str]:
    """The notes of one site's logrank.json: exclusions, and why a test is missing or weak."""
    out = list(notes)
    if stats["n"] == 0:
        out.append("no COVID-19 patient with follow-up at this site: skipped (no Kaplan-Meier "
                   "curve, no log-rank test)")
    elif stats["p"] is None:
        out.append("log-rank test not possible (one risk group is empty or there is no "
                   "discharge)")
    elif stats["n_events"] < 5:
        out.append(f"only {stats['n_events']} discharge(s): the log-rank test is unreliable")
    return out


def fit_and_record(cohort: pd.DataFrame, features, sites, params: PrognosisParams, out: Path,
                   tables_dir: Path, follow_up: dict | None = None) -> dict:
    """Fit the Cox model on the cohort's training patients; writes cox.json (with the
    ``follow_up`` record of :func:`follow_up_record`) and Table S3."""
    from covidct.analysis import survival

    train = cohort[cohort["role"] == "train"].reset_index(drop=True)
    log.info("prognosis cohort: %d COVID-19 patients with follow-up (%d training, %d events in "
             "training) across %d site(s)", len(cohort), len(train), int(train[EVENT].sum()),
             len(sites))
    cox, cph, train_risk = fit_prognosis_model(train, features, params)
    for line in cox["selection"]["trace"]:
        log.info("selection: %s", line)
    log.info("selected %s; median training risk (cut-off) %.4f; %s",
             ", ".join(cox["names"]), cox["cutoff"], DIRECTION)
    c, ci = survival.c_index_ci(train[DURATION], train_risk, train[EVENT], n_boot=params.n_boot,
                                seed=params.seed)
    cox["follow_up"] = follow_up or follow_up_record(params.min_follow_up_days, {})
    cox["training"].update({"sites": [s for s in sites if (cohort.loc[cohort.site == s, "role"]
                                                           == "train").any()],
                            "c_index": c, "c_index_ci": ci})
    write_cox(out / "cox.json", cox)
    table = survival.univariate_table(train, DURATION, EVENT, cox["covariates"],
                                      params.penalizer)
    table.insert(0, "feature", [display_name(c) for c in table["covariate"]])
    table["multivariate_coef_per_sd"] = cox["coefficients"]
    table["hr_of"] = "discharge"
    write_table_s3(tables_dir, table, len(train), int(train[EVENT].sum()), cox["selection"])
    return cox


def run(args: argparse.Namespace) -> int:
    from covidct.analysis.figures import km_figure
    from covidct.io.results import read_cox

    params = from_args(PrognosisParams, args)
    tracking = from_args(TrackingParams, args)
    if not args.train and args.cox is None:
        raise CovidctError("give --train (fit a Cox model) or --cox (apply one)")
    cohort, features, sites, notes, short = load_cohort(
        args.train or [], args.validate, args.sheet, params.min_follow_up_days)
    follow_up = follow_up_record(params.min_follow_up_days, short)
    log.info("follow-up rule: at least %g days; %d COVID-19 patient(s) with a shorter follow-up "
             "left out (%s)", params.min_follow_up_days, follow_up["n_excluded_short_follow_up"],
             ", ".join(f"{s} {n}" for s, n in short.items()) or "no site")
    out, tables_dir = Path(args.out_dir), Path(args.tables_dir)
    if args.cox is not None:
        cox = read_cox(args.cox)
        log.info("applying the Cox model %s (cut-off %.4f) to %s", args.cox, cox["cutoff"],
                 ", ".join(sites))
        training_sites = []
    else:
        cox = fit_and_record(cohort, features, sites, params, out, tables_dir, follow_up)
        training_sites = cox["training"]["sites"]

    for site in sites:
        sub = cohort[cohort["site"] == site].reset_index(drop=True)
        role = "train" if site in training_sites else "validate"
        stats, fitters = site_result(sub, cox, n_boot=params.n_boot, seed=params.seed)
        stats = {"site": site, "role": role, **stats,
                 "min_follow_up_days": follow_up["min_follow_up_days"],
                 "excluded_short_follow_up": short.get(site, 0),
                 "notes": site_notes(stats, notes.get(site, []))}
        for n in stats["notes"]:
            log.warning("site %s: %s", site, n)
        write_json(out / site / "logrank.json", stats)
        km_figure(out / site / "km.png", site, fitters, stats, DIRECTION,
                  note="no COVID-19 patient with follow-up" if stats["n"] == 0 else None)
        p_txt = "n/a" if stats["p"] is None else f"{stats['p']:.3g}"
        c_txt = "n/a" if stats["c_index"] is None else f"{stats['c_index']:.3f}"
        log.info("site %s (%s): n=%d events=%d high=%d low=%d log-rank p=%s C=%s", site, role,
                 stats["n"], stats["n_events"], stats["n_high"], stats["n_low"], p_txt, c_txt)
        if tracking.enabled:
            _track_site(tracking, site, role, stats, cox, out, tables_dir, args.config)
    return 0


def _track_site(tracking: TrackingParams, site: str, role: str, stats: dict, cox: dict,
                out: Path, tables_dir: Path, config) -> None:
    import mlflow

    from covidct.io.tracking import mlflow_run

    params = {"site": site, "role": role, "selection": cox["selection"]["method"],
              "p_enter": cox["selection"]["p_enter"], "p_stay": cox["selection"]["p_stay"],
              "ic_penalty": cox["selection"]["ic_penalty"],
              "max_features": cox["selection"]["max_features"],
              "penalizer": cox["selection"]["penalizer"], "selected": ", ".join(cox["names"]),
              "cutoff": cox["cutoff"], "direction": DIRECTION}
    with mlflow_run(tracking, f"prognosis-{site}", params=params, config=config,
                    tags={"covidct.rule": "prognosis", "covidct.site": site,
                          "covidct.role": role}):
        metrics = {k: stats[k] for k in ("n", "n_events", "n_high", "n_low", "logrank_statistic",
                                         "p", "c_index", "median_stay_high", "median_stay_low")
                   if stats.get(k) is not None}
        if stats.get("c_index_ci"):
            metrics["c_index_ci_low"], metrics["c_index_ci_high"] = stats["c_index_ci"]
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_artifact(str(out / site / "km.png"))
        mlflow.log_artifact(str(out / site / "logrank.json"))
        if role == "train":
            mlflow.log_artifact(str(out / "cox.json"))
            mlflow.log_artifact(str(tables_dir / "table_s3.csv"))
            mlflow.log_artifact(str(tables_dir / "table_s3.md"))
