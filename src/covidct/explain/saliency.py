"""Saliency: the gradient of the COVID-19 probability with respect to the input ROI, and taken
back through the roi stage to the scan's voxels; its share inside the lung.

The gradient uses the backend's own automatic differentiation (``tf.GradientTape``, ``jax.grad``
or PyTorch autograd) behind one function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


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


def compiled_input_gradient(fn: Callable[[Any], Any]) -> Callable[[np.ndarray], np.ndarray]:
    """:func:`input_gradient` of ``fn`` compiled once for repeated calls on inputs of one shape
    (``tf.function``, ``jax.jit``; PyTorch runs as it is): ``x -> gradient`` as numpy."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(reduce_retracing=True)
        def gradient(t):
            with tf.GradientTape() as tape:
                tape.watch(t)
                y = fn(t)
            return tape.gradient(y, t)

        return lambda x: np.asarray(gradient(tf.convert_to_tensor(x)).numpy())
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        gradient = jax.jit(jax.grad(lambda v: jnp.reshape(fn(v), ())))
        return lambda x: np.asarray(gradient(jnp.asarray(x)))
    return lambda x: input_gradient(fn, x)


def input_dtype(model) -> str:
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
    x = roi.reshape((1,) + roi.shape[:3] + (1,)).astype(input_dtype(model))

    def probability(t):
        out = _first_output(model(t, training=False))
        return keras.ops.sum(keras.ops.reshape(out, (keras.ops.shape(out)[0], -1))[:, 0])

    out_dtype = np.float64 if roi.dtype == np.float64 else np.float32
    return input_gradient(probability, x).reshape(roi.shape).astype(out_dtype)


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

    :func:`covidct.preprocess.resample.resize_cubic` (with or without anti-aliasing) is
    separable and linear,
    so the resize of a box is these matrices applied along z, y and x, and its adjoint their
    transposes."""
    from covidct.preprocess.resample import resample_axis

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
    from covidct.preprocess.roi import suppress_non_lung

    box = np.asarray(ct_box, dtype=np.float32)
    lung = np.asarray(lung_box) != 0
    if box.shape != lung.shape:
        raise ValueError(f"CT box {box.shape} and lung box {lung.shape} differ")
    h = np.asarray(grad_roi, dtype=np.float32)
    for axis, n in enumerate(box.shape):            # adjoint of the separable resize
        matrix = resize_matrix(n, h.shape[axis], bool(attrs.get("antialias", False)))
        h = np.moveaxis(np.tensordot(matrix.T, np.moveaxis(h, axis, 0), axes=1), 0, axis)
    h = np.ascontiguousarray(h)
    suppressed, limits = suppress_non_lung(box, lung, float(attrs.get("percentile", 95)),
                                           float(attrs.get("n_std", 4)))
    mean, sd = float(attrs["zscore_mean"]), float(attrs["zscore_sd"])
    z = suppressed                                  # z-scored in place (the array is ours)
    z -= np.float32(mean)
    z /= np.float32(sd)
    # z-scoring over the box: d z_i / d s_k = (delta_ik - 1/N - z_i z_k / N) / sd
    grad_s = h                                      # in place: h is not used again
    h_mean, hz_mean = float(h.mean()), float(np.mean(h * z))
    z *= np.float32(hz_mean)
    grad_s -= np.float32(h_mean)
    grad_s -= z
    grad_s /= np.float32(sd)
    del z
    clipped = box >= np.float32(limits["clip_hu"])
    free = ~clipped
    if limits["clamp_hu"] is not None:
        lo, hi = (np.float32(v) for v in limits["clamp_hu"])
        outside = ~lung
        level = np.minimum(box, np.float32(limits["clip_hu"]))       # the value the clamp sees
        at_lo, at_hi = outside & (level <= lo), outside & (level >= hi)
        del level
        free &= lung | ((box > lo) & (box < hi))
        # the clamp limits are the lung's mean +/- n sd: each lung voxel below the clip moves
        # them, and with them every voxel pinned to a limit; as a function of the voxel's HU,
        # (a_hi (1 + n z) + a_lo (1 - n z)) / n_lung with z = (HU - mean) / sd, linear in HU
        n_std = float(limits["n_std"])
        mu, sigma = float(limits["lung_mean_hu"]), float(limits["lung_std_hu"]) or 1.0
        n_lung = int(lung.sum())
        a_hi, a_lo = float(grad_s[at_hi].sum()), float(grad_s[at_lo].sum())
        slope = n_std * (a_hi - a_lo) / (n_lung * sigma)
        offset = (a_hi + a_lo) / n_lung - slope * mu
        moving = lung & ~clipped
        via_limits = box[moving] * np.float32(slope) + np.float32(offset)
        grad_s[moving] += via_limits
    np.abs(grad_s, out=grad_s)
    grad_s[~free] = 0
    return grad_s
