"""A chest-CT phantom in Hounsfield units: anatomy, pulmonary trees, pneumonia lesions, scanner.

The phantom is built in millimetres in a patient frame whose axes follow the LPS image axes:
``x`` grows towards the patient's left, ``y`` towards the back, ``z`` towards the head; ``x`` and
``y`` are 0 at the centre of the reconstructed field and ``z`` is 0 at the first (most inferior)
slice. Voxel (k, j, i) sits at ``z = k*dz``, ``y = (j - (n-1)/2)*px``, ``x = (i - (n-1)/2)*px``.

Pipeline of :func:`render` (all deterministic from one seed, each step with its own random stream,
so switching lesions off leaves anatomy and noise voxel-identical):

1. :func:`draw_anatomy` picks one patient's body and organ geometry (sizes vary with sex and age).
2. Mediastinal tubes (trachea, oesophagus, aorta, SVC, pulmonary trunk) are rasterised; they and
   the heart, spine and diaphragm domes carve the two lungs out of the thoracic cavity, which is
   evaluated slab by slab from closed-form shapes (body superellipse, fat and muscle layers, ribs
   with cortical rims sloping down anteriorly, costal cartilage, sternum, vertebrae with discs,
   liver/stomach below the domes, the scanner table).
3. Main bronchi run from the carina to each hilum; bronchovascular and venous trees branch from
   the hila inside each lung (tubes whose weight falls with calibre, so small vessels look faint).
4. :mod:`lesion layers <covidct.phantom>` add the disease pattern of the label (COVID-19,
   bacterial, viral, mycoplasma, fungal pneumonia, or the EGFR cohort's nodule), its burden driven
   by the latent severity.
5. The scanner: Gaussian blur (reconstruction kernel), correlated noise, quantisation to int16,
   and padding outside the circular scan field.

The exact lung mask is the two lungs of step 2 (largest component per side), including vessels
and lesions inside them, minus the trachea and main bronchi.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

# Tissue codes of the truth map returned by :func:`render`.
AIR, FAT, MUSCLE, BONE, CARTILAGE, SOFT, LUNG, AIRWAY, TABLE, GAS, PADDING = range(11)
TISSUE_NAMES = ("air", "fat", "muscle", "bone", "cartilage", "soft", "lung", "airway", "table",
                "gas", "padding")
RIGHT, LEFT = 1, 2

# Random streams of one patient (numpy default_rng([seed, stream])).
STREAM_ANATOMY, STREAM_TREES, STREAM_LESIONS, STREAM_NOISE, STREAM_CLINICAL, STREAM_HEADER = range(6)


def rng_for(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(stream)])


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------
@dataclass
class Grid:
    """Voxel grid: ``nz`` slices of ``n`` x ``n`` pixels, spacing (dz, px, px) mm."""

    nz: int
    n: int
    dz: float
    px: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.nz, self.n, self.n)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return (self.dz, self.px, self.px)

    @property
    def length(self) -> float:
        return self.nz * self.dz

    def z(self) -> np.ndarray:
        return (np.arange(self.nz, dtype=np.float32) * self.dz)

    def yx(self) -> np.ndarray:
        return ((np.arange(self.n, dtype=np.float32) - (self.n - 1) / 2.0) * self.px)

    def to_index(self, pts_zyx: np.ndarray) -> np.ndarray:
        """Continuous voxel indices of points (N, 3) given as (z, y, x) mm."""
        pts = np.asarray(pts_zyx, dtype=np.float64)
        c = (self.n - 1) / 2.0
        return np.stack([pts[..., 0] / self.dz, pts[..., 1] / self.px + c,
                         pts[..., 2] / self.px + c], axis=-1)

    def to_mm(self, idx_zyx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx_zyx, dtype=np.float64)
        c = (self.n - 1) / 2.0
        return np.stack([idx[..., 0] * self.dz, (idx[..., 1] - c) * self.px,
                         (idx[..., 2] - c) * self.px], axis=-1)


@dataclass
class Anatomy:
    """One patient's body and organ geometry, in mm (patient frame of the module docstring)."""

    length: float
    bx: float
    by: float
    a: float            # body half-width (left-right)
    b_ant: float        # body half-depth in front of the centre
    b_post: float       # ... and behind it
    p: float            # superellipse exponent of the outline
    fat: float          # subcutaneous fat thickness
    muscle: float       # chest-wall muscle thickness
    rib_th: float       # radial thickness of the rib layer
    rib_h: float        # rib height (z)
    rib_pitch: float
    rib_drop: float     # how much lower a rib's front end is than its back
    rib_z1: float       # posterior z of the first rib
    z_dome_r: float
    z_dome_l: float
    dome_depth: float
    z_apex: float
    z_carina: float
    heart: tuple[float, float, float]      # centre (u, v, z) relative to the body centre
    heart_r: tuple[float, float, float]
    sp_v: float          # vertebral body centre (v)
    r_vb: float
    disc_z0: float
    disc_pitch: float
    r_tr: float
    tr_uv: tuple[float, float]
    es_uv: tuple[float, float]
    r_es: float
    r_ao: float
    ao_path: list[tuple[float, float, float]]
    r_svc: float
    svc_path: list[tuple[float, float, float]]
    r_pa: float
    pa_path: list[tuple[float, float, float]]
    table_gap: float
    table_th: float
    table_r: float
    lung_hu: float
    lung_grad: float
    breast: float        # 0 = none, else size factor
    gastric_bubble: bool
    calcified: bool
    sex: str
    age: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cav(self) -> float:
        """Depth under the skin at which the thoracic cavity begins."""
        return self.fat + self.muscle + self.rib_th + 1.0

    @property
    def A(self) -> float:
        return self.a - self.cav

    @property
    def B_ant(self) -> float:
        return self.b_ant - self.cav

    @property
    def B_post(self) -> float:
        return self.b_post - self.cav

    def uvz(self, u: float, v: float, z: float) -> tuple[float, float, float]:
        return (u, v, z)


def draw_anatomy(rng: np.random.Generator, grid: Grid, *, sex: str = "M", age: float = 50.0) -> Anatomy:
    """Draw one patient's anatomy so that it fits the grid's field of view and length."""
    male = str(sex).upper().startswith("M")
    L = grid.length
    R = 0.5 * grid.n * grid.px
    a = rng.uniform(140, 176) * (1.04 if male else 0.96)
    a = float(min(a, 0.9 * R))
    b_ant = a * rng.uniform(0.64, 0.76)
    b_post = b_ant * rng.uniform(0.93, 1.0)
    fat = rng.uniform(3, 15) + (3.0 if not male else 0.0)
    muscle = rng.uniform(6, 11) * (1.1 if male else 0.9)
    rib_th = rng.uniform(7, 9)
    cav = fat + muscle + rib_th + 1.0
    A, B_ant, _B_post = a - cav, b_ant - cav, b_post - cav

    z_dome_r = L * rng.uniform(0.26, 0.32)
    z_dome_l = z_dome_r - rng.uniform(10, 22)
    dome_depth = rng.uniform(0.8, 1.0) * max(z_dome_l - 22.0, 20.0) / 1.5
    z_apex = L - rng.uniform(12, 28)
    z_carina = z_apex - rng.uniform(80, 95)

    r_vb = rng.uniform(15, 19) * (1.05 if male else 0.95)
    sp_v = b_post - fat - rng.uniform(50, 60)
    v_vb = sp_v - r_vb                     # front of the vertebral body
    v_st = -B_ant                          # back of the sternum
    gap = v_vb - v_st
    hry = 0.40 * gap * rng.uniform(0.92, 1.05)
    hy = v_st + 0.46 * gap
    hrx = A * rng.uniform(0.40, 0.48)
    hx = A * rng.uniform(0.15, 0.24)
    hrz = rng.uniform(46, 56)
    hz = z_dome_l + 0.55 * hrz

    r_es = rng.uniform(6, 8)
    es_uv = (rng.uniform(2, 6), v_vb - r_es - 2.0)
    r_tr = rng.uniform(8, 10.5) * (1.05 if male else 0.93)
    tr_uv = (rng.uniform(-3, 1), es_uv[1] - r_es - r_tr - 4.0)

    r_ao = rng.uniform(11, 14) + 0.04 * (age - 50)
    phi = math.radians(rng.uniform(40, 55))
    dist = r_vb + r_ao + 4.0
    da = (math.sin(phi) * dist, sp_v - math.cos(phi) * dist)
    z_arch = z_carina + rng.uniform(18, 28)
    asc = (-rng.uniform(8, 16), hy - 0.25 * hry)
    ao_path = [(asc[0], asc[1], hz + 0.5 * hrz),
               (asc[0], asc[1], z_arch),
               (0.3 * asc[0] + 0.7 * da[0] - 8, 0.5 * (asc[1] + da[1]), z_arch + 14),
               (da[0], da[1], z_arch),
               (da[0], da[1], z_carina - 40),
               (da[0] - 3, da[1] - 4, -20.0)]
    r_svc = rng.uniform(8, 10)
    svc = (asc[0] - r_ao - r_svc - 4.0, asc[1] + 6)
    svc_path = [(svc[0], svc[1], hz + 0.35 * hrz), (svc[0], svc[1], L + 20.0)]
    r_pa = rng.uniform(11, 14)
    pa_path = [(hx * 0.6, hy - 0.55 * hry, hz + 0.55 * hrz),
               (hx * 0.6 + 6, hy - 0.2 * hry, hz + 0.85 * hrz + 4),
               (tr_uv[0] + 6, tr_uv[1] + 2, z_carina - 12)]

    return Anatomy(
        length=L, bx=float(rng.normal(0, 4)), by=float(rng.normal(-6, 4)),
        a=a, b_ant=b_ant, b_post=b_post, p=rng.uniform(1.9, 2.3), fat=fat, muscle=muscle,
        rib_th=rib_th, rib_h=rng.uniform(9, 12), rib_pitch=rng.uniform(21, 25),
        rib_drop=rng.uniform(45, 65), rib_z1=z_apex + rng.uniform(5, 15),
        z_dome_r=z_dome_r, z_dome_l=z_dome_l, dome_depth=dome_depth, z_apex=z_apex,
        z_carina=z_carina, heart=(hx, hy, hz), heart_r=(hrx, hry, hrz), sp_v=sp_v, r_vb=r_vb,
        disc_z0=rng.uniform(0, 28), disc_pitch=rng.uniform(26, 30), r_tr=r_tr, tr_uv=tr_uv,
        es_uv=es_uv, r_es=r_es, r_ao=r_ao, ao_path=ao_path, r_svc=r_svc, svc_path=svc_path,
        r_pa=r_pa, pa_path=pa_path, table_gap=rng.uniform(0.0, 3.0), table_th=rng.uniform(12, 22),
        table_r=rng.uniform(450, 700), lung_hu=float(rng.normal(-858, 14) + 0.3 * (50 - age)),
        lung_grad=rng.uniform(20, 45), breast=(0.0 if male else rng.uniform(0.6, 1.2)),
        gastric_bubble=bool(rng.random() < 0.5), calcified=bool(age > 60 and rng.random() < 0.5),
        sex="M" if male else "F", age=float(age))


# ----------------------------------------------------------------------------------------------
# Tube rasterisation (sparse, partial volume)
# ----------------------------------------------------------------------------------------------
def splat_tubes(grid: Grid, p0: np.ndarray, p1: np.ndarray, r0: np.ndarray, r1: np.ndarray | None = None,
                *, soft: float | None = None, faint: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise segments ``p0 -> p1`` (N, 3) zyx mm with radius ``r0 -> r1`` mm.

    Returns ``(flat_index, weight)`` with unique indices and weights in (0, 1]: a voxel's weight
    is about the part of it the tube covers (1 inside, falling over ``soft`` mm at the wall).
    ``faint`` scales tubes thinner than a pixel down, the way partial volume dims small vessels.
    A few thick segments are rasterised exactly (distance to the segment in its bounding box);
    many thin ones as chains of balls (one small offset table per calibre).
    """
    p0 = np.atleast_2d(np.asarray(p0, dtype=np.float64))
    p1 = np.atleast_2d(np.asarray(p1, dtype=np.float64))
    r0 = np.broadcast_to(np.asarray(r0, dtype=np.float64), (len(p0),))
    r1 = r0 if r1 is None else np.broadcast_to(np.asarray(r1, dtype=np.float64), (len(p0),))
    soft = 0.7 * grid.px if soft is None else float(soft)
    if len(p0) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    if len(p0) <= 16 and not faint:
        idx, w = _segments_exact(grid, p0, p1, r0, r1, soft)
    else:
        idx, w = _segments_balls(grid, p0, p1, r0, r1, soft, faint)
    if len(idx) == 0:
        return idx, w
    order = np.argsort(idx, kind="stable")
    idx, w = idx[order], w[order]
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    return idx[starts], np.maximum.reduceat(w, starts)


def _segments_exact(grid: Grid, p0, p1, r0, r1, soft):
    sp = np.array(grid.spacing)
    shape = np.array(grid.shape)
    out_i, out_w = [], []
    i0, i1 = grid.to_index(p0), grid.to_index(p1)
    for k in range(len(p0)):
        reach = (max(r0[k], r1[k]) + soft) / sp
        lo = np.maximum(np.floor(np.minimum(i0[k], i1[k]) - reach).astype(int), 0)
        hi = np.minimum(np.ceil(np.maximum(i0[k], i1[k]) + reach).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        gz = (np.arange(lo[0], hi[0]) * sp[0])[:, None, None]
        gy = (np.arange(lo[1], hi[1]) * sp[1])[None, :, None]
        gx = (np.arange(lo[2], hi[2]) * sp[2])[None, None, :]
        a = i0[k] * sp
        d = i1[k] * sp - a
        dd = float(d.dot(d)) or 1e-12
        t = np.clip(((gz - a[0]) * d[0] + (gy - a[1]) * d[1] + (gx - a[2]) * d[2]) / dd, 0.0, 1.0)
        dist = np.sqrt((gz - a[0] - t * d[0]) ** 2 + (gy - a[1] - t * d[1]) ** 2 + (gx - a[2] - t * d[2]) ** 2)
        w = np.clip((r0[k] + t * (r1[k] - r0[k]) - dist) / soft + 0.5, 0.0, 1.0)
        nz = np.nonzero(w > 0)
        if len(nz[0]) == 0:
            continue
        out_i.append(np.ravel_multi_index((nz[0] + lo[0], nz[1] + lo[1], nz[2] + lo[2]), grid.shape))
        out_w.append(w[nz].astype(np.float32))
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(out_i), np.concatenate(out_w)


def _segments_balls(grid: Grid, p0, p1, r0, r1, soft, faint):
    sp = np.array(grid.spacing)
    base = 0.45 * min(grid.px, grid.dz)
    seg_len = np.linalg.norm(p1 - p0, axis=1)
    step = np.maximum(base, 0.3 * np.minimum(r0, r1))
    counts = (np.ceil(seg_len / step).astype(int) + 1)
    seg_id = np.repeat(np.arange(len(p0)), counts)
    t = _ramp(counts)
    pts = p0[seg_id] + (p1 - p0)[seg_id] * t[:, None]
    rad = r0[seg_id] + (r1 - r0)[seg_id] * t
    idx_pts = grid.to_index(pts)
    centre = np.rint(idx_pts).astype(np.int64)
    pts_mm = idx_pts * sp
    shape = np.array(grid.shape)
    gain = np.minimum(1.0, (2.0 * rad / grid.px) ** 1.5) if faint else np.ones_like(rad)
    unit = 0.5 * min(grid.px, grid.dz)
    bucket = np.ceil((rad + soft) / unit).astype(int)
    out_i, out_w = [], []
    for bkt in np.unique(bucket):
        sel = np.flatnonzero(bucket == bkt)
        rb = bkt * unit
        kz, ky = int(math.ceil(rb / grid.dz + 0.5)), int(math.ceil(rb / grid.px + 0.5))
        oz, oy, ox = np.meshgrid(np.arange(-kz, kz + 1), np.arange(-ky, ky + 1),
                                 np.arange(-ky, ky + 1), indexing="ij")
        off = np.stack([oz.ravel(), oy.ravel(), ox.ravel()], axis=1)
        off = off[np.linalg.norm(off * sp, axis=1) <= rb + 0.5 * np.linalg.norm(sp)]
        chunk = max(1, 300_000 // max(len(off), 1))
        for s in range(0, len(sel), chunk):
            ii = sel[s:s + chunk]
            vox = centre[ii][:, None, :] + off[None, :, :]
            d = np.sqrt((((vox * sp) - pts_mm[ii][:, None, :]) ** 2).sum(axis=2))
            w = np.clip((rad[ii][:, None] - d) / soft + 0.5, 0.0, 1.0) * gain[ii][:, None]
            ok = (w > 0) & np.all((vox >= 0) & (vox < shape), axis=2)
            v = vox[ok]
            out_i.append(np.ravel_multi_index((v[:, 0], v[:, 1], v[:, 2]), grid.shape))
            out_w.append(w[ok].astype(np.float32))
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(out_i), np.concatenate(out_w)


def _ramp(counts: np.ndarray) -> np.ndarray:
    """Concatenated linspace(0, 1, c) for every c in counts, vectorised."""
    total = int(counts.sum())
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    pos = np.arange(total) - starts
    denom = np.repeat(np.maximum(counts - 1, 1), counts)
    return pos / denom


def polyline(points: list[tuple[float, float, float]], an: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """(u, v, z) body-relative points -> segment endpoints (p0, p1) in zyx mm."""
    pts = np.array([(z, an.by + v, an.bx + u) for u, v, z in points], dtype=np.float64)
    return pts[:-1], pts[1:]


# ----------------------------------------------------------------------------------------------
# Closed-form anatomy, one slab of slices at a time
# ----------------------------------------------------------------------------------------------
def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _dome(an: Anatomy, u: np.ndarray, v: np.ndarray, left: np.ndarray) -> np.ndarray:
    """Height of the diaphragm under each (u, v): domes peak at the centre of each hemithorax."""
    xd = 0.5 * an.A
    yd = -0.15 * an.B_ant
    r2 = ((np.abs(u) - xd) / (0.6 * an.A)) ** 2 + ((v - yd) / (0.9 * an.B_post)) ** 2
    top = np.where(left, an.z_dome_l, an.z_dome_r)
    return top - an.dome_depth * np.minimum(r2, 1.5)


def _slab(an: Anatomy, grid: Grid, k0: int, k1: int, tube_excl: np.ndarray):
    """Tissue codes, base HU and lung side (0/1/2) for slices k0..k1-1."""
    shape = (k1 - k0, grid.n, grid.n)

    def bc(a):
        return np.broadcast_to(a, shape)

    z = grid.z()[k0:k1][:, None, None]
    yx = grid.yx()
    v = (yx - an.by)[None, :, None]
    u = (yx - an.bx)[None, None, :]
    tissue = np.zeros(shape, np.uint8)
    hu = np.full(shape, -1000.0, np.float32)

    def paint(where, code, value):
        np.copyto(tissue, np.uint8(code), where=where)
        np.copyto(hu, value, where=where, casting="unsafe")

    # ---- body outline (a superellipse prism), depth under the skin
    b = np.where(v < 0, an.b_ant, an.b_post)
    rho = ((np.abs(u) / an.a) ** an.p + (np.abs(v) / b) ** an.p) ** (1.0 / an.p)
    r = np.sqrt(u * u + v * v)
    depth2 = (1.0 - rho) * r / np.maximum(rho, 1e-3)
    depth = bc(depth2)
    body = bc(rho < 1.0)
    # ---- scanner table (curved cradle under the back)
    ty = v - (an.b_post + an.table_gap) + u * u / (2.0 * an.table_r)
    table = (ty >= 0) & (ty < an.table_th) & (np.abs(u) < 240) & ~body
    paint(table, TABLE, np.where((ty < 2.5) | (ty > an.table_th - 2.5), 380.0, -240.0))
    # ---- breasts
    if an.breast > 0:
        zb = 0.55 * an.length
        br = np.zeros(shape, bool)
        for s in (-1, 1):
            e = (((u - s * 0.45 * an.a) / (42 * an.breast)) ** 2 + ((v + an.b_ant * 0.85) / (34 * an.breast)) ** 2
                 + ((z - zb) / (45 * an.breast)) ** 2)
            br |= bc(e < 1.0)
        paint(br & ~body & bc(v < 0), FAT, -95.0)
    # ---- layers: fat, muscle, rib layer, cavity
    paint(body, FAT, -100.0)
    d_mus = an.fat + an.muscle
    paint(body & (depth >= an.fat), MUSCLE, 45.0)
    cavity = body & (depth >= an.cav)
    paint(cavity, FAT, -85.0)            # mediastinal and extrapleural fat
    # ---- paraspinal muscles
    paint(body & (depth >= an.fat) & bc((np.abs(u) < an.r_vb + 28) & (v > an.sp_v - 4)), MUSCLE, 48.0)
    # ---- abdomen below the domes: liver on the right, stomach and spleen on the left
    left_side = bc(u > 0)
    zdia = _dome(an, u, v, u > 0)
    abdo = cavity & bc(z < zdia)
    paint(abdo, SOFT, 32.0)
    paint(abdo & bc(u < 0.25 * an.A), SOFT, 62.0)
    if an.gastric_bubble:
        gb = abdo & bc((((u - 0.45 * an.A) / 26) ** 2 + ((v + 0.25 * an.B_ant) / 18) ** 2
                        + ((z - (an.z_dome_l - 34)) / 14) ** 2) < 1.0)
        paint(gb, GAS, -1000.0)
    # ---- heart with pericardial fat
    hx, hy, hz = an.heart
    hrx, hry, hrz = an.heart_r
    eh = bc(((u - hx) / hrx) ** 2 + ((v - hy) / hry) ** 2 + ((z - hz) / hrz) ** 2)
    paint(cavity & (eh < 1.18) & ~abdo, FAT, -95.0)
    paint(cavity & (eh < 1.0), SOFT, 42.0)
    # ---- lungs
    medial = bc(np.abs(u) > max(7.0, 1.6 * grid.px))
    above = bc(z > zdia)
    z_ap0 = an.z_apex - 0.5 * an.length
    xc, ax = 0.5 * (an.A + 10.0), 0.62 * (an.A - 10.0)
    yc, ay = 0.15 * an.B_post, 1.05 * 0.5 * (an.B_ant + an.B_post)
    cap = ((np.abs(u) - xc) / ax) ** 2 + ((v - yc) / ay) ** 2 + ((z - z_ap0) / (an.z_apex - z_ap0)) ** 2
    apex = bc((z <= z_ap0) | (cap <= 1.0))
    heart_ex = bc((((u - hx) / (hrx + 7)) ** 2 + ((v - hy) / (hry + 7)) ** 2 + ((z - hz) / (hrz + 7)) ** 2) > 1.0)
    spine_ex = bc(((u * u + (v - an.sp_v) ** 2) > (an.r_vb + 7) ** 2) & ~((v > an.sp_v) & (np.abs(u) < an.r_vb + 16)))
    # lungs narrow towards the apex
    extra = 0.2 * an.A * (1.0 - np.clip((an.z_apex - z) / (an.z_apex - an.z_dome_r), 0.0, 1.0))
    lung = (cavity & bc(depth2 >= an.cav + extra) & medial & above & apex & heart_ex & spine_ex
            & ~tube_excl[k0:k1])
    side = np.where(lung, np.where(left_side, LEFT, RIGHT), 0).astype(np.uint8)
    hu_l = an.lung_hu + an.lung_grad * np.clip((v + an.B_ant) / (an.B_ant + an.B_post), 0, 1)
    paint(lung, LUNG, hu_l.astype(np.float32))
    # ---- ribs (sloping down towards the front), costal cartilage, sternum
    band = body & (depth >= d_mus) & (depth < d_mus + an.rib_th)
    theta = bc(np.arctan2(np.abs(u), v))           # 0 = back, pi = front
    q = (an.rib_z1 - z - an.rib_drop * (1 - np.cos(theta)) / 2.0) / an.rib_pitch
    kr = np.rint(q)
    dzr = (q - kr) * an.rib_pitch
    dr = depth - (d_mus + 0.5 * an.rib_th)
    er = (dzr / (0.5 * an.rib_h)) ** 2 + (dr / (0.5 * an.rib_th)) ** 2
    in_rib = band & (er < 1.0) & (kr >= 0) & (kr <= 11) & (theta > 0.35)
    paint(in_rib & (theta < 2.35), BONE, np.where(er > 0.4, 820.0, 290.0).astype(np.float32))
    paint(in_rib & (theta >= 2.35) & (theta < 2.9) & (kr <= 9), CARTILAGE, 125.0)
    z_st0, z_st1 = an.z_dome_r - 5, an.z_carina + 45
    st_e = (u / 16.0) ** 2 + ((depth - (d_mus + 0.5 * an.rib_th)) / (0.5 * an.rib_th + 1)) ** 2
    sternum = body & bc(v < 0) & (st_e < 1.0) & bc((z > z_st0) & (z < z_st1)) & (theta >= 2.6)
    paint(sternum, BONE, np.where(st_e > 0.45, 700.0, 260.0).astype(np.float32))
    # ---- vertebra: body (cortex, cancellous), discs, canal, arch, processes
    rv = np.sqrt(u * u + (v - an.sp_v) ** 2)
    vb = bc(rv < an.r_vb)
    disc = bc(np.mod(z - an.disc_z0, an.disc_pitch) < 5.0)
    paint(vb, BONE, np.where(rv > an.r_vb - 2.5, 760.0, 235.0).astype(np.float32))
    paint(vb & disc, SOFT, 88.0)
    cv = an.sp_v + an.r_vb + 9.0
    rc = np.sqrt(u * u + (v - cv) ** 2)
    arch = (rc >= 8.0) & (rc < 13.0) & (v > cv - 3)
    spinous = (np.abs(u) < 4.0) & (v >= cv + 11) & (v < cv + 38)
    transverse = (np.abs(v - cv + 2) < 5.0) & (np.abs(u) > 9) & (np.abs(u) < 32)
    paint(bc(arch | spinous | transverse) & ~disc & body, BONE, 560.0)
    paint(bc(rc < 8.0) & body, SOFT, 15.0)
    return tissue, hu, side


# ----------------------------------------------------------------------------------------------
# Pulmonary trees
# ----------------------------------------------------------------------------------------------
@dataclass
class Tree:
    p0: list = field(default_factory=list)
    p1: list = field(default_factory=list)
    r: list = field(default_factory=list)
    gen: list = field(default_factory=list)
    side: list = field(default_factory=list)
    terminal: list = field(default_factory=list)

    def arrays(self):
        return (np.array(self.p0, float).reshape(-1, 3), np.array(self.p1, float).reshape(-1, 3),
                np.array(self.r, float), np.array(self.gen, int), np.array(self.side, int),
                np.array(self.terminal, bool))


def _lookup(side_vol: np.ndarray, grid: Grid, pts: np.ndarray) -> np.ndarray:
    idx = np.rint(grid.to_index(np.atleast_2d(pts))).astype(int)
    ok = np.all((idx >= 0) & (idx < np.array(grid.shape)), axis=1)
    out = np.zeros(len(idx), np.uint8)
    out[ok] = side_vol[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
    return out


def _side_at(side_vol: np.ndarray, grid: Grid, p) -> int:
    c = (grid.n - 1) / 2.0
    k = int(round(p[0] / grid.dz))
    j = int(round(p[1] / grid.px + c))
    i = int(round(p[2] / grid.px + c))
    if 0 <= k < grid.nz and 0 <= j < grid.n and 0 <= i < grid.n:
        return int(side_vol[k, j, i])
    return 0


def _perp(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    w = rng.normal(size=3)
    w -= w.dot(d) * d
    n = np.linalg.norm(w)
    return w / n if n > 1e-9 else np.array([0.0, 1.0, 0.0])


def grow_tree(rng: np.random.Generator, side_vol: np.ndarray, grid: Grid, side: int,
              roots: list[tuple[np.ndarray, np.ndarray, float]], *, r_min: float = 0.6,
              max_gen: int = 14, tree: Tree | None = None) -> Tree:
    """Grow asymmetric dichotomous trees from ``roots`` (start zyx mm, direction, radius) inside
    one lung: a major child continues nearly straight with most of the calibre, a minor child
    leaves at a wide angle; a branch that would leave the lung is shortened or turned, then dropped."""
    tree = tree or Tree()
    stack = [(np.asarray(p, float), np.asarray(d, float) / np.linalg.norm(d), float(r), 0)
             for p, d, r in roots]
    while stack:
        p, d, r, g = stack.pop()
        length = float(np.clip(r * rng.uniform(5.0, 9.0), 4.0, 40.0))
        end = None
        for attempt in range(4):
            cand = p + d * length
            if _side_at(side_vol, grid, cand) == side and _side_at(side_vol, grid, p + d * length * 0.5) == side:
                end = cand
                break
            if attempt == 1:   # turn away by a random angle and try again
                nd = d + 0.9 * _perp(d, rng)
                d = nd / np.linalg.norm(nd)
            length *= 0.6
        if end is None:
            if tree.terminal and np.array_equal(tree.p1[-1], p):
                tree.terminal[-1] = True
            continue
        last = r * 0.75 < r_min or g + 1 >= max_gen
        tree.p0.append(p)
        tree.p1.append(end)
        tree.r.append(r)
        tree.gen.append(g)
        tree.side.append(side)
        tree.terminal.append(last)
        if last:
            continue
        perp = _perp(d, rng)
        major = math.radians(rng.uniform(8, 24))
        minor = math.radians(rng.uniform(35, 65))
        for ang, ratio, sgn in ((major, rng.uniform(0.84, 0.92), 1.0), (minor, rng.uniform(0.55, 0.72), -1.0)):
            nd = math.cos(ang) * d + math.sin(ang) * sgn * perp
            nd /= np.linalg.norm(nd)
            stack.append((end, nd, r * ratio, g + 1))
    return tree


# ----------------------------------------------------------------------------------------------
# Smooth random fields
# ----------------------------------------------------------------------------------------------
def _bspline_matrix(n_fine: int, n_coarse: int, step: float) -> np.ndarray:
    """Cubic B-spline weights (n_fine, n_coarse) of fine samples between coarse nodes ``step`` apart."""
    pos = np.arange(n_fine) / step + 1.0          # node 0 lies one node before the first sample
    base = np.floor(pos).astype(int)
    f = pos - base
    w = np.stack([(1 - f) ** 3 / 6, (3 * f ** 3 - 6 * f ** 2 + 4) / 6,
                  (-3 * f ** 3 + 3 * f ** 2 + 3 * f + 1) / 6, f ** 3 / 6], axis=1)
    m = np.zeros((n_fine, n_coarse), np.float32)
    for j in range(4):
        m[np.arange(n_fine), np.clip(base - 1 + j, 0, n_coarse - 1)] += w[:, j]
    return m


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], spacing, scale_mm: float) -> np.ndarray:
    """Zero-mean, unit-sd random field varying over about ``scale_mm`` (float32): white noise on
    a coarse lattice ``scale_mm`` apart, interpolated by separable cubic B-splines."""
    steps = [max(scale_mm / s, 1.0) for s in spacing]
    cshape = [int(math.ceil(n / st)) + 4 for n, st in zip(shape, steps)]
    out = rng.standard_normal(cshape).astype(np.float32)
    for axis, (n, c, st) in enumerate(zip(shape, cshape, steps)):
        m = _bspline_matrix(n, c, st)
        out = np.moveaxis(np.tensordot(m, out, axes=([1], [axis])), 0, axis)
    sd = float(out.std())
    out -= float(out.mean())
    out /= (sd if sd > 1e-6 else 1.0)
    return out


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q


# ----------------------------------------------------------------------------------------------
# Lesions
# ----------------------------------------------------------------------------------------------
class Lesions:
    """Lesion layers over the lungs' bounding box: ground glass (GGO), consolidation/solid,
    reticulation (crazy paving, additive HU), low attenuation (emphysema)."""

    def __init__(self, grid: Grid, an: Anatomy, side: np.ndarray, rng: np.random.Generator):
        self.grid, self.an, self.rng = grid, an, rng
        nz = np.flatnonzero(side.any(axis=(1, 2)))
        ny = np.flatnonzero(side.any(axis=(0, 2)))
        nx = np.flatnonzero(side.any(axis=(0, 1)))
        pad = 2
        self.box = tuple(slice(max(0, a[0] - pad), min(s, a[-1] + pad + 1))
                         for a, s in zip((nz, ny, nx), grid.shape))
        self.side = side[self.box]
        self.mask = self.side > 0
        shape = self.side.shape
        self.wg = np.zeros(shape, np.float32)
        self.tg = np.zeros(shape, np.float32)
        self.wc = np.zeros(shape, np.float32)
        self.tc = np.zeros(shape, np.float32)
        self.ret = np.zeros(shape, np.float32)
        self.we = np.zeros(shape, np.float32)
        self.wall_factor = {RIGHT: 1.0, LEFT: 1.0}
        self.offset = np.array([s.start for s in self.box])
        self._dist = None
        self.info: dict[str, Any] = {}

    # coordinates (mm, patient frame) of the box's voxels, broadcastable
    def coords(self):
        g = self.grid
        z = (np.arange(self.box[0].start, self.box[0].stop) * g.dz)[:, None, None]
        y = g.yx()[self.box[1]][None, :, None]
        x = g.yx()[self.box[2]][None, None, :]
        return z, y, x

    @property
    def dist(self) -> np.ndarray:
        """Distance (mm) of each lung voxel to the pleura (the lung's boundary)."""
        if self._dist is None:
            # on a 2x coarser grid when large (a placement weight, not a measurement)
            f = (2, 2, 2) if self.mask.size > 400_000 else (1, 1, 1)
            if self.grid.dz >= 2 * self.grid.px:
                f = (1,) + f[1:]
            coarse = np.pad(self.mask[::f[0], ::f[1], ::f[2]], 1)
            sp = tuple(s * k for s, k in zip(self.grid.spacing, f))
            d = ndimage.distance_transform_edt(coarse, sampling=sp)[1:-1, 1:-1, 1:-1].astype(np.float32)
            for ax, k in enumerate(f):
                if k > 1:
                    d = np.repeat(d, k, axis=ax)
            d = d[:self.mask.shape[0], :self.mask.shape[1], :self.mask.shape[2]]
            self._dist = np.where(self.mask, np.maximum(d, 0.5 * min(self.grid.spacing)), 0).astype(np.float32)
        return self._dist

    def pleural_normal(self, c) -> np.ndarray:
        """Unit vector (z, y, x) from box voxel ``c`` towards the nearest pleura."""
        d = self.dist
        sp = np.array(self.grid.spacing)
        grad = np.zeros(3)
        for ax in range(3):
            lo, hi = np.array(c), np.array(c)
            lo[ax] = max(lo[ax] - 1, 0)
            hi[ax] = min(hi[ax] + 1, d.shape[ax] - 1)
            if hi[ax] > lo[ax]:
                grad[ax] = (d[tuple(hi)] - d[tuple(lo)]) / ((hi[ax] - lo[ax]) * sp[ax])
        n = -grad
        norm = np.linalg.norm(n)
        return n / norm if norm > 1e-6 else _perp(np.array([1.0, 0.0, 0.0]), self.rng)

    def lung_volume(self) -> float:
        return float(self.mask.sum()) * float(np.prod(self.grid.spacing))

    def sample_points(self, weight: np.ndarray, n: int, sides: list[int] | None = None) -> np.ndarray:
        """n voxel indices (box frame) drawn with probability ~ weight over lung voxels; with
        ``sides``, point i lies in lung ``sides[i % len(sides)]``."""
        flat = np.flatnonzero(self.mask)
        w = np.broadcast_to(weight, self.mask.shape).ravel()[flat].astype(np.float64)
        side_of = self.side.ravel()[flat]
        wanted = [None] * n if sides is None else [sides[i % len(sides)] for i in range(n)]
        out = np.zeros(n, np.int64)
        for s in set(wanted):
            slots = [i for i, x in enumerate(wanted) if x == s]
            ww = w if s is None else w * (side_of == s)
            if ww.sum() <= 0:
                ww = np.ones_like(ww) if s is None else (side_of == s).astype(np.float64)
            if ww.sum() <= 0:
                ww = np.ones_like(ww)
            out[slots] = self.rng.choice(flat, size=len(slots), p=ww / ww.sum())
        return np.stack(np.unravel_index(out, self.mask.shape), axis=1)

    def blob(self, centre_idx, radii_mm, level: float, *, layer: str = "g", rough: float = 0.25,
             sharp: float = 0.18, rot=None, noise_scale: float | None = None) -> tuple[tuple, np.ndarray, np.ndarray]:
        """Add an irregular ellipsoid at ``centre_idx`` (box voxel index) to a layer; returns
        (slices, weight, q) where q is the normalised radius inside the blob's box."""
        g = self.grid
        sp = np.array(g.spacing)
        radii = np.asarray(radii_mm, float)
        ext = radii.max() * (1.0 + sharp + rough) + sp
        c = np.asarray(centre_idx, float)
        lo = np.maximum(np.floor(c - ext / sp).astype(int), 0)
        hi = np.minimum(np.ceil(c + ext / sp).astype(int) + 1, np.array(self.mask.shape))
        if np.any(hi <= lo):
            return (), np.zeros(0), np.zeros(0)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        dz = ((np.arange(lo[0], hi[0]) - c[0]) * sp[0])[:, None, None]
        dy = ((np.arange(lo[1], hi[1]) - c[1]) * sp[1])[None, :, None]
        dx = ((np.arange(lo[2], hi[2]) - c[2]) * sp[2])[None, None, :]
        rot = _rotation(self.rng) if rot is None else rot
        q2 = 0
        for i in range(3):
            comp = rot[i, 0] * dz + rot[i, 1] * dy + rot[i, 2] * dx
            q2 = q2 + (comp / radii[i]) ** 2
        q = np.sqrt(q2)
        if rough > 0:
            shape = q.shape
            q = q + rough * smooth_noise(self.rng, shape, g.spacing, noise_scale or max(radii.max() * 0.5, 3.0))
        w = _smoothstep(1.0 + sharp, 1.0 - sharp, q) * self.mask[sl]
        self.add(layer, sl, w, level)
        return sl, w, q

    def add(self, layer: str, sl, w: np.ndarray, level: float | np.ndarray):
        W = {"g": self.wg, "c": self.wc, "e": self.we}[layer]
        T = {"g": self.tg, "c": self.tc, "e": None}[layer]
        sub = W[sl]
        if T is not None:
            tsub = T[sl]
            upd = w > sub
            tsub[upd] = (level[upd] if isinstance(level, np.ndarray) else level)
        np.maximum(sub, w, out=sub)

    def apply(self, hu: np.ndarray) -> np.ndarray:
        """Blend the layers into the HU volume (in place over the box); returns the truth weight."""
        h = hu[self.box]
        h += self.we * (-975.0 - h)
        h += self.wg * (self.tg - h)
        h += self.wc * (self.tc - h)
        h += self.ret
        truth = np.maximum(self.wg, self.wc)
        return truth

    # ---------------------------------------------------------------- lobes
    def lobes(self) -> np.ndarray:
        """Lobe code per box voxel: 1 RUL, 2 RML, 3 RLL, 4 LUL (with lingula), 5 LLL, 0 outside."""
        an = self.an
        z, y, x = self.coords()
        v = y - an.by
        B = an.B_post
        v_post, v_ant = 0.9 * B, -0.7 * an.B_ant
        out = np.zeros(self.mask.shape, np.uint8)
        for s in (RIGHT, LEFT):
            zd = an.z_dome_r if s == RIGHT else an.z_dome_l
            zf = zd + 8 + (an.z_carina + 5 - zd - 8) * (v - v_ant) / (v_post - v_ant)
            lower = z < zf
            in_s = self.side == s
            if s == RIGHT:
                zh = an.z_carina - 22
                out[in_s & lower] = 3
                out[in_s & ~lower & (z < zh)] = 2
                out[in_s & ~lower & (z >= zh)] = 1
            else:
                out[in_s & lower] = 5
                out[in_s & ~lower] = 4
        return out


def _covid(les: Lesions, sev: float):
    rng, g = les.rng, les.grid
    burden = 0.015 + 0.30 * sev ** 1.3
    nb = 2 + int(round(12 * sev)) + int(rng.integers(0, 3))
    bilateral = rng.random() < 0.8 + 0.2 * sev
    first = int(rng.choice([RIGHT, LEFT]))
    sides = [RIGHT, LEFT] if bilateral else [first]
    z, y, x = les.coords()
    an = les.an
    post = np.clip((y - an.by + an.B_ant) / (an.B_ant + an.B_post), 0, 1)
    low = np.clip(1 - (z - an.z_dome_l) / max(an.z_apex - an.z_dome_l, 1), 0, 1)
    weight = np.exp(-les.dist / 4.0) * (1 + 1.2 * post) * (1 + 0.8 * low)
    centres = les.sample_points(weight, nb, sides)
    V = les.lung_volume()
    n_crazy = n_cons = 0
    for c in centres:
        vol = burden * V / nb * rng.lognormal(0, 0.35)
        r = (3 * vol / (4 * math.pi)) ** (1 / 3) * 1.35
        # flattened against the pleura: the short axis along the pleural normal
        normal = les.pleural_normal(c)
        t1 = _perp(normal, rng)
        rot = np.stack([normal, t1, np.cross(normal, t1)])
        radii = r * np.array([0.6, 1.45, 1.15]) * rng.uniform(0.85, 1.15, 3)
        level = rng.uniform(-660, -430) + 130 * sev
        sl, w, q = les.blob(c, radii, level, layer="g", rough=0.3, rot=rot)
        if len(w) == 0:
            continue
        if rng.random() < 0.15 + 0.6 * sev:
            n_crazy += 1
            net = smooth_noise(rng, w.shape, g.spacing, 7.0)
            lines = np.exp(-(net / 0.25) ** 2) * _smoothstep(0.3, 0.7, w)
            np.maximum(les.ret[sl], rng.uniform(140, 220) * lines, out=les.ret[sl])
        if rng.random() < 0.85 * sev ** 1.5:
            n_cons += 1
            core = _smoothstep(0.62, 0.42, q) * les.mask[sl]
            les.add("c", sl, core, rng.uniform(15, 45))
    les.info.update(covid_blobs=int(len(centres)), bilateral=bool(bilateral), crazy_paving=n_crazy,
                    consolidated=n_cons, burden_target=round(burden, 4))


def _viral(les: Lesions, sev: float):
    rng, g = les.rng, les.grid
    burden = 0.04 + 0.32 * sev
    d = les.dist
    z, y, x = les.coords()
    hil = np.zeros(les.mask.shape, np.float32)
    for s, h in les.info.get("hila", {}).items():
        hil = np.maximum(hil, np.exp(-np.sqrt((z - h[0]) ** 2 + (y - h[1]) ** 2 + (x - h[2]) ** 2) / 70.0))
    field = (smooth_noise(rng, les.mask.shape, g.spacing, 22.0)
             + 2.2 * (1 - np.exp(-d / 14.0)) + 0.8 * hil)
    peripheral = rng.random() < 0.25
    if peripheral:
        field += 0.7 * np.exp(-d / 10.0)
    vals = field[les.mask]
    thr = float(np.quantile(vals, 1 - burden)) if vals.size else 0.0
    w = _smoothstep(thr - 0.3, thr + 0.3, field) * les.mask
    level = rng.uniform(-690, -520) + 90 * sev + 25 * smooth_noise(rng, les.mask.shape, g.spacing, 15.0)
    les.add("g", (slice(None),) * 3, w, level.astype(np.float32))
    les.info.update(viral_peripheral_mix=bool(peripheral), burden_target=round(burden, 4))


def _bacterial(les: Lesions, sev: float):
    rng, g = les.rng, les.grid
    side = int(rng.choice([RIGHT, LEFT]))
    lobe_codes = {RIGHT: ([3, 1, 2], [0.6, 0.25, 0.15]), LEFT: ([5, 4], [0.7, 0.3])}
    codes, p = lobe_codes[side]
    lobe = int(rng.choice(codes, p=p))
    lobes = les.lobes()
    region = lobes == lobe
    if region.sum() < 20:
        region = les.side == side
    frac = 0.35 + 0.55 * sev
    idx = np.argwhere(region)
    seed = idx[rng.integers(len(idx))]
    sp = np.array(g.spacing)
    zz, yy, xx = np.ogrid[:region.shape[0], :region.shape[1], :region.shape[2]]
    dist = np.sqrt(((zz - seed[0]) * sp[0]) ** 2 + ((yy - seed[1]) * sp[1]) ** 2 + ((xx - seed[2]) * sp[2]) ** 2)
    scale = float(dist[region].max()) + 1.0
    score = -dist / scale + 0.18 * smooth_noise(rng, region.shape, g.spacing, 14.0)
    thr = float(np.quantile(score[region], 1 - frac))
    cons = _smoothstep(thr - 0.03, thr + 0.03, score) * region
    les.add("c", (slice(None),) * 3, cons.astype(np.float32), rng.uniform(18, 42))
    halo = _smoothstep(thr - 0.22, thr - 0.02, score) * region * 0.85
    les.add("g", (slice(None),) * 3, halo.astype(np.float32), rng.uniform(-520, -380))
    les.info.update(bacterial_side="right" if side == RIGHT else "left", lobe=int(lobe),
                    lobe_fraction=round(frac, 3))


def _mycoplasma(les: Lesions, sev: float, airways: tuple):
    rng = les.rng
    both = rng.random() < 0.5
    first = int(rng.choice([RIGHT, LEFT]))
    sides = [RIGHT, LEFT] if both else [first]
    for s in sides:
        les.wall_factor[s] = 2.5 + 1.5 * sev
    p0, p1, r, gen, side, term = airways
    cand = np.flatnonzero(np.isin(side, sides) & (r < 2.2) & (gen >= 3))
    n = min(len(cand), int(15 + 60 * sev))
    g = les.grid
    if n:
        pick = rng.choice(cand, size=n, replace=False)
        # tree-in-bud: the small airway filled (a short thick tube) ending in a centrilobular bud
        idx, w = splat_tubes(g, p0[pick], p1[pick], np.full(n, 1.6), np.full(n, 2.4))
        bud_idx, bud_w = splat_tubes(g, p1[pick], p1[pick] + 0.01, rng.uniform(1.8, 3.2, n))
        for ii, ww in ((idx, w), (bud_idx, bud_w)):
            vol = _to_box(les, ii, ww)
            les.add("c", (slice(None),) * 3, vol * les.mask, rng.uniform(-80, 10))
    # patchy peribronchial ground glass
    cand = np.flatnonzero(np.isin(side, sides) & (gen >= 2) & (gen <= 5))
    for i in rng.choice(cand, size=min(len(cand), 2 + int(5 * sev)), replace=False) if len(cand) else []:
        c = np.rint(g.to_index(p1[i])).astype(int) - les.offset
        if np.all(c >= 0) and np.all(c < les.mask.shape):
            les.blob(c, rng.uniform(6, 14) * np.array([1.4, 1.0, 0.8]), rng.uniform(-640, -480), rough=0.3)
    les.info.update(mycoplasma_sides=len(sides), tree_in_bud=int(n), wall_factor=round(2.5 + 1.5 * sev, 2))


def _to_box(les: Lesions, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    vol = np.zeros(les.mask.shape, np.float32)
    kk = np.stack(np.unravel_index(idx, les.grid.shape), axis=1) - les.offset
    ok = np.all((kk >= 0) & (kk < np.array(vol.shape)), axis=1)
    kk = kk[ok]
    vol[kk[:, 0], kk[:, 1], kk[:, 2]] = w[ok]
    return vol


def _fungal(les: Lesions, sev: float):
    rng = les.rng
    n = 2 + int(rng.integers(0, 2)) + int(round(3 * sev))
    weight = 0.3 + np.exp(-les.dist / 20.0)
    centres = les.sample_points(weight, n)
    cav = 0
    for c in centres:
        r = rng.uniform(5, 9) + 6 * sev
        rot = _rotation(rng)
        les.blob(c, np.full(3, r * 1.75), rng.uniform(-560, -420), layer="g", rough=0.2, rot=rot)
        sl, w, q = les.blob(c, np.full(3, r) * rng.uniform(0.85, 1.15, 3), rng.uniform(15, 40), layer="c",
                            rough=0.15, rot=rot)
        if len(w) and rng.random() < 0.3:
            cav += 1
            core = _smoothstep(0.5, 0.35, q) * les.mask[sl]
            les.we[sl] = np.maximum(les.we[sl], 0)       # cavity: air inside the solid nodule
            sub = les.wc[sl]
            les.tc[sl] = np.where(core > 0.5, -950.0, les.tc[sl])
            np.maximum(sub, core, out=sub)
    les.info.update(fungal_nodules=int(n), cavitated=cav)


def _egfr(les: Lesions, sev: float, mutant: bool):
    rng = les.rng
    subsolid = bool(rng.random() < (0.75 if mutant else 0.25))
    lobes = les.lobes()
    upper = np.isin(lobes, (1, 4))
    weight = (0.3 + np.exp(-les.dist / 25.0)) * np.where(upper, 2.0, 1.0) * (les.dist > 4)
    c = les.sample_points(weight, 1)[0]
    r = rng.uniform(7, 14) + 4 * sev
    rot = _rotation(rng)
    if subsolid:
        les.blob(c, r * np.array([1.15, 1.0, 0.9]), rng.uniform(-640, -440), layer="g", rough=0.3,
                 sharp=0.3, rot=rot)
        if rng.random() < 0.35:
            les.blob(c, np.full(3, 0.35 * r), rng.uniform(0, 35), layer="c", rough=0.1, rot=rot)
    else:
        les.blob(c, r * np.array([1.1, 1.0, 0.9]), rng.uniform(15, 45), layer="c", rough=0.2,
                 sharp=0.12, rot=rot)
        # spiculation: thin strands radiating from the margin
        k = int(rng.integers(5, 11))
        g = les.grid
        centre_mm = g.to_mm(c + les.offset)
        dirs = rng.normal(size=(k, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        p0 = centre_mm + dirs * r * 0.8
        p1 = centre_mm + dirs * r * rng.uniform(1.5, 2.1, (k, 1))
        idx, w = splat_tubes(g, p0, p1, np.full(k, 1.3), np.full(k, 0.5))
        les.add("c", (slice(None),) * 3, _to_box(les, idx, w) * les.mask, 10.0)
    les.info.update(nodule_subsolid=subsolid, nodule_radius_mm=round(float(r), 1))


def _emphysema(les: Lesions, amount: float):
    rng = les.rng
    z, y, x = les.coords()
    an = les.an
    upper = np.clip((z - an.z_carina + 40) / 80.0, 0, 1)
    n = int(30 + 120 * amount)
    centres = les.sample_points(upper + 0.05, n)
    for c in centres:
        les.blob(c, np.full(3, rng.uniform(3.0, 8.0)), 0.0, layer="e", rough=0.2)


def add_lesions(les: Lesions, label: str, sev: float, airways: tuple):
    if label == "covid":
        _covid(les, sev)
    elif label == "viral":
        _viral(les, sev)
    elif label == "bacterial":
        _bacterial(les, sev)
    elif label == "mycoplasma":
        _mycoplasma(les, sev, airways)
    elif label == "fungal":
        _fungal(les, sev)
    elif label in ("egfr_mutant", "egfr_wildtype"):
        _egfr(les, sev, label == "egfr_mutant")
    elif label == "other":
        # a few non-specific nodules and a small patch of ground glass
        _fungal(les, 0.3 * sev)
    else:
        raise ValueError(f"no lesion model for label {label!r}")


# ----------------------------------------------------------------------------------------------
# The whole phantom
# ----------------------------------------------------------------------------------------------
@dataclass
class Scanner:
    slice_mm: float = 2.5
    pixel_mm: float = 2.75
    matrix: int = 128
    n_slices: int = 120
    noise_hu: float = 12.0
    kernel_mm: float = 0.9
    padding_hu: int = -3024


def render(seed: int, label: str, severity: float, scanner: Scanner, *, age: float = 50.0,
           sex: str = "M", emphysema: float = 0.0, lesions: bool = True) -> dict[str, Any]:
    """Build one patient. Returns volume (int16 HU), lung_mask (uint8), tissue (uint8 codes),
    lesion (float32 truth weight), side (uint8, 1 right / 2 left lung) and info."""
    grid = Grid(nz=int(scanner.n_slices), n=int(scanner.matrix), dz=float(scanner.slice_mm),
                px=float(scanner.pixel_mm))
    an = draw_anatomy(rng_for(seed, STREAM_ANATOMY), grid, sex=sex, age=age)
    shape = grid.shape
    # ---- mediastinal tubes that shape the lungs
    def tube(points, r, extra=0.0):
        p0, p1 = polyline(points, an)
        return splat_tubes(grid, p0, p1, np.full(len(p0), r + extra), soft=0.5 * grid.px)

    L = grid.length
    tr_path = [(an.tr_uv[0], an.tr_uv[1], L + 20), (an.tr_uv[0], an.tr_uv[1], an.z_carina)]
    es_path = [(an.es_uv[0], an.es_uv[1], L + 20), (an.es_uv[0] + 4, an.es_uv[1] - 2, -20)]
    structures = [  # (path, radius, exclusion margin, tissue, HU)
        (es_path, an.r_es, 3.0, SOFT, 35.0),
        (an.ao_path, an.r_ao, 4.0, SOFT, 42.0),
        (an.svc_path, an.r_svc, 3.0, SOFT, 38.0),
        (an.pa_path, an.r_pa, 4.0, SOFT, 40.0),
        (tr_path, an.r_tr + 2.0, 4.0, SOFT, 25.0),
    ]
    excl = np.zeros(shape, bool)
    for path, r, margin, _, _ in structures:
        idx, w = tube(path, r, margin)
        excl.flat[idx[w >= 0.5]] = True
    # ---- closed-form anatomy, slab by slab
    tissue = np.empty(shape, np.uint8)
    hu = np.empty(shape, np.float32)
    side = np.empty(shape, np.uint8)
    step = max(1, int(2_000_000 // (grid.n * grid.n)))
    for k0 in range(0, grid.nz, step):
        k1 = min(grid.nz, k0 + step)
        tissue[k0:k1], hu[k0:k1], side[k0:k1] = _slab(an, grid, k0, k1, excl)
    del excl
    # keep the largest connected piece of each lung
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
    # ---- paint mediastinal structures (not over lung or bone)
    for path, r, _, code, value in structures[:-1]:
        idx, w = tube(path, r)
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
    # ---- trachea and main bronchi (carina to each hilum)
    rng_t = rng_for(seed, STREAM_TREES)
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
        h = h + 6.0 * into / np.linalg.norm(into)
        hila[s] = h
    airway_outer, airway_lumen = [], []
    for pa, pb, r in [(carina + np.array([an.length - an.z_carina + 20, 0, 0]), carina, an.r_tr)] + \
                     [(carina, hila[s], an.r_tr * (0.75 if s == RIGHT else 0.68)) for s in (RIGHT, LEFT)]:
        airway_outer.append(splat_tubes(grid, pa[None], pb[None], np.array([r + 2.0]), soft=0.5 * grid.px))
        airway_lumen.append(splat_tubes(grid, pa[None], pb[None], np.array([r]), soft=0.5 * grid.px))
    main_airway = np.zeros(shape, bool)
    for idx, w in airway_outer:
        sel = idx[(w >= 0.5) & (tissue.flat[idx] != BONE)]
        main_airway.flat[sel] = True
        tissue.flat[sel] = SOFT
        hu.flat[sel] = 25.0
    for idx, w in airway_lumen:
        sel = idx[(w >= 0.5) & (tissue.flat[idx] != BONE)]
        tissue.flat[sel] = AIRWAY
        hu.flat[sel] = -1000.0
    side[main_airway] = 0
    # pulmonary arteries from the trunk to each hilum, veins from each hilum to the heart
    pa_end = np.array(polyline(an.pa_path, an)[1][-1])
    heart_c = np.array([an.heart[2], an.by + an.heart[1] + 0.3 * an.heart_r[1], an.bx + an.heart[0]])
    for s in (RIGHT, LEFT):
        for pa, pb, r in ((pa_end, hila[s] + np.array([4.0, -6.0, 0.0]), an.r_pa * 0.72),
                          (hila[s] + np.array([-18.0, 4.0, 0.0]), heart_c, 6.5)):
            idx, w = splat_tubes(grid, pa[None], pb[None], np.array([r]), soft=0.5 * grid.px)
            idx = idx[w >= 0.5]
            ok = np.isin(tissue.flat[idx], (FAT, SOFT))
            tissue.flat[idx[ok]] = SOFT
            hu.flat[idx[ok]] = 40.0
    # ---- pulmonary trees
    bv, veins = Tree(), Tree()
    for s in (RIGHT, LEFT):
        sg = -1.0 if s == RIGHT else 1.0
        h = hila[s]
        roots = [((h), (1.0, 0.1, 0.4 * sg), 4.8),        # upper lobe (z, y, x)
                 ((h), (-0.5, -0.8, 0.5 * sg), 3.4),      # middle lobe / lingula
                 ((h), (-1.0, 0.4, 0.3 * sg), 5.2),       # lower lobe
                 ((h), (-0.2, 1.0, 0.2 * sg), 3.4)]       # superior segment of the lower lobe
        grow_tree(rng_t, side, grid, s, [(np.asarray(p, float), np.asarray(d, float), r) for p, d, r in roots], tree=bv)
        hv = h + np.array([-16.0, 6.0, 0.0])
        vroots = [(hv, (0.8, -0.3, 0.3 * sg), 4.6), (hv, (-0.9, 0.3, 0.3 * sg), 4.8),
                  (hv, (-0.3, -0.6, 0.6 * sg), 3.2)]
        grow_tree(rng_t, side, grid, s, [(np.asarray(p, float), np.asarray(d, float), r) for p, d, r in vroots], tree=veins)
    bv_arr = bv.arrays()
    vn_arr = veins.arrays()
    # ---- lesions
    les = Lesions(grid, an, side, rng_for(seed, STREAM_LESIONS))
    les.info["hila"] = {s: hila[s] for s in hila}
    if emphysema > 0:
        _emphysema(les, emphysema)
    if lesions:
        add_lesions(les, label, float(severity), bv_arr)
    les.info.pop("hila", None)
    truth_box = les.apply(hu)
    lesion = np.zeros(shape, np.float32)
    lesion[les.box] = truth_box
    # ---- vessels (arteries beside the airways, veins), then airway walls and lumens
    lung = side > 0
    p0, p1, r, gen, tside, term = bv_arr
    offs = np.zeros_like(p0)
    if len(p0):
        dvec = p1 - p0
        dvec /= np.maximum(np.linalg.norm(dvec, axis=1, keepdims=True), 1e-9)
        ref = np.where(np.abs(dvec[:, :1]) > 0.9, np.array([[0.0, 1.0, 0.0]]), np.array([[1.0, 0.0, 0.0]]))
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
            extra = np.zeros(shape, np.float32)
            extra.flat[idx] = w
            normal = np.zeros(shape, np.float32)
            normal.flat[n_idx] = n_w
            np.maximum(lesion, np.clip(extra - normal, 0, 1) * lung, out=lesion)
            del extra, normal
        idx, w = splat_tubes(grid, p0[air], p1[air], rl, faint=True)
        keep = lung.flat[idx]
        idx, w = idx[keep], w[keep]
        cur = hu.flat[idx]
        hu.flat[idx] = cur + w * (-990.0 - cur)
    # ---- scanner: kernel blur, correlated noise, quantisation, circular field of view
    sig = (max(0.35, 0.25 * scanner.slice_mm / grid.dz), scanner.kernel_mm / grid.px, scanner.kernel_mm / grid.px)
    out = ndimage.gaussian_filter(hu, sigma=sig, mode="nearest", truncate=3.0)
    rng_n = rng_for(seed, STREAM_NOISE)
    noise = rng_n.standard_normal(shape, dtype=np.float32)
    ns = 0.6
    noise = ndimage.gaussian_filter(noise, sigma=(0, ns, ns), mode="wrap", truncate=3.0)
    noise *= np.float32(scanner.noise_hu * 2.0 * ns * math.sqrt(math.pi))
    out += noise
    del noise
    np.rint(out, out=out)
    np.clip(out, -1024, 3071, out=out)
    volume = out.astype(np.int16)
    yx = grid.yx()
    fov = (yx[:, None] ** 2 + yx[None, :] ** 2) > (0.5 * grid.n * grid.px) ** 2
    volume[:, fov] = np.int16(scanner.padding_hu)
    tissue[:, fov] = PADDING
    mask = (side > 0).astype(np.uint8)
    info = dict(les.info)
    info.update(lesion_fraction=float((lesion[lung] > 0.5).mean()) if lung.any() else 0.0,
                n_vessel_segments=int(len(vr)), n_airway_segments=int(air.sum()))
    return dict(volume=volume, lung_mask=mask, tissue=tissue, lesion=lesion, side=side,
                spacing=grid.spacing, anatomy=an, info=info, grid=grid)
