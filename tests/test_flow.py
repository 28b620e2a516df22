"""The patient flow and Table 1 (`covidct flow`) on a small results tree of real Zarr stores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from covidct.cli import main
from covidct.io.results import write_run
from covidct.io.stores import write_image

ROWS = [  # patient, site, label, age, sex, comorbidity, stay_days, discharged
    ("a1", "hospA", "covid", 30, "M", 1, 10, 1),
    ("a2", "hospA", "covid", 40, "F", 0, 20, 0),
    ("a3", "hospA", "bacterial", 50, "M", 0, "", ""),
    ("a4", "hospA", "covid", 60, "F", 1, "", ""),
    ("b1", "hospB", "covid", 70, "M", 0, 14, 1),
    ("b2", "hospB", "normal", "", "F", 0, "", ""),
]


def _tree(tmp_path):
    """Sheets, stores and logs: a4 failed at its ROI, b1's ROI is on the fallback."""
    table = pd.DataFrame(ROWS, columns=["patient", "site", "label", "age", "sex", "comorbidity",
                                        "stay_days", "discharged"])
    table.insert(2, "image", str(tmp_path / "scan.nii.gz"))
    table.insert(3, "task", "covid")
    sheets = []
    for site, rows in table.groupby("site"):
        sheets.append(tmp_path / f"{site}.tsv")
        rows.to_csv(sheets[-1], sep="\t", index=False)
    voxels = np.zeros((2, 4, 4), np.int16)
    for patient, site, *_ in ROWS:
        folder = tmp_path / "patients" / site / patient
        write_image(folder / "ct.zarr", voxels, spacing=(1, 1, 1))
        write_image(folder / "lung.zarr", voxels.astype(np.uint8), spacing=(1, 1, 1))
        if patient != "a4":
            write_image(folder / "roi.zarr", voxels.astype(np.float16), spacing=(1, 1, 1),
                        attrs={"fallback": patient == "b1"})
    log = tmp_path / "logs" / "roi" / "hospA" / "a4.log"
    log.parent.mkdir(parents=True)
    log.write_text("INFO cropping\nERROR covidct.preprocess.roi: patient a4: lung mask has "
                   "no voxels (file results/patients/hospA/a4/lung.zarr)\n")
    model = tmp_path / "models" / "finetune_covid"
    model.mkdir(parents=True)
    write_run(model, {"task": "covid", "training_data": {"sites": ["hospA"]}})
    pd.DataFrame({"patient": ["a2"], "y": [1], "probability": [0.7]}).to_csv(
        model / "val_predictions.csv", index=False)
    return sheets, model


def test_flow_counts_each_step_failures_and_training_use(tmp_path):
    sheets, model = _tree(tmp_path)
    out = tmp_path / "tables"
    assert main(["flow", "--sheets", *map(str, sheets), "--patients", str(tmp_path / "patients"),
                 "--logs", str(tmp_path / "logs"), "--models", str(model),
                 "--out-dir", str(out), "--tracking-uri", "none"]) == 0
    flow = pd.read_csv(out / "flow.tsv", sep="\t").set_index("site")
    assert flow.loc["hospA"].to_dict() == {
        "in sheet": 4, "ingested": 4, "segmented": 4, "with ROI": 3, "on fallback": 0,
        "failed": 1, "used for training": 3, "internal validation": 1, "with follow-up": 2}
    assert flow.loc["hospB"].to_dict() == {
        "in sheet": 2, "ingested": 2, "segmented": 2, "with ROI": 2, "on fallback": 1,
        "failed": 0, "used for training": 0, "internal validation": 0, "with follow-up": 1}
    assert flow.loc["all", "in sheet"] == 6 and flow.loc["all", "failed"] == 1
    failures = pd.read_csv(out / "flow_failures.tsv", sep="\t")
    assert failures[["patient", "failed_step"]].values.tolist() == [["a4", "roi"]]
    assert "lung mask has no voxels" in failures["reason"].iloc[0]
    assert "| hospA | 4 | 4 | 4 | 3 |" in (out / "flow.md").read_text()
    # the prognosis' follow-up rule: a1's 10-day stay is under 12 days, b1's 14 is not
    assert main(["flow", "--sheets", *map(str, sheets), "--patients", str(tmp_path / "patients"),
                 "--logs", str(tmp_path / "logs"), "--out-dir", str(out),
                 "--min-follow-up-days", "12", "--tracking-uri", "none"]) == 0
    flow = pd.read_csv(out / "flow.tsv", sep="\t").set_index("site")
    assert flow["with follow-up"].to_dict() == {"hospA": 1, "hospB": 1, "all": 2}
    assert "follow-up of at least 12 days" in (out / "flow.md").read_text()


def test_table1_summarises_each_site(tmp_path):
    sheets, model = _tree(tmp_path)
    out = tmp_path / "tables"
    assert main(["flow", "--sheets", *map(str, sheets), "--patients", str(tmp_path / "patients"),
                 "--logs", str(tmp_path / "logs"), "--out-dir", str(out),
                 "--tracking-uri", "none"]) == 0
    t1 = pd.read_csv(out / "table1.csv", index_col=0, keep_default_na=False)
    a = t1["hospA"]
    ages = np.array([30, 40, 50, 60])
    assert a["Age, years: mean (SD)"] == f"{ages.mean():.1f} ({ages.std(ddof=1):.1f})" \
        == "45.0 (12.9)"
    assert a["Male sex: n (%)"] == "2 (50.0%)" and a["Comorbidity: n (%)"] == "2 (50.0%)"
    assert a["Label covid: n (%)"] == "3 (75.0%)" and a["Label normal: n (%)"] == "0 (0.0%)"
    # stay of the two COVID-19 patients with follow-up (10 and 20 days): median 15, IQR 12.5-17.5
    assert a["Hospital stay, days: median (IQR)"] == "15.0 (12.5-17.5)"
    assert a["Discharged: n (%)"] == "1 (50.0%)"
    b = t1["hospB"]
    assert b["Age, years: mean (SD)"] == "70.0 (n/a)" and b["Age missing (n)"] == "1"
    assert t1["all"]["Patients (n)"] == "6"
    assert pytest.approx(float(t1["all"]["Age, years: mean (SD)"].split()[0])) == 50.0
