"""Any mix of site roles: what the workflow runs and what it says it does not run, and a trained
system taken to a new hospital. Real `snakemake` runs; the cohort is the six real COVID-CT-MD
scans (two hospitals: train and diagnosis, no EGFR cohort), then a third hospital validated
with the first run's trained system alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from test_workflow import _snakemake, _tiny_config, _workdir

from covidct.io.results import read_plan

pytestmark = pytest.mark.slow

SCANS = {"P001": "covid", "P002": "covid", "cap001": "bacterial", "cap002": "bacterial",
         "normal001": "normal", "normal002": "normal"}
SMALL = {"roi": {"size": [8, 32, 48], "min_pixels": 20},
         "training": {"epochs": {"pretrain_egfr": 1, "finetune_covid": 1, "random_init": 1},
                      "batch_size": 2, "workers": 1},
         "explain": {"n_per_site": 1, "steps": 2}}


def _sheet(real_data, path, rows):
    folder = real_data / "covid_ct_md"
    table = pd.DataFrame([{"patient": patient, "site": site,
                           "image": str(folder / f"{case}_ct_bin4x4x1.nii.gz"),
                           "task": "covid", "label": SCANS[case], "age": 50, "sex": "M",
                           "comorbidity": 0, "stay_days": "", "discharged": ""}
                          for patient, site, case in rows])
    table.to_csv(path, sep="\t", index=False)
    return path


def _config(workdir, name, **cfg):
    path = workdir / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _jobs(proc) -> dict[str, int]:
    """The rule -> job count table of a dry run."""
    text = proc.stdout + proc.stderr
    return {k: int(v) for k, v in re.findall(r"^(\w+)\s+(\d+)\s*$", text, flags=re.M)}


@pytest.fixture(scope="module")
def first_hospitals(repo, real_data, tmp_path_factory):
    """Two hospitals of real scans: A trains (no EGFR cohort), B validates."""
    workdir = _workdir(repo, tmp_path_factory.mktemp("hospitals"))
    sheet = _sheet(real_data, workdir / "samples.tsv",
                   [("a1", "hospA", "P001"), ("a2", "hospA", "cap001"),
                    ("a3", "hospA", "normal001"), ("a4", "hospA", "cap002"),
                    ("b1", "hospB", "P002"), ("b2", "hospB", "normal002")])
    config = _config(workdir, "real.yaml", samples=str(sheet),
                     sites={"hospA": {"role": "train"}, "hospB": {"role": "diagnosis"}},
                     **SMALL)
    proc = _snakemake(workdir, "--cores", "2", "--configfile", str(config),
                      "--replace-workflow-config", timeout=1500)
    return workdir, proc


def test_train_and_diagnosis_sites_without_an_egfr_cohort(first_hospitals):
    workdir, proc = first_hospitals
    text = proc.stdout + proc.stderr
    assert "no pretrain site: finetune_covid starts from random init; Table S2 (pretraining " \
           "ablation) is not produced" in text
    assert "prognosis: no Cox model" in text
    plan_log = (workdir / "logs" / "workflow_plan.txt").read_text()
    assert "Table S2 (pretraining ablation) is not produced" in plan_log
    results = workdir / "results"
    run = json.loads((results / "models" / "finetune_covid" / "run.json").read_text())
    assert run["init"] == "none" and run["n_train"] + run["n_val"] == 4
    metrics = json.loads((results / "eval" / "hospB" / "metrics.json").read_text())
    assert metrics["n"] == 2 and metrics["n_positive"] == 1
    assert (results / "tables" / "table2.md").exists()
    assert not (results / "tables" / "table_s2.md").exists()
    assert not (results / "models" / "random_init").exists()
    plan = read_plan(results / "models" / "finetune_covid")
    assert plan["preprocessing"]["roi"]["size"] == [8, 32, 48]
    assert plan["preprocessing"]["roi"]["min_pixels"] == 20
    assert plan["preprocessing"]["segmentation"]["method"] == "threshold"
    assert plan["training_data"] == {"sites": ["hospA"], "n": 4, "synthetic": False,
                                     "labels": {"bacterial": 2, "covid": 1, "normal": 1}}
    assert plan["evaluation"]["threshold"] == 0.5 and plan["cox"] is None


def test_a_new_hospital_is_validated_with_the_trained_system_alone(first_hospitals, repo,
                                                                    real_data, tmp_path):
    first, _ = first_hospitals
    system = first / "results" / "models" / "finetune_covid"
    workdir = _workdir(repo, tmp_path / "new_hospital")
    sheet = _sheet(real_data, workdir / "samples.tsv",
                   [("c1", "hospC", "cap001"), ("c2", "hospC", "P001")])
    config = _config(workdir, "new.yaml", samples=str(sheet), system=str(system),
                     sites={"hospC": {"role": "diagnosis"}},
                     explain={"n_per_site": 1, "steps": 2})
    dry = _snakemake(workdir, "-n", "--configfile", str(config), "--replace-workflow-config")
    jobs = _jobs(dry)
    assert not {"pretrain_egfr", "finetune_covid", "train_random_init"} & set(jobs), jobs
    assert jobs["predict_finetune_covid"] == 1 and jobs["evaluate_finetune_covid"] == 1
    assert "nothing is trained; the sites are evaluated with the trained system" in dry.stdout \
        + dry.stderr
    _snakemake(workdir, "--cores", "2", "--configfile", str(config), "--replace-workflow-config",
               timeout=900)
    metrics = json.loads((workdir / "results" / "eval" / "hospC" / "metrics.json").read_text())
    assert metrics["n"] == 2
    plan = read_plan(system)
    assert metrics["youden"]["threshold"] == plan["evaluation"]["youden_threshold"]
    # the new site was processed as the system's training scans were: its ROIs are 8x32x48
    from covidct.io.stores import open_image

    roi = open_image(workdir / "results" / "patients" / "hospC" / "c1" / "roi.zarr")
    assert roi.array.shape == (8, 32, 48) and roi.attrs["params"]["min_pixels"] == 20

    # a config that contradicts the plan is refused, naming the field
    bad = _config(workdir, "bad.yaml", samples=str(sheet), system=str(system),
                  sites={"hospC": {"role": "diagnosis"}}, roi={"size": [16, 64, 96]})
    proc = _snakemake(workdir, "-n", "--configfile", str(bad), "--replace-workflow-config",
                      check=False)
    assert proc.returncode != 0
    assert "roi.size is [16, 64, 96] here, [8, 32, 48] in the plan" in proc.stdout + proc.stderr

    # one more hospital later: only its patients' jobs (and the tables) run
    _sheet(real_data, sheet, [("c1", "hospC", "cap001"), ("c2", "hospC", "P001"),
                              ("d1", "hospD", "normal002")])
    more = _config(workdir, "more.yaml", samples=str(sheet), system=str(system),
                   sites={"hospC": {"role": "diagnosis"}, "hospD": {"role": "diagnosis"}},
                   explain={"n_per_site": 1, "steps": 2})
    jobs = _jobs(_snakemake(workdir, "-n", "--configfile", str(more),
                            "--replace-workflow-config"))
    assert jobs["ingest"] == 1 and jobs["roi"] == 1, jobs
    assert jobs["predict_finetune_covid"] == 1 and jobs["evaluate_finetune_covid"] == 1, jobs


def test_predict_with_the_system_gives_the_workflows_probability(first_hospitals, real_data):
    workdir, _ = first_hospitals
    system = workdir / "results" / "models" / "finetune_covid"
    scan = real_data / "covid_ct_md" / "P002_ct_bin4x4x1.nii.gz"
    proc = subprocess.run([sys.executable, "-m", "covidct", "predict", str(scan), "--system",
                           str(system), "--threads", "1"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    table = pd.read_csv(workdir / "results" / "eval" / "hospB" / "predictions.csv")
    expected = float(table.loc[table["patient"] == "b1", "probability"].iloc[0])
    assert out["probability"] == pytest.approx(expected, abs=1e-5)
    assert out["roi"]["size"] == [8, 32, 48] and out["roi"]["min_pixels"] == 20
    assert out["system"]["training_data"]["sites"] == ["hospA"]
    assert "warning" not in out["system"]        # real scans: no synthetic-cohort warning


# --------------------------------------------------------------------------- role mixes (dry runs)

@pytest.mark.parametrize("roles, said, runs, absent", [
    ({"trainsite": "train", "diagsite": "diagnosis"},
     "no pretrain site: finetune_covid starts from random init; Table S2 (pretraining ablation) "
     "is not produced", {"finetune_covid", "tables"}, {"train_random_init", "pretrain_egfr"}),
    ({"egfrsite": "pretrain"},
     "a pretrain site alone: nothing is fine-tuned or evaluated", {"pretrain_egfr"},
     {"finetune_covid", "tables", "explain"}),
    ({"diagsite": "diagnosis", "progsite": "prognosis"},
     "no train site and no trained system (system:): nothing is trained or evaluated", {"roi"},
     {"finetune_covid", "predict_finetune_covid", "tables"}),
    ({"trainsite": "train", "progsite": "prognosis"},
     "no diagnosis site: the classifier is not validated at another hospital",
     {"finetune_covid", "prognosis"}, {"pretrain_egfr"}),
])
def test_each_role_mix_says_what_it_does_not_run(repo, tmp_path, roles, said, runs, absent):
    workdir = _workdir(repo, tmp_path)
    sites = {name: {"role": role} for name, role in roles.items()}
    tiny = yaml.safe_load((repo / "tests" / "data" / "tiny.yaml").read_text())
    synthetic = dict(tiny["synthetic"], sites={k: v for k, v in tiny["synthetic"]["sites"].items()
                                               if k in roles})
    config = _tiny_config(repo, workdir, sites=sites, synthetic=synthetic)
    proc = _snakemake(workdir, "-n", "--configfile", str(config), "--replace-workflow-config")
    assert said in proc.stdout + proc.stderr
    jobs = _jobs(proc)
    assert runs <= set(jobs) and not absent & set(jobs), jobs


def test_training_init_starts_finetuning_and_brings_the_ablation_back(repo, tmp_path):
    from covidct.model.architecture import covid19net

    workdir = _workdir(repo, tmp_path)
    init = tmp_path / "start.keras"
    covid19net((8, 32, 48)).save(init)
    tiny = yaml.safe_load((repo / "tests" / "data" / "tiny.yaml").read_text())
    config = _tiny_config(repo, workdir, sites={"trainsite": {"role": "train"}},
                          synthetic=dict(tiny["synthetic"],
                                         sites={"trainsite": tiny["synthetic"]["sites"]
                                                ["trainsite"]}),
                          training=dict(tiny["training"], init=str(init)))
    proc = _snakemake(workdir, "-n", "-p", "--configfile", str(config),
                      "--replace-workflow-config")
    assert f"no pretrain site: finetune_covid starts from training.init ({init})" in proc.stdout \
        + proc.stderr
    jobs = _jobs(proc)
    assert {"finetune_covid", "train_random_init"} <= set(jobs)
    assert f"--init {init}" in proc.stdout


def test_train_sites_and_a_system_together_are_refused(repo, tmp_path):
    workdir = _workdir(repo, tmp_path)
    config = _tiny_config(repo, workdir, system=str(tmp_path))
    proc = _snakemake(workdir, "-n", "--configfile", str(config), "--replace-workflow-config",
                      check=False)
    assert proc.returncode != 0
    assert "either train a model on the train sites or apply the system" in proc.stdout \
        + proc.stderr


def test_a_misspelt_section_is_an_error_naming_it(repo, tmp_path):
    workdir = _workdir(repo, tmp_path)
    config = _tiny_config(repo, workdir, evalution={"threshold": 0.7})
    proc = _snakemake(workdir, "-n", "--configfile", str(config), "--replace-workflow-config",
                      check=False)
    assert proc.returncode != 0
    assert "'evalution' was unexpected" in proc.stdout + proc.stderr
