"""``covidct roi``: ``ct.zarr`` + ``lung.zarr`` -> ``roi.zarr``, the network's float16 input.

The 3-D box of the lung mask (end slices under 3% of the largest slice's lung area dropped),
the non-lung suppression (clip at the box's 95th percentile; voxels outside the lung clamped to
lung mean +/- 4 sd), the z-score, and the cubic resize to the network size (optionally
anti-aliased). A failed segmentation is an error naming the patient, or with ``allow_fallback``
the body's box, clip only, recorded as ``fallback``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from covidct.errors import CovidctError
from covidct.params import RoiParams, add_options, from_args
from covidct.preprocess.resample import resize_cubic, resize_nearest

log = logging.getLogger(__name__)

STEP = "roi"


class RoiRejected(CovidctError):
    """The lung mask gives no usable ROI (``reason`` says why)."""

    def __init__(self, reason: str, **kwargs):
        self.reason = reason
        super().__init__(reason, **kwargs)


class SegmentationFailed(CovidctError):
    """The lung mask is implausible or gives no usable box (and no fallback was allowed)."""


# --------------------------------------------------------------------------- pure functions


def slice_areas(mask: np.ndarray) -> np.ndarray:
    """Lung pixels per axial slice."""
    m = np.asarray(mask)
    return np.count_nonzero(m.reshape(m.shape[0], -1), axis=1)


def passing_slices(areas: np.ndarray, min_area_fraction: float, slice_rule: str) -> np.ndarray:
    """Indices of the slices the box spans by ``slice_rule``, from each slice's lung area.

    A slice passes when its area is at least ``min_area_fraction`` of the largest slice's.
    ``ends``: the first to the last passing slice. ``neighbours`` (the authors'): a slice counts
    only if it and both its neighbours pass (an end slice: it and its one neighbour); the box
    spans the first to the last slice that counts.
    """
    ok = (areas > 0) & (areas >= min_area_fraction * areas.max())
    if slice_rule == "neighbours":
        padded = np.concatenate([ok[:1], ok, ok[-1:]])
        ok = ok & padded[:-2] & padded[2:]
        if len(ok) == 1:
            ok[:] = False      # a single slice has no neighbour to agree with
    elif slice_rule != "ends":
        raise ValueError(f"unknown slice_rule {slice_rule!r} (ends or neighbours)")
    return np.nonzero(ok)[0]


def lung_bbox(mask: np.ndarray, min_area_fraction: float = RoiParams.min_area_fraction,
              min_slices: int = RoiParams.min_slices,
              min_pixels: int = RoiParams.min_pixels, *,
              slice_rule: str = RoiParams.slice_rule, plane_box: str = RoiParams.plane_box,
              drop_scan_ends: bool = RoiParams.drop_scan_ends) -> tuple[int, ...]:
    """Bounding box ``(z0, z1, y0, y1, x0, x1)`` of a lung mask, half-open (python slices).

    The slices are those of :func:`passing_slices` (by default: end slices whose lung area is
    under ``min_area_fraction`` of the largest slice's are dropped, only at the ends). The
    in-plane box is that of the mask over the kept slices (``plane_box: kept_slices``) or over
    the whole mask (``whole_mask``). ``drop_scan_ends`` leaves the scan's first and last slice
    out of everything. Raises :class:`RoiRejected` for an empty mask or a box of fewer than
    ``min_slices`` slices or ``min_pixels`` pixels on either in-plane side.
    """
    lo = 1 if drop_scan_ends else 0
    scan = np.asarray(mask)[lo:len(mask) - lo]
    areas = slice_areas(scan)
    if areas.max(initial=0) == 0:
        raise RoiRejected("empty lung mask")
    keep = passing_slices(areas, min_area_fraction, slice_rule)
    if len(keep) == 0:
        raise RoiRejected("no slice where it and both neighbours pass the area rule")
    z0, z1 = int(keep[0]), int(keep[-1]) + 1
    over = scan[z0:z1] if plane_box == "kept_slices" else scan
    plane = np.asarray(over, bool).any(axis=0)
    ys, xs = np.nonzero(plane.any(axis=1))[0], np.nonzero(plane.any(axis=0))[0]
    y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
    if z1 - z0 < min_slices:
        raise RoiRejected(f"lung box has {z1 - z0} slices (< {min_slices})")
    if y1 - y0 < min_pixels or x1 - x0 < min_pixels:
        raise RoiRejected(f"lung box is {y1 - y0} x {x1 - x0} px in-plane (< {min_pixels})")
    return z0 + lo, z1 + lo, y0, y1, x0, x1


def box_percentile(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (its default linear method), by partial sorting (fast)."""
    v = np.asarray(values).ravel()
    if v.size == 0:
        raise ValueError("percentile of an empty box")
    rank = (v.size - 1) * (float(q) / 100.0)
    k = int(np.floor(rank))
    k1 = min(k + 1, v.size - 1)
    part = np.partition(v, [k, k1] if k1 != k else [k])
    a, b = float(part[k]), float(part[k1])
    return a + (rank - k) * (b - a)


def masked_mean_std(values: np.ndarray, inside: np.ndarray, slab: int = 16) -> tuple[float, float]:
    """Mean and population sd of the float32 ``values`` where ``inside``, in float64.

    Gathered slab by slab along the first axis (no full-size copy of the lung's voxels); the
    sd is of the float32 deviations from the float32 mean, as ``np.std`` of a float32 array.
    """
    n = int(np.count_nonzero(inside))
    total = sum(float(values[z:z + slab][inside[z:z + slab]].sum(dtype=np.float64))
                for z in range(0, len(values), slab))
    mean = total / n
    m32 = np.float32(mean)
    squares = 0.0
    for z in range(0, len(values), slab):
        d = values[z:z + slab][inside[z:z + slab]] - m32
        squares += float(np.square(d, out=d).sum(dtype=np.float64))
    return mean, float(np.sqrt(squares / n))


def suppress_non_lung(ct_box: np.ndarray, mask_box: np.ndarray | None,
                      percentile: float = RoiParams.percentile,
                      n_std: float = RoiParams.n_std) -> tuple[np.ndarray, dict]:
    """Clip at the box's ``percentile``; clamp voxels outside the lung to mean +/- ``n_std`` sd.

    Returns ``(float32 array, limits)``; limits: ``clip_hu``, ``lung_mean_hu``, ``lung_std_hu``,
    ``clamp_hu`` [low, high] (mean and sd of the clipped intensities inside the mask). With
    ``mask_box`` None (or empty) only the clip is applied and the lung statistics are None.
    """
    clip = box_percentile(ct_box, percentile)
    box = np.array(ct_box, dtype=np.float32)           # a copy: the caller's array is untouched
    np.minimum(box, np.float32(clip), out=box)
    limits = {"clip_hu": clip, "percentile": float(percentile), "n_std": float(n_std),
              "lung_mean_hu": None, "lung_std_hu": None, "clamp_hu": None}
    if mask_box is None:
        return box, limits
    inside = np.asarray(mask_box, bool)
    if not inside.any():
        return box, limits
    mean, std = masked_mean_std(box, inside)
    lo, hi = mean - n_std * std, mean + n_std * std
    np.clip(box, np.float32(lo), np.float32(hi), out=box, where=~inside)
    limits.update(lung_mean_hu=mean, lung_std_hu=std, clamp_hu=[lo, hi])
    return box, limits


def zscore_stats(array: np.ndarray) -> tuple[float, float]:
    """Mean and population sd of an array (an sd of 0 becomes 1).

    Fast on large float32 boxes: numpy's pairwise float32 summation, no float64 copy (relative
    error ~1e-6, far below float16's 1e-3).
    """
    a = np.asarray(array, dtype=np.float32).ravel()
    n = a.size
    mean = float(a.sum(dtype=np.float32)) / n
    d = a - np.float32(mean)
    mean += float(d.sum(dtype=np.float32)) / n           # one refinement step
    d -= np.float32(float(d.sum(dtype=np.float32)) / n)
    np.square(d, out=d)
    sd = float(np.sqrt(max(0.0, float(d.sum(dtype=np.float32)) / n)))
    if not np.isfinite(sd) or sd <= 1e-12:
        sd = 1.0
    return mean, sd


def resize_and_zscore(box: np.ndarray, size, p: RoiParams) -> tuple[np.ndarray, float, float]:
    """The suppressed box resized to ``size`` and z-scored: ``(float16 ROI, mean, sd)``.

    ``p.clip_resized`` clips the resized array to the box's minimum and maximum (the cubic
    spline overshoots at edges); ``p.zscore`` takes the mean and sd of the box (``box``) or of
    the resized array (``resized``, the authors').
    """
    if p.zscore == "box":
        # z-scoring commutes with the (linear, constant-preserving) spline resize and with a
        # clip at the box's own limits, so it is applied to the small resized array
        mean, sd = zscore_stats(box)
    limits = (np.float32(box.min()), np.float32(box.max())) if p.clip_resized else None
    roi = resize_cubic(box, size, antialias=p.antialias)
    if limits is not None:
        np.clip(roi, *limits, out=roi)
    if p.zscore == "resized":
        mean, sd = zscore_stats(roi)
    return ((roi - np.float32(mean)) / np.float32(sd)).astype(np.float16), mean, sd


def as_bool_mask(mask) -> np.ndarray:
    """``mask != 0`` as a boolean array; a 0/1 uint8 mask (as stored) is viewed, not copied."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    if mask.dtype == np.uint8 and mask.size and mask.max() <= 1:
        return mask.view(bool)
    return mask != 0


def crop_to_box(array, bbox) -> np.ndarray:
    """``array[z0:z1, y0:y1, x0:x1]`` for ``bbox`` = (z0, z1, y0, y1, x0, x1) as a numpy array
    (a Zarr array reads only the box); ValueError if the box does not lie inside ``array``."""
    z0, z1, y0, y1, x0, x1 = (int(v) for v in bbox)
    shape = array.shape
    if z0 < 0 or y0 < 0 or x0 < 0 or z1 > shape[0] or y1 > shape[1] or x1 > shape[2]:
        raise ValueError(f"bounding box {tuple(bbox)} lies outside the array {tuple(shape)}")
    return np.asarray(array[z0:z1, y0:y1, x0:x1])


def lung_in_roi(mask: np.ndarray, bbox, size) -> np.ndarray:
    """The lung mask on the ROI's grid (uint8 0/1): cropped to ``bbox``, nearest-resized to
    ``size``. Stored as the ``lung`` label of roi.zarr; augmentation and saliency use it."""
    crop = crop_to_box(mask, bbox) != 0
    return resize_nearest(crop, [int(s) for s in size]).astype(np.uint8)


def body_bbox(ct: np.ndarray, body_hu: float = -500.0):
    """Bounding box (z0, z1, y0, y1, x0, x1) of the body: largest component above ``body_hu``."""
    from covidct.preprocess.morphology import largest_component

    body = largest_component(np.asarray(ct) > body_hu)
    if not body.any():
        raise RoiRejected(f"no body above {body_hu:g} HU")
    out = []
    for axis in range(3):
        other = tuple(i for i in range(3) if i != axis)
        idx = np.nonzero(body.any(axis=other))[0]
        out += [int(idx[0]), int(idx[-1]) + 1]
    return tuple(out)


def check_lung_mask(lung_ml: float, body_ml: float, *, min_ml: float = RoiParams.min_lung_ml,
                    max_ml: float = RoiParams.max_lung_ml,
                    max_body_fraction: float = RoiParams.max_body_fraction) -> str | None:
    """Why a lung mask is implausible (a failed segmentation), or None when it is fine."""
    if lung_ml <= 0:
        return "empty lung mask"
    if lung_ml < min_ml:
        return f"lung mask too small ({lung_ml:.0f} ml < {min_ml:g} ml)"
    if lung_ml > max_ml:
        return f"lung mask too large ({lung_ml:.0f} ml > {max_ml:g} ml)"
    if body_ml > 0 and lung_ml > max_body_fraction * body_ml:
        return (
            f"lung mask fills the body ({lung_ml:.0f} ml = "
            f"{100 * lung_ml / body_ml:.0f}% of {body_ml:.0f} ml > {100 * max_body_fraction:g}%)"
        )
    return None


# --------------------------------------------------------------------------- the stage

def _body_on_grid(ct_array, spacing, target_mm: float = 4.0, body_hu: float = -500.0):
    """Body mask (holes filled) on a strided grid; returns (mask, strides)."""
    from covidct.preprocess.morphology import body_mask

    strides = tuple(max(1, int(round(target_mm / float(s)))) for s in spacing)
    small = np.asarray(ct_array[::strides[0], ::strides[1], ::strides[2]])
    return body_mask(small.astype(np.float32), body_hu), strides


def roi_spacing(spacing, bbox, size) -> tuple[float, float, float]:
    """Spacing (z, y, x) of the resized ROI voxels (corner-aligned resize of the ``bbox`` box)."""
    z0, z1, y0, y1, x0, x1 = bbox
    n = np.array([z1 - z0, y1 - y0, x1 - x0], float)
    m = np.array(size, float)
    sp = np.asarray(spacing, float)
    # zoom maps output index i to input index i * (n - 1) / (m - 1): voxel centres at the ends
    new_sp = sp * np.where(m > 1, (n - 1) / np.maximum(m - 1, 1), n)
    new_sp = np.where(new_sp > 0, new_sp, sp)
    return tuple(float(s) for s in new_sp)


def _roi_geometry(img, bbox, size):
    """Spacing (z, y, x) and origin (x, y, z) of the resized ROI voxels (corner-aligned resize)."""
    z0, _, y0, _, x0, _ = bbox
    sp = np.asarray(img.spacing, float)
    start_zyx = np.array([z0, y0, x0], float)
    d = np.asarray(img.direction, float).reshape(3, 3)
    origin = np.asarray(img.origin, float) + d @ (start_zyx[::-1] * sp[::-1])
    return roi_spacing(img.spacing, bbox, size), tuple(float(o) for o in origin)


def roi_from_arrays(ct, mask, spacing, params: RoiParams = RoiParams(), *,
                    body_ml: float | None = None,
                    patient: str | None = None) -> tuple[np.ndarray, dict]:
    """The lung ROI of a CT and its lung mask: ``(roi float16 of shape params.size, attrs)``.

    The array part of the ``roi`` stage (the stage and ``covidct predict`` share it). ``ct`` is
    the (z, y, x) HU array, numpy or a lazy zarr array (only the box is read); ``mask`` the lung
    mask on the same grid (numpy, nonzero = lung); ``spacing`` (z, y, x) mm. ``body_ml`` is the
    body volume the threshold segmenter records; None = measured here on a 4-mm grid.

    Raises :class:`SegmentationFailed` for an implausible mask or a rejected box (unless
    ``params.allow_fallback``: then the body's bounding box is used with the clip only), and
    :class:`RoiRejected` when even the fallback finds no body. ``attrs`` holds the box, the
    suppression limits, the z-score, sizes, volumes, fallback and reason, and the rules.
    """
    p = params
    size = tuple(int(s) for s in p.size)
    spacing = tuple(float(s) for s in spacing)
    if tuple(mask.shape) != tuple(ct.shape):
        raise CovidctError(f"lung mask shape {tuple(mask.shape)} != CT shape {tuple(ct.shape)}",
                           step=STEP, patient=patient)
    mask = as_bool_mask(mask)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    lung_ml = float(np.count_nonzero(mask)) * voxel_ml
    if body_ml is None:
        body, strides = _body_on_grid(ct, spacing)
        body_ml = float(body.sum()) * voxel_ml * float(np.prod(strides))
        del body

    reason = check_lung_mask(lung_ml, body_ml, min_ml=p.min_lung_ml, max_ml=p.max_lung_ml,
                             max_body_fraction=p.max_body_fraction)
    bbox = None
    if reason is None:
        try:
            bbox = lung_bbox(mask, p.min_area_fraction, p.min_slices, p.min_pixels,
                             slice_rule=p.slice_rule, plane_box=p.plane_box,
                             drop_scan_ends=p.drop_scan_ends)
        except RoiRejected as err:
            reason = err.reason
    fallback = reason is not None
    if fallback:
        if not p.allow_fallback:
            raise SegmentationFailed(f"segmentation failed: {reason} (use --allow-fallback to crop "
                                     f"the body instead)", step=STEP, patient=patient)
        log.warning(
            "patient %s: %s; falling back to the body's bounding box", patient or "-", reason
        )
        bbox = body_bbox(np.asarray(ct[...]))   # the full-resolution body (a rare path)
    ct_box = crop_to_box(ct, bbox)
    mask_box = None if fallback else crop_to_box(mask, bbox)
    from covidct.preprocess.qc import risk_of_loss

    risk = ({"dense_outside_ml": None, "risk_slice": None} if fallback
            else risk_of_loss(ct_box, mask_box, spacing, z0=bbox[0]))
    box, limits = suppress_non_lung(ct_box, mask_box, p.percentile, p.n_std)
    del ct_box
    roi, mean, sd = resize_and_zscore(box, size, p)
    del box
    z0, z1, y0, y1, x0, x1 = bbox
    attrs = {
        "bbox": [int(v) for v in bbox],
        "bbox_convention": "z0,z1,y0,y1,x0,x1 half-open voxel indices of ct.zarr",
        "box_shape": [z1 - z0, y1 - y0, x1 - x0],
        "clip_hu": limits["clip_hu"], "percentile": limits["percentile"], "n_std": limits["n_std"],
        "lung_mean_hu": limits["lung_mean_hu"], "lung_std_hu": limits["lung_std_hu"],
        "clamp_hu": limits["clamp_hu"], "zscore_mean": mean, "zscore_sd": sd,
        "size": list(size), "antialias": bool(p.antialias),
        "roi_spacing_mm": list(roi_spacing(spacing, bbox, size)),
        "ct_spacing_mm": list(spacing),
        "lung_volume_ml": round(lung_ml, 1), "body_volume_ml": round(body_ml, 1),
        **risk,
        "fallback": bool(fallback), "reason": reason,
        "rules": {"min_area_fraction": p.min_area_fraction, "min_slices": p.min_slices,
                  "slice_rule": p.slice_rule, "plane_box": p.plane_box,
                  "drop_scan_ends": p.drop_scan_ends, "clip_resized": p.clip_resized,
                  "zscore": p.zscore,
                  "min_pixels": p.min_pixels, "min_lung_ml": p.min_lung_ml,
                  "max_lung_ml": p.max_lung_ml, "max_body_fraction": p.max_body_fraction},
    }
    return roi, attrs


def make_roi(ct_path, lung_path, out_path, params: RoiParams = RoiParams(), *,
             patient: str | None = None, site: str | None = None, qc_path=None) -> dict:
    """Build ``roi.zarr`` from a CT store and its lung mask; returns the attributes written.

    The arrays are computed by :func:`roi_from_arrays`; this adds the stores, the geometry of
    the ROI voxels, the provenance attributes and the QC picture.
    """
    from covidct.io.stores import open_image, write_image

    ct_path, lung_path, out_path = Path(ct_path), Path(lung_path), Path(out_path)
    size = tuple(int(s) for s in params.size)
    t0 = time.perf_counter()
    ct = open_image(ct_path, what="CT", patient=patient)
    lung_img = open_image(lung_path, what="lung mask", patient=patient)
    patient = patient or ct.attrs.get("patient") or lung_img.attrs.get("patient")
    if tuple(lung_img.array.shape) != tuple(ct.array.shape):
        raise CovidctError(f"lung mask shape {tuple(lung_img.array.shape)} != CT shape "
                           f"{tuple(ct.array.shape)}", step=STEP, patient=patient, path=lung_path)
    mask = as_bool_mask(lung_img.read())
    try:
        roi, core = roi_from_arrays(
            ct.array, mask, ct.spacing, params,
            body_ml=lung_img.attrs.get("body_volume_ml"),   # the threshold method records it
            patient=patient)
    except SegmentationFailed as err:
        err.with_context(patient=patient, path=lung_path)
        raise
    except RoiRejected as err:
        raise CovidctError(f"fallback impossible: {err.reason}", step=STEP, patient=patient,
                           path=ct_path) from None
    bbox, fallback, reason = core["bbox"], core["fallback"], core["reason"]
    spacing, origin = _roi_geometry(ct, bbox, size)
    attrs = {"kind": "lung_roi", "source_ct": ct_path.name, "source_mask": lung_path.name,
             **core, "params": asdict(params)}
    for key in ("patient", "site"):
        for source in (ct.attrs, lung_img.attrs):
            if key in source:
                attrs[key] = source[key]
                break
    if patient:
        attrs["patient"] = patient
    if site:
        attrs["site"] = site
    labels = None if fallback else {"lung": lung_in_roi(mask, bbox, size)}
    write_image(out_path, roi, spacing=spacing, origin=origin, direction=ct.direction,
                attrs=attrs, chunks=roi.shape, name="roi", labels=labels)
    if qc_path:
        from covidct.preprocess.qc import save_qc_png

        save_qc_png(qc_path, ct, mask, bbox, risk_slice=core["risk_slice"],
                    title=f"{patient or ct_path.parent.name}"
                    + (f"  FALLBACK: {reason}" if fallback
                       else f"  lung {core['lung_volume_ml']:.0f} ml, dense outside the mask "
                            f"{core['dense_outside_ml']:.0f} ml"))
    log.info("patient %s: roi bbox %s -> %s, clip %.0f HU%s in %.2f s", patient or "-", list(bbox),
             list(size), core["clip_hu"], " (fallback)" if fallback else "",
             time.perf_counter() - t0)
    return attrs


def add_arguments(parser) -> None:
    parser.add_argument("ct", help="input ct.zarr")
    parser.add_argument("lung", help="input lung.zarr (lung mask)")
    parser.add_argument("out", help="output roi.zarr (float16)")
    parser.add_argument("--patient", default=None, help="patient id (for messages and attributes)")
    parser.add_argument("--site", default=None,
                        help="site of the patient (recorded for the QC summary)")
    parser.add_argument("--qc", default=None, metavar="QC.png", help="write the QC picture here")
    add_options(parser, RoiParams)


def run(args) -> int:
    make_roi(args.ct, args.lung, args.out, from_args(RoiParams, args), patient=args.patient,
             site=args.site, qc_path=args.qc)
    return 0
