# Load and validate the config and the sample sheet; the functions that list each rule's inputs.
# Rule files hold rules only; every helper they use lives here.
import hashlib
import json
import shlex
import sys
from pathlib import Path

import pandas as pd
from snakemake.utils import validate

from covidct import params as P
from covidct.io.sheet import COLUMNS, check_sheet, read_sheet, sites_with_role

validate(config, "../schemas/config.schema.yaml")

# Rules call `covidct`. Appending the bin folder of the Python running Snakemake (e.g. .venv/bin)
# finds it even when the user did not activate the environment; appended, not prepended, so that
# a rule's conda environment (--use-conda) still comes first.
# COVIDCT_CONFIG names the config file whose hash tags the MLflow runs; it is no rule parameter,
# so editing the config (e.g. adding a site) reruns only what the change touches.
CONFIG_FILE = str(Path(workflow.configfiles[-1]).resolve()) if workflow.configfiles else ""
shell.prefix(
    f'export PATH="$PATH:{Path(sys.executable).parent}" TF_CPP_MIN_LOG_LEVEL=2'
    f" COVIDCT_CONFIG={shlex.quote(CONFIG_FILE)}; "
)

SITES = config["sites"]
SYNTHETIC = not config.get("samples")
RESULTS = "results"
TRAINING = config["training"]
SEGMENTATION = config["segmentation"]


def stage_options(cls, section, exclude=()):
    """A config section as the command-line options of its stage (covidct.params)."""
    return P.as_options(P.from_config(cls, section), exclude=exclude)


TRACKING = stage_options(P.TrackingParams, config["mlflow"])


def _load_samples():
    if SYNTHETIC:
        from covidct.synth.cohort import cohort_table

        table = cohort_table(config, root=f"{RESULTS}/synth")
        sheet_path = "the synthetic cohort (config: synthetic)"
    else:
        table = read_sheet(config["samples"])
        sheet_path = config["samples"]
    table = check_sheet(table, SITES, path=sheet_path)
    columns = [c for c in COLUMNS if c in table.columns]
    validate(table[columns].reset_index(drop=True), "../schemas/samples.schema.yaml")
    return table


samples = _load_samples()


wildcard_constraints:
    site="[^/]+",
    patient="[^/]+",


# ---- sites and patients --------------------------------------------------------------------


def sites_for(*roles):
    """Configured sites with any of ``roles`` that have patients in the sheet."""
    present = set(samples["site"])
    return sorted({s for r in roles for s in sites_with_role(SITES, r)} & present)


TRAIN_SITES = sites_for("train")
PRETRAIN_SITES = sites_for("pretrain")
DIAGNOSIS_SITES = sites_for("diagnosis")
PROGNOSIS_SITES = sites_for("prognosis")
# Table 2's column order: training sites, then diagnosis, then prognosis validation sites.
EVAL_SITES = list(dict.fromkeys(TRAIN_SITES + DIAGNOSIS_SITES + PROGNOSIS_SITES))
COX_SITES = sorted(set(TRAIN_SITES) | set(PROGNOSIS_SITES))


def patient_dir(row):
    return f"{RESULTS}/patients/{row.site}/{row.patient}"


def patients_of(sites):
    return samples[samples["site"].isin(list(sites))]


def store_paths(sites, store):
    """The ``store`` (ct.zarr, lung.zarr, roi.zarr) of every patient of ``sites``."""
    return [f"{patient_dir(r)}/{store}" for r in patients_of(sites).itertuples()]


def site_role(site):
    roles = SITES[site]["role"]
    return ",".join([roles] if isinstance(roles, str) else roles)


def site_sheet(site):
    return f"{RESULTS}/sheets/{site}.tsv"


def site_sheets(sites):
    return [site_sheet(s) for s in sites]


def site_rows_digest(wildcards):
    """Changes only when this site's rows change, so adding a site reruns nothing else."""
    rows = samples[samples["site"] == wildcards.site]
    return hashlib.sha256(rows.to_csv(sep="\t", index=False).encode()).hexdigest()[:16]


def write_site_sheet(site, path):
    from covidct.io.atomic import write_csv

    rows = samples[samples["site"] == site].drop(columns=["y"])
    write_csv(path, rows, sep="\t")
    return len(rows)


# ---- per-patient inputs --------------------------------------------------------------------


def image_input(wildcards):
    """The scan as a Snakemake input when it exists or a rule makes it (synthetic cohort).

    A user's missing scan is not declared as an input: `covidct ingest` then fails for that
    patient alone with an error naming it, and the others go on under --keep-going.
    """
    image = samples.loc[wildcards.patient, "image"]
    if SYNTHETIC or Path(image).exists():
        return image
    return []


def synth_spec(wildcards):
    """This patient's row of the synthetic cohort, as a quoted JSON argument."""
    row = samples.loc[wildcards.patient]
    spec = {k: (None if pd.isna(v) else v) for k, v in row.items()}
    return shlex.quote(json.dumps(spec, default=str, sort_keys=True))


def synth_sites(fmt):
    """Sites whose synthetic scans are written as ``fmt`` (a wildcard constraint)."""
    sites = {
        r.site for r in samples.itertuples() if (Path(r.image).name == "dicom") == (fmt == "dicom")
    }
    return "|".join(sorted(sites)) or "no-site"


# ---- lung segmentation ---------------------------------------------------------------------


def segmenter_model():
    return SEGMENTATION["model"] or f"{RESULTS}/models/lung_fpn/model.keras"


def segmenter_model_input(wildcards):
    return [segmenter_model()] if SEGMENTATION["method"] == "fpn" else []


def segment_env():
    if SEGMENTATION["method"] == "fpn":
        return "../../envs/deep.yaml"
    return "../../envs/preprocess.yaml"


def _segmenter_pairs():
    """(image, mask) pairs: the config's sheet, or the synthetic cohort's exact masks."""
    train = SEGMENTATION["train"]
    if train["sheet"]:
        table = pd.read_csv(train["sheet"], sep="\t", dtype=str)
        pairs = list(zip(table["image"], table["mask"]))
    else:
        pairs = [
            (r.image, f"{RESULTS}/synth/{r.site}/{r.patient}/lung_mask.nii.gz")
            for r in samples.itertuples()
        ]
    return pairs[: train["max_patients"]]


def segmenter_pairs_input(wildcards):
    return [p for pair in _segmenter_pairs() for p in pair]


def segmenter_pairs_flag(wildcards):
    pairs = _segmenter_pairs()
    return (
        "--images "
        + " ".join(shlex.quote(i) for i, _ in pairs)
        + " --masks "
        + " ".join(shlex.quote(m) for _, m in pairs)
    )


def segmenter_weights_flag(wildcards):
    weights = SEGMENTATION["train"]["imagenet_weights"]
    return f"--imagenet-weights {shlex.quote(weights)}" if weights else ""


# ---- training, evaluation, prognosis -------------------------------------------------------


def train_options(name, rule, sites, task):
    """The options of one training rule: the training section, its epochs, its tags."""
    class_weight = TRAINING.get("class_weight") if task == "covid" else None
    params = P.from_config(
        P.TrainParams, TRAINING, epochs=TRAINING["epochs"][name], class_weight=class_weight
    )
    tags = f"--tag covidct.rule={rule} --tag covidct.sites={','.join(sites)}"
    return f"--name {name} --task {task} {P.as_options(params)} {tags} {TRACKING}"


TRAIN_SHELL = (
    "KERAS_BACKEND={params.backend} covidct train --sheet {input.sheets} --rois {input.rois}"
    " --out {params.out} {params.init} {params.options} > {log} 2>&1"
)

# model -> the folder of its per-site evaluation, below results/
EVAL_DIRS = {"finetune_covid": "eval/{site}", "random_init": "eval/{site}/random_init"}


def eval_file(model, name, site="{site}"):
    return f"{RESULTS}/{EVAL_DIRS[model].format(site=site)}/{name}"


def subgroup_flags(wildcards):
    groups = SITES[wildcards.site].get("subgroups", {})
    return " ".join(f"--subgroup {name}={','.join(labels)}" for name, labels in groups.items())


def validate_flag(wildcards, input):
    return f"--validate {' '.join(input.validate)}" if input.validate else ""


def final_outputs():
    outputs = [f"{patient_dir(r)}/roi.zarr" for r in samples.itertuples()]
    outputs += [f"{RESULTS}/tables/qc_summary.tsv"]
    if TRAIN_SITES and PRETRAIN_SITES:
        outputs += [f"{RESULTS}/models/{m}/run.json" for m in ("finetune_covid", "random_init")]
        outputs += [eval_file("finetune_covid", "metrics.json", s) for s in EVAL_SITES]
        outputs += [f"{RESULTS}/tables/table2.md", f"{RESULTS}/tables/table_s2.md"]
        outputs += [f"{RESULTS}/prognosis/cox.json", f"{RESULTS}/tables/table_s3.md"]
        outputs += [f"{RESULTS}/explain/feature_pca.png"]
    return outputs
