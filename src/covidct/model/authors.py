"""``covidct import-weights``: the authors' published COVID-19Net weights into a trained system.

The authors (GitHub wangshuocas/COVID-19, ``ERSCOVIDTest/model``) published
``myDenseNetv2_COVID-19.h5`` and ``myDenseNetv2_EGFR_pretrain.h5``: whole tf.keras 2 models
saved as HDF5. Their layer groups are read with h5py (Keras 3 does not reliably rebuild a
tf.keras 2 model config), matched by name against the weighted layers of covidct's ``authors``
COVID-19Net (:func:`covidct.model.architecture.covid19net`), and the model is saved as
``model.keras`` beside a ``run.json`` and a ``plan.json`` whose ROI is the authors' (the rules
of ``config/paper.yaml``), so ``covidct predict --system OUT`` and the workflow's ``system:``
apply it. A file whose layers differ is refused, naming the first difference.

Their lung segmenter, ``ERSCOVIDTest/model/lungSegmentation.hdf5`` (segmentation_models 1.0.1's
DenseNet121-FPN), is recognised by its layers and imported by
:func:`covidct.model.authors_fpn.import_lung_segmenter` instead: ``OUT/model.keras`` is then a
lung FPN for ``segmentation: {method: fpn, model: OUT/model.keras}``.

Keras 2's HDF5 layout: a group (``model_weights`` in a whole-model file, the root in a
weights-only file) whose attribute ``layer_names`` lists every layer; one group per layer whose
attribute ``weight_names`` lists its weights (``block0_bn1/gamma:0``, ...), each a dataset at
that path inside the layer's group.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from covidct.errors import CovidctError
from covidct.io.atomic import file_sha256
from covidct.params import (
    AUTHORS_ROI,
    IngestParams,
    RoiParams,
    ThresholdParams,
    add_options,
    from_args,
)

log = logging.getLogger(__name__)

STEP = "import-weights"
ARCHITECTURE = "authors"
AUTHORS_THRESHOLD = 0.8           # their test.py's cut-off
H5_SUFFIXES = (".h5", ".hdf5")
SOURCE = "the authors' published weights (github.com/wangshuocas/COVID-19, ERSCOVIDTest/model)"


@dataclass(frozen=True)
class LayerWeights:
    """One weighted layer of a Keras 2 HDF5 file: its name, weight short names and arrays."""

    name: str
    weight_names: tuple[str, ...]
    arrays: tuple[np.ndarray, ...]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(a.shape) for n, a in zip(self.weight_names, self.arrays)}


# --------------------------------------------------------------------------- reading the file

def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def h5_name_list(attrs, key: str) -> list[str]:
    """A list attribute as Keras 2 writes it: ``key``, or split over ``key0``, ``key1``, ...
    when it exceeds HDF5's attribute size limit."""
    if key in attrs:
        return [_text(v) for v in np.atleast_1d(attrs[key]) if len(_text(v))]
    names, chunk = [], 0
    while f"{key}{chunk}" in attrs:
        names += [_text(v) for v in np.atleast_1d(attrs[f"{key}{chunk}"])]
        chunk += 1
    return names


def weight_short_name(name: str) -> str:
    """``block0_bn1/gamma:0`` -> ``gamma`` (the name Keras 3 gives the variable)."""
    return name.rsplit("/", 1)[-1].split(":", 1)[0]


def read_keras2_layers(path: str | Path) -> tuple[list[LayerWeights], dict[str, Any]]:
    """The weighted layers of a Keras 2 HDF5 file (file order) and the file's facts:
    ``keras_version``, ``backend`` and, from a whole-model file, ``input_shape`` (D, H, W)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise CovidctError("weights file not found", step=STEP, path=path)
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise CovidctError(f"not an HDF5 file ({err})", step=STEP, path=path) from None
    with handle as f:
        group = f["model_weights"] if "model_weights" in f else f
        names = h5_name_list(group.attrs, "layer_names")
        if not names:
            raise CovidctError("not a Keras 2 HDF5 model or weights file (no layer_names "
                               "attribute)", step=STEP, path=path)
        layers = []
        for name in names:
            weight_names = h5_name_list(group[name].attrs, "weight_names")
            if weight_names:
                layers.append(LayerWeights(
                    name, tuple(weight_short_name(w) for w in weight_names),
                    tuple(np.asarray(group[name][w]) for w in weight_names)))
        facts = {k: _text(group.attrs.get(k, f.attrs.get(k, ""))) for k in
                 ("keras_version", "backend")}
        facts["input_shape"] = model_config_input_shape(f.attrs.get("model_config"))
    return layers, facts


def model_config_input_shape(config) -> tuple[int, int, int] | None:
    """(D, H, W) of the input layer of a Keras 2 ``model_config`` attribute (None if absent)."""
    if config is None:
        return None
    try:
        layers = json.loads(_text(config))["config"]["layers"]
        cfg = next(la["config"] for la in layers if la["class_name"] == "InputLayer")
        shape = cfg.get("batch_input_shape") or cfg.get("batch_shape")
        return tuple(int(s) for s in shape[1:4])
    except (ValueError, KeyError, TypeError, StopIteration):
        return None


# --------------------------------------------------------------------------- matching

def first_mismatch(model, layers: Sequence[LayerWeights]) -> str | None:
    """How the file's weighted ``layers`` first differ from ``model``'s (None when they match):
    a layer missing from the file, other weight names or shapes, a layer the model lacks."""
    by_name = {layer.name: layer for layer in layers}
    mine = [layer for layer in model.layers if layer.weights]
    for i, layer in enumerate(mine):
        found = by_name.get(layer.name)
        if found is None:
            there = f"; the file's layer {i + 1} is {layers[i].name!r}" if i < len(layers) else ""
            return (f"weighted layer {i + 1} of the authors' COVID-19Net, {layer.name!r}, is not "
                    f"in the file{there}")
        expected = {w.name: tuple(w.shape) for w in layer.weights}
        if set(found.weight_names) != set(expected):
            return (f"layer {layer.name!r} holds {', '.join(found.weight_names)} in the file, "
                    f"{', '.join(expected)} in the authors' COVID-19Net")
        for weight, shape in found.shapes().items():
            if shape != expected[weight]:
                return (f"layer {layer.name!r}: {weight} is {'x'.join(map(str, shape))} in the "
                        f"file, {'x'.join(map(str, expected[weight]))} in the authors' "
                        "COVID-19Net")
    names = {layer.name for layer in mine}
    extra = [layer.name for layer in layers if layer.name not in names]
    if extra:
        return f"the file's layer {extra[0]!r} is not in the authors' COVID-19Net"
    return None


def set_authors_weights(model, layers: Sequence[LayerWeights], path: Path) -> None:
    """Give ``model`` the file's weights, layer by layer by name; refuses a file that differs."""
    problem = first_mismatch(model, layers)
    if problem:
        raise CovidctError(f"the file's layers do not match: {problem}", step=STEP, path=path)
    by_name = {layer.name: layer for layer in layers}
    for layer in model.layers:
        if layer.weights:
            found = dict(zip(by_name[layer.name].weight_names, by_name[layer.name].arrays))
            layer.set_weights([found[w.name].astype(w.dtype) for w in layer.weights])


# --------------------------------------------------------------------------- the system

def authors_preprocessing(size: Sequence[int], roi: RoiParams | None = None) -> dict[str, Any]:
    """The plan's preprocessing of an imported system: default ingest, the threshold lung
    mask (their lung FPN is imported on its own: a system carries no segmenter) and the authors'
    ROI at ``size``."""
    roi = replace(roi or RoiParams(**AUTHORS_ROI), size=tuple(int(s) for s in size))
    plain = {"ingest": asdict(IngestParams()),
             "segmentation": {"method": "threshold", "params": asdict(ThresholdParams())},
             "roi": asdict(roi)}
    return json.loads(json.dumps(plain))          # tuples as the stores' JSON holds them



def is_keras2_file(path: str | Path) -> bool:
    """A Keras 2 HDF5 file by its name (``.h5``, ``.hdf5``), as the authors published them."""
    return Path(str(path)).suffix.lower() in H5_SUFFIXES


def authors_model(h5: str | Path, size: Sequence[int] | None = None):
    """The authors' COVID-19Net holding the weights of their HDF5 file, and the file's facts.
    ``size`` (D, H, W) defaults to the file's input size, else 48x240x360; the weights fit any
    size (convolutions, global pooling, one dense layer)."""
    from covidct.model.architecture import PAPER_INPUT_SHAPE, covid19net

    h5 = Path(h5)
    layers, facts = read_keras2_layers(h5)
    shape = tuple(int(s) for s in (size or facts["input_shape"] or PAPER_INPUT_SHAPE))
    model = covid19net(shape, name="covid19net", architecture=ARCHITECTURE)
    set_authors_weights(model, layers, h5)
    return model, facts


def import_weights(h5: str | Path, out: str | Path, *, size: Sequence[int] | None = None,
                   roi: RoiParams | None = None, threshold: float = AUTHORS_THRESHOLD,
                   task: str = "covid") -> dict[str, Any]:
    """Read the authors' Keras 2 HDF5 file into the trained-system folder ``out`` (model.keras,
    model.onnx, run.json, plan.json); returns the plan. ``size`` (D, H, W) defaults to the
    file's input size, else 48x240x360; ``roi`` to the authors' rules (``AUTHORS_ROI``)."""
    from covidct.io.atomic import atomic_path
    from covidct.io.results import write_plan, write_run
    from covidct.model.onnx_graph import export_onnx

    h5, out = Path(h5), Path(out)
    model, facts = authors_model(h5, size)
    shape = tuple(int(s) for s in model.inputs[0].shape[1:4])
    layers = [layer for layer in model.layers if layer.weights]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.keras") as tmp:
        model.save(tmp)
    export_onnx(out / "model.keras")
    preprocessing = authors_preprocessing(shape, roi)
    origin = {"source": SOURCE, "file": h5.name, "sha256": file_sha256(h5),
              "keras_version": facts["keras_version"], "synthetic": False}
    write_run(out, {"name": h5.stem, "task": task, "architecture": ARCHITECTURE,
                    "input_shape": list(shape), "n_params": int(model.count_params()),
                    "imported_from": origin, "preprocessing": preprocessing,
                    "training_data": origin, "run_id": None, "model_uri": None})
    plan = {"model": "model.keras", "input_shape": list(shape), "architecture": ARCHITECTURE,
            "preprocessing": preprocessing,
            "evaluation": {"threshold": float(threshold), "youden_threshold": None,
                           "youden_source": []},
            "training_data": origin, "training_run": None, "cox": None, "segmenter": None}
    from covidct import __version__

    plan["covidct_version"] = __version__
    write_plan(out, plan)
    log.info("imported %s (%d weighted layers, %d parameters, Keras %s) into %s: input %s, "
             "the authors' ROI rules, threshold %g", h5.name, len(layers), model.count_params(),
             facts["keras_version"] or "?", out, "x".join(map(str, shape)), threshold)
    return plan


# --------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", type=Path, metavar="FILE.h5",
                        help="the authors' Keras 2 HDF5 file (myDenseNetv2_COVID-19.h5, "
                             "myDenseNetv2_EGFR_pretrain.h5; or their lung segmenter "
                             "lungSegmentation.hdf5, recognised by its layers)")
    parser.add_argument("out", type=Path, metavar="OUT_DIR",
                        help="the trained system's folder (model.keras, run.json, plan.json); "
                             "for the lung segmenter: model.keras and run.json, a lung FPN for "
                             "segmentation.method fpn")
    parser.add_argument("--segmenter-size", type=int, default=None, metavar="N",
                        help="the lung segmenter's input size N x N (default: the file's, "
                             "else 256); the other options are the COVID-19Net's")
    parser.add_argument("--size", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="network input size (default: the file's, else 48 240 360)")
    parser.add_argument("--threshold", type=float, default=AUTHORS_THRESHOLD,
                        help="the system's decision threshold (default: the authors' "
                             "%(default)s)")
    parser.add_argument("--task", choices=("covid", "egfr"), default="covid",
                        help="what the weights predict (egfr for the EGFR pretraining file)")
    add_options(parser, RoiParams, exclude=("size",), defaults=AUTHORS_ROI)


def run(args: argparse.Namespace) -> int:
    from covidct.model import authors_fpn

    if authors_fpn.is_lung_segmenter_file(args.weights):
        return authors_fpn.run_import(args)
    roi = from_args(RoiParams, args, size=RoiParams.size)
    import_weights(args.weights, args.out, size=args.size, roi=roi, threshold=args.threshold,
                   task=args.task)
    return 0
