"""How a set of patients' stores were made: the ingest, segmentation and ROI parameters their
attributes record, agreed over the stores (the preprocessing a trained system's plan repeats)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covidct.errors import CovidctError
from covidct.io.stores import open_image

log = logging.getLogger(__name__)

SECTIONS = ("ingest", "segmentation", "roi")


def store_preprocessing(roi_path: str | Path) -> dict[str, Any]:
    """One patient's preprocessing, from its roi.zarr and the ct.zarr and lung.zarr beside it.

    A section is None when its store is absent or does not record its parameters."""
    roi_path = Path(roi_path)
    roi = open_image(roi_path, what="ROI").attrs
    out: dict[str, Any] = {"roi": roi.get("params"), "segmentation": None, "ingest": None}
    lung_path, ct_path = roi_path.with_name("lung.zarr"), roi_path.with_name("ct.zarr")
    if lung_path.exists():
        lung = open_image(lung_path, what="lung mask").attrs
        method = lung.get("method")
        if method == "threshold":
            out["segmentation"] = {"method": method, "params": lung.get("params")}
        elif method == "fpn":
            out["segmentation"] = {"method": method, "model_sha256": lung.get("model_sha256"),
                                   "model": lung.get("model")}
    if ct_path.exists():
        out["ingest"] = (open_image(ct_path, what="CT").attrs.get("ingest") or {}).get("params")
    return out


def agreed_preprocessing(roi_paths: Sequence[str | Path]) -> dict[str, Any]:
    """The preprocessing all the stores share; a section on which they disagree (or that some
    do not record) is None, with a warning."""
    if not roi_paths:
        raise CovidctError("no ROI stores given")
    seen: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for path in roi_paths:
        for section, value in store_preprocessing(path).items():
            seen[section].setdefault(repr(value), (value, path))
    agreed = {}
    for section, values in seen.items():
        if len(values) == 1:
            agreed[section] = next(iter(values.values()))[0]
        else:
            agreed[section] = None
            examples = "; ".join(f"{v!r} ({p})" for v, p in list(values.values())[:2])
            log.warning("the stores disagree on their %s parameters (e.g. %s): not recorded",
                        section, examples)
    return agreed
