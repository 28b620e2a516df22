"""The synthetic multi-site chest-CT cohort: ``covidct cohort`` and ``covidct synth``.

With no data of their own, users run the whole workflow on this cohort. :func:`cohort_table`
turns the config's ``synthetic:`` section into a sample sheet (cheap: no images), one row per
patient with the sheet columns plus everything needed to rebuild that patient's scan
(seed, latent severity, scanner). :func:`make_patient` builds the scan from such a row with
:mod:`covidct.phantom`; :func:`write_patient` writes it as a DICOM series (made-up identifying
header fields included on purpose: the pipeline must drop them) or as NIfTI, plus the exact lung
mask ``lung_mask.nii.gz`` beside it.

Clinical model (after Table 1 of Wang et al. 2020): age ~ N(site mean, site sd) clipped to
18-90; comorbidity more likely with age; a latent severity in (0, 1) rises with age,
comorbidity and male sex and drives both the lesion burden and, for COVID-19 patients with
follow-up, the hospital stay (5 + lognormal days, longer when more severe; stays over
``max_stay_days`` and a ``censor`` fraction are censored, discharged = 0). Patients without
follow-up have empty ``stay_days``/``discharged``.

Everything is deterministic from ``synthetic.seed``: each patient's seed derives from the cohort
seed, the site name and the patient's index, so a site's patients do not change when another
site is added.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
import uuid
import zlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from covidct.errors import CovidctError
from covidct.sheet import COLUMNS, LABELS

log = logging.getLogger(__name__)

# Scanners of the demo sites; a site of the config without a `scanner` entry (or lacking keys)
# takes these, and a site not listed here gets one derived from its name.
SITE_SCANNERS: dict[str, dict[str, Any]] = {
    "westchina": dict(slice_mm=2.5, fov_mm=360.0, noise_hu=14.0, kernel_mm=0.8, padding_hu=-3024,
                      manufacturer="GE MEDICAL SYSTEMS", model="Discovery CT750 HD",
                      convolution_kernel="STANDARD"),
    "wuhan": dict(slice_mm=5.0, fov_mm=350.0, noise_hu=10.0, kernel_mm=1.1, padding_hu=-2048,
                  manufacturer="SIEMENS", model="SOMATOM Definition AS", convolution_kernel="B31f"),
    "anhui": dict(slice_mm=3.0, fov_mm=380.0, noise_hu=22.0, kernel_mm=0.55, padding_hu=-3024,
                  manufacturer="GE MEDICAL SYSTEMS", model="Optima CT660", convolution_kernel="LUNG"),
    "heilongjiang": dict(slice_mm=2.0, fov_mm=370.0, noise_hu=16.0, kernel_mm=0.7, padding_hu=-2048,
                         manufacturer="Philips", model="Brilliance 64", convolution_kernel="C"),
    "beijing": dict(slice_mm=4.0, fov_mm=345.0, noise_hu=12.0, kernel_mm=0.9, padding_hu=-3024,
                    manufacturer="TOSHIBA", model="Aquilion ONE", convolution_kernel="FC52",
                    transfer_syntax="rle", reverse_z=True),
    "huangshi": dict(slice_mm=2.5, fov_mm=400.0, noise_hu=18.0, kernel_mm=0.65, padding_hu=-2048,
                     manufacturer="UIH", model="uCT 760", convolution_kernel="B_SHARP_C"),
}
SCANNER_KEYS = ("slice_mm", "fov_mm", "noise_hu", "kernel_mm", "padding_hu", "manufacturer", "model",
                "convolution_kernel", "transfer_syntax", "reverse_z", "matrix", "length_mm")

# The demo cohort used when the config has no `synthetic.sites` (sizes and mixes after Table 1).
DEFAULT_SITES: dict[str, dict[str, Any]] = {
    "westchina": dict(n=40, task="egfr", format="nifti", mix={"egfr_mutant": 0.5, "egfr_wildtype": 0.5},
                      age_mean=60.0, age_sd=10.0, male=0.5),
    "wuhan": dict(n=60, task="covid", format="dicom", follow_up=1.0, age_mean=50.5, age_sd=18.9, male=0.48,
                  mix={"covid": 0.6, "bacterial": 0.25, "mycoplasma": 0.1, "fungal": 0.05}),
    "anhui": dict(n=30, task="covid", format="dicom", age_mean=49.2, age_sd=18.4, male=0.58,
                  mix={"covid": 0.5, "bacterial": 0.45, "mycoplasma": 0.05}),
    "heilongjiang": dict(n=30, task="covid", format="nifti", age_mean=58.4, age_sd=16.2, male=0.67,
                         mix={"covid": 0.55, "bacterial": 0.15, "mycoplasma": 0.1, "viral": 0.2}),
    "beijing": dict(n=30, task="covid", format="dicom", follow_up=1.0, age_mean=50.3, age_sd=19.3,
                    male=0.47, mix={"covid": 1.0}),
    "huangshi": dict(n=30, task="covid", format="nifti", follow_up=1.0, age_mean=47.7, age_sd=14.2,
                     male=0.51, mix={"covid": 1.0}),
}
DEFAULT_MIX = {"covid": {"covid": 1.0}, "egfr": {"egfr_mutant": 0.5, "egfr_wildtype": 0.5}}
FORMATS = ("dicom", "nifti")
EXTRA_COLUMNS = ("mask", "format", "seed", "severity", "emphysema", "matrix", "pixel_mm", "slice_mm",
                 "n_slices", "noise_hu", "kernel_mm", "padding_hu", "transfer_syntax", "reverse_z",
                 "manufacturer", "model", "convolution_kernel")
STUDY_DATE = (2020, 2, 1)


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
    """The site's scanner: code defaults (or ones derived from the site's name), then the config."""
    if site in SITE_SCANNERS:
        base = dict(SITE_SCANNERS[site])
    else:
        r = np.random.default_rng(zlib.crc32(site.encode()))
        base = dict(slice_mm=float(r.choice([1.5, 2.0, 2.5, 3.0, 5.0])), fov_mm=float(r.integers(34, 41) * 10),
                    noise_hu=float(np.round(r.uniform(9, 22), 1)), kernel_mm=float(np.round(r.uniform(0.5, 1.1), 2)),
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
        raise CovidctError(f"synthetic site {site}: padding_hu {base['padding_hu']} must be <= -1024")
    if base["transfer_syntax"] not in ("explicit", "rle"):
        raise CovidctError(f"synthetic site {site}: transfer_syntax must be explicit or rle")
    return base


def _clinical(rng: np.random.Generator, task: str, label: str, spec: Mapping[str, Any]) -> dict[str, Any]:
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


def _stay(rng: np.random.Generator, severity: float, max_stay: float, censor: float) -> tuple[int, int]:
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
    or ``{root}/{site}/{patient}/ct.nii.gz``, and ``{root}/{site}/{patient}/lung_mask.nii.gz``.
    """
    syn = dict(config.get("synthetic", config) or {})
    cohort_seed = int(syn.get("seed", 2020))
    matrix = int(syn.get("matrix", 128))
    length_mm = float(syn.get("length_mm", 300.0))
    length_sd = float(syn.get("length_sd", 12.0))
    max_stay = float(syn.get("max_stay_days", 40.0))
    censor = float(syn.get("censor", 0.1))
    sites = syn.get("sites") or DEFAULT_SITES
    root = str(root).rstrip("/") or "."
    rows = []
    for site, spec in sites.items():
        spec = dict(spec or {})
        where = f"synthetic site {site}"
        task = spec.get("task", "covid")
        if task not in LABELS:
            raise CovidctError(f"{where}: unknown task {task!r} (expected one of {', '.join(LABELS)})")
        fmt = spec.get("format", "nifti")
        if fmt not in FORMATS:
            raise CovidctError(f"{where}: unknown format {fmt!r} (expected dicom or nifti)")
        n = int(spec.get("n", 0))
        if n < 0:
            raise CovidctError(f"{where}: n must be >= 0")
        mix = dict(spec.get("mix") or DEFAULT_MIX[task])
        bad = [k for k in mix if k not in LABELS[task]]
        if bad or any(float(v) < 0 for v in mix.values()) or sum(float(v) for v in mix.values()) <= 0:
            raise CovidctError(f"{where}: mix must give non-negative shares of labels "
                               f"{', '.join(LABELS[task])} (got {mix})")
        scanner = site_scanner(site, spec.get("scanner"), matrix)
        counts = _allocate(n, mix, LABELS[task])
        site_rng = np.random.default_rng([cohort_seed, zlib.crc32(site.encode()), 7])
        labels = np.array([lab for lab, c in counts.items() for _ in range(c)], dtype=object)
        site_rng.shuffle(labels)
        covid_idx = [i for i, lab in enumerate(labels) if lab == "covid"]
        n_follow = int(round(float(spec.get("follow_up", 0.0)) * len(covid_idx)))
        follow = set(site_rng.choice(covid_idx, size=n_follow, replace=False).tolist()) if n_follow else set()
        px = float(scanner["fov_mm"]) / int(scanner["matrix"])
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
            rows.append(dict(
                patient=patient, site=site,
                image=f"{folder}/dicom" if fmt == "dicom" else f"{folder}/ct.nii.gz",
                task=task, label=str(label), age=clin["age"], sex=clin["sex"],
                comorbidity=clin["comorbidity"], stay_days=stay, discharged=discharged,
                mask=f"{folder}/lung_mask.nii.gz", format=fmt, seed=seed, severity=clin["severity"],
                emphysema=clin["emphysema"], matrix=int(scanner["matrix"]), pixel_mm=round(px, 6),
                slice_mm=float(scanner["slice_mm"]), n_slices=n_slices, noise_hu=float(scanner["noise_hu"]),
                kernel_mm=float(scanner["kernel_mm"]), padding_hu=int(scanner["padding_hu"]),
                transfer_syntax=str(scanner["transfer_syntax"]), reverse_z=int(bool(scanner["reverse_z"])),
                manufacturer=str(scanner["manufacturer"]), model=str(scanner["model"]),
                convolution_kernel=str(scanner["convolution_kernel"])))
    table = pd.DataFrame(rows, columns=list(COLUMNS) + list(EXTRA_COLUMNS))
    for col in ("stay_days", "discharged"):
        table[col] = table[col].astype("Int64")
    return table


def write_cohort(table: pd.DataFrame, out: str | Path) -> Path:
    from covidct.zarrio import atomic_path

    out = Path(out)
    with atomic_path(out) as tmp:
        table.to_csv(tmp, sep="\t", index=False, na_rep="")
    return out


def read_cohort(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise CovidctError("cohort table not found", path=path)
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


# ----------------------------------------------------------------------------------------------
# One patient
# ----------------------------------------------------------------------------------------------
@dataclass
class PatientSpec:
    """Everything that determines one synthetic scan (a cohort row, typed, with defaults)."""

    patient: str = "synthetic-001"
    site: str = "synthetic"
    task: str = "covid"
    label: str = "covid"
    age: float = 50.0
    sex: str = "M"
    seed: int = 0
    severity: float = 0.5
    emphysema: float = 0.0
    matrix: int = 128
    pixel_mm: float = 2.75
    slice_mm: float = 2.5
    n_slices: int = 0              # 0 = 300 mm worth of slices
    noise_hu: float = 12.0
    kernel_mm: float = 0.9
    padding_hu: int = -3024
    format: str = "nifti"
    transfer_syntax: str = "explicit"
    reverse_z: int = 0
    manufacturer: str = "SIEMENS"
    model: str = "SOMATOM Definition AS"
    convolution_kernel: str = "B31f"
    image: str = ""
    mask: str = ""

    @classmethod
    def from_row(cls, row: Mapping[str, Any] | pd.Series) -> "PatientSpec":
        """From a cohort row, a JSON spec or a dict of parameters (strings are converted)."""
        data = dict(row.items()) if hasattr(row, "items") else dict(row)
        kwargs = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)) \
                    or (isinstance(value, str) and not value.strip()):
                continue
            try:
                if f.type in ("int",):
                    value = int(float(value))
                elif f.type in ("float",):
                    value = float(value)
                else:
                    value = str(value)
            except (TypeError, ValueError) as err:
                raise CovidctError(f"bad value {value!r} for {f.name}: {err}",
                                   patient=str(data.get("patient") or "")) from None
            kwargs[f.name] = value
        spec = cls(**kwargs)
        if spec.n_slices <= 0:
            spec.n_slices = int(round(300.0 / spec.slice_mm))
        if spec.task not in LABELS or spec.label not in LABELS[spec.task]:
            raise CovidctError(f"label {spec.label!r} does not fit task {spec.task!r}", patient=spec.patient)
        return spec


def _origin(spec: PatientSpec) -> tuple[float, float, float]:
    from covidct.phantom import STREAM_HEADER, rng_for

    rng = rng_for(spec.seed, STREAM_HEADER)
    c = -(spec.matrix - 1) / 2.0 * spec.pixel_mm
    table_z = -round(spec.n_slices * spec.slice_mm + rng.uniform(30, 140), 1)
    return (round(c, 4), round(c, 4), table_z)


def _render(spec: PatientSpec, lesions: bool = True) -> dict[str, Any]:
    from covidct.phantom import Scanner, render

    scanner = Scanner(slice_mm=spec.slice_mm, pixel_mm=spec.pixel_mm, matrix=spec.matrix,
                      n_slices=spec.n_slices, noise_hu=spec.noise_hu, kernel_mm=spec.kernel_mm,
                      padding_hu=spec.padding_hu)
    try:
        return render(spec.seed, spec.label, spec.severity, scanner, age=spec.age, sex=spec.sex,
                      emphysema=spec.emphysema, lesions=lesions)
    except ValueError as err:
        raise CovidctError(str(err), step="synth", patient=spec.patient) from None


def make_patient(row: Mapping[str, Any] | pd.Series, *, lesions: bool = True, truth: bool = False):
    """Build one patient: ``(volume_hu int16 (z, y, x), lung_mask uint8, spacing_zyx, origin_xyz)``.

    ``row`` is a cohort row (or any mapping of :class:`PatientSpec` fields; missing ones take
    defaults). ``lesions=False`` gives the same patient without disease (same anatomy and
    noise). ``truth=True`` appends a dict with the phantom's ``tissue`` codes, ``lesion`` weight
    map, lung ``side`` labels (1 right, 2 left) and ``info``.
    """
    spec = row if isinstance(row, PatientSpec) else PatientSpec.from_row(row)
    out = _render(spec, lesions=lesions)
    result = (out["volume"], out["lung_mask"], tuple(float(s) for s in out["spacing"]), _origin(spec))
    if truth:
        extra = {k: out[k] for k in ("tissue", "lesion", "side", "info")}
        extra["anatomy"] = out["anatomy"]
        return result + (extra,)
    return result


# ----------------------------------------------------------------------------------------------
# DICOM header: made-up identity of the person (to be dropped by ingest) and scanner fields
# ----------------------------------------------------------------------------------------------
_SURNAMES = ("Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Huang", "Zhao", "Wu", "Zhou", "Xu", "Sun",
             "Ma", "Zhu", "Hu", "Guo", "He", "Lin", "Gao", "Luo")
_GIVEN = ("Wei", "Fang", "Min", "Jing", "Lei", "Yan", "Jun", "Tao", "Hui", "Ping", "Qiang", "Xiu",
          "Ying", "Hao", "Lan", "Bo", "Mei", "Gang", "Na", "Jie")
_HOSPITALS = ("People's Hospital", "Union Hospital", "Central Hospital", "First Affiliated Hospital",
              "Infectious Disease Hospital")


def identity(spec: PatientSpec | Mapping[str, Any]) -> dict[str, Any]:
    """The made-up person-identifying DICOM fields of a synthetic patient (deterministic)."""
    import datetime as dt

    from covidct.phantom import STREAM_HEADER, rng_for

    spec = spec if isinstance(spec, PatientSpec) else PatientSpec.from_row(spec)
    rng = rng_for(spec.seed, STREAM_HEADER + 10)
    name = f"{_SURNAMES[rng.integers(len(_SURNAMES))]}^{_GIVEN[rng.integers(len(_GIVEN))]}"
    study = dt.date(*STUDY_DATE)
    birth = study - dt.timedelta(days=int(round(spec.age * 365.25)) + int(rng.integers(0, 365)))
    site = spec.site.replace("-", " ").replace("_", " ").title()
    return {
        "PatientName": name,
        "PatientID": f"{rng.integers(10**7, 10**8)}",
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "OtherPatientIDs": f"MRN{rng.integers(10**6, 10**7)}",
        "InstitutionName": f"{site} {_HOSPITALS[rng.integers(len(_HOSPITALS))]}",
        "InstitutionAddress": f"{rng.integers(1, 400)} Jiefang Road, {site}",
        "ReferringPhysicianName": f"{_SURNAMES[rng.integers(len(_SURNAMES))]}^{_GIVEN[rng.integers(len(_GIVEN))]}",
        "AccessionNumber": f"CT{rng.integers(10**9, 10**10)}",
        "StudyID": f"{rng.integers(1000, 99999)}",
        "OperatorsName": f"{_SURNAMES[rng.integers(len(_SURNAMES))]}^{_GIVEN[rng.integers(len(_GIVEN))]}",
    }


def dicom_header(spec: PatientSpec) -> dict[str, Any]:
    header = identity(spec)
    header.update({
        "PatientSex": spec.sex,
        "PatientAge": f"{int(spec.age):03d}Y",
        "Manufacturer": spec.manufacturer,
        "ManufacturerModelName": spec.model,
        "ConvolutionKernel": spec.convolution_kernel,
        "StudyDescription": "CT CHEST",
        "SeriesDescription": f"CHEST {spec.slice_mm:g}mm {spec.convolution_kernel}",
        "ProtocolName": "Chest routine",
    })
    return header


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _write_file_atomic(path: Path, write) -> None:
    """Write one file through a hidden sibling folder (keeping the file name, hence its format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        tmp = tmp_dir / path.name
        write(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _sitk_image(array: np.ndarray, spacing_zyx, origin_xyz):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    img.SetOrigin(tuple(float(o) for o in origin_xyz))
    return img


def write_patient(row: Mapping[str, Any] | pd.Series, image: str | Path | None = None,
                  mask: str | Path | None = None) -> dict[str, Any]:
    """Build one patient and write its scan and exact lung mask (each atomically)."""
    import SimpleITK as sitk

    from covidct.dicomio import write_series
    from covidct.zarrio import atomic_path

    spec = row if isinstance(row, PatientSpec) else PatientSpec.from_row(row)
    image = Path(image or spec.image or f"{spec.patient}/{'dicom' if spec.format == 'dicom' else 'ct.nii.gz'}")
    mask = Path(mask or spec.mask or image.parent / "lung_mask.nii.gz")
    fmt = "nifti" if image.name.endswith((".nii", ".nii.gz")) else spec.format
    if fmt == "nifti" and not image.name.endswith((".nii", ".nii.gz")):
        raise CovidctError("a NIfTI output must end in .nii or .nii.gz", patient=spec.patient, path=image)
    t0 = time.perf_counter()
    volume, lung_mask, spacing, origin = make_patient(spec)
    t1 = time.perf_counter()
    if fmt == "dicom":
        # stored values are unsigned: the intercept puts the padding value at or above 0
        intercept = -1024.0 * max(1, math.ceil(-int(volume.min()) / 1024.0))
        header = dicom_header(spec)
        header["PixelPaddingValue"] = int(spec.padding_hu - intercept)
        with atomic_path(image) as tmp:
            write_series(volume, tmp, spacing=spacing, origin=origin, header=header,
                         rescale_intercept=intercept,
                         transfer_syntax=None if spec.transfer_syntax == "explicit" else spec.transfer_syntax,
                         uid_seed=spec.seed, reverse_z=bool(spec.reverse_z))
    else:
        img = _sitk_image(volume, spacing, origin)
        _write_file_atomic(image, lambda p: sitk.WriteImage(img, str(p), True))
    mimg = _sitk_image(lung_mask, spacing, origin)
    _write_file_atomic(mask, lambda p: sitk.WriteImage(mimg, str(p), True))
    t2 = time.perf_counter()
    lung_ml = float(lung_mask.sum()) * float(np.prod(spacing)) / 1000.0
    log.info("synth %s (%s, severity %.2f): %dx%dx%d voxels, %.2f mm slices, lungs %.0f mL; "
             "built in %.1f s, wrote %s (%s) and %s in %.1f s", spec.patient, spec.label, spec.severity,
             *volume.shape, spec.slice_mm, lung_ml, t1 - t0, image, fmt, mask, t2 - t1)
    return dict(image=str(image), mask=str(mask), shape=volume.shape, spacing=spacing, origin=origin,
                format=fmt)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def add_arguments_cohort(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="workflow config (YAML) with a `synthetic:` section")
    parser.add_argument("--out", default="results/synth/cohort.tsv", help="cohort sample sheet to write (TSV)")
    parser.add_argument("--root", default=None,
                        help="folder of the patients' scans (default: the folder of --out)")


def run_cohort(args: argparse.Namespace) -> int:
    import yaml

    path = Path(args.config)
    if not path.exists():
        raise CovidctError("config not found", path=path)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise CovidctError(f"not valid YAML: {err}".replace("\n", " "), path=path) from None
    root = args.root if args.root is not None else str(Path(args.out).parent)
    try:
        table = cohort_table(config, root=root)
    except CovidctError as err:
        raise err.with_context(path=path)
    write_cohort(table, args.out)
    summary = table.groupby(["site", "label"]).size()
    log.info("cohort: %d patients at %d sites -> %s", len(table), table["site"].nunique(), args.out)
    for (site, label), count in summary.items():
        log.info("  %-14s %-14s %3d", site, label, count)
    return 0


def add_arguments_synth(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", help="the patient's cohort row as a JSON object (what the workflow passes)")
    src.add_argument("--cohort", help="cohort table (TSV) written by `covidct cohort`; needs --patient")
    parser.add_argument("--patient", help="patient id in --cohort")
    parser.add_argument("--image", default=None,
                        help="output scan: a DICOM folder or a .nii.gz file (default: the row's image)")
    parser.add_argument("--mask", default=None,
                        help="output lung mask .nii.gz (default: the row's mask, beside the image)")


def run_synth(args: argparse.Namespace) -> int:
    if args.spec is not None:
        try:
            row = json.loads(args.spec)
        except json.JSONDecodeError as err:
            raise CovidctError(f"--spec is not a JSON object: {err}") from None
        if not isinstance(row, dict):
            raise CovidctError("--spec is not a JSON object")
        args.patient = args.patient or row.get("patient")
    else:
        if not args.patient:
            raise CovidctError("--cohort needs --patient", path=args.cohort)
        table = read_cohort(args.cohort)
        rows = table[table["patient"] == args.patient]
        if rows.empty:
            raise CovidctError("patient not in the cohort table", patient=args.patient, path=args.cohort)
        row = rows.iloc[0].to_dict()
    write_patient(row, image=args.image, mask=args.mask)
    return 0


# `covidct synth` and `covidct cohort` both live here (cli looks up add_arguments_<stage>).
add_arguments = add_arguments_synth
run = run_synth
