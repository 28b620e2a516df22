"""Binary morphology shared by the lung segmentation and the ROI: components, hole filling,
closing, boxes, the body mask and Dice."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi


def struct_2d(connectivity: int = 1) -> np.ndarray:
    """A 3-D structuring element that connects voxels only within a slice."""
    s = np.zeros((3, 3, 3), bool)
    s[1] = ndi.generate_binary_structure(2, connectivity)
    return s


def ellipsoid(radius_mm: float, spacing, in_plane_only: bool = False) -> np.ndarray:
    """Boolean ball (or in-plane disk) of ``radius_mm`` on a grid with ``spacing`` (z, y, x)."""
    if radius_mm <= 0:
        return np.ones((1, 1, 1), bool)
    r = [0 if (in_plane_only and i == 0) else int(math.floor(radius_mm / s + 1e-6))
         for i, s in enumerate(spacing)]
    grids = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    d2 = sum(((g * s) / radius_mm) ** 2 for g, s in zip(grids, spacing))
    return d2 <= 1.0 + 1e-9


def fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice (background not connected to the slice border in-plane)."""
    mask = np.asarray(mask, bool)
    if mask.ndim == 2:
        return ndi.binary_fill_holes(mask)
    lab, _ = ndi.label(~mask, structure=struct_2d(1))
    border = np.unique(np.concatenate([lab[:, 0, :].ravel(), lab[:, -1, :].ravel(),
                                       lab[:, :, 0].ravel(), lab[:, :, -1].ravel()]))
    outside = np.isin(lab, border[border > 0])
    return ~outside


def largest_component(mask: np.ndarray, structure=None) -> np.ndarray:
    lab, n = ndi.label(mask, structure=structure)
    if n == 0:
        return np.zeros_like(mask, bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def closing(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Binary closing that treats the outside of the array as background (pads first)."""
    if mask.sum() == 0 or footprint.size == 1:
        return mask.copy()
    pad = [(k // 2, k // 2) for k in footprint.shape]
    big = np.pad(mask, pad)
    closed = ndi.binary_closing(big, structure=footprint)
    return closed[tuple(slice(p[0], p[0] + n) for p, n in zip(pad, mask.shape))]


def bbox_slices(mask: np.ndarray, margin=(0, 0, 0)) -> tuple[slice, ...]:
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels (clipped to the array)."""
    out = []
    for axis, m in enumerate(margin):
        other = tuple(i for i in range(mask.ndim) if i != axis)
        idx = np.nonzero(mask.any(axis=other))[0]
        out.append(slice(max(0, idx[0] - m), min(mask.shape[axis], idx[-1] + 1 + m)))
    return tuple(out)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / s) if s else 1.0


def body_mask(hu: np.ndarray, body_hu: float = -500.0) -> np.ndarray:
    """Largest component above ``body_hu``, with in-plane holes (lungs, airways) filled."""
    body = largest_component(hu > body_hu)
    return fill_holes_2d(body)


def convex_hull_2d(mask: np.ndarray) -> np.ndarray:
    """Pixels (centres) inside the convex hull of the pixel centres of a 2-D mask."""
    from scipy.spatial import ConvexHull, QhullError

    rows = np.nonzero(mask.any(axis=1))[0]
    if rows.size == 0:
        return mask.copy()
    first = mask[rows].argmax(axis=1)
    last = mask.shape[1] - 1 - mask[rows, ::-1].argmax(axis=1)
    pts = np.concatenate([np.stack([rows, first], 1), np.stack([rows, last], 1)]).astype(float)
    try:
        eq = ConvexHull(pts).equations          # a*y + b*x + c <= 0 inside
    except (QhullError, ValueError):  # fewer than 3 points or all collinear
        return mask.copy()
    y = np.arange(mask.shape[0], dtype=float)[:, None]
    a, b, c = eq[:, 0][None], eq[:, 1][None], eq[:, 2][None]
    eps = 1e-6
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = (-c - a * y) / b                 # (rows, equations)
    hi = np.where(b > eps, bound, np.inf).min(axis=1)
    lo = np.where(b < -eps, bound, -np.inf).max(axis=1)
    flat = np.abs(b[0]) <= eps
    ok_y = (
        np.all((a[:, flat] * y + c[:, flat]) <= eps, axis=1)
        if flat.any()
        else np.ones(len(y), bool)
    )
    x = np.arange(mask.shape[1])[None, :]
    inside = (x >= lo[:, None] - eps) & (x <= hi[:, None] + eps) & ok_y[:, None]
    return inside | mask
