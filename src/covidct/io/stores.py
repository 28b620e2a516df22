"""Per-patient image stores: OME-Zarr 0.5 image groups with the full-resolution array at ``0``.

Axes are z, y, x in millimetres (scale = spacing, translation = position of voxel 0). Direction
cosines, the LPS origin and the stage's attributes live in the ``covidct`` namespace, so a store
converts back to a SimpleITK image exactly. Stores are written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from covidct.errors import CovidctError
from covidct.io.atomic import atomic_path, jsonable

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
                           "covidct": jsonable(meta)})
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


def open_image(path: str | Path, *, what: str = "image", patient: str | None = None) -> Image:
    """Open a store written by :func:`write_image` (lazy: voxels are read on access).

    A missing or unreadable store is a :class:`CovidctError` naming ``what`` (e.g. "ROI"), the
    patient and the path.
    """
    path = Path(path)
    if not path.exists():
        raise CovidctError(f"{what} store not found", patient=patient, path=path)
    try:
        root = zarr.open_group(store=str(path), mode="r")
        meta = dict(root.attrs.get("covidct", {}))
        array = root["0"]
    except Exception as err:     # zarr raises many kinds on a broken store
        raise CovidctError(f"cannot open {what} store ({type(err).__name__}: {err})",
                           patient=patient, path=path) from err
    spacing = tuple(meta.pop("spacing", [1.0, 1.0, 1.0]))
    origin = tuple(meta.pop("origin", [0.0, 0.0, 0.0]))
    direction = tuple(meta.pop("direction", IDENTITY))
    return Image(array=array, spacing=spacing, origin=origin, direction=direction,
                 attrs=meta, path=path)


def read_array(path: str | Path) -> np.ndarray:
    return open_image(path).read()


def store_patient(path: str | Path, attrs: dict[str, Any] | None = None) -> str:
    """The patient id of a store: its ``patient`` attribute, else the folder that holds it
    (``results/patients/{site}/{patient}/roi.zarr``), also for a store that cannot be read."""
    if attrs is None:
        try:
            attrs = open_image(path).attrs
        except CovidctError:
            attrs = {}
    return str(attrs.get("patient") or Path(path).absolute().parent.name)


def roi_box(attrs: dict[str, Any]) -> tuple[int, int, int, int, int, int]:
    """The box ``(z0, z1, y0, y1, x0, x1)`` of a roi.zarr in its ct.zarr, half-open."""
    box = attrs.get("bbox")
    if box is None or len(box) != 6:
        raise KeyError("no bbox in the ROI attributes (not a roi.zarr of the roi stage)")
    return tuple(int(v) for v in box)


def open_roi(path: str | Path, *, patient: str | None = None) -> Image:
    """A roi.zarr of the roi stage: a 3-D float16 network input with its box attributes."""
    image = open_image(path, what="ROI", patient=patient)
    if image.array.ndim != 3:
        raise CovidctError(f"ROI must be 3-D (D, H, W), found shape {image.array.shape}",
                           patient=patient or store_patient(path, image.attrs), path=path)
    return image


def read_label(path: str | Path, name: str) -> np.ndarray | None:
    """The label image ``labels/{name}/0`` of a store (uint8), or None when it has none."""
    root = zarr.open_group(store=str(path), mode="r")
    try:
        return np.asarray(root[f"labels/{name}/0"][...])
    except KeyError:
        return None


# --------------------------------------------------------------------------- the patients' folder
# The workflow keeps every patient's stores in PATIENTS/{site}/{patient}/: the stages that read
# many of them take that folder (--patients) and the sheet instead of one path per store, so no
# command line grows with the cohort.
STORE_NAMES = {"ct": "ct.zarr", "lung": "lung.zarr", "roi": "roi.zarr"}


def patient_store(patients: str | Path, site: str, patient: str, kind: str = "roi") -> Path:
    """The ``kind`` store (ct, lung or roi) of one patient below the patients' folder."""
    return Path(patients) / str(site) / str(patient) / STORE_NAMES[kind]


def add_store_arguments(parser, flag: str = "--rois", kind: str = "roi", what: str = "") -> None:
    """``flag STORE...`` or ``--patients DIR`` (one of them): the stores a stage reads."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(flag, nargs="+", type=Path, default=None, metavar=STORE_NAMES[kind],
                       help=f"the {what or kind} stores, one per patient")
    group.add_argument("--patients", type=Path, default=None, metavar="DIR",
                       help=f"instead of {flag}: the patients' folder, read as "
                            f"DIR/{{site}}/{{patient}}/{STORE_NAMES[kind]} for the patients of "
                            "the sheet or predictions")


def stores_for(rows, patients: str | Path, kind: str = "roi") -> list[Path]:
    """The ``kind`` store of every row (site, patient) of a sheet or predictions table."""
    return [patient_store(patients, r.site, r.patient, kind) for r in rows.itertuples()]
