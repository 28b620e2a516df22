"""``covidct predict``: one scan through the trained system, in memory; one JSON object on stdout.

The workflow's own functions, in order: ingest's :func:`~covidct.preprocess.ingest.load_ct`, the
segment stage's :func:`~covidct.preprocess.segment.lung_mask`, the roi stage's
:func:`~covidct.preprocess.roi.roi_from_arrays`, the model, the prognosis stage's
:func:`~covidct.analysis.scoring.risk_from_features` and the saliency. The network runs in
onnxruntime on the system's ``model.onnx`` (its export, :mod:`covidct.model.onnx_graph`), else in
Keras. Reading, segmentation and the ROI run in a forked process while this one loads the model.
The JSON names the scan by its file or folder name only and holds no DICOM header value.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from covidct.errors import CovidctError
from covidct.params import EvaluationParams, IngestParams, RoiParams

log = logging.getLogger(__name__)

STEP = "predict"
ROI_SETTINGS = ("min_pixels", "antialias")   # what run.json records of the training ROIs
RUNTIMES = ("auto", "onnx", "keras")          # auto: model.onnx where valid, else Keras


def set_predict_threads(n: int) -> int:
    """Limit every thread pool to ``n`` threads (0 = all available cores); returns n.

    Must run before TensorFlow starts (its thread pools are fixed at the first op): the
    environment variables are read when TensorFlow is imported.
    """
    import os

    if n <= 0:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:        # not Linux
            n = os.cpu_count() or 1
    for var in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "OPENBLAS_NUM_THREADS",
                "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[var] = str(n)
    os.environ["TF_NUM_INTEROP_THREADS"] = str(min(n, 2))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    return n


# --------------------------------------------------------------------------- preprocessing

def preprocess_scan(scan: str | Path, roi: RoiParams, *, segmentation: str = "threshold",
                    segmenter: str | Path | None = None, ingest: IngestParams = IngestParams(),
                    lung_in_roi: bool = False, keep_arrays: bool = False) -> dict:
    """Read, segment and crop one scan: the ROI (float16, ``roi.size``) exactly as the ingest,
    segment and roi stages would write it, with its attributes and the step timings.

    ``lung_in_roi`` adds the lung mask on the ROI grid and the CT and lung boxes (for the
    saliency); ``keep_arrays`` adds the CT and the full lung mask.
    """
    from covidct.preprocess import roi as roi_stage
    from covidct.preprocess.ingest import load_ct
    from covidct.preprocess.segment import lung_mask

    scan = Path(scan)
    seconds = {}
    t = time.perf_counter()
    ct = load_ct(scan, ingest)
    seconds["read"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    mask, seg = lung_mask(ct.array, ct.spacing, method=segmentation, model=segmenter)
    seconds["segment"] = round(time.perf_counter() - t, 3)
    log.info("segment (%s): lung %.0f ml in %.2f s", segmentation, seg["lung_volume_ml"],
             seconds["segment"])
    t = time.perf_counter()
    try:
        array, attrs = roi_stage.roi_from_arrays(ct.array, mask, ct.spacing, roi,
                                                 body_ml=seg.get("body_volume_ml"))
    except roi_stage.SegmentationFailed as err:
        err.with_context(path=scan)
        raise
    except roi_stage.RoiRejected as err:
        raise CovidctError(f"fallback impossible: {err.reason}", step="roi", path=scan) from None
    seconds["roi"] = round(time.perf_counter() - t, 3)
    log.info("roi: box %s -> %s%s in %.2f s", attrs["bbox"], list(roi.size),
             f" (FALLBACK: {attrs['reason']})" if attrs["fallback"] else "", seconds["roi"])
    out = {"roi": array, "attrs": attrs, "input": ct.summary(), "seconds": seconds,
           "lung_roi": None}
    if lung_in_roi and not attrs["fallback"]:
        out["lung_roi"] = roi_stage.lung_in_roi(mask, attrs["bbox"], array.shape).astype(bool)
        out["ct_box"] = roi_stage.crop_to_box(ct.array, attrs["bbox"])
        out["lung_box"] = roi_stage.crop_to_box(mask, attrs["bbox"]) != 0
    if keep_arrays:
        out["ct"], out["mask"] = ct.array, mask
    return out


def _preprocess_child(conn, args: tuple, kwargs: dict) -> None:
    """Body of the preprocessing process: sends ("ok", result) or ("error", fields)."""
    try:
        conn.send(("ok", preprocess_scan(*args, **kwargs)))
    except CovidctError as err:
        conn.send(("error", (err.message, err.step, err.patient, err.path)))
    except BaseException as err:      # reported by the parent, with the traceback
        import traceback

        conn.send(("crash", "".join(traceback.format_exception(err))))
    finally:
        conn.close()


class _Preprocessing:
    """:func:`preprocess_scan` in a forked process, so that it runs on another core while this
    process imports TensorFlow and loads the model (both hold the GIL: threads would take turns).

    The process is forked before TensorFlow is imported; it sends back only the ROI, its
    attributes and the boxes the saliency needs.
    """

    def __init__(self, *args, **kwargs):
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        self._recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_preprocess_child, args=(send, args, kwargs),
                                 name="covidct-preprocess", daemon=True)
        self._proc.start()
        send.close()

    def result(self, scan: Path) -> dict:
        try:
            kind, payload = self._recv.recv()
        except EOFError:
            self._proc.join()
            raise CovidctError(f"the preprocessing process died (exit code {self._proc.exitcode};"
                               " out of memory?)", step=STEP, path=scan) from None
        finally:
            self._recv.close()
        self._proc.join()
        if kind == "error":
            message, step, patient, path = payload
            raise CovidctError(message, step=step, patient=patient, path=path)
        if kind == "crash":
            raise RuntimeError(f"preprocessing failed:\n{payload}")
        return payload

    def cancel(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join()


# --------------------------------------------------------------------------- the model

def _threads() -> int:
    """The thread count :func:`set_predict_threads` chose (0 when it was not called)."""
    import os

    return int(os.environ.get("OMP_NUM_THREADS", 0))


def load_model(model_path: Path, seconds: dict, runtime: str = "auto",
               saliency: bool = False) -> tuple:
    """``(feature_model, keras_model, input_size, runtime)``: the model's ONNX export in
    onnxruntime (with its input gradient for ``saliency``) where ``runtime`` (auto, onnx, keras)
    allows and a valid one lies beside it, else the Keras model (``keras_model`` is None under
    onnxruntime). The backend's import and the load are timed apart."""
    from covidct.model.saved import load_feature_model, model_input_shape

    if runtime not in RUNTIMES:
        raise CovidctError(f"unknown runtime {runtime!r} (one of {', '.join(RUNTIMES)})",
                           step=STEP)
    if runtime != "keras":
        t = time.perf_counter()
        from covidct.model.onnx_graph import onnx_beside, onnx_path

        exported = onnx_beside(model_path, _threads(), saliency)
        if exported is not None:
            seconds["model_import"], seconds["model_load"] = 0.0, round(
                time.perf_counter() - t, 3)
            return exported, None, exported.input_shape, "onnx"
        if runtime == "onnx":
            raise CovidctError(f"--runtime onnx: no valid {onnx_path(model_path).name} beside "
                               "the model (see the log above)", step=STEP, path=model_path)
    t = time.perf_counter()
    import keras  # noqa: F401  (the backend's start-up, timed on its own)

    seconds["model_import"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    feature_model, model = load_feature_model(model_path)
    seconds["model_load"] = round(time.perf_counter() - t, 3)
    return feature_model, model, model_input_shape(model), "keras"


def import_picture_modules(seconds: dict) -> None:
    """Import what the saliency picture is drawn with (matplotlib, scipy.ndimage), timed: done
    while the scan is still being preprocessed, it costs no wall time."""
    t = time.perf_counter()
    import scipy.ndimage  # noqa: F401

    import covidct.explain.figures
    import covidct.explain.saliency  # noqa: F401
    from covidct.io.atomic import pyplot

    pyplot()
    seconds["picture_import"] = round(time.perf_counter() - t, 3)


def model_and_roi(scan: Path, model_path: Path, roi: RoiParams, *, parallel: bool,
                  keep_arrays: bool, runtime: str = "auto", saliency: bool = False,
                  **preprocess) -> tuple:
    """``(feature_model, keras_model, runtime, preprocessed, seconds)``: the model loaded and the
    scan preprocessed at the model's input size, side by side where the size can be read
    first."""
    from covidct.model.saved import keras_input_shape

    seconds: dict[str, float] = {}
    size = None if keep_arrays or not parallel else keras_input_shape(model_path)
    if size is not None:
        job = _Preprocessing(scan, replace(roi, size=tuple(size)),
                             keep_arrays=keep_arrays, **preprocess)
        try:
            feature_model, model, loaded, runtime = load_model(model_path, seconds, runtime,
                                                               saliency)
            if saliency:
                import_picture_modules(seconds)
            t = time.perf_counter()
            pre = job.result(scan)
            seconds["wait_preprocess"] = round(time.perf_counter() - t, 3)
        finally:
            job.cancel()
        if tuple(loaded) != tuple(size):
            raise CovidctError(f"the model's input {tuple(loaded)} differs from its saved "
                               f"config {size}", step=STEP, path=model_path)
    else:
        feature_model, model, size, runtime = load_model(model_path, seconds, runtime, saliency)
        if any(s is None for s in size):
            raise CovidctError(f"the model accepts any input size {tuple(size)}: the ROI size "
                               "must be fixed", step=STEP, path=model_path)
        pre = preprocess_scan(scan, replace(roi, size=tuple(size)),
                              keep_arrays=keep_arrays, **preprocess)
    log.info("model %s in %s: input %s, backend import %.2f s, load %.2f s", model_path.name,
             runtime, "x".join(map(str, size)), seconds["model_import"], seconds["model_load"])
    return feature_model, model, runtime, pre, {**pre["seconds"], **seconds}


def classify(feature_model, roi16: np.ndarray, model_path: Path) -> tuple:
    """``(probability, dl_feature, saliency or None)`` of one ROI (Keras or onnxruntime): the
    saliency comes with an ONNX model loaded with its gradient."""
    from covidct.model.onnx_graph import OnnxFeatureModel

    roi = roi16.astype(np.float32)   # what predict-site feeds: float16 as float32
    grad = None
    if isinstance(feature_model, OnnxFeatureModel) and feature_model.saliency:
        prob, feat, grad = feature_model.with_saliency(roi)
    elif isinstance(feature_model, OnnxFeatureModel):
        prob, feat = feature_model(roi[None, ..., None])
    else:
        prob, feat = feature_model([roi[None, ..., None]], training=False)
    prob = float(np.asarray(prob, dtype=np.float64).ravel()[0])
    feature = np.asarray(feat, dtype=np.float64).ravel()
    if not np.isfinite(prob) or not np.isfinite(feature).all():
        raise CovidctError("the model gave a non-finite probability or feature", step=STEP,
                           path=model_path)
    return prob, feature, grad


def read_cox_for(cox_path: Path, age, sex, comorbidity) -> dict:
    """The Cox model, once the clinical values it needs are known to be given."""
    from covidct.io.results import read_cox

    missing = [n for n, v in (("--age", age), ("--sex", sex), ("--comorbidity", comorbidity))
               if v is None]
    if missing:
        raise CovidctError(f"--cox needs the clinical values {', '.join(missing)} "
                           "(the Cox model uses age, sex and comorbidity)", step=STEP,
                           path=cox_path)
    try:
        return read_cox(cox_path)
    except CovidctError as err:
        err.with_context(step=STEP)
        raise


def risk_of(cox: dict, feature: np.ndarray, age, sex, comorbidity, cox_path: Path) -> dict:
    from covidct.analysis.scoring import DIRECTION, risk_from_features

    try:
        risk, group = risk_from_features(cox, feature, age, sex, comorbidity)
    except (ValueError, KeyError, TypeError) as err:
        raise CovidctError(f"cannot score the Cox model: {err}", step=STEP,
                           path=cox_path) from None
    direction = cox.get("direction", DIRECTION)
    log.info("risk %.4f: %s (cut-off %.4f; %s)", risk, group, float(cox["cutoff"]), direction)
    return {"risk": risk, "risk_group": group, "risk_direction": direction}


def saliency_picture(sal: np.ndarray, roi16: np.ndarray, pre: dict, path: Path,
                     title: str) -> dict | None:
    """The picture of the saliency ``sal`` of the ROI at ``path``; returns the in-lung fractions
    (None without the CT box)."""
    from covidct.explain.figures import plot_saliency
    from covidct.explain.saliency import saliency_fraction_in_lung, saliency_on_ct

    roi = roi16.astype(np.float32)
    ct_sal = fractions = None
    if pre.get("ct_box") is not None:
        ct_sal = saliency_on_ct(sal, pre["ct_box"], pre["lung_box"], pre["attrs"])
        fractions = {"roi": saliency_fraction_in_lung(sal, pre["lung_roi"]),
                     "ct": saliency_fraction_in_lung(ct_sal, pre["lung_box"])}
    plot_saliency(path, roi, sal, title, lung_mask_roi=pre["lung_roi"],
                  ct_box=pre.get("ct_box"), ct_saliency=ct_sal, lung_box=pre.get("lung_box"))
    return fractions


def predict_scan(scan: str | Path, model_path: str | Path, *, cox_path: str | Path | None = None,
                 age: float | None = None, sex: str | None = None,
                 comorbidity: float | None = None, saliency_path: str | Path | None = None,
                 segmentation: str = "threshold", segmenter: str | Path | None = None,
                 threshold: float = EvaluationParams.threshold, roi: RoiParams = RoiParams(),
                 ingest: IngestParams = IngestParams(), parallel: bool = True,
                 runtime: str = "auto", return_arrays: bool = False) -> dict:
    """Run one scan through the system; returns the JSON-ready result (see the CLI help).

    ``roi`` gives the ROI settings (its size is the model's input size, whatever ``roi.size``).
    ``runtime`` (see :data:`RUNTIMES`): for a saliency picture onnxruntime runs the export with
    its input gradient (:mod:`covidct.model.onnx_gradient`), Keras its own automatic
    differentiation.
    ``return_arrays`` (in-process, not parallel) adds the numpy arrays under ``"_arrays"``
    (ct, mask, roi, saliency) for tests and benchmarks.
    """
    from covidct import __version__

    t_start = time.perf_counter()
    scan, model_path = Path(scan), Path(model_path)
    cox = None if cox_path is None else read_cox_for(Path(cox_path), age, sex, comorbidity)
    if not model_path.is_file():
        raise CovidctError("model file not found", step=STEP, path=model_path)
    if not scan.exists():
        raise CovidctError("no such file or folder", step=STEP, path=scan)
    feature_model, model, runtime, pre, seconds = model_and_roi(
        scan, model_path, roi, parallel=parallel, keep_arrays=return_arrays, runtime=runtime,
        saliency=saliency_path is not None,
        segmentation=segmentation, segmenter=segmenter, ingest=ingest,
        lung_in_roi=saliency_path is not None)
    roi16, roi_attrs = pre["roi"], pre["attrs"]

    t = time.perf_counter()
    prob, feature, sal = classify(feature_model, roi16, model_path)
    seconds["inference"] = round(time.perf_counter() - t, 3)
    label = "covid" if prob >= threshold else "non-covid"
    log.info("COVID-19 probability %.4f (threshold %g: %s) in %.2f s", prob, threshold, label,
             seconds["inference"])
    risk = {"risk": None, "risk_group": None, "risk_direction": None} if cox is None \
        else risk_of(cox, feature, age, sex, comorbidity, Path(cox_path))

    fractions = None
    if saliency_path is not None:
        t = time.perf_counter()
        if sal is None:
            from covidct.explain.saliency import saliency

            sal = saliency(model, roi16.astype(np.float32))
        fractions = saliency_picture(
            sal, roi16, pre, Path(saliency_path),
            f"COVID-19 probability {prob:.3f} ({label} at threshold {threshold:g})")
        seconds["saliency"] = round(time.perf_counter() - t, 3)
        log.info("saliency -> %s in %.2f s", saliency_path, seconds["saliency"])
    seconds["total"] = round(time.perf_counter() - t_start, 3)

    result = {
        "scan": scan.name, "probability": prob, "threshold": float(threshold),
        "prediction": label, "dl_feature": [float(v) for v in feature], **risk,
        "clinical": None if cox is None else {"age": float(age), "sex": str(sex),
                                              "comorbidity": int(comorbidity)},
        "roi": {"bbox": roi_attrs["bbox"], "bbox_convention": roi_attrs["bbox_convention"],
                "size": roi_attrs["size"], "fallback": roi_attrs["fallback"],
                "reason": roi_attrs["reason"], "lung_volume_ml": roi_attrs["lung_volume_ml"],
                "clip_hu": roi_attrs["clip_hu"], "clamp_hu": roi_attrs["clamp_hu"],
                "antialias": roi_attrs["antialias"],
                "min_pixels": roi_attrs["rules"]["min_pixels"]},
        "input": pre["input"], "segmentation": segmentation,
        "saliency": None if saliency_path is None else str(saliency_path),
        "saliency_in_lung": fractions, "model": str(model_path),
        "cox": None if cox_path is None else str(cox_path), "runtime": runtime,
        "timing_s": seconds, "covidct_version": __version__,
    }
    if return_arrays:
        result["_arrays"] = {"ct": pre["ct"], "mask": pre["mask"], "roi": roi16, "saliency": sal}
    return result


# --------------------------------------------------------------------------- command line

@dataclass
class Settings:
    """What ``covidct predict`` runs with: the system's plan with the command line's overrides."""

    model: Path
    roi: RoiParams
    ingest: IngestParams
    segmentation: str
    segmenter: Path | None
    threshold: float
    cox: Path | None
    system: dict | None


def _override(name: str, given, planned, source: str):
    """``given`` where set (warning when the plan says otherwise), else the planned value."""
    if given is None:
        return planned
    if planned is not None and given != planned:
        log.warning("%s = %s as given, but %s says the training ROIs were made with %s: the "
                    "model never saw scans processed that way", name, given, source, planned)
    return given


def settings_from_plan(args) -> Settings:
    """The settings of ``--system``: every value from the plan, a flag overriding it."""
    from covidct.inference.system import SYNTHETIC_WARNING, open_system
    from covidct.params import ThresholdParams, TrackingParams, from_config

    system = open_system(args.system, TrackingParams(args.tracking_uri, args.experiment))
    pre, source = system.preprocessing, system.source
    seg = pre["segmentation"]
    roi = from_config(RoiParams, pre["roi"])
    roi = replace(roi, min_pixels=_override("--min-pixels", args.min_pixels, roi.min_pixels,
                                            source),
                  antialias=_override("--antialias", args.antialias, roi.antialias, source),
                  allow_fallback=_override("--allow-fallback", args.allow_fallback or None,
                                           roi.allow_fallback, source))
    ingest = from_config(IngestParams, pre["ingest"])
    ingest = replace(ingest, rescale_intercept=_override(
        "--rescale-intercept", args.rescale_intercept, ingest.rescale_intercept, source))
    method = _override("--segmentation", args.segmentation, seg["method"], source)
    if method == "threshold" and seg["method"] == "threshold":
        from_config(ThresholdParams, seg.get("params"))      # the plan's parameters are valid
    if system.synthetic:
        log.warning(SYNTHETIC_WARNING)
    cox = _override("--cox", args.cox, system.cox, source)
    clinical = (args.age, args.sex, args.comorbidity)
    if args.cox is None and cox is not None and None in clinical:
        log.info("the system's Cox model needs --age, --sex and --comorbidity: no risk group")
        cox = None
    return Settings(
        model=system.model, roi=roi, ingest=ingest, segmentation=method,
        segmenter=_override("--segmenter", args.segmenter, system.segmenter, source),
        threshold=_override("--threshold", args.threshold,
                            system.plan["evaluation"]["threshold"], source),
        cox=cox,
        system={"source": source, "training_data": system.plan.get("training_data"),
                "youden_threshold": system.plan["evaluation"].get("youden_threshold"),
                **({"warning": SYNTHETIC_WARNING} if system.synthetic else {})})


def settings_from_model(args) -> Settings:
    """The settings of ``--model``: the ROI as the run.json beside it records, else defaults."""
    from covidct.io.results import read_run

    try:
        run = read_run(args.model) or {}
    except CovidctError as err:
        log.warning("%s; ROI settings from the command line or defaults", err)
        run = {}
    recorded = (run.get("preprocessing") or {}).get("roi") or {}
    source = run.get("_path", "run.json")
    if run and not recorded:
        log.warning("%s records no ROI settings of the training data: the defaults (or the "
                    "command line) apply", source)
    elif recorded:
        log.info("ROI settings from the model's training ROIs (%s): %s", source,
                 {k: recorded.get(k) for k in ROI_SETTINGS})
    roi = {}
    for key in ROI_SETTINGS:
        given, known = getattr(args, key), recorded.get(key)
        roi[key] = _override(f"--{key.replace('_', '-')}", given, known, source)
        if roi[key] is None:
            roi[key] = getattr(RoiParams, key)
    return Settings(model=args.model, roi=RoiParams(allow_fallback=args.allow_fallback, **roi),
                    ingest=IngestParams(rescale_intercept=args.rescale_intercept),
                    segmentation=args.segmentation or "threshold", segmenter=args.segmenter,
                    threshold=EvaluationParams.threshold if args.threshold is None
                    else args.threshold, cox=args.cox, system=None)


def add_arguments(parser) -> None:
    from covidct.params import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI

    parser.add_argument("scan", type=Path, help="DICOM folder (searched recursively) or "
                        "NIfTI/MHA/NRRD file of one chest CT")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--system", default=None, metavar="DIR|MODEL_URI|FILE.h5",
                      help="a trained system: its folder (results/models/finetune_covid), a "
                           "registered model (models:/covidct-finetune_covid/1, ...@ALIAS) or "
                           "the authors' myDenseNetv2_COVID-19.h5 (imported on the fly); the "
                           "scan is processed as its plan says, and a flag below overrides the "
                           "plan only with a warning")
    what.add_argument("--model", type=Path, default=None,
                      help="a trained COVID-19Net (.keras) alone; the ROI as the run.json beside "
                           "it records, the rest from the flags")
    parser.add_argument("--threshold", type=float, default=None,
                        help="probability at or above which the prediction is 'covid' (default: "
                             f"the system's; else {EvaluationParams.threshold})")
    parser.add_argument("--cox", type=Path, default=None, metavar="COX.json",
                        help="Cox model (default: the system's cox.json); needs --age, --sex "
                             "and --comorbidity")
    parser.add_argument("--age", type=float, default=None, help="age in years (with --cox)")
    parser.add_argument("--sex", type=str.upper, choices=("M", "F"), default=None,
                        help="M or F (with --cox)")
    parser.add_argument("--comorbidity", type=int, choices=(0, 1), default=None,
                        help="1 = any comorbidity, 0 = none (with --cox)")
    parser.add_argument("--saliency", type=Path, default=None, metavar="OUT.png",
                        help="write the saliency picture (|d probability / d input| on three "
                             "axial ROI slices) here")
    parser.add_argument("--segmentation", choices=("threshold", "fpn"), default=None,
                        help="lung segmentation method (default: the system's; else threshold)")
    parser.add_argument("--segmenter", type=Path, default=None, metavar="SEG.keras",
                        help="trained lung FPN for --segmentation fpn (default: the system's)")
    parser.add_argument("--min-pixels", type=int, default=None,
                        help="reject lung boxes narrower in-plane than this many voxels "
                             f"(default: as the training ROIs; else {RoiParams.min_pixels})")
    parser.add_argument("--allow-fallback", action="store_true",
                        help="on a failed segmentation crop the body's bounding box instead of "
                             "failing (recorded as roi.fallback)")
    parser.add_argument("--antialias", action=argparse.BooleanOptionalAction, default=None,
                        help="anti-aliased ROI resize (default: as the training ROIs)")
    parser.add_argument("--rescale-intercept", type=float, default=None,
                        help="as in covidct ingest: add this to images without any voxel below 0")
    parser.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI,
                        help="the MLflow tracking server of a --system model URI "
                             "(default %(default)s)")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for onnxruntime, TensorFlow, SimpleITK and the "
                             "segmentation's slabs (0 = all cores, default)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="where the network runs: onnxruntime on the system's model.onnx "
                             "(starts in well under a second), or Keras; auto (default) takes "
                             "model.onnx where it is the model's export (with --saliency too: "
                             "it adds the network's gradient to the graph)")
    parser.add_argument("--sequential", dest="parallel", action="store_false",
                        help="do not read and segment the scan in a second process while "
                             "the model loads (slower; for debugging)")


def run(args) -> int:
    import contextlib
    import json
    import sys

    set_predict_threads(args.threads)
    settings = settings_from_plan(args) if args.system else settings_from_model(args)
    # anything a library prints goes to stderr: stdout holds the JSON object only
    with contextlib.redirect_stdout(sys.stderr):
        result = predict_scan(
            args.scan, settings.model, cox_path=settings.cox, age=args.age, sex=args.sex,
            comorbidity=args.comorbidity, saliency_path=args.saliency,
            segmentation=settings.segmentation, segmenter=settings.segmenter,
            threshold=settings.threshold, roi=settings.roi, ingest=settings.ingest,
            parallel=args.parallel, runtime=args.runtime)
    result["system"] = settings.system
    sys.stdout.write(json.dumps(result, allow_nan=False) + "\n")
    sys.stdout.flush()
    return 0
