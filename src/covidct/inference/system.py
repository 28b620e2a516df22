"""A trained system: the model and everything needed to apply it to a new scan exactly as its
training scans were processed (nnU-Net's pattern: the plan travels with the model).

A system is a folder (``results/models/finetune_covid/``) holding ``model.keras`` and its ONNX
exports ``model.onnx`` and ``model.saliency.onnx`` (with the input gradient), ``run.json``,
``plan.json`` (the ingest, segmentation and ROI parameters of the training scans, the decision
and Youden thresholds, what the training data were) and, where a Cox model was fitted,
``cox.json``; with the FPN segmenter also ``segmenter.keras``.
``covidct system`` completes the folder after training; the MLflow run of the model holds the
same files under ``system/``, so a registered model version
(``models:/covidct-finetune_covid/3``) is a system too.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covidct.errors import CovidctError
from covidct.io.results import PLAN_JSON, read_plan, read_run, write_plan
from covidct.params import EvaluationParams, TrackingParams, add_options, from_args

log = logging.getLogger(__name__)

STEP = "system"
ARTIFACTS = "system"            # the MLflow run's folder of the system's files
SYNTHETIC_WARNING = ("this system was trained on the synthetic demo cohort: a plumbing check, "
                     "meaningless on real CT")


@dataclass
class System:
    """An opened trained system (its files on disk)."""

    root: Path
    plan: dict[str, Any]
    source: str

    @property
    def model(self) -> Path:
        return self.root / self.plan["model"]

    @property
    def cox(self) -> Path | None:
        return None if not self.plan.get("cox") else self.root / self.plan["cox"]

    @property
    def segmenter(self) -> Path | None:
        return None if not self.plan.get("segmenter") else self.root / self.plan["segmenter"]

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.plan["preprocessing"]

    @property
    def architecture(self) -> str | None:
        """COVID-19Net's arrangement (``authors``/``covidct``; None in plans before it)."""
        return self.plan.get("architecture")

    @property
    def synthetic(self) -> bool:
        return bool((self.plan.get("training_data") or {}).get("synthetic"))


# --------------------------------------------------------------------------- assembling

def youden_of(predictions) -> dict | None:
    """The Youden threshold of the training sites' predictions (None with one class)."""
    from covidct.analysis.stats import youden_threshold
    from covidct.io.results import read_predictions

    df = read_predictions(predictions)
    return youden_threshold(df["y"].to_numpy(), df["probability"].to_numpy())


def assemble(folder: str | Path, *, threshold: float, youden_from=(), cox: Path | None = None,
             segmenter: Path | None = None,
             tracking: TrackingParams = TrackingParams()) -> dict:
    """Complete a trained model's folder into a system: plan.json, model.onnx and
    model.saliency.onnx (the model's export for ``covidct predict``, the second with its input
    gradient), and cox.json and segmenter.keras copied in; the same files
    go to the model's MLflow run. Returns the plan."""
    from covidct.io.atomic import atomic_path, file_sha256
    from covidct.model.onnx_graph import export_onnx, saliency_onnx_path

    folder = Path(folder)
    run = read_run(folder)
    if run is None or not (folder / "model.keras").is_file():
        raise CovidctError("not a trained model's folder (model.keras and run.json)", step=STEP,
                           path=folder)
    preprocessing = run.get("preprocessing") or {}
    missing = [k for k in ("ingest", "segmentation", "roi") if not preprocessing.get(k)]
    if missing:
        raise CovidctError(f"the model's training stores do not record their {', '.join(missing)}"
                           " parameters (or disagree on them): run the stages again",
                           step=STEP, path=folder / "run.json")
    files = []
    if cox is not None:
        with atomic_path(folder / "cox.json") as tmp:
            shutil.copyfile(cox, tmp)
        files.append(folder / "cox.json")
    seg = preprocessing["segmentation"]
    if seg["method"] == "fpn":
        if segmenter is None:
            raise CovidctError("the training scans were segmented by the FPN: give --segmenter",
                               step=STEP)
        if file_sha256(segmenter) != seg.get("model_sha256"):
            raise CovidctError("the segmenter is not the one the training scans were segmented "
                               "with (content hash differs)", step=STEP, path=segmenter)
        with atomic_path(folder / "segmenter.keras") as tmp:
            shutil.copyfile(segmenter, tmp)
        files.append(folder / "segmenter.keras")
    youden = youden_of(list(youden_from)) if youden_from else None
    plan = {
        "model": "model.keras",
        "input_shape": run["input_shape"],
        "architecture": run.get("architecture"),
        "preprocessing": preprocessing,
        "evaluation": {"threshold": float(threshold),
                       "youden_threshold": None if youden is None else youden["threshold"],
                       "youden_source": [str(p) for p in youden_from]},
        "training_data": run.get("training_data"),
        "training_run": {k: run.get(k) for k in ("run_id", "tracking_uri", "model_uri",
                                                 "model_id", "registered_model", "version")},
        "cox": "cox.json" if cox is not None else None,
        "segmenter": "segmenter.keras" if seg["method"] == "fpn" else None,
    }
    from covidct import __version__

    plan["covidct_version"] = __version__
    files.append(export_onnx(folder / plan["model"]))
    files.append(saliency_onnx_path(files[-1]))
    path = write_plan(folder, plan)
    if tracking.enabled and run.get("run_id"):
        _log_to_run(tracking, run["run_id"], [path, *files])
    log.info("trained system %s: input %s, threshold %g, Youden %s, Cox %s", folder,
             "x".join(map(str, plan["input_shape"])), threshold,
             plan["evaluation"]["youden_threshold"], "yes" if cox else "no")
    return plan


def _log_to_run(tracking: TrackingParams, run_id: str, files) -> None:
    from covidct.io.tracking import client

    mlflow_client = client(tracking.tracking_uri)
    for path in files:
        mlflow_client.log_artifact(run_id, str(path), artifact_path=ARTIFACTS)


# --------------------------------------------------------------------------- opening

def open_system(source: str | Path, tracking: TrackingParams = TrackingParams(),
                cache: str | Path | None = None) -> System:
    """A system from its folder, from an MLflow model URI (``models:/NAME/VERSION``,
    ``models:/NAME@ALIAS``) downloaded into ``cache``, or from the authors' Keras 2 ``.h5``
    imported into ``cache`` as ``covidct import-weights`` does (default: a temporary folder)."""
    from covidct.model.authors import is_keras2_file
    from covidct.model.saved import is_model_uri

    if is_keras2_file(source):
        return _import(Path(source), cache)
    if not is_model_uri(source):
        root = Path(source)
        if not root.is_dir():
            raise CovidctError("trained system not found (a folder with plan.json, or an MLflow "
                               "model URI)", step=STEP, path=root)
        return System(root, read_plan(root), str(source))
    return System(*_download(str(source), tracking, cache), str(source))


def _import(h5: Path, cache) -> System:
    """The authors' weights file as a system: imported once into ``cache`` (again when the
    file's content changes)."""
    import tempfile

    from covidct.io.atomic import file_sha256
    from covidct.model.authors import import_weights

    root = Path(cache or tempfile.mkdtemp(prefix="covidct-system-"))
    digest = file_sha256(h5) if h5.is_file() else None
    if (root / PLAN_JSON).is_file():
        plan = read_plan(root)
        if digest and plan.get("training_data", {}).get("sha256") == digest:
            return System(root, plan, str(h5))
    return System(root, import_weights(h5, root), str(h5))


def _download(uri: str, tracking: TrackingParams, cache) -> tuple[Path, dict]:
    import tempfile

    import mlflow

    from covidct.io.tracking import client as tracking_client
    from covidct.model.saved import download_model

    root = Path(cache or tempfile.mkdtemp(prefix="covidct-system-"))
    model = download_model(uri, tracking, root / "model")
    client = tracking_client(tracking.tracking_uri)
    name_version = uri[len("models:/"):]
    if "@" in name_version:
        version = client.get_model_version_by_alias(*name_version.split("@", 1))
    else:
        version = client.get_model_version(*name_version.split("/", 1))
    try:
        local = Path(mlflow.artifacts.download_artifacts(
            run_id=version.run_id, artifact_path=ARTIFACTS, dst_path=str(root),
            tracking_uri=tracking.tracking_uri))
    except Exception as err:         # MLflow raises several kinds for a missing folder
        raise CovidctError(f"the MLflow run of {uri} holds no trained system (no {ARTIFACTS}/"
                           f"plan.json: was `covidct system` run?) ({err})", step=STEP) from None
    plan = read_plan(local)
    shutil.copyfile(model, local / plan["model"])
    return local, plan


# --------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path,
                        help="the trained model's folder (model.keras, run.json)")
    parser.add_argument("--threshold", type=float, default=EvaluationParams.threshold,
                        help="the decision threshold of the system (default %(default)s)")
    parser.add_argument("--youden-from", nargs="*", type=Path, default=[], metavar="CSV",
                        help="the training sites' predictions.csv: the Youden threshold")
    parser.add_argument("--cox", type=Path, default=None, help="cox.json of the prognosis")
    parser.add_argument("--segmenter", type=Path, default=None,
                        help="the FPN the training scans were segmented with")
    add_options(parser, TrackingParams)


def run(args: argparse.Namespace) -> int:
    assemble(args.folder, threshold=args.threshold, youden_from=args.youden_from, cox=args.cox,
             segmenter=args.segmenter, tracking=from_args(TrackingParams, args))
    return 0
