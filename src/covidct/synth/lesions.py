"""The disease patterns: COVID-19, viral, bacterial, mycoplasma and fungal pneumonia, the EGFR
cohort's nodule, and emphysema, as lesion layers over the lungs."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

from covidct.synth.anatomy import LEFT, RIGHT, Anatomy, Grid, smoothstep
from covidct.synth.trees import perpendicular
from covidct.synth.tubes import splat_tubes


# --------------------------------------------------------------------------- smooth random fields
def _bspline_matrix(n_fine: int, n_coarse: int, step: float) -> np.ndarray:
    """Cubic B-spline weights (n_fine, n_coarse) of fine samples between coarse nodes ``step``
    apart."""
    pos = np.arange(n_fine) / step + 1.0          # node 0 lies one node before the first sample
    base = np.floor(pos).astype(int)
    f = pos - base
    w = np.stack([(1 - f) ** 3 / 6, (3 * f ** 3 - 6 * f ** 2 + 4) / 6,
                  (-3 * f ** 3 + 3 * f ** 2 + 3 * f + 1) / 6, f ** 3 / 6], axis=1)
    m = np.zeros((n_fine, n_coarse), np.float32)
    for j in range(4):
        m[np.arange(n_fine), np.clip(base - 1 + j, 0, n_coarse - 1)] += w[:, j]
    return m


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], spacing, scale_mm: float
) -> np.ndarray:
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


# --------------------------------------------------------------------------- lesions
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
            d = ndimage.distance_transform_edt(coarse, sampling=sp)[1:-1, 1:-1, 1:-1].astype(
                np.float32
            )
            for ax, k in enumerate(f):
                if k > 1:
                    d = np.repeat(d, k, axis=ax)
            d = d[:self.mask.shape[0], :self.mask.shape[1], :self.mask.shape[2]]
            self._dist = np.where(self.mask, np.maximum(d, 0.5 * min(self.grid.spacing)), 0).astype(
                np.float32
            )
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
        return n / norm if norm > 1e-6 else perpendicular(np.array([1.0, 0.0, 0.0]), self.rng)

    def lung_volume(self) -> float:
        return float(self.mask.sum()) * float(np.prod(self.grid.spacing))

    def sample_points(
        self, weight: np.ndarray, n: int, sides: list[int] | None = None
    ) -> np.ndarray:
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

    def blob(
        self,
        centre_idx,
        radii_mm,
        level: float,
        *,
        layer: str = "g",
        rough: float = 0.25,
        sharp: float = 0.18,
        rot=None,
        noise_scale: float | None = None,
    ) -> tuple[tuple, np.ndarray, np.ndarray]:
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
            q = q + rough * smooth_noise(
                self.rng, shape, g.spacing, noise_scale or max(radii.max() * 0.5, 3.0)
            )
        w = smoothstep(1.0 + sharp, 1.0 - sharp, q) * self.mask[sl]
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
        t1 = perpendicular(normal, rng)
        rot = np.stack([normal, t1, np.cross(normal, t1)])
        radii = r * np.array([0.6, 1.45, 1.15]) * rng.uniform(0.85, 1.15, 3)
        level = rng.uniform(-660, -430) + 130 * sev
        sl, w, q = les.blob(c, radii, level, layer="g", rough=0.3, rot=rot)
        if len(w) == 0:
            continue
        if rng.random() < 0.15 + 0.6 * sev:
            n_crazy += 1
            net = smooth_noise(rng, w.shape, g.spacing, 7.0)
            lines = np.exp(-(net / 0.25) ** 2) * smoothstep(0.3, 0.7, w)
            np.maximum(les.ret[sl], rng.uniform(140, 220) * lines, out=les.ret[sl])
        if rng.random() < 0.85 * sev ** 1.5:
            n_cons += 1
            core = smoothstep(0.62, 0.42, q) * les.mask[sl]
            les.add("c", sl, core, rng.uniform(15, 45))
    les.info.update(covid_blobs=int(len(centres)), bilateral=bool(bilateral), crazy_paving=n_crazy,
                    consolidated=n_cons, burden_target=round(burden, 4))


def _viral(les: Lesions, sev: float):
    rng, g = les.rng, les.grid
    burden = 0.04 + 0.32 * sev
    d = les.dist
    z, y, x = les.coords()
    hil = np.zeros(les.mask.shape, np.float32)
    for h in les.info.get("hila", {}).values():
        hil = np.maximum(
            hil, np.exp(-np.sqrt((z - h[0]) ** 2 + (y - h[1]) ** 2 + (x - h[2]) ** 2) / 70.0)
        )
    field = (smooth_noise(rng, les.mask.shape, g.spacing, 22.0)
             + 2.2 * (1 - np.exp(-d / 14.0)) + 0.8 * hil)
    peripheral = rng.random() < 0.25
    if peripheral:
        field += 0.7 * np.exp(-d / 10.0)
    vals = field[les.mask]
    thr = float(np.quantile(vals, 1 - burden)) if vals.size else 0.0
    w = smoothstep(thr - 0.3, thr + 0.3, field) * les.mask
    level = (
        rng.uniform(-690, -520) + 90 * sev + 25 * smooth_noise(rng, les.mask.shape, g.spacing, 15.0)
    )
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
    dist = np.sqrt(
        ((zz - seed[0]) * sp[0]) ** 2
        + ((yy - seed[1]) * sp[1]) ** 2
        + ((xx - seed[2]) * sp[2]) ** 2
    )
    scale = float(dist[region].max()) + 1.0
    score = -dist / scale + 0.18 * smooth_noise(rng, region.shape, g.spacing, 14.0)
    thr = float(np.quantile(score[region], 1 - frac))
    cons = smoothstep(thr - 0.03, thr + 0.03, score) * region
    les.add("c", (slice(None),) * 3, cons.astype(np.float32), rng.uniform(18, 42))
    halo = smoothstep(thr - 0.22, thr - 0.02, score) * region * 0.85
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
    for i in (
        rng.choice(cand, size=min(len(cand), 2 + int(5 * sev)), replace=False) if len(cand) else []
    ):
        c = np.rint(g.to_index(p1[i])).astype(int) - les.offset
        if np.all(c >= 0) and np.all(c < les.mask.shape):
            les.blob(
                c,
                rng.uniform(6, 14) * np.array([1.4, 1.0, 0.8]),
                rng.uniform(-640, -480),
                rough=0.3,
            )
    les.info.update(
        mycoplasma_sides=len(sides), tree_in_bud=int(n), wall_factor=round(2.5 + 1.5 * sev, 2)
    )


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
        sl, w, q = les.blob(
            c,
            np.full(3, r) * rng.uniform(0.85, 1.15, 3),
            rng.uniform(15, 40),
            layer="c",
            rough=0.15,
            rot=rot,
        )
        if len(w) and rng.random() < 0.3:
            cav += 1
            core = smoothstep(0.5, 0.35, q) * les.mask[sl]
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


# --------------------------------------------------------------------------- the dense cases
# Dense lesions against the lung's walls (the cases a threshold mask loses): each is solid
# consolidation (15-45 HU), so its exact mask is the lesion weight over one half.

def _lobar_wall(les: Lesions, sev: float):
    """Lobar consolidation of the right lower lobe against the lateral and posterior chest wall."""
    rng = les.rng
    z, y, x = les.coords()
    an = les.an
    lateral = np.clip((an.bx - x) / max(0.5 * an.A, 1.0), 0, 1)      # right = lower x
    posterior = np.clip((y - an.by) / max(an.B_post, 1.0), 0, 1)
    depth = (20.0 + 25.0 * sev) * (0.4 + 0.6 * np.maximum(lateral, posterior))
    region = (les.lobes() == 3) & (les.dist < depth)
    w = smoothstep(0.0, 1.0, ndimage.gaussian_filter(region.astype(np.float32), 0.7) * 2.0)
    les.add("c", (slice(None),) * 3, (w * les.mask).astype(np.float32), rng.uniform(20, 40))
    les.info.update(case="lobar_wall", lobe=3)


def _paravertebral_mass(les: Lesions, sev: float):
    """A solid mass in the lung beside the spine (a paravertebral gutter), 20-30 mm across."""
    rng = les.rng
    an = les.an
    side = int(rng.choice([RIGHT, LEFT]))
    z, y, x = les.coords()
    spine = ((y - (an.by + an.sp_v)) ** 2 + (x - an.bx) ** 2)
    z_level = an.z_carina - rng.uniform(30, 60)
    r = 14.0 + 6.0 * sev
    # the centre: the lung point nearest the spine at that level, 0.8 radii from the pleura
    inner = (les.side == side) & (les.dist >= 0.8 * r)
    score = np.where(inner, np.sqrt(spine) + 2.0 * np.abs(z - z_level), np.inf)
    c = np.array(np.unravel_index(int(np.argmin(score)), score.shape))
    les.blob(c, np.array([1.3, 1.0, 1.0]) * r, rng.uniform(25, 45), layer="c", rough=0.12,
             sharp=0.12)
    les.info.update(case="paravertebral_mass", side="right" if side == RIGHT else "left",
                    mass_radius_mm=round(r, 1))


def _basal_subpleural(les: Lesions, sev: float):
    """Dense subpleural COVID-19 consolidation at both bases, posterior, on the pleura, with a
    ground-glass rim."""
    rng, g = les.rng, les.grid
    z, y, x = les.coords()
    an = les.an
    low = np.clip(1.0 - (z - an.z_dome_l) / 70.0, 0, 1)
    posterior = np.clip((y - an.by + 0.2 * an.B_ant) / (0.6 * an.B_post + 0.2 * an.B_ant), 0, 1)
    band = (4.0 + 6.0 * sev) * (0.3 + 0.7 * posterior) * low
    field = band - les.dist + 3.0 * smooth_noise(rng, les.mask.shape, g.spacing, 12.0)
    core = smoothstep(-1.0, 1.0, field) * les.mask * (low > 0)
    rim = smoothstep(-6.0, -1.0, field) * les.mask * 0.9 * (low > 0)
    les.add("c", (slice(None),) * 3, core.astype(np.float32), rng.uniform(15, 40))
    les.add("g", (slice(None),) * 3, rim.astype(np.float32), rng.uniform(-560, -420))
    les.info.update(case="basal_subpleural")


CASES = {"lobar_wall": _lobar_wall, "paravertebral_mass": _paravertebral_mass,
         "basal_subpleural": _basal_subpleural}


def add_lesions(les: Lesions, label: str, sev: float, airways: tuple, case: str = ""):
    """The label's lesions, or with ``case`` one of the dense :data:`CASES` instead."""
    if case:
        if case not in CASES:
            raise ValueError(f"no lesion case {case!r} (known: {', '.join(CASES)})")
        CASES[case](les, sev)
    elif label == "covid":
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
