"""The synthetic cohort: phantom realism, class signals, the cohort table and the written scans.

Volumes are small (64 x 64 pixels of 5.5 mm, 5 mm slices) so the whole file runs in seconds.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage, stats

from covidct import cli
from covidct.errors import CovidctError
from covidct.io.sheet import COLUMNS, check_sheet
from covidct.synth.anatomy import AIR, BONE, FAT, LUNG, PADDING, TABLE
from covidct.synth.cohort import cohort_table
from covidct.synth.patient import identity, make_patient

SMALL = dict(matrix=64, pixel_mm=5.5, slice_mm=5.0, n_slices=60, noise_hu=10.0, kernel_mm=1.0,
             padding_hu=-3024, age=55, sex="M")


@functools.cache
def patient(label: str, seed: int, severity: float = 0.6, **extra):
    task = "egfr" if label.startswith("egfr") else "covid"
    params = dict(SMALL, label=label, task=task, seed=seed, severity=severity, **extra)
    return make_patient(params, truth=True)


def lesion_stats(label: str, seed: int, severity: float = 0.6):
    volume, mask, spacing, _, truth = patient(label, seed, severity)
    lung = mask > 0
    lesion = (truth["lesion"] > 0.5) & lung
    dist = ndimage.distance_transform_edt(np.pad(lung, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    right = lesion & (truth["side"] == 1)
    left = lesion & (truth["side"] == 2)
    n = lesion.sum()
    return dict(
        n=int(n),
        peripheral=float((dist[lesion] <= 15.0).mean()) if n else np.nan,
        laterality=abs(int(left.sum()) - int(right.sum())) / max(int(n), 1),
        lesion_hu=float(np.median(volume[lesion])) if n else np.nan,
        lesion_mean_hu=float(volume[lesion].mean()) if n else np.nan,
        lung_hu=float(np.median(volume[lung & ~lesion])),
        lung_mean=float(volume[lung].mean()),
        burden=float(n / lung.sum()),
    )


# ----------------------------------------------------------------------------------------------
# phantom
# ----------------------------------------------------------------------------------------------
def test_same_seed_same_volume_other_seed_differs():
    a = make_patient(dict(SMALL, label="covid", seed=11, severity=0.5))
    b = make_patient(dict(SMALL, label="covid", seed=11, severity=0.5))
    c = make_patient(dict(SMALL, label="covid", seed=12, severity=0.5))
    assert a[0].dtype == np.int16 and a[1].dtype == np.uint8
    assert a[0].shape == a[1].shape == (60, 64, 64)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[2] == b[2] == (5.0, 5.5, 5.5) and a[3] == b[3]
    assert (a[0] != c[0]).mean() > 0.3
    assert (a[1] != c[1]).sum() > 1000          # a different body, not just different noise


def test_lesions_off_keeps_anatomy_and_noise():
    with_l = patient("covid", 21, 0.8)
    without = make_patient(
        dict(SMALL, label="covid", task="covid", seed=21, severity=0.8), lesions=False
    )
    assert np.array_equal(with_l[1], without[1])
    outside = with_l[1] == 0
    # the body outside the lungs is voxel-identical (up to the blur spilling over the pleura)
    far = ~ndimage.binary_dilation(with_l[1] > 0, iterations=2)
    assert np.array_equal(with_l[0][far], without[0][far])
    changed = np.abs(with_l[0].astype(int) - without[0]) > 100
    assert changed[~outside].mean() > 0.05


def test_hu_of_tissues_padding_and_two_lungs():
    volume, mask, spacing, origin, truth = patient("egfr_wildtype", 3, 0.3)
    tissue = truth["tissue"]
    air = volume[tissue == AIR]
    assert -1010 <= np.median(air) <= -990 and abs(air.mean() + 1000) < 15
    lung = volume[(mask > 0) & (truth["lesion"] < 0.1)]
    assert -900 <= np.median(lung) <= -780
    assert np.median(volume[tissue == FAT]) < -50
    bone = volume > 200
    assert bone.sum() > 200
    assert (tissue[bone] == BONE).mean() > 0.6        # dense voxels are bone (some table skin)
    assert np.median(volume[(tissue == BONE)]) > 200
    assert (tissue == TABLE).sum() > 0 and not (tissue[volume > -2000] == PADDING).any()
    # padding outside the circular field: the corners, about 1 - pi/4 of each slice
    assert np.all(volume[:, 0, 0] == -3024) and np.all(volume[:, -1, -1] == -3024)
    pad_frac = (volume[0] == -3024).mean()
    assert abs(pad_frac - (1 - np.pi / 4)) < 0.03
    assert volume[volume > -3024].min() >= -1024
    # the exact mask: two lungs, right one on the image's left (LPS x grows to the patient's left)
    labels, n = ndimage.label(mask)
    assert n == 2
    cx = [np.argwhere(labels == k)[:, 2].mean() for k in (1, 2)]
    assert min(cx) < 31.5 < max(cx)
    assert set(np.unique(truth["side"][labels == np.argmin(cx) + 1])) == {1}
    litres = mask.sum() * np.prod(spacing) / 1e6
    assert 1.5 < litres < 8.0
    # trachea and main bronchi are air but not lung
    assert (volume[(tissue == 7)] < -900).mean() > 0.5
    assert not mask[tissue == 7].any()
    assert (tissue[mask > 0] == LUNG).all()


def test_covid_denser_than_egfr_background():
    covid = lesion_stats("covid", 5, 0.6)
    normal = lesion_stats("egfr_wildtype", 5, 0.6)
    assert covid["lung_mean"] > normal["lung_mean"] + 30
    # ground glass: between parenchyma and soft tissue
    assert -750 < covid["lesion_hu"] < -150
    assert covid["lesion_hu"] > covid["lung_hu"] + 200


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_covid_peripheral_and_bilateral_viral_central(seed):
    covid = lesion_stats("covid", seed, 0.6)
    viral = lesion_stats("viral", seed, 0.6)
    assert covid["n"] > 50 and viral["n"] > 50
    assert covid["peripheral"] > viral["peripheral"] + 0.1
    assert viral["laterality"] < 0.5              # diffuse, both lungs


def test_covid_mostly_bilateral():
    lat = [lesion_stats("covid", s, 0.6)["laterality"] for s in (1, 2, 3)]
    assert np.mean(lat) < 0.6


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bacterial_unilateral_consolidation(seed):
    s = lesion_stats("bacterial", seed, 0.6)
    assert s["n"] > 30
    assert s["laterality"] > 0.9
    assert s["lesion_hu"] > -300                  # consolidation, not ground glass


def test_mycoplasma_and_fungal_have_lesions():
    myco = lesion_stats("mycoplasma", 4, 0.7)
    fungal = lesion_stats("fungal", 4, 0.7)
    assert myco["n"] > 10 and fungal["n"] > 10
    assert (
        myco["burden"] < 0.2 and fungal["burden"] < 0.2
    )  # focal, unlike COVID-19 at this severity
    assert fungal["lesion_mean_hu"] > -500


def test_egfr_mutant_nodules_more_subsolid():
    mutant = [lesion_stats("egfr_mutant", s, 0.5)["lesion_mean_hu"] for s in range(1, 11)]
    wild = [lesion_stats("egfr_wildtype", s, 0.5)["lesion_mean_hu"] for s in range(101, 111)]
    assert np.nanmean(mutant) < np.nanmean(wild)
    subsolid = lambda hus: np.mean(np.array(hus) < -250)
    assert subsolid(mutant) > subsolid(wild)


def test_emphysema_adds_low_attenuation():
    base = dict(SMALL, label="egfr_wildtype", task="egfr", seed=9, severity=0.3)
    plain, mask, *_ = make_patient(base)
    emph, mask2, *_ = make_patient(dict(base, emphysema=1.0))
    assert np.array_equal(mask, mask2)
    lung = mask > 0
    low, low0 = (emph[lung] < -950).mean(), (plain[lung] < -950).mean()
    assert low > low0 + 0.005 and low > 3 * low0


def test_severity_drives_burden():
    sev = [0.1, 0.3, 0.5, 0.7, 0.9]
    res = [lesion_stats("covid", 8, s) for s in sev]
    assert stats.spearmanr(sev, [r["burden"] for r in res]).statistic > 0.3
    assert stats.spearmanr(sev, [r["lung_mean"] for r in res]).statistic > 0.3
    assert res[-1]["burden"] > 2 * res[0]["burden"]


# ----------------------------------------------------------------------------------------------
# cohort table
# ----------------------------------------------------------------------------------------------
CONFIG = {
    "sites": {
        "egfrsite": {"role": "pretrain"},
        "train": {"role": "train"},
        "val": {"role": "diagnosis"},
        "prog": {"role": "prognosis"},
    },
    "synthetic": {
        "seed": 7,
        "matrix": 64,
        "sites": {
            "egfrsite": {"n": 20, "task": "egfr", "format": "nifti", "scanner": {"slice_mm": 5.0}},
            "train": {
                "n": 60,
                "task": "covid",
                "format": "dicom",
                "follow_up": 0.5,
                "mix": {"covid": 0.6, "bacterial": 0.25, "mycoplasma": 0.1, "fungal": 0.05},
                "scanner": {"slice_mm": 5.0, "fov_mm": 352.0, "length_mm": 300.0},
            },
            "val": {
                "n": 30,
                "task": "covid",
                "format": "nifti",
                "age_mean": 58,
                "age_sd": 16,
                "mix": {"covid": 0.6, "bacterial": 0.2, "viral": 0.2},
            },
            "prog": {
                "n": 40,
                "task": "covid",
                "format": "dicom",
                "follow_up": 1.0,
                "mix": {"covid": 1.0},
                "scanner": {"slice_mm": 5.0, "transfer_syntax": "rle", "reverse_z": True},
            },
        },
    },
}


def test_cohort_table_follows_config(repo, tmp_path):
    t = cohort_table(CONFIG, root="out/synth")
    assert list(t.columns[:len(COLUMNS)]) == list(COLUMNS)
    assert t.groupby("site").size().to_dict() == {
        "egfrsite": 20,
        "train": 60,
        "val": 30,
        "prog": 40,
    }
    counts = t[t.site == "train"]["label"].value_counts().to_dict()
    assert counts == {"covid": 36, "bacterial": 15, "mycoplasma": 6, "fungal": 3}
    assert t[t.site == "val"]["label"].value_counts().to_dict() == {
        "covid": 18,
        "bacterial": 6,
        "viral": 6,
    }
    assert set(t[t.site == "egfrsite"]["label"]) == {"egfr_mutant", "egfr_wildtype"}
    assert t["patient"].is_unique and t["patient"].str.fullmatch(r"[a-z]+-\d{3}").all()
    assert t.loc[t.patient == "train-007", "image"].item() == "out/synth/train/train-007/dicom"
    assert t.loc[t.patient == "val-001", "image"].item() == "out/synth/val/val-001/ct.nii.gz"
    assert (
        t["mask"]
        == t["image"].str.replace(r"/(dicom|ct\.nii\.gz)$", "/lung_mask.nii.gz", regex=True)
    ).all()
    # every label fits its task, every site has a role: the sheet checks pass
    checked = check_sheet(t, CONFIG["sites"])
    assert checked["y"].sum() == (t.label.isin(["covid", "egfr_mutant"])).sum()
    # plausible clinical values
    assert t["age"].between(18, 90).all() and t["sex"].isin(["M", "F"]).all()
    assert abs(t.loc[t.site == "val", "age"].mean() - 58) < 8
    assert t["comorbidity"].isin([0, 1]).all() and 0.1 < t["comorbidity"].mean() < 0.6
    # follow-up: half the COVID-19 patients of `train`, all of `prog`, nobody else
    has = t["stay_days"].notna()
    assert (has == t["discharged"].notna()).all()
    assert has[t.site == "train"].sum() == round(0.5 * 36) and has[t.site == "prog"].all()
    assert not has[(t.site == "val") | (t.site == "egfrsite") | (t.label != "covid")].any()
    stay = t.loc[has, "stay_days"].astype(float)
    assert stay.between(5, 40).all() and set(t.loc[has, "discharged"]) == {0, 1}
    # sites look different: slice thickness and field of view from their scanners
    assert t.loc[t.site == "train", "pixel_mm"].iloc[0] == pytest.approx(352 / 64)
    assert t.groupby("site")["n_slices"].median()["train"] == pytest.approx(60, abs=5)
    # the cohort is a valid sample sheet: written and read back through the sheet's own rules
    from covidct.io.sheet import read_sheet

    t[list(COLUMNS)].to_csv(tmp_path / "cohort.tsv", sep="\t", index=False)
    assert len(read_sheet(tmp_path / "cohort.tsv")) == len(t)


def test_severity_relates_to_age_comorbidity_and_stay():
    cfg = {
        "synthetic": {"seed": 3, "sites": {"big": {"n": 300, "task": "covid", "follow_up": 1.0}}}
    }
    t = cohort_table(cfg)
    assert stats.spearmanr(t["age"], t["severity"]).statistic > 0.2
    assert (
        t.loc[t.comorbidity == 1, "severity"].mean() > t.loc[t.comorbidity == 0, "severity"].mean()
    )
    assert stats.spearmanr(t["severity"], t["stay_days"].astype(float)).statistic > 0.3
    assert 0.05 < (t["discharged"] == 0).mean() < 0.4
    assert 40 < t["age"].mean() < 60 and 12 < t["age"].std() < 24


def test_cohort_table_deterministic_and_site_independent():
    a = cohort_table(CONFIG)
    b = cohort_table(CONFIG)
    pd.testing.assert_frame_equal(a, b)
    # the order of a mapping in the config does not matter (YAML writers may sort keys)
    shuffled = json.loads(json.dumps(CONFIG, sort_keys=True))
    c = cohort_table(shuffled).set_index("patient").sort_index()
    pd.testing.assert_frame_equal(c, a.set_index("patient").sort_index())
    fewer = {
        "synthetic": dict(CONFIG["synthetic"], sites={"val": CONFIG["synthetic"]["sites"]["val"]})
    }
    d = cohort_table(fewer)
    pd.testing.assert_frame_equal(
        d.reset_index(drop=True), a[a.site == "val"].reset_index(drop=True)
    )
    other = cohort_table({"synthetic": dict(CONFIG["synthetic"], seed=8)})
    assert not a["seed"].equals(other["seed"])


def test_cohort_table_rejects_bad_config():
    bad = {"synthetic": {"sites": {"x": {"n": 3, "task": "covid", "mix": {"flu": 1.0}}}}}
    with pytest.raises(CovidctError, match="mix"):
        cohort_table(bad)
    with pytest.raises(CovidctError, match="format"):
        cohort_table({"synthetic": {"sites": {"x": {"n": 3, "task": "covid", "format": "png"}}}})
    with pytest.raises(CovidctError, match="scanner key"):
        cohort_table({"synthetic": {"sites": {"x": {"n": 3, "scanner": {"slices": 3}}}}})


# ----------------------------------------------------------------------------------------------
# command line: cohort sheet, DICOM and NIfTI scans
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def written(tmp_path_factory):
    import yaml

    tmp = tmp_path_factory.mktemp("synth")
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    sheet = tmp / "synth" / "cohort.tsv"
    assert cli.main(["cohort", "--config", str(cfg), "--out", str(sheet)]) == 0
    return tmp, sheet


def test_cohort_cli_writes_the_table(written):
    tmp, sheet = written
    got = pd.read_csv(sheet, sep="\t", dtype=str, keep_default_na=False)
    want = cohort_table(CONFIG, root=str(sheet.parent))
    assert list(got.columns) == list(want.columns)
    assert (got["image"] == want["image"]).all() and got["image"].iloc[0].startswith(str(tmp))
    assert (got["stay_days"] == want["stay_days"].astype("string").fillna("")).all()
    assert not [p for p in sheet.parent.iterdir() if p.name.startswith(".")]


def _read_series(folder):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.mark.parametrize("patient", ["train-002", "prog-003"])  # explicit VR; RLE, files head-first
def test_synth_dicom_reads_back_exactly(written, patient):
    import pydicom
    import SimpleITK as sitk

    tmp, sheet = written
    assert cli.main(["synth", "--cohort", str(sheet), "--patient", patient]) == 0
    row = (
        pd.read_csv(sheet, sep="\t", dtype=str, keep_default_na=False)
        .set_index("patient", drop=False)
        .loc[patient]
    )
    folder = tmp / "synth" / row["site"] / patient / "dicom"
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == int(row["n_slices"])
    ds = pydicom.dcmread(files[0])
    planted = identity(row.to_dict())
    assert str(ds.PatientName) == planted["PatientName"] and ds.PatientID == planted["PatientID"]
    assert (
        ds.InstitutionName == planted["InstitutionName"]
        and ds.AccessionNumber == planted["AccessionNumber"]
    )
    assert ds.Modality == "CT" and ds.ConvolutionKernel == row["convolution_kernel"]
    assert ds.Manufacturer == row["manufacturer"]
    # the scan equals the one built from the in-memory cohort row (the TSV round trip is exact)
    frame = cohort_table(CONFIG, root=str(sheet.parent)).set_index("patient", drop=False)
    volume, mask, spacing, origin = make_patient(frame.loc[patient])
    img = _read_series(folder)
    assert np.array_equal(sitk.GetArrayFromImage(img), volume)
    assert np.allclose(img.GetSpacing(), spacing[::-1]) and np.allclose(
        img.GetOrigin(), origin, atol=1e-3
    )
    m = sitk.ReadImage(str(folder.parent / "lung_mask.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(m), mask)
    assert np.allclose(m.GetOrigin(), origin, atol=1e-3)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_synth_nifti_from_spec(written, tmp_path):
    import SimpleITK as sitk

    _, sheet = written
    table = cohort_table(CONFIG, root=str(tmp_path))
    row = table[table.patient == "val-002"].iloc[0]
    spec = json.dumps({k: (None if pd.isna(v) else v) for k, v in row.items()}, default=str)
    image, mask = tmp_path / "x" / "ct.nii.gz", tmp_path / "x" / "lung_mask.nii.gz"
    assert cli.main(["synth", "--spec", spec, "--image", str(image), "--mask", str(mask)]) == 0
    volume, lung, spacing, origin = make_patient(row)
    img = sitk.ReadImage(str(image))
    assert img.GetPixelID() == sitk.sitkInt16
    assert np.array_equal(sitk.GetArrayFromImage(img), volume)
    assert np.allclose(img.GetSpacing(), spacing[::-1]) and np.allclose(
        img.GetOrigin(), origin, atol=1e-3
    )
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(mask))), lung)
    assert sorted(p.name for p in image.parent.iterdir()) == ["ct.nii.gz", "lung_mask.nii.gz"]


def test_synth_unknown_patient_is_a_clear_error(written, capsys):
    _, sheet = written
    assert cli.main(["synth", "--cohort", str(sheet), "--patient", "nobody-001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        "patient nobody-001" in err
        and str(sheet) in err
        and err.startswith("covidct synth: error:")
    )
