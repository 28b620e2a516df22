"""The paper's cohort size: 5,372 patients under config/paper.yaml's site roles.

A dry run (`snakemake -n -p`) builds the whole DAG and prints every job's shell command; each
command must fit in one command-line argument (Linux: 128 KiB), however many patients a gather
rule reads, because the rules pass the patients' folder and the site sheets, never one path per
patient.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

MAX_ARG = 128 * 1024
# the paper's cohorts (Table 1): task and patients per site
PAPER_SITES = {"westchina": ("egfr", 4106), "wuhan": ("covid", 560), "henan": ("covid", 149),
               "anhui": ("covid", 226), "heilongjiang": ("covid", 161),
               "beijing": ("covid", 53), "huangshi": ("covid", 117)}


def paper_sheet(folder: Path) -> Path:
    """A sample sheet of 5,372 patients whose images are empty files (a dry run reads none)."""
    images = folder / "images"
    images.mkdir(parents=True)
    sheet = folder / "samples.tsv"
    with sheet.open("w", newline="") as f:
        rows = csv.writer(f, delimiter="\t")
        rows.writerow(["patient", "site", "image", "task", "label", "age", "sex", "comorbidity",
                       "stay_days", "discharged"])
        for site, (task, n) in PAPER_SITES.items():
            for i in range(n):
                patient = f"{site}{i:05d}"
                image = images / f"{patient}.nii.gz"
                image.touch()
                if task == "egfr":
                    label = "egfr_mutant" if i % 2 else "egfr_wildtype"
                    follow_up = ["", ""]
                else:
                    label = "covid" if i % 3 else "bacterial"
                    follow_up = [4 + i % 20, 1]
                rows.writerow([patient, site, f"images/{image.name}", task, label,
                               40 + i % 40, "MF"[i % 2], i % 2, *follow_up])
    return sheet


def test_every_command_of_the_paper_cohort_fits_in_one_argument(repo, tmp_path):
    sheet = paper_sheet(tmp_path)
    assert sum(1 for _ in sheet.open()) - 1 == 5372
    cfg = yaml.safe_load((repo / "config" / "paper.yaml").read_text())
    cfg["samples"] = str(sheet)
    config = tmp_path / "paper.yaml"
    config.write_text(yaml.safe_dump(cfg))
    for name in ("Snakefile", "workflow"):
        (tmp_path / name).symlink_to(repo / name)
    start = time.perf_counter()
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "-n", "-p", "--cores", "1",
         "--configfile", str(config), "--replace-workflow-config"],
        cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", timeout=600)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    # `None` for the rules that run Python in Snakemake (the site sheets, `all`)
    commands = [c for c in re.findall(r"^Shell command: (.*)$", text, flags=re.M) if c != "None"]
    stages = {}
    for command in commands:
        stage = re.search(r"\$COVIDCT (\S+)", command).group(1)
        stages[stage] = max(stages.get(stage, 0), len(command.encode()))
    print(f"\n{len(commands)} jobs for 5,372 patients, DAG in {seconds:.0f} s; longest command "
          "per stage (bytes): " + ", ".join(f"{k} {v}" for k, v in
                                            sorted(stages.items(), key=lambda kv: -kv[1])))
    counts = dict(re.findall(r"^(\w+)\s+(\d+)\s*$", text, flags=re.M))
    for rule in ("ingest", "segment", "roi"):
        assert int(counts[rule]) == 5372
    assert len(commands) == int(counts["total"]) - int(counts["site_sheet"]) - 1
    # the gather stages read thousands of stores, and name none of them
    assert {"train", "qc-summary", "explain", "predict-site", "flow", "tables"} <= set(stages)
    assert max(stages.values()) < MAX_ARG / 16, stages
