"""The dense lesions each lung's cavity holds: what the threshold method adds to the air.

Consolidation, masses, pleural-based lesions and dense ground glass are not air, so a threshold
leaves them out wherever they touch the chest wall, the spine, the diaphragm or the mediastinum.
Classically, on the working grid, per lung, the fill is the lesion tissue (neither air, nor a
fat plane, nor bone, nor the rib cage, nor the hilum) that

- lies where lung is expected: lung both above and below it within ``enclose_mm`` (a lesion is
  enclosed by lung in z; the liver under the dome, the heart and the chest wall are not), or
  inside the other lung's mirror image (a lung's cavity is about the other's), moved to this
  lung's dome (:func:`dome_offset`) and ``mirror_lift_mm`` higher (the liver, spleen and
  stomach under the domes stay out), and in this lung's upper third only under its air (the
  neck beside the apex stays out);
- lies no nearer the midline than the row's medial-most air (the heart, the hilum and the
  mediastinum stay out; a row without air takes all); behind the vertebral bodies' front, the
  medial-most air of the slices within ``medial_mm`` (a mass in the paravertebral gutter
  pushes the air back in its own slices only; the aorta beside the spine stays out);
- survives an in-plane opening (no one-voxel rims of chest wall), touches the lung in its own
  slice (a fully consolidated slice: in 3-D) and holds at least ``min_lesion_ml``;
- with the air bronchograms and vessels it encloses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from covidct.preprocess.morphology import bbox_slices, fill_holes_2d


@dataclass(frozen=True)
class CavityRules:
    """The tissue limits, sizes and priors of the lesion fill."""

    fat_hu: tuple[float, float] = (-220.0, -35.0)
    fat_plane_fraction: float = 0.3
    bone_hu: float = 160.0
    rib_gap_mm: float = 30.0
    enclose_mm: float = 70.0
    hilum_mm: float = 30.0
    mirror_lift_mm: float = 5.0
    dome_peak_ratio: float = 2.5
    medial_mm: float = 15.0
    spine_half_width_mm: float = 25.0
    min_lesion_ml: float = 3.0


IN_PLANE = np.zeros((3, 3, 3), bool)
IN_PLANE[1] = ndi.generate_binary_structure(2, 1)
CROSS = ndi.generate_binary_structure(3, 1)


# --------------------------------------------------------------------------- tissue

def lesion_tissue(hu: np.ndarray, threshold: float, rules: CavityRules) -> np.ndarray:
    """Voxels that may be lesion: not air, not bone, not part of a fat plane (fat-range voxels
    with at least ``fat_plane_fraction`` of the 3 x 3 pixels around them fat too)."""
    fat = (hu >= rules.fat_hu[0]) & (hu < rules.fat_hu[1])
    share = ndi.uniform_filter(fat.astype(np.float32), size=(1, 3, 3), mode="nearest")
    return (hu >= threshold) & (hu < rules.bone_hu) & ~(fat & (share >= rules.fat_plane_fraction))


def lung_above(lung: np.ndarray, n: int) -> np.ndarray:
    """True where ``lung`` holds a voxel of the same column in the ``n`` slices above."""
    nz = lung.shape[0]
    c = np.concatenate([np.zeros((1,) + lung.shape[1:], np.int32),
                        np.cumsum(lung, axis=0, dtype=np.int32)])
    z = np.arange(nz)
    return (c[np.minimum(z + 1 + n, nz)] - c[np.minimum(z + 1, nz)]) > 0


def present_around(mask: np.ndarray, n: int) -> np.ndarray:
    """True where ``mask`` holds a voxel of the same column both in the ``n`` slices below and
    in the ``n`` slices above."""
    nz = mask.shape[0]
    c = np.concatenate([np.zeros((1,) + mask.shape[1:], np.int32),
                        np.cumsum(mask, axis=0, dtype=np.int32)])
    z = np.arange(nz)
    below = c[z] - c[np.maximum(z - n, 0)]
    above = c[np.minimum(z + 1 + n, nz)] - c[np.minimum(z + 1, nz)]
    return (below > 0) & (above > 0)


def rib_cage(hu: np.ndarray, spacing, rules: CavityRules) -> np.ndarray:
    """The rib cage: bone closed along z over the intercostal spaces (``rib_gap_mm``)."""
    bone = hu >= rules.bone_hu
    return bone | present_around(bone, max(1, int(round(rules.rib_gap_mm / spacing[0]))))


def near_hilum(airway: np.ndarray | None, spacing, rules: CavityRules) -> np.ndarray | None:
    """Voxels within ``hilum_mm`` of the trachea and main bronchi (None without an airway)."""
    if airway is None or not airway.any():
        return None
    margin = tuple(int(np.ceil(rules.hilum_mm / s)) + 1 for s in spacing)
    box = bbox_slices(airway, margin)
    near = np.zeros(airway.shape, bool)
    near[box] = ndi.distance_transform_edt(~airway[box], sampling=spacing) <= rules.hilum_mm
    return near


# --------------------------------------------------------------------------- where lung belongs

def body_midline(body: np.ndarray) -> float:
    """The x of the body's centre line (the middle of its widest extent)."""
    xs = np.nonzero(body.any(axis=(0, 1)))[0]
    return 0.5 * (xs[0] + xs[-1]) if xs.size else body.shape[2] / 2


def spine_front(hu: np.ndarray, body: np.ndarray, mid_x: float, spacing,
                rules: CavityRules) -> float:
    """The y of the vertebral bodies' front: the median over the slices of the front-most bone
    within ``spine_half_width_mm`` of the midline in the body's back half (the back half's
    start where no slice holds such bone)."""
    ys = np.nonzero(body.any(axis=(0, 2)))[0]
    if not ys.size:
        return hu.shape[1] / 2
    centre = 0.5 * (ys[0] + ys[-1])
    half = max(1, int(round(rules.spine_half_width_mm / spacing[2])))
    x0, x1 = max(0, int(mid_x) - half), int(mid_x) + half + 1
    y0 = int(np.ceil(centre))
    bone = hu[:, y0:, x0:x1] >= rules.bone_hu
    has = bone.any(axis=(1, 2))
    if not has.any():
        return centre
    front = bone.any(axis=2).argmax(axis=1)[has]
    return y0 + float(np.median(front))


def mirror_x(mask: np.ndarray, mid_x: float) -> np.ndarray:
    """``mask`` mirrored about the column ``mid_x``."""
    nx = mask.shape[2]
    xs = np.rint(2 * mid_x - np.arange(nx)).astype(int)
    ok = (xs >= 0) & (xs < nx)
    out = np.zeros_like(mask)
    out[:, :, ok] = mask[:, :, xs[ok]]
    return out


def shift_z(mask: np.ndarray, k: int) -> np.ndarray:
    """``mask`` moved ``k`` slices up (towards higher z; down for negative k)."""
    if k == 0:
        return mask
    out = np.zeros_like(mask)
    if k > 0:
        out[k:] = mask[:-k]
    else:
        out[:k] = mask[-k:]
    return out


def lateral_of_air(lung: np.ndarray, is_right: bool, n: int = 0) -> np.ndarray:
    """Per (z, y) row, the columns no nearer the midline than the medial-most air of that row
    in the slices within ``n`` of it (the whole row where they hold none); the right lung lies
    at lower x."""
    nx = lung.shape[2]
    if n > 0:
        lung = ndi.maximum_filter1d(lung.view(np.uint8), 2 * n + 1, axis=0).view(bool)
    has = lung.any(axis=2)
    x = np.arange(nx)[None, None, :]
    if is_right:
        edge = np.where(has, nx - 1 - lung[:, :, ::-1].argmax(axis=2), nx)
        return x <= edge[:, :, None]
    edge = np.where(has, lung.argmax(axis=2), -1)
    return x >= edge[:, :, None]


def medial_limit(lung: np.ndarray, is_right: bool, behind: np.ndarray, n: int) -> np.ndarray:
    """:func:`lateral_of_air` of each row; in the rows ``behind`` the spine's front (a 1-D mask
    over y), of the slices within ``n``."""
    return np.where(behind[None, :, None], lateral_of_air(lung, is_right, n),
                    lateral_of_air(lung, is_right))


def lowest_air(lung: np.ndarray) -> np.ndarray:
    """Per (y, x) column the lowest slice holding this lung's air (-1 where none)."""
    return np.where(lung.any(axis=0), lung.argmax(axis=0), -1)


def dome_offset(right_lung: np.ndarray, left_lung: np.ndarray, mid_x: float,
                rules: CavityRules) -> int:
    """Slices the right dome lies above the left: the median difference of the two lungs'
    lowest air over the columns both hold air in (the left mirrored), or, where the commonest
    difference stands out (``dome_peak_ratio`` times any 2-4 slices from it), that one.

    Columns where both bases are aerated agree on one offset; a consolidated base lifts its
    lowest air and drags the median towards the wrong side.
    """
    right = lowest_air(right_lung)
    left = lowest_air(mirror_x(left_lung, mid_x))
    both = (right >= 0) & (left >= 0)
    if not both.any():
        return 0
    diff = (right - left)[both]
    counts = np.pad(np.bincount(diff - diff.min()), 4)
    peak = int(counts.argmax())
    near = np.r_[counts[peak - 4:peak - 1], counts[peak + 2:peak + 5]].max()
    if counts[peak] >= rules.dome_peak_ratio * max(1, near):
        return int(diff.min()) + peak - 4
    return int(np.median(diff))


def expected_lung(lung: np.ndarray, other: np.ndarray, mid_x: float, dz: int, spacing,
                  rules: CavityRules) -> np.ndarray:
    """Where this lung's cavity is expected: enclosed by its air in z, or in the other lung's
    mirror image moved ``dz`` slices up (to this dome's height), not above this lung's apex."""
    n = max(1, int(round(rules.enclose_mm / spacing[0])))
    env = present_around(lung, n)
    if other.any():
        zs = np.nonzero(lung.any(axis=(1, 2)))[0]
        upper = np.arange(lung.shape[0]) > zs[0] + 2 * (zs[-1] - zs[0]) / 3
        env |= shift_z(mirror_x(other, mid_x), dz) & (lung_above(lung, lung.shape[0])
                                                      | ~upper[:, None, None])
    return env


def touching_lung(candidate: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """The parts of ``candidate`` that touch the lung in their own slice; in slices without
    air, the 3-D connected parts that touch it anywhere."""
    def touching(structure):
        lab, n = ndi.label(candidate, structure=structure)
        keep = np.zeros(n + 1, bool)
        keep[np.unique(lab[ndi.binary_dilation(lung, structure=structure)])] = True
        keep[0] = False
        return keep[lab]

    no_air = ~lung.any(axis=(1, 2))
    in_plane = touching(IN_PLANE)
    if no_air.any():
        in_plane |= touching(CROSS) & no_air[:, None, None]
    return in_plane


# --------------------------------------------------------------------------- the fill

def large_parts(mask: np.ndarray, spacing, min_ml: float) -> np.ndarray:
    """The 3-D connected parts of ``mask`` of at least ``min_ml``."""
    lab, n = ndi.label(mask, structure=CROSS)
    if n == 0:
        return mask
    ml = np.bincount(lab.ravel()) * float(np.prod(spacing)) / 1000.0
    keep = ml >= min_ml
    keep[0] = False
    return keep[lab]


def pathology_fill(hu: np.ndarray, sides: np.ndarray, body: np.ndarray, spacing,
                   threshold: float, airway: np.ndarray | None = None,
                   rules: CavityRules = CavityRules(), right: int = 1,
                   left: int = 2) -> np.ndarray:
    """The lesion tissue to add to each lung: a label map (``right``/``left``) of the fill.

    ``sides`` labels the aerated lungs on the working grid of ``hu`` (HU); ``airway`` (the
    trachea and main bronchi) marks the hila, where no fill goes.
    """
    spacing = tuple(float(s) for s in spacing)
    free = lesion_tissue(hu, threshold, rules) & body & (sides == 0)
    free &= ~rib_cage(hu, spacing, rules)
    hilum = near_hilum(airway, spacing, rules)
    if hilum is not None:
        free &= ~hilum
    mid_x = body_midline(body)
    xcol = np.arange(hu.shape[2])[None, None, :]
    offset = dome_offset(sides == right, sides == left, mid_x, rules)
    lift = int(round(rules.mirror_lift_mm / spacing[0]))
    medial = int(round(rules.medial_mm / spacing[0]))
    behind = (np.arange(hu.shape[1]) >= spine_front(hu, body, mid_x, spacing, rules))
    fill = np.zeros(hu.shape, np.uint8)
    for s, o in ((right, left), (left, right)):
        lung = sides == s
        if not lung.any():
            continue
        own_half = (xcol <= mid_x) if s == right else (xcol >= mid_x)
        dz = (offset if s == right else -offset) + lift
        env = expected_lung(lung, sides == o, mid_x, dz, spacing, rules)
        # opened in-plane (no one-voxel rims of chest wall) and lateral of the medial-most air
        cand = free & env & own_half & medial_limit(lung, s == right, behind, medial)
        cand = ndi.binary_opening(cand, structure=IN_PLANE)
        found = large_parts(touching_lung(cand, lung), spacing, rules.min_lesion_ml)
        found = fill_holes_2d(found | lung) & ~lung & body       # air bronchograms, vessels
        fill[found & (fill == 0)] = s
    return fill
