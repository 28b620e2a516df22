"""Writing CT series as DICOM (the synthetic cohort, tests and benchmarks use it).

Reading goes through :mod:`covidct.preprocess.ingest`; this module only writes, with pydicom,
one file per axial slice, the way a scanner exports a series: modality CT, stored values with
rescale slope/intercept, image position/orientation per slice, and ordinary header fields. The
identifying fields (name, birth date, ids, institution) are written on purpose, so tests can
check that nothing downstream copies them.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

# Header fields that identify a person; ingest must never copy any of them.
IDENTIFYING_FIELDS = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "InstitutionName",
    "InstitutionAddress", "ReferringPhysicianName", "AccessionNumber", "StudyID",
    "OperatorsName", "PerformingPhysicianName",
)


def write_series(volume_hu: np.ndarray, out_dir: str | Path, *, spacing: Sequence[float],
                 origin: Sequence[float] = (0.0, 0.0, 0.0), header: dict[str, Any] | None = None,
                 rescale_intercept: float = -1024.0, rescale_slope: float = 1.0,
                 transfer_syntax: str | None = None, uid_seed: int | None = None,
                 reverse_z: bool = False) -> list[Path]:
    """Write ``volume_hu`` (z, y, x; HU) as a DICOM CT series, one file per slice.

    ``spacing`` is (z, y, x) mm and ``origin`` the LPS position (x, y, z) of the first voxel;
    slices run towards +z (head) in the LPS frame with the identity orientation. ``header``
    overrides or adds dataset fields (e.g. ``PatientName``, ``ConvolutionKernel``).
    ``transfer_syntax`` "rle" writes RLE Lossless pixel data (pydicom), "jpeg-lossless" JPEG
    Lossless process 14 (1.2.840.10008.1.2.4.70) and "jpeg2000" JPEG 2000 Lossless, both through
    SimpleITK's GDCM writer; default is explicit VR little endian. ``reverse_z`` numbers the
    files from head to feet, as some scanners do.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    volume_hu = np.asarray(volume_hu)
    if volume_hu.ndim != 3:
        raise ValueError(f"expected (z, y, x), got shape {volume_hu.shape}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dz, dy, dx = (float(s) for s in spacing)
    stored = np.round((volume_hu.astype(np.float64) - rescale_intercept) / rescale_slope)
    stored = np.clip(stored, 0, 65535).astype(np.uint16)

    prefix = "1.2.826.0.1.3680043.8.498."
    seed = None if uid_seed is None else str(uid_seed)
    study_uid = generate_uid(prefix, entropy_srcs=None if seed is None else [seed, "study"])
    series_uid = generate_uid(prefix, entropy_srcs=None if seed is None else [seed, "series"])
    frame_uid = generate_uid(prefix, entropy_srcs=None if seed is None else [seed, "frame"])
    today = _dt.date(2020, 2, 1).strftime("%Y%m%d")
    header = dict(header or {})
    nz = volume_hu.shape[0]
    paths = []
    for k in range(nz):
        sop_uid = generate_uid(prefix, entropy_srcs=None if seed is None else [seed, "sop", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
        ds.StudyTime = ds.SeriesTime = "093000"
        ds.Manufacturer = "covidct synthetic"
        ds.BodyPartExamined = "CHEST"
        ds.SeriesNumber = 2
        ds.SeriesDescription = "CHEST"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.SliceThickness = f"{dz:.6g}"
        ds.PixelSpacing = [f"{dy:.6g}", f"{dx:.6g}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [f"{origin[0]:.6f}", f"{origin[1]:.6f}",
                                   f"{origin[2] + k * dz:.6f}"]
        ds.SliceLocation = f"{origin[2] + k * dz:.6f}"
        ds.InstanceNumber = (nz - k) if reverse_z else (k + 1)
        ds.Rows, ds.Columns = int(volume_hu.shape[1]), int(volume_hu.shape[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = f"{rescale_intercept:g}"
        ds.RescaleSlope = f"{rescale_slope:g}"
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = "-600", "1500"
        for key, value in header.items():
            setattr(ds, key, value)
        path = out_dir / f"IM{(nz - k) if reverse_z else (k + 1):05d}.dcm"
        if transfer_syntax in GDCM_COMPRESSORS:
            hu = stored[k].astype(np.float64) * rescale_slope + rescale_intercept
            _write_gdcm_slice(ds, np.clip(np.round(hu), -32768, 32767).astype(np.int16), path,
                              spacing=(dz, dy, dx), compressor=GDCM_COMPRESSORS[transfer_syntax])
            paths.append(path)
            continue
        ds.PixelData = stored[k].tobytes()
        if transfer_syntax == "rle":
            ds.compress(RLELossless)
        elif transfer_syntax not in (None, "explicit"):
            raise ValueError(f"unsupported transfer syntax {transfer_syntax!r}")
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


# transfer_syntax name -> SimpleITK/GDCM compressor. GDCM writes these lossless: "JPEG" is
# JPEG Lossless, Non-Hierarchical, First-Order Prediction (1.2.840.10008.1.2.4.70), the syntax of
# many scanner exports (e.g. COVID-CT-MD); "JPEG2000" is JPEG 2000 Lossless
# (1.2.840.10008.1.2.4.90).
# JPEG-LS has no writer here (ITK's GDCMImageIO offers none, pydicom needs pyjpegls).
GDCM_COMPRESSORS = {"jpeg-lossless": "JPEG", "jpeg2000": "JPEG2000"}


def _write_gdcm_slice(ds, hu_slice: np.ndarray, path: Path, *, spacing, compressor: str) -> None:
    """Write one slice through SimpleITK's GDCM writer with a compressed transfer syntax.

    GDCM stores the int16 HU values directly (PixelRepresentation 1, intercept 0, slope 1);
    every other header field of ``ds`` is passed on through the image's metadata dictionary.
    """
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(hu_slice[np.newaxis])
    img.SetSpacing((float(spacing[2]), float(spacing[1]), float(spacing[0])))
    img.SetOrigin(tuple(float(v) for v in ds.ImagePositionPatient))
    skip = {0x00280002, 0x00280004, 0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280102,
            0x00280103, 0x00281052, 0x00281053, 0x7FE00010}
    for elem in ds:
        if int(elem.tag) in skip or elem.VR == "SQ" or elem.value is None:
            continue
        value = elem.value
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            text = "\\".join(str(v) for v in value)
        else:
            text = str(value)
        img.SetMetaData(f"{elem.tag.group:04x}|{elem.tag.element:04x}", text)
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.KeepOriginalImageUIDOn()
    writer.SetUseCompression(True)
    writer.SetCompressor(compressor)
    writer.SetFileName(str(path))
    writer.Execute(img)
