"""``covidct predict``: one scan through the system, checked against the workflow's own stages.

A tiny COVID-19Net (input 8x32x48, untrained weights) is saved as a real .keras file; the scans
are the real COVID-CT-MD NIfTI P001 and a synthetic DICOM series with planted identifying
fields. The ROI that predict builds in memory must equal, value for value, the roi.zarr that the
real `covidct ingest`, `segment` and `roi` stages write; the probability and the 64-d feature must
be the saved model's own outputs on that stored ROI; the risk must be the Cox formula written out
here. The command line runs in a fresh process (as a user runs it: the scan is preprocessed in a
forked process while TensorFlow starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from covidct.cli import main
from covidct.io import stores as zarrio

SIZE = (8, 32, 48)
KEYS = {"scan", "probability", "threshold", "prediction", "dl_feature", "risk", "risk_group",
        "risk_direction", "roi", "saliency", "timing_s", "model"}
PLANTED = {"PatientName": "Zzplanted^Secretname", "PatientID": "ID99887766",
           "InstitutionName": "Hospital Of Planted Secrets", "PatientBirthDate": "19230405",
           "AccessionNumber": "ACC55443322", "ReferringPhysicianName": "Drplanted^Hidden"}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A saved tiny COVID-19Net and a cox.json in the format `covidct prognosis` writes."""
    from covidct.analysis.scoring import DIRECTION
    from covidct.model.architecture import covid19net

    tmp = tmp_path_factory.mktemp("models")
    model = covid19net(SIZE)
    path = tmp / "model.keras"
    model.save(path)
    cox = {"direction": DIRECTION, "covariates": ["feature_3", "feature_40", "age", "sex",
                                                  "comorbidity"],
           "coefficients": [0.8, -0.5, -0.03, 0.4, -0.7], "mean": [0.1, -0.2, 55.0, 0.5, 0.3],
           "sd": [0.9, 1.3, 12.0, 0.5, 0.46], "cutoff": 0.05}
    cox_path = tmp / "cox.json"
    cox_path.write_text(json.dumps(cox))
    return path, cox_path, cox


@pytest.fixture(scope="module")
def dicom_scan(tmp_path_factory):
    """A synthetic chest CT as a DICOM series whose header holds planted identifying fields."""
    from covidct.synth.dicom import write_series
    from covidct.synth.patient import PatientSpec, dicom_header, make_patient

    spec = PatientSpec.from_row({"matrix": 96, "pixel_mm": 3.6, "slice_mm": 5.0, "seed": 3,
                                 "label": "covid", "severity": 0.6})
    volume, _, spacing, origin = make_patient(spec)
    header = {**dicom_header(spec), **PLANTED, "PixelPaddingValue": int(spec.padding_hu + 3072)}
    out = tmp_path_factory.mktemp("dicom") / "series"
    write_series(volume, out, spacing=spacing, origin=origin, header=header,
                 rescale_intercept=-3072.0, uid_seed=3)
    return out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "covidct", "predict", *args, "--threads", "1"],
                          capture_output=True, text=True, env=env, timeout=300)


def stage_roi(tmp: Path, scan: Path, *roi_args: str) -> zarrio.Image:
    """The ROI the workflow writes for ``scan``: the real ingest, segment and roi stages."""
    assert main(["ingest", str(scan), str(tmp / "ct.zarr"), "--patient", "T1"]) == 0
    assert main(["segment", str(tmp / "ct.zarr"), str(tmp / "lung.zarr")]) == 0
    assert main(["roi", str(tmp / "ct.zarr"), str(tmp / "lung.zarr"), str(tmp / "roi.zarr"),
                 "--size", *map(str, SIZE), *roi_args]) == 0
    return zarrio.open_image(tmp / "roi.zarr")


def model_outputs(model_path: Path, roi: np.ndarray) -> tuple[float, np.ndarray]:
    """Probability and dl_feature of the saved model on a stored (float16) ROI."""
    import keras

    model = keras.models.load_model(model_path, compile=False)
    both = keras.Model(model.inputs, [model.outputs[0], model.get_layer("dl_feature").output])
    p, f = both.predict(roi.astype(np.float32)[None, ..., None], verbose=0)
    return float(p.ravel()[0]), f.ravel().astype(np.float64)


def cox_by_hand(cox: dict, feature: np.ndarray, age: float, sex: str, comorbidity: int) -> float:
    values = {"age": age, "sex": 1.0 if sex == "M" else 0.0, "comorbidity": comorbidity}
    x = np.array([feature[int(c.split("_")[1])] if c.startswith("feature_") else values[c]
                  for c in cox["covariates"]])
    return float(-np.sum(np.array(cox["coefficients"]) * (x - cox["mean"]) / cox["sd"]))


@pytest.mark.slow
def test_nifti_cli_matches_the_workflow_stages(tmp_path, real_data, model_files):
    from matplotlib.image import imread

    from covidct.analysis.scoring import risk_from_features

    model_path, cox_path, cox = model_files
    scan = real_data / "covid_ct_md" / "P001_ct_bin4x4x1.nii.gz"
    png = tmp_path / "saliency.png"
    proc = run_cli(str(scan), "--model", str(model_path), "--cox", str(cox_path), "--age", "67",
                   "--sex", "F", "--comorbidity", "1", "--saliency", str(png))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)                      # stdout is exactly one JSON object
    assert KEYS <= set(out)
    assert out["scan"] == scan.name and out["model"] == str(model_path)
    assert 0.0 <= out["probability"] <= 1.0 and out["threshold"] == 0.5
    assert out["prediction"] == ("covid" if out["probability"] >= 0.5 else "non-covid")
    assert len(out["dl_feature"]) == 64
    assert out["timing_s"]["total"] > 0 and "wait_preprocess" in out["timing_s"]  # parallel path

    stored = stage_roi(tmp_path, scan)
    assert out["roi"]["bbox"] == stored.attrs["bbox"] and out["roi"]["size"] == list(SIZE)
    assert out["roi"]["fallback"] is False
    assert out["roi"]["clip_hu"] == stored.attrs["clip_hu"]
    assert (
        out["roi"]["antialias"] is True and out["roi"]["min_pixels"] == 60
    )  # no run.json: defaults
    p, f = model_outputs(model_path, stored.read())
    assert out["probability"] == pytest.approx(p, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(out["dl_feature"], f, rtol=1e-4, atol=1e-5)
    assert np.std(out["dl_feature"]) > 1e-3               # not a constant vector

    risk, group = risk_from_features(cox, out["dl_feature"], 67, "F", 1)
    assert out["risk"] == pytest.approx(risk, rel=1e-12) and out["risk_group"] == group
    assert out["risk"] == pytest.approx(cox_by_hand(cox, np.array(out["dl_feature"]), 67, "F", 1))
    assert out["risk_group"] == ("high" if out["risk"] > cox["cutoff"] else "low")
    assert "high risk = longer hospital stay" in out["risk_direction"]

    assert out["saliency"] == str(png)
    image = imread(png)
    # two rows of three slices: the ROI and the scan's voxels
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 1.5 * image.shape[0]
    assert "saliency" in out["timing_s"]
    frac = out["saliency_in_lung"]
    assert 0 < frac["roi"] < 1 and 0 < frac["ct"] <= 1
    assert frac["ct"] > frac["roi"]        # the clamp pins most tissue outside the lung


@pytest.mark.slow
def test_dicom_roi_is_identical_to_the_roi_stage_and_no_identity_leaks(tmp_path, dicom_scan,
                                                                         model_files):
    from covidct.inference.scan import predict_scan
    from covidct.params import RoiParams

    model_path, _, _ = model_files
    # the phantom's 3.6-mm pixels give a lung box about 40 px wide: --min-pixels 30 in both
    stored = stage_roi(tmp_path, dicom_scan, "--min-pixels", "30")
    # in process (sequential), with the arrays: the ROI is the stage's, bit for bit
    res = predict_scan(dicom_scan, model_path, return_arrays=True,
                      roi=RoiParams(min_pixels=30))
    roi = res["_arrays"]["roi"]
    assert roi.dtype == np.float16 and roi.shape == SIZE
    assert np.array_equal(roi, stored.read())
    assert res["roi"]["bbox"] == stored.attrs["bbox"]
    ct = zarrio.read_array(tmp_path / "ct.zarr")
    assert np.array_equal(res["_arrays"]["ct"], ct)
    assert np.array_equal(res["_arrays"]["mask"], zarrio.read_array(tmp_path / "lung.zarr"))
    p, f = model_outputs(model_path, stored.read())
    assert res["probability"] == pytest.approx(p, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(res["dl_feature"], f, rtol=1e-4, atol=1e-5)
    assert res["risk"] is None and res["risk_group"] is None

    # the command line on the DICOM folder: same answer; no planted field anywhere
    png = tmp_path / "sal.png"
    proc = run_cli(str(dicom_scan), "--model", str(model_path), "--saliency", str(png),
                   "--threshold", "0.3", "--min-pixels", "30", "-v")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["scan"] == "series" and out["input"]["format"] == "dicom"
    assert out["input"]["files"] == ct.shape[0]
    assert out["threshold"] == 0.3
    assert out["probability"] == pytest.approx(res["probability"], rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(out["dl_feature"], res["dl_feature"], rtol=1e-4, atol=1e-5)
    assert png.stat().st_size > 1000
    text = (proc.stdout + proc.stderr).lower()
    assert "covidct.inference.scan" in proc.stderr         # the logs did reach stderr
    for field, value in PLANTED.items():
        for part in value.lower().split("^"):            # names: family^given
            assert part not in text, f"{field} leaked"


@pytest.mark.slow
def test_roi_settings_follow_the_models_run_json(tmp_path, real_data, model_files):
    """A model trained on ROIs made without anti-aliasing and with a 30-voxel minimum (as
    run.json records) gets such a ROI from `covidct predict` unless told otherwise."""
    import shutil

    model_path = tmp_path / "m" / "model.keras"
    model_path.parent.mkdir()
    shutil.copy(model_files[0], model_path)
    (model_path.parent / "run.json").write_text(json.dumps(
        {"run_id": "x", "preprocessing": {"roi": {"antialias": False, "min_pixels": 30}}}))
    scan = real_data / "covid_ct_md" / "P001_ct_bin4x4x1.nii.gz"
    proc = run_cli(str(scan), "--model", str(model_path))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["roi"]["antialias"] is False and out["roi"]["min_pixels"] == 30
    assert "from the model's training ROIs" in proc.stderr
    stored = stage_roi(tmp_path, scan, "--no-antialias", "--min-pixels", "30")
    assert out["roi"]["bbox"] == stored.attrs["bbox"]
    p, _ = model_outputs(model_path, stored.read())
    assert out["probability"] == pytest.approx(p, rel=1e-5, abs=1e-6)
    # given on the command line it wins, with a warning
    proc = run_cli(str(scan), "--model", str(model_path), "--antialias")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["roi"]["antialias"] is True
    assert "were made with False" in proc.stderr


def test_missing_scan_exits_2_with_nothing_on_stdout(tmp_path, model_files, capsys):
    model_path, _, _ = model_files
    missing = tmp_path / "nope" / "scan.nii.gz"
    assert main(["predict", str(missing), "--model", str(model_path)]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = cap.err.strip().splitlines()
    assert lines[-1].startswith("covidct predict: error:") and str(missing) in lines[-1]
    # a model that is not there either: named
    assert main(["predict", str(model_path), "--model", str(tmp_path / "m.keras")]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and "m.keras" in cap.err and "model file not found" in cap.err


def test_cox_without_clinical_values_fails_clearly(tmp_path, real_data, model_files, capsys):
    model_path, cox_path, _ = model_files
    scan = real_data / "covid_ct_md" / "P001_ct_bin4x4x1.nii.gz"
    assert main(["predict", str(scan), "--model", str(model_path), "--cox", str(cox_path),
                 "--sex", "M", "--comorbidity", "0"]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert (
        "--age" in cap.err and "cox.json" in cap.err and "--sex" not in cap.err.split("error:")[1]
    )
    bad = tmp_path / "cox.json"
    bad.write_text(json.dumps({"covariates": ["age"]}))
    assert main(["predict", str(scan), "--model", str(model_path), "--cox", str(bad), "--age",
                 "50", "--sex", "M", "--comorbidity", "0"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and "missing coefficients" in cap.err


def test_input_size_read_without_tensorflow_equals_the_model(model_files, tmp_path):
    from covidct.model.saved import keras_input_shape

    model_path, _, _ = model_files
    assert keras_input_shape(model_path) == SIZE
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a zip")
    assert keras_input_shape(junk) is None
