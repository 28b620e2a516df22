"""Lung segmentation: ``ct.zarr`` (HU, canonical LPS) -> ``lung.zarr`` (uint8, 1 = lung).

Two methods:

``threshold`` (default, needs no weights) - a classical HU-threshold lung mask:

1. slice-wise (dask over the Zarr chunks, read once): block-mean downsampling to a working grid
   of about 2 mm in-plane and 2.5 mm along z (scans already that coarse are used as they are);
2. on the working grid (3-D): body = largest component above ``body_hu`` with its in-plane holes
   filled (this drops the air around the patient and the scanner table); the lung threshold is
   Otsu's threshold of the HU inside the body, clamped to ``otsu_range`` (about -450 HU on real
   scans: halfway between aerated lung and soft tissue, which places the border where the
   partial-volume lung fraction is one half), or ``threshold`` when given; air = below it;
3. trachea and main bronchi: the seed is the largest near-midline air blob (40-800 mm^2) in the
   top slices; it is tracked downwards slice by slice, following every blob that overlaps the
   airway above and is no larger than ``airway_area_factor`` times the tracheal area; a larger
   blob is lung that a bronchus has entered, where that branch ends. The airway is cut out;
4. the two lungs are the largest remaining components (a merged pair is split by erosion, or
   along the body midline when erosion cannot separate them); the right lung is the one at
   lower x (LPS x runs from the patient's right to left);
5. per lung: in-plane hole filling (vessels, enclosed lesions), a 3-D closing with a ball of
   ``close_mm``, then :func:`pleural_fill`: shallow bays (up to ``pleural_depth_mm``) between the
   lung and its per-slice convex hull on the costal (lateral) half, enclosed by lung above and
   below, are filled, so that dense lesions on the pleura stay inside the mask; the airway is
   cut out again;
6. slice-wise (dask): back on the CT grid, working-grid voxels deep inside the mask are lung,
   those beyond it are not, and the one-voxel band between is decided by the HU threshold at
   full resolution (so the border is as sharp as the CT).

Measured: Dice 0.986 against the independent CIP whole-lung mask of COPDGene ct-64 (a plain
-320 HU threshold with the two largest components: 0.973); see tests/test_segment.py.

``fpn`` - the DenseNet121-FPN of the paper, trained by ``covidct train-segmenter``
(:func:`covidct.fpn.predict_mask`, imported only when chosen).

The method, its parameters and the lung volumes are recorded in the store's attributes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from covidct.errors import CovidctError

log = logging.getLogger(__name__)

STEP = "segment"
RIGHT, LEFT = 1, 2


@dataclass(frozen=True)
class ThresholdParams:
    """Parameters of the threshold method (all recorded in lung.zarr's attributes)."""

    threshold: float | None = None   # HU: lung below, tissue above; None = Otsu inside the body
    otsu_range: tuple[float, float] = (-550.0, -300.0)  # the Otsu threshold is clamped to this
    body_hu: float = -500.0          # HU: the body is the largest component above this
    work_xy_mm: float = 2.0          # working grid: in-plane spacing target (block mean)
    work_z_mm: float = 2.5           # working grid: slice spacing target
    airway_search_mm: float = 60.0   # trachea seed search depth from the top slice
    airway_area_factor: float = 2.5  # an airway blob is at most this times the tracheal area
    airway_max_mm: float = 250.0     # airway tracking length limit below the seed
    min_lung_ml: float = 30.0        # smaller components are not lung
    close_mm: float = 3.0            # 3-D closing ball radius
    pleural_depth_mm: float = 20.0   # costal bays up to this deep are filled (0 = off)


# --------------------------------------------------------------------------- small helpers

def _struct_2d(connectivity: int = 1) -> np.ndarray:
    """A 3-D structuring element that connects voxels only within a slice."""
    s = np.zeros((3, 3, 3), bool)
    s[1] = ndi.generate_binary_structure(2, connectivity)
    return s


def _ellipsoid(radius_mm: float, spacing, in_plane_only: bool = False) -> np.ndarray:
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
    lab, _ = ndi.label(~mask, structure=_struct_2d(1))
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


def _closing(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
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


def as_slabs(ct, fz: int):
    """The CT as a dask array of z-slabs (a multiple of ``fz`` slices), read once into memory.

    Zarr stores are read chunk by chunk (one slice per chunk) through dask; the slabs are kept
    (``persist``) so that downsampling and the full-resolution refinement read the store once.
    """
    import dask.array as da

    slab = fz * max(1, 16 // fz)
    chunks = (slab,) + tuple(ct.shape[1:])
    if isinstance(ct, da.Array):
        return ct.rechunk(chunks).persist()
    if isinstance(ct, np.ndarray):
        return da.from_array(ct, chunks=chunks)
    return da.from_zarr(ct, chunks=chunks).persist()


def downsample(slabs, fz: int, f: int) -> np.ndarray:
    """Block-mean downsampling of the CT slabs (slice-wise work, one dask task per slab)."""
    nz, ny, nx = slabs.shape
    out_chunks = (tuple(math.ceil(c / fz) for c in slabs.chunks[0]),
                  (math.ceil(ny / f),), (math.ceil(nx / f),))
    # every slab but the last is a multiple of fz slices, so edge padding only acts at the end
    return slabs.map_blocks(_block_mean, fz, f, dtype=np.float32, chunks=out_chunks).compute()


IN_BAND, INSIDE = 1, 2


def _refine_block(ct_block, code, fz, f, threshold, block_info=None):
    """Full-resolution mask of one slab: inside from the working grid, the band decided by HU."""
    z0 = block_info[0]["array-location"][0][0]
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


def upsample_refine(slabs, lung: np.ndarray, fz: int, f: int, threshold: float) -> np.ndarray:
    """Bring a working-grid lung mask back to the CT grid.

    Working-grid voxels deep inside the mask (eroded by one voxel) are lung; those outside the
    mask dilated by one voxel are not; the band between is decided voxel by voxel at full
    resolution by the HU threshold (so the lung border is as sharp as the CT).
    """
    if fz == 1 and f == 1:
        return lung.astype(np.uint8)
    st = ndi.generate_binary_structure(3, 1)
    inner = ndi.binary_erosion(lung, structure=st)
    outer = ndi.binary_dilation(lung, structure=st)
    code = np.where(inner, INSIDE, np.where(outer, IN_BAND, 0)).astype(np.uint8)
    return slabs.map_blocks(_refine_block, code, fz, f, float(threshold), dtype=np.uint8).compute()


def body_mask(hu: np.ndarray, body_hu: float = -500.0) -> np.ndarray:
    """Largest component above ``body_hu``, with in-plane holes (lungs, airways) filled."""
    body = largest_component(hu > body_hu)
    return fill_holes_2d(body)


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
    st = _struct_2d(1)
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


def select_lungs(cand: np.ndarray, body: np.ndarray, spacing, params: ThresholdParams) -> np.ndarray:
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
    ok_y = np.all((a[:, flat] * y + c[:, flat]) <= eps, axis=1) if flat.any() else np.ones(len(y), bool)
    x = np.arange(mask.shape[1])[None, :]
    inside = (x >= lo[:, None] - eps) & (x <= hi[:, None] + eps) & ok_y[:, None]
    return inside | mask


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
    lab, n = ndi.label(bay, structure=_struct_2d(2))
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
    """Lung mask of a CT (z, y, x HU; numpy, zarr or dask array) with the threshold method.

    Returns ``(mask uint8 same shape, info dict)``; info holds the per-side volumes (ml), the
    working grid, the airway threshold used and the step timings.
    """
    p = params or ThresholdParams()
    spacing = tuple(float(s) for s in spacing)
    timings = {}
    t0 = time.perf_counter()
    fz, f = work_factors(spacing, p)
    slabs = as_slabs(ct, fz)
    timings["read_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    hu = downsample(slabs, fz, f)
    wsp = (spacing[0] * fz, spacing[1] * f, spacing[2] * f)
    timings["downsample_s"] = time.perf_counter() - t

    t = time.perf_counter()
    body = body_mask(hu, p.body_hu)
    threshold = p.threshold if p.threshold is not None else otsu_threshold(hu, body, *p.otsu_range)
    air = (hu < threshold) & body
    seed = find_trachea_seed(air, body, wsp, p.airway_search_mm)
    airway = np.zeros_like(air) if seed is None else track_airway(air, seed, wsp, p)
    airway_cut = ndi.binary_dilation(airway, structure=_struct_2d(2)) & air if airway.any() else airway
    sides = select_lungs(air & ~airway_cut, body, wsp, p)
    timings["lungs_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ball = _ellipsoid(p.close_mm, wsp)
    margin = tuple(k // 2 + 1 for k in ball.shape)
    lung = np.zeros(air.shape, bool)
    for s in (RIGHT, LEFT):
        full = sides == s
        if not full.any():
            continue
        box = bbox_slices(full, margin)
        side = fill_holes_2d(full[box])
        side = _closing(side, ball)
        side = pleural_fill(side, s, wsp, p)
        side = fill_holes_2d(side)
        lung[box] |= side
    lung &= body
    lung &= ~airway_cut
    timings["fill_close_s"] = time.perf_counter() - t

    t = time.perf_counter()
    mask = upsample_refine(slabs, lung, fz, f, threshold)
    del slabs
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


# --------------------------------------------------------------------------- stage

def segment_image(ct_path: str | Path, out_path: str | Path, *, method: str = "threshold",
                  model: str | Path | None = None, patient: str | None = None,
                  params: ThresholdParams | None = None) -> dict:
    """Segment the lungs of ``ct_path`` into ``out_path``; returns the attributes written."""
    from covidct import zarrio

    ct_path, out_path = Path(ct_path), Path(out_path)
    try:
        img = zarrio.open_image(ct_path)
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise CovidctError(f"cannot open CT store: {err}", step=STEP, patient=patient, path=ct_path)
    if img.array.ndim != 3 or min(img.array.shape) < 1:
        raise CovidctError(f"expected a 3-D CT, got shape {img.array.shape}", step=STEP,
                           patient=patient, path=ct_path)
    patient = patient or img.attrs.get("patient")
    t0 = time.perf_counter()
    if method == "threshold":
        p = params or ThresholdParams()
        mask, info = threshold_lung_mask(img.array, img.spacing, p)
        method_attrs = {"method": "threshold", "params": asdict(p)}
    elif method == "fpn":
        if model is None:
            raise CovidctError("--method fpn needs --model SEG.keras", step=STEP, patient=patient)
        if not Path(model).exists():
            raise CovidctError("segmentation model not found", step=STEP, patient=patient, path=model)
        try:
            from covidct import fpn  # lazy: TensorFlow/Keras only for this method
        except ImportError as err:
            raise CovidctError(f"the fpn method is not available: {err}", step=STEP, patient=patient)

        mask = np.asarray(fpn.predict_mask(img.read(), img.spacing, str(model))).astype(np.uint8)
        if mask.shape != tuple(img.array.shape):
            raise CovidctError(f"fpn mask shape {mask.shape} != CT shape {tuple(img.array.shape)}",
                               step=STEP, patient=patient, path=model)
        voxel_ml = float(np.prod(img.spacing)) / 1000.0
        info = {"lung_volume_ml": round(float((mask > 0).sum() * voxel_ml), 1)}
        method_attrs = {"method": "fpn", "model": str(model)}
    else:
        raise CovidctError(f"unknown method {method!r} (threshold|fpn)", step=STEP, patient=patient)
    mask = (mask > 0).astype(np.uint8)
    attrs = {"kind": "lung_mask", "source": ct_path.name, **method_attrs, **info}
    for key in ("patient", "site"):
        if key in img.attrs:
            attrs[key] = img.attrs[key]
    if patient:
        attrs["patient"] = patient
    zarrio.write_image(out_path, mask, spacing=img.spacing, origin=img.origin,
                       direction=img.direction, attrs=attrs, name="lung")
    log.info("patient %s: lung mask %.0f ml (%s) in %.2f s -> %s", patient or "-",
             info["lung_volume_ml"], method, time.perf_counter() - t0, out_path)
    if info["lung_volume_ml"] < 200:
        log.warning("patient %s: lung mask is only %.0f ml", patient or "-", info["lung_volume_ml"])
    return attrs


def add_arguments(parser) -> None:
    d = ThresholdParams()
    parser.add_argument("ct", help="input ct.zarr (HU, canonical orientation)")
    parser.add_argument("out", help="output lung.zarr (uint8, 1 = lung)")
    parser.add_argument("--method", choices=("threshold", "fpn"), default="threshold",
                        help="threshold: classical, no weights (default); fpn: trained DenseNet121-FPN")
    parser.add_argument("--model", default=None, help="SEG.keras for --method fpn")
    parser.add_argument("--patient", default=None, help="patient id (for messages and attributes)")
    parser.add_argument("--threshold", type=float, default=d.threshold,
                        help="lung/air HU limit (default: Otsu's threshold inside the body, clamped "
                             f"to {d.otsu_range[0]:g}..{d.otsu_range[1]:g} HU)")
    parser.add_argument("--close-mm", type=float, default=d.close_mm,
                        help="3-D closing ball radius in mm (%(default)s)")
    parser.add_argument("--pleural-depth-mm", type=float, default=d.pleural_depth_mm,
                        help="fill bays on the costal side of the lungs (dense lesions on the pleura) "
                             "up to this depth in mm, 0 = off (%(default)s)")
    parser.add_argument("--work-mm", type=float, nargs=2, default=(d.work_z_mm, d.work_xy_mm),
                        metavar=("Z", "XY"), help="working-grid spacing in mm (%(default)s)")


def run(args) -> int:
    params = ThresholdParams(threshold=args.threshold, close_mm=args.close_mm,
                             pleural_depth_mm=args.pleural_depth_mm,
                             work_z_mm=args.work_mm[0], work_xy_mm=args.work_mm[1])
    segment_image(args.ct, args.out, method=args.method, model=args.model, patient=args.patient,
                  params=params)
    return 0
