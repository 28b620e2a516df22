"""The MLflow UI/REST server over the SQLite database that `covidct train` writes.

A tiny training run fills the database; `mlflow server` is started on it as a subprocess and
the run, its per-epoch metrics and the registered model are read back through the REST API.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from covidct.cli import main
from covidct.io.stores import write_image

pytestmark = pytest.mark.slow

SHAPE = (8, 16, 24)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str, **query):
    url = f"{base}{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _post(base: str, path: str, body: dict):
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


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
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
         "--default-artifact-root", (tmp_path / "mlartifacts").as_uri(),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
        start_new_session=True)     # its own process group: the uvicorn workers stop with it
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer within 60 s"
            time.sleep(0.5)

        experiment = _get(base, "/api/2.0/mlflow/experiments/get-by-name",
                          experiment_name="served")["experiment"]
        assert experiment["experiment_id"] == record["experiment_id"]
        runs = _post(base, "/api/2.0/mlflow/runs/search",
                     {"experiment_ids": [experiment["experiment_id"]],
                      "filter": "attributes.run_name = 'server_test'"})["runs"]
        assert [r["info"]["run_id"] for r in runs] == [record["run_id"]]
        params = {p["key"]: p["value"] for p in runs[0]["data"]["params"]}
        assert params["input_shape"] == "8x16x24" and params["n_train"] == "6"
        history = _get(base, "/api/2.0/mlflow/metrics/get-history", run_id=record["run_id"],
                       metric_key="loss")["metrics"]
        assert sorted(m["step"] for m in history) == [1, 2]
        assert all(np.isfinite(m["value"]) and m["value"] > 0 for m in history)
        model = _get(base, "/api/2.0/mlflow/registered-models/get",
                     name="covidct-server_test")["registered_model"]
        versions = model["latest_versions"]
        assert [v["run_id"] for v in versions] == [record["run_id"]]
        assert int(versions[0]["version"]) == record["version"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)       # the group of the server started above
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
