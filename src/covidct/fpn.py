"""The paper's lung segmenter: a Feature Pyramid Network on a DenseNet121 encoder (Keras 3).

Method (paper, Supplementary S4; DESIGN.md "The method, exactly"):

* **Input** (2.5D): slice ``i`` with its neighbours ``i-1`` and ``i+1`` as the three channels
  (edge slices repeat themselves); HU floored at -1024; each slice cropped/padded (with air)
  about its centre to a fixed in-plane field of view (``DEFAULT_FOV_MM``, flag ``--fov-mm``;
  recorded in the model's name), so the network sees a fixed physical scale (mm per network
  pixel) whatever the scanner's pixel size and reconstruction field (a 64x64 COPDGene slice of
  4.17 mm pixels with the body filling the view and a 128x128 slice of 2.8 mm pixels look
  alike); each slice z-scored on its own; resized in-plane to ``size`` x ``size`` (256 in the
  paper, 128 for CPU training) with a separable linear (triangle) filter, antialiased when
  shrinking.
* **Network**: ``keras.applications.DenseNet121(include_top=False)`` (random init, or a LOCAL
  ImageNet weights file: never downloaded) wrapped as a sub-model ``densenet121`` that returns
  four pyramid levels: ``conv2_block6_concat`` (1/4, 256 ch), ``conv3_block12_concat`` (1/8, 512),
  ``conv4_block24_concat`` (1/16, 1024) and ``relu`` (1/32, 1024, after the final BN).
  The FPN decoder is built here from ``keras.layers`` only (runs on TensorFlow and JAX): lateral
  1x1 convs to ``pyramid_filters``; top-down nearest x2 upsampling + add; per level two 3x3
  conv-BN-ReLU to ``segmentation_filters``, upsampled (bilinear) to 1/4 and concatenated; a 3x3
  conv-BN-ReLU merge; a 3x3 conv to one channel, bilinear x4 to the input size, sigmoid
  (float32 output ``lung_probability``).
* **Inference** (:func:`predict_mask`): slice by slice over the volume in batches, with the
  field of view the model was trained with; each predicted probability slice is resized back to
  the field's pixel grid (linear), put back onto the CT's grid (0 outside the field) and
  thresholded at 0.5.
  Post-processing (:func:`postprocess_mask`): 3-D connected components (26-connectivity); the
  largest is kept, the second largest too when it holds at least ``min_second_fraction`` (5%) of
  the largest's voxels (the other lung; both lungs may also form one component); then holes are
  filled slice by slice in-plane (vessels, dense lesions enclosed by lung).
* **Training** (``covidct train-segmenter``): CT/mask pairs (DICOM folders or image files, read
  through :mod:`covidct.ingest` into canonical LPS HU; masks through SimpleITK, reoriented to
  LPS, same grid). A seeded patient-level validation split. Every epoch draws
  ``--slices-per-scan`` slices per training scan (80% from the lung slices, 20% outside),
  augmented lightly (rotation +-10 deg, zoom 0.8-1.3 (patients' sizes differ), shift +-6%,
  intensity gain/offset/noise;
  no left/right flip: the lungs are not mirror images). Loss: binary cross-entropy + soft Dice;
  Adam. After each epoch the validation Dice (thresholded at 0.5, pooled over the validation
  scans' sampled slices at the network's resolution) is logged and tracked in MLflow; the best
  epoch's weights are kept. Outputs, atomically: ``model.keras``, then ``run.json`` LAST
  (run_id, model_uri, val_dice, input size, ...).

Heavy modules (Keras, TensorFlow, MLflow) are imported inside functions only.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from covidct.errors import CovidctError
from covidct.zarrio import atomic_path

log = logging.getLogger(__name__)

STEP = "train-segmenter"
AIR_HU = -1024.0
DEFAULT_SIZE = 128            # CPU default; the paper uses 256
PAPER_SIZE = 256
THRESHOLD = 0.5
# In-plane field of view (mm) every slice is cropped/padded to, about its centre, before the
# resize to the network size: the network then sees a fixed physical scale (mm per network
# pixel) whatever the scanner's pixel size and reconstruction field. 0 = the whole slice.
# 320 mm holds an adult's lungs (centred lateral extent <= ~280 mm) with a margin and gives
# the lung boundary more network pixels than a 360 mm field (COPDGene Dice 0.950 vs 0.931).
DEFAULT_FOV_MM = 320.0
ENCODER_NAME = "densenet121"
# DenseNet121 layers giving the pyramid: strides 4, 8, 16, 32.
ENCODER_LEVELS = ("conv2_block6_concat", "conv3_block12_concat", "conv4_block24_concat", "relu")
OUTPUT_NAME = "lung_probability"


# ============================================================================ preprocessing
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of a linear (triangle) resize with half-pixel centres.

    Enlarging is plain linear interpolation; shrinking widens the triangle by the factor
    (antialiasing, like PIL's bilinear), so every input pixel contributes. Rows sum to 1.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale - 0.5          # output centres in input coords
    src = np.arange(n_in)
    w = np.maximum(0.0, 1.0 - np.abs(src[None, :] - centres[:, None]) / support)
    # edge handling: clamp (replicate) by folding out-of-range weight onto the border pixel
    empty = w.sum(axis=1) == 0
    if empty.any():
        w[empty, np.clip(np.rint(centres[empty]).astype(int), 0, n_in - 1)] = 1.0
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_slices(stack: np.ndarray, out_hw: Sequence[int]) -> np.ndarray:
    """Resize (n, h, w) slices to (n, H, W), float32, separable linear filter."""
    stack = np.asarray(stack, dtype=np.float32)
    n, h, w = stack.shape
    H, W = int(out_hw[0]), int(out_hw[1])
    if (h, w) == (H, W):
        return stack
    ry, rx = _resize_matrix(h, H), _resize_matrix(w, W)
    tmp = np.matmul(ry[None], stack)                # (n, H, w)
    return np.matmul(tmp, rx.T[None])               # (n, H, W)


def fov_window(shape_hw: Sequence[int], spacing_yx: Sequence[float] | None,
               fov_mm: float | None) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Per in-plane axis ``(n, start)``: the ``fov_mm`` field as ``n`` pixels of the slice,
    starting at pixel ``start`` (negative: the field reaches beyond the slice, padded), centred
    on the slice. None when there is no field (``fov_mm`` 0/None or no spacing)."""
    if not fov_mm or spacing_yx is None:
        return None
    window = []
    for length, sp in zip(shape_hw, spacing_yx):
        if not sp or float(sp) <= 0:
            raise CovidctError(f"invalid pixel spacing {tuple(spacing_yx)}", step="segment")
        n = max(1, int(round(float(fov_mm) / float(sp))))
        window.append((n, (int(length) - n) // 2))
    return window[0], window[1]


def to_fov(stack: np.ndarray, window, fill: float) -> np.ndarray:
    """Crop/pad (k, h, w) slices to the window of :func:`fov_window` (outside: ``fill``)."""
    if window is None:
        return stack
    (ny, y0), (nx, x0) = window
    k, h, w = stack.shape
    if (ny, nx, y0, x0) == (h, w, 0, 0):
        return stack
    out = np.full((k, ny, nx), fill, dtype=stack.dtype)
    sy0, sy1 = max(0, y0), min(h, y0 + ny)
    sx0, sx1 = max(0, x0), min(w, x0 + nx)
    if sy1 > sy0 and sx1 > sx0:
        out[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = stack[:, sy0:sy1, sx0:sx1]
    return out


def from_fov(stack: np.ndarray, window, shape_hw: Sequence[int], fill: float = 0.0
             ) -> np.ndarray:
    """The inverse of :func:`to_fov`: (k, ny, nx) field slices back onto the (k, h, w) grid
    (pixels outside the field get ``fill``)."""
    if window is None:
        return stack
    (ny, y0), (nx, x0) = window
    h, w = int(shape_hw[0]), int(shape_hw[1])
    out = np.full((stack.shape[0], h, w), fill, dtype=stack.dtype)
    sy0, sy1 = max(0, y0), min(h, y0 + ny)
    sx0, sx1 = max(0, x0), min(w, x0 + nx)
    if sy1 > sy0 and sx1 > sx0:
        out[:, sy0:sy1, sx0:sx1] = stack[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
    return out


def normalize_slices(ct: np.ndarray, size: int, spacing_yx: Sequence[float] | None = None,
                     fov_mm: float | None = None) -> np.ndarray:
    """HU floored at -1024, cropped/padded (with air) to the ``fov_mm`` field about the slice
    centre (when given with ``spacing_yx``), each slice z-scored, resized to (z, size, size)
    float32."""
    out = np.empty((ct.shape[0], size, size), dtype=np.float32)
    window = fov_window(np.shape(ct)[1:], spacing_yx, fov_mm)
    step = 32
    for z0 in range(0, ct.shape[0], step):
        s = np.maximum(np.asarray(ct[z0:z0 + step], dtype=np.float32), AIR_HU)
        s = to_fov(s, window, AIR_HU)
        mean = s.mean(axis=(1, 2), keepdims=True)
        std = s.std(axis=(1, 2), keepdims=True)
        s = (s - mean) / np.maximum(std, 1.0)
        out[z0:z0 + step] = resize_slices(s, (size, size))
    return out


def neighbour_index(n: int, index: np.ndarray | Sequence[int]) -> np.ndarray:
    """(k, 3) indices (i-1, i, i+1) clamped to the volume: edge slices repeat themselves."""
    index = np.asarray(index, dtype=int)
    return np.clip(index[:, None] + np.array([-1, 0, 1])[None, :], 0, n - 1)


def stack_channels(norm: np.ndarray, index: np.ndarray | Sequence[int]) -> np.ndarray:
    """(k, size, size, 3) network input for slices ``index`` of a normalised volume."""
    idx = neighbour_index(norm.shape[0], index)
    return np.ascontiguousarray(np.moveaxis(norm[idx], 1, -1), dtype=np.float32)


# ============================================================================ the network
def build_fpn(size: int = PAPER_SIZE, *, encoder_weights: str | Path | None = None,
              pyramid_filters: int = 256, segmentation_filters: int = 128,
              bn_momentum: float = 0.9, name: str = "lung_fpn"):
    """DenseNet121-FPN: input (size, size, 3), output (size, size, 1) sigmoid probability.

    ``encoder_weights``: None (random init) or a local Keras weights file of
    ``DenseNet121(include_top=False)`` (e.g. the ImageNet "notop" .h5); never downloaded.
    ``bn_momentum``: of every BatchNormalization (Keras' 0.99 needs hundreds of steps before
    the moving statistics used at inference match the batches; short CPU runs need less).
    """
    import keras
    from keras import layers

    size = int(size)
    if size < 32 or size % 32:
        raise CovidctError(f"the FPN input size must be a multiple of 32 (got {size})", step=STEP)
    weights = None
    if encoder_weights:
        weights = str(encoder_weights)
        if not Path(weights).is_file():
            raise CovidctError("DenseNet121 weights file not found (weights are never "
                               "downloaded)", step=STEP, path=weights)
    try:
        base = keras.applications.DenseNet121(include_top=False, weights=weights,
                                              input_shape=(size, size, 3))
    except (ValueError, OSError) as err:
        raise CovidctError(f"cannot load DenseNet121 weights ({err})", step=STEP,
                           path=weights) from err
    encoder = keras.Model(base.input, [base.get_layer(n).output for n in ENCODER_LEVELS],
                          name=ENCODER_NAME)

    inputs = keras.Input((size, size, 3), name="slices")
    c2, c3, c4, c5 = encoder(inputs)

    def conv_bn_relu(x, filters, name):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.Activation("relu", name=f"{name}_relu")(x)

    # top-down pathway with lateral connections
    p5 = layers.Conv2D(pyramid_filters, 1, name="fpn_lateral5")(c5)
    pyramid = {5: p5}
    for level, c in ((4, c4), (3, c3), (2, c2)):
        up = layers.UpSampling2D(2, interpolation="nearest", name=f"fpn_up{level + 1}")(
            pyramid[level + 1])
        lateral = layers.Conv2D(pyramid_filters, 1, name=f"fpn_lateral{level}")(c)
        pyramid[level] = layers.Add(name=f"fpn_add{level}")([up, lateral])
    # per-level segmentation blocks, all brought to stride 4 and merged
    heads = []
    for level in (5, 4, 3, 2):
        x = conv_bn_relu(pyramid[level], segmentation_filters, f"seg{level}a")
        x = conv_bn_relu(x, segmentation_filters, f"seg{level}b")
        factor = 2 ** (level - 2)
        if factor > 1:
            x = layers.UpSampling2D(factor, interpolation="bilinear", name=f"seg{level}_up")(x)
        heads.append(x)
    x = layers.Concatenate(name="fpn_merge")(heads)
    x = conv_bn_relu(x, segmentation_filters, "head")
    x = layers.Conv2D(1, 3, padding="same", name="head_logits")(x)
    x = layers.UpSampling2D(4, interpolation="bilinear", name="head_up")(x)
    outputs = layers.Activation("sigmoid", dtype="float32", name=OUTPUT_NAME)(x)
    model = keras.Model(inputs, outputs, name=name)
    for layer in _all_layers(model):
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = float(bn_momentum)
    return model


def _all_layers(model) -> list:
    found = []
    for layer in model.layers:
        found.append(layer)
        if hasattr(layer, "layers"):
            found.extend(_all_layers(layer))
    return found


def dice_bce_loss(y_true, y_pred, smooth: float = 1.0):
    """Binary cross-entropy + (1 - soft Dice over the batch); keras.ops only."""
    from keras import ops

    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    eps = 1e-6
    p = ops.clip(y_pred, eps, 1.0 - eps)
    bce = -ops.mean(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p))
    inter = ops.sum(y_true * y_pred)
    dice = (2.0 * inter + smooth) / (ops.sum(y_true) + ops.sum(y_pred) + smooth)
    return bce + (1.0 - dice)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks (1.0 when both are empty)."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


_MODELS: dict[tuple[str, float], object] = {}


def load_model(model_path: str | Path):
    """The saved FPN (cached per path and modification time)."""
    import keras

    path = Path(model_path)
    if not path.is_file():
        raise CovidctError("segmentation model not found", step="segment", path=path)
    key = (str(path.resolve()), path.stat().st_mtime)
    if key not in _MODELS:
        try:
            _MODELS[key] = keras.saving.load_model(path, compile=False)
        except Exception as err:  # noqa: BLE001 - any unreadable/foreign model
            raise CovidctError(f"cannot load the segmentation model ({err})", step="segment",
                               path=path) from err
    return _MODELS[key]


def model_name(fov_mm: float | None) -> str:
    """The model's name; it records the field of view the network was trained with."""
    return f"lung_fpn_fov{int(round(fov_mm))}mm" if fov_mm else "lung_fpn"


def model_fov(model) -> float | None:
    """The field of view (mm) a model was trained with (from its name), None = whole slices."""
    import re

    found = re.search(r"_fov(\d+)mm$", str(getattr(model, "name", "")))
    return float(found.group(1)) if found else None


def model_size(model) -> int:
    shape = model.inputs[0].shape
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
        raise CovidctError(f"not a lung FPN: input shape {tuple(shape)}", step="segment")
    return int(shape[1])


# ============================================================================ inference
def predict_probability(ct: np.ndarray, model, *, batch_size: int = 16,
                        compiled: bool | None = None,
                        spacing_yx: Sequence[float] | None = None,
                        fov_mm: float | None = None) -> np.ndarray:
    """Lung probability (z, y, x) float32 at the CT's size, slice-wise in batches.

    ``fov_mm``: the field of view each slice is cropped/padded to before the network (None =
    the one the model was trained with, see :func:`model_fov`); it needs ``spacing_yx`` (mm);
    the probability is mapped back onto the CT's grid (0 outside the field).
    ``compiled``: run the batches through Keras' compiled predict function (tracing DenseNet121
    costs seconds once, then each batch is fast) or call the model eagerly; None = compiled when
    the volume holds more than 8 batches.
    """
    ct = np.asarray(ct)
    if ct.ndim != 3:
        raise CovidctError(f"expected a 3-D (z, y, x) CT, got shape {ct.shape}", step="segment")
    size = model_size(model)
    if fov_mm is None:
        fov_mm = model_fov(model)
    if fov_mm and spacing_yx is None:
        log.warning("fpn: no pixel spacing given: the slices are not brought to the model's "
                    "%.0f mm field of view", fov_mm)
    n, h, w = ct.shape
    window = fov_window((h, w), spacing_yx, fov_mm)
    norm = normalize_slices(ct, size, spacing_yx, fov_mm)
    out_hw = (h, w) if window is None else (window[0][0], window[1][0])
    prob = np.empty((n, h, w), dtype=np.float32)
    if compiled is None:
        compiled = n > 8 * batch_size
    for z0 in range(0, n, batch_size):
        index = np.arange(z0, min(n, z0 + batch_size))
        x = stack_channels(norm, index)
        p = model.predict_on_batch(x) if compiled else model(x, training=False)
        p = np.asarray(p, dtype=np.float32)[..., 0]
        prob[index] = from_fov(resize_slices(p, out_hw), window, (h, w))
    return prob


def postprocess_mask(mask: np.ndarray, *, min_second_fraction: float = 0.05,
                     fill_holes: bool = True) -> np.ndarray:
    """Keep the lungs (largest 3-D component, and the second when it holds at least
    ``min_second_fraction`` of the largest's voxels) and fill in-plane holes. uint8."""
    mask = np.asarray(mask) > 0
    labels, n = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return mask.astype(np.uint8)
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    keep = [order[0] + 1]
    if n > 1 and sizes[order[1]] >= min_second_fraction * sizes[order[0]]:
        keep.append(order[1] + 1)
    out = np.isin(labels, keep)
    if fill_holes:
        for z in range(out.shape[0]):
            if out[z].any():
                out[z] = ndi.binary_fill_holes(out[z])
    return out.astype(np.uint8)


def predict_mask(ct_array_zyx: np.ndarray, spacing_zyx: Sequence[float], model_path: str | Path,
                 *, batch_size: int = 16, threshold: float = THRESHOLD,
                 postprocess: bool = True, min_second_fraction: float = 0.05) -> np.ndarray:
    """Lung mask (uint8, same shape) of an int16 HU CT in canonical orientation.

    ``spacing_zyx`` (mm): every slice is cropped/padded about its centre to the field of view
    the model was trained with (``DEFAULT_FOV_MM``; recorded in the model's name) before it is
    resized to the network's input, so the network sees the same mm per pixel as in training;
    the probability is mapped back to the CT's grid.
    """
    t0 = time.perf_counter()
    model = load_model(model_path)
    prob = predict_probability(ct_array_zyx, model, batch_size=batch_size,
                               spacing_yx=tuple(spacing_zyx)[1:])
    mask = prob >= threshold
    del prob
    mask = postprocess_mask(mask, min_second_fraction=min_second_fraction) if postprocess \
        else mask.astype(np.uint8)
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    log.info("fpn: %d slices at %dx%d in %.1f s, lung %.0f ml", mask.shape[0], model_size(model),
             model_size(model), time.perf_counter() - t0, mask.sum() * voxel_ml)
    return mask


# ============================================================================ training data
def read_ct(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A DICOM folder or image file as int16 HU in canonical LPS orientation (via ingest),
    with its spacing (z, y, x) mm."""
    import SimpleITK as sitk

    from covidct import ingest

    path = Path(path)
    scan = ingest.read_scan(path)
    image, _ = ingest.orient_lps(scan.image)
    array, _ = ingest.repair_hu(sitk.GetArrayViewFromImage(image), padding_values=scan.padding_hu)
    return array, tuple(float(v) for v in image.GetSpacing()[::-1])


def read_mask(path: str | Path, shape: Sequence[int]) -> np.ndarray:
    """A lung-mask image (NIfTI/NRRD/...) reoriented to LPS, as uint8 0/1, checked against
    the CT's ``shape``."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise CovidctError("no such mask file", step=STEP, path=path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise CovidctError(f"unreadable mask ({str(err).strip().splitlines()[-1]})", step=STEP,
                           path=path) from err
    if image.GetDimension() != 3:
        raise CovidctError(f"mask is not 3-D ({image.GetDimension()}-D)", step=STEP, path=path)
    image = sitk.DICOMOrient(image, "LPS")
    array = sitk.GetArrayFromImage(image)
    if tuple(array.shape) != tuple(shape):
        raise CovidctError(f"mask grid {'x'.join(map(str, array.shape))} (z,y,x) differs from the "
                           f"CT's {'x'.join(map(str, shape))}", step=STEP, path=path)
    mask = (array > 0).astype(np.uint8)
    if not mask.any():
        raise CovidctError("mask holds no lung voxel", step=STEP, path=path)
    return mask


GENERIC_NAMES = {"ct", "image", "scan", "dicom", "series", "img", "volume"}


def patient_name(path: str | Path) -> str:
    """A name for messages: the file name without image suffixes, or the parent folder's name
    when that is generic (``P007/ct.nii.gz`` -> ``P007``)."""
    path = Path(path)
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".zarr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.lower() in GENERIC_NAMES and path.parent.name:
        return path.parent.name
    return name


@dataclass
class Volume:
    """One training scan at the network's resolution."""

    name: str
    image: np.ndarray          # (z, size, size) float16: normalised slices
    mask: np.ndarray           # (z, size, size) uint8: lung mask resized (linear, >= 0.5)
    lung_slices: np.ndarray    # indices of slices holding lung
    other_slices: np.ndarray
    fov_mm: float | None = None   # field of view of the slices (None: whole slices)


def prepare_volume(name: str, ct: np.ndarray, mask: np.ndarray, size: int,
                   spacing_zyx: Sequence[float] | None = None,
                   fov_mm: float | None = None) -> Volume:
    """One scan at the network's resolution; with ``spacing_zyx`` and ``fov_mm`` its slices
    (and mask) are first cropped/padded to the ``fov_mm`` field, as :func:`predict_mask` does."""
    spacing_yx = None if spacing_zyx is None else tuple(spacing_zyx)[1:]
    norm = normalize_slices(ct, size, spacing_yx, fov_mm).astype(np.float16)
    window = fov_window(np.shape(mask)[1:], spacing_yx, fov_mm)
    field = to_fov(np.asarray(mask, dtype=np.float32), window, 0.0)
    small = (resize_slices(field, (size, size)) >= 0.5).astype(np.uint8)
    has_lung = np.asarray(mask).reshape(mask.shape[0], -1).any(axis=1)
    return Volume(name, norm, small, np.flatnonzero(has_lung), np.flatnonzero(~has_lung),
                  float(fov_mm) if window is not None else None)


def sample_slices(volume: Volume, k: int, rng: np.random.Generator,
                  lung_fraction: float = 0.8) -> np.ndarray:
    """``k`` slice indices: ``lung_fraction`` of them from the lung slices (all of them when
    ``k`` <= 0), the rest from outside the lung (where there are any)."""
    lung, other = volume.lung_slices, volume.other_slices
    if k <= 0:
        n_other = min(len(other), int(math.ceil(0.25 * len(lung))))
        return np.concatenate([lung, rng.choice(other, n_other, replace=False)]).astype(int)
    n_other = min(len(other), k - int(round(lung_fraction * k))) if len(other) else 0
    n_lung = k - n_other
    pick_lung = rng.choice(lung, n_lung, replace=n_lung > len(lung))
    pick_other = rng.choice(other, n_other, replace=False) if n_other else np.zeros(0, int)
    return np.concatenate([pick_lung, pick_other]).astype(int)


def augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
            rotation_deg: float = 10.0, scale: tuple[float, float] = (0.8, 1.3),
            shift: float = 0.06) -> tuple[np.ndarray, np.ndarray]:
    """Light in-plane augmentation of one sample: x (S, S, 3) float32, y (S, S) uint8.

    Random rotation, isotropic scale, shift (the same affine for image and mask, linear
    interpolation, mask re-thresholded at 0.5); intensity gain, offset and noise. No flips."""
    size = x.shape[0]
    angle = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg))
    s = rng.uniform(*scale)
    c, si = np.cos(angle), np.sin(angle)
    matrix = np.array([[c, -si], [si, c]]) / s         # output -> input coordinates
    centre = (size - 1) / 2.0
    offset = centre - matrix @ np.full(2, centre) + rng.uniform(-shift, shift, 2) * size
    background = float(x.min())
    out = np.empty_like(x)
    for ch in range(x.shape[-1]):
        out[..., ch] = ndi.affine_transform(x[..., ch], matrix, offset, order=1,
                                            mode="constant", cval=background)
    ym = ndi.affine_transform(y.astype(np.float32), matrix, offset, order=1, mode="constant",
                              cval=0.0) >= 0.5
    out = out * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
    out += rng.normal(0.0, rng.uniform(0.0, 0.05), out.shape).astype(np.float32)
    return out.astype(np.float32), ym.astype(np.uint8)


def slice_arrays(volumes: Sequence[Volume], index: Sequence[np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Stacked (n, S, S, 3) inputs and (n, S, S, 1) targets for the chosen slices."""
    xs, ys = [], []
    for vol, idx in zip(volumes, index):
        if len(idx):
            xs.append(stack_channels(vol.image, idx))
            ys.append(vol.mask[idx])
    x = np.concatenate(xs).astype(np.float32)
    y = np.concatenate(ys)[..., None].astype(np.float32)
    return x, y


def make_dataset(volumes: Sequence[Volume], *, slices_per_scan: int, batch_size: int,
                 seed: int, augment_data: bool = True):
    """A ``keras.utils.PyDataset`` drawing fresh slices (and augmentations) every epoch."""
    import keras

    class SliceDataset(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.rng = np.random.default_rng(seed)
            self.epoch = 0
            self._draw()

        def _draw(self):
            picks = [sample_slices(v, slices_per_scan, self.rng) for v in volumes]
            self.items = [(i, int(z)) for i, p in enumerate(picks) for z in p]
            self.rng.shuffle(self.items)

        def __len__(self):
            return int(math.ceil(len(self.items) / batch_size))

        def __getitem__(self, b):
            chunk = self.items[b * batch_size:(b + 1) * batch_size]
            xs, ys = [], []
            for i, z in chunk:
                vol = volumes[i]
                x = stack_channels(vol.image, [z])[0]
                y = vol.mask[z]
                if augment_data:
                    x, y = augment(x, y, self.rng)
                xs.append(x)
                ys.append(y)
            return np.stack(xs), np.stack(ys)[..., None].astype(np.float32)

        def on_epoch_end(self):
            self.epoch += 1
            self._draw()

    return SliceDataset()


def split_patients(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded patient-level split: (train indices, validation indices)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(val_fraction * n)) if n > 1 and val_fraction > 0 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 and n > 1 else 0), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def validation_dice(model, x: np.ndarray, y: np.ndarray, batch_size: int) -> float:
    """Pooled Dice of the thresholded predictions on validation slices."""
    pred = np.asarray(model.predict(x, batch_size=batch_size, verbose=0))[..., 0] >= THRESHOLD
    return dice(pred, y[..., 0])


# ============================================================================ the stage
def set_threads(n: int) -> None:
    """Limit TensorFlow's CPU threads (0 = all cores); call before any TF op runs."""
    if n <= 0:
        return
    for var in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ[var] = str(n)
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(n)
            tf.config.threading.set_inter_op_parallelism_threads(n)
        except RuntimeError:   # already initialised: the environment variables still apply
            pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from covidct.tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI

    p = parser
    p.add_argument("--images", nargs="+", required=True, type=Path,
                   help="CT scans: DICOM folders or NIfTI/MHA/NRRD files")
    p.add_argument("--masks", nargs="+", required=True, type=Path,
                   help="lung masks (NIfTI etc., 1 = lung), one per image, on the same grid")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder: model.keras and run.json")
    p.add_argument("--epochs", type=int, default=4, help="epochs (%(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="slices per batch (%(default)s)")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE,
                   help="network input size, a multiple of 32 (%(default)s; the paper: 256)")
    p.add_argument("--slices-per-scan", type=int, default=24,
                   help="slices drawn per training scan and epoch, 80%% from the lung "
                        "(0 = all lung slices + 25%% more outside) (%(default)s)")
    p.add_argument("--fov-mm", type=float, default=DEFAULT_FOV_MM,
                   help="in-plane field of view (mm) each slice is cropped/padded to about its "
                        "centre before the resize: a fixed mm per network pixel whatever the "
                        "scanner (0 = whole slices) (%(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (%(default)s)")
    p.add_argument("--imagenet-weights", type=Path, default=None,
                   help="local DenseNet121 include_top=False weights file (never downloaded); "
                        "default: random initialisation")
    p.add_argument("--pyramid-filters", type=int, default=256, help="FPN width (%(default)s)")
    p.add_argument("--segmentation-filters", type=int, default=128,
                   help="segmentation-head width (%(default)s)")
    p.add_argument("--bn-momentum", type=float, default=0.9,
                   help="BatchNormalization momentum (%(default)s)")
    p.add_argument("--eager", action="store_true",
                   help="run the training steps eagerly (no graph tracing: for tiny runs)")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no augmentation")
    p.add_argument("--seed", type=int, default=0, help="random seed (%(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="fraction of the patients held out for validation (%(default)s)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads, 0 = all (%(default)s)")
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI,
                   help="MLflow tracking URI, a sqlite:/// database (%(default)s)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                   help="MLflow experiment (%(default)s)")
    p.add_argument("--run-name", default="lung_fpn", help="MLflow run name (%(default)s)")
    p.add_argument("--config", default=None, help="workflow config file (hashed into the run's tags)")


def train_segmenter(images: Sequence[Path], masks: Sequence[Path], out: Path, *,
                    epochs: int = 4, batch_size: int = 8, size: int = DEFAULT_SIZE,
                    slices_per_scan: int = 24, lr: float = 1e-3,
                    imagenet_weights: Path | None = None, pyramid_filters: int = 256,
                    segmentation_filters: int = 128, bn_momentum: float = 0.9,
                    augment_data: bool = True, seed: int = 0, run_eagerly: bool = False,
                    val_fraction: float = 0.2, tracking_uri: str = "sqlite:///results/mlflow.db",
                    experiment: str = "covidct", run_name: str = "lung_fpn",
                    config: str | None = None, volumes: Sequence[Volume] | None = None,
                    fov_mm: float | None = DEFAULT_FOV_MM) -> dict:
    """Train the FPN; writes ``out``/model.keras then ``out``/run.json. Returns the record.

    ``fov_mm``: the in-plane field of view (mm) every slice is cropped/padded to before the
    resize (0/None: whole slices); recorded in the model's name for :func:`predict_mask`.
    ``volumes`` (already prepared, by :func:`prepare_volume`: their own field of view is used)
    replaces reading ``images``/``masks`` (used by tests and the benchmark, which generate
    scans in memory).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_json = out / "run.json"
    if run_json.exists():           # a failed re-run must not leave the previous record
        run_json.unlink()
    if epochs < 1 or batch_size < 1:
        raise CovidctError("--epochs and --batch-size must be at least 1", step=STEP)
    if size < 32 or size % 32:
        raise CovidctError(f"--size must be a multiple of 32 (got {size})", step=STEP)

    t0 = time.perf_counter()
    if volumes is None:
        if len(images) != len(masks):
            raise CovidctError(f"{len(images)} images but {len(masks)} masks", step=STEP)
        if not images:
            raise CovidctError("no training scans", step=STEP)
        volumes = []
        for image, mask_path in zip(images, masks):
            patient = patient_name(image)
            try:
                ct, spacing = read_ct(image)
                mask = read_mask(mask_path, ct.shape)
            except CovidctError as err:
                raise err.with_context(step=STEP, patient=patient, path=image)
            volumes.append(prepare_volume(patient, ct, mask, size, spacing, fov_mm))
    volumes = list(volumes)
    fovs = {v.fov_mm for v in volumes}
    if len(fovs) > 1:
        raise CovidctError(f"training scans prepared with different fields of view {fovs}",
                           step=STEP)
    fov_mm = fovs.pop() if fovs else None
    log.info("read and prepared %d scans at %dx%d in %.1f s", len(volumes), size, size,
             time.perf_counter() - t0)

    train_idx, val_idx = split_patients(len(volumes), val_fraction, seed)
    train_v = [volumes[i] for i in train_idx]
    val_v = [volumes[i] for i in val_idx]
    val_x = val_y = None
    if val_v:
        rng = np.random.default_rng(seed + 1)
        val_x, val_y = slice_arrays(val_v, [sample_slices(v, 0, rng) for v in val_v])

    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(int(seed))
    backend = keras.backend.backend()
    model = build_fpn(size, encoder_weights=imagenet_weights, pyramid_filters=pyramid_filters,
                      segmentation_filters=segmentation_filters, bn_momentum=bn_momentum,
                      name=model_name(fov_mm))
    # No XLA: compiling DenseNet121's training step with XLA on a CPU takes minutes.
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss=dice_bce_loss,
                  jit_compile=False, run_eagerly=run_eagerly)
    dataset = make_dataset(train_v, slices_per_scan=slices_per_scan, batch_size=batch_size,
                           seed=seed, augment_data=augment_data)

    params = {
        "epochs": epochs, "batch_size": batch_size, "size": size,
        "slices_per_scan": slices_per_scan, "fov_mm": fov_mm or 0, "optimizer": "Adam",
        "lr": lr,
        "loss": "bce+dice", "encoder": "DenseNet121",
        "encoder_weights": str(imagenet_weights) if imagenet_weights else "random",
        "pyramid_filters": pyramid_filters, "segmentation_filters": segmentation_filters,
        "bn_momentum": bn_momentum, "augment": bool(augment_data), "seed": seed, "val_fraction": val_fraction,
        "n_train": len(train_v), "n_val": len(val_v), "n_val_slices": 0 if val_x is None
        else len(val_x), "backend": backend, "keras_version": keras.__version__,
        "n_params": int(model.count_params()),
    }
    log.info("training DenseNet121-FPN %dx%d (%d parameters, backend %s): %d train scans "
             "(%d slices per epoch), %d validation scans (%d slices)", size, size,
             params["n_params"], backend, len(train_v), len(dataset.items), len(val_v),
             params["n_val_slices"])

    from covidct.tracking import mlflow_run

    with mlflow_run(tracking_uri, run_name, experiment=experiment,
                    tags={"rule": "train_lung_segmenter", "model": "densenet121-fpn"},
                    params=params, config=config) as active:
        import mlflow

        history: list[dict] = []
        best = {"epoch": 0, "val_dice": -1.0, "weights": None}

        class EpochEnd(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.t0 = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                loss = float((logs or {}).get("loss", float("nan")))
                row = {"epoch": epoch + 1, "loss": loss}
                if val_x is not None:
                    row["val_dice"] = validation_dice(self.model, val_x, val_y, batch_size)
                row["seconds"] = round(time.perf_counter() - self.t0, 1)
                history.append(row)
                score = row.get("val_dice", -loss)
                if score > best["val_dice"] or best["weights"] is None:
                    best.update(epoch=epoch + 1, val_dice=score,
                                weights=self.model.get_weights())
                log.info("epoch %d/%d loss %.4f%s (%.0f s)", epoch + 1, epochs, loss,
                         f" val_dice {row['val_dice']:.4f}" if "val_dice" in row else "",
                         row["seconds"])
                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"},
                                   step=epoch + 1)

        model.fit(dataset, epochs=epochs, verbose=0, callbacks=[EpochEnd()])
        model.set_weights(best["weights"])
        model_path = out / "model.keras"
        with atomic_path(model_path) as tmp:
            model.save(tmp)
        val_dice = history[best["epoch"] - 1].get("val_dice")
        mlflow.log_metrics({"selected_epoch": best["epoch"],
                            **({"selected_val_dice": val_dice} if val_dice is not None else {})})
        mlflow.log_artifact(str(model_path), artifact_path="model")
        mlflow.log_dict({"history": history}, "history.json")
        record = {
            "run_id": active.info.run_id, "experiment_id": active.info.experiment_id,
            "tracking_uri": tracking_uri,
            "model_uri": f"runs:/{active.info.run_id}/model/model.keras",
            "model": str(model_path), "val_dice": val_dice, "selected_epoch": best["epoch"],
            "input_size": [size, size], "input_channels": ["slice-1", "slice", "slice+1"],
            "fov_mm": fov_mm or 0,
            "threshold": THRESHOLD, "encoder": "DenseNet121",
            "encoder_weights": params["encoder_weights"], "n_train": len(train_v),
            "n_val": len(val_v), "backend": backend, "history": history,
        }
    with atomic_path(run_json) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    log.info("selected epoch %d (val_dice %s); model %s, MLflow run %s", best["epoch"],
             "n/a" if val_dice is None else f"{val_dice:.4f}", model_path, record["run_id"])
    return record


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    train_segmenter(args.images, args.masks, args.out, epochs=args.epochs,
                    batch_size=args.batch_size, size=args.size,
                    slices_per_scan=args.slices_per_scan, lr=args.lr,
                    imagenet_weights=args.imagenet_weights,
                    pyramid_filters=args.pyramid_filters,
                    segmentation_filters=args.segmentation_filters,
                    bn_momentum=args.bn_momentum, augment_data=args.augment,
                    run_eagerly=args.eager, seed=args.seed, val_fraction=args.val_fraction,
                    tracking_uri=args.tracking_uri, experiment=args.experiment,
                    run_name=args.run_name, config=args.config, fov_mm=args.fov_mm)
    return 0
