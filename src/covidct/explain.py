"""``covidct explain``: saliency maps, filter patterns and the PCA of the DL feature (Figures 4-5).

Paper, supplementary methods S6-S7:

* **Saliency** (Figure 4): the gradient of the predicted COVID-19 probability with respect to the
  input lung ROI. :func:`saliency` computes it with the backend's own automatic differentiation
  (``tf.GradientTape`` on TensorFlow, ``jax.grad`` on JAX, autograd on PyTorch) behind one
  function; ``keras.backend.backend()`` picks the branch. Figures show ``|gradient|`` smoothed
  with a Gaussian (``--smooth-sigma`` voxels) over the ROI in grey, on three axial slices chosen
  at the 25th, 50th and 75th percentiles of the saliency mass along z.
* **Saliency inside the lung**: ``sum |grad| inside the lung mask / sum |grad|``. The mask is
  ``lung.zarr`` (uint8, on the ``ct.zarr`` grid) cropped to the ROI's bounding box and resized
  (nearest neighbour) to the ROI size: the ``lung`` label the roi stage stores in roi.zarr
  (for stores without it, computed from ``lung.zarr`` and the box). The
  ``lung_volume_fraction`` column (share of ROI voxels inside the lung) is the value a
  saliency spread evenly over the ROI would get.
* **Saliency on the scan** (:func:`saliency_on_ct`): the same gradient taken back through the
  roi stage to the CT voxels of the ROI's box (``d p / d HU``): the adjoint of the resize, the
  z-score, and zero where the clip or the non-lung clamp binds (there the ROI does not change
  with the scan). ``fraction_ct`` is its share inside ``lung.zarr`` over the box,
  ``lung_volume_fraction_ct`` the lung's share of the box. The network-input gradient above
  also counts tissue that the suppression pins to a limit; this one is how much the prediction
  responds to each voxel of the scan. The figures show both (ROI row, CT row).
* **Filter patterns** (Figure 5a-d): activation maximisation from white noise: gradient ascent on
  the mean activation of one filter of a layer (normalised-gradient steps), a 3x3 grid of the
  mid axial slices of nine filters per layer. All nine filters are optimised in one batch.
* **Feature PCA** (Figure 5e): scikit-learn PCA (2 components) of the z-scored 64-d DL feature
  from the predictions.csv files, coloured by class (COVID-19 vs other pneumonia).

ROI bounding box: the ROI store's attributes (``covidct.zarrio.open_image(...).attrs``) must hold
the box in ``ct.zarr`` voxel indices, half-open (Python slices ``z0:z1, y0:y1, x0:x1``). Accepted
forms (:func:`roi_bbox`): a key ``bbox`` (or ``roi_bbox``, ``bbox_zyx``, ``lung_bbox``, ``box``,
``crop``), possibly nested under ``roi``, holding ``[z0, z1, y0, y1, x0, x1]``,
``[[z0, z1], [y0, y1], [x0, x1]]``, ``{"z0": .., "z1": .., ...}`` or ``{"z": [z0, z1], ...}``;
or top-level keys ``z0, z1, y0, y1, x0, x1``. A flag ``bbox_inclusive: true`` (or
``bbox_convention: "inclusive"``) marks inclusive ends. The ROI size is the ROI array's shape.

Outputs (under ``--out-dir``, default results/explain)::

    saliency/{site}_{patient}.png      overlays for the sampled COVID-19 patients
    saliency_in_lung.csv               site, patient, fraction, lung_volume_fraction,
                                       fraction_ct, lung_volume_fraction_ct
    saliency_in_lung_by_site.csv       site, n, mean_fraction, mean_lung_volume_fraction,
                                       mean_fraction_ct, mean_lung_volume_fraction_ct
    filters_{layer}.png, filters.csv   filter patterns; activation before/after per filter
    feature_pca.png, feature_pca.csv   the PCA figure and coordinates
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from covidct.errors import CovidctError

log = logging.getLogger(__name__)

BBOX_KEYS = ("bbox", "roi_bbox", "bbox_zyx", "lung_bbox", "box", "crop")
FEATURE_RE = re.compile(r"^feature_(\d+)$")


# --------------------------------------------------------------------------- gradients

def input_gradient(fn: Callable[[Any], Any], x: np.ndarray) -> np.ndarray:
    """Gradient of the scalar ``fn(x)`` w.r.t. the array ``x``, on the active Keras backend.

    ``fn`` takes a backend tensor and returns a scalar backend tensor (build it from a Keras model
    call and ``keras.ops``). TensorFlow uses ``tf.GradientTape``, JAX ``jax.grad``, PyTorch
    autograd; the result is a numpy array shaped like ``x``.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        t = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = fn(t)
        grad = tape.gradient(y, t)
        return np.zeros_like(x) if grad is None else np.asarray(grad.numpy())
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        return np.asarray(jax.grad(lambda v: jnp.reshape(fn(v), ()))(jnp.asarray(x)))
    if backend == "torch":
        import torch

        t = torch.tensor(x, requires_grad=True)
        fn(t).backward()
        return t.grad.detach().cpu().numpy()
    raise NotImplementedError(f"gradients are not implemented for the {backend!r} backend")


def _input_dtype(model) -> str:
    dtype = getattr(model.inputs[0], "dtype", None) or "float32"
    return str(getattr(dtype, "name", dtype)).replace("tf.", "")


def _first_output(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def saliency(model, roi: np.ndarray) -> np.ndarray:
    """Gradient of the COVID-19 probability w.r.t. the input ROI; same shape as ``roi``.

    ``roi`` is (D, H, W) or (D, H, W, 1); the result is float32 (float64 for a float64 ROI).
    The probability is the model's (first) output; for a
    model with several output units the first unit is used.
    """
    import keras

    roi = np.asarray(roi)
    x = roi.reshape((1,) + roi.shape[:3] + (1,)).astype(_input_dtype(model))

    def probability(t):
        out = _first_output(model(t, training=False))
        return keras.ops.sum(keras.ops.reshape(out, (keras.ops.shape(out)[0], -1))[:, 0])

    out_dtype = np.float64 if roi.dtype == np.float64 else np.float32
    return input_gradient(probability, x).reshape(roi.shape).astype(out_dtype)


# --------------------------------------------------------------------------- lung fraction

def roi_bbox(attrs: Mapping[str, Any]) -> tuple[int, int, int, int, int, int]:
    """The ROI's box ``(z0, z1, y0, y1, x0, x1)``, half-open, from a roi.zarr's attributes.

    See the module docstring for the accepted forms. Raises KeyError when none is present.
    """
    def inclusive(a) -> bool:
        return bool(a.get("bbox_inclusive")) or str(a.get("bbox_convention", "")).lower() \
            .startswith("incl")

    def parse(value) -> list[int] | None:
        if isinstance(value, Mapping):
            if all(k in value for k in ("z0", "z1", "y0", "y1", "x0", "x1")):
                return [value[k] for k in ("z0", "z1", "y0", "y1", "x0", "x1")]
            if all(k in value for k in ("z", "y", "x")):
                return [*value["z"], *value["y"], *value["x"]]
            for key in BBOX_KEYS:
                if key in value:
                    return parse(value[key])
            return None
        if isinstance(value, (list, tuple)):
            flat = [v for item in value for v in (item if isinstance(item, (list, tuple))
                                                  else [item])]
            return list(flat) if len(flat) == 6 else None
        return None

    scopes = [attrs] + [attrs[k] for k in ("roi", "covidct") if isinstance(attrs.get(k), Mapping)]
    for scope in scopes:
        for key in BBOX_KEYS:
            if key in scope:
                box = parse(scope[key])
                if box is not None:
                    return _finish_box(box, inclusive(scope) or inclusive(attrs))
        if all(k in scope for k in ("z0", "z1", "y0", "y1", "x0", "x1")):
            return _finish_box([scope[k] for k in ("z0", "z1", "y0", "y1", "x0", "x1")],
                               inclusive(scope))
    raise KeyError(f"no bounding box in the ROI attributes (keys: {', '.join(sorted(attrs))})")


def _finish_box(box, inclusive: bool) -> tuple[int, ...]:
    z0, z1, y0, y1, x0, x1 = (int(round(float(v))) for v in box)
    if inclusive:
        z1, y1, x1 = z1 + 1, y1 + 1, x1 + 1
    if not (z1 > z0 and y1 > y0 and x1 > x0):
        raise ValueError(f"empty bounding box {box}")
    return z0, z1, y0, y1, x0, x1


def lung_mask_in_roi(lung_mask: np.ndarray, bbox: Sequence[int],
                     roi_shape: Sequence[int]) -> np.ndarray:
    """The lung mask cropped to ``bbox`` (z0, z1, y0, y1, x0, x1) and resized to ``roi_shape``
    (bool); the same grid as the ``lung`` label that the roi stage stores in roi.zarr."""
    from covidct.roi import lung_in_roi

    return lung_in_roi(lung_mask, bbox, roi_shape).astype(bool)


def saliency_fraction_in_lung(saliency_map: np.ndarray, lung_mask_roi: np.ndarray) -> float:
    """``sum |grad| inside the mask / sum |grad|`` (NaN for an all-zero saliency)."""
    mass = np.abs(np.asarray(saliency_map, np.float64))
    if mass.shape != lung_mask_roi.shape:
        raise ValueError(f"saliency {mass.shape} and mask {lung_mask_roi.shape} differ")
    total = float(mass.sum())
    return float("nan") if total == 0 else float(mass[np.asarray(lung_mask_roi, bool)].sum()
                                                  / total)


def resize_matrix(n: int, m: int, antialias: bool = False) -> np.ndarray:
    """The (m, n) matrix of the roi stage's cubic resize along one axis (n -> m samples).

    :func:`covidct.roi.resize_cubic` (with or without anti-aliasing) is separable and linear,
    so the resize of a box is these matrices applied along z, y and x, and its adjoint their
    transposes."""
    from covidct.roi import resample_axis

    return np.asarray(resample_axis(np.eye(n, dtype=np.float32), int(m), 0, antialias),
                      dtype=np.float32)


def saliency_on_ct(grad_roi: np.ndarray, ct_box: np.ndarray, lung_box: np.ndarray,
                   attrs: Mapping[str, Any]) -> np.ndarray:
    """``|d p / d HU|`` on the CT voxels of the ROI's box: the ROI gradient taken back through
    the roi stage (resize, z-score, clip and clamp).

    ``grad_roi`` is :func:`saliency` of the ROI; ``ct_box``/``lung_box`` the CT (HU) and lung
    mask cropped to the ROI's ``bbox``; ``attrs`` the ROI store's attributes (percentile, n_std,
    z-score). Where the clip or the non-lung clamp binds, the ROI does not change with the CT
    voxel and the derivative is 0: this is how much the prediction responds to each voxel of
    the scan, while :func:`saliency` also counts tissue that the suppression pins to a limit.
    The clamp limits follow the lung's mean and sd, so a lung voxel also acts through every
    voxel pinned to a limit (included); the clip level, the box's 95th percentile, is held
    fixed (it moves with one or two order statistics only).
    """
    from covidct.roi import suppress_non_lung

    box = np.asarray(ct_box, dtype=np.float32)
    lung = np.asarray(lung_box) != 0
    if box.shape != lung.shape:
        raise ValueError(f"CT box {box.shape} and lung box {lung.shape} differ")
    h = np.asarray(grad_roi, dtype=np.float32)
    for axis, n in enumerate(box.shape):            # adjoint of the separable resize
        matrix = resize_matrix(n, h.shape[axis], bool(attrs.get("antialias", False)))
        h = np.moveaxis(np.tensordot(matrix.T, np.moveaxis(h, axis, 0), axes=1), 0, axis)
    suppressed, limits = suppress_non_lung(box, lung, float(attrs.get("percentile", 95)),
                                           float(attrs.get("n_std", 4)))
    mean, sd = float(attrs["zscore_mean"]), float(attrs["zscore_sd"])
    z = (suppressed - np.float32(mean)) / np.float32(sd)
    # z-scoring over the box: d z_i / d s_k = (delta_ik - 1/N - z_i z_k / N) / sd
    grad_s = (h - np.float32(h.mean()) - z * np.float32((h * z).mean())) / np.float32(sd)
    clipped = box >= np.float32(limits["clip_hu"])
    free = ~clipped
    if limits["clamp_hu"] is not None:
        lo, hi = (np.float32(v) for v in limits["clamp_hu"])
        level = np.minimum(box, np.float32(limits["clip_hu"]))       # the value the clamp sees
        at_lo, at_hi = ~lung & (level <= lo), ~lung & (level >= hi)
        free &= lung | ((box > lo) & (box < hi))
        # the clamp limits are the lung's mean +/- n sd: each lung voxel below the clip moves
        # them, and with them every voxel pinned to a limit
        n_std = float(limits["n_std"])
        mu, sigma = float(limits["lung_mean_hu"]), float(limits["lung_std_hu"]) or 1.0
        n_lung = int(lung.sum())
        z_lung = (box - np.float32(mu)) / np.float32(sigma)
        a_hi, a_lo = float(grad_s[at_hi].sum()), float(grad_s[at_lo].sum())
        via_limits = (a_hi * (1.0 + n_std * z_lung) + a_lo * (1.0 - n_std * z_lung)) / n_lung
        grad_s = np.where(lung & ~clipped, grad_s + via_limits.astype(np.float32), grad_s)
    return np.abs(grad_s) * free


# --------------------------------------------------------------------------- figures

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    from covidct.zarrio import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)


def saliency_slices(saliency_map: np.ndarray, n: int = 3) -> list[int]:
    """Axial slices at evenly spaced quantiles of the saliency mass along z (25/50/75% for 3)."""
    mass = np.abs(saliency_map).reshape(saliency_map.shape[0], -1).sum(axis=1)
    if mass.sum() == 0:
        return sorted({int(round(q * (len(mass) - 1))) for q in np.linspace(0.25, 0.75, n)})
    cum = np.cumsum(mass) / mass.sum()
    qs = np.linspace(0, 1, n + 2)[1:-1]
    return [int(np.searchsorted(cum, q)) for q in qs]


def _overlay(ax, image, heat, top, mask, title, **imshow):
    ax.imshow(image, cmap="gray", **imshow)
    h = np.clip(heat / top, 0, 1)
    ax.imshow(np.ma.masked_less(h, 0.15), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    if mask is not None and mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors="lime", linewidths=0.6)
    ax.set_title(title)
    ax.axis("off")


def plot_saliency(path: Path, roi: np.ndarray, saliency_map: np.ndarray, title: str,
                  sigma: float = 1.0, lung_mask_roi: np.ndarray | None = None,
                  ct_box: np.ndarray | None = None, ct_saliency: np.ndarray | None = None,
                  lung_box: np.ndarray | None = None) -> None:
    """|gradient| (smoothed) over the ROI in grey on three axial slices; with ``ct_box`` and
    ``ct_saliency`` (:func:`saliency_on_ct`) a second row shows the matching CT slices
    (lung window) with the saliency on the scan's voxels."""
    from scipy.ndimage import gaussian_filter

    plt = _pyplot()

    def smooth(a, sig):
        a = np.abs(a).astype(np.float32)
        return gaussian_filter(a, sig) if np.any(np.asarray(sig) > 0) else a

    heat = smooth(saliency_map, sigma)
    top = float(np.percentile(heat, 99.5)) or 1.0
    slices = saliency_slices(saliency_map)
    rows = 2 if ct_box is not None and ct_saliency is not None else 1
    fig, axes = plt.subplots(rows, len(slices), figsize=(4 * len(slices), 3.6 * rows),
                             squeeze=False)
    for ax, z in zip(axes[0], slices):
        _overlay(ax, roi[z], heat[z], top, None if lung_mask_roi is None else lung_mask_roi[z],
                 f"ROI slice {z}: d p / d ROI")
    if rows == 2:
        # the same smoothing in millimetres: sigma ROI voxels -> box voxels along each axis
        scale = np.array(ct_box.shape, float) / np.array(roi.shape, float)
        ct_heat = smooth(ct_saliency, sigma * scale)
        ct_top = float(np.percentile(ct_heat, 99.5)) or 1.0
        for ax, z in zip(axes[1], slices):
            zb = int(round(z * (ct_box.shape[0] - 1) / max(roi.shape[0] - 1, 1)))
            _overlay(ax, ct_box[zb], ct_heat[zb], ct_top,
                     None if lung_box is None else lung_box[zb], f"CT slice {zb}: d p / d HU",
                     vmin=-1200, vmax=200)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_filters(path: Path, layer: str, patterns: np.ndarray, filters: Sequence[int],
                 start: Sequence[float], end: Sequence[float]) -> None:
    """3x3 grid (or fewer) of the mid axial slice of each filter's pattern."""
    plt = _pyplot()
    n = len(filters)
    cols = min(3, n)
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, pat, f, a0, a1 in zip(axes.ravel(), patterns, filters, start, end):
        ax.imshow(pat[pat.shape[0] // 2], cmap="gray")
        ax.set_title(f"filter {f}: activation {a0:.2g} -> {a1:.2g}", fontsize=8)
    fig.suptitle(f"{layer}: activation maximisation from white noise (mid axial slice)")
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------- filter patterns

def conv_layers(model) -> list[str]:
    """Names of the model's 3-D convolution layers, input to output."""
    return [l.name for l in model.layers if l.__class__.__name__ in ("Conv3D", "Conv3DTranspose")]


def default_layers(model, n: int = 4) -> list[str]:
    """``n`` convolution layers spread evenly from the first to the last."""
    convs = conv_layers(model)
    if not convs:
        return []
    picks = np.unique(np.round(np.linspace(0, len(convs) - 1, min(n, len(convs)))).astype(int))
    return [convs[i] for i in picks]


def filter_patterns(model, layer_name: str, filters: Sequence[int], *, steps: int = 40,
                    step_size: float = 0.1, seed: int = 0, noise_sd: float = 0.1,
                    input_shape: Sequence[int] | None = None, clip: float = 4.0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activation maximisation from white noise for ``filters`` of one layer.

    Gradient ascent on the mean activation of each filter (one batch member per filter),
    with steps normalised to an RMS of ``step_size`` and values clipped to +-``clip`` (the range
    of a z-scored ROI); a step that does not raise a filter's activation is rejected and that
    filter's step halved, so the activation never decreases. Returns ``(patterns (F, D, H, W), initial activation (F,),
    final activation (F,))``; the activations are the filter's mean response to the noise and
    to the final pattern.
    """
    import keras

    layer = model.get_layer(layer_name)
    sub = keras.Model(model.inputs[0], layer.output)
    shape = tuple(model.inputs[0].shape)[1:4]
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
    if any(s is None for s in shape):
        raise ValueError(f"the model input {shape} has free dimensions: give input_shape")
    dtype = _input_dtype(model)
    if tuple(model.inputs[0].shape)[1:4] != shape:
        # a fully convolutional path up to the layer runs on any size: rebuild it on a new input
        # and copy the weights (a Keras functional model checks its input shape)
        clone = keras.models.clone_model(
            sub, input_tensors=keras.Input(shape=shape + (1,), dtype=dtype))
        clone.set_weights(sub.get_weights())
        sub = clone
    channels = int(layer.output.shape[-1])
    filters = [int(f) for f in filters]
    if any(not 0 <= f < channels for f in filters):
        raise ValueError(f"layer {layer_name} has {channels} filters; asked for {filters}")
    rng = np.random.default_rng(seed)
    x = (rng.normal(0.0, noise_sd, (len(filters),) + shape + (1,))).astype(dtype)
    onehot = np.zeros((len(filters), channels), dtype=dtype)
    onehot[np.arange(len(filters)), filters] = 1.0

    def per_filter(t):
        act = sub(t, training=False)
        act = keras.ops.reshape(act, (keras.ops.shape(act)[0], -1, channels))
        return keras.ops.sum(keras.ops.mean(act, axis=1) * onehot, axis=1)  # (F,)

    def objective(t):
        return keras.ops.sum(per_filter(t))

    def activations(v) -> np.ndarray:
        return np.asarray(keras.ops.convert_to_numpy(per_filter(v)), float)

    start = activations(x)
    current = start.copy()
    lr = np.full(len(filters), float(step_size))
    expand = (-1,) + (1,) * (x.ndim - 1)
    for step in range(int(steps)):
        g = input_gradient(objective, x)
        rms = np.sqrt(np.mean(g.reshape(len(filters), -1) ** 2, axis=1)) + 1e-12
        trial = np.clip(x + (lr / rms).reshape(expand) * g, -clip, clip).astype(dtype)
        new = activations(trial)
        # keep a step only where it raised that filter's activation; otherwise halve its step
        # (ReLU/BatchNorm kinks make long steps overshoot), so the ascent never goes down
        up = new > current
        x[up] = trial[up]
        current[up] = new[up]
        lr = np.where(up, np.minimum(lr * 1.2, step_size), lr * 0.5)
    return x[..., 0], start, current


# --------------------------------------------------------------------------- PCA

def feature_pca(predictions: pd.DataFrame, n_components: int = 2
                ) -> tuple[pd.DataFrame, np.ndarray]:
    """PCA of the z-scored DL features: ``(coordinates frame, explained variance ratios)``."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    feats = sorted((c for c in predictions.columns if FEATURE_RE.match(c)),
                   key=lambda c: int(FEATURE_RE.match(c).group(1)))
    if len(predictions) < n_components or len(feats) < n_components:
        raise ValueError(f"PCA needs at least {n_components} patients and features "
                         f"(got {len(predictions)} and {len(feats)})")
    z = StandardScaler().fit_transform(predictions[feats].to_numpy(float))
    pca = PCA(n_components=n_components, random_state=0)
    coords = pca.fit_transform(z)
    out = predictions[["site", "patient", "y"]].reset_index(drop=True).copy()
    for i in range(n_components):
        out[f"pc{i + 1}"] = coords[:, i]
    return out, pca.explained_variance_ratio_


def plot_feature_pca(path: Path, coords: pd.DataFrame, ratio: Sequence[float]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for y, name, colour in ((0, "other pneumonia", "tab:blue"), (1, "COVID-19", "tab:red")):
        sel = coords["y"].astype(int) == y
        ax.scatter(coords.loc[sel, "pc1"], coords.loc[sel, "pc2"], s=10, alpha=0.6,
                   color=colour, label=f"{name} (n={int(sel.sum())})")
    ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.1f}% of variance)")
    ax.set_title("64-d DL feature, principal components")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path,
                        help="trained COVID-19Net (results/models/finetune_covid/model.keras)")
    parser.add_argument("--predictions", nargs="+", required=True, type=Path,
                        metavar="PREDICTIONS.csv",
                        help="results/eval/{site}/predictions.csv (classes, features, sites)")
    parser.add_argument("--rois", nargs="*", default=[], type=Path, metavar="ROI.zarr",
                        help="ROI stores results/patients/{site}/{patient}/roi.zarr to sample "
                             "from (patient = the folder above); default: looked up under "
                             "--patients-dir for the sampled patients")
    parser.add_argument("--lungs", nargs="*", default=None, type=Path, metavar="LUNG.zarr",
                        help="lung masks in the order of --rois (default: lung.zarr beside "
                             "each roi.zarr)")
    parser.add_argument("--cts", nargs="*", default=None, type=Path, metavar="CT.zarr",
                        help="CT stores in the order of --rois, for the saliency on the scan's "
                             "voxels (default: ct.zarr beside each roi.zarr; none there = skipped)")
    parser.add_argument("--patients-dir", type=Path, default=Path("results/patients"),
                        help="where {site}/{patient}/roi.zarr live when --rois is not given")
    parser.add_argument("--out-dir", type=Path, default=Path("results/explain"))
    parser.add_argument("--n-per-site", type=int, default=3,
                        help="COVID-19 patients per site for saliency figures (default 3)")
    parser.add_argument("--fraction-for", choices=("sample", "all"), default="sample",
                        help="in-lung saliency fraction for the sampled patients or all "
                             "COVID-19 patients with an ROI (default sample)")
    parser.add_argument("--smooth-sigma", type=float, default=1.0,
                        help="Gaussian sigma (voxels) for the |gradient| overlay")
    parser.add_argument("--layers", nargs="*", default=None,
                        help="layers for filter patterns (default: 4 Conv3D layers spread from "
                             "first to last; none = skip)")
    parser.add_argument("--filters-per-layer", type=int, default=9)
    parser.add_argument("--steps", type=int, default=40, help="gradient-ascent steps")
    parser.add_argument("--step-size", type=float, default=0.1,
                        help="RMS size of one gradient-ascent step (input is z-scored)")
    parser.add_argument("--pattern-shape", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="input size for filter patterns (default: the model's input)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default sqlite:///results/mlflow.db; "
                             "'none' = no tracking)")
    parser.add_argument("--experiment", default="covidct", help="MLflow experiment (covidct)")
    parser.add_argument("--config", default=None, help="workflow config (hashed into MLflow tags)")


def _read_predictions(paths: Sequence[Path]) -> pd.DataFrame:
    frames = []
    for path in paths:
        if not Path(path).exists():
            raise CovidctError("predictions file not found", path=path)
        df = pd.read_csv(path, dtype={"patient": str, "site": str})
        missing = [c for c in ("patient", "site", "y") if c not in df.columns]
        if missing:
            raise CovidctError(f"predictions lack column(s) {', '.join(missing)}", path=path)
        df["_source"] = str(path)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _read_store(path: Path, patient: str, what: str):
    from covidct.zarrio import open_image

    try:
        return open_image(path)
    except FileNotFoundError:
        raise CovidctError(f"{what} store not found", patient=patient, path=path) from None
    except Exception as err:  # noqa: BLE001 - zarr raises many kinds on a broken store
        raise CovidctError(f"cannot read {what} store: {err}", patient=patient,
                           path=path) from None


def sample_patients(preds: pd.DataFrame, available: set[str], n_per_site: int,
                    seed: int) -> dict[str, list[str]]:
    """Seeded sample of ``n_per_site`` COVID-19 patients with an ROI, per site (sorted ids)."""
    rng = np.random.default_rng(seed)
    chosen = {}
    for site in dict.fromkeys(preds["site"]):
        pool = sorted(p for p in preds.loc[(preds["site"] == site) & (preds["y"].astype(int) == 1),
                                           "patient"] if p in available)
        k = min(max(int(n_per_site), 0), len(pool))
        chosen[site] = sorted(rng.choice(pool, size=k, replace=False).tolist()) if k else []
    return chosen


def run(args: argparse.Namespace) -> int:
    import keras

    from covidct.tracking import DEFAULT_TRACKING_URI
    from covidct.roi import crop_to_box
    from covidct.zarrio import atomic_path, read_label

    out = Path(args.out_dir)
    preds = _read_predictions(args.predictions)
    if not Path(args.model).exists():
        raise CovidctError("model file not found", path=args.model)
    model = keras.models.load_model(args.model, compile=False)
    log.info("model %s loaded (%s backend), input %s", args.model, keras.backend.backend(),
             tuple(model.inputs[0].shape))

    # ROI and lung store of each patient
    site_of = dict(zip(preds["patient"], preds["site"]))
    if args.rois:
        if args.lungs and len(args.lungs) != len(args.rois):
            raise CovidctError(f"--lungs gives {len(args.lungs)} stores for {len(args.rois)} "
                               f"--rois")
        if args.cts and len(args.cts) != len(args.rois):
            raise CovidctError(f"--cts gives {len(args.cts)} stores for {len(args.rois)} --rois")
        lungs = args.lungs or [Path(r).parent / "lung.zarr" for r in args.rois]
        stores = {Path(r).absolute().parent.name: (Path(r), Path(l))
                  for r, l in zip(args.rois, lungs)}
        cts = {Path(r).absolute().parent.name: Path(c)
               for r, c in zip(args.rois, args.cts or [Path(r).parent / "ct.zarr"
                                                        for r in args.rois])}
    else:
        stores = {}
        for patient, site in site_of.items():
            roi = Path(args.patients_dir) / site / patient / "roi.zarr"
            if roi.exists():
                stores[patient] = (roi, roi.parent / "lung.zarr")
        cts = {patient: roi.parent / "ct.zarr" for patient, (roi, _) in stores.items()}
    sample = sample_patients(preds, set(stores), args.n_per_site, args.seed)
    covid = preds[preds["y"].astype(int) == 1]
    if args.fraction_for == "all":
        targets = {s: sorted(p for p in covid.loc[covid["site"] == s, "patient"] if p in stores)
                   for s in sample}
    else:
        targets = sample

    rows = []
    for site, patients in targets.items():
        if not patients:
            log.warning("site %s: no COVID-19 patient with an ROI store: no saliency", site)
        for i, patient in enumerate(patients, 1):
            roi_path, lung_path = stores[patient]
            roi_img = _read_store(roi_path, patient, "ROI")
            roi = roi_img.read().astype(np.float32)
            grad = saliency(model, roi)
            lung_img = _read_store(lung_path, patient, "lung mask") \
                if lung_path.exists() or args.lungs else None
            mask = None if args.lungs else read_label(roi_path, "lung")
            if mask is not None:
                mask = mask.astype(bool)
            elif lung_img is not None:                 # stores written before the lung label
                try:
                    mask = lung_mask_in_roi(lung_img.array, roi_bbox(roi_img.attrs), roi.shape)
                except (KeyError, ValueError) as err:
                    raise CovidctError(f"cannot place the lung mask in the ROI: {err}",
                                       patient=patient, path=roi_path) from err
            row = {"site": site, "patient": patient}
            if mask is not None:
                frac = saliency_fraction_in_lung(grad, mask)
                row.update(fraction=frac, lung_volume_fraction=float(mask.mean()))
                log.info("saliency %s %d/%d: %s, %.1f%% of |d p / d ROI| inside the lung (lung "
                         "is %.1f%% of the ROI)", site, i, len(patients), patient, 100 * frac,
                         100 * mask.mean())
            else:
                log.warning("no lung mask for patient %s (%s): no in-lung fraction", patient,
                            lung_path)
            ct_box = lung_box = ct_grad = None
            ct_path = cts.get(patient)
            if lung_img is not None and ct_path is not None and ct_path.exists() \
                    and not roi_img.attrs.get("fallback"):
                try:
                    bbox = roi_bbox(roi_img.attrs)
                    ct_box = crop_to_box(_read_store(ct_path, patient, "CT").array, bbox)
                    lung_box = crop_to_box(lung_img.array, bbox) != 0
                    ct_grad = saliency_on_ct(grad, ct_box, lung_box, roi_img.attrs)
                except (KeyError, ValueError) as err:
                    raise CovidctError(f"cannot take the saliency back to the CT: {err}",
                                       patient=patient, path=roi_path) from err
                frac_ct = saliency_fraction_in_lung(ct_grad, lung_box)
                row.update(fraction_ct=frac_ct, lung_volume_fraction_ct=float(lung_box.mean()))
                log.info("saliency %s %s: %.1f%% of |d p / d HU| inside the lung (lung is %.1f%% "
                         "of the box)", site, patient, 100 * frac_ct, 100 * lung_box.mean())
            if mask is not None or ct_grad is not None:
                rows.append(row)
            if patient in sample.get(site, []):
                plot_saliency(out / "saliency" / f"{site}_{patient}.png", roi, grad,
                              f"{site} / {patient}: |gradient of p(COVID-19)|",
                              sigma=args.smooth_sigma, lung_mask_roi=mask, ct_box=ct_box,
                              ct_saliency=ct_grad, lung_box=lung_box)
    fractions = pd.DataFrame(rows, columns=["site", "patient", "fraction", "lung_volume_fraction",
                                            "fraction_ct", "lung_volume_fraction_ct"])
    by_site = (fractions.groupby("site", sort=False)
               .agg(n=("patient", "size"), mean_fraction=("fraction", "mean"),
                    mean_lung_volume_fraction=("lung_volume_fraction", "mean"),
                    mean_fraction_ct=("fraction_ct", "mean"),
                    mean_lung_volume_fraction_ct=("lung_volume_fraction_ct", "mean"))
               .reset_index())
    with atomic_path(out / "saliency_in_lung.csv") as tmp:
        fractions.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(out / "saliency_in_lung_by_site.csv") as tmp:
        by_site.to_csv(tmp, index=False, float_format="%.6g")

    # filter patterns
    layers = default_layers(model) if args.layers is None else list(args.layers)
    layers = [l for l in layers if l.lower() != "none"]
    filter_rows = []
    for li, name in enumerate(layers, 1):
        try:
            channels = int(model.get_layer(name).output.shape[-1])
        except ValueError as err:
            raise CovidctError(f"the model has no layer {name!r} (convolutions: "
                               f"{', '.join(conv_layers(model))})", path=args.model) from err
        filters = list(range(min(int(args.filters_per_layer), channels)))
        patterns, start, end = filter_patterns(
            model, name, filters, steps=args.steps, step_size=args.step_size,
            seed=args.seed + li, input_shape=args.pattern_shape)
        plot_filters(out / f"filters_{name}.png", name, patterns, filters, start, end)
        for f, a0, a1 in zip(filters, start, end):
            filter_rows.append({"layer": name, "filter": f, "activation_noise": a0,
                                "activation_pattern": a1})
        log.info("filter patterns %d/%d: layer %s, %d filters, mean activation %.4g -> %.4g",
                 li, len(layers), name, len(filters), float(start.mean()), float(end.mean()))
    with atomic_path(out / "filters.csv") as tmp:
        pd.DataFrame(filter_rows, columns=["layer", "filter", "activation_noise",
                                           "activation_pattern"]).to_csv(tmp, index=False)

    # PCA of the DL feature
    coords, ratio = feature_pca(preds)
    plot_feature_pca(out / "feature_pca.png", coords, ratio)
    with atomic_path(out / "feature_pca.csv") as tmp:
        coords.to_csv(tmp, index=False, float_format="%.6g")
    log.info("feature PCA: %d patients, explained variance %.1f%% + %.1f%%", len(coords),
             100 * ratio[0], 100 * ratio[1])

    tracking = args.tracking_uri or DEFAULT_TRACKING_URI
    if str(tracking).lower() != "none":
        _track(tracking, args, out, by_site, ratio, layers)
    return 0


def _track(tracking_uri: str, args, out: Path, by_site: pd.DataFrame, ratio, layers) -> None:
    import mlflow

    from covidct.tracking import mlflow_run

    params = {"model": str(args.model), "n_per_site": args.n_per_site, "seed": args.seed,
              "layers": ", ".join(layers), "steps": args.steps, "step_size": args.step_size,
              "smooth_sigma": args.smooth_sigma, "fraction_for": args.fraction_for}
    with mlflow_run(tracking_uri, "explain", experiment=args.experiment, params=params, config=args.config,
                    tags={"covidct.rule": "explain"}):
        metrics = {"pca_explained_variance_1": float(ratio[0]),
                   "pca_explained_variance_2": float(ratio[1])}
        for r in by_site.itertuples():
            site = re.sub(r"[^\w\-.]", "_", str(r.site))
            if np.isfinite(r.mean_fraction):
                metrics[f"saliency_in_lung_{site}"] = float(r.mean_fraction)
            if np.isfinite(r.mean_fraction_ct):
                metrics[f"saliency_in_lung_ct_{site}"] = float(r.mean_fraction_ct)
        mlflow.log_metrics(metrics)
        for png in sorted(out.glob("*.png")):
            mlflow.log_artifact(str(png))
        for png in sorted((out / "saliency").glob("*.png")):
            mlflow.log_artifact(str(png), artifact_path="saliency")
        for csv in sorted(out.glob("*.csv")):
            mlflow.log_artifact(str(csv))
