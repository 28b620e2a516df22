"""DICOM series: the few header fields ingest needs, the series of a folder, the choice of the
axial CT series and the checks of its slices. Nothing that identifies a person is kept."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covidct.errors import CovidctError
from covidct.preprocess.scan import STEP, Scan

log = logging.getLogger(__name__)

AXIAL_MIN_COS = 0.9            # |slice normal . z| at least this (gantry tilt up to ~25 degrees)

# Provenance allow-list: attribute name -> DICOM keyword. Nothing else from a header is kept:
# only coded values and the scanner's make, no free text (descriptions, comments, contrast
# agent names: the PS3.15 confidentiality profile removes them, as they may name a person).
SAFE_DICOM_FIELDS = {
    "modality": "Modality",
    "manufacturer": "Manufacturer",
    "model": "ManufacturerModelName",
    "kernel": "ConvolutionKernel",
    "kvp": "KVP",
    "slice_thickness_mm": "SliceThickness",
    "body_part": "BodyPartExamined",
    "image_type": "ImageType",
    "patient_position": "PatientPosition",
}
# Identifiers compared in memory (hashed), never kept: one folder must hold one patient's study.
_IDENTITY_TAGS = {"PatientID": 0x00100020, "PatientName": 0x00100010,
                  "StudyInstanceUID": 0x0020000D}
# Header fields read per file (no pixels): keyword -> (tag, how its raw bytes decode).
# Decoding the raw bytes of these few elements is 3x faster than pydicom's element conversion.
_HEADER_TAGS = {
    "SeriesInstanceUID": (0x0020000E, "text"), "Modality": (0x00080060, "text"),
    "ImageType": (0x00080008, "text"), "ImageOrientationPatient": (0x00200037, "text"),
    "ImagePositionPatient": (0x00200032, "text"), "Rows": (0x00280010, "US"),
    "Columns": (0x00280011, "US"), "NumberOfFrames": (0x00280008, "text"),
    "RescaleSlope": (0x00281053, "text"), "RescaleIntercept": (0x00281052, "text"),
    "PixelRepresentation": (0x00280103, "US"), "PixelPaddingValue": (0x00280120, "xS"),
    "PixelPaddingRangeLimit": (0x00280121, "xS"), "Manufacturer": (0x00080070, "text"),
    "ManufacturerModelName": (0x00081090, "text"), "ConvolutionKernel": (0x00181210, "text"),
    "KVP": (0x00180060, "text"), "SliceThickness": (0x00180050, "text"),
    "BodyPartExamined": (0x00180015, "text"), "PatientPosition": (0x00185100, "text"),
    "SOPClassUID": (0x00080016, "text"),
    **{keyword: (tag, "text") for keyword, tag in _IDENTITY_TAGS.items()},
}
# SOP classes of images (CT, MR, PET, secondary capture, NM, RT image): a file of one of these,
# or with the DICM magic but no readable class, that has no image size is a damaged image.
_IMAGE_SOP_PREFIXES = tuple("1.2.840.10008.5.1.4.1.1." + c
                            for c in ("2", "4", "128", "130", "7", "20", "481.1"))
assert set(SAFE_DICOM_FIELDS.values()) <= set(_HEADER_TAGS)


def _element_value(ds, tag: int, kind: str, signed: bool = False):
    """The value of one element, decoded from its raw bytes; None when absent or empty.

    Text comes back as a str, or a list of str when multi-valued; US/SS as int.
    """
    elem = ds.get_item(tag)
    if elem is None:
        return None
    raw = getattr(elem, "value", None)
    if not isinstance(raw, (bytes, bytearray)):   # already converted by pydicom
        if raw is None or raw == "":
            return None
        if isinstance(raw, (list, tuple)) or type(raw).__name__ == "MultiValue":
            return [str(v) for v in raw]
        return raw if isinstance(raw, int) and kind != "text" else str(raw)
    if not raw:
        return None
    if kind == "text":
        parts = [v.strip(" \x00") for v in bytes(raw).decode("latin-1").split("\\")]
        return parts if len(parts) > 1 else (parts[0] or None)
    order = "little" if getattr(elem, "is_little_endian", True) else "big"
    vr = getattr(elem, "VR", None)
    signed = vr == "SS" if vr in ("SS", "US") else signed
    return int.from_bytes(bytes(raw[:2]), order, signed=signed)



@dataclass
class Slice:
    """Header facts of one DICOM file (no pixel data; of the patient and the study only an
    unreadable digest, to tell two apart)."""

    path: Path
    modality: str | None
    image_type: tuple[str, ...]
    orientation: tuple[float, ...] | None
    position: tuple[float, float, float] | None
    rows: int | None
    columns: int | None
    frames: int
    slope: float
    intercept: float
    padding: tuple[float, ...]          # PixelPaddingValue (and range limit) in stored units
    safe: dict[str, Any]
    patient_key: str = ""               # digest of PatientID and PatientName
    study_key: str = ""                 # digest of StudyInstanceUID

    @property
    def normal(self) -> np.ndarray | None:
        if self.orientation is None or len(self.orientation) != 6:
            return None
        row, col = np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:])
        n = np.cross(row, col)
        norm = np.linalg.norm(n)
        return n / norm if norm > 0 else None

    @property
    def is_localizer(self) -> bool:
        return any(t.upper() in ("LOCALIZER", "SCOUT", "TOPOGRAM", "SCANOGRAM")
                   for t in self.image_type)


@dataclass
class Series:
    uid: str
    slices: list[Slice] = field(default_factory=list)

    @property
    def first(self) -> Slice:
        return self.slices[0]

    @property
    def modality(self) -> str | None:
        return self.first.modality

    @property
    def n_slices(self) -> int:
        return sum(s.frames for s in self.slices)

    def why_not_axial_ct(self) -> str | None:
        """None when this is an axial CT image series, else a short reason."""
        modalities = {s.modality for s in self.slices if s.modality}
        other = sorted(m for m in modalities if m != "CT")
        if other:
            return f"modality {'/'.join(other)}"
        if any(s.is_localizer for s in self.slices):
            return "a localizer/scout"
        normal = self.first.normal
        if normal is None:
            return "no ImageOrientationPatient"
        if abs(normal[2]) < AXIAL_MIN_COS:
            plane = "sagittal" if abs(normal[0]) >= abs(normal[1]) else "coronal"
            return f"not axial ({plane})"
        return None


def _number(value, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _safe_value(value) -> Any:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v).strip() for v in value]
    if isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    if not np.isfinite(number):
        return text
    return int(number) if number.is_integer() and "." not in text else number


def _floats(value) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in ([value] if isinstance(value, (str, int, float)) else value))
    except ValueError:
        return None


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_header(path: Path) -> tuple[Slice, str] | None:
    """Read the few header fields ingestion needs from one file (pydicom, no pixels).

    Returns (slice, series UID), or None for a file that is not a DICOM image (no DICM magic
    and no parsable header, or a non-image object such as DICOMDIR); raises
    :class:`CovidctError` for a DICOM file (DICM magic) whose header cannot be parsed.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                             specific_tags=[tag for tag, _ in _HEADER_TAGS.values()])
        values = {key: _element_value(ds, tag, kind) for key, (tag, kind) in _HEADER_TAGS.items()
                  if kind != "xS"}
        signed = values.get("PixelRepresentation") == 1
        for key in ("PixelPaddingValue", "PixelPaddingRangeLimit"):
            values[key] = _element_value(ds, _HEADER_TAGS[key][0], "xS", signed)
        meta = getattr(ds, "file_meta", None)
        transfer_syntax = str(getattr(meta, "TransferSyntaxUID", "") or "") or None
    except Exception as exc:  # pydicom raises many types on damaged or foreign files
        if _has_dicom_magic(path):
            raise CovidctError(f"unreadable DICOM header ({type(exc).__name__}: {exc})",
                               step=STEP, path=path) from exc
        return None
    get = values.get
    if get("Rows") is None or get("Columns") is None:
        sop = str(get("SOPClassUID") or getattr(meta, "MediaStorageSOPClassUID", "") or "")
        if _has_dicom_magic(path) and (not sop or sop.startswith(_IMAGE_SOP_PREFIXES)):
            raise CovidctError("truncated or damaged DICOM header (no image size)", step=STEP,
                               path=path)
        return None   # DICOMDIR, structured report, presentation state, or not DICOM
    orientation = _floats(get("ImageOrientationPatient"))
    position = _floats(get("ImagePositionPatient"))
    padding = tuple(float(v) for v in (get("PixelPaddingValue"), get("PixelPaddingRangeLimit"))
                    if isinstance(v, (int, float)))
    safe = {name: _safe_value(get(keyword)) for name, keyword in SAFE_DICOM_FIELDS.items()}
    safe["transfer_syntax"] = transfer_syntax
    modality = str(get("Modality") or "").strip().upper() or None
    image_type = get("ImageType") or ()
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    return Slice(
        path=path,
        modality=modality,
        image_type=tuple(str(t) for t in image_type),
        orientation=orientation if orientation and len(orientation) == 6 else None,
        position=position if position and len(position) == 3 else None,
        rows=int(get("Rows")),
        columns=int(get("Columns")),
        frames=max(1, int(_number(get("NumberOfFrames"), 1))),
        slope=_number(get("RescaleSlope"), 1.0),
        intercept=_number(get("RescaleIntercept"), 0.0),
        padding=padding,
        safe={k: v for k, v in safe.items() if v not in (None, "", [])},
        patient_key=_digest(get("PatientID"), get("PatientName")),
        study_key=_digest(get("StudyInstanceUID")),
    ), str(get("SeriesInstanceUID") or "")


def _digest(*values) -> str:
    """A digest that tells identifiers apart without keeping them ("" when all are empty)."""
    import hashlib

    text = "\x1f".join("" if v is None else str(v) for v in values)
    return hashlib.sha256(text.encode()).hexdigest()[:16] if text.strip("\x1f") else ""


def list_series(folder: Path) -> list[Series]:
    """Every DICOM image series under ``folder`` (recursively), grouped by series UID.

    One pydicom pass over the headers (no pixels): GDCM's own listing
    (``ImageSeriesReader.GetGDCMSeriesIDs``) loads whole files, and the checks need the
    headers anyway.
    Files that are not DICOM images (DICOMDIR, notes, thumbnails) are skipped.
    """
    by_uid: dict[str, Series] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            found = read_header(Path(dirpath) / name)
            if found is None:
                log.debug("not a DICOM image, skipped: %s", name)
                continue
            header, uid = found
            by_uid.setdefault(uid, Series(uid)).slices.append(header)
    return list(by_uid.values())


def choose_series(series: list[Series], folder: Path) -> tuple[Series, list[str]]:
    """The axial CT series with the most slices; the reasons others were set aside."""
    if not series:
        n_files = sum(len(f) for _, _, f in os.walk(folder))
        what = "empty folder" if n_files == 0 else f"{n_files} files, none a readable DICOM image"
        raise CovidctError(f"no DICOM series found ({what})", step=STEP, path=folder)
    candidates, skipped = [], []
    for s in series:
        reason = s.why_not_axial_ct()
        if reason is None:
            candidates.append(s)
        else:
            skipped.append(f"{s.n_slices}-slice series set aside: {reason}")
    if not candidates:
        reasons = sorted({s.why_not_axial_ct() for s in series})
        if all(r.startswith("modality") for r in reasons):
            message = f"not a CT ({'; '.join(reasons)})"
        else:
            message = f"no axial CT series among {len(series)} ({'; '.join(reasons)})"
        raise CovidctError(message, step=STEP, path=series[0].first.path)
    check_one_study(candidates, folder)
    best = max(candidates, key=lambda s: s.n_slices)
    others = sorted((s.n_slices for s in candidates if s is not best), reverse=True)
    if others:
        skipped.append(f"chose the {best.n_slices}-slice axial CT series, the one with the most "
                       f"slices, over {len(others)} other(s) of the same study "
                       f"({', '.join(f'{n} slices' for n in others)})")
    return best, skipped


def check_one_study(candidates: list[Series], folder: Path) -> None:
    """Refuse a folder whose CT series come from more than one patient or study."""
    for what, key in (("patients", "patient_key"), ("studies", "study_key")):
        groups: dict[str, list[int]] = {}
        for s in candidates:
            groups.setdefault(getattr(s.first, key), []).append(s.n_slices)
        if len(groups) > 1:
            listing = " | ".join(", ".join(f"{n} slices" for n in sorted(counts, reverse=True))
                                 for counts in groups.values())
            raise CovidctError(f"the folder holds CT series of {len(groups)} different {what} "
                               f"({listing}): give one patient's study per folder", step=STEP,
                               path=folder)


def order_and_check(series: Series, *, min_slices: int, max_gap: float,
                    tolerance: float) -> tuple[list[Slice], float | None]:
    """Sort the slices along the normal and check them; returns (slices, median step mm)."""
    slices = series.slices
    first = series.first
    if len(slices) == 1 and first.frames > 1:         # one multi-frame file: GDCM reads it whole
        if first.frames < min_slices:
            raise CovidctError(f"fewer than {min_slices} slices (found {first.frames})",
                               step=STEP, path=first.path)
        return slices, None
    if len(slices) < min_slices:
        raise CovidctError(f"fewer than {min_slices} slices (found {len(slices)})",
                           step=STEP, path=first.path)
    sizes = Counter((s.rows, s.columns) for s in slices)
    if len(sizes) > 1:
        (common, _), = sizes.most_common(1)
        odd = next(s for s in slices if (s.rows, s.columns) != common)
        listing = ", ".join(f"{r}x{c} ({n} files)" for (r, c), n in sizes.most_common())
        raise CovidctError(f"mixed image sizes in one series: {listing}", step=STEP,
                           path=odd.path)
    missing = next((s for s in slices if s.position is None), None)
    if missing is not None:
        raise CovidctError("no ImagePositionPatient: cannot order the slices", step=STEP,
                           path=missing.path)
    normal = first.normal
    along = np.array([np.dot(s.position, normal) for s in slices])
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    along = along[order]
    steps = np.diff(along)
    median = float(np.median(steps))
    if median <= 1e-3:
        raise CovidctError("duplicate slice positions (median step 0 mm; two acquisitions in "
                           "one series?)", step=STEP, path=slices[0].path)
    k = int(np.argmax(steps))
    if steps[k] > max_gap * median:
        raise CovidctError(
            f"missing slices: gap of {steps[k]:.3g} mm after slice {k + 1} of {len(slices)} "
            f"(median step {median:.3g} mm)", step=STEP, path=slices[k + 1].path)
    k = int(np.argmax(np.abs(steps - median)))
    if abs(steps[k] - median) > max(tolerance * median, 1e-3):
        raise CovidctError(
            f"uneven slice spacing: steps from {steps.min():.3g} to {steps.max():.3g} mm "
            f"(median {median:.3g} mm)", step=STEP, path=slices[k + 1].path)
    return slices, median



def _find_bad_file(paths: Sequence[Path]) -> Path | None:
    """The first file of a series whose pixels GDCM cannot read (only on the error path)."""
    import SimpleITK as sitk

    for p in paths:
        try:
            sitk.ReadImage(str(p))
        except RuntimeError:
            return p
    return None


def read_dicom(folder: Path, *, min_slices: int, max_gap: float, tolerance: float) -> Scan:
    import SimpleITK as sitk

    series, skipped = choose_series(list_series(folder), folder)
    for line in skipped:
        log.info("%s", line)
    slices, step = order_and_check(series, min_slices=min_slices, max_gap=max_gap,
                                   tolerance=tolerance)
    first = slices[0]
    if first.modality is None:
        log.warning("no Modality in the DICOM header: assuming CT")
    names = [str(s.path) for s in slices]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    reader.MetaDataDictionaryArrayUpdateOff()
    reader.LoadPrivateTagsOff()
    rescales = {(s.slope, s.intercept) for s in slices}
    if len(rescales) > 1 or any(not float(v).is_integer() for r in rescales for v in r):
        reader.SetOutputPixelType(sitk.sitkFloat32)  # per-slice or fractional rescale
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        bad = _find_bad_file(s.path for s in slices) or first.path
        raise CovidctError(f"unreadable DICOM pixel data ({str(exc).strip().splitlines()[-1]})",
                           step=STEP, path=bad) from exc
    if step is not None and image.GetDimension() == 3:
        spacing = list(image.GetSpacing())
        if abs(spacing[2] - step) > 1e-3 * step:    # ITK may fall back to SliceThickness
            spacing[2] = step
            image.SetSpacing(spacing)
    padding = tuple(v * first.slope + first.intercept for v in first.padding)
    provenance = dict(first.safe)
    if step is not None:
        provenance["slice_step_mm"] = round(step, 6)
    provenance["rescale_slope"], provenance["rescale_intercept"] = first.slope, first.intercept
    return Scan(image=image, source_format="dicom", n_files=len(slices), provenance=provenance,
                padding_hu=padding, path=first.path)
