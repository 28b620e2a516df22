"""Atomic writes: every output is complete or absent; and a file's content hash.

A file or store is built under a hidden temporary name beside its target and renamed into place
once complete, so an interrupted job never leaves half an output behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it to ``path`` when the block succeeds.

    The temporary name keeps every suffix (``.ct.tmp-1a2b3c4d.nii.gz``), since writers such as
    SimpleITK and Keras choose the format by the file name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base, dot, suffixes = path.name.partition(".")
    tmp = path.parent / f".{base}.tmp-{uuid.uuid4().hex[:8]}{dot}{suffixes}"
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()


def jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays to Python, paths to str, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON (see :func:`jsonable`)."""
    return write_text(path, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


def write_csv(path: str | Path, table, **to_csv) -> Path:
    """A pandas table as CSV (``to_csv`` keywords: ``index``, ``sep``, ``float_format``, ...)."""
    to_csv.setdefault("index", False)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, **to_csv)
    return Path(path)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display), the one every figure
    is drawn with."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, **savefig) -> Path:
    """A matplotlib figure as PNG; the figure is closed."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **savefig)
    pyplot = sys.modules.get("matplotlib.pyplot")     # closed only where pyplot made it
    if pyplot is not None:
        pyplot.close(fig)
    return Path(path)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's content: a model file's identity in plans and exports."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
