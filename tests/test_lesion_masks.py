"""Lung masks that keep the disease (issue 15): dense lesions against the chest wall, the spine,
the diaphragm and the mediastinum on synthetic patients with exact lesion masks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from covidct.errors import CovidctError
from covidct.params import ThresholdParams
from covidct.preprocess.lung_cavity import (
    CavityRules,
    dome_offset,
    lateral_of_air,
    spine_front,
)
from covidct.preprocess.lung_threshold import threshold_lung_mask, upsample_refine
from covidct.preprocess.morphology import dice
from covidct.preprocess.qc import risk_of_loss
from covidct.synth.lesions import CASES
from covidct.synth.patient import LESION_MASK, LUNG_MASK, make_patient, write_patient

SMALL = {"label": "covid", "severity": 0.7, "matrix": 96, "pixel_mm": 3.6, "slice_mm": 3.0}
PATIENTS = {
    "lobar_wall": dict(SMALL, case="lobar_wall", seed=201),
    "paravertebral_mass": dict(SMALL, case="paravertebral_mass", seed=202),
    "basal_subpleural": dict(SMALL, case="basal_subpleural", seed=203),
    "bacterial": {"label": "bacterial", "severity": 0.9, "seed": 12, "sex": "M"},
    "covid_severe": {"label": "covid", "severity": 0.95, "seed": 103, "sex": "F"},
}
# the issue's targets, and what the threshold method reaches today (with the lesion fill; the
# plain threshold is far lower, see test_fill_keeps_more_of_the_lesions)
TARGET_INCLUSION, TARGET_DICE = 0.97, 0.97
REACHED = {  # name: (lesion voxels inside the mask, Dice vs the exact lung mask), floors
    "lobar_wall": (0.20, 0.90),
    "paravertebral_mass": (0.97, 0.99),
    "basal_subpleural": (0.40, 0.95),
    "bacterial": (0.75, 0.97),
    "covid_severe": (0.60, 0.91),
}
MET = {"paravertebral_mass"}      # the cases whose issue targets the threshold method reaches


@pytest.fixture(scope="module")
def segmented():
    out = {}
    for name, row in PATIENTS.items():
        volume, lung, spacing, _, truth = make_patient(row, truth=True)
        lesion = truth["lesion_mask"] > 0
        masks = {on: threshold_lung_mask(volume, spacing,
                                         replace(ThresholdParams(), lesion_fill=on))[0] > 0
                 for on in (False, True)}
        out[name] = dict(volume=volume, lung=lung > 0, lesion=lesion, spacing=spacing,
                         masks=masks)
    return out


def _scores(case, fill=True):
    mask = case["masks"][fill]
    return float(mask[case["lesion"]].mean()), dice(mask, case["lung"])


def test_cases_are_known():
    assert set(CASES) == {"lobar_wall", "paravertebral_mass", "basal_subpleural"}
    with pytest.raises(CovidctError, match="no lesion case"):
        make_patient(dict(SMALL, case="nope"))


def test_case_writes_exact_lesion_mask_beside_lung_mask(tmp_path):
    image = tmp_path / "p" / "ct.nii.gz"
    out = write_patient(dict(PATIENTS["paravertebral_mass"], patient="p1"), image=image)
    assert sorted(p.name for p in image.parent.iterdir()) == sorted(
        ["ct.nii.gz", LUNG_MASK, LESION_MASK])
    lung = sitk.ReadImage(out["mask"])
    lesion = sitk.ReadImage(out["lesion_mask"])
    assert lesion.GetSpacing() == lung.GetSpacing() and lesion.GetOrigin() == lung.GetOrigin()
    lung_a, lesion_a = sitk.GetArrayFromImage(lung), sitk.GetArrayFromImage(lesion)
    assert lesion_a.dtype == np.uint8 and lesion_a.any()
    assert not (lesion_a & ~lung_a.astype(bool)).any()      # the lung mask includes the lesion


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lobar_wall", "paravertebral_mass", "basal_subpleural"])
def test_cases_hold_dense_lesions_on_the_walls(segmented, name):
    """Each case's lesion is dense and touches the lung's walls (what a threshold loses)."""
    case = segmented[name]
    hu = case["volume"][case["lesion"]]
    assert case["lesion"].sum() * np.prod(case["spacing"]) / 1000 >= 20      # ml
    assert np.median(hu) > -300 and np.percentile(hu, 75) > -100     # dense, not air
    plain_inclusion, _ = _scores(case, fill=False)
    assert plain_inclusion < 0.5


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PATIENTS))
def test_fill_keeps_more_of_the_lesions(segmented, name):
    """The lesion fill keeps at least the lesion share and the Dice the method reaches today
    (and never less than the plain threshold's)."""
    case = segmented[name]
    plain_inclusion, plain_dice = _scores(case, fill=False)
    inclusion, d = _scores(case)
    floor_inclusion, floor_dice = REACHED[name]
    assert inclusion >= floor_inclusion and d >= floor_dice, (inclusion, d)
    assert inclusion >= plain_inclusion and d >= plain_dice - 0.005


def _targets(case, name):
    inclusion, d = _scores(case)
    assert inclusion >= TARGET_INCLUSION
    if name in ("bacterial", "covid_severe"):
        assert d >= TARGET_DICE


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MET))
def test_issue_targets_met(segmented, name):
    _targets(segmented[name], name)


@pytest.mark.slow
@pytest.mark.xfail(reason="issue 15 target not yet reached by the classical fill (see REACHED)",
                   strict=True)
@pytest.mark.parametrize("name", sorted(set(PATIENTS) - MET))
def test_issue_targets(segmented, name):
    _targets(segmented[name], name)


@pytest.mark.slow
def test_risk_of_loss_finds_the_lost_lesion(segmented):
    """Dense tissue outside the plain threshold mask: the lesion's slices."""
    case = segmented["lobar_wall"]
    plain = case["masks"][False]
    risk = risk_of_loss(case["volume"], plain, case["spacing"])
    lesion_ml = case["lesion"].sum() * np.prod(case["spacing"]) / 1000
    assert risk["dense_outside_ml"] >= 0.1 * lesion_ml     # the part enclosed by lung in z
    assert case["lesion"][risk["risk_slice"]].any()
    exact = risk_of_loss(case["volume"], case["lung"], case["spacing"])
    # hilum, vessels and heart enclosed by lung in z count too: a baseline the lost lesion tops
    assert exact["dense_outside_ml"] + 5 < risk["dense_outside_ml"]


# --------------------------------------------------------------------------- the fill's parts

def _bases(shape, floor_right, floor_left):
    """Two mirror-image lung slabs (right at low x) whose lowest air per column is given."""
    right, left = np.zeros(shape, bool), np.zeros(shape, bool)
    nx = shape[2]
    for (y, x), z in np.ndenumerate(floor_right):
        right[z:, y, x] = True
    for (y, x), z in np.ndenumerate(floor_left):
        left[z:, y, nx - 1 - x] = True
    return right, left, (nx - 1) / 2


def test_dome_offset_follows_the_aerated_bases_not_a_consolidated_one():
    rng = np.random.default_rng(0)
    shape, offset = (80, 20, 40), 6
    left_floor = rng.integers(8, 12, (20, 10))
    right_floor = left_floor + offset
    # the left base consolidated in 70% of the columns: its lowest air lifted by 10-30 slices
    lifted = left_floor + np.where(rng.random((20, 10)) < 0.7, rng.integers(10, 31, (20, 10)), 0)
    right, left, mid = _bases(shape, right_floor, lifted)
    diff = right_floor - lifted
    assert np.median(diff) < 0                          # the median is dragged the wrong way
    assert dome_offset(right, left, mid, CavityRules()) == offset
    # no difference stands out (asymmetric domes): the median
    spread = left_floor + rng.integers(-6, 7, (20, 10))
    right, left, mid = _bases(shape, spread, left_floor)
    assert dome_offset(right, left, mid, CavityRules()) == int(np.median(spread - left_floor))


def test_medial_limit_reaches_the_air_of_nearby_slices():
    lung = np.zeros((9, 1, 20), bool)
    lung[:, 0, 4:15] = True          # the right lung's air reaches x = 14 ...
    lung[4, 0, 10:15] = False        # ... except where a mass beside the spine pushes it back
    same_row = lateral_of_air(lung, is_right=True)
    assert not same_row[4, 0, 12] and same_row[4, 0, 9]
    nearby = lateral_of_air(lung, is_right=True, n=1)
    assert nearby[4, 0, :15].all() and not nearby[4, 0, 15:].any()
    assert not lateral_of_air(lung, is_right=True, n=3)[:, 0, 15:].any()


def test_spine_front_is_the_vertebral_bodies_front_not_the_sternum():
    hu = np.full((6, 60, 50), 40.0)                 # a soft-tissue body, y = 0 at the front
    body = np.ones(hu.shape, bool)
    hu[:, 2:5, 20:30] = 700                          # the sternum, in front
    hu[:, 38:50, 20:30] = 700                        # the vertebral body, behind the centre
    hu[:, 40:44, 2:6] = 700                          # a rib, far from the midline
    assert spine_front(hu, body, 24.5, (2.5, 2.0, 2.0), CavityRules()) == 38
    assert spine_front(np.full_like(hu, 40.0), body, 24.5, (2.5, 2.0, 2.0),
                       CavityRules()) == 29.5         # no bone: the back half's start


def test_fill_stays_lung_when_brought_to_the_ct_grid():
    """A dense lesion the working grid fills is not decided by HU again at full resolution
    (there it is not air, and its border with the lung would be lost)."""
    ct = np.full((4, 8, 8), 40, np.int16)          # soft tissue everywhere ...
    ct[:, :, :4] = -850                             # ... the lung's air at x < 4
    lung = np.zeros((2, 4, 4), bool)
    lung[:, :, :3] = True                           # on the working grid: air, then the fill
    fill = np.zeros_like(lung)
    fill[:, :, 2] = True
    plain = upsample_refine(ct, lung, 2, 2, -400.0)
    kept = upsample_refine(ct, lung, 2, 2, -400.0, solid=fill)
    assert not plain[:, :, 4:].any()                # the dense border is lost without it
    assert kept[:, :, :6].all() and not kept[:, :, 6:].any()


@pytest.mark.slow
def test_fill_survives_a_finer_ct_grid(segmented):
    """The paravertebral case with its pixels split in three (working grid 2x2 in-plane):
    the fill keeps about the lesion share it keeps at the working grid's own resolution."""
    case = segmented["paravertebral_mass"]
    fine = np.repeat(np.repeat(case["volume"], 3, axis=1), 3, axis=2)
    spacing = (case["spacing"][0], case["spacing"][1] / 3, case["spacing"][2] / 3)
    mask, info = threshold_lung_mask(fine, spacing, replace(ThresholdParams(), lesion_fill=True))
    assert info["work_grid"]["factors_zyx"] == [1, 2, 2]
    lesion = np.repeat(np.repeat(case["lesion"], 3, axis=1), 3, axis=2)
    inclusion, _ = _scores(case)
    assert mask[lesion].mean() >= inclusion - 0.05, (mask[lesion].mean(), inclusion)


def test_lesion_case_rows_feed_the_fpn_every_case_in_turn(tmp_path):
    """segmentation.train.lesion_cases: the extra FPN training patients, written the way the
    workflow's rule synth_lesion_case writes them (covidct synth --spec)."""
    import json

    from covidct.cli import main
    from covidct.synth.cohort import LESION_CASE_SITE, cohort_table, lesion_case_rows

    config = {"seed": 7, "matrix": 64, "sites": {"a": {"n": 3, "task": "covid"}}}
    rows = lesion_case_rows(6, config, root=str(tmp_path))
    assert [r["case"] for r in rows] == sorted(CASES) * 2
    assert [r["severity"] for r in rows] == [0.5] * 3 + [0.75] * 3
    seeds = {r["seed"] for r in rows}
    assert len(seeds) == 6 and not seeds & set(cohort_table(config)["seed"])
    assert lesion_case_rows(6, config, root=str(tmp_path)) == rows          # deterministic
    row = rows[2]
    folder = tmp_path / LESION_CASE_SITE / row["patient"]
    assert row["image"] == str(folder / "ct.nii.gz") and row["matrix"] == 64
    assert main(["synth", "--spec", json.dumps(row), "--image", row["image"], "--mask",
                 row["mask"], "--lesion-mask", str(folder / LESION_MASK)]) == 0
    lung = sitk.GetArrayFromImage(sitk.ReadImage(row["mask"])) > 0
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / LESION_MASK))) > 0
    assert lesion.sum() > 50 and not (lesion & ~lung).any()
