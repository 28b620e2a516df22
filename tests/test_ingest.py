"""covidct ingest: DICOM folders and image files -> ct.zarr (int16 HU, LPS), on real reads and
stores."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from covidct.cli import main
from covidct.io import stores as zarrio
from covidct.preprocess.hu import AIR_HU, repair_hu
from covidct.preprocess.ingest import ingest
from covidct.synth.dicom import write_series

IDENTITY = np.eye(3).ravel()
SPACING = (2.5, 0.7, 0.8)               # z, y, x mm
ORIGIN = (-100.5, -50.25, 30.0)         # x, y, z LPS mm


def hu_volume(shape=(6, 24, 32), seed=0) -> np.ndarray:
    """A small HU volume: air, a 'body' and random tissue values, with -2048 padding corners."""
    rng = np.random.default_rng(seed)
    vol = rng.integers(-1000, 1800, shape).astype(np.int16)
    vol[:, :3, :3] = -2048
    return vol


def expected_hu(vol: np.ndarray) -> np.ndarray:
    out = vol.copy()
    out[out < -1200] = AIR_HU
    return out


def ingest_cli(capsys, *argv) -> tuple[int, str]:
    rc = main(["ingest", *map(str, argv)])
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", ["plain", "rle", "jpeg-lossless", "reverse_z"])
def test_synthetic_dicom_round_trip(tmp_path, kind):
    vol = hu_volume()
    ts = {"rle": "rle", "jpeg-lossless": "jpeg-lossless"}.get(kind)
    paths = write_series(vol, tmp_path / "dcm", spacing=SPACING, origin=ORIGIN, uid_seed=7,
                         rescale_intercept=-2048, transfer_syntax=ts, reverse_z=kind == "reverse_z",
                         header={"ConvolutionKernel": "B31f"})
    if kind == "jpeg-lossless":  # the real thing, as GDCM wrote it
        assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    out = ingest(tmp_path / "dcm", tmp_path / "ct.zarr", patient="P001")

    img = zarrio.open_image(out)
    assert img.array.dtype == np.int16
    assert img.array.chunks == (1, 24, 32)
    np.testing.assert_array_equal(img.read(), expected_hu(vol))
    np.testing.assert_allclose(img.spacing, SPACING, atol=1e-6)
    np.testing.assert_allclose(img.origin, ORIGIN, atol=1e-6)
    np.testing.assert_allclose(img.direction, IDENTITY, atol=1e-9)
    meta = img.attrs["ingest"]
    assert img.attrs["patient"] == "P001"
    assert meta["padding_voxels_replaced"] == int(np.count_nonzero(vol < -1200)) == 6 * 9
    assert meta["hu_range"] == [int(expected_hu(vol).min()), int(vol.max())]
    assert meta["source_hu_range"][0] == -2048
    assert meta["source_files"] == 6 and meta["source_format"] == "dicom"
    assert meta["header"]["kernel"] == "B31f"
    assert meta["header"]["modality"] == "CT"
    assert meta["header"]["slice_step_mm"] == pytest.approx(2.5)
    want_ts = {"rle": "1.2.840.10008.1.2.5", "jpeg-lossless": "1.2.840.10008.1.2.4.70"}
    assert meta["header"]["transfer_syntax"] == want_ts.get(kind, "1.2.840.10008.1.2.1")
    # the round trip through the store is exact, geometry included
    back = img.to_sitk()
    assert back.TransformIndexToPhysicalPoint((0, 0, 5)) == pytest.approx(
        (ORIGIN[0], ORIGIN[1], ORIGIN[2] + 5 * SPACING[0]))


def test_pixel_padding_value_becomes_air(tmp_path):
    vol = np.full((4, 16, 16), 40, np.int16)
    vol[:, :, :4] = -1000          # stored 0 with intercept -1000: declared as padding
    vol[:, :, 4:6] = -999          # real air next to it stays
    write_series(vol, tmp_path / "dcm", spacing=(1, 1, 1), rescale_intercept=-1000,
                 header={"PixelPaddingValue": 0})
    img = zarrio.open_image(ingest(tmp_path / "dcm", tmp_path / "ct.zarr"))
    out = img.read()
    assert (out[:, :, :4] == AIR_HU).all()
    assert (out[:, :, 4:6] == -999).all() and (out[:, :, 6:] == 40).all()
    assert img.attrs["ingest"]["padding_values_hu"] == [-1000.0]
    assert img.attrs["ingest"]["padding_voxels_replaced"] == 4 * 16 * 4


def test_repair_hu_clips_rounds_and_keeps_input():
    src = np.array([[[-3024.0, -2000.0, -1150.4, 40.6, 40000.0, -1024.0]]], np.float32)
    out, n = repair_hu(src)
    np.testing.assert_array_equal(out, [[[AIR_HU, AIR_HU, -1150, 41, 32767, -1024]]])
    assert out.dtype == np.int16 and n == 2
    assert src[0, 0, 0] == -3024.0          # the input view is not modified


# --------------------------------------------------------------------------- real data
def test_real_lungmask_dicom(real_data, tmp_path, capsys):
    folder = real_data / "lungmask_testdata"
    rc, err = ingest_cli(capsys, folder, tmp_path / "ct.zarr", "--patient", "LM1",
                         "--min-slices", "2")
    assert rc == 0, err
    assert "no Modality in the DICOM header" in err
    img = zarrio.open_image(tmp_path / "ct.zarr")
    out = img.read()
    assert out.shape == (2, 512, 512)
    np.testing.assert_allclose(img.spacing, (1.0, 0.625, 0.625))
    np.testing.assert_allclose(img.direction, IDENTITY)
    # independent reference: pydicom's own decoding, ordered by position along z
    dss = sorted((pydicom.dcmread(p, force=True) for p in folder.glob("*.dcm")),
                 key=lambda d: float(d.ImagePositionPatient[2]))
    ref = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
                    for d in dss])
    assert ref.min() == -2048 and ref.max() == 1502            # SOURCES.md
    np.testing.assert_array_equal(out, np.where(ref < -1200, AIR_HU, ref))
    assert out.max() == 1502 and out.min() > -1200
    assert img.attrs["ingest"]["padding_voxels_replaced"] == int((ref == -2048).sum())
    # and by default two slices are too few
    rc, err = ingest_cli(capsys, folder, tmp_path / "two.zarr", "--patient", "LM1")
    assert rc == 2 and "fewer than 3 slices (found 2)" in err
    assert not (tmp_path / "two.zarr").exists()


@pytest.mark.parametrize("name, shape, spacing, hu", [
    ("cip_copdgene/ct-64.nrrd", (79, 64, 64), (3.987, 4.172, 4.172), (-1007, 1095)),
    ("covid_ct_md/P001_ct_bin4x4x1.nii.gz", (148, 128, 128), (2.0, 2.992, 2.992), (-1024, None)),
])
def test_real_image_files(real_data, tmp_path, name, shape, spacing, hu):
    src = real_data / name
    img = zarrio.open_image(ingest(src, tmp_path / "ct.zarr", patient="R1"))
    out = img.read()
    assert out.shape == shape and out.dtype == np.int16
    np.testing.assert_allclose(img.spacing, spacing, atol=2e-3)
    np.testing.assert_allclose(img.direction, IDENTITY)
    assert out.min() == hu[0]
    if hu[1] is not None:
        assert out.max() == hu[1]
    else:
        assert 1000 < out.max() < 2200      # SOURCES.md: -1024..~1570 over the six cases
    ref = sitk.ReadImage(str(src))
    np.testing.assert_array_equal(out, sitk.GetArrayFromImage(ref))
    assert img.origin == pytest.approx(ref.GetOrigin())
    assert img.attrs["ingest"]["source_format"] == ("nrrd" if name.endswith("nrrd") else "nifti")


def test_real_flipped_nifti_becomes_lps(real_data, tmp_path):
    """TotalSegmentator's example is stored RAS-like (direction diag(-1, -1, 1))."""
    src = sitk.ReadImage(str(real_data / "totalseg_example" / "example_ct_sm.nii.gz"))
    assert src.GetDirection() == (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    img = zarrio.open_image(ingest(real_data / "totalseg_example" / "example_ct_sm.nii.gz",
                                   tmp_path / "ct.zarr"))
    np.testing.assert_allclose(img.direction, IDENTITY)
    nx, ny, nz = src.GetSize()
    np.testing.assert_array_equal(img.read(), sitk.GetArrayFromImage(src)[:, ::-1, ::-1])
    # the same physical point: output voxel (0, 0, 0) is source voxel (nx-1, ny-1, 0)
    assert img.origin == pytest.approx(src.TransformIndexToPhysicalPoint((nx - 1, ny - 1, 0)))
    assert img.attrs["ingest"]["source_direction"] == [-1, 0, 0, 0, -1, 0, 0, 0, 1]


# --------------------------------------------------------------------------- privacy
PLANTED = {
    "PatientName": "Wombatfeather^Qxzvella",
    "PatientID": "PIDQ7Z3K9X",
    "InstitutionName": "Gloomwater Infirmary 5521",
    "PatientBirthDate": "19010203",
    "ReferringPhysicianName": "Drplumtree^Yvonnik",
    "AccessionNumber": "ACCZZ88123",
    "OtherPatientIDs": "OPIDJ4401",
    # free text a scanner or a technologist may fill, each with a planted name
    "SeriesDescription": "Chest for Quillbramble",
    "StudyDescription": "CT of Quillbramble2",
    "ProtocolName": "Quillbramble3 protocol",
    "ImageComments": "called Quillbramble4",
    "ContrastBolusAgent": "Quillbramble5 omnipaque",
    "RequestedProcedureDescription": "for Quillbramble6",
    "PerformedProcedureStepDescription": "Quillbramble7 step",
    "AdditionalPatientHistory": "Quillbramble8 history",
    "InstitutionalDepartmentName": "Quillbramble9 ward",
    "StationName": "QBSTATION10",
    "OperatorsName": "Quillbramble^Eleven",
    "PerformingPhysicianName": "Quillbramble^Twelve",
    "PatientComments": "Quillbramble13 notes",
    "DerivationDescription": "Quillbramble14 derived",
}


@pytest.mark.parametrize("ts", [None, "jpeg-lossless"])
def test_identifying_fields_never_reach_store_or_log(tmp_path, capsys, ts):
    paths = write_series(hu_volume((4, 16, 16)), tmp_path / "dcm", spacing=SPACING,
                         header=PLANTED, transfer_syntax=ts)
    assert str(pydicom.dcmread(paths[0]).PatientName) == PLANTED["PatientName"]  # planted
    out = tmp_path / "ct.zarr"
    rc, err = ingest_cli(capsys, tmp_path / "dcm", out, "--patient", "PSEUDO-0042", "-v")
    assert rc == 0, err
    blob = b"".join(p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file())
    assert b"PSEUDO-0042" in blob and "PSEUDO-0042" not in err  # the pseudonym is recorded
    for value in PLANTED.values():
        for piece in {value, *value.split("^")}:
            assert piece.encode() not in blob, piece
            assert piece not in err, piece


# --------------------------------------------------------------------------- series choice
def test_picks_largest_axial_ct_series(tmp_path, capsys):
    folder = tmp_path / "study"
    axial = hu_volume((5, 16, 20), seed=1)
    series = [  # (volume, header, seed): decoys first, some with more slices than the axial one
        (hu_volume((3, 16, 20), seed=2),
         {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, 11),
        (hu_volume((8, 16, 20), seed=3), {"ImageOrientationPatient": [1, 0, 0, 0, 0, -1]}, 12),
        (hu_volume((9, 16, 20), seed=4), {"Modality": "MR"}, 13),
        (hu_volume((4, 16, 20), seed=5), {}, 14),           # axial CT, but fewer slices
        (axial, {}, 15),
    ]
    study = {"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.77", "PatientID": "SAME"}
    for k, (vol, header, seed) in enumerate(series):
        for p in write_series(vol, tmp_path / f"s{k}", spacing=SPACING,
                              header={**study, **header}, uid_seed=seed):
            folder.mkdir(exist_ok=True)
            shutil.move(p, folder / f"s{k}_{p.name}")
    rc, err = ingest_cli(capsys, folder, tmp_path / "ct.zarr", "--patient", "P2")
    assert rc == 0, err
    np.testing.assert_array_equal(zarrio.read_array(tmp_path / "ct.zarr"), expected_hu(axial))
    assert "3-slice series set aside: a localizer/scout" in err
    assert "8-slice series set aside: not axial (coronal)" in err
    assert "9-slice series set aside: modality MR" in err
    assert ("chose the 5-slice axial CT series, the one with the most slices, over 1 other(s) "
            "of the same study (4 slices)") in err


@pytest.mark.parametrize("second, what", [
    ({"PatientID": "OTHER-PATIENT", "StudyInstanceUID": "1.2.3.4"}, "2 different patients"),
    ({"PatientID": "SAME-PATIENT", "StudyInstanceUID": "1.2.3.5"}, "2 different studies"),
])
def test_a_folder_mixing_patients_or_studies_is_refused(tmp_path, capsys, second, what):
    """Two patients' series copied into one folder must not silently give the larger one."""
    folder = tmp_path / "mixed"
    first = {"PatientID": "SAME-PATIENT", "StudyInstanceUID": "1.2.3.4"}
    for k, (n, header) in enumerate([(6, first), (4, second)]):
        for p in write_series(hu_volume((n, 12, 12), seed=k), tmp_path / f"s{k}",
                              spacing=SPACING, header=header, uid_seed=30 + k):
            folder.mkdir(exist_ok=True)
            shutil.move(p, folder / f"s{k}_{p.name}")
    rc, err = ingest_cli(capsys, folder, tmp_path / "ct.zarr", "--patient", "M1")
    assert rc == 2 and not (tmp_path / "ct.zarr").exists()
    line = err.strip().splitlines()[-1]
    assert what in line and "6 slices" in line and "4 slices" in line and str(folder) in line
    assert "OTHER-PATIENT" not in err and "SAME-PATIENT" not in err


# --------------------------------------------------------------------------- bad input
def _series(tmp_path, n=6, **kw) -> Path:
    write_series(hu_volume((n, 12, 12)), tmp_path / "dcm", spacing=SPACING, **kw)
    return tmp_path / "dcm"


def _missing(tmp_path):
    return tmp_path / "nowhere", "no such file or folder", "nowhere"


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", "no DICOM series found (empty folder)", "empty"


def _not_dicom(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("scan notes\n" * 50)
    return tmp_path / "notes", "none a readable DICOM image", "notes"


def _truncated_pixels(tmp_path):
    folder = _series(tmp_path)
    victim = folder / "IM00003.dcm"
    victim.write_bytes(victim.read_bytes()[:-150])
    return folder, "unreadable DICOM pixel data", "IM00003.dcm"


def _truncated_header(tmp_path):
    folder = _series(tmp_path)
    victim = folder / "IM00002.dcm"
    victim.write_bytes(victim.read_bytes()[:600])
    return folder, "truncated or damaged DICOM header (no image size)", "IM00002.dcm"


def _garbage_nifti(tmp_path):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(b"\x1f\x8b not really gzip" * 10)
    return path, "unreadable image file", "scan.nii.gz"


def _mr(tmp_path):
    return _series(tmp_path, header={"Modality": "MR"}), "not a CT (modality MR)", "IM00001.dcm"


def _two_slices(tmp_path):
    return _series(tmp_path, n=2), "fewer than 3 slices (found 2)", "IM00001.dcm"


def _uneven(tmp_path):
    folder = _series(tmp_path)
    path = folder / "IM00004.dcm"
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.6   # step 3.1 then 1.9
    ds.save_as(path)
    return folder, "uneven slice spacing: steps from 1.9 to 3.1 mm", "IM0000"


def _missing_slice(tmp_path):
    folder = _series(tmp_path, n=8)
    (folder / "IM00004.dcm").unlink()
    return folder, "missing slices: gap of 5 mm after slice 3 of 7", "IM00005.dcm"


def _mixed_sizes(tmp_path):
    folder = tmp_path / "dcm"   # one series UID, its parts in two sub-folders
    write_series(hu_volume((3, 12, 12)), folder / "a", spacing=SPACING, uid_seed=3)
    write_series(hu_volume((3, 10, 12)), folder / "b", spacing=SPACING, uid_seed=3,
                 origin=(0, 0, 3 * SPACING[0]))
    return folder, "mixed image sizes in one series: 12x12 (3 files), 10x12 (3 files)", "dcm/b/"


def _not_hu(tmp_path):
    path = tmp_path / "stored.nii.gz"
    vol = np.random.default_rng(0).integers(1, 2999, (5, 8, 8)).astype(np.uint16)
    vol[0, 0, :2] = 0, 2999
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(path))
    return path, "no voxel below 0 HU (values 0..2999): not Hounsfield units", "stored.nii.gz"


def _two_d(tmp_path):
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(path))
    return path, "not a 3-D image (2-D, size 8x8)", "slice.nrrd"


@pytest.mark.parametrize(
    "make",
    [
        _missing,
        _empty,
        _not_dicom,
        _truncated_pixels,
        _truncated_header,
        _garbage_nifti,
        _mr,
        _two_slices,
        _uneven,
        _missing_slice,
        _mixed_sizes,
        _not_hu,
        _two_d,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_bad_input_gives_one_clear_line(tmp_path, capsys, make):
    source, message, filename = make(tmp_path)
    out = tmp_path / "out" / "ct.zarr"
    rc, err = ingest_cli(capsys, source, out, "--patient", "PX9")
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("covidct ingest: error:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("covidct ingest: error: ingest: patient PX9: ")
    assert message in lines[0]
    assert filename in lines[0].replace("\\", "/")
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())   # no temp left either


def test_unsigned_values_with_explicit_intercept(tmp_path, capsys):
    vol = np.random.default_rng(1).integers(0, 3000, (4, 8, 8)).astype(np.uint16)
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "stored.nrrd"))
    rc, err = ingest_cli(capsys, tmp_path / "stored.nrrd", tmp_path / "ct.zarr",
                         "--rescale-intercept", "-1024")
    assert rc == 0, err
    img = zarrio.open_image(tmp_path / "ct.zarr")
    np.testing.assert_array_equal(img.read(), vol.astype(np.int16) - 1024)
    assert img.attrs["ingest"]["rescale_intercept_added"] == -1024


def test_help_does_not_import_tensorflow(repo):
    import subprocess
    import sys

    code = (
        "import sys\nfrom covidct.cli import main\ntry:\n    main(['ingest', '--help'])\n"
        "except SystemExit:\n    pass\nprint('tensorflow' in sys.modules, 'mlflow' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=repo, timeout=60)
    assert res.stdout.strip().splitlines()[-1] == "False False"
    assert "--min-slices" in res.stdout and "--patient" in res.stdout


def test_truncated_nifti_is_refused_not_zero_filled(real_data, tmp_path):
    """SimpleITK zero-fills a cut NIfTI; ingest must notice, for gzip and plain files alike."""
    import gzip

    from covidct.cli import main

    source = real_data / "covid_ct_md" / "P002_ct_bin4x4x1.nii.gz"
    cut_gz = tmp_path / "cut.nii.gz"
    cut_gz.write_bytes(source.read_bytes()[:5000])
    raw = gzip.decompress(source.read_bytes())
    cut_nii = tmp_path / "cut.nii"
    cut_nii.write_bytes(raw[: len(raw) // 2])
    for path, words in ((cut_gz, "truncated or corrupt gzip"),
                        (cut_nii, f"truncated image file: {len(raw) // 2} of {len(raw)} bytes")):
        out = tmp_path / f"{path.stem}.zarr"
        import io
        from contextlib import redirect_stderr

        err = io.StringIO()
        with redirect_stderr(err):
            assert main(["ingest", str(path), str(out), "--patient", "PX1"]) == 2
        assert words in err.getvalue() and "patient PX1" in err.getvalue()
        assert path.name in err.getvalue()
        assert not out.exists()
