"""``covidct cohort``: the synthetic multi-site cohort's sample sheet, from the config.

One row per patient with the sheet columns plus what rebuilds the patient's scan (seed, latent
severity, scanner). Clinical model after Table 1 of Wang et al. 2020: age by site, comorbidity
more likely with age, a latent severity rising with age, comorbidity and male sex that drives
the lesion burden and the hospital stay. Everything is deterministic from ``synthetic.seed``;
a patient's seed comes from the cohort seed, the site and its index, so adding a site changes
no other site's patients.
"""

from __future__ import annotations

import argparse
import logging
import math
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidct.errors import CovidctError
from covidct.io.atomic import write_csv
from covidct.io.sheet import COLUMNS, LABELS
from covidct.synth.lesions import CASES
from covidct.synth.patient import LUNG_MASK

log = logging.getLogger(__name__)

SCANNER_KEYS = (
    "slice_mm",
    "fov_mm",
    "noise_hu",
    "kernel_mm",
    "padding_hu",
    "manufacturer",
    "model",
    "convolution_kernel",
    "transfer_syntax",
    "reverse_z",
    "matrix",
    "length_mm",
)

DEFAULT_MIX = {"covid": {"covid": 1.0}, "egfr": {"egfr_mutant": 0.5, "egfr_wildtype": 0.5}}
FORMATS = ("dicom", "nifti")
EXTRA_COLUMNS = (
    "mask",
    "format",
    "seed",
    "severity",
    "emphysema",
    "case",
    "matrix",
    "pixel_mm",
    "slice_mm",
    "n_slices",
    "noise_hu",
    "kernel_mm",
    "padding_hu",
    "transfer_syntax",
    "reverse_z",
    "manufacturer",
    "model",
    "convolution_kernel",
)


# ----------------------------------------------------------------------------------------------
# The cohort table
# ----------------------------------------------------------------------------------------------
def patient_seed(cohort_seed: int, site: str, index: int) -> int:
    """The seed of patient ``index`` (0-based) of ``site``: stable under adding other sites."""
    ss = np.random.SeedSequence([int(cohort_seed), zlib.crc32(site.encode()), int(index)])
    return int(ss.generate_state(1)[0])


def _allocate(n: int, mix: Mapping[str, float], order: tuple[str, ...]) -> dict[str, int]:
    """Counts per label summing to n, by largest remainder (ties and order follow ``order``,
    so the result does not depend on how the config's mapping is ordered)."""
    total = float(sum(mix.values()))
    labels = [k for k in order if k in mix]
    raw = {k: n * float(mix[k]) / total for k in labels}
    counts = {k: int(math.floor(x)) for k, x in raw.items()}
    rest = n - sum(counts.values())
    for k in sorted(labels, key=lambda k: (-(raw[k] - counts[k]), labels.index(k)))[:rest]:
        counts[k] += 1
    return counts


def site_scanner(site: str, spec: Mapping[str, Any] | None, matrix: int) -> dict[str, Any]:
    """The site's scanner: the config's ``scanner`` entry over one derived from the site's name."""
    r = np.random.default_rng(zlib.crc32(site.encode()))
    base = dict(slice_mm=float(r.choice([1.5, 2.0, 2.5, 3.0, 5.0])),
                fov_mm=float(r.integers(34, 41) * 10),
                noise_hu=float(np.round(r.uniform(9, 22), 1)),
                kernel_mm=float(np.round(r.uniform(0.5, 1.1), 2)),
                padding_hu=int(r.choice([-2048, -3024])), manufacturer="SIEMENS",
                model="SOMATOM Force", convolution_kernel="Br40d")
    base.setdefault("transfer_syntax", "explicit")
    base.setdefault("reverse_z", False)
    base.setdefault("matrix", int(matrix))
    for key, value in dict(spec or {}).items():
        if key not in SCANNER_KEYS:
            raise CovidctError(f"synthetic site {site}: unknown scanner key {key!r} "
                               f"(known: {', '.join(SCANNER_KEYS)})")
        base[key] = value
    if not 0.5 <= float(base["slice_mm"]) <= 10:
        raise CovidctError(f"synthetic site {site}: slice_mm {base['slice_mm']} outside 0.5-10 mm")
    if int(base["matrix"]) < 32:
        raise CovidctError(f"synthetic site {site}: matrix {base['matrix']} is under 32 voxels")
    if int(base["padding_hu"]) > -1024:
        raise CovidctError(
            f"synthetic site {site}: padding_hu {base['padding_hu']} must be <= -1024"
        )
    if base["transfer_syntax"] not in ("explicit", "rle"):
        raise CovidctError(f"synthetic site {site}: transfer_syntax must be explicit or rle")
    return base


def _clinical(
    rng: np.random.Generator, task: str, label: str, spec: Mapping[str, Any]
) -> dict[str, Any]:
    age_mean = float(spec.get("age_mean", 60.0 if task == "egfr" else 50.0))
    age_sd = float(spec.get("age_sd", 10.0 if task == "egfr" else 19.0))
    age = int(np.clip(round(rng.normal(age_mean, age_sd)), 18, 90))
    male = rng.random() < float(spec.get("male", 0.5))
    p_comorb = 1.0 / (1.0 + math.exp(-(-1.3 + 0.06 * (age - 50))))
    comorbidity = int(rng.random() < p_comorb)
    # latent severity: older, comorbid and male patients are more severe (probit to (0, 1))
    z = 0.035 * (age - 50) + 0.7 * comorbidity + 0.2 * male + rng.normal()
    severity = 0.5 * (1.0 + math.erf(z / math.sqrt(2.0 * 1.55)))
    severity = float(np.clip(severity, 0.02, 0.98))
    smoker = rng.random() < (0.15 + 0.25 * (label == "egfr_wildtype") + 0.15 * (age > 60)
                             - 0.1 * (label == "egfr_mutant"))
    emphysema = float(np.round(rng.uniform(0.3, 1.0), 3)) if smoker else 0.0
    return dict(age=age, sex="M" if male else "F", comorbidity=comorbidity,
                severity=round(severity, 4), emphysema=emphysema)


def _stay(
    rng: np.random.Generator, severity: float, max_stay: float, censor: float
) -> tuple[int, int]:
    """(stay_days, discharged): longer stays for more severe patients; some censored."""
    stay = 5.0 + math.exp(math.log(3.0) + 1.8 * severity + 0.45 * rng.normal())
    if stay > max_stay:
        return int(max_stay), 0
    if rng.random() < censor:
        return int(max(5, round(rng.uniform(5.0, stay)))), 0
    return int(max(5, round(stay))), 1


def cohort_table(config: Mapping[str, Any], root: str = "results/synth") -> pd.DataFrame:
    """The synthetic cohort's sample sheet (no images are made).

    ``config`` is the whole workflow config (or just its ``synthetic`` section); ``root`` is
    where :func:`write_patient` puts each patient: ``{root}/{site}/{patient}/dicom`` (a folder)
    or ``{root}/{site}/{patient}/ct.nii.gz``, and ``{root}/{site}/{patient}/lung_mask.nii.gz``
    (a site's ``cases``, dense lesion cases given in turn to its patients, also
    ``lesion_mask.nii.gz`` there).
    """
    syn = dict(config.get("synthetic", config) or {})
    cohort_seed = int(syn.get("seed", 2020))
    matrix = int(syn.get("matrix", 128))
    length_mm = float(syn.get("length_mm", 300.0))
    length_sd = float(syn.get("length_sd", 12.0))
    max_stay = float(syn.get("max_stay_days", 40.0))
    censor = float(syn.get("censor", 0.1))
    sites = syn.get("sites")
    if not sites:
        raise CovidctError("the config's synthetic section lists no sites (synthetic.sites)")
    root = str(root).rstrip("/") or "."
    rows = []
    for site, spec in sites.items():
        spec = dict(spec or {})
        where = f"synthetic site {site}"
        task = spec.get("task", "covid")
        if task not in LABELS:
            raise CovidctError(
                f"{where}: unknown task {task!r} (expected one of {', '.join(LABELS)})"
            )
        fmt = spec.get("format", "nifti")
        if fmt not in FORMATS:
            raise CovidctError(f"{where}: unknown format {fmt!r} (expected dicom or nifti)")
        n = int(spec.get("n", 0))
        if n < 0:
            raise CovidctError(f"{where}: n must be >= 0")
        mix = dict(spec.get("mix") or DEFAULT_MIX[task])
        bad = [k for k in mix if k not in LABELS[task]]
        if (
            bad
            or any(float(v) < 0 for v in mix.values())
            or sum(float(v) for v in mix.values()) <= 0
        ):
            raise CovidctError(f"{where}: mix must give non-negative shares of labels "
                               f"{', '.join(LABELS[task])} (got {mix})")
        scanner = site_scanner(site, spec.get("scanner"), matrix)
        counts = _allocate(n, mix, LABELS[task])
        site_rng = np.random.default_rng([cohort_seed, zlib.crc32(site.encode()), 7])
        labels = np.array([lab for lab, c in counts.items() for _ in range(c)], dtype=object)
        site_rng.shuffle(labels)
        covid_idx = [i for i, lab in enumerate(labels) if lab == "covid"]
        n_follow = int(round(float(spec.get("follow_up", 0.0)) * len(covid_idx)))
        follow = (
            set(site_rng.choice(covid_idx, size=n_follow, replace=False).tolist())
            if n_follow
            else set()
        )
        px = float(scanner["fov_mm"]) / int(scanner["matrix"])
        cases = list(spec.get("cases") or [])
        unknown = [c for c in cases if c not in CASES]
        if unknown:
            raise CovidctError(f"{where}: unknown lesion cases {unknown} (known: "
                               f"{', '.join(CASES)})")
        for i, label in enumerate(labels):
            seed = patient_seed(cohort_seed, site, i)
            rng = np.random.default_rng([seed, 4])
            clin = _clinical(rng, task, str(label), spec)
            length = float(scanner.get("length_mm", length_mm)) + rng.normal(0, length_sd)
            n_slices = max(24, int(round(length / float(scanner["slice_mm"]))))
            stay, discharged = (None, None)
            if i in follow:
                stay, discharged = _stay(rng, clin["severity"], max_stay, censor)
            patient = f"{site}-{i + 1:03d}"
            folder = f"{root}/{site}/{patient}"
            rows.append(
                dict(
                    patient=patient,
                    site=site,
                    image=f"{folder}/dicom" if fmt == "dicom" else f"{folder}/ct.nii.gz",
                    task=task,
                    label=str(label),
                    age=clin["age"],
                    sex=clin["sex"],
                    comorbidity=clin["comorbidity"],
                    stay_days=stay,
                    discharged=discharged,
                    mask=f"{folder}/{LUNG_MASK}",
                    format=fmt,
                    seed=seed,
                    severity=clin["severity"],
                    emphysema=clin["emphysema"],
                    case=cases[i % len(cases)] if cases else "",
                    matrix=int(scanner["matrix"]),
                    pixel_mm=round(px, 6),
                    slice_mm=float(scanner["slice_mm"]),
                    n_slices=n_slices,
                    noise_hu=float(scanner["noise_hu"]),
                    kernel_mm=float(scanner["kernel_mm"]),
                    padding_hu=int(scanner["padding_hu"]),
                    transfer_syntax=str(scanner["transfer_syntax"]),
                    reverse_z=int(bool(scanner["reverse_z"])),
                    manufacturer=str(scanner["manufacturer"]),
                    model=str(scanner["model"]),
                    convolution_kernel=str(scanner["convolution_kernel"]),
                )
            )
    table = pd.DataFrame(rows, columns=list(COLUMNS) + list(EXTRA_COLUMNS))
    for col in ("stay_days", "discharged"):
        table[col] = table[col].astype("Int64")
    return table


LESION_CASE_SITE = "lesion_cases"
"""The folder (under the cohort's root) of the extra training patients of the lung FPN."""


def lesion_case_rows(k: int, config: Mapping[str, Any] | None = None,
                     root: str = "results/synth") -> list[dict[str, Any]]:
    """``k`` patients with the dense lesion cases (:data:`CASES`) in turn, at severities 0.5,
    0.75 and 1.0, on the cohort's matrix and default scanner: the lung FPN's extra training
    pairs, so that its exact lesion-inclusive masks teach it disease on the lung's walls.
    Each lies in ``{root}/lesion_cases/{patient}/`` (ct.nii.gz, lung and lesion masks)."""
    syn = dict((config or {}).get("synthetic", config or {}) or {})
    cohort_seed = int(syn.get("seed", 2020))
    matrix = int(syn.get("matrix", 128))
    scanner = site_scanner(LESION_CASE_SITE, None, matrix)
    names = sorted(CASES)
    rows = []
    for i in range(k):
        patient = f"lesion-{i + 1:03d}"
        folder = f"{str(root).rstrip('/') or '.'}/{LESION_CASE_SITE}/{patient}"
        rows.append(dict(
            patient=patient, site=LESION_CASE_SITE, label="covid", task="covid",
            sex="MF"[i % 2], seed=patient_seed(cohort_seed, LESION_CASE_SITE, i),
            severity=0.5 + 0.25 * ((i // len(names)) % 3), case=names[i % len(names)],
            format="nifti", image=f"{folder}/ct.nii.gz", mask=f"{folder}/{LUNG_MASK}",
            matrix=matrix, pixel_mm=round(float(scanner["fov_mm"]) / matrix, 6),
            slice_mm=float(scanner["slice_mm"]), noise_hu=float(scanner["noise_hu"]),
            kernel_mm=float(scanner["kernel_mm"])))
    return rows


def write_cohort(table: pd.DataFrame, out: str | Path) -> Path:
    return write_csv(out, table, sep="\t", na_rep="")


def read_cohort(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise CovidctError("cohort table not found", path=path)
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="workflow config (YAML) with a `synthetic:` section"
    )
    parser.add_argument(
        "--out", default="results/synth/cohort.tsv", help="cohort sample sheet to write (TSV)"
    )
    parser.add_argument("--root", default=None,
                        help="folder of the patients' scans (default: the folder of --out)")


def run(args: argparse.Namespace) -> int:
    import yaml

    path = Path(args.config)
    if not path.exists():
        raise CovidctError("config not found", path=path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise CovidctError(f"not valid YAML: {err}".replace("\n", " "), path=path) from None
    root = args.root if args.root is not None else str(Path(args.out).parent)
    try:
        table = cohort_table(config, root=root)
    except CovidctError as err:
        err.with_context(path=path)
        raise
    write_cohort(table, args.out)
    summary = table.groupby(["site", "label"]).size()
    log.info("cohort: %d patients at %d sites -> %s", len(table), table["site"].nunique(), args.out)
    for (site, label), count in summary.items():
        log.info("  %-14s %-14s %3d", site, label, count)
    return 0
