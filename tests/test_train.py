"""`covidct train` end to end on tiny ROI stores, plus the RoiDataset it reads them with.

The cohort: 16x32x48 float16 roi.zarr stores of unit noise; COVID-19 patients (y = 1) carry a
bright sphere (radius 6 voxels, +4) at a random place. A few epochs learn that.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidct.cli import main
from covidct.errors import CovidctError
from covidct.io.stores import write_image
from covidct.io.tracking import client as tracking_client
from covidct.params import RoiParams

SHAPE = (16, 32, 48)


def as_json(params) -> dict:
    """Parameters as a store's attributes hold them (JSON: lists for tuples)."""
    return json.loads(json.dumps(asdict(params)))


def make_cohort(root: Path, n: int, seed: int, task: str = "covid", shape=SHAPE):
    """n ROI stores under root/patients/{site}/{patient}/roi.zarr and root/sheet.tsv."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.ogrid[:shape[0], :shape[1], :shape[2]]
    rows, paths, labels = [], [], []
    for i in range(n):
        y = i % 2
        patient, site = f"S{seed}P{i:03d}", ("wuhan" if i < n // 2 else "henan")
        v = rng.normal(0.0, 1.0, shape).astype(np.float32)
        if y:
            c = [rng.integers(5, s - 5) for s in shape]
            v[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < 36] += 4.0
        path = root / "patients" / site / patient / "roi.zarr"
        write_image(path, v.astype(np.float16), spacing=(1.0, 1.0, 1.0),   # as the roi stage
                    attrs={"params": asdict(RoiParams(size=shape, min_pixels=30))})
        label = ("covid" if y else "viral") if task == "covid" else \
            ("egfr_mutant" if y else "egfr_wildtype")
        rows.append(f"{patient}\t{site}\t/data/{patient}\t{task}\t{label}")
        paths.append(path)
        labels.append(y)
    (root / "sheet.tsv").write_text("patient\tsite\timage\ttask\tlabel\n" + "\n".join(rows) + "\n")
    return paths, np.array(labels)


def train_args(root: Path, rois, out: Path, *extra: str, name: str = "pretrain_test"):
    return ["train", "--name", name, "--task", "covid", "--sheet", str(root / "sheet.tsv"),
            "--rois", *map(str, rois), "--out", str(out), "--epochs", "3", "--batch-size", "2",
            "--val-fraction", "0.3", "--bn-momentum", "0.8", "--seed", "3", "--workers", "2",
            "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--experiment", "covidct-test",
            "--no-augment", "--config", str(root / "sheet.tsv"), *extra]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    rois, labels = make_cohort(root, 20, seed=1)
    return root, rois, labels


@pytest.fixture(scope="module")
def trained(cohort):
    root, rois, _ = cohort
    out = root / "models" / "first"
    assert main(train_args(root, rois, out)) == 0
    return out, json.loads((out / "run.json").read_text())


def test_outputs_and_run_record(cohort, trained):
    root, rois, labels = cohort
    out, record = trained
    assert sorted(p.name for p in out.iterdir()) == ["history.csv", "model.keras", "run.json",
                                                     "val_predictions.csv"]
    history = pd.read_csv(out / "history.csv")
    assert list(history.columns) == ["epoch", "loss", "auc", "val_loss", "val_auc", "lr", "seconds"]
    assert history["epoch"].tolist() == [1, 2, 3]
    assert history["lr"].iloc[0] == pytest.approx(0.005)
    assert (history["lr"] <= 0.005 + 1e-9).all() and history["loss"].notna().all()
    val = pd.read_csv(out / "val_predictions.csv")
    assert list(val.columns) == ["patient", "y", "probability"]
    # 30% of each class of 10: 3 + 3 patients, labels as in the sheet
    assert len(val) == 6 and val["y"].sum() == 3
    truth = {p.parent.name: int(y) for p, y in zip(rois, labels)}
    assert all(truth[p] == y for p, y in zip(val["patient"], val["y"]))
    assert val["probability"].between(0, 1).all()
    assert set(record) >= {"run_id", "experiment_id", "tracking_uri", "model_uri",
                           "registered_model", "version", "val_auc", "n_train", "n_val",
                           "input_shape", "backend"}
    assert (record["n_train"], record["n_val"]) == (14, 6)
    assert record["input_shape"] == list(SHAPE)
    assert record["backend"] == "tensorflow"
    assert record["registered_model"] == "covidct-pretrain_test" and record["version"] >= 1
    assert record["model_uri"].startswith("models:/")
    # how the training ROIs were made, for `covidct predict` to make its ROI the same way
    assert record["preprocessing"]["roi"] == as_json(RoiParams(size=SHAPE, min_pixels=30))
    assert record["training_data"] == {"sites": ["henan", "wuhan"], "n": 20, "synthetic": False,
                                       "labels": {"covid": 10, "viral": 10}}


def test_preprocessing_is_what_every_store_agrees_on(tmp_path):
    """run.json records the stores' shared parameters; where they disagree, nothing."""
    from covidct.io.provenance import agreed_preprocessing

    paths = []
    for i, roi in enumerate([RoiParams(min_pixels=30), RoiParams(min_pixels=30),
                             RoiParams(min_pixels=30, antialias=False)]):
        paths.append(tmp_path / f"P{i}" / "roi.zarr")
        write_image(paths[-1], np.zeros((4, 8, 8), np.float16), spacing=(1.0, 1.0, 1.0),
                    attrs={"params": asdict(roi)})
        lung = {"method": "threshold", "params": {"close_mm": 3.0}}
        write_image(paths[-1].with_name("lung.zarr"), np.zeros((4, 8, 8), np.uint8),
                    spacing=(1.0, 1.0, 1.0), attrs=lung)
    agreed = agreed_preprocessing(paths[:2])
    assert agreed["roi"] == as_json(RoiParams(min_pixels=30))
    assert agreed["segmentation"] == {"method": "threshold", "params": {"close_mm": 3.0}}
    assert agreed["ingest"] is None                          # no ct.zarr beside the ROIs
    assert agreed_preprocessing(paths)["roi"] is None       # one store made without antialias


def test_learns_the_easy_signal(cohort, trained, tmp_path):
    import keras

    from covidct.model.classifier import binary_auc
    from covidct.model.dataset import RoiDataset

    out, record = trained
    assert record["val_auc"] >= 0.85
    # and on fresh patients never seen in training or selection
    fresh, y = make_cohort(tmp_path, 12, seed=99)
    model = keras.saving.load_model(out / "model.keras")
    p = model.predict(RoiDataset(fresh, batch_size=6), verbose=0).ravel()
    assert binary_auc(y, p) >= 0.85


def test_mlflow_run_params_metrics_and_registry(cohort, trained):

    root, _, _ = cohort
    _, record = trained
    client = tracking_client(record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.info.run_name == "pretrain_test" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["lr"] == "0.005" and params["batch_size"] == "2"
    assert params["class_weight_negative"] == "5.0" and params["lr_factor"] == "0.8"
    assert params["input_shape"] == "16x32x48" and params["n_train"] == "14"
    assert params["sites"] == "henan,wuhan"
    tags = run.data.tags
    assert tags["covidct.rule"] == "pretrain_test" and tags["covidct.sites"] == "henan,wuhan"
    assert tags["mlflow.source.git.commit"] and len(tags["covidct.config_hash"]) == 12
    val_auc = client.get_metric_history(record["run_id"], "val_auc")
    assert sorted(m.step for m in val_auc) == [1, 2, 3]
    loss = pd.read_csv(trained[0] / "history.csv")["loss"].tolist()
    logged = [m.value for m in sorted(client.get_metric_history(record["run_id"], "loss"),
                                      key=lambda m: m.step)]
    assert np.allclose(logged, loss)
    version = client.get_model_version("covidct-pretrain_test", str(record["version"]))
    assert version.run_id == record["run_id"]
    artifacts = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"history.csv", "val_predictions.csv"} <= artifacts


@pytest.mark.slow
def test_same_seed_same_weights(cohort, trained):
    import keras

    root, rois, _ = cohort
    out = root / "models" / "again"
    assert main(train_args(root, rois, out, "--no-register")) == 0
    a = keras.saving.load_model(trained[0] / "model.keras").get_weights()
    b = keras.saving.load_model(out / "model.keras").get_weights()
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    first = json.loads((trained[0] / "run.json").read_text())
    second = json.loads((out / "run.json").read_text())
    assert second["registered_model"] is None and second["run_id"] != first["run_id"]


@pytest.mark.slow
def test_steps_per_execution_trains_the_same_model(cohort, trained):
    """Several steps per compiled call (the GPU setting) is a speed option, not another model:
    the weights match the one-step run, and the setting is recorded in MLflow."""
    import keras

    root, rois, _ = cohort
    out = root / "models" / "spe"
    assert main(train_args(root, rois, out, "--no-register", "--steps-per-execution", "3")) == 0
    a = keras.saving.load_model(trained[0] / "model.keras").get_weights()
    b = keras.saving.load_model(out / "model.keras").get_weights()
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    run = tracking_client(f"sqlite:///{root / 'mlflow.db'}").get_run(
        json.loads((out / "run.json").read_text())["run_id"])
    assert run.data.params["steps_per_execution"] == "3"


@pytest.mark.slow
def test_finetune_from_pretrained(cohort, trained):
    import keras

    from covidct.errors import CovidctError
    from covidct.model.classifier import initial_model, weights_digest

    root, rois, _ = cohort
    pre_path = trained[0] / "model.keras"
    pre = keras.saving.load_model(pre_path).get_weights()
    start = initial_model(SHAPE, pre_path).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(pre, start))
    with pytest.raises(CovidctError, match="differs"):
        initial_model((16, 32, 32), pre_path)

    out = root / "models" / "finetune"
    args = train_args(root, rois, out, "--init", str(pre_path), "--epochs", "1",
                      "--val-fraction", "0", name="finetune_test")
    assert main(args) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["init_digest"] == weights_digest(pre)         # started from the pretrained
    tuned = keras.saving.load_model(out / "model.keras").get_weights()
    assert any(not np.array_equal(x, y) for x, y in zip(pre, tuned))   # and trained on
    assert record["registered_model"] == "covidct-finetune_test"
    assert (record["n_train"], record["n_val"], record["val_auc"]) == (20, 0, None)


def test_unknown_patient_is_a_clear_error(cohort, tmp_path, capsys):
    root, rois, _ = cohort
    stray = tmp_path / "patients" / "wuhan" / "NOT_IN_SHEET" / "roi.zarr"
    write_image(stray, np.zeros(SHAPE, np.float16), spacing=(1, 1, 1))
    out = tmp_path / "out"
    assert main(train_args(root, [*rois[:4], stray], out)) == 2
    err = capsys.readouterr().err
    assert "patient NOT_IN_SHEET" in err and str(stray) in err and "sample sheet" in err
    assert not (out / "run.json").exists()


# ---- RoiDataset -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """7 stores whose voxels all equal the patient's index (so a batch shows its order)."""
    root = tmp_path_factory.mktemp("indexed")
    paths = []
    for i in range(7):
        v = np.full((4, 16, 20), i, np.float32)
        v[:, 4:12, 6:14] += 10.0                 # a box, so augmentation has edges to move
        paths.append(root / f"P{i}" / "roi.zarr")
        write_image(paths[-1], v.astype(np.float16), spacing=(1, 1, 1))
    return paths


def _ids(x):
    return x[:, 0, 0, 0, 0].astype(int).tolist()


def test_dataset_batches_and_labels(indexed):
    from covidct.model.dataset import RoiDataset

    labels = np.array([0, 1, 1, 0, 1, 0, 0])
    ds = RoiDataset(indexed, labels, batch_size=3)
    assert len(ds) == 3
    x, y = ds[0]
    assert x.dtype == np.float32 and x.shape == (3, 4, 16, 20, 1) and y.shape == (3, 1)
    assert _ids(x) == [0, 1, 2] and y.ravel().tolist() == [0, 1, 1]
    x, y = ds[2]
    assert x.shape[0] == 1 and _ids(x) == [6]
    with pytest.raises(IndexError):
        ds[3]
    (x,) = RoiDataset(indexed, batch_size=7)[0]
    assert _ids(x) == list(range(7))


def test_dataset_shuffles_per_epoch_with_seed(indexed):
    from covidct.model.dataset import RoiDataset

    labels = np.arange(7) % 2
    ds = RoiDataset(indexed, labels, batch_size=7, shuffle=True, seed=5)
    x0, y0 = ds[0]
    assert sorted(_ids(x0)) == list(range(7)) and _ids(x0) != list(range(7))
    assert y0.ravel().tolist() == [i % 2 for i in _ids(x0)]          # labels follow the order
    ds.on_epoch_end()
    x1, y1 = ds[0]
    assert sorted(_ids(x1)) == list(range(7)) and _ids(x1) != _ids(x0)
    assert y1.ravel().tolist() == [i % 2 for i in _ids(x1)]
    again = RoiDataset(indexed, labels, batch_size=7, shuffle=True, seed=5)
    assert _ids(again[0][0]) == _ids(x0)
    other = RoiDataset(indexed, labels, batch_size=7, shuffle=True, seed=6)
    assert _ids(other[0][0]) != _ids(x0)


def test_dataset_class_weights(indexed):
    from covidct.model.dataset import RoiDataset

    labels = np.array([0, 1, 1, 0, 1, 0, 0])
    x, y, w = RoiDataset(indexed, labels, batch_size=7, class_weight={0: 5.0, 1: 1.0})[0]
    assert w.dtype == np.float32 and w.tolist() == [5.0 if v == 0 else 1.0 for v in labels]


def test_dataset_augmentation(indexed):
    from covidct.model.dataset import Augment, RoiDataset

    plain = RoiDataset(indexed, batch_size=7)[0][0]
    ds = RoiDataset(indexed, batch_size=7, augment=Augment(rotation_deg=20, scale=0.1, shift=0.1),
                    seed=1)
    a = ds[0][0]
    assert a.shape == plain.shape and a.dtype == np.float32
    assert not np.allclose(a, plain)
    # one transform per volume: every slice of a volume moved the same way
    assert all(np.array_equal(a[k, 0], a[k, z]) for k in range(7) for z in range(4))
    # values stay within the volume's range (linear interpolation, nearest-edge fill)
    assert a.min() >= plain.min() - 1e-4 and a.max() <= plain.max() + 1e-4
    assert np.array_equal(ds[0][0], a)                        # reproducible within an epoch
    ds.on_epoch_end()
    assert not np.array_equal(ds[0][0], a)                    # a new draw next epoch
    still = RoiDataset(indexed, batch_size=7, augment=Augment(0.0, 0.0, 0.0))[0][0]
    assert np.allclose(still, plain, atol=1e-4)               # zero ranges: identity


def test_dataset_cache(indexed):
    from covidct.model.dataset import RoiDataset

    ds = RoiDataset(indexed, batch_size=2, cache=2)
    first = ds.read(0)
    assert ds.read(0) is first
    ds.read(1), ds.read(2)                                     # evicts 0 (least recent)
    assert ds.read(0) is not first and np.array_equal(ds.read(0), first)
    assert RoiDataset(indexed, batch_size=2).read(0) is not RoiDataset(indexed).read(0)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """3 stores with a lung label: the box [:, 4:12, 6:14] is lung (value 10 + i), the rest is
    non-lung tissue (value i)."""
    root = tmp_path_factory.mktemp("labelled")
    paths = []
    for i in range(3):
        v = np.full((4, 16, 20), i, np.float32)
        lung = np.zeros(v.shape, np.uint8)
        lung[:, 4:12, 6:14] = 1
        v[lung == 1] += 10.0
        paths.append(root / f"L{i}" / "roi.zarr")
        write_image(paths[-1], v.astype(np.float16), spacing=(1, 1, 1), labels={"lung": lung})
    return paths


def test_dataset_non_lung_randomisation(labelled, indexed):
    from covidct.model.dataset import Augment, RoiDataset, randomise_non_lung

    zero = dict(rotation_deg=0.0, scale=0.0, shift=0.0)
    plain = RoiDataset(labelled, batch_size=3)[0][0][..., 0]
    ds = RoiDataset(labelled, batch_size=3, augment=Augment(**zero, non_lung=1.0), seed=3)
    a = ds[0][0][..., 0]
    inside = np.zeros(a.shape[1:], bool)
    inside[:, 4:12, 6:14] = True
    assert np.allclose(a[:, inside], plain[:, inside], atol=1e-4)        # the lung untouched
    assert not np.allclose(a[:, ~inside], plain[:, ~inside], atol=0.5)   # the rest replaced
    for k in range(3):   # one random level per volume, inside the volume's range
        level = np.median(a[k][~inside])
        assert plain[k].min() - 2.0 <= level <= plain[k].max() + 2.0
    assert np.array_equal(ds[0][0], RoiDataset(labelled, batch_size=3, seed=3,
                                               augment=Augment(**zero, non_lung=1.0))[0][0])
    off = RoiDataset(labelled, batch_size=3, augment=Augment(**zero, non_lung=0.0))[0][0]
    assert np.allclose(off[..., 0], plain, atol=1e-4)
    # a store without the label: the error names the patient and the store
    with pytest.raises(CovidctError, match=r"patient P0.*no lung label"):
        RoiDataset(indexed[:1], augment=Augment(**zero, non_lung=1.0))[0]
    with pytest.raises(ValueError, match="differ in shape"):
        randomise_non_lung(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), np.random.default_rng(0))


def test_dataset_blur_and_noise():
    from covidct.model.dataset import Augment, blur_and_noise

    v = np.zeros((3, 21, 21), np.float32)
    v[:, 10, 10] = 1.0
    rng = np.random.default_rng(0)
    blurred = blur_and_noise(v, rng, blur=2.0, noise=0.0)
    assert np.allclose(blurred.sum(axis=(1, 2)), 1.0, atol=1e-4)          # mass kept in-plane
    assert blurred[1, 10, 10] < 1.0 and blurred[1, 10, 11] > 0            # ... and spread
    assert np.array_equal(blurred[0], blurred[2])                         # z not mixed
    noisy = blur_and_noise(np.zeros((8, 64, 64), np.float32), np.random.default_rng(1), 0.0, 0.4)
    assert 0.0 < noisy.std() <= 0.4 and abs(noisy.mean()) < 0.01
    assert Augment().noise == Augment().blur == Augment().non_lung == 0.0  # off by default


@pytest.mark.slow
def test_init_from_a_registered_model_alias(cohort, trained):
    """training.init may name a registered model: models:/NAME@ALIAS is fetched and loaded."""
    import keras

    from covidct.model.trainer import weights_digest

    root, rois, _ = cohort
    _, record = trained
    client = tracking_client(record["tracking_uri"])
    client.set_registered_model_alias(record["registered_model"], "champion",
                                      str(record["version"]))
    out = root / "models" / "from_alias"
    uri = f"models:/{record['registered_model']}@champion"
    assert main(train_args(root, rois, out, "--init", uri, "--epochs", "0", "--no-register",
                           name="alias_test")) == 0
    started = json.loads((out / "run.json").read_text())
    pre = keras.saving.load_model(trained[0] / "model.keras").get_weights()
    assert started["init"] == uri and started["init_digest"] == weights_digest(pre)


@pytest.mark.slow
def test_a_killed_training_resumes_after_its_last_finished_epoch(cohort, tmp_path):
    """`covidct train` killed (SIGKILL) after its second epoch and started again continues from
    there: the same weights as an uninterrupted run, one history, one MLflow run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import keras

    root, rois, _ = cohort
    args = train_args(root, rois, tmp_path / "killed", "--no-register", "--lr-patience", "1",
                      name="resume_test")
    args[args.index("--epochs") + 1] = "5"
    state = tmp_path / "killed" / "resume" / "state.json"
    # every run in a fresh process with the same environment: the numerics of a process that
    # earlier tests configured (threads, dtype policy) are not those of a fresh one
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1")

    def covidct(arguments):
        return subprocess.run([sys.executable, "-m", "covidct", *arguments], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=600)

    proc = subprocess.Popen([sys.executable, "-m", "covidct", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["epochs_done"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    saved = json.loads(state.read_text())
    done = saved["epochs_done"]
    assert 2 <= done < 5 and not (tmp_path / "killed" / "run.json").exists()

    restarted = covidct(args)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "resuming after epoch" in restarted.stderr
    reference = tmp_path / "whole"
    whole = list(args)
    whole[whole.index("--out") + 1] = str(reference)
    uninterrupted = covidct(whole)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    a = keras.saving.load_model(tmp_path / "killed" / "model.keras").get_weights()
    b = keras.saving.load_model(reference / "model.keras").get_weights()
    assert all(np.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(a, b))
    resumed, ref = (pd.read_csv(f / "history.csv") for f in (tmp_path / "killed", reference))
    assert resumed["epoch"].tolist() == [1, 2, 3, 4, 5]
    assert np.allclose(resumed[["loss", "val_auc", "lr"]], ref[["loss", "val_auc", "lr"]],
                       rtol=1e-4, atol=1e-6)
    # the finished epochs were taken over, not trained again: their rows are the killed run's
    assert np.allclose(resumed["seconds"][:done], [row["seconds"] for row in saved["rows"]],
                       rtol=1e-12, atol=0)
    assert not (tmp_path / "killed" / "resume").exists()
    record = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert record["run_id"] == saved["run_id"]
    history = tracking_client(record["tracking_uri"]).get_metric_history(record["run_id"],
                                                                        "val_auc")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]      # one run, every epoch once
