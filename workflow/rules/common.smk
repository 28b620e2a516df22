# Load and validate the config and the sample sheet; helpers that list each rule's inputs.
import os
import sys
from pathlib import Path

import pandas as pd
from snakemake.utils import validate

from covidct.sheet import check_sheet, read_sheet, sites_with_role

validate(config, "../schemas/config.schema.yaml")

# Rules call `covidct`: make the environment running Snakemake (e.g. .venv) provide it, even when
# the user runs `.venv/bin/snakemake` without activating the environment.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

SITES = config["sites"]
SYNTHETIC = not config.get("samples")
RESULTS = "results"
MLFLOW_URI = config["mlflow"]["tracking_uri"]
EXPERIMENT = config["mlflow"]["experiment"]
CONFIG_FILES = [str(f) for f in workflow.configfiles]


def _load_samples():
    if SYNTHETIC:
        from covidct.synth import cohort_table

        table = cohort_table(config, root=f"{RESULTS}/synth")
        sheet_path = f"{RESULTS}/synth/cohort.tsv"
    else:
        table = read_sheet(config["samples"])
        sheet_path = config["samples"]
    table = check_sheet(table, SITES, path=sheet_path)
    columns = [c for c in ("patient", "site", "image", "task", "label", "age", "sex",
                           "comorbidity", "stay_days", "discharged") if c in table.columns]
    validate(table[columns].reset_index(drop=True), "../schemas/samples.schema.yaml")
    return table, sheet_path


samples, SHEET = _load_samples()


wildcard_constraints:
    site="[^/]+",
    patient="[^/]+",


def patient_dir(row):
    return f"{RESULTS}/patients/{row.site}/{row.patient}"


def sites_for(*roles):
    """Configured sites with any of ``roles`` that have patients in the sheet."""
    present = set(samples["site"])
    return sorted({s for r in roles for s in sites_with_role(SITES, r)} & present)


def patients_of(sites):
    return samples[samples["site"].isin(list(sites))]


def roi_paths(sites):
    return [f"{patient_dir(r)}/roi.zarr" for r in patients_of(sites).itertuples()]


def image_input(wildcards):
    """The scan as a Snakemake input when it exists or a rule makes it (synthetic cohort).

    A user's missing scan is not declared as an input: `covidct ingest` then fails for that
    patient alone with an error naming it, and the others go on under --keep-going.
    """
    image = samples.loc[wildcards.patient, "image"]
    if SYNTHETIC or os.path.exists(image):
        return image
    return []


def sheet_input(wildcards=None):
    return SHEET


TRAIN_SITES = sites_for("train")
PRETRAIN_SITES = sites_for("pretrain")
DIAGNOSIS_SITES = sites_for("diagnosis")
PROGNOSIS_SITES = sites_for("prognosis")
EVAL_SITES = sorted(set(TRAIN_SITES) | set(DIAGNOSIS_SITES) | set(PROGNOSIS_SITES))


def tracking_flags(rule_name):
    return (f"--tracking-uri {MLFLOW_URI} --experiment {EXPERIMENT} "
            f"--config {' '.join(CONFIG_FILES[:1]) or 'none'}")


def final_outputs():
    outputs = [f"{patient_dir(r)}/roi.zarr" for r in samples.itertuples()]
    outputs += [f"{RESULTS}/tables/qc_summary.tsv"]
    if TRAIN_SITES:
        outputs += [f"{RESULTS}/models/{m}/run.json" for m in ("finetune_covid", "random_init")]
        outputs += [f"{RESULTS}/eval/{s}/metrics.json" for s in EVAL_SITES]
        outputs += [f"{RESULTS}/tables/table2.md", f"{RESULTS}/tables/table_s2.md"]
        outputs += [f"{RESULTS}/prognosis/cox.json", f"{RESULTS}/tables/table_s3.md"]
        outputs += [f"{RESULTS}/explain/feature_pca.png"]
    return outputs


def site_sheet(site):
    return f"{RESULTS}/sheets/{site}.tsv"


def site_sheets(sites):
    return [site_sheet(s) for s in sites]


def site_rows_digest(wildcards):
    """Changes only when this site's rows change, so adding a site reruns nothing else."""
    import hashlib

    rows = samples[samples["site"] == wildcards.site]
    return hashlib.sha256(rows.to_csv(sep="\t", index=False).encode()).hexdigest()[:16]
