"""The compiled JAX training loop: fit's weights, several devices, the batches in fit's order.

The trainings run in fresh processes with KERAS_BACKEND=jax (the tests' own process runs
TensorFlow), on the CPU; XLA_FLAGS gives that CPU two devices for the data-parallel test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_train import make_cohort

from covidct.model.dataset import RoiDataset
from covidct.model.jax_loop import blocks, read_ahead

pytest.importorskip("jax")

HERE = Path(__file__).parent


def jax_env(**extra) -> dict:
    return dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2", **extra)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("jax_cohort")
    rois, _ = make_cohort(root, 10, seed=1)
    return root, rois


def test_blocks_group_equal_shapes_up_to_the_steps_per_call():
    def batch(n):
        return (np.zeros((n, 2)), np.zeros((n, 1)))

    sizes = [4, 4, 4, 4, 4, 2]
    grouped = [[len(b[0]) for b in block] for block in blocks(iter(map(batch, sizes)), 2)]
    assert grouped == [[4, 4], [4, 4], [4], [2]]
    assert [[len(b[0]) for b in block] for block in blocks(iter(map(batch, sizes)), 8)] == \
        [[4, 4, 4, 4, 4], [2]]


def test_read_ahead_keeps_the_order_and_the_batches(cohort):
    _, rois = cohort
    labels = np.arange(len(rois)) % 2
    data = RoiDataset(rois, labels, batch_size=3, shuffle=True, seed=5, workers=2)
    ahead = list(read_ahead(data, ahead=3))
    assert len(ahead) == len(data) == 4
    for index, (x, y) in enumerate(ahead):
        x0, y0 = data[index]
        assert np.array_equal(x, x0) and np.array_equal(y, y0)
    # threads reading a batch's volumes give the batch one thread reads
    serial = RoiDataset(rois, labels, batch_size=3, shuffle=True, seed=5, workers=1)
    assert all(np.array_equal(a[0], serial[i][0]) for i, a in enumerate(ahead))


@pytest.mark.slow
def test_the_jax_loop_reaches_the_weights_of_model_fit(cohort, tmp_path):
    """From one seed, with class weights, SGD momentum, a learning rate halved after every
    epoch and a short last batch: the same weights and epoch logs after 9 steps."""
    _, rois = cohort
    listing = tmp_path / "rois.json"
    listing.write_text(json.dumps([str(r) for r in rois]), encoding="utf-8")
    out = subprocess.run([sys.executable, str(HERE / "jax_fit_check.py"), str(listing), "3", "2"],
                         env=jax_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    fit, jax = pd.DataFrame(result["fit"]), pd.DataFrame(result["jax"])
    assert fit["lr"].tolist() == pytest.approx([1e-3, 5e-4, 2.5e-4])     # the schedule acted
    assert jax["lr"].tolist() == pytest.approx(fit["lr"].tolist(), rel=1e-6)
    assert fit["loss"].iloc[-1] < 0.5 * fit["loss"].iloc[0]               # it learnt
    assert np.allclose(jax[["loss", "auc"]], fit[["loss", "auc"]], rtol=1e-4, atol=1e-6)
    assert result["max_weight_difference"] <= 1e-4 * max(1.0, result["max_weight"])


def train(root: Path, rois, out: Path, devices: int) -> tuple[pd.DataFrame, str]:
    args = ["train", "--name", f"dp{devices}", "--task", "covid",
            "--sheet", str(root / "sheet.tsv"), "--rois", *map(str, rois), "--out", str(out),
            "--epochs", "3", "--batch-size", "4", "--lr", "0.001", "--val-fraction", "0.3",
            "--bn-momentum", "0.8", "--seed", "3", "--workers", "2", "--no-augment",
            "--lr-patience", "0", "--steps-per-execution", "2", "--loop", "jax",
            "--devices", str(devices), "--no-register",
            "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--experiment", "dp"]
    env = jax_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run([sys.executable, "-m", "covidct", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return pd.read_csv(out / "history.csv"), done.stderr


@pytest.mark.slow
def test_data_parallel_training_on_two_devices_follows_one_device(cohort, tmp_path):
    """keras.distribution.DataParallel over two (host) devices at the same global batch: the
    same loss curve, validation and learning rates as one device."""
    root, rois = cohort
    one, log_one = train(root, rois, tmp_path / "one", devices=1)
    two, log_two = train(root, rois, tmp_path / "two", devices=2)
    assert "data parallel" not in log_one
    assert "and 1 more (data parallel), training loop jax (2 steps a call)" in log_two
    assert one["loss"].iloc[-1] < one["loss"].iloc[0]
    # the gradients are summed in another order across devices, and BatchNorm over batches
    # of 3-4 amplifies the rounding: about 1e-3 in the training loss and 1e-2 in the
    # validation loss after 6 steps
    assert np.allclose(two["loss"], one["loss"], rtol=2e-3)
    assert np.allclose(two["val_loss"], one["val_loss"], rtol=2e-2)
    assert two["val_auc"].tolist() == one["val_auc"].tolist()
    assert two["lr"].tolist() == one["lr"].tolist()
    a = json.loads((tmp_path / "two" / "run.json").read_text(encoding="utf-8"))
    assert a["selected_epoch"] == json.loads(
        (tmp_path / "one" / "run.json").read_text(encoding="utf-8"))["selected_epoch"]
