"""``covidct synth``: one synthetic patient's scan (DICOM series or NIfTI) and exact lung mask.

The DICOM header carries made-up identifying fields on purpose: the pipeline must drop them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidct.errors import CovidctError
from covidct.io.atomic import atomic_path
from covidct.io.sheet import LABELS

log = logging.getLogger(__name__)

STUDY_DATE = (2020, 2, 1)
# the files written beside the scan: the exact lung mask (lesions included) and, for the dense
# lesion cases, the exact lesion mask
LUNG_MASK = "lung_mask.nii.gz"
LESION_MASK = "lesion_mask.nii.gz"


@dataclass
class PatientSpec:
    """Everything that determines one synthetic scan (a cohort row, typed, with defaults)."""

    patient: str = "synthetic-001"
    site: str = "synthetic"
    task: str = "covid"
    label: str = "covid"
    age: float = 50.0
    sex: str = "M"
    seed: int = 0
    severity: float = 0.5
    emphysema: float = 0.0
    case: str = ""                 # a dense lesion case (covidct.synth.lesions.CASES) instead
    matrix: int = 128
    pixel_mm: float = 2.75
    slice_mm: float = 2.5
    n_slices: int = 0              # 0 = 300 mm worth of slices
    noise_hu: float = 12.0
    kernel_mm: float = 0.9
    padding_hu: int = -3024
    format: str = "nifti"
    transfer_syntax: str = "explicit"
    reverse_z: int = 0
    manufacturer: str = "SIEMENS"
    model: str = "SOMATOM Definition AS"
    convolution_kernel: str = "B31f"
    image: str = ""
    mask: str = ""

    @classmethod
    def from_row(cls, row: Mapping[str, Any] | pd.Series) -> PatientSpec:
        """From a cohort row, a JSON spec or a dict of parameters (strings are converted)."""
        data = dict(row.items()) if hasattr(row, "items") else dict(row)
        kwargs = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)) \
                    or (isinstance(value, str) and not value.strip()):
                continue
            try:
                if f.type in ("int",):
                    value = int(float(value))
                elif f.type in ("float",):
                    value = float(value)
                else:
                    value = str(value)
            except (TypeError, ValueError) as err:
                raise CovidctError(f"bad value {value!r} for {f.name}: {err}",
                                   patient=str(data.get("patient") or "")) from None
            kwargs[f.name] = value
        spec = cls(**kwargs)
        if spec.n_slices <= 0:
            spec.n_slices = int(round(300.0 / spec.slice_mm))
        if spec.task not in LABELS or spec.label not in LABELS[spec.task]:
            raise CovidctError(
                f"label {spec.label!r} does not fit task {spec.task!r}", patient=spec.patient
            )
        return spec


def _origin(spec: PatientSpec) -> tuple[float, float, float]:
    from covidct.synth.anatomy import STREAM_HEADER, rng_for

    rng = rng_for(spec.seed, STREAM_HEADER)
    c = -(spec.matrix - 1) / 2.0 * spec.pixel_mm
    table_z = -round(spec.n_slices * spec.slice_mm + rng.uniform(30, 140), 1)
    return (round(c, 4), round(c, 4), table_z)


def _render(spec: PatientSpec, lesions: bool = True) -> dict[str, Any]:
    from covidct.synth.phantom import Scanner, render

    scanner = Scanner(slice_mm=spec.slice_mm, pixel_mm=spec.pixel_mm, matrix=spec.matrix,
                      n_slices=spec.n_slices, noise_hu=spec.noise_hu, kernel_mm=spec.kernel_mm,
                      padding_hu=spec.padding_hu)
    try:
        return render(spec.seed, spec.label, spec.severity, scanner, age=spec.age, sex=spec.sex,
                      emphysema=spec.emphysema, lesions=lesions, case=spec.case)
    except ValueError as err:
        raise CovidctError(str(err), step="synth", patient=spec.patient) from None


def make_patient(row: Mapping[str, Any] | pd.Series, *, lesions: bool = True, truth: bool = False):
    """Build one patient: ``(volume_hu int16 (z, y, x), lung_mask uint8, spacing_zyx, origin_xyz)``.

    ``row`` is a cohort row (or any mapping of :class:`PatientSpec` fields; missing ones take
    defaults). ``lesions=False`` gives the same patient without disease (same anatomy and
    noise). ``truth=True`` appends a dict with the phantom's ``tissue`` codes, ``lesion`` weight
    map, exact ``lesion_mask``, lung ``side`` labels (1 right, 2 left) and ``info``.
    """
    spec = row if isinstance(row, PatientSpec) else PatientSpec.from_row(row)
    out = _render(spec, lesions=lesions)
    result = (
        out["volume"],
        out["lung_mask"],
        tuple(float(s) for s in out["spacing"]),
        _origin(spec),
    )
    if truth:
        extra = {k: out[k] for k in ("tissue", "lesion", "lesion_mask", "side", "info")}
        extra["anatomy"] = out["anatomy"]
        return result + (extra,)
    return result


# ----------------------------------------------------------------------------------------------
# DICOM header: made-up identity of the person (to be dropped by ingest) and scanner fields
# ----------------------------------------------------------------------------------------------
_SURNAMES = (
    "Wang",
    "Li",
    "Zhang",
    "Liu",
    "Chen",
    "Yang",
    "Huang",
    "Zhao",
    "Wu",
    "Zhou",
    "Xu",
    "Sun",
    "Ma",
    "Zhu",
    "Hu",
    "Guo",
    "He",
    "Lin",
    "Gao",
    "Luo",
)
_GIVEN = ("Wei", "Fang", "Min", "Jing", "Lei", "Yan", "Jun", "Tao", "Hui", "Ping", "Qiang", "Xiu",
          "Ying", "Hao", "Lan", "Bo", "Mei", "Gang", "Na", "Jie")
_HOSPITALS = (
    "People's Hospital",
    "Union Hospital",
    "Central Hospital",
    "First Affiliated Hospital",
    "Infectious Disease Hospital",
)


def identity(spec: PatientSpec | Mapping[str, Any]) -> dict[str, Any]:
    """The made-up person-identifying DICOM fields of a synthetic patient (deterministic)."""
    import datetime as dt

    from covidct.synth.anatomy import STREAM_HEADER, rng_for

    spec = spec if isinstance(spec, PatientSpec) else PatientSpec.from_row(spec)
    rng = rng_for(spec.seed, STREAM_HEADER + 10)

    def person() -> str:
        return f"{_SURNAMES[rng.integers(len(_SURNAMES))]}^{_GIVEN[rng.integers(len(_GIVEN))]}"

    name = person()
    study = dt.date(*STUDY_DATE)
    birth = study - dt.timedelta(days=int(round(spec.age * 365.25)) + int(rng.integers(0, 365)))
    site = spec.site.replace("-", " ").replace("_", " ").title()
    return {
        "PatientName": name,
        "PatientID": f"{rng.integers(10**7, 10**8)}",
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "OtherPatientIDs": f"MRN{rng.integers(10**6, 10**7)}",
        "InstitutionName": f"{site} {_HOSPITALS[rng.integers(len(_HOSPITALS))]}",
        "InstitutionAddress": f"{rng.integers(1, 400)} Jiefang Road, {site}",
        "ReferringPhysicianName": person(),
        "AccessionNumber": f"CT{rng.integers(10**9, 10**10)}",
        "StudyID": f"{rng.integers(1000, 99999)}",
        "OperatorsName": person(),
    }


def dicom_header(spec: PatientSpec) -> dict[str, Any]:
    header = identity(spec)
    header.update({
        "PatientSex": spec.sex,
        "PatientAge": f"{int(spec.age):03d}Y",
        "Manufacturer": spec.manufacturer,
        "ManufacturerModelName": spec.model,
        "ConvolutionKernel": spec.convolution_kernel,
        "StudyDescription": "CT CHEST",
        "SeriesDescription": f"CHEST {spec.slice_mm:g}mm {spec.convolution_kernel}",
        "ProtocolName": "Chest routine",
    })
    return header


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _sitk_image(array: np.ndarray, spacing_zyx, origin_xyz):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    img.SetOrigin(tuple(float(o) for o in origin_xyz))
    return img


def write_patient(row: Mapping[str, Any] | pd.Series, image: str | Path | None = None,
                  mask: str | Path | None = None,
                  lesion_mask: str | Path | None = None) -> dict[str, Any]:
    """Build one patient and write its scan and exact lung mask (each atomically); a dense
    lesion case (or any patient given ``lesion_mask``) also its exact lesion mask, by default
    beside the lung mask."""
    import SimpleITK as sitk

    from covidct.synth.dicom import write_series

    spec = row if isinstance(row, PatientSpec) else PatientSpec.from_row(row)
    image = Path(
        image
        or spec.image
        or f"{spec.patient}/{'dicom' if spec.format == 'dicom' else 'ct.nii.gz'}"
    )
    mask = Path(mask or spec.mask or image.parent / LUNG_MASK)
    if lesion_mask is None and spec.case:
        lesion_mask = mask.parent / LESION_MASK
    fmt = "nifti" if image.name.endswith((".nii", ".nii.gz")) else spec.format
    if fmt == "nifti" and not image.name.endswith((".nii", ".nii.gz")):
        raise CovidctError(
            "a NIfTI output must end in .nii or .nii.gz", patient=spec.patient, path=image
        )
    t0 = time.perf_counter()
    volume, lung_mask, spacing, origin, truth = make_patient(spec, truth=True)
    t1 = time.perf_counter()
    if fmt == "dicom":
        # stored values are unsigned: the intercept puts the padding value at or above 0
        intercept = -1024.0 * max(1, math.ceil(-int(volume.min()) / 1024.0))
        header = dicom_header(spec)
        header["PixelPaddingValue"] = int(spec.padding_hu - intercept)
        with atomic_path(image) as tmp:
            write_series(
                volume,
                tmp,
                spacing=spacing,
                origin=origin,
                header=header,
                rescale_intercept=intercept,
                transfer_syntax=None
                if spec.transfer_syntax == "explicit"
                else spec.transfer_syntax,
                uid_seed=spec.seed,
                reverse_z=bool(spec.reverse_z),
            )
    else:
        with atomic_path(image) as tmp:
            sitk.WriteImage(_sitk_image(volume, spacing, origin), str(tmp), True)
    with atomic_path(mask) as tmp:
        sitk.WriteImage(_sitk_image(lung_mask, spacing, origin), str(tmp), True)
    if lesion_mask is not None:
        lesion_mask = Path(lesion_mask)
        with atomic_path(lesion_mask) as tmp:
            sitk.WriteImage(_sitk_image(truth["lesion_mask"], spacing, origin), str(tmp), True)
    t2 = time.perf_counter()
    lung_ml = float(lung_mask.sum()) * float(np.prod(spacing)) / 1000.0
    log.info(
        "synth %s (%s, severity %.2f): %dx%dx%d voxels, %.2f mm slices, lungs %.0f mL; "
        "built in %.1f s, wrote %s (%s) and %s in %.1f s",
        spec.patient,
        spec.label,
        spec.severity,
        *volume.shape,
        spec.slice_mm,
        lung_ml,
        t1 - t0,
        image,
        fmt,
        mask,
        t2 - t1,
    )
    return dict(
        image=str(image),
        mask=str(mask),
        lesion_mask=None if lesion_mask is None else str(lesion_mask),
        shape=volume.shape,
        spacing=spacing,
        origin=origin,
        format=fmt,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--spec", help="the patient's cohort row as a JSON object (what the workflow passes)"
    )
    src.add_argument(
        "--cohort", help="cohort table (TSV) written by `covidct cohort`; needs --patient"
    )
    parser.add_argument("--patient", help="patient id in --cohort")
    parser.add_argument(
        "--image",
        default=None,
        help="output scan: a DICOM folder or a .nii.gz file (default: the row's image)",
    )
    parser.add_argument("--mask", default=None,
                        help="output lung mask .nii.gz (default: the row's mask, beside the image)")
    parser.add_argument("--lesion-mask", default=None,
                        help="output exact lesion mask .nii.gz (default: beside the lung mask for "
                             "a dense lesion case, else none)")


def run(args: argparse.Namespace) -> int:
    if args.spec is not None:
        try:
            row = json.loads(args.spec)
        except json.JSONDecodeError as err:
            raise CovidctError(f"--spec is not a JSON object: {err}") from None
        if not isinstance(row, dict):
            raise CovidctError("--spec is not a JSON object")
        args.patient = args.patient or row.get("patient")
    else:
        if not args.patient:
            raise CovidctError("--cohort needs --patient", path=args.cohort)
        from covidct.synth.cohort import read_cohort

        table = read_cohort(args.cohort)
        rows = table[table["patient"] == args.patient]
        if rows.empty:
            raise CovidctError(
                "patient not in the cohort table", patient=args.patient, path=args.cohort
            )
        row = rows.iloc[0].to_dict()
    write_patient(row, image=args.image, mask=args.mask, lesion_mask=args.lesion_mask)
    return 0
