"""Quality control: one patient's picture, and ``covidct qc-summary`` over a cohort's ROIs.

The picture shows axial, coronal and sagittal slices through the ROI centre in a lung window,
the lung mask as a contour and the ROI box as a rectangle, each at the physical aspect ratio,
and the axial slice where the mask is most at risk: the most dense tissue inside the lung
cavity but outside the mask (what the non-lung suppression would erase), outlined in orange.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from covidct.errors import CovidctError
from covidct.io.atomic import save_figure, write_csv
from covidct.preprocess.lung_cavity import CavityRules, present_around

log = logging.getLogger(__name__)

LUNG_WINDOW = (-1350.0, 150.0)
# dense tissue: consolidation, masses, dense ground glass (not bone)
DENSE_HU = (-300.0, 200.0)
# the lung cavity: where the mask holds lung in the same column within this far above and below
# (the lesion fill's own reach)
CAVITY_MM = CavityRules.enclose_mm
PANEL_INCHES = 4.5          # at the default 64 dpi: 288 px a panel


def cavity_slices(spacing) -> int:
    """``CAVITY_MM`` in slices of ``spacing``."""
    return max(1, int(round(CAVITY_MM / float(spacing[0]))))


def dense_outside(ct_box: np.ndarray, mask_box: np.ndarray, spacing) -> np.ndarray:
    """Dense tissue inside the lung cavity but outside the mask (boolean, on the box)."""
    n = cavity_slices(spacing)
    dense = (ct_box >= DENSE_HU[0]) & (ct_box < DENSE_HU[1])
    return dense & ~mask_box & present_around(mask_box, n)


def risk_of_loss(ct_box: np.ndarray, mask_box: np.ndarray, spacing, z0: int = 0) -> dict:
    """The dense tissue outside the mask in the lung cavity: its volume (ml) and the CT slice
    holding most of it (``risk_slice``; None when there is none). Counted on every k-th row
    and column, k bringing the pixels near 2 mm."""
    k = max(1, int(2.0 // float(min(spacing[1], spacing[2]))))
    outside = dense_outside(np.asarray(ct_box[:, ::k, ::k]),
                            np.asarray(mask_box[:, ::k, ::k], bool), spacing)
    per_slice = outside.reshape(outside.shape[0], -1).sum(axis=1)
    voxel_ml = float(np.prod(spacing)) * k * k / 1000.0
    return {"dense_outside_ml": round(float(per_slice.sum()) * voxel_ml, 1),
            "risk_slice": int(z0 + per_slice.argmax()) if per_slice.any() else None}


def _orthogonal_planes(arr, yc: int, xc: int, slab: int = 32):
    """The coronal plane ``arr[:, yc, :]`` and sagittal plane ``arr[:, :, xc]``, read together
    slab by slab (a store of one slice per chunk is decompressed once, never whole in memory)."""
    nz, ny, nx = arr.shape
    coronal = np.empty((nz, nx), arr.dtype)
    sagittal = np.empty((nz, ny), arr.dtype)
    for z in range(0, nz, slab):
        block = np.asarray(arr[z:z + slab])
        coronal[z:z + slab] = block[:, yc, :]
        sagittal[z:z + slab] = block[:, :, xc]
    return coronal, sagittal


def _views(ct, mask, bbox):
    """The three (image, mask, rectangle, aspect, name) views through the box centre."""
    z0, z1, y0, y1, x0, x1 = bbox
    zc, yc, xc = (z0 + z1 - 1) // 2, (y0 + y1 - 1) // 2, (x0 + x1 - 1) // 2
    sz, sy, sx = (float(s) for s in ct.spacing)
    axial = np.asarray(ct.array[zc])
    coronal, sagittal = _orthogonal_planes(ct.array, yc, xc)
    # axial: rows y, columns x; coronal/sagittal: rows z (shown head up), columns x / y
    return [
        (axial, mask[zc], (x0, y0, x1 - x0, y1 - y0), sy / sx, f"axial z={zc}", False),
        (coronal, mask[:, yc, :], (x0, z0, x1 - x0, z1 - z0), sz / sx, f"coronal y={yc}", True),
        (sagittal, mask[:, :, xc], (y0, z0, y1 - y0, z1 - z0), sz / sy, f"sagittal x={xc}", True),
    ]


def dense_outside_slice(axial: np.ndarray, mask: np.ndarray, z: int, spacing) -> np.ndarray:
    """:func:`dense_outside` of the one slice ``z`` (``axial`` its HU, ``mask`` the whole lung
    mask): the cavity test reads only the slices within ``CAVITY_MM`` of it."""
    n = cavity_slices(spacing)
    below = np.asarray(mask[max(0, z - n):z], bool).any(axis=0)
    above = np.asarray(mask[z + 1:z + 1 + n], bool).any(axis=0)
    dense = (axial >= DENSE_HU[0]) & (axial < DENSE_HU[1])
    return dense & ~np.asarray(mask[z], bool) & below & above


def _risk_view(ct, mask, bbox, risk_slice):
    """The axial view at the slice most at risk, with the dense tissue outside the mask."""
    z0, z1, y0, y1, x0, x1 = bbox
    sz, sy, sx = (float(s) for s in ct.spacing)
    z = int(risk_slice)
    axial = np.asarray(ct.array[z])
    outside = dense_outside_slice(axial, mask, z, ct.spacing)
    return (axial, mask[z], (x0, y0, x1 - x0, y1 - y0), sy / sx, f"most at risk z={z}", False,
            outside)


def save_qc_png(path, ct, mask: np.ndarray, bbox, *, title: str = "", dpi: int = 64,
                risk_slice: int | None = None) -> Path:
    """Write the QC PNG (matplotlib Agg, 2 x 2 panels of at least 256 px) atomically; ``ct`` is
    a zarrio.Image. With ``risk_slice``, the fourth panel is that axial slice with the dense
    tissue outside the mask (orange); else it stays empty."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    fig = Figure(figsize=(2 * PANEL_INCHES, 2 * PANEL_INCHES), dpi=dpi)
    axes = fig.subplots(2, 2).ravel()
    views = [v + (None,) for v in _views(ct, mask, bbox)]
    if risk_slice is not None:
        views.append(_risk_view(ct, mask, bbox, risk_slice))
    else:
        axes[3].set_title("no dense tissue outside the mask", fontsize=9)
    axes[3].set_axis_off()
    for ax, (img, m, rect, aspect, name, flip, outside) in zip(axes, views):
        origin = "lower" if flip else "upper"
        ax.imshow(img, cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1], aspect=aspect,
                  origin=origin, interpolation="nearest")
        if m.any():
            ax.contour(m.astype(np.uint8), levels=[0.5], colors="lime", linewidths=0.8)
        if outside is not None and outside.any():
            ax.contour(outside.astype(np.uint8), levels=[0.5], colors="orange", linewidths=0.8)
        x, y, w, h = rect
        ax.add_patch(
            Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="red", linewidth=1.0)
        )
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------- qc-summary

SUMMARY_COLUMNS = ("patient", "site", "z0", "z1", "y0", "y1", "x0", "x1", "lung_volume_ml",
                   "dense_outside_ml", "clip_hu", "clamp_low_hu", "clamp_high_hu", "fallback",
                   "reason", "path")


def summary_row(path: Path) -> dict:
    """One roi.zarr's box, lung volume, dense tissue outside the mask, suppression limits and
    fallback."""
    from covidct.io.stores import open_image, store_patient

    attrs = open_image(path, what="ROI").attrs
    if "bbox" not in attrs:
        raise CovidctError("not a roi.zarr (no bbox attribute)", path=path,
                           patient=attrs.get("patient"))
    clamp = attrs.get("clamp_hu") or [None, None]
    z0, z1, y0, y1, x0, x1 = attrs["bbox"]
    return {"patient": store_patient(path, attrs), "site": attrs.get("site", ""),
            "z0": z0, "z1": z1, "y0": y0, "y1": y1, "x0": x0, "x1": x1,
            "lung_volume_ml": attrs.get("lung_volume_ml"),
            "dense_outside_ml": attrs.get("dense_outside_ml"), "clip_hu": attrs.get("clip_hu"),
            "clamp_low_hu": clamp[0], "clamp_high_hu": clamp[1],
            "fallback": int(bool(attrs.get("fallback"))), "reason": attrs.get("reason") or "",
            "path": str(path)}


def qc_summary(roi_paths, out_path):
    """The cohort's QC table (TSV, returned as a DataFrame), one row per roi.zarr."""
    import pandas as pd  # here: the roi stage imports this module for its picture

    rows = [summary_row(Path(p)) for p in roi_paths]
    table = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    for column in ("lung_volume_ml", "dense_outside_ml", "clip_hu", "clamp_low_hu",
                   "clamp_high_hu"):
        table[column] = pd.to_numeric(table[column]).round(2)
    write_csv(out_path, table, sep="\t", lineterminator="\n")
    log.info("qc summary of %d ROI stores (%d fallback) -> %s", len(table),
             int(table["fallback"].sum()), out_path)
    return table


def add_arguments_qc_summary(parser) -> None:
    parser.add_argument("rois", nargs="*", metavar="ROI.zarr", help="roi.zarr stores")
    parser.add_argument("--sheets", nargs="+", default=None, metavar="TSV",
                        help="with --patients: the sheets whose patients' ROIs to gather")
    parser.add_argument("--patients", default=None, metavar="DIR",
                        help="the patients' folder: DIR/{site}/{patient}/roi.zarr of the sheets' "
                             "patients, instead of naming each store")
    parser.add_argument("--out", required=True, help="output TSV (qc_summary.tsv)")


def run_qc_summary(args) -> int:
    from covidct.errors import CovidctError

    rois = list(args.rois)
    if args.patients:
        from covidct.io.sheet import read_sheet
        from covidct.io.stores import stores_for

        if not args.sheets:
            raise CovidctError("--patients needs --sheets (whose patients to gather)")
        rois += stores_for(read_sheet(args.sheets), args.patients, "roi")
    if not rois:
        raise CovidctError("no ROI stores: name them, or give --sheets and --patients")
    qc_summary(rois, args.out)
    return 0
