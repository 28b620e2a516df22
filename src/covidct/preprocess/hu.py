"""Canonical orientation and Hounsfield units: LPS axes, padding set to air, int16."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from covidct.params import IngestParams

AIR_HU = IngestParams.air            # the usual scanner floor, and the floor the FPN applies
PADDING_SENTINELS_HU = (-2000, -2048, -3024)


def orient_lps(image):
    """Reorient to LPS (identity direction for axis-aligned scans); returns (image, source dir)."""
    import SimpleITK as sitk

    source = tuple(float(d) for d in image.GetDirection())
    if not np.allclose(source, np.eye(3).ravel()):
        image = sitk.DICOMOrient(image, "LPS")
    return image, source


def repair_hu(array: np.ndarray, *, padding_below: float = IngestParams.padding_below,
              padding_values: Sequence[float] = (), air: int = AIR_HU
              ) -> tuple[np.ndarray, int]:
    """Padding -> ``air``, rounded and clipped to int16. Returns (int16 array, voxels replaced).

    Padding is: the sentinels -2000/-2048/-3024, the DICOM padding value or range (in HU), and
    anything below ``padding_below``. ``array`` is never modified (it may be a read-only view).
    """
    info = np.iinfo(np.int16)
    if array.dtype.kind == "f":
        array = np.rint(array)
    if array.dtype == np.int16:
        out = np.array(array)                   # a writable copy
    else:
        if array.min() < info.min or array.max() > info.max:
            array = np.clip(array, info.min, info.max)
        out = array.astype(np.int16)            # one pass; the checks below run on int16
    padding = out < padding_below
    for value in PADDING_SENTINELS_HU:
        if value >= padding_below:
            padding |= out == value
    if len(padding_values) == 1:
        padding |= out == padding_values[0]
    elif len(padding_values) == 2:
        lo, hi = sorted(padding_values)
        padding |= (out >= lo) & (out <= hi)
    n = int(np.count_nonzero(padding))
    if n:
        out[padding] = air
    return out, n
