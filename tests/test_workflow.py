"""Real `snakemake` runs of the workflow on a tiny synthetic config (and on real scans with bad
rows).

The tiny run is shared by the tests of this module (one run, several checks): the full DAG, the
person-identifying DICOM fields, and the incremental-site dry runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from covidct.io.tracking import client as tracking_client

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")


def _workdir(repo: Path, path: Path) -> Path:
    """A working folder that sees the workflow but not config/config.yaml (tests bring their
    own)."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "workflow"):
        if not (path / name).exists():
            (path / name).symlink_to(repo / name)
    return path


def _snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 900):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def _tiny_config(repo: Path, workdir: Path, **changes) -> Path:
    cfg = yaml.safe_load((repo / "tests" / "data" / "tiny.yaml").read_text())
    for key, value in changes.items():
        cfg[key] = value
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def tiny_run(repo, tmp_path_factory):
    workdir = _workdir(repo, tmp_path_factory.mktemp("tiny"))
    config = _tiny_config(repo, workdir)
    proc = _snakemake(workdir, "--cores", "2", "--configfile", str(config), timeout=1500)
    return workdir, config, proc


def test_lint_and_dry_run_of_the_demo_config_are_clean(repo):
    lint = subprocess.run([SNAKEMAKE, "--lint"], cwd=repo, capture_output=True, text=True,
                          timeout=300)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Lints for rule" not in lint.stdout + lint.stderr
    dry = subprocess.run([SNAKEMAKE, "-n", "--quiet", "rules"], cwd=repo, capture_output=True,
                         text=True, timeout=300)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    counts = dict(re.findall(r"^(\w+)\s+(\d+)\s*$", dry.stdout + dry.stderr, flags=re.M))
    cfg = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    n_patients = sum(site["n"] for site in cfg["synthetic"]["sites"].values())
    if "ingest" in counts:  # a fresh checkout: everything is to be done
        assert int(counts["ingest"]) == n_patients
        assert int(counts["roi"]) == n_patients
        assert int(counts["finetune_covid"]) == 1


def test_tiny_workflow_runs_end_to_end(tiny_run):
    workdir, config, _ = tiny_run
    cfg = yaml.safe_load(config.read_text())
    results = workdir / "results"
    n = sum(s["n"] for s in cfg["synthetic"]["sites"].values())
    rois = sorted(results.glob("patients/*/*/roi.zarr"))
    assert len(rois) == n
    for name in ("pretrain_egfr", "finetune_covid", "random_init"):
        run = json.loads((results / "models" / name / "run.json").read_text())
        assert run["run_id"] and run["model_uri"]
    for site in ("trainsite", "diagsite", "progsite"):
        metrics = json.loads((results / "eval" / site / "metrics.json").read_text())
        assert metrics["n"] == cfg["synthetic"]["sites"][site]["n"]
        assert metrics["threshold"] == cfg["evaluation"]["threshold"]
        pred = pd.read_csv(results / "eval" / site / "predictions.csv")
        assert [f"feature_{i}" for i in range(64)] == [
            c for c in pred.columns if c.startswith("feature_")
        ]
        assert pred["probability"].between(0, 1).all()
    table2 = pd.read_csv(results / "tables" / "table2.csv")
    assert not table2.empty
    assert (results / "prognosis" / "cox.json").exists()
    assert (results / "mlflow.db").stat().st_size > 0
    qc = pd.read_csv(results / "tables" / "qc_summary.tsv", sep="\t")
    assert len(qc) == n
    # every ROI carries its lung label; the explanation measures the saliency on the ROI and on
    # the scan's voxels, and the latter (the clamp pins most non-lung tissue) sits mostly in
    # the lung
    from covidct.io.stores import read_label

    for roi in rois:
        lung = read_label(roi, "lung")
        assert lung is not None and 0.1 < lung.mean() < 0.9
    # every per-patient and network job measured its time and memory (benchmark:)
    assert len(list((workdir / "logs" / "benchmark" / "roi").glob("*/*.tsv"))) == n
    summary = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" /
                                                  "rule_resources.py"), "--logs",
                              str(workdir / "logs")], capture_output=True, text=True, check=True)
    measured = {line.split()[0]: line.split()[1:] for line in summary.stdout.splitlines()[2:]}
    assert {"ingest", "segment", "roi", "pretrain_egfr", "finetune_covid"} <= set(measured)
    assert int(measured["roi"][0]) == n and float(measured["finetune_covid"][3]) > 100  # MB
    # a local run hands the per-patient stages to the warm worker (once it has started), and
    # the stage's own peak memory comes from its log
    served = [log for log in (workdir / "logs" / "roi").glob("*/*.log")
              if "ran in the warm worker" in log.read_text()]
    assert served and float(measured["roi"][3]) > 50
    sal = pd.read_csv(results / "explain" / "saliency_in_lung.csv")
    assert len(sal) and sal[["fraction", "fraction_ct"]].stack().between(0, 1).all()
    assert (sal["fraction_ct"] > sal["lung_volume_fraction_ct"]).mean() >= 0.5
    # the trained system holds the export with its input gradient; explain runs its saliency
    # on the model's translation too
    assert (results / "models" / "finetune_covid" / "model.saliency.onnx").is_file()
    assert "saliency by onnxruntime on the model's ONNX translation" in (
        workdir / "logs" / "explain.log").read_text()


def test_no_identifying_dicom_field_reaches_results_or_logs(tiny_run):
    import pydicom

    workdir, _, _ = tiny_run
    dicoms = sorted((workdir / "results" / "synth").glob("*/*/dicom/*.dcm"))
    assert dicoms, "the tiny cohort has DICOM sites"
    planted = set()
    for f in dicoms[:: max(1, len(dicoms) // 5)]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for field in ("PatientName", "PatientID", "InstitutionName", "OtherPatientIDs",
                      "ReferringPhysicianName", "AccessionNumber"):
            value = str(ds.get(field, "") or "").strip()
            if len(value) >= 5:
                planted.add(value)
    assert planted, "the synthetic DICOM carries made-up identifying fields"
    needles = [p.encode() for p in planted]
    checked = 0
    for root in (workdir / "results", workdir / "logs", workdir / ".snakemake" / "log"):
        for path in root.rglob("*"):
            if not path.is_file() or "synth" in path.relative_to(workdir).parts[:2]:
                continue
            data = path.read_bytes()
            checked += 1
            for needle in needles:
                assert needle not in data, f"{needle!r} found in {path}"
    assert checked > 50


def _dry_run_jobs(workdir: Path, config: Path) -> list[tuple[str, str]]:
    proc = _snakemake(workdir, "-n", "--configfile", str(config))
    text = proc.stdout + proc.stderr
    jobs = []
    # grouped jobs (the preprocess group) are listed indented under "Group job ..."
    for block in re.split(r"\n(?=\s*(?:local)?rule \w+:)", text):
        m = re.match(r"(?:local)?rule (\w+):", block.strip())
        if not m:
            continue
        wc = re.search(r"wildcards: (.*)", block)
        jobs.append((m.group(1), wc.group(1) if wc else ""))
    return jobs


def _with_new_site(config: Path, site: str, role: str, n: int = 3) -> Path:
    """A copy of ``config`` with one more synthetic site of ``n`` COVID-task patients."""
    cfg = yaml.safe_load(config.read_text())
    cfg["sites"][site] = {"role": role}
    cfg["synthetic"]["sites"][site] = {"n": n, "task": "covid", "format": "nifti"}
    new = config.parent / f"{config.stem}_{site}.yaml"
    new.write_text(yaml.safe_dump(cfg))
    return new


def test_adding_a_diagnosis_site_reruns_only_that_site(repo, tiny_run):
    workdir, config, _ = tiny_run
    jobs = _dry_run_jobs(workdir, _with_new_site(config, "newsite", "diagnosis"))
    rules = {r for r, _ in jobs}
    assert {"ingest", "segment", "roi", "evaluate_finetune_covid", "tables"} <= rules
    per_patient = [
        (r, w) for r, w in jobs if r in ("synth_nifti", "synth_dicom", "ingest", "segment", "roi")
    ]
    assert len(per_patient) == 3 * 4
    assert all("site=newsite" in w for _, w in per_patient), per_patient
    assert not rules & {"pretrain_egfr", "finetune_covid", "train_random_init"}
    evaluated = [w for r, w in jobs if r.startswith(("predict_", "evaluate_"))]
    assert evaluated and all("site=newsite" in w for w in evaluated), evaluated


def test_adding_a_training_site_retrains(repo, tiny_run):
    workdir, config, _ = tiny_run
    rules = {r for r, _ in _dry_run_jobs(workdir, _with_new_site(config, "train2", "train"))}
    assert {"finetune_covid", "train_random_init"} <= rules
    assert "pretrain_egfr" not in rules


def test_mlflow_has_the_gather_and_per_site_runs_only(tiny_run):

    workdir, config, _ = tiny_run
    client = tracking_client(f"sqlite:///{workdir / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("covidct")
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    names = sorted(r.info.run_name for r in runs)
    for model in ("pretrain_egfr", "finetune_covid", "random_init"):
        assert model in names, names
    evaluate_runs = [r for r in runs if (r.info.run_name or "").startswith("evaluate ")]
    assert len(evaluate_runs) == 2 * 3  # two models x three evaluated sites
    assert {"prognosis-trainsite", "prognosis-progsite"} <= set(names)
    assert all(r.data.tags.get("covidct.config_hash") not in (None, "none") for r in runs)
    # no per-patient run: the fan-out never logs to MLflow
    assert len(runs) < 20
    finetune = next(r for r in runs if r.info.run_name == "finetune_covid")
    history = client.get_metric_history(finetune.info.run_id, "val_auc")
    cfg = yaml.safe_load(config.read_text())
    assert len(history) == cfg["training"]["epochs"]["finetune_covid"]
    assert client.get_registered_model("covidct-finetune_covid").name


def _by_tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def test_one_invocation_reads_as_one_study_in_mlflow(tiny_run, tmp_path):
    """Through a real `mlflow server`'s REST API and in the UI as chromium renders it."""
    from servers import get, mlflow_server, post, rendered

    workdir, _, _ = tiny_run
    results = workdir / "results"
    with mlflow_server(f"sqlite:///{results / 'mlflow.db'}", results / "mlartifacts",
                       tmp_path) as base:
        experiment = get(base, "/api/2.0/mlflow/experiments/get-by-name",
                         experiment_name="covidct")["experiment"]
        runs = post(base, "/api/2.0/mlflow/runs/search",
                    {"experiment_ids": [experiment["experiment_id"]],
                     "max_results": 500})["runs"]
        tags = {r["info"]["run_id"]: _by_tags(r) for r in runs}
        parents = [r for r in runs if tags[r["info"]["run_id"]]["covidct.rule"] == "workflow"]
        assert len(parents) == 1, [r["info"]["run_name"] for r in parents]
        parent = parents[0]["info"]["run_id"]
        children = {r["info"]["run_name"]: r for r in runs
                    if tags[r["info"]["run_id"]].get("mlflow.parentRunId") == parent}
        assert len(children) == len(runs) - 1, sorted(children)
        assert {"pretrain_egfr", "finetune_covid", "random_init", "explain",
                "evaluate diagsite finetune_covid", "prognosis-progsite"} <= set(children)
        # one tag vocabulary, one config hash: the effective config's
        for run_tags in tags.values():
            assert all(k.startswith(("covidct.", "mlflow.")) for k in run_tags), run_tags
        assert len({t["covidct.config_hash"] for t in tags.values()}) == 1
        logged = [a["path"] for a in get(base, "/api/2.0/mlflow/artifacts/list",
                                         run_id=parent)["files"]]
        assert "config.yaml" in logged

        finetune = json.loads((results / "models" / "finetune_covid" / "run.json").read_text())
        inputs = children["finetune_covid"]["inputs"]["dataset_inputs"]
        assert {i["dataset"]["name"] for i in inputs} == {"trainsite sheet"}
        version = get(base, "/api/2.0/mlflow/registered-models/alias",
                      name="covidct-finetune_covid", alias="candidate")["model_version"]
        assert int(version["version"]) == finetune["version"]
        assert version["source"] == f"models:/{finetune['model_id']}"     # the logged model
        evaluation = get(base, "/api/2.0/mlflow/runs/get", run_id=children[
            "evaluate diagsite finetune_covid"]["info"]["run_id"])["run"]
        linked = [m["model_id"] for m in evaluation["inputs"].get("model_inputs", [])]
        assert linked == [finetune["model_id"]]
        assert {i["dataset"]["name"] for i in evaluation["inputs"]["dataset_inputs"]} == \
            {"diagsite sheet"}
        assert _by_tags(evaluation)["covidct.model_version"] == \
            f"covidct-finetune_covid/{finetune['version']}"

        # the UI opens on the runs: one study row (its children fold under it)
        page = _visible_text(rendered(f"{base}/#/experiments/{experiment['experiment_id']}"
                                      "?workflowType=machine_learning", tmp_path))
        assert parents[0]["info"]["run_name"] in page and f"{len(runs)} matching runs" in page
        # an evaluation run's page: its name, its metrics linked to the model
        page = _visible_text(rendered(f"{base}/#/experiments/{experiment['experiment_id']}"
                                      f"/runs/{evaluation['info']['run_id']}", tmp_path))
        assert "evaluate diagsite finetune_covid" in page and "calibration_slope" in page


def test_report_gathers_tables_and_figures(tiny_run):
    workdir, config, _ = tiny_run
    _snakemake(workdir, "--configfile", str(config), "--report", "report.zip", timeout=600)
    import zipfile

    with zipfile.ZipFile(workdir / "report.zip") as zf:
        names = zf.namelist()
    assert any(n.endswith("table2.md") for n in names), names[:20]
    assert any(n.endswith("km.png") for n in names)
    assert any(n.endswith("roc.png") for n in names)
    assert any(n.endswith("flow.md") for n in names) and any(n.endswith("table1.md")
                                                             for n in names)


def _visible_text(dom: str) -> str:
    """What a person sees of a rendered page: the DOM without scripts, styles and tags."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def test_report_renders_in_a_browser_with_its_sections(tiny_run, tmp_path):
    from servers import rendered

    workdir, config, _ = tiny_run
    _snakemake(workdir, "--configfile", str(config), "--report", "report.html", timeout=600)
    text = _visible_text(rendered((workdir / "report.html").as_uri(), tmp_path))
    for section in ("Workflow", "Statistics", "Results", "Cohort", "Diagnosis", "Prognosis",
                    "Tables", "Training"):
        assert section in text, (section, text[:2000])
    assert "after Wang et al. 2020" in text


def test_fpn_learns_from_the_dense_lesion_cases_too(repo, tmp_path):
    """segmentation.method fpn: train_lung_segmenter takes the cohort's exact masks and
    segmentation.train.lesion_cases patients with dense lesions on the lung's walls, which the
    rule synth_lesion_case writes (run here for one of them)."""
    workdir = _workdir(repo, tmp_path / "fpn")
    config = _tiny_config(repo, workdir, segmentation={"method": "fpn",
                                                       "train": {"lesion_cases": 3}})
    jobs = _dry_run_jobs(workdir, config)
    cases = sorted(wc for rule, wc in jobs if rule == "synth_lesion_case")
    assert cases == [f"patient=lesion-00{i}" for i in (1, 2, 3)]
    target = "results/synth/lesion_cases/lesion-002/lung_mask.nii.gz"
    _snakemake(workdir, target, "--cores", "1", "--configfile", str(config))
    folder = workdir / "results" / "synth" / "lesion_cases" / "lesion-002"
    assert sorted(p.name for p in folder.iterdir()) == [
        "ct.nii.gz", "lesion_mask.nii.gz", "lung_mask.nii.gz"]
    lung = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "lung_mask.nii.gz"))) > 0
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "lesion_mask.nii.gz"))) > 0
    assert lesion.sum() > 100 and not (lesion & ~lung).any()
    # with a sheet of the user's own pairs, no synthetic cases are added
    sheet = workdir / "pairs.tsv"
    sheet.write_text(f"image\tmask\n{folder / 'ct.nii.gz'}\t{folder / 'lung_mask.nii.gz'}\n")
    config = _tiny_config(repo, workdir, segmentation={"method": "fpn",
                                                       "train": {"sheet": str(sheet)}})
    rules = {rule for rule, _ in _dry_run_jobs(workdir, config)}
    assert "train_lung_segmenter" in rules and "synth_lesion_case" not in rules
