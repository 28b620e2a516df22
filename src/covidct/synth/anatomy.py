"""The phantom's anatomy: one patient's body and organ geometry and its closed-form tissues.

The phantom lives in millimetres in a patient frame along the LPS image axes: ``x`` towards the
patient's left, ``y`` towards the back, ``z`` towards the head; ``x`` and ``y`` are 0 at the
centre of the reconstructed field and ``z`` is 0 at the first (most inferior) slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Tissue codes of the truth map returned by :func:`covidct.synth.phantom.render`.
AIR, FAT, MUSCLE, BONE, CARTILAGE, SOFT, LUNG, AIRWAY, TABLE, GAS, PADDING = range(11)
TISSUE_NAMES = ("air", "fat", "muscle", "bone", "cartilage", "soft", "lung", "airway", "table",
                "gas", "padding")
RIGHT, LEFT = 1, 2

# Random streams of one patient (numpy default_rng([seed, stream])).
STREAM_ANATOMY, STREAM_TREES, STREAM_LESIONS, STREAM_NOISE, STREAM_CLINICAL, STREAM_HEADER = range(
    6
)


def rng_for(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(stream)])


# --------------------------------------------------------------------------- geometry
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


def draw_anatomy(
    rng: np.random.Generator, grid: Grid, *, sex: str = "M", age: float = 50.0
) -> Anatomy:
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




def polyline(
    points: list[tuple[float, float, float]], an: Anatomy
) -> tuple[np.ndarray, np.ndarray]:
    """(u, v, z) body-relative points -> segment endpoints (p0, p1) in zyx mm."""
    pts = np.array([(z, an.by + v, an.bx + u) for u, v, z in points], dtype=np.float64)
    return pts[:-1], pts[1:]


# --------------------------------------------------------------------------- tissues, slab by slab
def smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
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
            e = (
                ((u - s * 0.45 * an.a) / (42 * an.breast)) ** 2
                + ((v + an.b_ant * 0.85) / (34 * an.breast)) ** 2
                + ((z - zb) / (45 * an.breast)) ** 2
            )
            br |= bc(e < 1.0)
        paint(br & ~body & bc(v < 0), FAT, -95.0)
    # ---- layers: fat, muscle, rib layer, cavity
    paint(body, FAT, -100.0)
    d_mus = an.fat + an.muscle
    paint(body & (depth >= an.fat), MUSCLE, 45.0)
    cavity = body & (depth >= an.cav)
    paint(cavity, FAT, -85.0)            # mediastinal and extrapleural fat
    # ---- paraspinal muscles
    paint(
        body & (depth >= an.fat) & bc((np.abs(u) < an.r_vb + 28) & (v > an.sp_v - 4)), MUSCLE, 48.0
    )
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
    cap = (
        ((np.abs(u) - xc) / ax) ** 2
        + ((v - yc) / ay) ** 2
        + ((z - z_ap0) / (an.z_apex - z_ap0)) ** 2
    )
    apex = bc((z <= z_ap0) | (cap <= 1.0))
    heart_ex = bc(
        (((u - hx) / (hrx + 7)) ** 2 + ((v - hy) / (hry + 7)) ** 2 + ((z - hz) / (hrz + 7)) ** 2)
        > 1.0
    )
    spine_ex = bc(
        ((u * u + (v - an.sp_v) ** 2) > (an.r_vb + 7) ** 2)
        & ~((v > an.sp_v) & (np.abs(u) < an.r_vb + 16))
    )
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
