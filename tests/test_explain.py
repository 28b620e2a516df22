"""Explanations: saliency (checked against finite differences), in-lung fraction, filter patterns,
feature PCA and the `covidct explain` stage, on a tiny Keras model built here."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from covidct.cli import main
from covidct.explain.features import feature_pca
from covidct.explain.figures import plot_feature_pca
from covidct.explain.filters import default_layers, filter_patterns
from covidct.explain.saliency import (
    resize_matrix,
    saliency,
    saliency_fraction_in_lung,
    saliency_on_ct,
)
from covidct.io.stores import roi_box, write_image
from covidct.io.tracking import client as tracking_client
from covidct.params import ExplainParams
from covidct.preprocess.roi import lung_in_roi

SHAPE = (6, 12, 16)  # (D, H, W) of the tiny ROI


def tiny_model(dtype="float32", seed=0):
    """Input (D, H, W, 1) -> two smooth Conv3D -> GAP -> 64-unit dl_feature -> sigmoid."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inp = keras.Input(SHAPE + (1,), dtype=dtype, name="roi")
    x = layers.Conv3D(6, 3, padding="same", activation="tanh", name="conv_a", dtype=dtype)(inp)
    x = layers.Conv3D(8, 3, padding="same", activation="tanh", name="conv_b", dtype=dtype)(x)
    x = layers.GlobalAveragePooling3D(name="gap", dtype=dtype)(x)
    x = layers.Dense(64, activation="tanh", name="dl_feature", dtype=dtype)(x)
    out = layers.Dense(1, activation="sigmoid", name="probability", dtype=dtype)(x)
    return keras.Model(inp, out, name="tiny")


@pytest.fixture(scope="module")
def model64():
    return tiny_model("float64")


def test_saliency_matches_finite_differences(model64):
    import keras

    rng = np.random.default_rng(1)
    roi = rng.normal(size=SHAPE)
    grad = saliency(model64, roi)
    assert grad.shape == roi.shape
    assert np.abs(grad).max() > 0

    def prob(a):
        return float(keras.ops.convert_to_numpy(model64(a[None, ..., None]))[0, 0])

    eps = 1e-5
    flat = np.abs(grad).ravel()
    voxels = [np.unravel_index(i, SHAPE) for i in
              [int(np.argmax(flat)), int(np.argmin(flat)), *rng.integers(0, flat.size, 4)]]
    for v in voxels:
        up, down = roi.copy(), roi.copy()
        up[v] += eps
        down[v] -= eps
        fd = (prob(up) - prob(down)) / (2 * eps)
        assert grad[v] == pytest.approx(fd, rel=1e-3, abs=1e-9 + 1e-4 * np.abs(grad).max())
    # a (D, H, W, 1) input gives a gradient of that shape, with the same values
    assert np.allclose(saliency(model64, roi[..., None])[..., 0], grad)


def test_saliency_float32_model_agrees_with_finite_differences():
    import keras

    model = tiny_model("float32", seed=2)
    roi = np.random.default_rng(3).normal(size=SHAPE).astype(np.float32)
    grad = saliency(model, roi)
    assert grad.shape == SHAPE and grad.dtype == np.float32
    v = np.unravel_index(int(np.argmax(np.abs(grad))), SHAPE)
    eps = 0.05
    up, down = roi.copy(), roi.copy()
    up[v] += eps
    down[v] -= eps
    p = [float(keras.ops.convert_to_numpy(model(a[None, ..., None]))[0, 0]) for a in (up, down)]
    assert grad[v] == pytest.approx((p[0] - p[1]) / (2 * eps), rel=0.02)


def test_lung_fraction_on_constructed_case():
    # a CT-grid lung mask with a block of lung; the ROI box is a sub-volume, the ROI is 2x larger
    lung = np.zeros((10, 20, 30), np.uint8)
    lung[3:7, 5:15, 10:20] = 1
    bbox = (2, 8, 4, 16, 8, 22)  # half-open: 6 x 12 x 14 voxels
    mask = lung_in_roi(lung, bbox, (12, 24, 28)).astype(bool)
    assert mask.shape == (12, 24, 28)
    # the crop's lung block is z 1..4, y 1..10, x 2..11 -> doubled in the ROI
    expected = np.zeros((12, 24, 28), bool)
    expected[2:10, 2:22, 4:24] = True
    assert np.array_equal(mask, expected)

    sal = np.zeros(mask.shape, np.float32)
    sal[mask] = np.random.default_rng(0).normal(size=int(mask.sum()))
    assert saliency_fraction_in_lung(sal, mask) == 1.0
    sal[0, 0, 0] = np.abs(sal[mask]).sum()  # as much mass outside as inside
    assert saliency_fraction_in_lung(sal, mask) == pytest.approx(0.5)
    assert np.isnan(saliency_fraction_in_lung(np.zeros_like(sal), mask))
    with pytest.raises(ValueError, match="outside"):
        lung_in_roi(lung, (0, 11, 0, 5, 0, 5), (4, 4, 4))


@pytest.mark.parametrize("antialias", [False, True])
def test_resize_matrix_is_the_roi_stages_resize(antialias):
    from covidct.preprocess.resample import resize_cubic

    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 9, 13)).astype(np.float32)
    size = (3, 6, 20)
    out = a
    for axis, n in enumerate(a.shape):
        out = np.moveaxis(np.tensordot(resize_matrix(n, size[axis], antialias),
                                       np.moveaxis(out, axis, 0), axes=1), 0, axis)
    np.testing.assert_allclose(out, resize_cubic(a, size, antialias=antialias), atol=1e-5)


@pytest.mark.parametrize("antialias", [False, True])
def test_saliency_on_ct_matches_finite_differences_through_the_roi_stage(antialias):
    """p = sum(w * ROI) with the roi stage's own suppression, z-score and resize: the CT-voxel
    gradient agrees with central differences in HU, and is exactly 0 where the clip or the
    non-lung clamp binds."""
    from covidct.preprocess.resample import resize_cubic
    from covidct.preprocess.roi import suppress_non_lung, zscore_stats

    rng = np.random.default_rng(0)
    shape, size = (6, 20, 26), (4, 12, 16)
    box = rng.normal(40, 30, shape).astype(np.float32)            # soft tissue
    lung = np.zeros(shape, bool)
    lung[1:5, 4:16, 3:12] = lung[1:5, 4:16, 14:23] = True
    box[lung] = rng.normal(-800, 120, lung.sum())
    box[2, 8, 15] = -500                                            # a lesion in the lung
    box[3, 2, 2] = -600                                             # air outside: not clamped
    w = rng.normal(size=size).astype(np.float32)                    # the network's gradient

    def p_of(b):
        s, _ = suppress_non_lung(b, lung, 95, 4)
        mean, sd = zscore_stats(s)
        roi = resize_cubic((s - mean) / sd, size, antialias=antialias)
        return float((w * roi).sum()), mean, sd

    _, mean, sd = p_of(box)
    attrs = {"percentile": 95, "n_std": 4, "zscore_mean": mean, "zscore_sd": sd,
             "antialias": antialias}
    g = saliency_on_ct(w, box, lung, attrs)
    assert g.shape == shape and (g >= 0).all()
    for idx in [(2, 8, 15), (2, 6, 5), (3, 2, 2)]:
        b1, b2 = box.copy(), box.copy()
        b1[idx] += 2.0
        b2[idx] -= 2.0
        fd = (p_of(b1)[0] - p_of(b2)[0]) / 4.0
        assert g[idx] == pytest.approx(abs(fd), rel=0.02)
    assert g[0, 0, 0] == 0 and g[2, 18, 24] == 0                    # clamped soft tissue
    assert g[lung].sum() / g.sum() > lung.mean()
    with pytest.raises(ValueError, match="differ"):
        saliency_on_ct(w, box, lung[:-1], attrs)


def test_roi_box_is_the_half_open_bbox_of_the_roi_stage():
    assert roi_box({"bbox": [1, 5, 2, 9, 3, 11]}) == (1, 5, 2, 9, 3, 11)
    with pytest.raises(KeyError, match="no bbox"):
        roi_box({"size": [4, 4, 4]})


def test_filter_pattern_increases_activation():
    model = tiny_model("float32", seed=4)
    patterns, start, end = filter_patterns(model, "conv_b", [0, 3, 5], steps=15,
                                                   step_size=0.2, seed=0)
    assert patterns.shape == (3,) + SHAPE
    assert np.all(end > start + 0.05)
    assert np.all(np.abs(patterns) <= 4.0)
    assert default_layers(model) == ["conv_a", "conv_b"]
    with pytest.raises(ValueError, match="has 8 filters"):
        filter_patterns(model, "conv_b", [8], steps=1)


def test_filter_pattern_on_a_smaller_input_keeps_the_weights():
    """--pattern-shape rebuilds the conv path on a new input with the trained weights."""
    import keras

    model = tiny_model("float32", seed=6)
    small = (4, 8, 10)
    patterns, _, end = filter_patterns(model, "conv_a", [1, 4], steps=5,
                                               input_shape=small)
    assert patterns.shape == (2,) + small
    # conv_a is one 3x3x3 'same' convolution: on the pattern zero-padded into the model's input
    # size, its response over the pattern's region equals the rebuilt model's response
    conv = keras.Model(model.inputs[0], model.get_layer("conv_a").output)
    padded = np.zeros((2,) + SHAPE + (1,), np.float32)
    padded[:, :small[0], :small[1], :small[2], 0] = patterns
    act = keras.ops.convert_to_numpy(conv(padded))[:, :small[0], :small[1], :small[2]]
    assert act[0, ..., 1].mean() == pytest.approx(end[0], rel=1e-4)
    assert act[1, ..., 4].mean() == pytest.approx(end[1], rel=1e-4)


def predictions_frame(site, n, seed, n_features=64):
    """Two classes whose DL features differ by a shift along a fixed direction."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    f = rng.normal(size=(n, n_features)) + 3.0 * y[:, None] * (np.arange(n_features) < 16)
    df = pd.DataFrame(f, columns=[f"feature_{i}" for i in range(n_features)])
    df.insert(0, "patient", [f"{site}{i:02d}" for i in range(n)])
    df.insert(1, "site", site)
    df.insert(2, "label", np.where(y == 1, "covid", "viral"))
    df.insert(3, "y", y)
    df.insert(4, "probability", rng.uniform(size=n))
    return df


def test_feature_pca_separates_the_classes(tmp_path):
    df = pd.concat([predictions_frame("A", 40, 0), predictions_frame("B", 30, 1)])
    coords, ratio = feature_pca(df)
    assert list(coords.columns) == ["site", "patient", "y", "pc1", "pc2"] and len(coords) == 70
    assert ratio[0] > ratio[1] > 0 and ratio[0] > 0.12  # the class shift dominates PC1
    gap = abs(coords.loc[coords.y == 1, "pc1"].mean() - coords.loc[coords.y == 0, "pc1"].mean())
    assert gap > 3 * coords["pc1"].std() / 2
    plot_feature_pca(tmp_path / "pca.png", coords, ratio)
    assert (tmp_path / "pca.png").read_bytes()[:4] == b"\x89PNG"


def test_explain_stage_end_to_end(tmp_path, capfd):
    model = tiny_model("float32", seed=5)
    model_path = tmp_path / "model.keras"
    model.save(model_path)
    preds, rois = [], []
    rng = np.random.default_rng(7)
    for site, n in (("A", 6), ("B", 4)):
        df = predictions_frame(site, n, ord(site))
        path = tmp_path / "eval" / site / "predictions.csv"
        path.parent.mkdir(parents=True)
        df.to_csv(path, index=False)
        preds.append(path)
        for patient in df["patient"]:
            folder = tmp_path / "patients" / site / patient
            lung = np.zeros((8, 24, 30), np.uint8)
            lung[2:7, 4:20, 5:25] = 1
            write_image(folder / "lung.zarr", lung, spacing=(2.0, 1.0, 1.0))
            roi = rng.normal(size=SHAPE).astype(np.float16)
            write_image(folder / "roi.zarr", roi, spacing=(1.0, 1.0, 1.0),
                        attrs={"bbox": [1, 7, 2, 22, 3, 27], "size": list(SHAPE)})
            rois.append(folder / "roi.zarr")
    out = tmp_path / "explain"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["explain", "--model", str(model_path), "--predictions", *map(str, preds),
               "--rois", *map(str, rois), "--out-dir", str(out), "--n-per-site", "2",
               "--layers", "conv_a", "--steps", "5", "--fraction-for", "sample",
               "--tracking-uri", uri])
    assert rc == 0
    # tanh has no ONNX translation: the saliency is Keras's, and the log says why
    assert "saliency by the Keras backend's automatic differentiation (no ONNX translation: " \
        "layer conv_a: activation 'tanh'" in capfd.readouterr().err
    pngs = sorted(p.name for p in (out / "saliency").glob("*.png"))
    assert len(pngs) == 4 and sum(p.startswith("A_A") for p in pngs) == 2
    covid = {f"{s}{i:02d}" for s, n in (("A", 6), ("B", 4)) for i in range(1, n, 2)}
    assert {p.split("_", 1)[1][:-4] for p in pngs} <= covid  # only COVID-19 patients
    frac = pd.read_csv(out / "saliency_in_lung.csv")
    assert len(frac) == 4 and frac["fraction"].between(0, 1).all()
    # the mask in the ROI: crop z 1:7 of a lung at z 2:7, etc. -> a known share of the ROI
    expected = lung_in_roi(np.pad(np.ones((5, 16, 20)), ((2, 1), (4, 4), (5, 5))),
                                        (1, 7, 2, 22, 3, 27), SHAPE).mean()
    assert np.allclose(frac["lung_volume_fraction"], expected)
    by_site = pd.read_csv(out / "saliency_in_lung_by_site.csv")
    assert list(by_site["site"]) == ["A", "B"] and list(by_site["n"]) == [2, 2]
    assert by_site["mean_fraction"].iloc[0] == pytest.approx(
        frac.loc[frac.site == "A", "fraction"].mean())
    filters = pd.read_csv(out / "filters.csv")
    assert len(filters) == 6 and (filters.activation_pattern > filters.activation_noise).all()
    for name in ("filters_conv_a.png", "feature_pca.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


    client = tracking_client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("covidct").experiment_id])
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"feature_pca.png", "filters_conv_a.png", "saliency"} <= arts
    assert run.data.metrics["saliency_in_lung_A"] == pytest.approx(
        by_site["mean_fraction"].iloc[0])


JAX_CHECK = """
import sys
import numpy as np, keras
from covidct.explain.saliency import saliency
model = keras.models.load_model(sys.argv[1], compile=False)
roi = np.load(sys.argv[2])
assert keras.backend.backend() == "jax"
np.save(sys.argv[3], saliency(model, roi))
"""


@pytest.mark.slow
def test_saliency_jax_branch_agrees_with_tensorflow(tmp_path):
    """The jax.grad branch on the same saved model (runs where JAX is installed, e.g. GPU nodes)."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("jax") is None:
        pytest.skip("JAX is not installed here: the jax.grad branch is checked where it is")
    model = tiny_model("float32", seed=2)
    model.save(tmp_path / "m.keras")
    roi = np.random.default_rng(3).normal(size=SHAPE).astype(np.float32)
    np.save(tmp_path / "roi.npy", roi)
    env = dict(os.environ, KERAS_BACKEND="jax")
    subprocess.run([sys.executable, "-c", JAX_CHECK, str(tmp_path / "m.keras"),
                    str(tmp_path / "roi.npy"), str(tmp_path / "g.npy")], env=env, check=True,
                   timeout=120)
    tf_grad = saliency(model, roi)
    assert np.allclose(np.load(tmp_path / "g.npy"), tf_grad, rtol=1e-4,
                       atol=1e-4 * np.abs(tf_grad).max())


@pytest.mark.slow
def test_explain_runs_the_saliency_on_the_models_onnx_translation(tmp_path, capfd):
    """COVID-19Net's saliency runs in onnxruntime, translated in memory with its input
    gradient: the in-lung fractions are those of Keras's gradient."""
    from test_authors import randomise

    from covidct.explain.stage import PatientStores, explain_patient
    from covidct.model.architecture import covid19net

    size = (8, 48, 64)
    model = covid19net(size)
    randomise(model, 2)
    model_path = tmp_path / "model.keras"
    model.save(model_path)
    df = predictions_frame("A", 6, 3)
    df.to_csv(tmp_path / "predictions.csv", index=False)
    rng = np.random.default_rng(8)
    rois = []
    for patient in df["patient"]:
        folder = tmp_path / "patients" / "A" / patient
        lung = np.zeros((10, 60, 80), np.uint8)
        lung[2:9, 10:50, rng.integers(5, 20):70] = 1
        write_image(folder / "lung.zarr", lung, spacing=(2.0, 1.0, 1.0))
        write_image(folder / "roi.zarr", rng.normal(size=size).astype(np.float16),
                    spacing=(1.0, 1.0, 1.0), attrs={"bbox": [1, 9, 6, 54, 8, 72],
                                                    "size": list(size)})
        rois.append(folder / "roi.zarr")
    out = tmp_path / "explain"
    rc = main(["explain", "--model", str(model_path), "--predictions",
               str(tmp_path / "predictions.csv"), "--rois", *map(str, rois), "--out-dir",
               str(out), "--n-per-site", "1", "--layers", "none", "--tracking-uri", "none"])
    assert rc == 0
    assert "saliency by onnxruntime on the model's ONNX translation" in capfd.readouterr().err
    got = pd.read_csv(out / "saliency_in_lung.csv")
    assert len(got) == 3 and got["fraction"].between(0.05, 0.95).all()
    assert np.ptp(got["fraction"]) > 0.01                  # the patients' masks differ

    def keras_gradient(roi):
        return saliency(model, roi)

    for _, row in got.iterrows():
        folder = tmp_path / "patients" / "A" / row["patient"]
        want = explain_patient(keras_gradient, "A", row["patient"],
                               PatientStores(folder / "roi.zarr", folder / "lung.zarr",
                                             folder / "ct.zarr"), None, ExplainParams())
        assert row["fraction"] == pytest.approx(want["fraction"], abs=0.005)
