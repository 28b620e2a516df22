"""The phantom's scanner: reconstruction-kernel blur, correlated noise, int16 quantisation and
padding outside the circular scan field."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from covidct.synth.anatomy import STREAM_NOISE, Grid, rng_for


@dataclass
class Scanner:
    slice_mm: float = 2.5
    pixel_mm: float = 2.75
    matrix: int = 128
    n_slices: int = 120
    noise_hu: float = 12.0
    kernel_mm: float = 0.9
    padding_hu: int = -3024

    def grid(self) -> Grid:
        return Grid(nz=int(self.n_slices), n=int(self.matrix), dz=float(self.slice_mm),
                    px=float(self.pixel_mm))


def acquire(hu: np.ndarray, grid: Grid, scanner: Scanner, seed: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """The scan of the tissue HU map ``hu``: ``(int16 volume, (y, x) mask outside the field)``."""
    sig = (max(0.35, 0.25 * scanner.slice_mm / grid.dz), scanner.kernel_mm / grid.px,
           scanner.kernel_mm / grid.px)
    out = ndimage.gaussian_filter(hu, sigma=sig, mode="nearest", truncate=3.0)
    rng_n = rng_for(seed, STREAM_NOISE)
    noise = rng_n.standard_normal(grid.shape, dtype=np.float32)
    ns = 0.6
    noise = ndimage.gaussian_filter(noise, sigma=(0, ns, ns), mode="wrap", truncate=3.0)
    noise *= np.float32(scanner.noise_hu * 2.0 * ns * math.sqrt(math.pi))
    out += noise
    del noise
    np.rint(out, out=out)
    np.clip(out, -1024, 3071, out=out)
    volume = out.astype(np.int16)
    yx = grid.yx()
    outside = (yx[:, None] ** 2 + yx[None, :] ** 2) > (0.5 * grid.n * grid.px) ** 2
    volume[:, outside] = np.int16(scanner.padding_hu)
    return volume, outside
