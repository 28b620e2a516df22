"""Tubes rasterised onto the voxel grid with partial volume: vessels, airways, mediastinum."""

from __future__ import annotations

import math

import numpy as np

from covidct.synth.anatomy import Grid


def splat_tubes(
    grid: Grid,
    p0: np.ndarray,
    p1: np.ndarray,
    r0: np.ndarray,
    r1: np.ndarray | None = None,
    *,
    soft: float | None = None,
    faint: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
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
        dist = np.sqrt(
            (gz - a[0] - t * d[0]) ** 2 + (gy - a[1] - t * d[1]) ** 2 + (gx - a[2] - t * d[2]) ** 2
        )
        w = np.clip((r0[k] + t * (r1[k] - r0[k]) - dist) / soft + 0.5, 0.0, 1.0)
        nz = np.nonzero(w > 0)
        if len(nz[0]) == 0:
            continue
        out_i.append(
            np.ravel_multi_index((nz[0] + lo[0], nz[1] + lo[1], nz[2] + lo[2]), grid.shape)
        )
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
