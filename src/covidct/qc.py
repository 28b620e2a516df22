"""QC picture of one patient: axial, coronal and sagittal slices through the lung-ROI centre.

The CT is shown in a lung window (level -600, width 1500 HU), the lung mask as a contour and the
ROI box as a rectangle; each view keeps the physical aspect ratio (voxel spacing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LUNG_WINDOW = (-1350.0, 150.0)


def _views(ct, mask, bbox):
    """The three (image, mask, rectangle, aspect, name) views through the box centre."""
    z0, z1, y0, y1, x0, x1 = bbox
    zc, yc, xc = (z0 + z1 - 1) // 2, (y0 + y1 - 1) // 2, (x0 + x1 - 1) // 2
    sz, sy, sx = (float(s) for s in ct.spacing)
    arr = ct.array
    axial = np.asarray(arr[zc])
    coronal = np.asarray(arr[:, yc, :])
    sagittal = np.asarray(arr[:, :, xc])
    # axial: rows y, columns x; coronal/sagittal: rows z (shown head up), columns x / y
    return [
        (axial, mask[zc], (x0, y0, x1 - x0, y1 - y0), sy / sx, f"axial z={zc}", False),
        (coronal, mask[:, yc, :], (x0, z0, x1 - x0, z1 - z0), sz / sx, f"coronal y={yc}", True),
        (sagittal, mask[:, :, xc], (y0, z0, y1 - y0, z1 - z0), sz / sy, f"sagittal x={xc}", True),
    ]


def save_qc_png(path, ct, mask: np.ndarray, bbox, *, title: str = "", dpi: int = 64) -> Path:
    """Write the QC PNG (matplotlib Agg, about 100 kB) atomically; ``ct`` is a zarrio.Image."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from covidct.zarrio import atomic_path

    fig = Figure(figsize=(9, 3.4), dpi=dpi)
    axes = fig.subplots(1, 3)
    for ax, (img, m, rect, aspect, name, flip) in zip(axes, _views(ct, mask, bbox)):
        origin = "lower" if flip else "upper"
        ax.imshow(img, cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1], aspect=aspect,
                  origin=origin, interpolation="nearest")
        if m.any():
            ax.contour(m.astype(np.uint8), levels=[0.5], colors="lime", linewidths=0.8)
        x, y, w, h = rect
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="red", linewidth=1.0))
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
