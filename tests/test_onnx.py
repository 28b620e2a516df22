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
    """The CLI in a fresh process takes model.onnx, --saliency included: the probability,
    feature and saliency of the Keras model on the same scan, and none of the slow imports (a
    backend, pandas, lifelines)."""
    from covidct.inference.scan import predict_scan
    from covidct.model.onnx_graph import export_onnx

    path = saved_model(tmp_path)
    export_onnx(path)
    scan = real_data / "covid_ct_md" / "P001_ct_bin4x4x1.nii.gz"
    keras_run = predict_scan(scan, path, parallel=False, runtime="keras",
                             saliency_path=tmp_path / "keras.png")
    probe = ("import json, sys\nfrom covidct.cli import main\nrc = main(sys.argv[1:])\n"
             "print(json.dumps(sorted(m for m in ('tensorflow', 'keras', 'jax', 'pandas', "
             "'lifelines', 'mlflow') "
             "if m in sys.modules)), file=sys.stderr)\nsys.exit(rc)\n")
    proc = subprocess.run(
        [sys.executable, "-c", probe, "predict", str(scan), "--model", str(path), "--threads",
         "1", "--saliency", str(tmp_path / "onnx.png")], capture_output=True, text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == []      # none imported
    assert out["runtime"] == "onnx" and keras_run["runtime"] == "keras"
    assert out["timing_s"]["model_import"] == 0.0
    assert out["roi"] == keras_run["roi"]
    assert out["probability"] == pytest.approx(keras_run["probability"], abs=1e-5)
    np.testing.assert_allclose(out["dl_feature"], keras_run["dl_feature"], atol=1e-5, rtol=1e-5)
    for where in ("roi", "ct"):
        assert out["saliency_in_lung"][where] == pytest.approx(
            keras_run["saliency_in_lung"][where], abs=0.01)
    assert 0 < out["saliency_in_lung"]["roi"] < 1
    assert (tmp_path / "onnx.png").stat().st_size > 10_000


def test_onnx_runtime_without_an_export_is_refused(tmp_path, real_data):
    from covidct.inference.scan import predict_scan

    path = saved_model(tmp_path)
    scan = real_data / "covid_ct_md" / "P001_ct_bin4x4x1.nii.gz"
    for saliency in (None, tmp_path / "s.png"):
        with pytest.raises(CovidctError, match="no valid model.onnx"):
            predict_scan(scan, path, parallel=False, runtime="onnx", saliency_path=saliency)


# --------------------------------------------------------------------------- the saliency graph

def one_layer_model(layer, size=(7, 45, 61)):
    """``layer`` between the input and a GAP + sigmoid head, all weights random."""
    import keras

    inputs = keras.Input((*size, 1), name="roi")
    x = keras.layers.GlobalAveragePooling3D(name="dl_feature")(layer(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid",
                                                   name="probability")(x))
    randomise(model, 3)
    return model


def onnx_saliency(model, roi):
    import onnxruntime as ort

    from covidct.model.onnx_gradient import SALIENCY, with_saliency
    from covidct.model.onnx_graph import graph_of

    session = ort.InferenceSession(with_saliency(graph_of(model)).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    prob, _, grad = session.run(None, {"roi": roi[None, ..., None]})
    assert session.get_outputs()[2].name == SALIENCY
    return float(prob.ravel()[0]), grad.reshape(roi.shape)


LAYERS = {
    "conv": lambda L: L.Conv3D(4, 3, padding="same"),
    "strided conv": lambda L: L.Conv3D(4, 3, strides=(1, 2, 2), padding="same"),
    "even valid conv": lambda L: L.Conv3D(3, 2, strides=2, padding="valid"),
    "batch norm + relu": lambda L: lambda x: L.ReLU()(L.BatchNormalization()(x)),
    "max pool": lambda L: lambda x: L.MaxPooling3D(2, 2, padding="same")(L.Conv3D(3, 1)(x)),
    "valid max pool": lambda L: lambda x: L.MaxPooling3D((1, 2, 2), (1, 2, 2))(L.Conv3D(3, 1)(x)),
    "average pool": lambda L: lambda x: L.AveragePooling3D(2, 2, padding="same")(x),
    "concat": lambda L: lambda x: L.Concatenate()([x, L.Conv3D(3, 3, padding="same")(x)]),
}


@pytest.mark.parametrize("kind", LAYERS)
def test_the_saliency_graph_is_tensorflows_gradient_layer_by_layer(kind):
    """Each operator's gradient rule against tf.GradientTape, on odd sizes where 'same' pads
    unevenly and 'valid' leaves voxels out."""
    import keras

    from covidct.explain.saliency import saliency

    model = one_layer_model(LAYERS[kind](keras.layers))
    roi = np.random.default_rng(4).normal(size=(7, 45, 61)).astype(np.float32)
    prob, grad = onnx_saliency(model, roi)
    want = saliency(model, roi)
    assert prob == pytest.approx(float(model(roi[None, ..., None]).numpy()[0, 0]), abs=1e-6)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(grad, want, atol=1e-5 * np.abs(want).max())


def test_a_max_pool_tie_passes_the_gradient_to_every_maximum():
    """TensorFlow's convention, which the saliency graph keeps: a window of equal values
    passes its gradient to all of them."""
    import keras

    from covidct.explain.saliency import saliency

    model = one_layer_model(lambda x: keras.layers.MaxPooling3D(2, 2)(x), size=(2, 4, 4))
    roi = np.ones((2, 4, 4), np.float32)
    _, grad = onnx_saliency(model, roi)
    np.testing.assert_allclose(grad, saliency(model, roi), atol=1e-7)
    assert np.all(grad == grad.flat[0]) and grad.flat[0] != 0


JAX_SALIENCY = """
import sys, numpy as np, keras
from covidct.explain.saliency import saliency
model = keras.saving.load_model(sys.argv[1])
np.save(sys.argv[3], saliency(model, np.load(sys.argv[2])))
"""


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["covidct", "authors"])
def test_the_saliency_graph_is_the_networks_gradient(tmp_path, architecture):
    """The whole network against JAX's automatic differentiation (a fresh process on the JAX
    backend) to 1e-5 of the largest value, and against TensorFlow's in its correlation:
    TensorFlow's max-pooling gradient departs by a few per cent at some voxels behind a ReLU
    (a float64 reference computed by hand agrees with JAX and the graph there)."""
    from covidct.explain.saliency import saliency
    from covidct.model.onnx_graph import OnnxFeatureModel, export_onnx, saliency_onnx_path
    from covidct.model.saved import load_feature_model

    path = saved_model(tmp_path, architecture)
    roi = np.random.default_rng(5).normal(size=SIZE).astype(np.float32)
    np.save(tmp_path / "roi.npy", roi)
    proc = subprocess.run([sys.executable, "-c", JAX_SALIENCY, str(path), str(tmp_path / "roi.npy"),
                           str(tmp_path / "jax.npy")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "KERAS_BACKEND": "jax"})
    assert proc.returncode == 0, proc.stderr
    want = np.load(tmp_path / "jax.npy")
    exported = export_onnx(path)
    model = OnnxFeatureModel(saliency_onnx_path(path))
    assert model.saliency and not OnnxFeatureModel(exported).saliency
    assert model.exports(path)
    prob, feature, grad = model.with_saliency(roi)
    assert grad.shape == SIZE and feature.shape == (1, 64)
    np.testing.assert_allclose(grad, want, atol=1e-5 * np.abs(want).max())
    assert prob[0, 0] == pytest.approx(float(model(roi[None, ..., None])[0][0, 0]), abs=1e-7)
    _, keras_model = load_feature_model(path)
    tf_grad = saliency(keras_model, roi)
    assert np.corrcoef(grad.ravel(), tf_grad.ravel())[0, 1] > 0.999
    assert np.corrcoef(grad.ravel(), np.flip(tf_grad).ravel())[0, 1] < 0.5


def test_an_operator_without_a_gradient_rule_is_refused_by_name():
    from onnx import TensorProto, helper

    from covidct.model.onnx_gradient import with_saliency

    graph = helper.make_graph(
        [helper.make_node("Tanh", ["roi"], ["t"], name="odd_tanh"),
         helper.make_node("ReduceMean", ["t"], ["probability"], name="mean", keepdims=1,
                          axes=[1, 2, 3, 4])],
        "odd", [helper.make_tensor_value_info("roi", TensorProto.FLOAT, ["N", 2, 2, 2, 1])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1, 1, 1, 1])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(CovidctError, match=r"node mean \(ReduceMean\) has no gradient"):
        with_saliency(proto)
