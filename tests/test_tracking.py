"""MLflow tracking: the workflow's parent run and its children, the effective config hash, and
stage processes that start together on a database that does not exist yet."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from covidct.io import tracking
from covidct.params import TrackingParams


def test_store_uri_waits_for_sqlite_locks_and_leaves_servers_alone():
    assert tracking.store_uri("sqlite:///results/mlflow.db") == \
        f"sqlite:///results/mlflow.db?timeout={tracking.BUSY_TIMEOUT_S}"
    assert tracking.store_uri("sqlite:///x.db?timeout=5") == "sqlite:///x.db?timeout=5"
    assert tracking.store_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert str(tracking.sqlite_path("sqlite:////abs/m.db?timeout=5")) == "/abs/m.db"


def test_config_hash_is_the_effective_configs(monkeypatch):
    a = {"sites": {"x": {"role": "train"}}, "roi": {"size": [48, 240, 360]}}
    b = {"roi": {"size": [48, 240, 360]}, "sites": {"x": {"role": "train"}}}
    assert tracking.config_hash(a) == tracking.config_hash(b)           # key order is no change
    assert tracking.config_hash(a) != tracking.config_hash({**a, "roi": {"size": [8, 32, 48]}})
    monkeypatch.setenv(tracking.CONFIG_HASH_ENV, "abc123")
    assert tracking.config_hash() == "abc123"
    monkeypatch.delenv(tracking.CONFIG_HASH_ENV)
    assert tracking.config_hash() == "none"


def test_runs_of_a_workflow_invocation_are_children_of_its_run(tmp_path, monkeypatch):
    import mlflow

    params = TrackingParams(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", experiment="study")
    config = {"sites": {"a": {"role": "train"}}, "evaluation": {"threshold": 0.5}}
    parent = tracking.start_workflow_run(params, config, run_name="workflow test")
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent)
    monkeypatch.setenv(tracking.CONFIG_HASH_ENV, tracking.config_hash(config))
    with tracking.mlflow_run(params, "evaluate a", tags={"covidct.rule": "evaluate"}) as run:
        child = run.info.run_id
    tracking.end_workflow_run(params, parent, ok=True)

    client = tracking.client(params.tracking_uri)
    kid = client.get_run(child)
    assert kid.data.tags["mlflow.parentRunId"] == parent
    assert kid.data.tags["covidct.config_hash"] == tracking.config_hash(config)
    top = client.get_run(parent)
    assert top.info.status == "FINISHED" and top.data.tags["covidct.rule"] == "workflow"
    assert "mlflow.parentRunId" not in top.data.tags
    logged = mlflow.artifacts.load_text(f"{top.info.artifact_uri}/config.yaml")
    assert "threshold: 0.5" in logged
    experiment = client.get_experiment_by_name("study")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
def test_stage_processes_started_together_on_a_fresh_database_all_succeed(tmp_path):
    """Twelve `covidct evaluate` processes open a database that does not exist yet."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 10)
    pd.DataFrame({"patient": [f"P{i:02d}" for i in range(20)], "site": "s", "label": np.where(
        y == 1, "covid", "bacterial"), "y": y, "probability": np.clip(
        0.3 * y + rng.uniform(0, 0.7, 20), 0, 1)}).to_csv(tmp_path / "pred.csv", index=False)
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "covidct", "evaluate", str(tmp_path / "pred.csv"),
         str(tmp_path / f"out{i}"), "--site", f"s{i}", "--tracking-uri", uri],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(12)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    failed = [(i, out[-1500:]) for i, (p, out) in enumerate(zip(procs, outputs))
              if p.returncode != 0]
    assert not failed, failed
    client = tracking.client(uri)
    runs = client.search_runs([client.get_experiment_by_name("covidct").experiment_id])
    assert sorted(r.data.tags["covidct.site"] for r in runs) == sorted(f"s{i}" for i in range(12))
    assert all(json.loads((tmp_path / f"out{i}" / "metrics.json").read_text())["n"] == 20
               for i in range(12))
