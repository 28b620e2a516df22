"""The sample sheet: one row per patient, and the site roles of the config.

Columns: patient, site, image, task (egfr | covid), label, age, sex,
comorbidity, stay_days, discharged. The Snakemake workflow validates the sheet against
``workflow/schemas/samples.schema.yaml`` first; :func:`check_sheet` adds the checks a JSON
schema cannot express (unique ids, labels that fit the task, sites the config knows).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from covidct.errors import CovidctError

COLUMNS = ("patient", "site", "image", "task", "label", "age", "sex", "comorbidity",
           "stay_days", "discharged")
LABELS = {
    "egfr": ("egfr_mutant", "egfr_wildtype"),
    "covid": ("covid", "bacterial", "viral", "mycoplasma", "fungal", "other"),
}
POSITIVE = {"egfr": "egfr_mutant", "covid": "covid"}
ROLES = ("pretrain", "train", "diagnosis", "prognosis")


def read_sheet(path: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """Read a TSV sample sheet (or several, e.g. one per site, concatenated), then type it."""
    if isinstance(path, (list, tuple)):
        if not path:
            raise CovidctError("no sample sheet given")
        return pd.concat([read_sheet(p) for p in path], ignore_index=True)
    path = Path(path)
    if not path.exists():
        raise CovidctError("sample sheet not found", path=path)
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    missing = [c for c in ("patient", "site", "image", "task", "label") if c not in df.columns]
    if missing:
        raise CovidctError(f"sample sheet lacks column(s) {', '.join(missing)}", path=path)
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = ""
    df = df.apply(lambda s: s.str.strip())
    for col in ("age", "stay_days"):
        df[col] = pd.to_numeric(df[col].replace("", None), errors="coerce")
    for col in ("comorbidity", "discharged"):
        df[col] = pd.to_numeric(df[col].replace("", None), errors="coerce").astype("Int64")
    return df


def check_sheet(df: pd.DataFrame, sites: Mapping[str, object] | Iterable[str] | None = None,
                path: str | Path | None = None) -> pd.DataFrame:
    """Raise a clear error for what the schema cannot catch; return the sheet indexed by patient."""
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
    if problems:
        raise CovidctError("invalid sample sheet:\n  " + "\n  ".join(problems), path=path)
    out = df.copy()
    out["y"] = [int(label == POSITIVE.get(task))
                for task, label in zip(out["task"], out["label"])]
    return out.set_index("patient", drop=False)


def sites_with_role(sites: Mapping[str, object], role: str) -> list[str]:
    """Sites whose config entry lists ``role`` (a string or a list of roles)."""
    found = []
    for name, entry in sites.items():
        roles = entry.get("role", entry.get("roles")) if isinstance(entry, Mapping) else entry
        roles = [roles] if isinstance(roles, str) else list(roles or [])
        if role in roles:
            found.append(name)
    return sorted(found)
