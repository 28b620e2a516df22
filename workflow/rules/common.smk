# Load and validate the config and the sample sheet; the functions that list each rule's inputs.
# Rule files hold rules only; every helper they use lives here.
import copy
import hashlib
import json
import os
import shlex
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from snakemake.logging import logger
from snakemake_interface_executor_plugins.settings import DeploymentMethod
from snakemake.utils import validate

from covidct import params as P
from covidct.errors import CovidctError
from covidct.io.sheet import check_sheet, missing_images, read_sheet, sites_with_role
from covidct.io.tracking import CONFIG_HASH_ENV, PARENT_RUN_ENV, config_hash
from covidct.roles import plan_workflow
from covidct.synth.cohort import LESION_CASE_SITE

CONFIG_FILES = ", ".join(map(str, workflow.configfiles)) or None
CONFIG_SCHEMA = Path(workflow.current_basedir).parent / "schemas" / "config.schema.yaml"


def config_problems(cfg):
    """The config's schema violations, one line each naming the key."""
    import jsonschema
    import yaml

    validator = jsonschema.Draft202012Validator(yaml.safe_load(CONFIG_SCHEMA.read_text()))
    lines = []
    for err in sorted(validator.iter_errors(cfg), key=lambda e: list(map(str, e.path))):
        key = ".".join(map(str, err.path)) or "(top level)"
        lines.append(f"{key}: {err.message}")
    return lines


USER_CONFIG = copy.deepcopy(config)  # what the config files say, before the schema's defaults
if config_problems(config):
    raise CovidctError(
        "invalid config:\n  " + "\n  ".join(config_problems(config)),
        path=CONFIG_FILES,
    )
validate(config, str(CONFIG_SCHEMA))

# Rules call `$COVIDCT STAGE ...`: under --use-conda the rule's environment's own covidct (each
# env installs this checkout, ${COVIDCT_SOURCE}), else the Python that runs Snakemake (e.g.
# .venv/bin/python, activated or not); a COVIDCT set beforehand (a container's, say) wins.
# Environment variables, not a shell prefix, so that nothing reaches the rules of a workflow
# that uses this one as a module.
os.environ["COVIDCT_SOURCE"] = str(Path(workflow.current_basedir).parents[1].resolve())
os.environ.setdefault(
    "COVIDCT",
    (
        "covidct"
        if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
        else f"{shlex.quote(sys.executable)} -m covidct"
    ),
)

# On one machine the short per-patient stages run in a warm worker that holds their imports
# (covidct.worker); a cluster job keeps its own process (its memory limits, its accounting).
os.environ.setdefault(
    "COVIDCT_WORKER", "1" if workflow.local_exec and workflow.is_main_process else "0"
)


envvars:
    "COVIDCT",
    "COVIDCT_SOURCE",


# The hash of the effective config (the files merged, the schema's defaults filled) tags every
# MLflow run. It reaches the jobs through the environment, not as a rule parameter, so editing
# the config (e.g. adding a site) reruns only what the change touches.
os.environ[CONFIG_HASH_ENV] = config_hash(config)

SITES = config["sites"]
SYNTHETIC = not config.get("samples")
RESULTS = "results"
TRAINING = config["training"]
SEGMENTATION = config["segmentation"]
# Snakemake gives a module's `prefix:` to every input, output and log; the paths it does not see
# (parameters, the tracking database, files written while parsing) get it from here.
_PATH_MODIFIER = workflow.modifier.path_modifier


def workdir_path(path):
    """``path`` (relative to the working folder) where this workflow's rules write it."""
    return _PATH_MODIFIER.replace_prefix(str(path))


def tracking_in_workdir(params):
    """A relative SQLite tracking database moved under the module's prefix, like results/."""
    scheme = "sqlite:///"
    uri = params.tracking_uri
    if uri.startswith(scheme) and not uri[len(scheme) :].startswith("/"):
        return replace(params, tracking_uri=scheme + workdir_path(uri[len(scheme) :]))
    return params


TRACKING_PARAMS = tracking_in_workdir(P.from_config(P.TrackingParams, config["mlflow"]))


def stage_options(cls, section, exclude=()):
    """A config section as the command-line options of its stage (covidct.params)."""
    return P.as_options(P.from_config(cls, section), exclude=exclude)


TRACKING = P.as_options(TRACKING_PARAMS)


def start_study_run():
    """One MLflow parent run per invocation: every job's run becomes its child."""
    if not TRACKING_PARAMS.enabled or os.environ.get(PARENT_RUN_ENV):
        return
    from covidct.io.tracking import start_workflow_run

    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    run_id = start_workflow_run(
        TRACKING_PARAMS,
        config,
        run_name=f"workflow {started}",
        tags={"covidct.sites": ",".join(sorted(SITES))},
    )
    os.environ[PARENT_RUN_ENV] = run_id
    logger.info(f"covidct: MLflow run {run_id} holds this invocation's runs")


def end_study_run(ok):
    run_id = os.environ.get(PARENT_RUN_ENV)
    if TRACKING_PARAMS.enabled and run_id:
        from covidct.io.tracking import end_workflow_run

        end_workflow_run(TRACKING_PARAMS, run_id, ok)


onstart:
    start_study_run()


onsuccess:
    end_study_run(True)


def flow_after_failure():
    """Which patients failed at which step, and why (after e.g. a --keep-going run)."""
    from covidct.analysis.flow import write_flow

    try:
        flow = write_flow(
            samples.reset_index(drop=True),
            Path(RESULTS) / "patients",
            Path("logs"),
            Path("logs/flow"),
            min_follow_up_days=config["prognosis"]["min_follow_up_days"],
        )
    except Exception as err:  # never mask the run's own error
        logger.warning(f"covidct: no patient flow written ({type(err).__name__}: {err})")
        return
    failed = int(flow.iloc[-1]["failed"])
    logger.warning(
        f"covidct: {failed} patient(s) failed in preprocessing; the flow and each failure's "
        "reason: logs/flow/flow.md, logs/flow/flow_failures.tsv"
    )


onerror:
    end_study_run(False)
    flow_after_failure()


def _load_samples():
    if SYNTHETIC:
        from covidct.synth.cohort import cohort_table

        table = cohort_table(config, root=f"{RESULTS}/synth")
        sheet_path = "the synthetic cohort (config: synthetic)"
    else:
        table = read_sheet(config["samples"], SITES)
        # absolute: a user's scans are never under a module's prefix
        table["image"] = [str(Path(image).absolute()) for image in table["image"]]
        sheet_path = config["samples"]
    return check_sheet(table, SITES, path=sheet_path)


samples = _load_samples()
MISSING_IMAGES = [] if SYNTHETIC else missing_images(samples)


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


# ---- the trained system, and what the workflow runs -----------------------------------------


def _open_system():
    """The config's trained system (a folder, or an MLflow model URI fetched once into
    results/system/), its plan applied to the preprocessing of the new sites."""
    source = config.get("system") or ""
    if not source or TRAIN_SITES:  # with train sites the plan below refuses a system
        return None
    from covidct.inference.system import open_system
    from covidct.io.results import PLAN_JSON
    from covidct.model.saved import is_model_uri

    cache = (
        Path(workdir_path(RESULTS)) / "system" / "".join(c if c.isalnum() else "_" for c in source)
    )
    if is_model_uri(source) and (cache / PLAN_JSON).exists():
        system = open_system(cache)
        system.source = source
    else:
        system = open_system(source, TRACKING_PARAMS, cache)
    _apply_plan(system)
    return system


def _apply_plan(system):
    """The new sites are processed as the system's training scans were: a preprocessing value
    the config sets and the plan contradicts is refused, naming the field."""
    pre = system.preprocessing
    seg = pre["segmentation"]
    planned = {
        ("ingest",): pre["ingest"],
        ("roi",): pre["roi"],
        ("segmentation", "threshold"): seg.get("params") or {},
    }
    problems = []
    if USER_CONFIG.get("segmentation", {}).get("method", seg["method"]) != seg["method"]:
        problems.append(
            f"segmentation.method is {USER_CONFIG['segmentation']['method']!r} "
            f"here, {seg['method']!r} in the plan"
        )
    for keys, plan in planned.items():
        given = USER_CONFIG
        for key in keys:
            given = (given or {}).get(key, {})
        for key, value in (given or {}).items():
            if key in plan and list(value if isinstance(value, (list, tuple)) else [value]) != list(
                plan[key] if isinstance(plan[key], (list, tuple)) else [plan[key]]
            ):
                problems.append(
                    f"{'.'.join(keys)}.{key} is {value!r} here, {plan[key]!r} in " "the plan"
                )
    if problems:
        raise CovidctError(
            f"the trained system {system.source} cannot be applied with this config (its "
            "plan fixes how scans are processed; remove these keys or make them agree):\n  "
            + "\n  ".join(problems)
        )
    config["ingest"].update(pre["ingest"])
    config["roi"].update(pre["roi"])
    SEGMENTATION["method"] = seg["method"]
    SEGMENTATION["threshold"].update(seg.get("params") or {})
    if system.segmenter is not None:
        SEGMENTATION["model"] = str(system.segmenter)


def training_discharges():
    """Discharges among the training sites' COVID-19 patients with follow-up."""
    rows = patients_of(TRAIN_SITES)
    follow = rows[(rows["label"] == "covid") & rows["stay_days"].notna()]
    follow = follow[follow["stay_days"] >= config["prognosis"]["min_follow_up_days"]]
    return int((follow["discharged"].fillna(0) == 1).sum())


def _plan():
    try:
        plan = plan_workflow(
            pretrain_sites=PRETRAIN_SITES,
            train_sites=TRAIN_SITES,
            diagnosis_sites=DIAGNOSIS_SITES,
            prognosis_sites=PROGNOSIS_SITES,
            init=TRAINING["init"] or None,
            system=config.get("system") or None,
            system_has_cox=SYSTEM is not None and SYSTEM.cox is not None,
            train_events=training_discharges(),
            min_events=config["prognosis"]["min_events"],
        )
    except ValueError as err:
        raise CovidctError(str(err), path=CONFIG_FILES)
    lines = list(plan.messages)
    if MISSING_IMAGES:
        lines.append(
            f"{len(MISSING_IMAGES)} scan(s) not found (these patients' ingest jobs will fail): "
            + "; ".join(MISSING_IMAGES)
        )
    if workflow.is_main_process:
        for line in lines:
            (logger.warning if "not found" in line else logger.info)(f"covidct: {line}")
        from covidct.io.atomic import write_text

        write_text(workdir_path("logs/workflow_plan.txt"), "\n".join(lines) + "\n")
    return plan


def patients_of(sites):
    return samples[samples["site"].isin(list(sites))]


SYSTEM = _open_system()
PLAN = _plan()
# Table 2's column order: training sites, then diagnosis, then prognosis validation sites.
EVAL_SITES = PLAN.evaluate
COX_SITES = PLAN.cox_sites


def patient_dir(row):
    return f"{RESULTS}/patients/{row.site}/{row.patient}"


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
    rows["image"] = [str(Path(workdir_path(image)).absolute()) for image in rows["image"]]
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


if TRAINING["accelerator"] == "gpu" and TRAINING["backend"] != "jax":
    raise CovidctError(
        f"training.accelerator: gpu needs training.backend: jax (the GPU env, envs/gpu.yaml, "
        f"has Keras on JAX with CUDA; {TRAINING['backend']} there would train on the CPU)",
        path=CONFIG_FILES,
    )


def deep_env():
    """The conda env of the rules that run networks: envs/gpu.yaml or envs/deep.yaml."""
    return f"../../envs/{'gpu' if TRAINING['accelerator'] == 'gpu' else 'deep'}.yaml"


def segment_env():
    if SEGMENTATION["method"] == "fpn":
        return deep_env()
    return "../../envs/preprocess.yaml"


def _lesion_cases():
    """The lung FPN's extra training patients with dense lesion cases, by name."""
    if SEGMENTATION["method"] != "fpn" or SEGMENTATION["model"] or SEGMENTATION["train"]["sheet"]:
        return {}
    if not SYNTHETIC:
        raise CovidctError(
            "segmentation.method fpn trains the lung FPN on exact lung masks, and a cohort of "
            "your own scans has none: give segmentation.train.sheet (a TSV of image / mask "
            "pairs) or segmentation.model (a trained FPN .keras)",
            path=CONFIG_FILES,
        )
    from covidct.synth.cohort import lesion_case_rows

    rows = lesion_case_rows(
        SEGMENTATION["train"]["lesion_cases"],
        config.get("synthetic") or {},
        root=f"{RESULTS}/synth",
    )
    return {r["patient"]: r for r in rows}


LESION_CASES = _lesion_cases()
LESION_CASE_DIR = f"{RESULTS}/synth/{LESION_CASE_SITE}"


def lesion_case_spec(wildcards):
    """A lesion-case patient's row, as a quoted JSON argument."""
    return shlex.quote(json.dumps(LESION_CASES[wildcards.patient], sort_keys=True))


def _segmenter_pairs():
    """(image, mask) pairs: the config's sheet, or the synthetic cohort's exact masks and the
    lesion cases' (segmentation.train.lesion_cases)."""
    train = SEGMENTATION["train"]
    if train["sheet"]:
        table = pd.read_csv(train["sheet"], sep="\t", dtype=str)
        return list(zip(table["image"], table["mask"]))[: train["max_patients"]]
    pairs = [
        (r.image, f"{RESULTS}/synth/{r.site}/{r.patient}/lung_mask.nii.gz")
        for r in samples.itertuples()
    ]
    cases = [(r["image"], r["mask"]) for r in LESION_CASES.values()]
    return pairs[: train["max_patients"]] + cases


def segmenter_pairs_input(wildcards):
    return [p for pair in _segmenter_pairs() for p in pair]


def segmenter_pairs_flag(wildcards):
    pairs = _segmenter_pairs()
    return (
        "--images "
        + " ".join(shlex.quote(workdir_path(i)) for i, _ in pairs)
        + " --masks "
        + " ".join(shlex.quote(workdir_path(m)) for _, m in pairs)
    )


def segmenter_weights_flag(wildcards):
    weights = SEGMENTATION["train"]["imagenet_weights"]
    return f"--imagenet-weights {shlex.quote(weights)}" if weights else ""


# ---- training, evaluation, prognosis -------------------------------------------------------


def train_options(name, rule, sites, task, epochs_of=None, **changes):
    """The options of one training rule: the training section, its epochs (those of
    ``epochs_of``, default ``name``), its tags; ``changes`` override training parameters."""
    class_weight = TRAINING.get("class_weight") if task == "covid" else None
    params = P.from_config(
        P.TrainParams,
        TRAINING,
        epochs=TRAINING["epochs"][epochs_of or name],
        class_weight=class_weight,
        **changes,
    )
    tags = f"--tag covidct.rule={rule} --tag covidct.sites={','.join(sites)}"
    synthetic = " --synthetic" if SYNTHETIC else ""
    return f"--name {name} --task {task} {P.as_options(params)}{synthetic} {tags} {TRACKING}"


def patients_folder(wildcards, input):
    """results/patients, from the rule's ROI inputs (the stages find each store below it)."""
    return Path(input.rois[0]).parents[2]


TRAIN_SHELL = (
    "KERAS_BACKEND={params.backend} $COVIDCT train --sheet {input.sheets}"
    " --patients {params.patients} --out {params.out} {params.init} {params.options}"
    " --threads {threads} > {log} 2>&1"
)
MODELS = f"{RESULTS}/models"


def finetune_init_input(wildcards):
    """The model file finetune_covid starts from (none for random init or a model URI)."""
    from covidct.model.saved import is_model_uri

    if PLAN.init == "pretrain_egfr":
        return [f"{MODELS}/pretrain_egfr/model.keras"]
    if PLAN.init and not is_model_uri(PLAN.init):
        return [PLAN.init]
    return []


def finetune_init_flag(wildcards, input):
    if PLAN.init is None:
        return ""
    return f"--init {shlex.quote(input.init[0] if input.init else PLAN.init)}"


# model -> the folder of its per-site evaluation, below results/
EVAL_DIRS = {"finetune_covid": "eval/{site}"}
if PLAN.ablation:
    EVAL_DIRS["random_init"] = "eval/{site}/random_init"

# The learning curve: both fine-tunings again on fractions of the training split, compared on
# the internal validation split (the same patients at every fraction) and the external sites.
LEARNING_CURVE = sorted(TRAINING["learning_curve"]) if PLAN.ablation else []
CURVE_SITES = [s for s in EVAL_SITES if s not in TRAIN_SITES]
if TRAINING["learning_curve"] and not PLAN.ablation and workflow.is_main_process:
    logger.info(
        "covidct: learning curve (training.learning_curve): not produced, it needs a "
        "pretrained model to compare with random init (a pretrain site or training.init)"
    )


def curve_model(base, fraction):
    """The learning curve's model of ``base`` (finetune_covid or random_init) at ``fraction``."""
    return f"{base}_lc{round(100 * fraction)}"


def curve_points(wildcards):
    """``--point NAME FRACTION PRETRAINED RANDOM_INIT`` for every validation set and fraction."""
    points = []
    for fraction in [*LEARNING_CURVE, 1.0]:
        pre, rnd = (
            (b if fraction == 1.0 else curve_model(b, fraction))
            for b in ("finetune_covid", "random_init")
        )
        points.append(
            (
                "internal validation",
                fraction,
                f"{MODELS}/{pre}/val_predictions.csv",
                f"{MODELS}/{rnd}/val_predictions.csv",
            )
        )
        for site in CURVE_SITES:
            points.append(
                (site, fraction, curve_prediction(pre, site), curve_prediction(rnd, site))
            )
    return points


def curve_prediction(model, site):
    if model in EVAL_DIRS:
        return eval_file(model, "predictions.csv", site)
    return f"{RESULTS}/learning_curve/{model}/{site}/predictions.csv"


def model_file(model):
    """The model a site is evaluated with: trained here, or the config's trained system."""
    if model == "finetune_covid" and SYSTEM is not None:
        return str(SYSTEM.model)
    return f"{MODELS}/{model}/model.keras"


def eval_file(model, name, site="{site}"):
    return f"{RESULTS}/{EVAL_DIRS[model].format(site=site)}/{name}"


def youden_flag(wildcards, input):
    """The Youden threshold: chosen on the training sites, or the trained system's."""
    if SYSTEM is not None:
        threshold = SYSTEM.plan["evaluation"].get("youden_threshold")
        if threshold is None:
            return ""
        source = shlex.quote(f"the trained system {SYSTEM.source}")
        return f"--youden-threshold {threshold} --youden-source {source}"
    return f"--youden-from {' '.join(input.train)}"


def subgroup_flags(wildcards):
    groups = SITES[wildcards.site].get("subgroups", {})
    return " ".join(f"--subgroup {name}={','.join(labels)}" for name, labels in groups.items())


def validate_flag(wildcards, input):
    return f"--validate {' '.join(input.validate)}" if input.validate else ""


def tables_outputs():
    """Table 2 and Figure 3 always; Table S2 where there is an ablation to compare."""
    outputs = dict(
        table2=report(
            f"{RESULTS}/tables/table2.md", caption="../report/table2.rst", category="Tables"
        ),
        table2_csv=f"{RESULTS}/tables/table2.csv",
        roc=report(
            f"{RESULTS}/tables/figure3a_roc.png",
            caption="../report/figure3.rst",
            category="Diagnosis",
        ),
        calibration=report(
            f"{RESULTS}/tables/figure3b_calibration.png",
            caption="../report/figure3.rst",
            category="Diagnosis",
        ),
    )
    if PLAN.ablation:
        outputs["table_s2"] = report(
            f"{RESULTS}/tables/table_s2.md", caption="../report/table_s2.rst", category="Tables"
        )
        outputs["table_s2_csv"] = f"{RESULTS}/tables/table_s2.csv"
    return outputs


def flow_model_runs():
    """The run.json of the models trained here, for the flow's training and validation use."""
    runs = [f"{MODELS}/pretrain_egfr/run.json"] if PLAN.pretrain else []
    return runs + ([f"{MODELS}/finetune_covid/run.json"] if PLAN.finetune else [])


def final_outputs():
    outputs = [f"{patient_dir(r)}/roi.zarr" for r in samples.itertuples()]
    if LEARNING_CURVE:
        outputs += [f"{RESULTS}/tables/learning_curve.md"]
    outputs += [f"{RESULTS}/tables/qc_summary.tsv"]
    outputs += [f"{RESULTS}/tables/flow.md", f"{RESULTS}/tables/table1.md"]
    if PLAN.pretrain:
        outputs += [f"{MODELS}/pretrain_egfr/run.json"]
    if PLAN.finetune:
        outputs += [f"{MODELS}/finetune_covid/plan.json"]
    if PLAN.ablation:
        outputs += [f"{MODELS}/random_init/run.json", f"{RESULTS}/tables/table_s2.md"]
    if PLAN.model:
        outputs += [eval_file("finetune_covid", "metrics.json", s) for s in EVAL_SITES]
        outputs += [f"{RESULTS}/tables/table2.md", f"{RESULTS}/explain/feature_pca.png"]
    if PLAN.cox_fit:
        outputs += [f"{RESULTS}/prognosis/cox.json", f"{RESULTS}/tables/table_s3.md"]
    outputs += [f"{RESULTS}/prognosis/{s}/logrank.json" for s in COX_SITES]
    return outputs
