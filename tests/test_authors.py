"""The authors' COVID-19Net and their published weights (`covidct import-weights`).

The authors' network is written out here a second time, from their myDense.py (GitHub
wangshuocas/COVID-19, ERSCOVIDTest/COVID-19/myDense.py), with plain Keras layers and their layer
names; its random weights are saved in the HDF5 layout Keras 2 writes for a whole model (their
files are such), imported with the command line, and the trained system's model must give the
same outputs. Their real files are Git LFS objects not in this checkout.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from covidct.cli import main
from covidct.params import AUTHORS_ROI

SIZE = (8, 32, 48)


# --------------------------------------------------------------------------- their network

def their_network(input_shape):
    """myDenseNetv2 as myDense.py builds it (Keras's default initialisers, BN eps 1.001e-5)."""
    import keras
    from keras.layers import (
        Activation,
        BatchNormalization,
        Concatenate,
        Conv3D,
        Dense,
        GlobalAveragePooling3D,
        Input,
        MaxPooling3D,
    )

    def bn(x, name):
        return BatchNormalization(axis=-1, epsilon=1.001e-5, name=name)(x)

    def conv(x, filters, k, name, strides=(1, 1, 1)):
        return Conv3D(filters, k, strides=strides, use_bias=False, padding="same", name=name)(x)

    def conv_block(x, filters, name):
        y = Activation("relu", name=name + "_0_relu")(bn(x, name + "_0_bn"))
        y = conv(y, filters, (3, 3, 3), name + "_1_conv")
        y = Activation("relu", name=name + "_1_relu")(bn(y, name + "_1_bn"))
        y = conv(y, filters, (3, 3, 3), name + "_2_conv")
        return Concatenate(axis=-1, name=name + "_concat")([x, y])

    def transit_block(x, filters, name):
        x = Activation("relu", name=name + "_trans_relu")(bn(x, name + "_trans_bn"))
        return conv(x, filters, (1, 1, 1), name + "_trans_conv")

    def dense_block(x, blocks, name):
        for i, filters in enumerate(blocks):
            x = conv_block(x, filters, name + "_" + str(i))
        return x

    pools = iter(["max_pooling3d", "max_pooling3d_1", "max_pooling3d_2", "max_pooling3d_3"])
    inp = Input(shape=tuple(input_shape) + (1,), name="input_1")
    x = conv(inp, 16, (3, 3, 3), "block0_conv1", strides=(1, 2, 2))
    x = Activation("relu", name="block0_relu1")(bn(x, "block0_bn1"))
    x = conv(x, 16, (3, 3, 3), "block0_conv2")
    x = dense_block(x, [16, 16], "block_11")
    x = transit_block(x, 16, "block13")
    x = MaxPooling3D((2, 2, 2), strides=(2, 2, 2), padding="same", name=next(pools))(x)
    x = dense_block(x, [24, 24, 24], "block_21")
    x = transit_block(x, 24, "block23")
    x = MaxPooling3D((2, 2, 2), strides=(2, 2, 2), padding="same", name=next(pools))(x)
    x = dense_block(x, [32, 32, 32, 32], "block_31")
    x = MaxPooling3D((2, 2, 2), strides=(2, 2, 2), padding="same", name=next(pools))(x)
    x = Activation("relu", name="block_final_relu")(bn(x, "block_final_bn"))
    x = dense_block(x, [32, 32], "EGFR_block_11")
    x = MaxPooling3D((1, 2, 2), strides=(1, 2, 2), padding="same", name=next(pools))(x)
    x = transit_block(x, 64, "EGFR_block_12")
    x = GlobalAveragePooling3D(name="global_average_pooling3d")(x)
    x = Dense(1, activation="sigmoid", name="EGFR_global_pred")(x)
    return keras.Model(inp, x, name="myDense")


def randomise(model, seed: int) -> None:
    """Random weights everywhere, BatchNorm statistics included (variances positive)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = []
        for w in layer.weights:
            shape = tuple(w.shape)
            if w.name == "moving_variance":
                values.append(rng.uniform(0.5, 2.0, shape))
            elif w.name == "gamma":
                values.append(rng.uniform(0.8, 1.2, shape))
            elif w.name == "kernel":             # variance-preserving: 1 / fan-in
                values.append(rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape))
            else:
                values.append(rng.normal(0, 0.1, shape))
        if values:
            layer.set_weights([v.astype("float32") for v in values])


def save_keras2_h5(model, path, *, drop=None, reshape=None) -> None:
    """``model`` as tf.keras 2's ``model.save('x.h5')`` lays it out: root attributes
    keras_version, backend and model_config; group model_weights with attribute layer_names;
    per layer a group with attribute weight_names and the datasets at those names.
    ``drop`` leaves a layer out, ``reshape`` = (layer, array) replaces its first weight."""
    layer_names = [layer.name for layer in model.layers if layer.name != drop]
    config = {"class_name": "Functional", "config": {"name": model.name, "layers": [
        {"class_name": "InputLayer", "name": "input_1",
         "config": {"batch_input_shape": [None, *model.inputs[0].shape[1:]],
                    "dtype": "float32", "name": "input_1"}}]}}
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.3.0-tf"
        f.attrs["backend"] = b"tensorflow"
        f.attrs["model_config"] = json.dumps(config).encode()
        group = f.create_group("model_weights")
        group.attrs["layer_names"] = np.array([n.encode() for n in layer_names])
        group.attrs["backend"] = b"tensorflow"
        group.attrs["keras_version"] = b"2.3.0-tf"
        for layer in model.layers:
            if layer.name == drop:
                continue
            g = group.create_group(layer.name)
            names = [f"{layer.name}/{w.name}:0" for w in layer.weights]
            g.attrs["weight_names"] = np.array([n.encode() for n in names])
            for i, (name, value) in enumerate(zip(names, layer.get_weights())):
                if reshape and reshape[0] == layer.name and i == 0:
                    value = reshape[1]
                g.create_dataset(name, data=value)


@pytest.fixture(scope="module")
def their_files(tmp_path_factory):
    """Their network with random weights, its outputs on a random input, and its HDF5 file."""
    tmp = tmp_path_factory.mktemp("authors")
    net = their_network(SIZE)
    randomise(net, seed=7)
    x = np.random.default_rng(1).normal(size=(2, *SIZE, 1)).astype(np.float32)
    import keras

    both = keras.Model(net.inputs, [net.outputs[0],
                                    net.get_layer("global_average_pooling3d").output])
    prob, feature = (np.asarray(a) for a in both.predict(x, verbose=0))
    path = tmp / "myDenseNetv2_COVID-19.h5"
    save_keras2_h5(net, path)
    return net, path, x, prob, feature


# --------------------------------------------------------------------------- the tests

def test_imported_weights_give_their_networks_outputs(tmp_path, their_files):
    import keras

    net, path, x, prob, feature = their_files
    out = tmp_path / "system"
    assert main(["import-weights", str(path), str(out)]) == 0
    model = keras.models.load_model(out / "model.keras", compile=False)
    assert tuple(model.inputs[0].shape[1:4]) == SIZE            # from the file's model_config
    assert model.count_params() == net.count_params()
    both = keras.Model(model.inputs, [model.outputs[0], model.get_layer("dl_feature").output])
    p, f = both.predict(x, verbose=0)
    assert 0.01 < prob.min() and prob.max() < 0.99 and np.std(feature) > 1e-2  # not saturated
    np.testing.assert_allclose(p, prob, atol=1e-5)
    np.testing.assert_allclose(f, feature, atol=1e-5, rtol=1e-5)

    plan = json.loads((out / "plan.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert plan["architecture"] == run["architecture"] == "authors"
    assert plan["evaluation"]["threshold"] == 0.8 and plan["input_shape"] == list(SIZE)
    roi = plan["preprocessing"]["roi"]
    assert {k: roi[k] for k in AUTHORS_ROI} == AUTHORS_ROI and roi["size"] == list(SIZE)
    assert plan["training_data"]["file"] == path.name and not plan["training_data"]["synthetic"]
    from covidct.inference.system import open_system

    system = open_system(out)
    assert system.model == out / "model.keras" and system.architecture == "authors"


def test_a_weights_only_file_at_another_size_imports_too(tmp_path, their_files):
    """The root-level layout of ``save_weights('x.h5')``; --size rebuilds at any input size."""
    import keras

    net, path, *_ = their_files
    flat = tmp_path / "weights.h5"
    with h5py.File(path, "r") as src, h5py.File(flat, "w") as dst:
        for key in src["model_weights"]:
            src.copy(src["model_weights"][key], dst, name=key)
        for key, value in src["model_weights"].attrs.items():
            dst.attrs[key] = value
    out = tmp_path / "system"
    assert main(["import-weights", str(flat), str(out), "--size", "8", "48", "64",
                 "--min-pixels", "20"]) == 0
    model = keras.models.load_model(out / "model.keras", compile=False)
    assert tuple(model.inputs[0].shape[1:4]) == (8, 48, 64)
    for a, b in zip(model.get_weights(), net.get_weights()):
        np.testing.assert_array_equal(a, b)
    roi = json.loads((out / "plan.json").read_text())["preprocessing"]["roi"]
    assert roi["min_pixels"] == 20 and roi["zscore"] == "resized"


def test_their_file_starts_a_fine_tuning_directly(their_files):
    """``training.init: FILE.h5``: fine-tuning starts from their weights, at the ROI's size, and
    only with their architecture."""
    from covidct.errors import CovidctError
    from covidct.model.classifier import initial_model

    net, path, *_ = their_files
    model = initial_model((8, 48, 64), path, architecture="authors")
    assert tuple(model.inputs[0].shape[1:4]) == (8, 48, 64)
    for a, b in zip(model.get_weights(), net.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(CovidctError, match="training.architecture: authors"):
        initial_model(SIZE, path, architecture="covidct")


def test_their_file_is_a_trained_system_directly(tmp_path, their_files):
    """``system: FILE.h5`` (and ``covidct predict --system FILE.h5``): imported once into the
    cache, taken from there while the file is unchanged, imported again when it changes."""
    import keras

    from covidct.inference.system import open_system

    net, path, x, prob, _ = their_files
    cache = tmp_path / "cache"
    system = open_system(path, cache=cache)
    assert system.source == str(path) and system.architecture == "authors"
    assert system.preprocessing["roi"]["zscore"] == "resized"
    model = keras.models.load_model(system.model, compile=False)
    np.testing.assert_allclose(model.predict(x, verbose=0), prob, atol=1e-5)
    stamp = system.model.stat().st_mtime_ns
    assert open_system(path, cache=cache).model.stat().st_mtime_ns == stamp
    changed = their_network(SIZE)
    randomise(changed, seed=8)
    save_keras2_h5(changed, tmp_path / "retrained.h5")
    again = open_system(tmp_path / "retrained.h5", cache=cache)
    assert again.model.stat().st_mtime_ns != stamp
    assert again.plan["training_data"]["file"] == "retrained.h5"


@pytest.mark.parametrize("change, words", [
    ({"drop": "block_21_1_1_conv"},
     "weighted layer 19 of the authors' COVID-19Net, 'block_21_1_1_conv', is not in the file; "
     "the file's layer 19 is 'block_21_1_1_bn'"),
    ({"reshape": ("block23_trans_conv", np.zeros((1, 1, 1, 88, 32), np.float32))},
     "layer 'block23_trans_conv': kernel is 1x1x1x88x32 in the file, 1x1x1x88x24"),
])
def test_a_file_whose_layers_differ_is_refused_naming_the_first(tmp_path, their_files, capsys,
                                                                 change, words):
    net, *_ = their_files
    bad = tmp_path / "bad.h5"
    save_keras2_h5(net, bad, **change)
    assert main(["import-weights", str(bad), str(tmp_path / "system")]) == 2
    err = capsys.readouterr().err
    assert words in err and str(bad) in err
    assert not (tmp_path / "system" / "plan.json").exists()


def test_the_post_activation_network_is_refused(tmp_path, capsys):
    from covidct.model.architecture import covid19net

    path = tmp_path / "covidct.h5"
    save_keras2_h5(covid19net(SIZE, architecture="covidct"), path)
    assert main(["import-weights", str(path), str(tmp_path / "system")]) == 2
    assert "'block0_conv1', is not in the file; the file's layer 1 is 'stem_1_conv'" in \
        capsys.readouterr().err
    (tmp_path / "text.h5").write_text("not hdf5")
    assert main(["import-weights", str(tmp_path / "text.h5"), str(tmp_path / "s2")]) == 2
    assert "not an HDF5 file" in capsys.readouterr().err


def test_the_paper_config_has_the_authors_roi_network_and_cohort(repo):
    import yaml

    cfg = yaml.safe_load((repo / "config" / "paper.yaml").read_text())
    assert {k: cfg["roi"][k] for k in AUTHORS_ROI} == AUTHORS_ROI
    assert cfg["training"]["architecture"] == "authors"
    assert cfg["prognosis"]["min_follow_up_days"] == 5
    assert cfg["evaluation"]["threshold"] == 0.8            # their test.py's cut-off


@pytest.mark.slow
def test_their_file_is_the_workflows_system_at_a_new_hospital(repo, real_data, tmp_path,
                                                               their_files):
    """``system: myDenseNetv2_COVID-19.h5``: the workflow imports it once into results/system/
    and plans the new hospital's evaluation with it, training nothing."""
    import yaml
    from test_roles import _jobs, _sheet
    from test_workflow import _snakemake, _workdir

    _, path, *_ = their_files
    workdir = _workdir(repo, tmp_path / "hospital")
    sheet = _sheet(real_data, workdir / "samples.tsv",
                   [("c1", "hospC", "cap001"), ("c2", "hospC", "P001")])
    config = workdir / "authors.yaml"
    config.write_text(yaml.safe_dump({"samples": str(sheet), "system": str(path),
                                      "sites": {"hospC": {"role": "diagnosis"}}}))
    dry = _snakemake(workdir, "-n", "--configfile", str(config), "--replace-workflow-config")
    jobs = _jobs(dry)
    assert not {"pretrain_egfr", "finetune_covid", "train_random_init"} & set(jobs), jobs
    assert jobs["predict_finetune_covid"] == 1 and jobs["roi"] == 2, jobs
    [plan] = (workdir / "results" / "system").glob("*/plan.json")
    plan = json.loads(plan.read_text())
    assert plan["architecture"] == "authors" and plan["training_data"]["file"] == path.name
    assert plan["preprocessing"]["roi"]["slice_rule"] == "neighbours"
