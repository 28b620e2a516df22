"""The explanation's figures: saliency overlays, filter patterns and the feature PCA."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from covidct.io.atomic import pyplot, save_figure

if TYPE_CHECKING:
    import pandas as pd


def _save(fig, path: Path) -> None:
    save_figure(fig, path, dpi=110)


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

    plt = pyplot()

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
    plt = pyplot()
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


def plot_feature_pca(path: Path, coords: pd.DataFrame, ratio: Sequence[float]) -> None:
    plt = pyplot()
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
