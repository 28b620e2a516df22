"""The authors' lung segmenter: segmentation_models 1.0.1's DenseNet121-FPN and their weights.

The authors (GitHub wangshuocas/COVID-19, ``ERSCOVIDTest/lungSegmentation/lungSegNet4seg19Conv.py``)
build ``sm.FPN('densenet121', classes=1, activation='sigmoid', input_shape=(256, 256, 3))`` with
segmentation_models 1.0.1 (Keras 2.3.1, TensorFlow 2.0) and load
``ERSCOVIDTest/model/lungSegmentation.hdf5`` with ``by_name=False``, i.e. weighted layer by
weighted layer in the model's topological order. :func:`build_sm_fpn` is that network in Keras 3,
flat (not nested), with sm's and keras-applications' layer names (``conv1/conv`` of Keras 2 is
``conv1_conv``: Keras 3 names hold no ``/``):

* encoder: keras-applications' DenseNet121 without top (its last layers ``bn``, ``relu``); the
  pyramid's skips are sm's default feature layers of densenet121, layer indices 311, 139, 51, 4
  (``pool4_conv``, ``pool3_conv``, ``pool2_conv``, ``conv1/relu``: strides 16, 8, 4, 2);
* pyramid: ``fpn_stage_p5`` .. ``p2`` (``_pre_conv`` 1x1 when the input is not 256 channels wide,
  ``_conv`` 1x1 on the skip, ``_upsampling`` nearest x2, ``_add``), so p5 is at stride 16 and p2
  at stride 2;
* segmentation blocks ``segm_stage5a``/``b`` .. ``segm_stage2a``/``b`` (3x3 conv without bias,
  BN, ReLU; 128 filters), ``upsampling_stage5``/``4``/``3`` nearest x8/x4/x2,
  ``aggregation_concat``; no dropout (``pyramid_dropout=None``);
* ``final_stage`` (3x3 conv-BN-ReLU, 128), ``final_upsampling`` bilinear x2, ``head_conv`` 3x3 with
  bias, activation ``sigmoid``.

Keras 2.3.1's bilinear ``UpSampling2D`` is TensorFlow's legacy ``resize_bilinear``
(``align_corners=False``, ``half_pixel_centers=False``: output pixel j samples input ``j / 2``),
not Keras 3's half-pixel resize; ``final_upsampling`` is therefore a nearest x2 upsampling followed
by ``final_upsampling_interpolate``, a 2x2 mean with ``same`` padding (padding excluded from the
mean), which is that legacy resize exactly, in plain Keras layers.

``covidct import-weights lungSegmentation.hdf5 OUT/`` (:func:`import_lung_segmenter`) recognises
such a file by its layers, gives the network its weights in layer order (checking every name and
shape: a file whose layers differ is refused, naming the first difference) and saves
``OUT/model.keras`` (named :data:`~covidct.preprocess.lung_fpn.AUTHORS_MODEL_NAME`, so the lung
FPN applies the authors' pre- and post-processing) with ``OUT/run.json``; ``segmentation:
{method: fpn, model: OUT/model.keras}`` uses it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from covidct.errors import CovidctError
from covidct.preprocess.lung_fpn import AUTHORS_MODEL_NAME, THRESHOLD

log = logging.getLogger(__name__)

STEP = "import-weights"
ARCHITECTURE = "sm_fpn_densenet121"
SM_VERSION = "1.0.1"
PAPER_SIZE = 256
# segmentation_models 1.0.1, backbones_factory: densenet121's feature layers (x16, x8, x4, x2)
FEATURE_LAYERS = (311, 139, 51, 4)
FEATURE_NAMES = ("pool4_conv", "pool3_conv", "pool2_conv", "conv1_relu")
PYRAMID_FILTERS = 256                  # sm.FPN's pyramid_block_filters
SEGMENTATION_FILTERS = PYRAMID_FILTERS // 2
# layer-name prefixes only sm's FPN has: how a file is recognised as the lung segmenter
FPN_PREFIXES = ("fpn_stage_p", "segm_stage")
SOURCE = ("the authors' lung segmenter (github.com/wangshuocas/COVID-19, "
          "ERSCOVIDTest/model/lungSegmentation.hdf5)")


# --------------------------------------------------------------------------- the network

def build_sm_fpn(size: int = PAPER_SIZE, *, name: str = AUTHORS_MODEL_NAME):
    """segmentation_models 1.0.1's ``FPN('densenet121', classes=1, activation='sigmoid')`` at
    ``size`` x ``size`` x 3 (random weights), flat, in sm's layer order and names."""
    import keras
    from keras import layers

    size = int(size)
    if size < 32 or size % 32:
        raise CovidctError(f"the FPN input size must be a multiple of 32 (got {size})", step=STEP)
    base = keras.applications.DenseNet121(include_top=False, weights=None,
                                          input_shape=(size, size, 3))
    skips = []
    for index, expected in zip(FEATURE_LAYERS, FEATURE_NAMES):
        layer = base.get_layer(index=index)
        if layer.name != expected:          # keras.applications must keep keras-applications' order
            raise CovidctError(f"DenseNet121 layer {index} is {layer.name!r}, not {expected!r}: "
                               "this Keras' DenseNet121 differs from keras-applications'",
                               step=STEP)
        skips.append(layer.output)

    def conv3x3_bn_relu(x, block):
        x = layers.Conv2D(SEGMENTATION_FILTERS, 3, padding="same", use_bias=False,
                          kernel_initializer="he_uniform", name=f"{block}_conv")(x)
        x = layers.BatchNormalization(axis=3, name=f"{block}_bn")(x)
        return layers.Activation("relu", name=f"{block}_relu")(x)

    def fpn_block(x, skip, stage):
        if x.shape[3] != PYRAMID_FILTERS:
            x = layers.Conv2D(PYRAMID_FILTERS, 1, kernel_initializer="he_uniform",
                              name=f"fpn_stage_p{stage}_pre_conv")(x)
        skip = layers.Conv2D(PYRAMID_FILTERS, 1, kernel_initializer="he_uniform",
                             name=f"fpn_stage_p{stage}_conv")(skip)
        x = layers.UpSampling2D(2, name=f"fpn_stage_p{stage}_upsampling")(x)
        return layers.Add(name=f"fpn_stage_p{stage}_add")([x, skip])

    p5 = fpn_block(base.output, skips[0], 5)
    p4 = fpn_block(p5, skips[1], 4)
    p3 = fpn_block(p4, skips[2], 3)
    p2 = fpn_block(p3, skips[3], 2)
    s5, s4, s3, s2 = (conv3x3_bn_relu(conv3x3_bn_relu(p, f"segm_stage{k}a"), f"segm_stage{k}b")
                      for p, k in ((p5, 5), (p4, 4), (p3, 3), (p2, 2)))
    s5 = layers.UpSampling2D(8, interpolation="nearest", name="upsampling_stage5")(s5)
    s4 = layers.UpSampling2D(4, interpolation="nearest", name="upsampling_stage4")(s4)
    s3 = layers.UpSampling2D(2, interpolation="nearest", name="upsampling_stage3")(s3)
    x = layers.Concatenate(axis=3, name="aggregation_concat")([s2, s3, s4, s5])
    x = conv3x3_bn_relu(x, "final_stage")
    x = keras2_bilinear_x2(x, "final_upsampling")
    x = layers.Conv2D(1, 3, padding="same", use_bias=True, name="head_conv")(x)
    outputs = layers.Activation("sigmoid", dtype="float32", name="sigmoid")(x)
    return keras.Model(base.input, outputs, name=name)


def keras2_bilinear_x2(x, name: str):
    """Keras 2.3.1's ``UpSampling2D((2, 2), interpolation='bilinear')`` (TensorFlow's legacy
    ``resize_bilinear``: out[2i] = in[i], out[2i+1] = (in[i] + in[i+1]) / 2, the last repeated),
    as nearest x2 then the mean of each 2x2 window reaching down-right (``same`` padding)."""
    from keras import layers

    x = layers.UpSampling2D(2, interpolation="nearest", name=name)(x)
    return layers.AveragePooling2D(2, strides=1, padding="same", name=f"{name}_interpolate")(x)


# --------------------------------------------------------------------------- the file

def keras3_name(name: str) -> str:
    """A Keras 2 layer name as Keras 3 spells it (``conv1/conv`` -> ``conv1_conv``)."""
    return name.replace("/", "_")


def file_layer_names(path: str | Path) -> list[str]:
    """The ``layer_names`` of a Keras 2 HDF5 file (only the attribute is read); [] if none."""
    import h5py

    from covidct.model.authors import h5_name_list

    try:
        with h5py.File(path, "r") as f:
            group = f["model_weights"] if "model_weights" in f else f
            return h5_name_list(group.attrs, "layer_names")
    except OSError:
        return []


def is_lung_segmenter_file(path: str | Path) -> bool:
    """Whether a Keras 2 HDF5 file holds the layers of sm's FPN (the authors' lung segmenter)."""
    path = Path(path)
    if not path.is_file():
        return False
    return any(name.startswith(FPN_PREFIXES) for name in file_layer_names(path))


def _shape(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def fpn_mismatch(model, layers) -> str | None:
    """How the file's weighted ``layers`` (:class:`~covidct.model.authors.LayerWeights`, file
    order) first differ from ``model``'s weighted layers, taken in order as Keras 2's
    ``load_weights(by_name=False)`` does; None when every name, weight and shape agrees."""
    mine = [layer for layer in model.layers if layer.weights]
    for i, layer in enumerate(mine):
        where = f"weighted layer {i + 1} of the lung FPN, {layer.name!r},"
        if i >= len(layers):
            return f"{where} is missing: the file has only {len(layers)} weighted layers"
        found = layers[i]
        if keras3_name(found.name) != layer.name:
            return f"{where} is {found.name!r} in the file"
        expected = [(w.name, tuple(w.shape)) for w in layer.weights]
        there = list(zip(found.weight_names, (tuple(a.shape) for a in found.arrays)))
        if [n for n, _ in there] != [n for n, _ in expected]:
            return (f"{where} holds {', '.join(n for n, _ in there)} in the file, "
                    f"{', '.join(n for n, _ in expected)} in the lung FPN")
        for (weight, want), (_, got) in zip(expected, there):
            if want != got:
                return (f"{where} {weight} is {_shape(got)} in the file, {_shape(want)} in the "
                        "lung FPN")
    if len(layers) > len(mine):
        return (f"the file's weighted layer {len(mine) + 1}, {layers[len(mine)].name!r}, is not "
                f"in the lung FPN ({len(mine)} weighted layers)")
    return None


def set_fpn_weights(model, layers, path: Path) -> None:
    """Give ``model`` the file's weights in layer order; refuses a file that differs."""
    problem = fpn_mismatch(model, layers)
    if problem:
        raise CovidctError(f"the file's layers are not sm {SM_VERSION}'s DenseNet121-FPN: "
                           f"{problem}", step=STEP, path=path)
    mine = [layer for layer in model.layers if layer.weights]
    for layer, found in zip(mine, layers):
        layer.set_weights([a.astype(w.dtype) for w, a in zip(layer.weights, found.arrays)])


def file_size(facts: dict[str, Any]) -> int | None:
    """The square input size of a whole-model file's ``model_config`` (None if absent)."""
    shape = facts.get("input_shape")
    if shape and len(shape) == 3 and shape[0] == shape[1] and shape[2] == 3:
        return int(shape[0])
    return None


def lung_segmenter_model(h5: str | Path, size: int | None = None):
    """sm's DenseNet121-FPN holding the weights of the authors' HDF5 file, and the file's facts.
    ``size`` defaults to the file's input size, else 256 (theirs)."""
    from covidct.model.authors import read_keras2_layers

    h5 = Path(h5)
    layers, facts = read_keras2_layers(h5)
    model = build_sm_fpn(int(size or file_size(facts) or PAPER_SIZE))
    set_fpn_weights(model, layers, h5)
    return model, facts


def import_lung_segmenter(h5: str | Path, out: str | Path, *,
                          size: int | None = None) -> dict[str, Any]:
    """The authors' ``lungSegmentation.hdf5`` into ``out``/model.keras (a lung FPN applying the
    authors' pre- and post-processing) and ``out``/run.json; returns the run record."""
    from covidct import __version__
    from covidct.io.atomic import atomic_path, file_sha256
    from covidct.io.results import write_run

    h5, out = Path(h5), Path(out)
    model, facts = lung_segmenter_model(h5, size)
    size = int(model.inputs[0].shape[1])
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.keras") as tmp:
        model.save(tmp)
    origin = {"source": SOURCE, "file": h5.name, "sha256": file_sha256(h5),
              "keras_version": facts["keras_version"], "synthetic": False}
    record = {"name": model.name, "task": "lung_segmentation", "architecture": ARCHITECTURE,
              "segmentation_models": SM_VERSION, "input_shape": [size, size, 3],
              "n_params": int(model.count_params()), "imported_from": origin,
              "training_data": origin, "preprocessing": "authors",
              "input_channels": ["slice-1", "slice", "slice+1"], "fov_mm": 0,
              "threshold": THRESHOLD, "encoder": "DenseNet121", "run_id": None,
              "model_uri": None, "covidct_version": __version__}
    write_run(out, record)
    n_layers = sum(1 for layer in model.layers if layer.weights)
    log.info("imported %s (%d weighted layers, %d parameters, Keras %s) into %s: the authors' "
             "lung FPN at %dx%d; use it as segmentation: {method: fpn, model: %s}", h5.name,
             n_layers, model.count_params(), facts["keras_version"] or "?", out, size, size,
             out / "model.keras")
    return record


def run_import(args: argparse.Namespace) -> int:
    """``covidct import-weights`` for a lung-segmenter file (see :mod:`covidct.model.authors`)."""
    if getattr(args, "size", None):
        raise CovidctError("--size D H W is the COVID-19Net's input; the lung segmenter's is "
                           "--segmenter-size N", step=STEP, path=args.weights)
    import_lung_segmenter(args.weights, args.out, size=args.segmenter_size)
    return 0

