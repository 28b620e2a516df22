"""Batches of lung ROIs for Keras, read from per-patient ``roi.zarr`` stores.

:class:`RoiDataset` is a ``keras.utils.PyDataset`` read by threads (Zarr and Blosc release the
GIL). Shuffling and augmentation are drawn from generators seeded by (seed, epoch, patient), so a
run is reproducible whatever order the threads finish in. Batches are float32 (B, D, H, W, 1),
with labels ``(x, y)`` or, with class weights, ``(x, y, w)``.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from scipy import ndimage

from covidct.errors import CovidctError
from covidct.io.stores import open_image, read_array, read_label, store_patient


@dataclass(frozen=True)
class Augment:
    """Ranges of the random slice-wise affine (uniform draws, one per volume)."""

    rotation_deg: float = 10.0      # in-plane rotation in [-r, r] degrees
    scale: float = 0.1              # isotropic in-plane zoom in [1 - s, 1 + s]
    shift: float = 0.05             # in-plane shift in [-s, s] x the slice size (y and x)
    order: int = 1                  # spline order of the resampling (1 = linear)
    non_lung: float = 0.0           # probability of randomising the voxels outside the lung
    noise: float = 0.0              # additive Gaussian noise, sd drawn in [0, noise] (z units)
    blur: float = 0.0               # in-plane Gaussian blur, sigma drawn in [0, blur] voxels


def roi_metadata(roi_path: str | Path) -> tuple[tuple[int, int, int], dict]:
    """The (D, H, W) and the attributes of a ROI store, read from its metadata (no voxels)."""
    image = open_image(roi_path, what="ROI", patient=store_patient(roi_path))
    shape = tuple(int(s) for s in image.array.shape)
    if len(shape) != 3:
        raise CovidctError(f"ROI must be 3-D (D, H, W), found shape {shape}",
                           patient=store_patient(roi_path, image.attrs), path=roi_path)
    return shape, dict(image.attrs)  # type: ignore[return-value]


def slicewise_affine(volume: np.ndarray, rng: np.random.Generator,
                     augment: Augment = Augment()) -> np.ndarray:
    """Rotate, zoom and shift every slice of ``volume`` (D, H, W) by the same random transform.

    The transform maps output (y, x) to input coordinates about the slice centre; the z axis is
    untouched. Voxels mapped from outside the ROI take the nearest edge value.
    """
    _, h, w = volume.shape
    angle = math.radians(rng.uniform(-augment.rotation_deg, augment.rotation_deg))
    zoom = rng.uniform(1.0 - augment.scale, 1.0 + augment.scale)
    shift = rng.uniform(-augment.shift, augment.shift, size=2) * np.array([h, w])
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    matrix = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    centre = np.array([0.0, (h - 1) / 2.0, (w - 1) / 2.0])
    offset = centre - matrix @ (centre + np.array([0.0, shift[0], shift[1]]))
    return ndimage.affine_transform(volume, matrix, offset=offset, order=augment.order,
                                    mode="nearest", output=np.float32)


def randomise_non_lung(volume: np.ndarray, lung: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
    """``volume`` with every voxel outside ``lung`` (nonzero = lung) set to one random level
    (uniform over the volume's range) plus Gaussian noise of a random sd in [0, 0.5]."""
    outside = np.asarray(lung) == 0
    if outside.shape != volume.shape:
        raise ValueError(f"lung label {outside.shape} and ROI {volume.shape} differ in shape")
    out = np.array(volume, dtype=np.float32, copy=True)
    n = int(outside.sum())
    if n == 0:
        return out
    level = rng.uniform(float(volume.min()), float(volume.max()))
    sd = rng.uniform(0.0, 0.5)
    out[outside] = level + sd * rng.standard_normal(n, dtype=np.float32)
    return out


def blur_and_noise(volume: np.ndarray, rng: np.random.Generator, blur: float,
                   noise: float) -> np.ndarray:
    """In-plane Gaussian blur (sigma in [0, blur] voxels) then additive Gaussian noise (sd in
    [0, noise]), as scanners' reconstruction kernels and doses differ."""
    out = np.asarray(volume, dtype=np.float32)
    if blur > 0:
        sigma = rng.uniform(0.0, blur)
        out = ndimage.gaussian_filter(out, sigma=(0.0, sigma, sigma), mode="nearest")
    if noise > 0:
        out = out + rng.uniform(0.0, noise) * rng.standard_normal(out.shape, dtype=np.float32)
    return out


class RoiDataset(keras.utils.PyDataset):
    """Batches of ROIs from ``roi.zarr`` stores, optionally with labels and sample weights.

    Args:
        paths: one roi.zarr per patient.
        labels: 0/1 per path (None: batches are ``(x,)`` for prediction).
        batch_size: patients per batch; the last batch may be smaller.
        shuffle: a new seeded permutation at every epoch.
        seed: seeds shuffling and augmentation.
        class_weight: {label: weight}; adds a third element, the per-sample weights.
        augment: None/False (off), True (default :class:`Augment`) or an :class:`Augment`.
        cache: keep up to this many decoded volumes in memory (0 = read every time).
        workers: threads reading the volumes of a batch. Keras itself reads the batches one
            after the other: its threaded reader (``PyDataset(workers > 1)``) fetches the next
            epoch's first batches before ``on_epoch_end`` has drawn that epoch's order, so the
            batches, and the trained weights, would depend on thread timing.
        use_multiprocessing, max_queue_size: as ``keras.utils.PyDataset``
            (``use_multiprocessing`` must stay False: the reads run in threads).
    """

    def __init__(self, paths: Sequence[str | Path], labels: Sequence[int] | None = None, *,
                 batch_size: int = 4, shuffle: bool = False, seed: int = 0,
                 class_weight: Mapping[int, float] | None = None,
                 augment: Augment | bool | None = None, cache: int = 0,
                 workers: int = 1, use_multiprocessing: bool = False, max_queue_size: int = 10):
        if use_multiprocessing:
            raise ValueError(
                "RoiDataset reads Zarr with threads; use_multiprocessing must be False"
            )
        super().__init__(workers=1, use_multiprocessing=False, max_queue_size=max_queue_size)
        self.readers = max(1, int(workers))
        self._pool: ThreadPoolExecutor | None = None
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise CovidctError("no ROI stores given")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.labels = None if labels is None else np.asarray(labels, dtype=np.float32)
        if self.labels is not None and len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.labels)} labels for {len(self.paths)} ROI stores")
        if class_weight is not None and self.labels is None:
            raise ValueError("class_weight needs labels")
        self.class_weight = None if class_weight is None else {
            int(k): float(v) for k, v in class_weight.items()}
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.augment = Augment() if augment is True else (augment or None)
        self.cache_size = int(cache)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.epoch = 0
        self.read_seconds = 0.0     # time spent inside __getitem__ (benchmarks read it)
        self.order = self._order_for(0)

    # ---- ordering -------------------------------------------------------------------------
    def _order_for(self, epoch: int) -> np.ndarray:
        n = len(self.paths)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def on_epoch_end(self):
        self.epoch += 1
        self.order = self._order_for(self.epoch)

    def start_at(self, epoch: int) -> None:
        """Continue at ``epoch`` (0-based), in the order an uninterrupted run has there."""
        self.epoch = int(epoch)
        self.order = self._order_for(self.epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def batch_indices(self, index: int) -> np.ndarray:
        """Indices into ``paths`` of batch ``index`` in the current epoch."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range (0..{len(self) - 1})")
        return self.order[index * self.batch_size:(index + 1) * self.batch_size]

    # ---- reading --------------------------------------------------------------------------
    def read(self, i: int) -> np.ndarray:
        """The (D, H, W) volume of patient ``i`` as stored (float16 from the roi stage), from the
        cache when it holds it; batches convert it to float32 as they are filled."""
        if self.cache_size:
            with self._lock:
                hit = self._cache.get(i)
                if hit is not None:
                    self._cache.move_to_end(i)
                    return hit
        path = self.paths[i]
        try:
            volume = np.asarray(read_array(path))
        except Exception as err:     # a broken store: name the patient and the store
            raise CovidctError(f"cannot read ROI store ({err})", patient=store_patient(path),
                               path=path) from err
        if volume.ndim != 3:
            raise CovidctError(f"ROI must be 3-D (D, H, W), found shape {volume.shape}",
                               patient=store_patient(path), path=path)
        if self.cache_size:
            volume.setflags(write=False)
            with self._lock:
                self._cache[i] = volume
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return volume

    def lung(self, i: int) -> np.ndarray:
        """Patient ``i``'s lung label on the ROI grid (uint8), from its roi.zarr."""
        path = self.paths[i]
        try:
            lung = read_label(path, "lung")
        except Exception as err:     # a broken store: name the patient and the store
            raise CovidctError(f"cannot read the ROI's lung label ({err})",
                               patient=store_patient(path), path=path) from err
        if lung is None:
            raise CovidctError("the ROI store has no lung label (labels/lung), which non-lung "
                               "augmentation needs: re-run the roi stage, or set "
                               "training.augment_non_lung: 0", patient=store_patient(path),
                               path=path)
        return lung

    def sample(self, i: int, epoch: int | None = None) -> np.ndarray:
        """Patient ``i``'s volume as the network sees it in ``epoch`` (augmented if configured)."""
        volume = self.read(i)
        aug = self.augment
        if aug is not None:
            volume = np.asarray(volume, dtype=np.float32)          # scipy.ndimage: no float16
            rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, i,
                                         0xA06])
            if aug.non_lung > 0 and rng.random() < aug.non_lung:
                volume = randomise_non_lung(volume, self.lung(i), rng)
            volume = slicewise_affine(volume, rng, aug)
            if aug.blur > 0 or aug.noise > 0:
                volume = blur_and_noise(volume, rng, aug.blur, aug.noise)
        return volume

    def __getitem__(self, index: int):
        import time

        start = time.perf_counter()
        idx = self.batch_indices(index)
        first = self.sample(int(idx[0]))
        x = np.empty((len(idx),) + first.shape + (1,), dtype=np.float32)

        def fill(j: int, volume: np.ndarray | None = None) -> None:
            volume = self.sample(int(idx[j])) if volume is None else volume
            if volume.shape != x.shape[1:4]:
                raise CovidctError(f"ROI stores of one batch differ in shape: {x.shape[1:4]} and "
                                   f"{volume.shape}", path=", ".join(str(self.paths[k])
                                                                     for k in idx))
            x[j, ..., 0] = volume                      # one pass: converts to float32 in place

        fill(0, first)
        if self.readers > 1 and len(idx) > 1:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.readers, thread_name_prefix="roi")
            list(self._pool.map(fill, range(1, len(idx))))
        else:
            for j in range(1, len(idx)):
                fill(j)
        out: tuple = (x,)
        if self.labels is not None:
            y = self.labels[idx].reshape(-1, 1)
            out = (x, y)
            if self.class_weight is not None:
                w = np.array([self.class_weight.get(int(v), 1.0) for v in self.labels[idx]],
                             dtype=np.float32)
                out = (x, y, w)
        with self._lock:
            self.read_seconds += time.perf_counter() - start
        return out
