"""The sample sheet: one row per patient, and the site roles of the config.

Columns: patient, site, image, task (egfr | covid), label, age, sex, comorbidity, stay_days,
discharged; their rules are ``samples.schema.yaml`` beside this module. Nothing is coerced
quietly: a value that does not parse, or breaks a rule, is an error naming the file, the row (as
a spreadsheet numbers it, the header being row 1), the patient and the column. A relative image
path is taken from the sheet's own folder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from covidct.errors import CovidctError

COLUMNS = ("patient", "site", "image", "task", "label", "age", "sex", "comorbidity",
           "stay_days", "discharged")
REQUIRED = ("patient", "site", "image", "task", "label")
LABELS = {
    "egfr": ("egfr_mutant", "egfr_wildtype"),
    "covid": ("covid", "bacterial", "viral", "mycoplasma", "fungal", "normal", "other"),
}
POSITIVE = {"egfr": "egfr_mutant", "covid": "covid"}
ROLES = ("pretrain", "train", "diagnosis", "prognosis")
NUMBERS = ("age", "stay_days")
FLAGS = ("comorbidity", "discharged")
SCHEMA = Path(__file__).with_name("samples.schema.yaml")
MAX_LISTED = 20          # problems listed in one error


def _row(i: int) -> int:
    """The spreadsheet row of data row ``i`` (0-based): the header is row 1."""
    return i + 2


def _separator_hint(path: Path, header: str) -> str | None:
    if "\t" in header:
        return None
    for sep, name in ((",", "commas"), (";", "semicolons")):
        if header.count(sep) >= 2:
            return (f"the header holds {name} and no tab: is it tab-separated? (save the sheet "
                    "as TSV, one tab between columns)")
    return None


def _parse(value: str, column: str) -> float | int | None:
    """The number of one cell (None when empty); ValueError for anything else."""
    if value == "":
        return None
    number = float(value)               # ValueError for '39y', '12 days', 'yes'
    if not math.isfinite(number):
        raise ValueError(value)
    if column in FLAGS:
        if not number.is_integer():
            raise ValueError(value)
        return int(number)
    return number


def _schema_problems(df: pd.DataFrame, path: Path) -> list[str]:
    import jsonschema
    import yaml

    from covidct.io.atomic import jsonable

    validator = jsonschema.Draft202012Validator(yaml.safe_load(SCHEMA.read_text(encoding="utf-8")))
    problems = []
    for i, row in enumerate(df[list(COLUMNS)].itertuples(index=False)):
        record = jsonable({k: (None if v is pd.NA else v) for k, v in row._asdict().items()})
        for err in sorted(validator.iter_errors(record), key=lambda e: list(e.path)):
            column = err.path[0] if err.path else "?"
            problems.append(f"row {_row(i)} (patient {record['patient'] or '?'}), column "
                            f"{column}: {err.message}")
    return problems


def read_sheet(path: str | Path | Sequence[str | Path],
               sites: Mapping[str, object] | Iterable[str] | None = None) -> pd.DataFrame:
    """Read and type a TSV sample sheet (or several, e.g. one per site, concatenated).

    Every value is checked against the sheet's schema (and, with ``sites``, the rules of
    :func:`check_sheet`), every problem listed at once; image paths become absolute.
    """
    if isinstance(path, (list, tuple)):
        if not path:
            raise CovidctError("no sample sheet given")
        return pd.concat([read_sheet(p, sites) for p in path], ignore_index=True)
    path = Path(path)
    if not path.is_file():
        raise CovidctError("sample sheet not found", path=path)
    lines = [ln for ln in path.read_text(errors="replace").splitlines()
             if ln.strip() and not ln.startswith("#")]
    hint = _separator_hint(path, lines[0]) if lines else "the sheet is empty"
    if hint:
        raise CovidctError(f"cannot read the sample sheet: {hint}", path=path)
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise CovidctError(f"sample sheet lacks column(s) {', '.join(missing)} (it has "
                           f"{', '.join(df.columns)})", path=path)
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = ""
    df = df.apply(lambda s: s.str.strip())
    problems = []
    for col in NUMBERS + FLAGS:
        parsed = []
        for i, (patient, value) in enumerate(zip(df["patient"], df[col])):
            try:
                parsed.append(_parse(value, col))
            except ValueError:
                parsed.append(None)
                kind = "0 or 1" if col in FLAGS else "a number"
                problems.append(f"row {_row(i)} (patient {patient or '?'}), column {col}: "
                                f"{value!r} is not {kind}")
        df[col] = pd.array(parsed, dtype="Int64" if col in FLAGS else "Float64") \
            .astype("Int64" if col in FLAGS else float)
    problems += _schema_problems(df, path)
    if sites is not None:
        problems += sheet_problems(df, sites)
    if problems:
        listed = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"]
                                          if len(problems) > MAX_LISTED else [])
        raise CovidctError("invalid sample sheet:\n  " + "\n  ".join(listed), path=path)
    folder = path.parent
    df["image"] = [os.path.abspath(os.path.join(folder, image)) for image in df["image"]]
    return df


def sheet_problems(df: pd.DataFrame,
                   sites: Mapping[str, object] | Iterable[str] | None = None) -> list[str]:
    """What the schema of one row cannot catch: unique ids, labels that fit the task, sites
    the config knows."""
    problems = []
    dup = df["patient"][df["patient"].duplicated()].unique()
    if len(dup):
        problems.append(f"patient id(s) used more than once: {', '.join(map(str, dup))}")
    for row in df.itertuples():
        if row.task not in LABELS:
            problems.append(f"patient {row.patient}: unknown task {row.task!r} "
                            f"(expected one of {', '.join(LABELS)})")
        elif row.label not in LABELS[row.task]:
            problems.append(f"patient {row.patient}: label {row.label!r} does not fit task "
                            f"{row.task!r} (expected one of {', '.join(LABELS[row.task])})")
        if sites is not None and row.site not in sites:
            problems.append(f"patient {row.patient}: site {row.site!r} has no role in the config "
                            f"(known sites: {', '.join(sorted(sites))})")
        if not str(row.patient) or "/" in str(row.patient) or str(row.patient).startswith("."):
            problems.append(f"patient id {row.patient!r} is not usable as a folder name")
    return problems


def check_sheet(df: pd.DataFrame, sites: Mapping[str, object] | Iterable[str] | None = None,
                path: str | Path | None = None) -> pd.DataFrame:
    """Raise a clear error for what :func:`sheet_problems` finds; return the sheet indexed by
    patient, with ``y`` (1 for the task's positive label)."""
    problems = sheet_problems(df, sites)
    if problems:
        raise CovidctError("invalid sample sheet:\n  " + "\n  ".join(problems), path=path)
    out = df.copy()
    out["y"] = [int(label == POSITIVE.get(task))
                for task, label in zip(out["task"], out["label"])]
    return out.set_index("patient", drop=False)


def missing_images(df: pd.DataFrame) -> list[str]:
    """``patient: image`` for every patient whose scan is not on disk."""
    return [f"{p}: {image}" for p, image in zip(df["patient"], df["image"])
            if not Path(image).exists()]


def sites_with_role(sites: Mapping[str, object], role: str) -> list[str]:
    """Sites whose config entry lists ``role`` (a string or a list of roles)."""
    found = []
    for name, entry in sites.items():
        roles = entry.get("role", entry.get("roles")) if isinstance(entry, Mapping) else entry
        roles = [roles] if isinstance(roles, str) else list(roles or [])
        if role in roles:
            found.append(name)
    return sorted(found)
