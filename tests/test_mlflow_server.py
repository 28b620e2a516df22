"""The MLflow UI/REST server over the SQLite database that `covidct train` writes.

A tiny training run fills the database; `mlflow server` is started on it as a subprocess and
the run, its per-epoch metrics and the registered model are read back through the REST API.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from servers import get, mlflow_server, post

from covidct.cli import main
from covidct.io.stores import write_image

pytestmark = pytest.mark.slow

SHAPE = (8, 16, 24)


def _tiny_training(root):
    rng = np.random.default_rng(0)
    rows, rois = [], []
    for i in range(8):
        v = rng.normal(size=SHAPE).astype(np.float32) + 2.0 * (i % 2)
        rois.append(root / "patients" / "site1" / f"P{i}" / "roi.zarr")
        write_image(rois[-1], v.astype(np.float16), spacing=(1, 1, 1))
        rows.append(f"P{i}\tsite1\t/data/P{i}\tcovid\t{'covid' if i % 2 else 'bacterial'}")
    (root / "sheet.tsv").write_text("patient\tsite\timage\ttask\tlabel\n" + "\n".join(rows) + "\n")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    out = root / "model"
    assert main(["train", "--name", "server_test", "--task", "covid", "--sheet",
                 str(root / "sheet.tsv"), "--rois", *map(str, rois), "--out", str(out),
                 "--epochs", "2", "--batch-size", "2", "--val-fraction", "0.25", "--workers", "1",
                 "--tracking-uri", uri, "--experiment", "served"]) == 0
    return uri, json.loads((out / "run.json").read_text())


def test_server_serves_run_metrics_and_registered_model(tmp_path):
    uri, record = _tiny_training(tmp_path)
    with mlflow_server(uri, tmp_path / "mlartifacts", tmp_path) as base:
        experiment = get(base, "/api/2.0/mlflow/experiments/get-by-name",
                         experiment_name="served")["experiment"]
        assert experiment["experiment_id"] == record["experiment_id"]
        tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        runs = post(base, "/api/2.0/mlflow/runs/search",
                    {"experiment_ids": [experiment["experiment_id"]],
                     "filter": "attributes.run_name = 'server_test'"})["runs"]
        assert [r["info"]["run_id"] for r in runs] == [record["run_id"]]
        params = {p["key"]: p["value"] for p in runs[0]["data"]["params"]}
        assert params["input_shape"] == "8x16x24" and params["n_train"] == "6"
        history = get(base, "/api/2.0/mlflow/metrics/get-history", run_id=record["run_id"],
                      metric_key="loss")["metrics"]
        assert sorted(m["step"] for m in history) == [1, 2]
        assert all(np.isfinite(m["value"]) and m["value"] > 0 for m in history)
        model = get(base, "/api/2.0/mlflow/registered-models/get",
                    name="covidct-server_test")["registered_model"]
        versions = model["latest_versions"]
        assert [v["run_id"] for v in versions] == [record["run_id"]]
        assert int(versions[0]["version"]) == record["version"]
        # the new version is the registry's candidate, and the training data are its inputs
        alias = get(base, "/api/2.0/mlflow/registered-models/alias", name="covidct-server_test",
                    alias="candidate")["model_version"]
        assert int(alias["version"]) == record["version"]
        inputs = runs[0]["inputs"]["dataset_inputs"]
        logged = {(i["dataset"]["name"], t["value"]) for i in inputs for t in i["tags"]
                  if t["key"] == "mlflow.data.context"}
        assert logged == {("site1 sheet", "training"), ("site1 sheet", "validation")}
        assert len({i["dataset"]["digest"] for i in inputs}) == 2
