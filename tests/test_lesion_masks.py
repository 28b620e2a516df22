"""Lung masks that keep the disease (issue 15): dense lesions against the chest wall, the spine,
the diaphragm and the mediastinum on synthetic patients with exact lesion masks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from covidct.errors import CovidctError
from covidct.params import ThresholdParams
from covidct.preprocess.lung_threshold import threshold_lung_mask
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
    "paravertebral_mass": (0.25, 0.99),
    "basal_subpleural": (0.40, 0.95),
    "bacterial": (0.10, 0.90),
    "covid_severe": (0.55, 0.91),
}


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


@pytest.mark.slow
@pytest.mark.xfail(reason="issue 15 target not yet reached by the classical fill (see REACHED)",
                   strict=True)
@pytest.mark.parametrize("name", sorted(PATIENTS))
def test_issue_targets(segmented, name):
    inclusion, d = _scores(segmented[name])
    assert inclusion >= TARGET_INCLUSION
    if name in ("bacterial", "covid_severe"):
        assert d >= TARGET_DICE


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
