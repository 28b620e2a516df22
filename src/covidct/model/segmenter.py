"""``covidct train-segmenter``: the DenseNet121-FPN lung segmenter on CT / lung-mask pairs.

Every epoch draws ``slices_per_scan`` slices per training scan (80% from the lung), lightly
augmented (rotation, zoom, shift, intensity; no left/right flip); the loss is binary
cross-entropy plus soft Dice, the optimiser Adam. A seeded patient-level split gives the
validation Dice that selects the epoch.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from covidct.errors import CovidctError
from covidct.model.trainer import Trainer, set_threads
from covidct.params import SegmenterTrainParams, TrackingParams, add_options, from_args
from covidct.preprocess.lung_fpn import (
    THRESHOLD,
    fov_window,
    model_name,
    normalize_slices,
    resize_slices,
    stack_channels,
    to_fov,
)
from covidct.preprocess.morphology import dice

log = logging.getLogger(__name__)

STEP = "train-segmenter"


def read_ct(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A DICOM folder or image file as ingest reads it: int16 HU in LPS, spacing (z, y, x) mm."""
    from covidct.preprocess.ingest import load_ct

    ct = load_ct(Path(path))
    return ct.array, ct.spacing


def read_mask(path: str | Path, shape: Sequence[int]) -> np.ndarray:
    """A lung-mask image (NIfTI/NRRD/...) reoriented to LPS, as uint8 0/1, checked against
    the CT's ``shape``."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise CovidctError("no such mask file", step=STEP, path=path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise CovidctError(f"unreadable mask ({str(err).strip().splitlines()[-1]})", step=STEP,
                           path=path) from err
    if image.GetDimension() != 3:
        raise CovidctError(f"mask is not 3-D ({image.GetDimension()}-D)", step=STEP, path=path)
    image = sitk.DICOMOrient(image, "LPS")
    array = sitk.GetArrayFromImage(image)
    if tuple(array.shape) != tuple(shape):
        raise CovidctError(f"mask grid {'x'.join(map(str, array.shape))} (z,y,x) differs from the "
                           f"CT's {'x'.join(map(str, shape))}", step=STEP, path=path)
    mask = (array > 0).astype(np.uint8)
    if not mask.any():
        raise CovidctError("mask holds no lung voxel", step=STEP, path=path)
    return mask


GENERIC_NAMES = {"ct", "image", "scan", "dicom", "series", "img", "volume"}


def patient_name(path: str | Path) -> str:
    """A name for messages: the file name without image suffixes, or the parent folder's name
    when that is generic (``P007/ct.nii.gz`` -> ``P007``)."""
    path = Path(path)
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".zarr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.lower() in GENERIC_NAMES and path.parent.name:
        return path.parent.name
    return name


@dataclass
class Volume:
    """One training scan at the network's resolution."""

    name: str
    image: np.ndarray          # (z, size, size) float16: normalised slices
    mask: np.ndarray           # (z, size, size) uint8: lung mask resized (linear, >= 0.5)
    lung_slices: np.ndarray    # indices of slices holding lung
    other_slices: np.ndarray
    fov_mm: float | None = None   # field of view of the slices (None: whole slices)


def prepare_volume(name: str, ct: np.ndarray, mask: np.ndarray, size: int,
                   spacing_zyx: Sequence[float] | None = None,
                   fov_mm: float | None = None) -> Volume:
    """One scan at the network's resolution; with ``spacing_zyx`` and ``fov_mm`` its slices
    (and mask) are first cropped/padded to the ``fov_mm`` field, as :func:`predict_mask` does."""
    spacing_yx = None if spacing_zyx is None else tuple(spacing_zyx)[1:]
    norm = normalize_slices(ct, size, spacing_yx, fov_mm).astype(np.float16)
    window = fov_window(np.shape(mask)[1:], spacing_yx, fov_mm)
    field = to_fov(np.asarray(mask, dtype=np.float32), window, 0.0)
    small = (resize_slices(field, (size, size)) >= 0.5).astype(np.uint8)
    has_lung = np.asarray(mask).reshape(mask.shape[0], -1).any(axis=1)
    return Volume(name, norm, small, np.flatnonzero(has_lung), np.flatnonzero(~has_lung),
                  float(fov_mm) if window is not None else None)


def sample_slices(volume: Volume, k: int, rng: np.random.Generator,
                  lung_fraction: float = 0.8) -> np.ndarray:
    """``k`` slice indices: ``lung_fraction`` of them from the lung slices (all of them when
    ``k`` <= 0), the rest from outside the lung (where there are any)."""
    lung, other = volume.lung_slices, volume.other_slices
    if k <= 0:
        n_other = min(len(other), int(math.ceil(0.25 * len(lung))))
        return np.concatenate([lung, rng.choice(other, n_other, replace=False)]).astype(int)
    n_other = min(len(other), k - int(round(lung_fraction * k))) if len(other) else 0
    n_lung = k - n_other
    pick_lung = rng.choice(lung, n_lung, replace=n_lung > len(lung))
    pick_other = rng.choice(other, n_other, replace=False) if n_other else np.zeros(0, int)
    return np.concatenate([pick_lung, pick_other]).astype(int)


def augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
            rotation_deg: float = 10.0, scale: tuple[float, float] = (0.8, 1.3),
            shift: float = 0.06) -> tuple[np.ndarray, np.ndarray]:
    """Light in-plane augmentation of one sample: x (S, S, 3) float32, y (S, S) uint8.

    Random rotation, isotropic scale, shift (the same affine for image and mask, linear
    interpolation, mask re-thresholded at 0.5); intensity gain, offset and noise. No flips."""
    size = x.shape[0]
    angle = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg))
    s = rng.uniform(*scale)
    c, si = np.cos(angle), np.sin(angle)
    matrix = np.array([[c, -si], [si, c]]) / s         # output -> input coordinates
    centre = (size - 1) / 2.0
    offset = centre - matrix @ np.full(2, centre) + rng.uniform(-shift, shift, 2) * size
    background = float(x.min())
    out = np.empty_like(x)
    for ch in range(x.shape[-1]):
        out[..., ch] = ndi.affine_transform(x[..., ch], matrix, offset, order=1,
                                            mode="constant", cval=background)
    ym = ndi.affine_transform(y.astype(np.float32), matrix, offset, order=1, mode="constant",
                              cval=0.0) >= 0.5
    out = out * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
    out += rng.normal(0.0, rng.uniform(0.0, 0.05), out.shape).astype(np.float32)
    return out.astype(np.float32), ym.astype(np.uint8)


def slice_arrays(volumes: Sequence[Volume], index: Sequence[np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Stacked (n, S, S, 3) inputs and (n, S, S, 1) targets for the chosen slices."""
    xs, ys = [], []
    for vol, idx in zip(volumes, index):
        if len(idx):
            xs.append(stack_channels(vol.image, idx))
            ys.append(vol.mask[idx])
    x = np.concatenate(xs).astype(np.float32)
    y = np.concatenate(ys)[..., None].astype(np.float32)
    return x, y


def make_dataset(volumes: Sequence[Volume], *, slices_per_scan: int, batch_size: int,
                 seed: int, augment_data: bool = True):
    """A ``keras.utils.PyDataset`` drawing fresh slices (and augmentations) every epoch."""
    import keras

    class SliceDataset(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.rng = np.random.default_rng(seed)
            self.epoch = 0
            self._draw()

        def _draw(self):
            picks = [sample_slices(v, slices_per_scan, self.rng) for v in volumes]
            self.items = [(i, int(z)) for i, p in enumerate(picks) for z in p]
            self.rng.shuffle(self.items)

        def __len__(self):
            return int(math.ceil(len(self.items) / batch_size))

        def __getitem__(self, b):
            chunk = self.items[b * batch_size:(b + 1) * batch_size]
            xs, ys = [], []
            for i, z in chunk:
                vol = volumes[i]
                x = stack_channels(vol.image, [z])[0]
                y = vol.mask[z]
                if augment_data:
                    x, y = augment(x, y, self.rng)
                xs.append(x)
                ys.append(y)
            return np.stack(xs), np.stack(ys)[..., None].astype(np.float32)

        def on_epoch_end(self):
            self.epoch += 1
            self._draw()

    return SliceDataset()


def split_patients(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded patient-level split: (train indices, validation indices)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(val_fraction * n)) if n > 1 and val_fraction > 0 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 and n > 1 else 0), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def validation_dice(model, x: np.ndarray, y: np.ndarray, batch_size: int) -> float:
    """Pooled Dice of the thresholded predictions on validation slices."""
    pred = np.asarray(model.predict(x, batch_size=batch_size, verbose=0))[..., 0] >= THRESHOLD
    return dice(pred, y[..., 0])


class SegmenterTrainer(Trainer):
    """The DenseNet121-FPN on prepared CT / mask volumes."""

    rule = "train_lung_segmenter"
    model_kind = "densenet121-fpn"
    deterministic = False     # as it always trained: TensorFlow's default kernels

    def __init__(self, out, params: SegmenterTrainParams, *, images: Sequence[Path] = (),
                 masks: Sequence[Path] = (), volumes: Sequence[Volume] | None = None,
                 imagenet_weights: Path | None = None, run_eagerly: bool = False,
                 name: str = "lung_fpn", tracking: TrackingParams = TrackingParams(),
                 register: bool = True, tags: dict[str, str] | None = None, config=None):
        super().__init__(out, name=name, epochs=params.epochs, seed=params.seed,
                         tracking=tracking, register=register, tags=tags, config=config)
        self.p = params
        self.images, self.masks, self.volumes = list(images), list(masks), volumes
        self.imagenet_weights = imagenet_weights
        self.run_eagerly = run_eagerly

    def prepare(self) -> None:
        p = self.p
        t0 = time.perf_counter()
        volumes = self.volumes
        if volumes is None:
            if len(self.images) != len(self.masks):
                raise CovidctError(f"{len(self.images)} images but {len(self.masks)} masks",
                                   step=STEP)
            if not self.images:
                raise CovidctError("no training scans", step=STEP)
            volumes = []
            for image, mask_path in zip(self.images, self.masks):
                patient = patient_name(image)
                try:
                    ct, spacing = read_ct(image)
                    mask = read_mask(mask_path, ct.shape)
                except CovidctError as err:
                    err.with_context(step=STEP, patient=patient, path=image)
                    raise
                volumes.append(prepare_volume(patient, ct, mask, p.size, spacing, p.fov_mm))
        volumes = list(volumes)
        fovs = {v.fov_mm for v in volumes}
        if len(fovs) > 1:
            raise CovidctError(f"training scans prepared with different fields of view {fovs}",
                               step=STEP)
        self.fov_mm = fovs.pop() if fovs else None
        log.info("read and prepared %d scans at %dx%d in %.1f s", len(volumes), p.size, p.size,
                 time.perf_counter() - t0)
        train_idx, val_idx = split_patients(len(volumes), p.val_fraction, self.seed)
        self.train_v = [volumes[i] for i in train_idx]
        self.val_v = [volumes[i] for i in val_idx]
        self.val_x = self.val_y = None
        if self.val_v:
            rng = np.random.default_rng(self.seed + 1)
            self.val_x, self.val_y = slice_arrays(
                self.val_v, [sample_slices(v, 0, rng) for v in self.val_v])

    def build(self, keras):
        from covidct.model.fpn import build_fpn, dice_bce_loss

        p = self.p
        model = build_fpn(p.size, encoder_weights=self.imagenet_weights,
                          pyramid_filters=p.pyramid_filters,
                          segmentation_filters=p.segmentation_filters, bn_momentum=p.bn_momentum,
                          name=model_name(self.fov_mm))
        # No XLA: compiling DenseNet121's training step with XLA on a CPU takes minutes.
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=p.lr), loss=dice_bce_loss,
                      jit_compile=False, run_eagerly=self.run_eagerly)
        return model

    def data(self):
        p = self.p
        dataset = make_dataset(self.train_v, slices_per_scan=p.slices_per_scan,
                               batch_size=p.batch_size, seed=self.seed, augment_data=p.augment)
        log.info("training DenseNet121-FPN %dx%d: %d train scans (%d slices per epoch), "
                 "%d validation scans (%d slices)", p.size, p.size, len(self.train_v),
                 len(dataset.items), len(self.val_v),
                 0 if self.val_x is None else len(self.val_x))
        return dataset

    def validate(self, model) -> dict[str, float]:
        if self.val_x is None:
            return {}
        return {"val_dice": validation_dice(model, self.val_x, self.val_y, self.p.batch_size)}

    def score(self, row) -> tuple:
        return (row.get("val_dice", -row["loss"]),)

    def after_training(self, final) -> dict[str, float]:
        return {"val_dice": self.selected_row.get("val_dice")}

    def params(self) -> dict:
        p = self.p
        return {"batch_size": p.batch_size, "size": p.size, "slices_per_scan": p.slices_per_scan,
                "fov_mm": self.fov_mm or 0, "optimizer": "Adam", "lr": p.lr,
                "loss": "bce+dice", "encoder": "DenseNet121",
                "encoder_weights": str(self.imagenet_weights) if self.imagenet_weights
                else "random",
                "pyramid_filters": p.pyramid_filters,
                "segmentation_filters": p.segmentation_filters, "bn_momentum": p.bn_momentum,
                "augment": bool(p.augment), "val_fraction": p.val_fraction,
                "n_train": len(self.train_v), "n_val": len(self.val_v),
                "n_val_slices": 0 if self.val_x is None else len(self.val_x)}

    def record(self) -> dict:
        return {"n_train": len(self.train_v), "n_val": len(self.val_v),
                "input_channels": ["slice-1", "slice", "slice+1"], "fov_mm": self.fov_mm or 0,
                "threshold": THRESHOLD, "encoder": "DenseNet121",
                "encoder_weights": str(self.imagenet_weights) if self.imagenet_weights
                else "random"}


def train_segmenter(params: SegmenterTrainParams, out: str | Path, *,
                    images: Sequence[Path] = (), masks: Sequence[Path] = (),
                    volumes: Sequence[Volume] | None = None, **kwargs) -> dict:
    """Train the FPN into ``out`` (model.keras, history.csv, run.json); returns the record.

    ``volumes`` (prepared by :func:`prepare_volume`, with their own field of view) replace
    reading ``images``/``masks`` (tests and the benchmark generate scans in memory).
    """
    return SegmenterTrainer(out, params, images=images, masks=masks, volumes=volumes,
                            **kwargs).run()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--images", nargs="+", required=True, type=Path,
                   help="CT scans: DICOM folders or NIfTI/MHA/NRRD files")
    p.add_argument("--masks", nargs="+", required=True, type=Path,
                   help="lung masks (NIfTI etc., 1 = lung), one per image, on the same grid")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder: model.keras and run.json")
    add_options(p, SegmenterTrainParams)
    p.add_argument("--imagenet-weights", type=Path, default=None,
                   help="local DenseNet121 include_top=False weights file (never downloaded); "
                        "default: random initialisation")
    p.add_argument("--eager", action="store_true",
                   help="run the training steps eagerly (no graph tracing: for tiny runs)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads, 0 = all (default 0)")
    add_options(p, TrackingParams)
    p.add_argument("--run-name", default="lung_fpn",
                   help="run name; the model is registered as covidct-NAME (default lung_fpn)")
    p.add_argument("--config", default=None, help="workflow config file (hashed into a tag)")


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    train_segmenter(from_args(SegmenterTrainParams, args), args.out, images=args.images,
                    masks=args.masks, imagenet_weights=args.imagenet_weights,
                    run_eagerly=args.eager, name=args.run_name,
                    tracking=from_args(TrackingParams, args), config=args.config)
    return 0
