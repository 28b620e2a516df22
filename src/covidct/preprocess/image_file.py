"""Image files (NIfTI, MHA, NRRD, a lone DICOM file) through SimpleITK, checked for
completeness: SimpleITK fills a truncated gzip or NIfTI file with zeros instead of failing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covidct.errors import CovidctError
from covidct.preprocess.scan import STEP, Scan

FILE_FORMATS = {".nii": "nifti", ".nii.gz": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd",
                ".mha": "metaimage", ".mhd": "metaimage", ".dcm": "dicom"}


def _file_format(path: Path) -> str:
    name = path.name.lower()
    for suffix, fmt in sorted(FILE_FORMATS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return fmt
    return path.suffix.lstrip(".").lower() or "unknown"


def _payload_size(path: Path) -> int:
    """Bytes of the file's content: decompressed for gzip, checking the stream is complete.

    SimpleITK fills a truncated gzip or NIfTI file with zeros instead of failing, so ingest
    checks completeness itself.
    """
    import gzip
    import zlib

    if path.suffix.lower() != ".gz":
        return path.stat().st_size
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise CovidctError(f"truncated or corrupt gzip file ({exc})", step=STEP, path=path) from exc
    return total


def _check_nifti_complete(path: Path, image) -> None:
    """A NIfTI file must hold its header's offset plus every voxel."""
    import gzip
    import struct

    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rb") as f:
        header = f.read(352)
    if len(header) < 348:
        raise CovidctError("truncated NIfTI header", step=STEP, path=path)
    endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
    bitpix = struct.unpack(endian + "h", header[72:74])[0]
    vox_offset = struct.unpack(endian + "f", header[108:112])[0]
    n_voxels = int(np.prod(image.GetSize())) * image.GetNumberOfComponentsPerPixel()
    expected = int(vox_offset) + n_voxels * bitpix // 8
    found = _payload_size(path)
    if found < expected:
        raise CovidctError(f"truncated image file: {found} of {expected} bytes", step=STEP,
                           path=path)


def read_file(path: Path) -> Scan:
    """A NIfTI/MHA/NRRD (or single DICOM) file through SimpleITK."""
    import SimpleITK as sitk

    from covidct.preprocess.dicom import read_header

    fmt = _file_format(path)
    if fmt == "dicom":   # a lone (e.g. multi-frame) DICOM file: only the modality to check
        found = read_header(path)
        modality = found[0].modality if found else None
        if modality and modality != "CT":
            raise CovidctError(f"not a CT (modality {modality})", step=STEP, path=path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise CovidctError(f"unreadable image file ({str(exc).strip().splitlines()[-1]})",
                           step=STEP, path=path) from exc
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_complete(path, image)
    elif path.suffix.lower() == ".gz":
        _payload_size(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CovidctError(f"not a scalar image ({image.GetNumberOfComponentsPerPixel()} "
                           "components per voxel)", step=STEP, path=path)
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise CovidctError(f"not a 3-D image ({image.GetDimension()}-D, size "
                           f"{'x'.join(map(str, image.GetSize()))})", step=STEP, path=path)
    return Scan(image=image, source_format=fmt, n_files=1, provenance={}, path=path)
