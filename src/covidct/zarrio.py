"""Per-patient image stores: OME-Zarr 0.5 image groups with the full-resolution array at ``0``.

Axes are z, y, x in millimetres; the scale holds the voxel spacing and the translation the
physical position of voxel (0, 0, 0). Direction cosines, the LPS origin and provenance live in
the ``covidct`` attribute namespace, so a store converts back to a SimpleITK image exactly.

Writes are atomic: a store is built in a hidden temporary folder beside its target and renamed
into place once complete, so an interrupted job never leaves a half-written store behind.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
OME_VERSION = "0.5"


@dataclass
class Image:
    """An opened store: the lazy array plus its geometry and covidct attributes."""

    array: zarr.Array
    spacing: tuple[float, float, float]          # (z, y, x) mm
    origin: tuple[float, float, float]           # (x, y, z) LPS mm, as SimpleITK gives it
    direction: tuple[float, ...] = IDENTITY      # 9 direction cosines, row-major, as SimpleITK
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def read(self) -> np.ndarray:
        return self.array[...]

    def to_sitk(self, array: np.ndarray | None = None):
        """A SimpleITK image with this store's geometry (``array`` replaces the stored voxels)."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(self.read() if array is None else array)
        img.SetSpacing(tuple(float(s) for s in self.spacing[::-1]))
        img.SetOrigin(tuple(float(o) for o in self.origin))
        img.SetDirection(tuple(float(d) for d in self.direction))
        return img


def default_chunks(shape: Sequence[int]) -> tuple[int, ...]:
    """One slice per chunk along z (slice-wise reading), whole slices in-plane."""
    return (1,) + tuple(int(s) for s in shape[1:])


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it to ``path`` when the block succeeds.

    The temporary name keeps every suffix (``.ct.tmp-1a2b3c4d.nii.gz``), since writers such as
    SimpleITK and Keras choose the format by the file name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base, dot, suffixes = path.name.partition(".")
    tmp = path.parent / f".{base}.tmp-{uuid.uuid4().hex[:8]}{dot}{suffixes}"
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()


def _ome_metadata(name: str, spacing_zyx, origin_xyz) -> dict:
    return {
        "version": OME_VERSION,
        "multiscales": [{
            "name": name,
            "axes": [{"name": a, "type": "space", "unit": "millimeter"} for a in ("z", "y", "x")],
            "datasets": [{
                "path": "0",
                "coordinateTransformations": [
                    {"type": "scale", "scale": [float(s) for s in spacing_zyx]},
                    {"type": "translation", "translation": [float(o) for o in origin_xyz[::-1]]},
                ],
            }],
        }],
    }


def write_image(path: str | Path, array: np.ndarray, *, spacing: Sequence[float],
                origin: Sequence[float] = (0.0, 0.0, 0.0), direction: Sequence[float] = IDENTITY,
                attrs: dict[str, Any] | None = None, chunks: Sequence[int] | None = None,
                name: str | None = None, clevel: int = 3,
                labels: dict[str, np.ndarray] | None = None) -> Path:
    """Write ``array`` (z, y, x) as an OME-Zarr image store at ``path``, atomically.

    ``spacing`` is (z, y, x) mm; ``origin`` (x, y, z) and ``direction`` as SimpleITK gives them.
    ``attrs`` go into the ``covidct`` namespace next to the geometry. ``labels`` are label
    images on the same grid (e.g. ``{"lung": mask}``), written as OME-Zarr labels
    ``labels/{name}/0`` (uint8) in the same atomic write; :func:`read_label` reads them.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3-D (z, y, x) array, got shape {array.shape}")
    path = Path(path)
    meta = {"spacing": [float(s) for s in spacing], "origin": [float(o) for o in origin],
            "direction": [float(d) for d in direction]}
    meta.update(attrs or {})
    with atomic_path(path) as tmp:
        root = zarr.create_group(store=str(tmp), zarr_format=3, overwrite=True)
        root.attrs.update({"ome": _ome_metadata(name or path.stem, spacing, origin),
                           "covidct": _jsonable(meta)})
        _write_level0(root, array, chunks, clevel)
        if labels:
            group = root.create_group("labels")
            group.attrs["ome"] = {"version": OME_VERSION, "labels": sorted(labels)}
            for label, values in labels.items():
                values = np.asarray(values)
                if values.shape != array.shape:
                    raise ValueError(f"label {label!r} has shape {values.shape}, the image "
                                     f"{array.shape}")
                sub = group.create_group(label)
                sub.attrs["ome"] = {**_ome_metadata(label, spacing, origin),
                                    "image-label": {"version": OME_VERSION,
                                                    "source": {"image": "../../"}}}
                _write_level0(sub, values.astype(np.uint8), chunks, clevel)
    return path


def _write_level0(group, array: np.ndarray, chunks, clevel: int) -> None:
    """The full-resolution array ``0`` of an image (or label) group: zstd, z-slice chunks."""
    arr = group.create_array(
        "0", shape=array.shape, dtype=array.dtype,
        chunks=tuple(chunks) if chunks else default_chunks(array.shape),
        compressors=BloscCodec(cname="zstd", clevel=clevel, shuffle="bitshuffle"),
        dimension_names=("z", "y", "x"), fill_value=0,
    )
    arr[...] = array


def write_sitk(path: str | Path, image, *, attrs: dict[str, Any] | None = None,
               dtype=None, chunks: Sequence[int] | None = None) -> Path:
    """Write a SimpleITK image, keeping its geometry."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return write_image(path, array, spacing=image.GetSpacing()[::-1], origin=image.GetOrigin(),
                       direction=image.GetDirection(), attrs=attrs, chunks=chunks)


def open_image(path: str | Path) -> Image:
    """Open a store written by :func:`write_image` (lazy: voxels are read on access)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such image store: {path}")
    root = zarr.open_group(store=str(path), mode="r")
    meta = dict(root.attrs.get("covidct", {}))
    array = root["0"]
    spacing = tuple(meta.pop("spacing", [1.0, 1.0, 1.0]))
    origin = tuple(meta.pop("origin", [0.0, 0.0, 0.0]))
    direction = tuple(meta.pop("direction", IDENTITY))
    return Image(array=array, spacing=spacing, origin=origin, direction=direction,
                 attrs=meta, path=path)


def read_array(path: str | Path) -> np.ndarray:
    return open_image(path).read()


def read_label(path: str | Path, name: str) -> np.ndarray | None:
    """The label image ``labels/{name}/0`` of a store (uint8), or None when it has none."""
    root = zarr.open_group(store=str(path), mode="r")
    try:
        return np.asarray(root[f"labels/{name}/0"][...])
    except KeyError:
        return None


def _jsonable(value):
    """Convert numpy scalars/arrays inside attributes to plain JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value
