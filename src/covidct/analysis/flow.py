"""``covidct flow``: the flow of patients and Table 1 (characteristics), per site.

Flow: per site, the patients in the sheet, ingested, segmented, with a ROI, on the ROI fallback,
failed (with the reason, from the failed step's log), used for training and for internal
validation (from the trained models' folders), and with follow-up. Table 1: age, sex,
comorbidity, labels, hospital stay and discharge per site. The per-patient stores are looked up
as ``PATIENTS/{site}/{patient}/{ct,lung,roi}.zarr`` and their logs as
``LOGS/{ingest,segment,roi}/{site}/{patient}.log`` (the workflow's layout).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidct.errors import CovidctError
from covidct.io.atomic import write_csv, write_text
from covidct.io.results import read_run
from covidct.params import PrognosisParams, TrackingParams, add_options, from_args

log = logging.getLogger(__name__)

STEPS = (("ingest", "ct.zarr", "ingested"), ("segment", "lung.zarr", "segmented"),
         ("roi", "roi.zarr", "with ROI"))
FLOW_COLUMNS = ("in sheet", "ingested", "segmented", "with ROI", "on fallback", "failed",
                "used for training", "internal validation", "with follow-up")
VAL_PREDICTIONS = "val_predictions.csv"


# --------------------------------------------------------------------------- one patient
def failure_reason(logs: Path, step: str, site: str, patient: str) -> str:
    """The error line of a patient's failed step (its log's last line naming an error)."""
    path = logs / step / site / f"{patient}.log"
    if not path.is_file():
        return f"{step}: no output and no log ({path})"
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return f"{step}: {(errors or lines or ['empty log'])[-1]}"


def patient_status(patients: Path, logs: Path, site: str, patient: str) -> dict[str, Any]:
    """How far one patient got: each step's store present, the ROI fallback, the failure."""
    from covidct.io.stores import open_image

    folder = patients / site / patient
    status: dict[str, Any] = {"site": site, "patient": patient, "failed_step": None,
                              "reason": None, "fallback": False}
    for step, store, column in STEPS:
        status[column] = (folder / store / "zarr.json").is_file()
        if not status[column] and status["failed_step"] is None:
            status["failed_step"] = step
            status["reason"] = failure_reason(logs, step, site, patient)
    if status["with ROI"]:
        try:
            status["fallback"] = bool(open_image(folder / "roi.zarr").attrs.get("fallback"))
        except CovidctError as err:
            status["with ROI"], status["failed_step"], status["reason"] = False, "roi", str(err)
    return status


# --------------------------------------------------------------------------- training use
def training_use(model_dirs: Sequence[Path], sheet: pd.DataFrame) -> pd.DataFrame:
    """patient, site -> 'training' or 'internal validation', from each model's run.json (its
    sites and task) and val_predictions.csv (its validation patients)."""
    rows = []
    for folder in model_dirs:
        run = read_run(folder)
        if run is None:
            raise CovidctError("no run.json in the model folder", path=folder)
        sites = (run.get("training_data") or {}).get("sites") or []
        task = run.get("task")
        val_path = Path(folder) / VAL_PREDICTIONS
        val = set(pd.read_csv(val_path, dtype={"patient": str})["patient"]) \
            if val_path.is_file() else set()
        used = sheet[sheet["site"].isin(sites) & ((sheet["task"] == task) if task else True)]
        for r in used.itertuples():
            rows.append({"site": r.site, "patient": r.patient,
                         "use": "internal validation" if r.patient in val else "training"})
    return pd.DataFrame(rows, columns=["site", "patient", "use"]).drop_duplicates()


def has_follow_up(sheet: pd.DataFrame, min_follow_up_days: float = 0.0) -> pd.Series:
    """COVID-19 patients with a hospital stay of at least ``min_follow_up_days`` and a
    discharge flag (the prognosis' patients, by its ``min_follow_up_days`` rule)."""
    stay = pd.to_numeric(sheet.get("stay_days"), errors="coerce")
    discharged = pd.to_numeric(sheet.get("discharged"), errors="coerce")
    return ((sheet["label"] == "covid") & stay.notna() & discharged.notna()
            & (stay >= min_follow_up_days))


# --------------------------------------------------------------------------- tables
def flow_table(sheet: pd.DataFrame, status: pd.DataFrame, use: pd.DataFrame,
               min_follow_up_days: float = 0.0) -> pd.DataFrame:
    """One row per site (in sheet order) and a total: the FLOW_COLUMNS counts ("with
    follow-up" by the prognosis' ``min_follow_up_days`` rule)."""
    follow_up = has_follow_up(sheet, min_follow_up_days)
    frame = status.merge(sheet[["site", "patient"]].assign(follow_up=follow_up),
                         on=["site", "patient"])
    frame = frame.merge(use, on=["site", "patient"], how="left")
    rows = []
    for site, part in frame.groupby("site", sort=False):
        rows.append({"site": site, "in sheet": len(part),
                     **{c: int(part[c].sum()) for _, _, c in STEPS},
                     "on fallback": int(part["fallback"].sum()),
                     "failed": int(part["failed_step"].notna().sum()),
                     "used for training": int((part["use"] == "training").sum()),
                     "internal validation": int((part["use"] == "internal validation").sum()),
                     "with follow-up": int(part["follow_up"].sum())})
    table = pd.DataFrame(rows, columns=["site", *FLOW_COLUMNS])
    total = {"site": "all", **{c: int(table[c].sum()) for c in FLOW_COLUMNS}}
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)


def _mean_sd(values: pd.Series) -> str:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return "n/a"
    sd = f"{v.std(ddof=1):.1f}" if len(v) > 1 else "n/a"
    return f"{v.mean():.1f} ({sd})"


def _median_iqr(values: pd.Series) -> str:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return "n/a"
    q1, q2, q3 = np.percentile(v, [25, 50, 75])
    return f"{q2:.1f} ({q1:.1f}-{q3:.1f})"


def _count(mask: pd.Series, known: pd.Series) -> str:
    n = int(known.sum())
    if n == 0:
        return "n/a"
    k = int((mask & known).sum())
    return f"{k} ({100.0 * k / n:.1f}%)"


def characteristics(part: pd.DataFrame, labels: Sequence[str]) -> dict[str, str]:
    """One column of Table 1: age mean (SD), counts (%), stay median (IQR)."""
    age = pd.to_numeric(part.get("age"), errors="coerce")
    sex = part.get("sex", pd.Series("", index=part.index)).fillna("").astype(str)
    comorbidity = pd.to_numeric(part.get("comorbidity"), errors="coerce")
    covid = part["label"] == "covid"
    follow = has_follow_up(part)
    discharged = pd.to_numeric(part.get("discharged"), errors="coerce")
    column = {"Patients (n)": str(len(part)),
              "Age, years: mean (SD)": _mean_sd(age),
              "Age missing (n)": str(int(age.isna().sum())),
              "Male sex: n (%)": _count(sex == "M", sex.isin(["M", "F"])),
              "Comorbidity: n (%)": _count(comorbidity == 1, comorbidity.notna())}
    for label in labels:
        column[f"Label {label}: n (%)"] = _count(part["label"] == label,
                                                 pd.Series(True, index=part.index))
    column["COVID-19 with follow-up (n)"] = str(int(follow.sum()))
    column["Hospital stay, days: median (IQR)"] = _median_iqr(
        part.loc[follow, "stay_days"]) if follow.any() else "n/a"
    column["Discharged: n (%)"] = _count(discharged == 1, follow) if covid.any() else "n/a"
    return column


def table1(sheet: pd.DataFrame) -> pd.DataFrame:
    """Table 1: rows the characteristics, columns the sites (sheet order) and all patients."""
    labels = sorted(sheet["label"].dropna().unique())
    columns = {site: characteristics(part, labels)
               for site, part in sheet.groupby("site", sort=False)}
    columns["all"] = characteristics(sheet, labels)
    df = pd.DataFrame(columns)
    df.index.name = "characteristic"
    return df


# --------------------------------------------------------------------------- the stage
def cohort_status(sheet: pd.DataFrame, patients: Path, logs: Path) -> pd.DataFrame:
    """patient_status of every patient of the sheet."""
    return pd.DataFrame([patient_status(patients, logs, r.site, r.patient)
                         for r in sheet.itertuples()])


def write_flow(sheet: pd.DataFrame, patients: Path, logs: Path, out_dir: Path,
               model_dirs: Sequence[Path] = (), min_follow_up_days: float = 0.0) -> pd.DataFrame:
    """flow.tsv/flow.md and flow_failures.tsv (patient, site, step, reason) into ``out_dir``."""
    from covidct.analysis.tables import to_markdown

    status = cohort_status(sheet, patients, logs)
    flow = flow_table(sheet, status, training_use(model_dirs, sheet), min_follow_up_days)
    rule = f" of at least {min_follow_up_days:g} days" if min_follow_up_days > 0 else ""
    write_csv(out_dir / "flow.tsv", flow, sep="\t")
    write_text(out_dir / "flow.md", to_markdown(
        flow, index=False, caption="Patient flow per site: in the sample sheet, through each "
                                   "preprocessing step, and used for training, internal "
                                   f"validation and the prognosis (COVID-19 with follow-up"
                                   f"{rule})."))
    failures = status.loc[status["failed_step"].notna(),
                          ["site", "patient", "failed_step", "reason"]]
    write_csv(out_dir / "flow_failures.tsv", failures, sep="\t")
    for r in failures.itertuples():
        log.warning("patient %s (site %s) failed at %s: %s", r.patient, r.site, r.failed_step,
                    r.reason)
    return flow


def add_arguments(parser) -> None:
    parser.add_argument("--sheets", nargs="+", required=True, type=Path, metavar="TSV",
                        help="the sites' sample sheets")
    parser.add_argument("--patients", type=Path, default=Path("results/patients"),
                        help="folder of the per-patient stores (default %(default)s)")
    parser.add_argument("--logs", type=Path, default=Path("logs"),
                        help="folder of the per-patient logs (default %(default)s)")
    parser.add_argument("--models", nargs="*", type=Path, default=[], metavar="DIR",
                        help="folders of the trained models (run.json, val_predictions.csv)")
    parser.add_argument("--out-dir", required=True, type=Path,
                        help="folder for flow.tsv/.md, flow_failures.tsv, table1.csv/.md")
    parser.add_argument("--min-follow-up-days", type=float,
                        default=PrognosisParams.min_follow_up_days,
                        help="count as 'with follow-up' the COVID-19 patients with at least "
                             "this many days (the prognosis' rule; default %(default)s)")
    add_options(parser, TrackingParams)


def run(args) -> int:
    from covidct.analysis.tables import write_table
    from covidct.io.sheet import read_sheet

    sheet = pd.concat([read_sheet(p) for p in args.sheets], ignore_index=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    flow = write_flow(sheet, args.patients, args.logs, args.out_dir, args.models,
                      args.min_follow_up_days)
    t1 = table1(sheet)
    write_table(args.out_dir, "table1", t1,
                "Table 1. Patient characteristics per site: age mean (SD), hospital stay "
                "median (IQR), counts with the percentage of the patients with the value "
                "known.", index=True)
    total = flow.iloc[-1]
    from covidct.io.tracking import log_files

    log_files(from_args(TrackingParams, args), "flow", "flow",
              [args.out_dir / n for n in ("flow.md", "flow.tsv", "flow_failures.tsv",
                                          "table1.md", "table1.csv")],
              metrics={f"n_{c.replace(' ', '_')}": float(total[c]) for c in FLOW_COLUMNS})
    log.info("%d patients in the sheets: %d with a ROI, %d on fallback, %d failed; %d for "
             "training, %d internal validation, %d with follow-up", total["in sheet"],
             total["with ROI"], total["on fallback"], total["failed"],
             total["used for training"], total["internal validation"], total["with follow-up"])
    return 0
