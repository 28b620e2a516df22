"""COVID-19Net against supplementary Table S1 of the paper."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

# Table S1: output (D, H, W, C) of each stage for a 48x240x360 input
TABLE_S1 = {
    "stem": (48, 120, 180, 16),
    "block1_out": (48, 120, 180, 16),
    "block1_pool": (24, 60, 90, 16),
    "block2_out": (24, 60, 90, 24),
    "block2_pool": (12, 30, 45, 24),
    "block3_out": (12, 30, 45, 152),
    "block3_pool": (6, 15, 23, 152),
    "block4_out": (6, 15, 23, 216),
    "block4_pool": (6, 8, 12, 216),
    "head_conv": (6, 8, 12, 64),
    "dl_feature": (64,),
    "probability": (1,),
}


# the same stages in the authors' arrangement (myDense.py), under their layer names
AUTHORS_STAGES = {
    "block0_conv2": (48, 120, 180, 16),
    "block13_trans_conv": (48, 120, 180, 16),
    "max_pooling3d": (24, 60, 90, 16),
    "block23_trans_conv": (24, 60, 90, 24),
    "max_pooling3d_1": (12, 30, 45, 24),
    "block_31_3_concat": (12, 30, 45, 152),
    "max_pooling3d_2": (6, 15, 23, 152),
    "EGFR_block_11_1_concat": (6, 15, 23, 216),
    "max_pooling3d_3": (6, 8, 12, 216),
    "EGFR_block_12_trans_conv": (6, 8, 12, 64),
    "dl_feature": (64,),
    "EGFR_global_pred": (1,),
}


@pytest.fixture(scope="module")
def paper_model():
    from covidct.model.architecture import covid19net

    return covid19net((48, 240, 360))


def test_stage_shapes_match_table_s1(paper_model):
    assert tuple(paper_model.inputs[0].shape[1:]) == (48, 240, 360, 1)
    for name, shape in TABLE_S1.items():
        assert tuple(paper_model.get_layer(name).output.shape[1:]) == shape, name


def test_parameter_count(paper_model):
    # 888,048 conv weights + 2,656 BatchNorm parameters + 65 dense (see covidct.model)
    assert paper_model.count_params() == 890_769
    assert 880_000 <= paper_model.count_params() <= 900_000           # the paper's "about 891k"
    import keras

    convs = [layer for layer in paper_model.layers if isinstance(layer, keras.layers.Conv3D)]
    assert len(convs) == 2 + 2 * (2 + 3 + 4 + 2) + 2 + 1 and not any(c.use_bias for c in convs)
    bns = [layer for layer in paper_model.layers
           if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == len(convs) - 1 and all(b.epsilon == pytest.approx(1.001e-5) for b in bns)
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in paper_model.layers)
    # block 3 grows 24 -> 152 channels by 4 pairs of 32: every pair's output is concatenated
    assert paper_model.get_layer("block3_pair4_concat").output.shape[-1] == 24 + 4 * 32


def test_the_authors_arrangement_at_paper_size():
    import keras

    from covidct.model.architecture import architecture_of, covid19net

    model = covid19net((48, 240, 360), architecture="authors")
    for name, shape in AUTHORS_STAGES.items():
        assert tuple(model.get_layer(name).output.shape[1:]) == shape, name
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    # pre-activation: one more BatchNorm per pair and transition than post-activation
    assert (model.count_params(), trainable) == (894_545, 891_329)   # the paper: "about 891k"
    assert architecture_of(model) == "authors"
    layers = [layer.name for layer in model.layers]
    # pre-activation: BatchNorm and ReLU come before each pair's convolution
    pair = layers.index("block_21_0_1_conv")
    assert layers[pair - 2:pair] == ["block_21_0_0_bn", "block_21_0_0_relu"]
    # no BatchNorm/ReLU after the stem's second convolution; one after the third pooling
    assert layers[layers.index("block0_conv2") + 1] == "block_11_0_0_bn"
    assert layers[layers.index("max_pooling3d_2") + 1] == "block_final_bn"
    assert isinstance(model.get_layer("EGFR_block_12_trans_bn"), keras.layers.BatchNormalization)


def test_forward_pass_small_input():
    from covidct.model.architecture import covid19net, feature_model

    model = covid19net((16, 64, 96))
    x = np.random.default_rng(0).normal(size=(2, 16, 64, 96, 1)).astype(np.float32)
    prob, feature = feature_model(model).predict(x, verbose=0)
    assert prob.shape == (2, 1) and np.all((prob > 0) & (prob < 1))
    assert feature.shape == (2, 64) and np.isfinite(feature).all()
    assert np.allclose(model.predict(x, verbose=0), prob, atol=1e-6)
    # the two volumes are different noise: different features
    assert not np.allclose(feature[0], feature[1])


def test_bad_input_shape():
    from covidct.model.architecture import covid19net

    with pytest.raises(ValueError, match="input_shape"):
        covid19net((240, 360))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_same_code_runs_on_jax():
    code = ("import numpy as np, keras; from covidct.model.architecture import covid19net;"
            "m = covid19net((8, 32, 48)); assert keras.backend.backend() == 'jax';"
            "p = m.predict(np.zeros((1, 8, 32, 48, 1), 'float32'), verbose=0);"
            "print(m.count_params(), float(p[0, 0]))")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    n, p = out.stdout.split()[-2:]
    assert int(n) == 890_769 and 0 < float(p) < 1
