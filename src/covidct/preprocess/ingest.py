"""``covidct ingest``: one patient's chest CT into ``ct.zarr``, int16 HU in canonical LPS.

A DICOM folder (searched recursively; the axial CT series with the most slices) or a
NIfTI/MHA/NRRD file is read, reoriented to LPS, its padding set to air, and written with
provenance from an allow-list of header fields that identify no person.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from covidct.errors import CovidctError
from covidct.params import IngestParams, add_options, from_args
from covidct.preprocess.dicom import read_dicom
from covidct.preprocess.hu import orient_lps, repair_hu
from covidct.preprocess.image_file import read_file
from covidct.preprocess.scan import STEP, Scan

log = logging.getLogger(__name__)


def read_scan(source: Path, params: IngestParams = IngestParams()) -> Scan:
    """The scan at ``source`` (a DICOM folder or an image file), as read from disk."""
    if not source.exists():
        raise CovidctError("no such file or folder", step=STEP, path=source)
    if source.is_dir():
        return read_dicom(source, min_slices=params.min_slices, max_gap=params.max_gap,
                          tolerance=params.spacing_tolerance)
    return read_file(source)


class Clock:
    """Wall and CPU seconds since creation, as 'X s (cpu Y s)' for the step log lines."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __str__(self) -> str:
        return (f"{time.perf_counter() - self.wall:.2f} s "
                f"(cpu {time.process_time() - self.cpu:.2f} s)")


@dataclass
class LoadedCT:
    """A scan in HU and canonical orientation, with the non-identifying facts about its source."""

    array: np.ndarray                  # int16 HU, (z, y, x), LPS
    spacing_xyz: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    source_direction: tuple[float, ...]
    source_format: str
    n_files: int
    source_size: tuple[int, ...]
    source_range: tuple[float, float]
    padding_hu: tuple
    n_padding: int
    rescale_intercept_added: float | None
    provenance: dict
    path: Path

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(z, y, x) mm."""
        return tuple(float(v) for v in self.spacing_xyz[::-1])

    def summary(self) -> dict:
        """Facts about the input that identify no one: format, files, size, spacing."""
        return {"format": self.source_format, "files": self.n_files,
                "shape_zyx": [int(s) for s in self.array.shape],
                "spacing_mm": [round(s, 6) for s in self.spacing],
                "padding_voxels_replaced": self.n_padding}


def load_ct(source: str | Path, params: IngestParams = IngestParams()) -> LoadedCT:
    """Read, orient to LPS and repair ``source`` into int16 HU: every step of ingest but the write.

    Raises :class:`CovidctError` naming the file.
    """
    import SimpleITK as sitk

    clock = Clock()
    scan = read_scan(Path(source), params)
    size = scan.image.GetSize()
    log.info("read: %s, %d file(s), %s voxels, spacing %s mm, in %s", scan.source_format,
             scan.n_files, "x".join(map(str, size)),
             "x".join(f"{s:.4g}" for s in scan.image.GetSpacing()), clock)

    clock = Clock()
    image, source_direction = orient_lps(scan.image)
    scan.image = None
    direction = tuple(float(d) for d in image.GetDirection())
    if not np.allclose(direction, np.eye(3).ravel(), atol=1e-4):
        log.warning("oblique acquisition: direction after LPS reorientation is %s",
                    [round(d, 4) for d in direction])
    n_z = image.GetSize()[2]
    if n_z < params.min_slices:
        raise CovidctError(f"fewer than {params.min_slices} slices (found {n_z})", step=STEP,
                           path=scan.path)
    log.info("orient: LPS from direction %s in %s",
             [round(d, 3) for d in source_direction], clock)

    clock = Clock()
    array = sitk.GetArrayViewFromImage(image)   # no copy: repair_hu makes the int16 one
    lo, hi = float(array.min()), float(array.max())
    added = None
    if lo >= 0:
        if params.rescale_intercept is None:
            raise CovidctError(
                f"no voxel below 0 HU (values {lo:g}..{hi:g}): not Hounsfield units, e.g. "
                "stored values without the rescale intercept, or not a CT; pass "
                "--rescale-intercept (e.g. -1024) if the values are HU minus that",
                step=STEP, path=scan.path)
        array = array.astype(np.float32) + float(params.rescale_intercept)
        added = params.rescale_intercept
        log.warning("no voxel below 0: added rescale intercept %g", added)
    array, n_padding = repair_hu(array, padding_below=params.padding_below,
                                 padding_values=scan.padding_hu, air=params.air)
    log.info("hu: source range %g..%g, %d padding voxels set to %d HU, range %d..%d, in %s",
             lo, hi, n_padding, params.air, int(array.min()), int(array.max()), clock)
    return LoadedCT(array=array, spacing_xyz=tuple(image.GetSpacing()), origin=image.GetOrigin(),
                    direction=direction, source_direction=tuple(source_direction),
                    source_format=scan.source_format, n_files=scan.n_files,
                    source_size=tuple(size), source_range=(lo, hi),
                    padding_hu=tuple(scan.padding_hu), n_padding=n_padding,
                    rescale_intercept_added=added, provenance=scan.provenance, path=scan.path)


def ingest(source: str | Path, out: str | Path, params: IngestParams = IngestParams(), *,
           patient: str | None = None) -> Path:
    """Read ``source`` (DICOM folder or image file) and write ``out`` (ct.zarr). Returns ``out``.

    Raises :class:`CovidctError` (naming ``patient`` and the file) on bad input; ``out`` is then
    left untouched (absent when it was absent).
    """
    from covidct import __version__
    from covidct.io.stores import write_image

    source, out = Path(source), Path(out)
    try:
        ct = load_ct(source, params)
        array = ct.array
        digest = hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()
        attrs = {
            "patient": patient,
            "modality": "CT",
            "ingest": {
                "covidct_version": __version__,
                "source_format": ct.source_format,
                "source_files": ct.n_files,
                "source_size_xyz": list(ct.source_size),
                "source_direction": list(ct.source_direction),
                "source_hu_range": list(ct.source_range),
                "hu_range": [int(array.min()), int(array.max())],
                "air_hu": params.air,
                "padding_below_hu": params.padding_below,
                "padding_values_hu": list(ct.padding_hu),
                "padding_voxels_replaced": ct.n_padding,
                "rescale_intercept_added": ct.rescale_intercept_added,
                "voxel_sha256": digest,
                "header": ct.provenance,
                "params": asdict(params),
            },
        }
        clock = Clock()
        write_image(out, array, spacing=ct.spacing_xyz[::-1], origin=ct.origin,
                    direction=ct.direction, attrs=attrs, name=patient or out.stem,
                    clevel=params.clevel)
        log.info("write: %s (%s int16, %.1f MB raw) in %s", out.name,
                 "x".join(map(str, array.shape)), array.nbytes / 1e6, clock)
    except CovidctError as err:
        err.with_context(step=STEP, patient=patient, path=source)
        raise
    return out


def set_threads(n: int) -> None:
    """Limit SimpleITK and Zarr's codec threads (blosc's own threads are off under zarr 3)."""
    import SimpleITK as sitk
    import zarr

    n = max(1, int(n))
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    zarr.config.set({"threading.max_workers": n})


def add_arguments(parser) -> None:
    parser.add_argument("image", type=Path,
                        help="DICOM folder (searched recursively) or NIfTI/MHA/NRRD file")
    parser.add_argument("out", type=Path, help="output store, e.g. ct.zarr")
    parser.add_argument("--patient", default=None,
                        help="patient pseudonym, recorded in the store and in error messages")
    add_options(parser, IngestParams)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for reading and compression (default 1)")


def run(args) -> int:
    set_threads(args.threads)
    ingest(args.image, args.out, from_args(IngestParams, args), patient=args.patient)
    return 0
