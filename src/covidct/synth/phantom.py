"""A chest-CT phantom in Hounsfield units: anatomy, pulmonary trees, pneumonia lesions, scanner.

:func:`render` builds one patient, deterministic from one seed with a random stream per step, so
switching the lesions off leaves the anatomy and the noise voxel-identical. The exact lung mask
is the two lungs (the largest piece per side), vessels and lesions inside them included, minus
the trachea and main bronchi.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

from covidct.synth.anatomy import (
    AIRWAY,
    BONE,
    FAT,
    LEFT,
    LUNG,
    PADDING,
    RIGHT,
    SOFT,
    STREAM_ANATOMY,
    STREAM_LESIONS,
    STREAM_TREES,
    Anatomy,
    Grid,
    _slab,
    draw_anatomy,
    polyline,
    rng_for,
)
from covidct.synth.lesions import Lesions, _emphysema, add_lesions
from covidct.synth.scanner import Scanner, acquire
from covidct.synth.trees import Tree, grow_tree
from covidct.synth.tubes import splat_tubes


def _tube(an: Anatomy, grid: Grid, points, r: float, extra: float = 0.0):
    p0, p1 = polyline(points, an)
    return splat_tubes(grid, p0, p1, np.full(len(p0), r + extra), soft=0.5 * grid.px)


def mediastinal_structures(an: Anatomy, grid: Grid) -> list[tuple]:
    """The tubes that shape the lungs: (path, radius, exclusion margin, tissue, HU) each."""
    top = grid.length + 20
    tr_path = [(an.tr_uv[0], an.tr_uv[1], top), (an.tr_uv[0], an.tr_uv[1], an.z_carina)]
    es_path = [(an.es_uv[0], an.es_uv[1], top), (an.es_uv[0] + 4, an.es_uv[1] - 2, -20)]
    return [
        (es_path, an.r_es, 3.0, SOFT, 35.0),
        (an.ao_path, an.r_ao, 4.0, SOFT, 42.0),
        (an.svc_path, an.r_svc, 3.0, SOFT, 38.0),
        (an.pa_path, an.r_pa, 4.0, SOFT, 40.0),
        (tr_path, an.r_tr + 2.0, 4.0, SOFT, 25.0),
    ]


def thorax(an: Anatomy, grid: Grid, structures: list[tuple]):
    """The closed-form tissues with the lungs carved out of the thoracic cavity around the
    mediastinal tubes: ``(tissue codes, HU, lung side)``, the largest piece of each lung kept."""
    excl = np.zeros(grid.shape, bool)
    for path, r, margin, _, _ in structures:
        idx, w = _tube(an, grid, path, r, margin)
        excl.flat[idx[w >= 0.5]] = True
    tissue = np.empty(grid.shape, np.uint8)
    hu = np.empty(grid.shape, np.float32)
    side = np.empty(grid.shape, np.uint8)
    step = max(1, int(2_000_000 // (grid.n * grid.n)))
    for k0 in range(0, grid.nz, step):
        k1 = min(grid.nz, k0 + step)
        tissue[k0:k1], hu[k0:k1], side[k0:k1] = _slab(an, grid, k0, k1, excl)
    del excl
    for s in (RIGHT, LEFT):
        lab, n = ndimage.label(side == s)
        if n > 1:
            sizes = np.bincount(lab.ravel())[1:]
            drop = (lab > 0) & (lab != 1 + int(np.argmax(sizes)))
            side[drop] = 0
            tissue[drop] = FAT
            hu[drop] = -85.0
    if not (side == RIGHT).any() or not (side == LEFT).any():
        raise ValueError("phantom has no lung: field of view or scan length too small")
    return tissue, hu, side


def paint_mediastinum(tissue, hu, an: Anatomy, grid: Grid, structures: list[tuple],
                      seed: int) -> None:
    """The mediastinal tubes (not over lung or bone) and any calcification of the aorta."""
    for path, r, _, code, value in structures[:-1]:
        idx, w = _tube(an, grid, path, r)
        idx = idx[w >= 0.5]
        ok = (tissue.flat[idx] != LUNG) & (tissue.flat[idx] != BONE)
        tissue.flat[idx[ok]] = code
        hu.flat[idx[ok]] = value
    if an.calcified:
        rng_c = rng_for(seed, STREAM_ANATOMY + 100)
        p0, p1 = polyline(an.ao_path, an)
        k = int(rng_c.integers(2, 6))
        seg = rng_c.integers(0, len(p0), k)
        t = rng_c.random(k)[:, None]
        pts = p0[seg] + (p1[seg] - p0[seg]) * t
        normal = rng_c.normal(size=(k, 3))
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        pts = pts + normal * an.r_ao * 0.9
        idx, w = splat_tubes(grid, pts, pts + 0.01, np.full(k, 1.8))
        keep = (w >= 0.5) & (tissue.flat[idx] == SOFT)
        hu.flat[idx[keep]] = 450.0


def hila_of(side, an: Anatomy, grid: Grid) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The carina and the hilum of each lung (zyx mm)."""
    carina = np.array([an.z_carina, an.by + an.tr_uv[1], an.bx + an.tr_uv[0]])
    hila = {}
    for s, ang, length in ((RIGHT, 28, 30.0), (LEFT, 45, 42.0)):
        sgn = -1.0 if s == RIGHT else 1.0
        d = np.array([-math.cos(math.radians(ang)), 0.15, sgn * math.sin(math.radians(ang))])
        d /= np.linalg.norm(d)
        target = carina + d * length
        pts = np.argwhere(side == s)
        mm = grid.to_mm(pts[:: max(1, len(pts) // 60000)])
        h = mm[np.argmin(np.linalg.norm(mm - target, axis=1))]
        into = h - carina
        hila[s] = h + 6.0 * into / np.linalg.norm(into)
    return carina, hila


def paint_main_airways(tissue, hu, side, an: Anatomy, grid: Grid, carina, hila) -> None:
    """The trachea and main bronchi (walls and lumen), carina to each hilum; out of the lungs."""
    outer, lumen = [], []
    segments = [(carina + np.array([an.length - an.z_carina + 20, 0, 0]), carina, an.r_tr)] + \
        [(carina, hila[s], an.r_tr * (0.75 if s == RIGHT else 0.68)) for s in (RIGHT, LEFT)]
    for pa, pb, r in segments:
        outer.append(splat_tubes(grid, pa[None], pb[None], np.array([r + 2.0]), soft=0.5 * grid.px))
        lumen.append(splat_tubes(grid, pa[None], pb[None], np.array([r]), soft=0.5 * grid.px))
    main_airway = np.zeros(grid.shape, bool)
    for idx, w in outer:
        sel = idx[(w >= 0.5) & (tissue.flat[idx] != BONE)]
        main_airway.flat[sel] = True
        tissue.flat[sel] = SOFT
        hu.flat[sel] = 25.0
    for idx, w in lumen:
        sel = idx[(w >= 0.5) & (tissue.flat[idx] != BONE)]
        tissue.flat[sel] = AIRWAY
        hu.flat[sel] = -1000.0
    side[main_airway] = 0


def paint_hilar_vessels(tissue, hu, an: Anatomy, grid: Grid, hila) -> None:
    """Pulmonary arteries from the trunk to each hilum, veins from each hilum to the heart."""
    pa_end = np.array(polyline(an.pa_path, an)[1][-1])
    heart_c = np.array([an.heart[2], an.by + an.heart[1] + 0.3 * an.heart_r[1],
                        an.bx + an.heart[0]])
    for s in (RIGHT, LEFT):
        for pa, pb, r in ((pa_end, hila[s] + np.array([4.0, -6.0, 0.0]), an.r_pa * 0.72),
                          (hila[s] + np.array([-18.0, 4.0, 0.0]), heart_c, 6.5)):
            idx, w = splat_tubes(grid, pa[None], pb[None], np.array([r]), soft=0.5 * grid.px)
            idx = idx[w >= 0.5]
            ok = np.isin(tissue.flat[idx], (FAT, SOFT))
            tissue.flat[idx[ok]] = SOFT
            hu.flat[idx[ok]] = 40.0


def pulmonary_trees(seed: int, side, grid: Grid, hila) -> tuple[tuple, tuple]:
    """The bronchovascular and venous trees of both lungs, as segment arrays."""
    rng_t = rng_for(seed, STREAM_TREES)
    bv, veins = Tree(), Tree()
    for s in (RIGHT, LEFT):
        sg = -1.0 if s == RIGHT else 1.0
        h = hila[s]
        roots = [(h, (1.0, 0.1, 0.4 * sg), 4.8),        # upper lobe (z, y, x)
                 (h, (-0.5, -0.8, 0.5 * sg), 3.4),      # middle lobe / lingula
                 (h, (-1.0, 0.4, 0.3 * sg), 5.2),       # lower lobe
                 (h, (-0.2, 1.0, 0.2 * sg), 3.4)]       # superior segment of the lower lobe
        grow_tree(rng_t, side, grid, s, [(np.asarray(p, float), np.asarray(d, float), r)
                                         for p, d, r in roots], tree=bv)
        hv = h + np.array([-16.0, 6.0, 0.0])
        vroots = [(hv, (0.8, -0.3, 0.3 * sg), 4.6), (hv, (-0.9, 0.3, 0.3 * sg), 4.8),
                  (hv, (-0.3, -0.6, 0.6 * sg), 3.2)]
        grow_tree(rng_t, side, grid, s, [(np.asarray(p, float), np.asarray(d, float), r)
                                         for p, d, r in vroots], tree=veins)
    return bv.arrays(), veins.arrays()


def paint_trees(hu, lesion, side, grid: Grid, bv_arr, vn_arr, les: Lesions) -> tuple[int, int]:
    """Vessels (arteries beside the airways, veins), then airway walls and lumens, inside the
    lungs; thickened walls count as lesion. Returns (vessel segments, airway segments)."""
    lung = side > 0
    p0, p1, r, gen, tside, term = bv_arr
    offs = np.zeros_like(p0)
    if len(p0):
        dvec = p1 - p0
        dvec /= np.maximum(np.linalg.norm(dvec, axis=1, keepdims=True), 1e-9)
        ref = np.where(np.abs(dvec[:, :1]) > 0.9, np.array([[0.0, 1.0, 0.0]]),
                       np.array([[1.0, 0.0, 0.0]]))
        perp = np.cross(dvec, ref)
        perp /= np.maximum(np.linalg.norm(perp, axis=1, keepdims=True), 1e-9)
        offs = perp * (1.9 * r + 1.0)[:, None]
    vp0 = np.concatenate([p0 + offs, vn_arr[0]])
    vp1 = np.concatenate([p1 + offs, vn_arr[1]])
    vr = np.concatenate([r, vn_arr[2]])
    idx, w = splat_tubes(grid, vp0, vp1, vr, vr * 0.85, faint=True)
    keep = lung.flat[idx]
    idx, w = idx[keep], w[keep]
    cur = hu.flat[idx]
    hu.flat[idx] = np.where(cur < 40.0, cur + w * (40.0 - cur), cur)
    air = r >= 1.1
    if air.any():
        rl = 0.85 * r[air]
        wf = np.array([les.wall_factor[int(s)] for s in tside[air]])
        wall = (0.15 * rl + 0.35) * wf
        idx, w = splat_tubes(grid, p0[air], p1[air], rl + wall, faint=True)
        keep = lung.flat[idx]
        idx, w = idx[keep], w[keep]
        cur = hu.flat[idx]
        hu.flat[idx] = cur + w * (np.maximum(cur, 20.0) - cur)
        if any(f > 1.0 for f in les.wall_factor.values()):
            n_idx, n_w = splat_tubes(grid, p0[air], p1[air], rl + (0.15 * rl + 0.35), faint=True)
            extra = np.zeros(grid.shape, np.float32)
            extra.flat[idx] = w
            normal = np.zeros(grid.shape, np.float32)
            normal.flat[n_idx] = n_w
            np.maximum(lesion, np.clip(extra - normal, 0, 1) * lung, out=lesion)
            del extra, normal
        idx, w = splat_tubes(grid, p0[air], p1[air], rl, faint=True)
        keep = lung.flat[idx]
        idx, w = idx[keep], w[keep]
        cur = hu.flat[idx]
        hu.flat[idx] = cur + w * (-990.0 - cur)
    return int(len(vr)), int(air.sum())


def render(seed: int, label: str, severity: float, scanner: Scanner, *, age: float = 50.0,
           sex: str = "M", emphysema: float = 0.0, lesions: bool = True,
           case: str = "") -> dict[str, Any]:
    """Build one patient. Returns volume (int16 HU), lung_mask (uint8, lesions included),
    lesion_mask (uint8: lesion weight over one half, inside the lung), tissue (uint8 codes),
    lesion (float32 truth weight), side (uint8, 1 right / 2 left lung) and info. ``case``
    replaces the label's lesions by one of the dense lesion cases (``lesions.CASES``)."""
    grid = scanner.grid()
    an = draw_anatomy(rng_for(seed, STREAM_ANATOMY), grid, sex=sex, age=age)
    structures = mediastinal_structures(an, grid)
    tissue, hu, side = thorax(an, grid, structures)
    paint_mediastinum(tissue, hu, an, grid, structures, seed)
    carina, hila = hila_of(side, an, grid)
    paint_main_airways(tissue, hu, side, an, grid, carina, hila)
    paint_hilar_vessels(tissue, hu, an, grid, hila)
    bv_arr, vn_arr = pulmonary_trees(seed, side, grid, hila)

    les = Lesions(grid, an, side, rng_for(seed, STREAM_LESIONS))
    les.info["hila"] = dict(hila)
    if emphysema > 0:
        _emphysema(les, emphysema)
    if lesions:
        add_lesions(les, label, float(severity), bv_arr, case=case)
    les.info.pop("hila", None)
    truth_box = les.apply(hu)
    lesion = np.zeros(grid.shape, np.float32)
    lesion[les.box] = truth_box
    n_vessels, n_airways = paint_trees(hu, lesion, side, grid, bv_arr, vn_arr, les)

    volume, outside = acquire(hu, grid, scanner, seed)
    tissue[:, outside] = PADDING
    lung = side > 0
    info = dict(les.info)
    info.update(lesion_fraction=float((lesion[lung] > 0.5).mean()) if lung.any() else 0.0,
                n_vessel_segments=n_vessels, n_airway_segments=n_airways)
    lesion_mask = ((lesion > 0.5) & lung).astype(np.uint8)
    return dict(volume=volume, lung_mask=lung.astype(np.uint8), lesion_mask=lesion_mask,
                tissue=tissue, lesion=lesion,
                side=side, spacing=grid.spacing, anatomy=an, info=info, grid=grid)
