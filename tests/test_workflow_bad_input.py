"""Bad rows in a user's sheet: one clear error per patient, the other patients finish."""

from __future__ import annotations

import subprocess

import pandas as pd
import pytest
import yaml
from test_workflow import SNAKEMAKE, _snakemake, _workdir

pytestmark = pytest.mark.slow


def _config(workdir, sheet):
    cfg = {"samples": str(sheet), "sites": {"realsite": {"role": "diagnosis"}},
           # the real test scans are 128x128 at ~3 mm: the paper's 60 px box minimum is for 512x512
           "roi": {"size": [8, 32, 48], "min_pixels": 20}, "segmentation": {"method": "threshold"}}
    path = workdir / "real.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _row(patient, image, label="covid"):
    return {"patient": patient, "site": "realsite", "image": str(image), "task": "covid",
            "label": label, "age": 50, "sex": "M", "comorbidity": 0, "stay_days": "",
            "discharged": ""}


def test_bad_scans_fail_alone_and_name_patient_and_file(repo, real_data, tmp_path):
    workdir = _workdir(repo, tmp_path / "run")
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(
        (real_data / "covid_ct_md" / "P002_ct_bin4x4x1.nii.gz").read_bytes()[:5000]
    )
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    missing = tmp_path / "nowhere" / "ct.nii.gz"
    rows = [_row("good1", real_data / "covid_ct_md" / "P001_ct_bin4x4x1.nii.gz"),
            _row("good2", real_data / "covid_ct_md" / "cap001_ct_bin4x4x1.nii.gz", "bacterial"),
            _row("trunc1", truncated), _row("empty1", empty), _row("missing1", missing)]
    sheet = tmp_path / "samples.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    config = _config(workdir, sheet)
    targets = [f"results/patients/realsite/{r['patient']}/roi.zarr" for r in rows]
    proc = _snakemake(workdir, *targets, "--cores", "2", "--keep-going", "--configfile",
                      str(config), check=False)
    assert proc.returncode != 0
    results = workdir / "results" / "patients" / "realsite"
    assert (results / "good1" / "roi.zarr" / "zarr.json").exists()
    assert (results / "good2" / "roi.zarr" / "zarr.json").exists()
    for bad, path in (("trunc1", truncated), ("empty1", empty), ("missing1", missing)):
        assert not (results / bad / "ct.zarr").exists()
        log = (workdir / "logs" / "ingest" / "realsite" / f"{bad}.log").read_text()
        error = [line for line in log.splitlines() if "error" in line.lower()]
        assert error, log
        assert f"patient {bad}" in error[-1] and path.name in error[-1], error[-1]
    # nothing half-written is left beside the stores
    assert not list(results.rglob(".*.tmp-*"))
    # the failed run's patient flow names each failed patient, its step and the reason
    failures = pd.read_csv(workdir / "logs" / "flow" / "flow_failures.tsv", sep="\t")
    assert sorted(failures["patient"]) == ["empty1", "missing1", "trunc1"]
    assert set(failures["failed_step"]) == {"ingest"} and failures["reason"].notna().all()
    assert "flow_failures.tsv" in proc.stdout + proc.stderr


def test_unknown_label_or_site_stops_before_any_job(repo, real_data, tmp_path):
    workdir = _workdir(repo, tmp_path / "run")
    image = real_data / "covid_ct_md" / "P001_ct_bin4x4x1.nii.gz"
    rows = [_row("p1", image), _row("p2", image, label="influenza"),
            dict(_row("p3", image), site="atlantis")]
    sheet = tmp_path / "samples.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    config = _config(workdir, sheet)
    proc = subprocess.run([SNAKEMAKE, "-n", "--configfile", str(config)], cwd=workdir,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "(patient p2), column label: 'influenza' is not one of" in text
    assert "patient p3: site 'atlantis' has no role" in text
    assert not (workdir / "results" / "patients").exists()


def test_fpn_on_own_scans_without_masks_is_refused_clearly(repo, real_data, tmp_path):
    workdir = _workdir(repo, tmp_path / "fpn")
    sheet = tmp_path / "samples.tsv"
    pd.DataFrame([_row("p1", real_data / "covid_ct_md" / "P001_ct_bin4x4x1.nii.gz")]).to_csv(
        sheet, sep="\t", index=False)
    config = _config(workdir, sheet)
    cfg = yaml.safe_load(config.read_text())
    cfg["segmentation"] = {"method": "fpn"}
    config.write_text(yaml.safe_dump(cfg))
    proc = _snakemake(workdir, "-n", "--configfile", str(config), check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "segmentation.train.sheet" in out and "segmentation.model" in out, out[-3000:]
