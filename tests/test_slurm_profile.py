"""The SLURM workflow profile (workflow/profiles/slurm/config.yaml), checked without a cluster.

Static checks read the profile as Snakemake and the SLURM executor plugin would; two dry runs of
the real workflow (tiny config, threshold and FPN segmentation) with the profile show what each
cluster job would ask `sbatch` for. The real cluster run is .ci/slurm/run_e2e.sh.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")
PROFILE = Path("workflow") / "profiles" / "slurm"

# Rules that train or run the networks: one GPU each.
# The learning curve's rules of config/paper.yaml (training.learning_curve: [0.25, 0.5]).
CURVE_RULES = {f"{kind}_{base}_lc{pct}" for kind in ("train", "predict")
               for base in ("finetune_covid", "random_init") for pct in (25, 50)}
GPU_RULES = {"pretrain_egfr", "finetune_covid", "train_random_init", "train_lung_segmenter",
             "predict_finetune_covid", "predict_random_init", "explain"} | CURVE_RULES
PREPROCESS_RULES = {"ingest", "segment", "roi"}
SYNTH_RULES = {"synth_dicom", "synth_nifti", "synth_lesion_case"}


@pytest.fixture(scope="module")
def profile(repo) -> dict:
    return yaml.safe_load((repo / PROFILE / "config.yaml").read_text())


def _resources(profile: dict, rule: str) -> dict:
    merged = dict(profile["default-resources"])
    merged.update(profile.get("set-resources", {}).get(rule, {}))
    return merged


def test_profile_keys_are_snakemake_or_slurm_plugin_options(profile):
    from snakemake.cli import get_argument_parser
    from snakemake_executor_plugin_slurm import ExecutorSettings

    options = {s[2:] for a in get_argument_parser()._actions for s in a.option_strings
               if s.startswith("--")}
    plugin = {"slurm-" + f.name.replace("_", "-") for f in dataclasses.fields(ExecutorSettings)}
    unknown = sorted(k for k in profile if k not in options and k not in plugin)
    assert unknown == [], f"not snakemake/slurm-plugin options: {unknown}"
    assert profile["executor"] == "slurm"
    assert profile["keep-going"] is True and profile["rerun-incomplete"] is True
    assert profile["latency-wait"] >= 30


def test_every_rule_has_memory_and_runtime(profile):
    defaults = profile["default-resources"]
    assert defaults["mem_mb"] >= 1000 and defaults["runtime"] >= 10
    for rule, res in profile["set-resources"].items():
        assert set(res) <= {"mem_mb", "runtime", "gpu", "gres", "jobstep_lane"}, rule
        assert isinstance(res["mem_mb"], int) and res["mem_mb"] > 0, rule
        assert isinstance(res["runtime"], int) and res["runtime"] > 0, rule


def test_gpu_rules_ask_for_one_gpu_more_memory_and_time(profile):
    defaults = profile["default-resources"]
    for rule in GPU_RULES:
        res = _resources(profile, rule)
        assert res.get("gpu") == 1 or "gpu:1" in str(res.get("gres", "")), rule
        assert res["mem_mb"] > defaults["mem_mb"], rule
        assert res["runtime"] > defaults["runtime"], rule
        assert profile["set-threads"][rule] >= 2, rule
    others = set(profile["set-resources"]) - GPU_RULES
    assert others, "CPU rules are sized too"
    for rule in others:
        res = _resources(profile, rule)
        assert "gpu" not in res and "gres" not in res, f"{rule} is a CPU rule"
    # training outlasts inference
    assert (
        _resources(profile, "pretrain_egfr")["runtime"]
        > _resources(profile, "predict_finetune_covid")["runtime"]
    )


def test_preprocess_is_grouped_and_sized_for_a_sequential_job_step(profile, repo):
    for group in ("preprocess", "synth"):
        per_job = profile["group-components"][group]
        assert isinstance(per_job, int) and per_job >= 10, group
    assert "groups" not in profile          # the rules declare their groups
    for name, group, members in (("preprocess", "preprocess", PREPROCESS_RULES),
                                 ("synth", "synth", SYNTH_RULES)):
        rules = (repo / "workflow" / "rules" / f"{name}.smk").read_text()
        for rule in members:
            body = re.search(rf"^\s*rule {rule}:\n(.*?)(?=^\s*(?:rule|localrules|if)\b|\Z)",
                             rules, re.S | re.M)
            assert body and re.search(rf'group:\s*\n\s*"{group}"', body.group(1)), rule
    # the job step runs a group's jobs one at a time: one lane per group job, kept local to it
    assert profile["resources"] == {"jobstep_lane": 1}
    assert profile["set-resource-scopes"] == {"jobstep_lane": "local"}
    for rule in PREPROCESS_RULES | SYNTH_RULES:
        assert profile["set-resources"][rule]["jobstep_lane"] == 1, rule
    for rule in GPU_RULES:
        assert "jobstep_lane" not in profile["set-resources"][rule], rule
    chain = sum(_resources(profile, r)["runtime"] for r in PREPROCESS_RULES)
    assert profile["group-components"]["preprocess"] * chain <= 24 * 60, "fits in a day"


# ---- dry runs of the real workflow with the profile ----------------------------------------------

def _dry_run(repo: Path, workdir: Path, config: dict) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "workflow"):
        (workdir / name).symlink_to(repo / name)
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(config))
    env = dict(
        os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1"
    )
    proc = subprocess.run([SNAKEMAKE, "-n", "--workflow-profile", str(PROFILE),
                           "--configfile", "tiny.yaml"],
                          cwd=workdir, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"dry run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


JOB = re.compile(r"^\s*(local)?rule (\w+):\n((?:[ \t]+\w[\w ]*:.*\n)*)", re.M)


def _jobs(log: str) -> list[tuple[str, bool, int, dict]]:
    """(rule, local, threads, resources) of every job a dry run lists."""
    jobs = []
    for m in JOB.finditer(log):
        body = m.group(3)
        threads = re.search(r"threads: (\d+)", body)
        res = re.search(r"resources: (.*)", body)
        resources = dict(kv.split("=", 1) for kv in res.group(1).split(", ")) if res else {}
        jobs.append(
            (m.group(2), bool(m.group(1)), int(threads.group(1)) if threads else 1, resources)
        )
    return jobs


def _patients(config: dict) -> int:
    return sum(s["n"] for s in config["synthetic"]["sites"].values())


@pytest.mark.parametrize("method", ["threshold", "fpn"])
def test_dry_run_of_the_workflow_with_the_profile(repo, profile, tmp_path, method):
    config = yaml.safe_load((repo / "tests" / "data" / "tiny.yaml").read_text())
    config["segmentation"] = dict(config.get("segmentation", {}), method=method)
    log = _dry_run(repo, tmp_path / method, config)
    jobs = _jobs(log)
    rules = {rule for rule, local, *_ in jobs if not local}
    assert PREPROCESS_RULES <= rules and "pretrain_egfr" in rules
    assert ("train_lung_segmenter" in rules) == (method == "fpn")
    # the FPN also learns from the dense lesion cases (segmentation.train.lesion_cases: 12)
    cases = [job for job in jobs if job[0] == "synth_lesion_case"]
    assert len(cases) == (12 if method == "fpn" else 0)

    # every submitted job carries memory and runtime; GPU jobs, and only they, one GPU
    for rule, local, threads, res in jobs:
        if local or rule == "all":
            continue
        assert int(res["mem_mb"]) > 0 and int(res["runtime"]) > 0, rule
        if rule in GPU_RULES:
            assert res.get("gpu") == "1", rule
            assert int(res["mem_mb"]) == profile["set-resources"][rule]["mem_mb"], rule
            assert threads == profile["set-threads"][rule], rule
        else:
            assert "gpu" not in res, rule
            assert threads == 1, rule

    # a set-resources entry that names no rule would be ignored silently: no typos
    fpn_rules = {"train_lung_segmenter", "synth_lesion_case"}
    optional = (fpn_rules if method != "fpn" else set()) | CURVE_RULES
    assert set(profile["set-resources"]) - rules == optional
    assert GPU_RULES - optional <= rules

    # patients travel in groups of group-components, not one cluster job each
    n = _patients(config)
    for group, members in (("preprocess", n), ("synth", n + len(cases))):
        groups = len(re.findall(rf"Group job {group} ", log))
        assert groups == math.ceil(members / profile["group-components"][group]), group
    assert len([r for r, *_ in jobs if r in PREPROCESS_RULES]) == 3 * n
    assert len([r for r, *_ in jobs if r in SYNTH_RULES]) == n + len(cases)
