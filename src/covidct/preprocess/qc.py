"""Quality control: one patient's picture, and ``covidct qc-summary`` over a cohort's ROIs.

The picture shows axial, coronal and sagittal slices through the ROI centre in a lung window,
the lung mask as a contour and the ROI box as a rectangle, each at the physical aspect ratio.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from covidct.errors import CovidctError
from covidct.io.atomic import save_figure, write_csv

log = logging.getLogger(__name__)

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

    fig = Figure(figsize=(9, 3.4), dpi=dpi)
    axes = fig.subplots(1, 3)
    for ax, (img, m, rect, aspect, name, flip) in zip(axes, _views(ct, mask, bbox)):
        origin = "lower" if flip else "upper"
        ax.imshow(img, cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1], aspect=aspect,
                  origin=origin, interpolation="nearest")
        if m.any():
            ax.contour(m.astype(np.uint8), levels=[0.5], colors="lime", linewidths=0.8)
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
                   "clip_hu", "clamp_low_hu", "clamp_high_hu", "fallback", "reason", "path")


def summary_row(path: Path) -> dict:
    """One roi.zarr's box, lung volume, suppression limits and fallback."""
    from covidct.io.stores import open_image, store_patient

    attrs = open_image(path, what="ROI").attrs
    if "bbox" not in attrs:
        raise CovidctError("not a roi.zarr (no bbox attribute)", path=path,
                           patient=attrs.get("patient"))
    clamp = attrs.get("clamp_hu") or [None, None]
    z0, z1, y0, y1, x0, x1 = attrs["bbox"]
    return {"patient": store_patient(path, attrs), "site": attrs.get("site", ""),
            "z0": z0, "z1": z1, "y0": y0, "y1": y1, "x0": x0, "x1": x1,
            "lung_volume_ml": attrs.get("lung_volume_ml"), "clip_hu": attrs.get("clip_hu"),
            "clamp_low_hu": clamp[0], "clamp_high_hu": clamp[1],
            "fallback": int(bool(attrs.get("fallback"))), "reason": attrs.get("reason") or "",
            "path": str(path)}


def qc_summary(roi_paths, out_path) -> pd.DataFrame:
    """The cohort's QC table (TSV), one row per roi.zarr."""
    rows = [summary_row(Path(p)) for p in roi_paths]
    table = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    for column in ("lung_volume_ml", "clip_hu", "clamp_low_hu", "clamp_high_hu"):
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
