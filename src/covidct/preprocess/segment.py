"""``covidct segment``: the lung mask of ``ct.zarr`` into ``lung.zarr`` (uint8, 1 = lung).

Two methods: ``threshold`` (classical, no weights: :mod:`covidct.preprocess.lung_threshold`) and
``fpn`` (the paper's DenseNet121-FPN: :mod:`covidct.preprocess.lung_fpn`, Keras imported only
then). The method, its parameters and the lung volumes are recorded in the store's attributes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np

from covidct.errors import CovidctError
from covidct.io.atomic import file_sha256
from covidct.params import ThresholdParams, add_options, from_args

log = logging.getLogger(__name__)

STEP = "segment"
METHODS = ("threshold", "fpn")


def lung_mask(ct, spacing, *, method: Literal["threshold", "fpn"] = "threshold",
              params: ThresholdParams = ThresholdParams(),
              model: str | Path | None = None) -> tuple[np.ndarray, dict]:
    """The lung mask of a CT (z, y, x HU; numpy or a lazy zarr array) and what to record of it.

    Returns ``(uint8 mask, attrs)``; attrs: ``method`` with its ``params`` or ``model``, the
    lung volume and, for the threshold method, the body volume and the method's other facts.
    """
    if method == "threshold":
        from covidct.preprocess.lung_threshold import threshold_lung_mask

        mask, info = threshold_lung_mask(ct, spacing, params)
        return mask, {"method": "threshold", "params": asdict(params), **info}
    if method == "fpn":
        if model is None:
            raise CovidctError("the fpn method needs a trained segmenter (--model SEG.keras)",
                               step=STEP)
        if not Path(model).is_file():
            raise CovidctError("segmentation model not found", step=STEP, path=model)
        # Keras only for this method
        from covidct.preprocess.lung_fpn import (
            AUTHORS,
            load_model,
            model_preprocessing,
            predict_mask,
        )

        mask = np.asarray(predict_mask(np.asarray(ct[...]), spacing, str(model)))
        if mask.shape != tuple(ct.shape):
            raise CovidctError(f"fpn mask shape {mask.shape} != CT shape {tuple(ct.shape)}",
                               step=STEP, path=model)
        voxel_ml = float(np.prod(spacing)) / 1000.0
        lung_ml = round(float(np.count_nonzero(mask) * voxel_ml), 1)
        attrs = {"method": "fpn", "model": str(model), "model_sha256": file_sha256(model),
                 "lung_volume_ml": lung_ml}
        if model_preprocessing(load_model(model)) == AUTHORS:   # the authors' imported FPN
            attrs["preprocessing"] = AUTHORS
        return (mask > 0).astype(np.uint8), attrs
    raise CovidctError(f"unknown segmentation method {method!r} ({'|'.join(METHODS)})",
                       step=STEP)


def segment_image(ct_path: str | Path, out_path: str | Path, *,
                  method: Literal["threshold", "fpn"] = "threshold",
                  params: ThresholdParams = ThresholdParams(), model: str | Path | None = None,
                  patient: str | None = None) -> dict:
    """Segment the lungs of ``ct_path`` into ``out_path``; returns the attributes written."""
    from covidct.io.stores import open_image, write_image

    ct_path, out_path = Path(ct_path), Path(out_path)
    img = open_image(ct_path, what="CT", patient=patient)
    if img.array.ndim != 3 or min(img.array.shape) < 1:
        raise CovidctError(f"expected a 3-D CT, got shape {img.array.shape}", step=STEP,
                           patient=patient, path=ct_path)
    patient = patient or img.attrs.get("patient")
    t0 = time.perf_counter()
    try:
        mask, info = lung_mask(img.array, img.spacing, method=method, params=params, model=model)
    except CovidctError as err:
        err.with_context(patient=patient, path=ct_path)
        raise
    attrs = {"kind": "lung_mask", "source": ct_path.name, **info}
    for key in ("patient", "site"):
        if key in img.attrs:
            attrs[key] = img.attrs[key]
    if patient:
        attrs["patient"] = patient
    write_image(out_path, mask, spacing=img.spacing, origin=img.origin, direction=img.direction,
                attrs=attrs, name="lung")
    log.info("patient %s: lung mask %.0f ml (%s) in %.2f s -> %s", patient or "-",
             info["lung_volume_ml"], method, time.perf_counter() - t0, out_path)
    if info["lung_volume_ml"] < 200:
        log.warning("patient %s: lung mask is only %.0f ml", patient or "-", info["lung_volume_ml"])
    return attrs


def add_arguments(parser) -> None:
    parser.add_argument("ct", help="input ct.zarr (HU, canonical orientation)")
    parser.add_argument("out", help="output lung.zarr (uint8, 1 = lung)")
    parser.add_argument("--method", choices=METHODS, default="threshold",
                        help="threshold: classical, no weights (default); fpn: trained "
                             "DenseNet121-FPN")
    parser.add_argument("--model", default=None, help="SEG.keras for --method fpn")
    parser.add_argument("--patient", default=None, help="patient id (for messages and attributes)")
    add_options(parser, ThresholdParams)


def run(args) -> int:
    segment_image(args.ct, args.out, method=args.method, params=from_args(ThresholdParams, args),
                  model=args.model, patient=args.patient)
    return 0
