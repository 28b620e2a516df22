"""The rules' conda environments, built the way Snakemake and conda build them, and the tiny
workflow's rules run inside them alone.

conda's channels cannot be reached here, so each env is built as conda builds its pip section:
Snakemake copies envs/NAME.yaml to .snakemake/conda/HASH.yaml in the working folder; conda
writes the pip section beside it as a requirements file and runs `python -m pip install -U -r`
from that folder, in a fresh environment holding only Python and pip. Here the fresh environment
is a venv of this Python 3.11 (no system site packages). Then the tiny workflow runs with every
rule's `$COVIDCT` taken from its own environment: the preprocessing rules from preprocess's, the
networks' (and the trained system's, which exports the model to ONNX) from deep's, the statistics
from stats's, every job logging to a real `mlflow server` on 127.0.0.1 (the README's cluster
set-up: its own backend store, artifacts sent to it).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from servers import get, mlflow_server, post
from test_workflow import SNAKEMAKE, _tiny_config, _workdir

pytestmark = pytest.mark.slow

ENVS = ("preprocess", "deep", "stats")


def build_env(env_file: Path, workdir: Path) -> Path:
    """The environment of ``env_file`` as conda builds it from Snakemake's copy; its prefix."""
    spec = yaml.safe_load(env_file.read_text())
    conda = sorted(d.split("=")[0] for d in spec["dependencies"] if isinstance(d, str))
    assert conda == ["pip", "python"], f"{env_file.name}: conda packages {conda} (pip only)"
    folder = workdir / ".snakemake" / "conda"
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(env_file.read_bytes()).hexdigest()[:16]
    (folder / f"{digest}.yaml").write_bytes(env_file.read_bytes())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    requirements = folder / f"condaenv.{digest}.requirements.txt"
    requirements.write_text("\n".join(pip) + "\n")
    prefix = folder / digest
    subprocess.run([sys.executable, "-m", "venv", str(prefix)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["COVIDCT_SOURCE"] = str(Path(__file__).resolve().parents[1])   # as the workflow sets
    proc = subprocess.run([str(prefix / "bin" / "python"), "-m", "pip", "install", "-q", "-U",
                           "-r", requirements.name, "--exists-action=b"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return prefix


@pytest.fixture(scope="module")
def envs(repo, tmp_path_factory) -> dict[str, Path]:
    from concurrent.futures import ThreadPoolExecutor

    workdir = tmp_path_factory.mktemp("conda")
    # side by side: pip mostly waits on downloads and the disk
    with ThreadPoolExecutor(len(ENVS)) as pool:
        built = pool.map(lambda name: build_env(repo / "envs" / f"{name}.yaml", workdir), ENVS)
        return dict(zip(ENVS, built))


def test_each_env_holds_covidct_and_only_its_own_packages(envs):
    for name, prefix in envs.items():
        python = str(prefix / "bin" / "python")
        code = ("import sys, covidct, importlib.util as u; print(sys.prefix); "
                "print(*(u.find_spec(m) is not None for m in ('tensorflow', 'lifelines')))")
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True,
                             env={"PATH": "/usr/bin:/bin"}).stdout.split()
        assert out[0] == str(prefix)
        assert out[1:] == {"preprocess": ["False", "False"], "deep": ["True", "False"],
                           "stats": ["False", "True"]}[name], (name, out)
        assert (prefix / "bin" / "covidct").exists()


def _run(workdir: Path, env_prefix: Path, *args: str) -> subprocess.CompletedProcess:
    """snakemake with the rules' $COVIDCT from ``env_prefix`` and nothing of this venv on the
    path the jobs see."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(COVIDCT=str(env_prefix / "bin" / "covidct"), PATH="/usr/bin:/bin",
               OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([SNAKEMAKE, "--cores", "2", "--configfile", "tiny.yaml", *args],
                          cwd=workdir, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_the_tiny_workflow_runs_with_every_rule_in_its_own_env(envs, repo, tmp_path):
    workdir = _workdir(repo, tmp_path / "run")
    tiny = yaml.safe_load((repo / "tests" / "data" / "tiny.yaml").read_text())
    sites = {k: dict(v, n=4) for k, v in tiny["synthetic"]["sites"].items()}
    server = tmp_path / "server"
    server.mkdir()
    with mlflow_server(f"sqlite:///{server / 'mlflow.db'}", server / "artifacts", server,
                       proxy=True) as base:
        _tiny_config(repo, workdir, synthetic=dict(tiny["synthetic"], sites=sites),
                     mlflow={"tracking_uri": base, "experiment": "covidct"})
        _run(workdir, envs["preprocess"], "--until", "qc_summary")
        # one --until rule per call: with several, Snakemake 9 stops early ("BUG: Out of jobs
        # ready to be started", snakemake issue 823)
        for rule in ("predict_finetune_covid", "predict_random_init", "explain"):
            _run(workdir, envs["deep"], "--until", rule)
        _run(workdir, envs["stats"], "--omit-from", "trained_system")  # evaluate, tables, ...
        _run(workdir, envs["deep"], "--until", "trained_system")     # the model's ONNX export
        experiment = get(base, "/api/2.0/mlflow/experiments/get-by-name",
                         experiment_name="covidct")["experiment"]
        runs = post(base, "/api/2.0/mlflow/runs/search",
                    {"experiment_ids": [experiment["experiment_id"]],
                     "max_results": 500})["runs"]
        model = get(base, "/api/2.0/mlflow/registered-models/alias",
                    name="covidct-finetune_covid", alias="candidate")["model_version"]
    names = [r["info"]["run_name"] for r in runs]
    assert {"pretrain_egfr", "finetune_covid", "random_init", "explain"} <= set(names), names
    assert sum(n.startswith("evaluate ") for n in names) == 2 * 3   # two models x three sites
    assert all(r["info"]["status"] == "FINISHED" for r in runs), names
    assert not (workdir / "results" / "mlflow.db").exists()          # nothing went beside it
    dry = subprocess.run([SNAKEMAKE, "-n", "--configfile", "tiny.yaml"], cwd=workdir,
                         capture_output=True, text=True, timeout=600)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    results = workdir / "results"
    assert len(pd.read_csv(results / "tables" / "qc_summary.tsv", sep="\t")) == 16
    metrics = json.loads((results / "eval" / "diagsite" / "metrics.json").read_text())
    assert metrics["n"] == 4 and "brier" in metrics
    run = json.loads((results / "models" / "finetune_covid" / "run.json").read_text())
    assert run["run_id"] and run["n_train"] + run["n_val"] == 4
    assert int(model["version"]) == run["version"] and run["tracking_uri"].startswith("http")
