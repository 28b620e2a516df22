"""The authors' lung segmenter (`covidct import-weights lungSegmentation.hdf5`) and their
processing of the CT around it.

Their network, segmentation_models 1.0.1's ``FPN('densenet121', classes=1,
activation='sigmoid')`` (Keras 2.3.1, TensorFlow 2.0), is written out here a second time from
sm's ``models/fpn.py`` and ``_common_blocks.py`` and keras-applications 1.0.8's
``densenet.py``: the skips taken by sm's layer indices (311, 139, 51, 4), the bilinear
upsampling by the TensorFlow op Keras 2.3.1 calls (``resize_bilinear``, no half-pixel centres).
Its random weights are saved as Keras 2 lays out a whole model (layer names with Keras 2's
``conv1/conv``), imported with the command line at 64x64, and the lung FPN must give the same
outputs. Their real file is a Git LFS object not in this checkout.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from scipy.ndimage import zoom
from test_authors import randomise

from covidct.cli import main
from covidct.preprocess import lung_fpn

SIZE = 64
KERAS2_NAMES = {"conv1_conv": "conv1/conv", "conv1_bn": "conv1/bn", "conv1_relu": "conv1/relu"}


# --------------------------------------------------------------------------- their network

def their_fpn(size: int):
    """sm.FPN('densenet121', classes=1, activation='sigmoid', input_shape=(size, size, 3))."""
    import keras
    import tensorflow as tf
    from keras import layers

    class Keras2BilinearUpSampling(layers.Layer):
        """Keras 2.3.1's UpSampling2D(interpolation='bilinear') on TensorFlow 2.0."""

        def call(self, x):
            h, w = x.shape[1], x.shape[2]
            return tf.compat.v1.image.resize_bilinear(x, (2 * h, 2 * w))

    # keras-applications 1.0.8 DenseNet121(include_top=False)
    def conv_block(x, name):
        x1 = layers.BatchNormalization(axis=3, epsilon=1.001e-5, name=name + "_0_bn")(x)
        x1 = layers.Activation("relu", name=name + "_0_relu")(x1)
        x1 = layers.Conv2D(128, 1, use_bias=False, name=name + "_1_conv")(x1)
        x1 = layers.BatchNormalization(axis=3, epsilon=1.001e-5, name=name + "_1_bn")(x1)
        x1 = layers.Activation("relu", name=name + "_1_relu")(x1)
        x1 = layers.Conv2D(32, 3, padding="same", use_bias=False, name=name + "_2_conv")(x1)
        return layers.Concatenate(axis=3, name=name + "_concat")([x, x1])

    def transition_block(x, name):
        x = layers.BatchNormalization(axis=3, epsilon=1.001e-5, name=name + "_bn")(x)
        x = layers.Activation("relu", name=name + "_relu")(x)
        x = layers.Conv2D(x.shape[3] // 2, 1, use_bias=False, name=name + "_conv")(x)
        return layers.AveragePooling2D(2, strides=2, name=name + "_pool")(x)

    img = keras.Input((size, size, 3), name="input_1")
    x = layers.ZeroPadding2D(((3, 3), (3, 3)), name="zero_padding2d_1")(img)
    x = layers.Conv2D(64, 7, strides=2, use_bias=False, name="conv1_conv")(x)
    x = layers.BatchNormalization(axis=3, epsilon=1.001e-5, name="conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(((1, 1), (1, 1)), name="zero_padding2d_2")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    for stage, blocks in zip((2, 3, 4, 5), (6, 12, 24, 16)):
        for i in range(blocks):
            x = conv_block(x, f"conv{stage}_block{i + 1}")
        if stage < 5:
            x = transition_block(x, f"pool{stage}")
    x = layers.BatchNormalization(axis=3, epsilon=1.001e-5, name="bn")(x)
    x = layers.Activation("relu", name="relu")(x)
    backbone = keras.Model(img, x, name="densenet121")

    # segmentation_models 1.0.1 FPN: pyramid 256, segmentation 128, aggregation concat
    def conv3x3_bn_relu(x, name):
        x = layers.Conv2D(128, 3, padding="same", use_bias=False, name=name + "_conv")(x)
        x = layers.BatchNormalization(axis=3, name=name + "_bn")(x)
        return layers.Activation("relu", name=name + "_relu")(x)

    def fpn_block(x, skip, stage):
        if x.shape[3] != 256:
            x = layers.Conv2D(256, 1, name=f"fpn_stage_p{stage}_pre_conv")(x)
        skip = layers.Conv2D(256, 1, name=f"fpn_stage_p{stage}_conv")(skip)
        x = layers.UpSampling2D((2, 2), name=f"fpn_stage_p{stage}_upsampling")(x)
        return layers.Add(name=f"fpn_stage_p{stage}_add")([x, skip])

    skip_layers = [backbone.get_layer(index=i) for i in (311, 139, 51, 4)]   # sm's indices
    skips = [layer.output for layer in skip_layers]
    p5 = fpn_block(backbone.output, skips[0], 5)
    p4 = fpn_block(p5, skips[1], 4)
    p3 = fpn_block(p4, skips[2], 3)
    p2 = fpn_block(p3, skips[3], 2)
    s5 = conv3x3_bn_relu(conv3x3_bn_relu(p5, "segm_stage5a"), "segm_stage5b")
    s4 = conv3x3_bn_relu(conv3x3_bn_relu(p4, "segm_stage4a"), "segm_stage4b")
    s3 = conv3x3_bn_relu(conv3x3_bn_relu(p3, "segm_stage3a"), "segm_stage3b")
    s2 = conv3x3_bn_relu(conv3x3_bn_relu(p2, "segm_stage2a"), "segm_stage2b")
    s5 = layers.UpSampling2D((8, 8), interpolation="nearest", name="upsampling_stage5")(s5)
    s4 = layers.UpSampling2D((4, 4), interpolation="nearest", name="upsampling_stage4")(s4)
    s3 = layers.UpSampling2D((2, 2), interpolation="nearest", name="upsampling_stage3")(s3)
    x = layers.Concatenate(axis=3, name="aggregation_concat")([s2, s3, s4, s5])
    x = conv3x3_bn_relu(x, "final_stage")
    x = Keras2BilinearUpSampling(name="final_upsampling")(x)
    x = layers.Conv2D(1, (3, 3), padding="same", use_bias=True, name="head_conv")(x)
    x = layers.Activation("sigmoid", name="sigmoid")(x)
    return keras.Model(img, x, name="model_1"), [layer.name for layer in skip_layers]


def save_keras2_h5(model, path, *, rename=None, reshape=None) -> None:
    """``model`` as Keras 2.3.1's ``model.save('x.hdf5')`` lays it out (layer names as Keras 2
    spells them, every layer listed in topological order, an optimizer group the import
    ignores). ``rename`` = (layer, new name); ``reshape`` = (layer, array) replaces its first
    weight."""
    def k2(name):
        name = KERAS2_NAMES.get(name, name)
        return rename[1] if rename and rename[0] == name else name

    config = {"class_name": "Model", "config": {"name": model.name, "layers": [
        {"class_name": "InputLayer", "name": "input_1",
         "config": {"batch_input_shape": [None, *model.inputs[0].shape[1:]],
                    "dtype": "float32", "name": "input_1"}}]}}
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.3.1"
        f.attrs["backend"] = b"tensorflow"
        f.attrs["model_config"] = json.dumps(config).encode()
        group = f.create_group("model_weights")
        group.attrs["layer_names"] = np.array([k2(la.name).encode() for la in model.layers])
        group.attrs["backend"] = b"tensorflow"
        group.attrs["keras_version"] = b"2.3.1"
        for layer in model.layers:
            g = group.create_group(k2(layer.name))
            names = [f"{k2(layer.name)}/{w.name}:0" for w in layer.weights]
            g.attrs["weight_names"] = np.array([n.encode() for n in names])
            for i, (name, value) in enumerate(zip(names, layer.get_weights())):
                if reshape and reshape[0] == layer.name and i == 0:
                    value = reshape[1]
                g.create_dataset(name, data=value)
        f.create_group("optimizer_weights").create_dataset("Adam/iterations:0", data=np.int64(9))


@pytest.fixture(scope="module")
def their_file(tmp_path_factory):
    """Their network with random weights, its output on a random input, and its HDF5 file."""
    tmp = tmp_path_factory.mktemp("authors_fpn")
    net, skips = their_fpn(SIZE)
    assert skips == ["pool4_conv", "pool3_conv", "pool2_conv", "conv1_relu"]
    randomise(net, seed=11)
    x = np.random.default_rng(2).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    prob = np.asarray(net(x, training=False))
    path = tmp / "lungSegmentation.hdf5"
    save_keras2_h5(net, path)
    return net, path, x, prob


# --------------------------------------------------------------------------- the import

@pytest.mark.slow    # DenseNet121 at 64x64 built twice: ~25 s
def test_imported_segmenter_gives_their_networks_outputs(tmp_path, their_file):
    net, path, x, prob = their_file
    out = tmp_path / "lung_seg"
    assert main(["import-weights", str(path), str(out)]) == 0
    model = lung_fpn.load_model(out / "model.keras")
    assert lung_fpn.model_size(model) == SIZE                   # from the file's model_config
    assert lung_fpn.model_preprocessing(model) == "authors" and lung_fpn.model_fov(model) is None
    assert model.count_params() == net.count_params()
    assert [la.name for la in model.layers if la.weights] == \
        [la.name for la in net.layers if la.weights]             # flat, in their order
    p = np.asarray(model(x, training=False))
    assert p.shape == (2, SIZE, SIZE, 1)
    assert 0.01 < prob.min() and prob.max() < 0.99 and prob.std() > 1e-2    # not saturated
    np.testing.assert_allclose(p, prob, atol=1e-5)

    run = json.loads((out / "run.json").read_text())
    assert run["architecture"] == "sm_fpn_densenet121" and run["preprocessing"] == "authors"
    assert run["input_shape"] == [SIZE, SIZE, 3] and run["segmentation_models"] == "1.0.1"
    assert run["imported_from"]["file"] == path.name and run["n_params"] == net.count_params()


def test_legacy_bilinear_upsampling_is_keras2s():
    """final_upsampling: TensorFlow's resize_bilinear without half-pixel centres (Keras 2.3.1),
    which Keras 3's bilinear UpSampling2D is not."""
    import keras
    import tensorflow as tf

    from covidct.model.authors_fpn import keras2_bilinear_x2

    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    inp = keras.Input((5, 7, 3))
    mine = np.asarray(keras.Model(inp, keras2_bilinear_x2(inp, "up"))(x))
    theirs = tf.compat.v1.image.resize_bilinear(x, (10, 14)).numpy()
    np.testing.assert_allclose(mine, theirs, atol=1e-6)
    keras3 = np.asarray(keras.layers.UpSampling2D(2, interpolation="bilinear")(x))
    assert np.abs(keras3 - theirs).max() > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("change, words", [
    ({"reshape": ("segm_stage4b_conv", np.zeros((3, 3, 128, 64), np.float32))},
     "of the lung FPN, 'segm_stage4b_conv', kernel is 3x3x128x64 in the file, 3x3x128x128 in "
     "the lung FPN"),
    ({"rename": ("fpn_stage_p3_conv", "fpn_stage_p3_lateral")},
     "of the lung FPN, 'fpn_stage_p3_conv', is 'fpn_stage_p3_lateral' in the file"),
], ids=["shape", "name"])
def test_a_file_with_a_wrong_layer_is_refused_naming_it(tmp_path, their_file, capsys, change,
                                                         words):
    net, *_ = their_file
    bad = tmp_path / "bad.hdf5"
    save_keras2_h5(net, bad, **change)
    assert main(["import-weights", str(bad), str(tmp_path / "seg")]) == 2
    err = capsys.readouterr().err
    assert "not sm 1.0.1's DenseNet121-FPN" in err and words in err and str(bad) in err
    index = [la.name for la in net.layers if la.weights].index(change[next(iter(change))][0])
    assert f"weighted layer {index + 1} of the lung FPN" in err
    assert not (tmp_path / "seg" / "model.keras").exists()


# --------------------------------------------------------------------------- their processing

def their_inputs(ct: np.ndarray, size: int) -> np.ndarray:
    """lungSegNet4seg19Conv.py's SegLung.pred up to model.predict, for square slices."""
    image = ct.astype(np.float64)
    image[image < -1024] = -1024
    image = (image - image.mean(axis=(1, 2), keepdims=True)) / (
        image.std(axis=(1, 2), keepdims=True) + 1e-6)
    batch = []
    for sidx in range(1, image.shape[0] - 1):
        one = np.transpose(image[sidx - 1:sidx + 2], axes=(1, 2, 0))
        batch.append(zoom(one, zoom=(size / one.shape[0], size / image.shape[1], 1), order=3))
    return np.asarray(batch)


def small_ct(n=5, side=24, seed=3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ct = rng.normal(-300, 400, size=(n, side, side)).round().astype(np.int16)
    ct[:, :3] = -3024                                # outside the scanner's circle
    ct[2] += 200                                     # slices differ in mean
    return ct


def test_their_preprocessing_zscores_whole_slices_and_stacks_neighbours():
    ct = small_ct()
    norm = lung_fpn.authors_normalize_slices(ct, 24)              # no resize: the z-score alone
    floored = np.maximum(ct.astype(np.float64), -1024)
    for z in range(ct.shape[0]):
        want = (floored[z] - floored[z].mean()) / (floored[z].std() + 1e-6)
        np.testing.assert_allclose(norm[z], want, atol=1e-5)
    assert np.ptp(norm[:, :3], axis=(1, 2)).max() < 1e-6           # -3024 floored to -1024

    big = lung_fpn.authors_normalize_slices(ct, 64)               # cubic zoom of every slice
    x = lung_fpn.stack_channels(big, np.arange(1, ct.shape[0] - 1))
    assert x.shape == (3, 64, 64, 3)
    np.testing.assert_array_equal(x[0, ..., 0], big[0])          # channels: i-1, i, i+1
    np.testing.assert_array_equal(x[2, ..., 2], big[4])
    np.testing.assert_allclose(x, their_inputs(ct, 64), atol=1e-5)


def test_their_processing_leaves_end_slices_empty_and_does_no_postprocessing(tmp_path):
    """Probability: the network's at 16x16 zoomed linearly onto the CT's 24x24 grid, 0 on the
    first and last slice; the mask is it at 0.5, specks kept, holes not filled."""
    import keras

    inp = keras.Input((16, 16, 3))
    # the middle channel's sign: lung where the slice is above its mean
    out = keras.layers.Conv2D(1, 1, activation="sigmoid", name="head")(inp)
    model = keras.Model(inp, out, name=lung_fpn.AUTHORS_MODEL_NAME)
    model.get_layer("head").set_weights([np.array([0, 50, 0], np.float32).reshape(1, 1, 3, 1),
                                         np.zeros(1, np.float32)])
    ct = small_ct(n=6)
    prob = lung_fpn.predict_probability(ct, model, batch_size=3)
    assert prob.shape == ct.shape
    assert not prob[0].any() and not prob[-1].any()
    net = np.asarray(model(lung_fpn.stack_channels(lung_fpn.authors_normalize_slices(ct, 16),
                                                   np.arange(1, 5))))[..., 0]
    np.testing.assert_allclose(prob[1:-1], zoom(net, (1, 24 / 16, 24 / 16), order=1),
                               atol=1e-6)

    path = tmp_path / "authors.keras"
    model.save(path)
    mask = lung_fpn.predict_mask(ct, (2.5, 1.0, 1.0), path)
    np.testing.assert_array_equal(mask, (prob >= 0.5).astype(np.uint8))
    assert not np.array_equal(lung_fpn.postprocess_mask(mask), mask)  # theirs has none
    from covidct.preprocess.segment import lung_mask

    seg, attrs = lung_mask(ct, (2.5, 1.0, 1.0), method="fpn", model=path)
    np.testing.assert_array_equal(seg, mask)
    assert attrs["preprocessing"] == "authors" and attrs["model"] == str(path)


def test_covidct_models_keep_covidcts_processing():
    class Named:
        def __init__(self, name):
            self.name = name

    for name in ("lung_fpn", "lung_fpn_fov360mm"):
        assert lung_fpn.model_preprocessing(Named(name)) == "covidct"
    assert lung_fpn.model_preprocessing(Named("lung_fpn_authors")) == "authors"
