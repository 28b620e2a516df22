"""The threshold lung mask: classical, no weights.

On a working grid of about 2 x 2 x 2.5 mm: the body, an Otsu threshold inside it, the trachea and
main bronchi tracked and cut out, the two lungs kept (split when merged), holes filled, a 3-D
closing, the shallow costal bays filled (dense lesions on the pleura) and, with ``lesion_fill``
(off by default), the dense lesions of each lung's cavity added
(:mod:`covidct.preprocess.lung_cavity`); then back on the CT
grid, the one-voxel border band decided voxel by voxel by the HU threshold.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
from scipy import ndimage as ndi

from covidct.params import ThresholdParams
from covidct.preprocess.morphology import (
    bbox_slices,
    body_mask,
    closing,
    convex_hull_2d,
    ellipsoid,
    fill_holes_2d,
    struct_2d,
)

RIGHT, LEFT = 1, 2


# --------------------------------------------------------------------------- working grid

def work_factors(spacing, params: ThresholdParams) -> tuple[int, int]:
    """Block sizes (along z, in-plane) that bring ``spacing`` near the working grid."""
    fz = max(1, int(round(params.work_z_mm / float(spacing[0]))))
    fxy = max(1, int(round(params.work_xy_mm / float(min(spacing[1], spacing[2])))))
    return fz, fxy


def _block_mean(block: np.ndarray, fz: int, f: int) -> np.ndarray:
    """Mean over fz x f x f blocks (edge-padded), as float32 (one axis at a time: fast)."""
    z, y, x = block.shape
    pz, py, px = (-z) % fz, (-y) % f, (-x) % f
    b = block
    if pz or py or px:
        b = np.pad(b, ((0, pz), (0, py), (0, px)), mode="edge")
    Z, Y, X = b.shape
    out = b.reshape(Z // fz, fz, Y, X).sum(axis=1, dtype=np.float32)
    out = out.reshape(Z // fz, Y, X // f, f).sum(axis=3)
    out = out.reshape(Z // fz, Y // f, f, X // f).sum(axis=2)
    out *= np.float32(1.0 / (fz * f * f))
    return out


def slab_size(fz: int) -> int:
    """Slices per slab of the slab-wise steps: a multiple of ``fz`` near 16."""
    return fz * max(1, 16 // fz)


def slab_threads() -> int:
    """Threads for the slab-wise steps: ``$OMP_NUM_THREADS`` (what Snakemake gives a job and
    ``covidct predict --threads`` sets), else 1."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


def map_slabs(fn, array: np.ndarray, slab: int) -> list:
    """``[fn(array[z:z + slab], z) for each slab]``, on :func:`slab_threads` threads (numpy
    releases the GIL in the per-slab work)."""
    starts = range(0, len(array), slab)
    threads = min(slab_threads(), len(starts))
    if threads <= 1:
        return [fn(array[z:z + slab], z) for z in starts]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda z: fn(array[z:z + slab], z), starts))


def read_ct(ct) -> np.ndarray:
    """The whole CT in memory (a zarr array is read once, chunk by chunk; numpy is not copied),
    so that downsampling and the full-resolution refinement share one read."""
    return ct if isinstance(ct, np.ndarray) else np.asarray(ct[...])


def downsample(ct: np.ndarray, fz: int, f: int) -> np.ndarray:
    """Block-mean downsampling of the CT, slab by slab (``fz`` x ``f`` x ``f`` blocks)."""
    # every slab but the last is a multiple of fz slices, so edge padding only acts at the end
    parts = map_slabs(lambda block, z: _block_mean(block, fz, f), ct, slab_size(fz))
    return np.concatenate(parts, axis=0)


IN_BAND, INSIDE = 1, 2


def _refine_block(ct_block, z0, code, fz, f, threshold):
    """Full-resolution mask of the slab starting at slice ``z0``: inside from the working grid,
    the band decided by HU."""
    nz, ny, nx = ct_block.shape
    zi = np.minimum((np.arange(z0, z0 + nz)) // fz, code.shape[0] - 1)
    yi = np.minimum(np.arange(ny) // f, code.shape[1] - 1)
    c = np.repeat(code[zi][:, yi], f, axis=2)[:, :, :nx]     # code has ceil(nx / f) columns
    # integer HU: x < t  <=>  x < ceil(t); comparing in the CT's own dtype avoids a float copy
    if np.issubdtype(ct_block.dtype, np.integer):
        air = ct_block < ct_block.dtype.type(math.ceil(threshold))
    else:
        air = ct_block < threshold
    c += air.view(np.uint8)        # INSIDE (2) stays >= 2; IN_BAND (1) reaches 2 only where air
    return (c >= INSIDE).view(np.uint8)


def upsample_refine(ct: np.ndarray, lung: np.ndarray, fz: int, f: int,
                    threshold: float, solid: np.ndarray | None = None) -> np.ndarray:
    """Bring a working-grid lung mask back to the CT grid.

    Working-grid voxels deep inside the mask (eroded by one voxel) are lung, and so are the
    ``solid`` ones (the lesion fill: lung that is not air); those outside the mask dilated by
    one voxel are not; the band between is decided voxel by voxel at full resolution by the HU
    threshold (so the lung's border against air is as sharp as the CT).
    """
    if fz == 1 and f == 1:
        return lung.astype(np.uint8)
    st = ndi.generate_binary_structure(3, 1)
    inner = ndi.binary_erosion(lung, structure=st)
    if solid is not None:
        inner |= solid
    outer = ndi.binary_dilation(lung, structure=st)
    code = np.where(inner, INSIDE, np.where(outer, IN_BAND, 0)).astype(np.uint8)
    threshold = float(threshold)
    mask = np.empty(ct.shape, np.uint8)

    def refine(block, z):
        mask[z:z + len(block)] = _refine_block(block, z, code, fz, f, threshold)

    map_slabs(refine, ct, slab_size(fz))
    return mask


def find_trachea_seed(air: np.ndarray, body: np.ndarray, spacing, search_mm: float = 60.0):
    """Boolean seed (one in-plane blob) of the trachea in the top slices, or None.

    The trachea is the largest air blob of 40-800 mm^2 whose centre lies within 15% of the
    body width from the body's centre line, searched from the top slice down ``search_mm``.
    """
    nz = air.shape[0]
    px_area = float(spacing[1] * spacing[2])
    n_search = max(1, int(round(search_mm / float(spacing[0]))))
    for z in range(nz - 1, max(-1, nz - 1 - n_search), -1):
        if not body[z].any():
            continue
        xs = np.nonzero(body[z].any(axis=0))[0]
        cx, width = 0.5 * (xs[0] + xs[-1]), xs[-1] - xs[0] + 1
        ys = np.nonzero(body[z].any(axis=1))[0]
        lab, n = ndi.label(air[z])
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        areas = ndi.sum(np.ones_like(lab), lab, idx) * px_area
        cents = ndi.center_of_mass(np.ones_like(lab), lab, idx)
        best, best_area = None, 0.0
        for i, a, (cyy, cxx) in zip(idx, areas, cents):
            if not (40.0 <= a <= 800.0):
                continue
            if abs(cxx - cx) > 0.15 * width:
                continue
            if not (ys[0] <= cyy <= ys[-1]):
                continue
            if a > best_area:
                best, best_area = i, a
        if best is not None:
            seed = np.zeros_like(air, bool)
            seed[z] = lab == best
            return seed
    return None


def track_airway(air: np.ndarray, seed: np.ndarray, spacing, params: ThresholdParams) -> np.ndarray:
    """Follow the trachea and main bronchi down from ``seed``, slice by slice.

    In each slice the airway is the set of in-plane air blobs that overlap the airway of the slice
    above (dilated by one pixel, for oblique bronchi) and are no larger than ``airway_area_factor``
    times the tracheal area; a larger blob is lung that the bronchus has entered, where that
    branch ends. Works at any resolution (no strict HU limit, so partial volume does not matter).
    """
    airway = np.zeros_like(air, bool)
    z = int(np.nonzero(seed.any(axis=(1, 2)))[0][0])
    prev = seed[z]
    airway[z] = prev
    ref_area = float(prev.sum())
    max_slices = int(round(params.airway_max_mm / float(spacing[0])))
    grow = ndi.generate_binary_structure(2, 2)
    for zz in range(z - 1, max(-1, z - 1 - max_slices), -1):
        lab, n = ndi.label(air[zz], structure=grow)
        if n == 0:
            break
        near = ndi.binary_dilation(prev, structure=grow)
        ids = np.unique(lab[near & (lab > 0)])
        if ids.size == 0:
            break
        areas = ndi.sum(np.ones_like(lab), lab, ids)
        keep = ids[areas <= params.airway_area_factor * ref_area]
        if keep.size == 0:
            break
        prev = np.isin(lab, keep)
        airway[zz] = prev
    return airway


def otsu_threshold(hu: np.ndarray, body: np.ndarray, lo: float, hi: float) -> float:
    """Otsu's threshold of the HU values inside the body, clamped to [lo, hi]."""
    from skimage.filters import threshold_otsu

    values = hu[body]
    if values.size > 2_000_000:
        values = values[:: values.size // 1_000_000]
    values = np.clip(values, -1024, 400)
    if values.size == 0 or values.min() == values.max():
        return float(np.clip(-320.0, lo, hi))
    return float(np.clip(threshold_otsu(values, nbins=512), lo, hi))


def split_lungs(comp: np.ndarray, body: np.ndarray, spacing, max_erosions: int = 6) -> np.ndarray:
    """Split one merged two-lung component into labels RIGHT/LEFT (erosion first, midline last)."""
    box = bbox_slices(comp, (1, 1, 1))
    labels = np.zeros(comp.shape, np.uint8)
    labels[box] = _split_lungs(comp[box], body[box], spacing, max_erosions)
    return labels


def _split_lungs(comp, body, spacing, max_erosions):
    total = comp.sum()
    eroded = comp.copy()
    st = struct_2d(1)
    for k in range(1, max_erosions + 1):
        eroded = ndi.binary_erosion(eroded, structure=st)
        lab, n = ndi.label(eroded)
        if n < 2:
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        order = np.argsort(sizes)[::-1]
        a, b = order[0], order[1]
        if sizes[b] < 0.1 * total:
            continue
        labels = (np.where(lab == a, 1, 0) + np.where(lab == b, 2, 0)).astype(np.uint8)
        # grow both seeds back inside the component (geodesic, in-plane like the erosion)
        for _ in range(k + 1):
            free = comp & (labels == 0)
            if not free.any():
                break
            grown = ndi.grey_dilation(labels, footprint=st)
            labels[free] = grown[free]
        rest = comp & (labels == 0)
        if rest.any():   # parts cut off by the erosion (small islands): nearest seed
            _, (iz, iy, ix) = ndi.distance_transform_edt(labels == 0, sampling=spacing,
                                                         return_indices=True)
            labels[rest] = labels[iz[rest], iy[rest], ix[rest]]
        xa = np.nonzero(labels == 1)[2].mean()
        xb = np.nonzero(labels == 2)[2].mean()
        if xa > xb:  # RIGHT has the lower x
            labels = np.where(labels == 1, 2, np.where(labels == 2, 1, 0)).astype(np.uint8)
        return labels
    # fallback: cut along the body's centre line, slice by slice
    labels = np.zeros(comp.shape, np.uint8)
    xs = np.arange(comp.shape[2])[None, None, :]
    for z in np.nonzero(comp.any(axis=(1, 2)))[0]:
        bx = np.nonzero(body[z].any(axis=0))[0]
        cx = 0.5 * (bx[0] + bx[-1]) if bx.size else comp.shape[2] / 2
        labels[z] = np.where(comp[z], np.where(xs[0] < cx, RIGHT, LEFT), 0)
    return labels


def select_lungs(
    cand: np.ndarray, body: np.ndarray, spacing, params: ThresholdParams
) -> np.ndarray:
    """Label map RIGHT/LEFT of the two lungs among the air components ``cand``."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    lab, n = ndi.label(cand)
    out = np.zeros(cand.shape, np.uint8)
    if n == 0:
        return out
    sizes = np.bincount(lab.ravel()) * voxel_ml
    sizes[0] = 0
    # short scans (a few slices) hold less lung: the floor is at most 5% of the body volume
    floor = min(params.min_lung_ml, 0.05 * float(body.sum()) * voxel_ml)
    order = [i for i in np.argsort(sizes)[::-1] if sizes[i] >= floor]
    if not order:
        return out
    first = lab == order[0]
    # the body's centre line (mean over the slices of the largest component)
    zs = np.nonzero(first.any(axis=(1, 2)))[0]
    bx = np.nonzero(body[zs].any(axis=(0, 1)))[0]
    cx = 0.5 * (bx[0] + bx[-1])
    x_first = np.nonzero(first)[2]
    right_frac = float(np.mean(x_first < cx))
    if 0.2 < right_frac < 0.8:   # both sides: a merged pair
        return split_lungs(first, body, spacing)
    side_first = RIGHT if right_frac >= 0.5 else LEFT
    out[first] = side_first
    z_lo, z_hi = zs[0], zs[-1]
    for i in order[1:]:
        comp = lab == i
        if sizes[i] < 0.1 * sizes[order[0]]:
            break
        czs = np.nonzero(comp.any(axis=(1, 2)))[0]
        overlap = min(czs[-1], z_hi) - max(czs[0], z_lo) + 1
        if overlap < 0.3 * (czs[-1] - czs[0] + 1):
            continue
        side = RIGHT if np.mean(np.nonzero(comp)[2] < cx) >= 0.5 else LEFT
        if side != side_first:
            out[comp] = side
            break
    return out


def _lateral_half(side: np.ndarray, which: int) -> np.ndarray:
    """Per slice, the x-half of a lung's extent away from the midline (the costal side)."""
    nx = side.shape[2]
    cols = side.any(axis=1)                                   # (z, x)
    has = cols.any(axis=1)
    first = np.where(has, cols.argmax(axis=1), 0)
    last = np.where(has, nx - 1 - cols[:, ::-1].argmax(axis=1), 0)
    mid = 0.5 * (first + last)
    xs = np.arange(nx)[None, None, :]
    lateral = xs < mid[:, None, None] if which == RIGHT else xs > mid[:, None, None]
    return lateral & has[:, None, None]


def _lung_within(side: np.ndarray, n: int, below: bool) -> np.ndarray:
    """True where ``side`` has a voxel in one of the ``n`` slices below (or above) in z."""
    c = np.concatenate([np.zeros((1,) + side.shape[1:], np.int32),
                        np.cumsum(side, axis=0, dtype=np.int32)])         # c[k] = sum side[:k]
    z = np.arange(side.shape[0])
    if below:   # slices z-n .. z-1
        hi, lo = z, np.maximum(z - n, 0)
    else:       # slices z+1 .. z+n
        hi, lo = np.minimum(z + 1 + n, side.shape[0]), np.minimum(z + 1, side.shape[0])
    return (c[hi] - c[lo]) > 0


def pleural_fill(side: np.ndarray, which: int, spacing, params: ThresholdParams) -> np.ndarray:
    """Fill shallow bays on the costal side of one lung (dense lesions on the pleura).

    Per slice, a bay is a connected part of (convex hull of the lung) minus the lung, on the
    lateral half of the lung. It is filled when (a) it reaches between ``2 px`` and
    ``pleural_depth_mm`` deep from the lung (shallower ones are pixel steps of the hull) and
    (b) most of it has lung both in the slices above and below it within ``pleural_depth_mm``
    (a lesion is enclosed by lung in z; the liver/spleen under the diaphragm dome is not).
    The mediastinum, hilum and heart lie on the medial half and are never added.
    """
    if params.pleural_depth_mm <= 0 or not side.any():
        return side
    lateral = _lateral_half(side, which)
    hull = np.zeros_like(side)
    for z in np.nonzero(side.any(axis=(1, 2)))[0]:
        hull[z] = convex_hull_2d(side[z])
    bay = hull & ~side & lateral
    if not bay.any():
        return side
    lab, n = ndi.label(bay, structure=struct_2d(2))
    idx = np.arange(1, n + 1)
    depth = ndi.distance_transform_edt(~side, sampling=(1e6, spacing[1], spacing[2]))
    deepest = np.asarray(ndi.maximum(depth, lab, idx))
    nz = max(1, int(round(params.pleural_depth_mm / float(spacing[0]))))
    enclosed = _lung_within(side, nz, True) & _lung_within(side, nz, False)
    frac = np.asarray(ndi.mean(enclosed, lab, idx))
    min_depth = 2.0 * max(spacing[1], spacing[2])
    ok = np.zeros(n + 1, bool)
    ok[1:] = (deepest >= min_depth) & (deepest <= params.pleural_depth_mm) & (frac >= 0.5)
    return side | ok[lab]


def threshold_lung_mask(ct, spacing, params: ThresholdParams | None = None):
    """Lung mask of a CT (z, y, x HU; numpy or zarr array) with the threshold method.

    Returns ``(mask uint8 same shape, info dict)``; info holds the per-side volumes (ml), the
    working grid, the airway threshold used and the step timings.
    """
    p = params or ThresholdParams()
    spacing = tuple(float(s) for s in spacing)
    timings = {}
    t0 = time.perf_counter()
    fz, f = work_factors(spacing, p)
    ct = read_ct(ct)
    timings["read_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    hu = downsample(ct, fz, f)
    wsp = (spacing[0] * fz, spacing[1] * f, spacing[2] * f)
    timings["downsample_s"] = time.perf_counter() - t

    t = time.perf_counter()
    body = body_mask(hu, p.body_hu)
    threshold = p.threshold if p.threshold is not None else otsu_threshold(hu, body, *p.otsu_range)
    air = (hu < threshold) & body
    seed = find_trachea_seed(air, body, wsp, p.airway_search_mm)
    airway = np.zeros_like(air) if seed is None else track_airway(air, seed, wsp, p)
    airway_cut = (
        ndi.binary_dilation(airway, structure=struct_2d(2)) & air if airway.any() else airway
    )
    sides = select_lungs(air & ~airway_cut, body, wsp, p)
    timings["lungs_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ball = ellipsoid(p.close_mm, wsp)
    margin = tuple(k // 2 + 1 for k in ball.shape)
    lung = np.zeros(air.shape, bool)
    for s in (RIGHT, LEFT):
        full = sides == s
        if not full.any():
            continue
        box = bbox_slices(full, margin)
        side = fill_holes_2d(full[box])
        side = closing(side, ball)
        side = pleural_fill(side, s, wsp, p)
        side = fill_holes_2d(side)
        lung[box] |= side
    lung &= body
    lung &= ~airway_cut
    timings["fill_close_s"] = time.perf_counter() - t

    t = time.perf_counter()
    fill = None
    if p.lesion_fill:
        from covidct.preprocess.lung_cavity import pathology_fill

        labels = np.where(lung, sides, 0).astype(np.uint8)
        fill = (pathology_fill(hu, labels, body, wsp, threshold, airway=airway_cut) > 0) \
            & ~airway_cut
        lung |= fill
    timings["lesion_fill_s"] = time.perf_counter() - t

    t = time.perf_counter()
    mask = upsample_refine(ct, lung, fz, f, threshold, solid=fill)
    timings["upsample_s"] = time.perf_counter() - t

    voxel_ml = float(np.prod(spacing)) / 1000.0
    wvox_ml = float(np.prod(wsp)) / 1000.0
    right_frac = (sides == RIGHT).sum() / max(1, (sides > 0).sum())
    total_ml = float(mask.sum() * voxel_ml)
    info = {
        "lung_volume_ml": round(total_ml, 1),
        "right_lung_ml": round(float(((sides == RIGHT) & lung).sum() * wvox_ml), 1),
        "left_lung_ml": round(float(((sides == LEFT) & lung).sum() * wvox_ml), 1),
        "n_lungs": int(sum(bool((sides == s).any()) for s in (RIGHT, LEFT))),
        "right_fraction": round(float(right_frac), 3),
        "threshold_hu": round(float(threshold), 1),
        "airway_found": seed is not None,
        "airway_ml": round(float(airway.sum() * wvox_ml), 1),
        "body_volume_ml": round(float(body.sum() * wvox_ml), 1),
        "work_grid": {"factors_zyx": [fz, f, f], "spacing_mm": [round(s, 4) for s in wsp]},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    return mask, info
