"""A scan as read from disk, before orientation and HU repair."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

STEP = "ingest"


@dataclass
class Scan:
    image: Any                         # SimpleITK image, values in HU (before padding repair)
    source_format: str
    n_files: int
    provenance: dict[str, Any]
    padding_hu: tuple[float, ...] = ()
    path: Path | None = None           # the file to name in later errors
