"""COVID-19Net's ONNX export: the same outputs as the Keras model, and `covidct predict` running it
without importing the Keras backend.

The networks are built with random weights everywhere (BatchNorm statistics included), so that a
mistranslated layer, a wrong weight layout or a wrong padding shows in the outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_authors import randomise

from covidct.errors import CovidctError

SIZE = (8, 48, 64)


def saved_model(tmp_path, architecture: str = "covidct", seed: int = 0):
    from covidct.model.architecture import covid19net

    model = covid19net(SIZE, architecture=architecture)
    randomise(model, seed)
    path = tmp_path / "model.keras"
    model.save(path)
    return path


@pytest.mark.parametrize("architecture", ["covidct", "authors"])
def test_the_export_gives_the_keras_models_outputs(tmp_path, architecture):
    from covidct.model.onnx_graph import OnnxFeatureModel, export_onnx, onnx_path
    from covidct.model.saved import load_feature_model

    path = saved_model(tmp_path, architecture)
    exported = OnnxFeatureModel(export_onnx(path))
    assert onnx_path(path) == tmp_path / "model.onnx" and exported.input_shape == SIZE
    assert exported.exports(path)
    feature_model, _ = load_feature_model(path)
    roi = np.random.default_rng(1).normal(size=(2, *SIZE, 1)).astype(np.float32)
    want_p, want_f = (np.asarray(a) for a in feature_model([roi], training=False))
    got_p, got_f = exported(roi)
    assert got_p.shape == (2, 1) and got_f.shape == (2, 64)
    np.testing.assert_allclose(got_p, want_p, atol=1e-5)
    np.testing.assert_allclose(got_f, want_f, atol=1e-5, rtol=1e-5)
    assert np.ptp(want_f) > 0.1 and abs(want_p[0, 0] - want_p[1, 0]) > 1e-4  # not constant


def test_an_export_of_other_weights_is_not_used(tmp_path, caplog):
    from covidct.model.onnx_graph import export_onnx, onnx_beside

    path = saved_model(tmp_path, seed=0)
    export_onnx(path)
    assert onnx_beside(path) is not None
    saved_model(tmp_path, seed=1)                 # model.keras retrained, model.onnx left over
    assert onnx_beside(path) is None
    assert "content hash differs" in caplog.text


def test_a_layer_without_translation_is_refused_by_name(tmp_path):
    import keras

    from covidct.model.onnx_graph import export_onnx

    inputs = keras.Input((4, 8, 8, 1))
    x = keras.layers.Conv3D(2, 3, padding="same", activation="tanh", name="odd_conv")(inputs)
    x = keras.layers.GlobalAveragePooling3D(name="dl_feature")(x)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    model.save(tmp_path / "model.keras")
    with pytest.raises(CovidctError, match="odd_conv: activation 'tanh'"):
        export_onnx(tmp_path / "model.keras")


@pytest.mark.slow
def test_predict_runs_the_export_without_the_keras_backend(tmp_path, real_data):
    """The CLI in a fresh process takes model.onnx: the probability and feature of the Keras
    model on the same scan, and none of the slow imports (a backend, pandas, lifelines)."""
    from covidct.inference.scan import predict_scan
    from covidct.model.onnx_graph import export_onnx

    path = saved_model(tmp_path)
    export_onnx(path)
    scan = real_data / "covid_ct_md" / "P001_ct_bin4x4x1.nii.gz"
    keras_run = predict_scan(scan, path, parallel=False, runtime="keras")
    probe = ("import json, sys\nfrom covidct.cli import main\nrc = main(sys.argv[1:])\n"
             "print(json.dumps(sorted(m for m in ('tensorflow', 'keras', 'jax', 'pandas', "
             "'lifelines', 'mlflow') "
             "if m in sys.modules)), file=sys.stderr)\nsys.exit(rc)\n")
    proc = subprocess.run(
        [sys.executable, "-c", probe, "predict", str(scan), "--model", str(path), "--threads",
         "1"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == []      # none imported
    assert out["runtime"] == "onnx" and keras_run["runtime"] == "keras"
    assert out["timing_s"]["model_import"] == 0.0
    assert out["roi"] == keras_run["roi"]
    assert out["probability"] == pytest.approx(keras_run["probability"], abs=1e-5)
    np.testing.assert_allclose(out["dl_feature"], keras_run["dl_feature"], atol=1e-5, rtol=1e-5)


def test_onnx_runtime_without_an_export_or_with_saliency_is_refused(tmp_path, real_data):
    from covidct.inference.scan import predict_scan

    path = saved_model(tmp_path)
    scan = real_data / "covid_ct_md" / "P001_ct_bin4x4x1.nii.gz"
    with pytest.raises(CovidctError, match="no valid model.onnx"):
        predict_scan(scan, path, parallel=False, runtime="onnx")
    with pytest.raises(CovidctError, match="--saliency needs the network's gradient"):
        predict_scan(scan, path, parallel=False, runtime="onnx",
                     saliency_path=tmp_path / "s.png")
