"""covidct as a Snakemake module of another workflow, with a `prefix:`.

A host Snakefile uses every rule of workflow/Snakefile under a prefix and has a rule of its own.
The preprocessing runs for real (synthetic scans, ingest, segmentation, ROIs), the rest as a
dry run; every file, the tracking database and the parameters that name paths must lie under
the prefix, and the host's own rule must see the host's environment unchanged.
"""

from __future__ import annotations

import os
import re
import subprocess

import pandas as pd
import pytest
import yaml
from test_workflow import SNAKEMAKE

pytestmark = pytest.mark.slow

HOST = """\
configfile: "config/covidct.yaml"


module covidct:
    snakefile:
        "{snakefile}"
    config:
        config
    prefix:
        "covidct"


use rule * from covidct as covidct_*


rule host_env:
    output:
        "host_env.txt",
    shell:
        "env > {{output}}"
"""


@pytest.fixture(scope="module")
def host(repo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("host")
    cfg = yaml.safe_load((repo / "tests" / "data" / "tiny.yaml").read_text())
    for site in cfg["synthetic"]["sites"].values():
        site["n"] = 2
    (folder / "config").mkdir()
    (folder / "config" / "covidct.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "Snakefile").write_text(HOST.format(snakefile=repo / "workflow" / "Snakefile"))
    return folder, cfg


def _snakemake(folder, *args, env=None):
    proc = subprocess.run([SNAKEMAKE, "--cores", "2", *args], cwd=folder, capture_output=True,
                          text=True, encoding="utf-8", timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def test_the_module_writes_under_its_prefix_and_leaves_the_host_alone(host):
    folder, cfg = host
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDCT")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "0"          # the host's own setting, which must survive
    _snakemake(folder, "--until", "covidct_qc_summary", env=env)
    _snakemake(folder, "host_env.txt", env=env)
    n = sum(site["n"] for site in cfg["synthetic"]["sites"].values())
    results = folder / "covidct" / "results"
    assert len(list(results.glob("patients/*/*/roi.zarr"))) == n
    assert len(pd.read_csv(results / "tables" / "qc_summary.tsv", sep="\t")) == n
    assert len(list((folder / "covidct" / "logs" / "roi").glob("*/*.log"))) == n
    assert (folder / "covidct" / "logs" / "workflow_plan.txt").exists()
    assert not (folder / "results").exists() and not (folder / "logs").exists()
    # the site sheets name the scans where the module wrote them
    sheet = pd.read_csv(results / "sheets" / "trainsite.tsv", sep="\t")
    assert all(str(results / "synth") in image for image in sheet["image"])

    seen = dict(line.split("=", 1) for line in
                (folder / "host_env.txt").read_text().splitlines() if "=" in line)
    assert seen["PATH"] == env["PATH"]
    assert seen["TF_CPP_MIN_LOG_LEVEL"] == "0"
    # the only variables the module sets: how rules call covidct, where its envs install it
    # from, the config hash its MLflow runs carry, and whether local jobs go to the warm worker
    # (the rest of what is new is Snakemake's: thread counts and the job's temporary folder)
    new = {k for k in seen if k not in env}
    assert {k for k in new if k.startswith("COVIDCT")} == {"COVIDCT", "COVIDCT_SOURCE",
                                                          "COVIDCT_CONFIG_HASH", "COVIDCT_WORKER"}
    assert seen["COVIDCT_WORKER"] == "1"                  # a local run: the worker is on
    assert not {k for k in new if k.startswith(("TF_", "KERAS", "PYTHON", "MLFLOW"))}

    # the rest of the DAG: every command's paths and the tracking database under the prefix
    text = _snakemake(folder, "-n", "-p", env=env)
    commands = [c for c in re.findall(r"^Shell command: (.*)$", text, flags=re.M) if c != "None"]
    rules = set(re.findall(r"^rule (covidct_\w+):", text, flags=re.M))
    assert {"covidct_finetune_covid", "covidct_evaluate_finetune_covid", "covidct_explain",
            "covidct_flow", "covidct_tables"} <= rules
    tracked = [c for c in commands if "--tracking-uri" in c]
    assert tracked and all("sqlite:///covidct/results/mlflow.db" in c for c in tracked)
    for command in commands:
        paths = re.findall(r"(?<![\w/.:-])((?:results|logs)/\S+)", command)
        assert not paths, (paths, command)
