"""The FPN lung mask: the trained DenseNet121-FPN applied slice by slice (2.5D input).

Each slice, with its neighbours as channels, is floored at -1024 HU, cropped or padded about its
centre to the field of view the model was trained with (recorded in the model's name), z-scored
and resized to the network's size; the probability goes back onto the CT grid, is thresholded at
0.5, and only the lungs are kept, holes filled.

The authors' lung segmenter (imported by ``covidct import-weights lungSegmentation.hdf5``, see
:mod:`covidct.model.authors_fpn`; its name is :data:`AUTHORS_MODEL_NAME`) gets the authors'
processing instead (their ``lungSegNet4seg19Conv.py``): HU floored at -1024, each whole slice
z-scored ((x - mean) / (std + 1e-6)), no field of view, each slice cubic-spline resized
(``scipy.ndimage.zoom``, order 3) to the network's size, channels (i-1, i, i+1) for the inner
slices only (the first and last slice get no lung), the probability zoomed linearly (order 1)
back onto the CT's grid and thresholded at 0.5, no component or hole post-processing.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from covidct.errors import CovidctError
from covidct.preprocess.hu import AIR_HU

log = logging.getLogger(__name__)

THRESHOLD = 0.5
AUTHORS_MODEL_NAME = "lung_fpn_authors"    # the imported authors' segmenter (their processing)
AUTHORS = "authors"
COVIDCT = "covidct"
AUTHORS_EPS = 1e-6                         # their z-score: (x - mean) / (std + 1e-6)


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
        except Exception as err:
            raise CovidctError(f"cannot load the segmentation model ({err})", step="segment",
                               path=path) from err
    return _MODELS[key]


def model_name(fov_mm: float | None) -> str:
    """The model's name; it records the field of view the network was trained with."""
    return f"lung_fpn_fov{int(round(fov_mm))}mm" if fov_mm else "lung_fpn"


def model_fov(model) -> float | None:
    """The field of view (mm) a model was trained with (from its name), None = whole slices."""
    found = re.search(r"_fov(\d+)mm$", str(getattr(model, "name", "")))
    return float(found.group(1)) if found else None


def model_preprocessing(model) -> str:
    """``authors`` for the imported authors' segmenter (by its name), else ``covidct``."""
    return AUTHORS if str(getattr(model, "name", "")) == AUTHORS_MODEL_NAME else COVIDCT


def model_size(model) -> int:
    shape = model.inputs[0].shape
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
        raise CovidctError(f"not a lung FPN: input shape {tuple(shape)}", step="segment")
    return int(shape[1])


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
    if model_preprocessing(model) == AUTHORS:
        return authors_probability(ct, model, batch_size=batch_size, compiled=compiled)
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


# --------------------------------------------------------------------------- the authors' way

def authors_normalize_slices(ct: np.ndarray, size: int) -> np.ndarray:
    """The authors' network input per slice: HU floored at -1024, the whole slice z-scored
    ((x - mean) / (std + 1e-6), float64), cubic-spline zoomed (order 3) to (size, size);
    (z, size, size) float32. Zooming each slice once equals their zoom of every 3-slice stack
    with factor 1 along the channels (a spline sampled at its knots returns the samples)."""
    ct = np.asarray(ct)
    n, h, w = ct.shape
    out = np.empty((n, size, size), dtype=np.float32)
    factor = (size / h, size / w)
    for z in range(n):
        s = np.maximum(np.asarray(ct[z], dtype=np.float64), AIR_HU)
        s = (s - s.mean()) / (s.std() + AUTHORS_EPS)
        out[z] = ndi.zoom(s, factor, order=3) if (h, w) != (size, size) else s
    return out


def authors_to_grid(prob: np.ndarray, shape_hw: Sequence[int]) -> np.ndarray:
    """(k, size, size) probabilities linearly zoomed (order 1, as their ROI step zooms the mask)
    onto (k, h, w)."""
    k, size_y, size_x = prob.shape
    h, w = int(shape_hw[0]), int(shape_hw[1])
    if (size_y, size_x) == (h, w):
        return prob.astype(np.float32)
    out = ndi.zoom(prob.astype(np.float32), (1, h / size_y, w / size_x), order=1)
    if out.shape != (k, h, w):                  # zoom rounds the output size
        raise CovidctError(f"zoomed probability {out.shape} != {(k, h, w)}", step="segment")
    return out


def authors_probability(ct: np.ndarray, model, *, batch_size: int = 16,
                        compiled: bool | None = None) -> np.ndarray:
    """Lung probability (z, y, x) float32 the authors' way (see the module's docstring); the
    first and last slice are 0 (their loop runs over slices 1 .. n-2)."""
    ct = np.asarray(ct)
    n, h, w = ct.shape
    size = model_size(model)
    norm = authors_normalize_slices(ct, size)
    prob = np.zeros((n, h, w), dtype=np.float32)
    inner = np.arange(1, n - 1)
    if compiled is None:
        compiled = len(inner) > 8 * batch_size
    for b0 in range(0, len(inner), batch_size):
        index = inner[b0:b0 + batch_size]
        x = stack_channels(norm, index)
        p = model.predict_on_batch(x) if compiled else model(x, training=False)
        prob[index] = authors_to_grid(np.asarray(p, dtype=np.float32)[..., 0], (h, w))
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
                 postprocess: bool | None = None, min_second_fraction: float = 0.05
                 ) -> np.ndarray:
    """Lung mask (uint8, same shape) of an int16 HU CT in canonical orientation.

    ``spacing_zyx`` (mm): every slice is cropped/padded about its centre to the field of view
    the model was trained with (recorded in the model's name) before it is
    resized to the network's input, so the network sees the same mm per pixel as in training;
    the probability is mapped back to the CT's grid. The authors' imported segmenter gets their
    processing instead (no field of view; see the module's docstring).
    ``postprocess``: keep the lungs and fill holes (:func:`postprocess_mask`); None = yes for
    covidct's FPNs, no for the authors' (they do none).
    """
    t0 = time.perf_counter()
    model = load_model(model_path)
    if postprocess is None:
        postprocess = model_preprocessing(model) != AUTHORS
    prob = predict_probability(ct_array_zyx, model, batch_size=batch_size,
                               spacing_yx=tuple(spacing_zyx)[1:])
    mask = prob >= threshold
    del prob
    mask = postprocess_mask(mask, min_second_fraction=min_second_fraction) if postprocess \
        else mask.astype(np.uint8)
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    log.info("fpn: %d slices at %dx%d (%s processing) in %.1f s, lung %.0f ml", mask.shape[0],
             model_size(model), model_size(model), model_preprocessing(model),
             time.perf_counter() - t0, mask.sum() * voxel_ml)
    return mask
