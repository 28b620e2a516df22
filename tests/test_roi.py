"""Lung-ROI preprocessing: pure functions on constructed volumes, the stage on real CT."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from covidct.cli import main
from covidct.errors import CovidctError
from covidct.io import stores as zarrio
from covidct.params import RoiParams
from covidct.preprocess.resample import antialias_sigma, resize_cubic
from covidct.preprocess.roi import (
    RoiRejected,
    box_percentile,
    check_lung_mask,
    lung_bbox,
    make_roi,
    resize_and_zscore,
    suppress_non_lung,
)


def zscore(array):
    """The reference z-score: float64 mean and sd over the whole array."""
    a = np.asarray(array, dtype=np.float32)
    mean, sd = float(a.mean(dtype=np.float64)), float(a.std(dtype=np.float64))
    return (a - np.float32(mean)) / np.float32(sd), mean, sd


def _mask_with_areas(areas, shape=(200, 200)):
    """A mask whose slice z holds a centred square of (about) areas[z] pixels."""
    m = np.zeros((len(areas),) + shape, bool)
    for z, a in enumerate(areas):
        side = int(round(np.sqrt(a)))
        if side:
            y0 = shape[0] // 2 - side // 2
            m[z, y0:y0 + side, y0:y0 + side] = True
    return m


# --------------------------------------------------------------------------- lung_bbox

def test_end_slice_rule_drops_exactly_the_slices_under_3_percent():
    # largest slice 100x100 = 10000 px; 3% = 300 px
    areas = [0, 100, 289, 324, 10000, 250, 9000, 400, 289, 0]   # 17^2=289 < 300 <= 18^2=324
    m = _mask_with_areas(areas)
    z0, z1, y0, y1, x0, x1 = lung_bbox(m)
    assert (z0, z1) == (3, 8)          # drops 0,1,2 at the start and 8,9 at the end; keeps the
    #                                    interior 250-px slice 5 (not an end slice)
    # a dropped end slice may lie outside the in-plane box
    m[1, 0:5, 0:5] = True
    assert lung_bbox(m) == (3, 8, y0, y1, x0, x1)
    # the box holds every mask voxel of the kept slices
    kept = m[z0:z1]
    assert kept.sum() == kept[:, y0:y1, x0:x1].sum()
    assert (y0, y1, x0, x1) == (50, 150, 50, 150)


def test_neighbour_rule_keeps_a_slice_only_with_both_neighbours_passing():
    # 3% of 10000 = 300: slice 2 passes but its neighbour 1 does not, so the authors' rule
    # starts at 3; slice 7 passes with its neighbour 6 but 8 fails, so it ends at 6
    areas = [0, 100, 400, 400, 10000, 9000, 400, 350, 100, 0]
    m = _mask_with_areas(areas)
    assert lung_bbox(m)[:2] == (2, 8)
    assert lung_bbox(m, slice_rule="neighbours")[:2] == (3, 7)
    # an isolated passing slice inside the lung breaks nothing: the span is first..last kept
    m2 = _mask_with_areas([400, 400, 10000, 100, 10000, 400, 400])
    assert lung_bbox(m2, slice_rule="neighbours")[:2] == (0, 7)   # ends: it and one neighbour
    with pytest.raises(RoiRejected, match="neighbours"):
        lung_bbox(_mask_with_areas([10000, 100, 10000, 100, 10000]), slice_rule="neighbours")


def test_whole_mask_box_takes_the_plane_of_dropped_slices_too():
    m = _mask_with_areas([100, 10000, 10000, 10000, 100])
    m[0, 0:10, 0:10] = True                  # in a dropped end slice, outside the kept box
    assert lung_bbox(m)[2:] == (50, 150, 50, 150)
    assert lung_bbox(m, plane_box="whole_mask") == (1, 4, 0, 150, 0, 150)


def test_drop_scan_ends_leaves_the_first_and_last_slice_out():
    m = _mask_with_areas([10000] * 6)
    m[0, 0:10, 0:10] = True
    assert lung_bbox(m) == (0, 6, 0, 150, 0, 150)
    assert lung_bbox(m, drop_scan_ends=True) == (1, 5, 50, 150, 50, 150)
    assert lung_bbox(m, drop_scan_ends=True, plane_box="whole_mask") == (1, 5, 50, 150, 50, 150)
    # the neighbour rule then sees slice 1 as the first slice (it needs slice 2 only)
    m3 = _mask_with_areas([0, 10000, 10000, 10000, 10000, 0])
    assert lung_bbox(m3, drop_scan_ends=True, slice_rule="neighbours")[:2] == (1, 5)


def _step_box():
    """A box with a sharp step: the cubic resize overshoots both plateaus."""
    box = np.zeros((8, 20, 20), np.float32)
    box[:, :, 10:] = 100.0
    return box


def test_clip_resized_removes_the_cubic_overshoot():
    box = _step_box()
    size = (8, 33, 33)
    plain = RoiParams(size=size, antialias=False, zscore="resized")
    clipped = RoiParams(size=size, antialias=False, zscore="resized", clip_resized=True)
    resized = resize_cubic(box, size)
    assert resized.min() < 0 and resized.max() > 100            # the overshoot is there
    _, mean, sd = resize_and_zscore(box, size, clipped)
    expected = np.clip(resized, 0, 100)
    assert mean == pytest.approx(expected.mean(dtype=np.float64), rel=1e-5)
    roi, mean0, _ = resize_and_zscore(box, size, plain)
    assert mean0 == pytest.approx(resized.mean(dtype=np.float64), rel=1e-5)
    roi_c, _, _ = resize_and_zscore(box, size, clipped)
    lo, hi = (np.float32(0) - mean) / sd, (np.float32(100) - mean) / sd
    assert float(roi_c.min()) >= lo - 1e-2 and float(roi_c.max()) <= hi + 1e-2
    assert float(roi.min()) < float(roi_c.min())


def test_zscore_after_resize_is_mean_0_sd_1_on_the_roi():
    box = _step_box()
    box[:, :3] = -50.0                      # rows the shrink averages away
    size = (4, 7, 9)
    before = RoiParams(size=size, antialias=False)
    after = RoiParams(size=size, antialias=False, zscore="resized")
    roi_box, mean_box, sd_box = resize_and_zscore(box, size, before)
    roi_res, _, _ = resize_and_zscore(box, size, after)
    assert mean_box == pytest.approx(box.mean(dtype=np.float64), rel=1e-5)
    assert sd_box == pytest.approx(box.std(dtype=np.float64), rel=1e-5)
    r = roi_res.astype(np.float64)
    assert abs(r.mean()) < 2e-3 and r.std() == pytest.approx(1.0, abs=2e-3)
    assert abs(roi_box.astype(np.float64).mean()) > 0.02      # box stats are another z-score


def test_box_holds_every_mask_voxel_of_an_irregular_mask():
    rng = np.random.default_rng(3)
    field = ndi.gaussian_filter(rng.normal(size=(30, 120, 140)), 4)
    taper = np.abs(np.arange(30) - 14.5)[:, None, None] / 15      # less lung towards the ends
    m = field - 0.05 * taper > 0.02
    assert 0 < m.sum(axis=(1, 2)).min() < 0.03 * m.sum(axis=(1, 2)).max()   # some ends dropped
    z0, z1, y0, y1, x0, x1 = lung_bbox(m)
    areas = m.sum(axis=(1, 2))
    dropped = np.r_[np.arange(0, z0), np.arange(z1, 30)]
    assert np.all(areas[dropped] < 0.03 * areas.max())
    assert m[z0:z1].sum() == m[z0:z1, y0:y1, x0:x1].sum()
    assert m.sum() - m[z0:z1, y0:y1, x0:x1].sum() == areas[dropped].sum()


@pytest.mark.parametrize("slices, side, ok", [(2, 80, False), (3, 80, True), (5, 59, False),
                                              (5, 60, True)])
def test_reject_small_boxes(slices, side, ok):
    m = np.zeros((8, 100, 100), bool)
    m[2:2 + slices, 10:10 + side, 10:10 + 70] = True
    if ok:
        assert lung_bbox(m)[:2] == (2, 2 + slices)
    else:
        with pytest.raises(RoiRejected):
            lung_bbox(m)
    with pytest.raises(RoiRejected, match="empty"):
        lung_bbox(np.zeros((4, 10, 10), bool))


# --------------------------------------------------------------------------- suppression, resize


@pytest.fixture(scope="module")
def box_and_mask():
    rng = np.random.default_rng(0)
    ct = rng.normal(40, 300, (12, 50, 60)).clip(-1024, 2000).astype(np.int16)
    mask = np.zeros(ct.shape, bool)
    mask[2:10, 10:40, 8:28] = True
    mask[2:10, 10:40, 32:52] = True
    ct[mask] = rng.normal(-800, 60, mask.sum()).astype(np.int16)
    return ct, mask


def test_clip_is_the_95th_percentile_of_the_box(box_and_mask):
    ct, mask = box_and_mask
    out, lim = suppress_non_lung(ct, mask)
    assert lim["clip_hu"] == np.percentile(ct, 95)
    assert out.max() <= lim["clip_hu"]
    for q in (0, 3.3, 50, 95, 99.99, 100):
        assert box_percentile(ct, q) == np.percentile(ct, q)
        assert box_percentile(ct.astype(np.float32) + 0.25, q) == pytest.approx(
            np.percentile(ct.astype(np.float32) + 0.25, q))


def test_clamp_limits_are_lung_mean_4sd_and_respected_outside(box_and_mask):
    ct, mask = box_and_mask
    out, lim = suppress_non_lung(ct, mask, percentile=95, n_std=4)
    clipped = np.minimum(ct.astype(np.float64), np.percentile(ct, 95))
    mean, sd = clipped[mask].mean(), clipped[mask].std()
    assert lim["lung_mean_hu"] == pytest.approx(mean, abs=1e-3)
    assert lim["lung_std_hu"] == pytest.approx(sd, abs=1e-3)
    assert lim["clamp_hu"] == pytest.approx([mean - 4 * sd, mean + 4 * sd], abs=1e-2)
    lo, hi = lim["clamp_hu"]
    outside = out[~mask]
    assert outside.min() >= np.float32(lo) and outside.max() <= np.float32(hi)
    # the clamp bites (soft tissue at +40 HU is far above lung mean + 4 sd)...
    assert (outside == np.float32(hi)).mean() > 0.5
    # ...and the lung itself is only clipped, never clamped
    np.testing.assert_array_equal(out[mask], clipped[mask].astype(np.float32))
    # the input is left untouched
    assert ct.dtype == np.int16


def test_clip_only_without_mask(box_and_mask):
    ct, _ = box_and_mask
    out, lim = suppress_non_lung(ct, None)
    assert lim["clamp_hu"] is None and lim["lung_mean_hu"] is None
    np.testing.assert_array_equal(out, np.minimum(ct, np.percentile(ct, 95)).astype(np.float32))


def test_zscore_mean_0_sd_1_over_the_box(box_and_mask):
    ct, mask = box_and_mask
    out, _ = suppress_non_lung(ct, mask)
    z, mean, sd = zscore(out)
    assert z.dtype == np.float32
    assert abs(float(z.mean(dtype=np.float64))) < 1e-5
    assert float(z.std(dtype=np.float64)) == pytest.approx(1.0, abs=1e-5)
    assert mean == pytest.approx(out.mean(dtype=np.float64)) and sd == pytest.approx(
        out.std(dtype=np.float64)
    )


@pytest.mark.parametrize("shape, size", [((30, 41, 57), (16, 64, 96)), ((7, 9, 11), (7, 3, 20)),
                                         ((1, 5, 5), (2, 5, 5))])
def test_resize_cubic_equals_scipy_zoom_order_3(shape, size):
    a = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    out = resize_cubic(a, size)
    ref = ndi.zoom(a, [s / n for s, n in zip(size, shape)], order=3, mode="mirror")
    assert out.shape == tuple(size) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_antialiased_resize_averages_thin_slices():
    """Shrinking 97 noisy slices to 17: without anti-aliasing the ROI keeps every 6th slice's
    full noise; with it the slices are averaged (sigma (6 - 1) / 2 = 2.5 slices), as a thick
    slice would be. Constants stay constant; axes that grow are untouched."""
    assert antialias_sigma(97, 17) == pytest.approx(2.5)
    assert antialias_sigma(17, 97) == 0.0 and antialias_sigma(10, 10) == 0.0
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(97, 24, 24)).astype(np.float32)
    plain = resize_cubic(noise, (17, 24, 24))
    smooth = resize_cubic(noise, (17, 24, 24), antialias=True)
    assert (
        plain.std() > 0.9 and smooth.std() < 0.4
    )  # Gaussian average: (2 sqrt(pi) 2.5)^-1/2 = 0.34
    flat = np.full((97, 8, 8), 3.0, np.float32)
    np.testing.assert_allclose(resize_cubic(flat, (17, 12, 12), antialias=True), 3.0, atol=1e-5)
    up = rng.normal(size=(4, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(resize_cubic(up, (8, 16, 16), antialias=True),
                                  resize_cubic(up, (8, 16, 16)))


def test_check_lung_mask_reasons():
    assert check_lung_mask(4500, 20000) is None
    assert "empty" in check_lung_mask(0, 20000)
    assert "too small" in check_lung_mask(150, 20000)
    assert "too large" in check_lung_mask(13000, 40000)
    assert "fills the body" in check_lung_mask(7000, 10000)


# --------------------------------------------------------------------------- the stage

def _stores(tmp_path, ct, mask, spacing=(2.0, 0.8, 0.8), patient="PX", site="siteA"):
    ct_path, lung_path = tmp_path / "ct.zarr", tmp_path / "lung.zarr"
    origin = (-150.0, -120.0, -400.0)
    zarrio.write_image(ct_path, ct.astype(np.int16), spacing=spacing, origin=origin,
                       attrs={"patient": patient, "site": site})
    zarrio.write_image(lung_path, mask.astype(np.uint8), spacing=spacing, origin=origin,
                       attrs={"method": "test"})
    return ct_path, lung_path


def _synthetic_chest(shape=(40, 160, 200)):
    """Body (40 HU) with two box-shaped lungs (-850 HU) and a small bright rib line."""
    rng = np.random.default_rng(2)
    ct = np.full(shape, -1000, np.int16)
    ct[:, 10:150, 10:190] = 40 + rng.normal(0, 10, (shape[0], 140, 180)).astype(np.int16)
    mask = np.zeros(shape, bool)
    mask[5:35, 30:130, 25:95] = True
    mask[5:35, 30:130, 105:175] = True
    ct[mask] = (-850 + rng.normal(0, 40, mask.sum())).astype(np.int16)
    ct[:, 140:145, 20:180] = 900
    return ct, mask


def test_stage_matches_the_pure_pipeline(tmp_path):
    ct, mask = _synthetic_chest()
    ct_path, lung_path = _stores(tmp_path, ct, mask)
    out = tmp_path / "roi.zarr"
    attrs = make_roi(ct_path, lung_path, out, RoiParams(size=(8, 32, 48)))
    roi = zarrio.open_image(out)
    assert roi.array.shape == (8, 32, 48) and roi.array.dtype == np.float16
    assert attrs["bbox"] == [5, 35, 30, 130, 25, 175]
    z0, z1, y0, y1, x0, x1 = attrs["bbox"]
    box = ct[z0:z1, y0:y1, x0:x1]
    expected_box, lim = suppress_non_lung(box, mask[z0:z1, y0:y1, x0:x1])
    z, mean, sd = zscore(expected_box)
    expected = resize_cubic(z, (8, 32, 48), antialias=True)     # the default
    assert roi.attrs["antialias"] is True
    np.testing.assert_allclose(roi.read().astype(np.float32), expected, atol=2e-3, rtol=2e-3)
    assert roi.attrs["clip_hu"] == np.percentile(box, 95)
    assert roi.attrs["clamp_hu"] == pytest.approx(lim["clamp_hu"])
    assert roi.attrs["zscore_mean"] == pytest.approx(mean, rel=1e-5)
    assert roi.attrs["zscore_sd"] == pytest.approx(sd, rel=1e-5)
    assert roi.attrs["fallback"] is False and roi.attrs["reason"] is None
    assert roi.attrs["patient"] == "PX" and roi.attrs["site"] == "siteA"
    # ROI voxel spacing: the box's extent over the new size (corner-aligned resize)
    assert roi.attrs["roi_spacing_mm"] == pytest.approx(
        [2.0 * 29 / 7, 0.8 * 99 / 31, 0.8 * 149 / 47]
    )
    # its origin is the physical position of the box corner
    assert roi.origin == pytest.approx((-150.0 + 25 * 0.8, -120.0 + 30 * 0.8, -400.0 + 5 * 2.0))
    # the lung on the ROI grid is stored as the OME-Zarr label "lung": the two box lungs, with
    # the 10-voxel gap between them (x 95-105 of the 150-voxel box) as non-lung columns
    lung = zarrio.read_label(out, "lung")
    assert lung.shape == (8, 32, 48) and lung.dtype == np.uint8 and set(np.unique(lung)) == {0, 1}
    # (nearest: ROI column j samples box column floor((j + 0.5) * 150 / 48); 22 -> 70, 25 -> 79)
    columns = np.flatnonzero(lung[4, 16] == 0)
    assert columns.tolist() == [22, 23, 24, 25]
    assert lung[:, :, :22].all() and lung[:, :, 26:].all()


def test_failed_segmentation_is_an_error_unless_fallback(tmp_path):
    ct, _ = _synthetic_chest()
    empty = np.zeros(ct.shape, bool)
    ct_path, lung_path = _stores(tmp_path, ct, empty, patient="P7")
    out = tmp_path / "roi.zarr"
    with pytest.raises(CovidctError) as err:
        make_roi(ct_path, lung_path, out, RoiParams(size=(8, 32, 48)))
    assert err.value.patient == "P7" and "lung.zarr" in str(err.value.path)
    assert "empty lung mask" in str(err.value)
    assert not out.exists()
    attrs = make_roi(ct_path, lung_path, out, RoiParams(size=(8, 32, 48), allow_fallback=True))
    assert attrs["fallback"] is True and attrs["reason"] == "empty lung mask"
    assert attrs["bbox"] == [0, 40, 10, 150, 10, 190]          # the body's box
    assert attrs["clamp_hu"] is None
    assert zarrio.read_label(out, "lung") is None             # no lung to store
    roi = zarrio.open_image(out).read().astype(np.float32)
    assert roi.shape == (8, 32, 48) and abs(roi.mean()) < 0.2     # z-scored (HU would be ~100s)


def test_mask_that_fills_the_body_is_rejected(tmp_path):
    ct, _ = _synthetic_chest()
    everything = np.zeros(ct.shape, bool)
    everything[:, 10:150, 10:190] = True        # the whole body, lungs and all
    ct_path, lung_path = _stores(tmp_path, ct, everything, patient="P8")
    with pytest.raises(CovidctError, match="fills the body"):
        make_roi(ct_path, lung_path, tmp_path / "roi.zarr", RoiParams(size=(8, 32, 48)))


def test_small_box_is_rejected_via_cli_and_falls_back(tmp_path, capsys):
    ct, mask = _synthetic_chest()
    thin = np.zeros_like(mask)
    thin[5:7, 30:130, 25:175] = True            # two 20-mm slices: 384 ml, but a 2-slice box
    ct_path, lung_path = _stores(tmp_path, ct, thin, spacing=(20.0, 0.8, 0.8), patient="P9")
    out = tmp_path / "roi.zarr"
    assert main(["roi", str(ct_path), str(lung_path), str(out), "--size", "4", "16", "16"]) == 2
    msg = capsys.readouterr().err
    assert "patient P9" in msg and "lung.zarr" in msg and "2 slices" in msg
    assert main(["roi", str(ct_path), str(lung_path), str(out), "--size", "4", "16", "16",
                 "--allow-fallback"]) == 0
    attrs = zarrio.open_image(out).attrs
    assert attrs["fallback"] is True and "2 slices" in attrs["reason"]


# --------------------------------------------------------------------------- real CT, the CLI


@pytest.fixture(scope="module")
def copd_stores(tmp_path_factory, real_data):
    tmp = tmp_path_factory.mktemp("copd")
    img = sitk.DICOMOrient(sitk.ReadImage(str(real_data / "cip_copdgene" / "ct-64.nrrd")), "LPS")
    ct_path = tmp / "ct.zarr"
    zarrio.write_image(ct_path, sitk.GetArrayFromImage(img).astype(np.int16),
                       spacing=img.GetSpacing()[::-1], origin=img.GetOrigin(),
                       direction=img.GetDirection(), attrs={"patient": "COPD1", "site": "cip"})
    lung_path = tmp / "lung.zarr"
    assert main(["segment", str(ct_path), str(lung_path)]) == 0
    return tmp, ct_path, lung_path


def test_cli_roi_and_qc_summary_on_copdgene(copd_stores, capsys):
    tmp, ct_path, lung_path = copd_stores
    out, qc = tmp / "roi.zarr", tmp / "qc.png"
    # the ct-64 voxels are 4.2 mm: the lung box is under 60 px in-plane -> rejected by default
    assert main(["roi", str(ct_path), str(lung_path), str(out), "--size", "16", "64", "96"]) == 2
    assert "patient COPD1" in capsys.readouterr().err
    assert not out.exists()
    assert main(["roi", str(ct_path), str(lung_path), str(out), "--size", "16", "64", "96",
                 "--min-pixels", "30", "--qc", str(qc)]) == 0
    roi = zarrio.open_image(out)
    a = roi.read().astype(np.float32)
    assert a.shape == (16, 64, 96) and roi.array.dtype == np.float16
    assert abs(a.mean()) < 0.1 and 0.85 < a.std() < 1.15
    attrs = roi.attrs
    lung = zarrio.read_array(lung_path)
    ct = zarrio.read_array(ct_path)
    z0, z1, y0, y1, x0, x1 = attrs["bbox"]
    assert attrs["clip_hu"] == np.percentile(ct[z0:z1, y0:y1, x0:x1], 95)
    lo, hi = attrs["clamp_hu"]
    assert -1700 < lo < attrs["lung_mean_hu"] < hi < 0
    assert hi - attrs["lung_mean_hu"] == pytest.approx(4 * attrs["lung_std_hu"])
    assert attrs["lung_volume_ml"] == pytest.approx(
        lung.sum() * np.prod(roi.attrs["ct_spacing_mm"]) / 1000, rel=1e-3
    )
    assert 4000 < attrs["lung_volume_ml"] < 5200
    assert attrs["patient"] == "COPD1" and attrs["site"] == "cip" and attrs["fallback"] is False
    assert attrs["size"] == [16, 64, 96]
    data = qc.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 20_000 < len(data) < 300_000
    # qc-summary over this store
    tsv = tmp / "qc_summary.tsv"
    assert main(["qc-summary", str(out), "--out", str(tsv)]) == 0
    rows = list(csv.DictReader(tsv.open(), delimiter="\t"))
    assert len(rows) == 1
    r = rows[0]
    assert r["patient"] == "COPD1" and r["site"] == "cip" and r["fallback"] == "0"
    assert [int(r[k]) for k in ("z0", "z1", "y0", "y1", "x0", "x1")] == attrs["bbox"]
    assert float(r["clip_hu"]) == pytest.approx(attrs["clip_hu"], abs=0.01)
    assert float(r["clamp_low_hu"]) == pytest.approx(lo, abs=0.01)
