"""Prediction with a trained COVID-19Net.

``covidct predict-site``: the COVID-19 probability and the 64-d DL feature of every patient of one
site, from the patients' ``roi.zarr`` stores, into ``results/eval/{site}/predictions.csv`` with
columns patient, site, label, y, probability, feature_0..feature_63, model.

(The single-scan ``covidct predict`` stage lives in this module too; see its own section.)
TensorFlow/Keras is imported inside the functions that need it only.
"""

from __future__ import annotations

import argparse
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from covidct.errors import CovidctError
from covidct.zarrio import atomic_path, open_image

log = logging.getLogger(__name__)

FEATURE_LAYER = "dl_feature"


# --------------------------------------------------------------------------- shared helpers
def load_feature_model(path: str | Path):
    """Load a saved Keras model and wrap it to return (probability, dl_feature)."""
    import keras

    path = Path(path)
    if not path.exists():
        raise CovidctError("model file not found", path=path)
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as err:  # noqa: BLE001 - any load failure is a bad model file
        raise CovidctError(f"cannot load Keras model: {err}", path=path) from None
    try:
        feature = model.get_layer(FEATURE_LAYER)
    except ValueError:
        raise CovidctError(f"model has no layer named {FEATURE_LAYER!r}", path=path) from None
    return keras.Model(model.inputs, [model.outputs[0], feature.output]), model


def model_input_shape(model) -> tuple[int, ...]:
    """The (D, H, W) a model expects (None where it accepts any size)."""
    shape = tuple(model.inputs[0].shape)[1:]
    if len(shape) != 4 or shape[-1] != 1:
        raise CovidctError(f"model input {shape} is not (D, H, W, 1)")
    return shape[:3]


def read_roi(path: str | Path, expected: Sequence[int | None], patient: str | None = None
             ) -> np.ndarray:
    """A roi.zarr store as a float32 (D, H, W) array, checked against the model's input size."""
    path = Path(path)
    try:
        array = open_image(path).read()
    except FileNotFoundError:
        raise CovidctError("ROI store not found", patient=patient, path=path) from None
    except Exception as err:  # noqa: BLE001 - zarr raises many kinds on a broken store
        raise CovidctError(f"cannot read ROI store: {err}", patient=patient, path=path) from None
    if array.ndim != 3 or any(e is not None and e != s for e, s in zip(expected, array.shape)):
        raise CovidctError(f"ROI shape {tuple(array.shape)} does not fit the model input "
                           f"{tuple(expected)}", patient=patient, path=path)
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise CovidctError("ROI holds NaN or infinite values", patient=patient, path=path)
    return array


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --------------------------------------------------------------------------- predict-site
def patients_of_rois(rois: Sequence[str | Path]) -> list[str]:
    """Patient ids of roi stores laid out as results/patients/{site}/{patient}/roi.zarr."""
    patients = [Path(r).absolute().parent.name for r in rois]
    seen: dict[str, str] = {}
    for patient, roi in zip(patients, rois):
        if patient in seen:
            raise CovidctError(f"two ROI stores for one patient ({seen[patient]} and {roi})",
                               patient=patient, path=roi)
        seen[patient] = str(roi)
    return patients


def predict_site(model_path: str | Path, sheet: pd.DataFrame, site: str,
                 rois: Sequence[str | Path], *, batch_size: int = 4, model_name: str = "",
                 threads: int = 4) -> pd.DataFrame:
    """The predictions table of one site (see the module docstring for its columns).

    ``sheet`` is the checked sample sheet (covidct.sheet.check_sheet), indexed by patient.
    Stores are read by a thread pool one batch ahead of the network.
    """
    rois = [Path(r) for r in rois]
    patients = patients_of_rois(rois)
    for patient, roi in zip(patients, rois):
        if patient not in sheet.index:
            raise CovidctError("patient is not in the sample sheet", patient=patient, path=roi)
        if sheet.loc[patient, "site"] != site:
            raise CovidctError(f"patient belongs to site {sheet.loc[patient, 'site']!r} in the "
                               f"sample sheet, not {site!r}", patient=patient, path=roi)
    feature_model, model = load_feature_model(model_path)
    expected = model_input_shape(model)
    n_features = int(feature_model.outputs[1].shape[-1])
    log.info("site %s: %d patients, model %s (input %s), batch size %d", site, len(rois),
             model_name or Path(model_path).name, expected, batch_size)

    pairs = list(zip(patients, rois))
    probabilities = np.empty(len(pairs), dtype=np.float64)
    features = np.empty((len(pairs), n_features), dtype=np.float64)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        def submit(batch):
            return [pool.submit(read_roi, roi, expected, patient) for patient, roi in batch]

        batches = list(_batches(pairs, max(1, batch_size)))
        pending = submit(batches[0]) if batches else []
        done = 0
        for i, batch in enumerate(batches):
            arrays = [f.result() for f in pending]
            pending = submit(batches[i + 1]) if i + 1 < len(batches) else []
            x = np.stack(arrays)[..., None]
            prob, feat = feature_model.predict_on_batch(x)
            prob = np.asarray(prob, dtype=np.float64).reshape(len(batch), -1)[:, 0]
            feat = np.asarray(feat, dtype=np.float64).reshape(len(batch), -1)
            bad = ~np.isfinite(prob) | ~np.isfinite(feat).all(axis=1)
            if bad.any():
                patient, roi = batch[int(np.argmax(bad))]
                raise CovidctError("the model gave a non-finite probability or feature",
                                   patient=patient, path=roi)
            probabilities[done:done + len(batch)] = prob
            features[done:done + len(batch)] = feat
            done += len(batch)
            log.info("predicted %d/%d patients of site %s", done, len(pairs), site)

    table = pd.DataFrame({
        "patient": patients,
        "site": site,
        "label": [sheet.loc[p, "label"] for p in patients],
        "y": [int(sheet.loc[p, "y"]) for p in patients],
        "probability": probabilities,
    })
    feats = pd.DataFrame(features, columns=[f"feature_{i}" for i in range(n_features)])
    table = pd.concat([table, feats], axis=1)
    table["model"] = model_name or Path(model_path).parent.name
    return table


def add_arguments_predict_site(parser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="trained model (.keras)")
    parser.add_argument("--sheet", required=True, nargs="+", type=Path,
                        help="sample sheet(s) (TSV), e.g. the site's sheet")
    parser.add_argument("--site", required=True, help="the site these patients belong to")
    parser.add_argument("--rois", required=True, nargs="+", type=Path, metavar="ROI.zarr",
                        help="ROI stores, results/patients/{site}/{patient}/roi.zarr "
                             "(the patient id is the parent folder's name)")
    parser.add_argument("--out", required=True, type=Path, help="predictions.csv to write")
    parser.add_argument("--batch-size", type=int, default=4, help="patients per batch (4)")
    parser.add_argument("--threads", type=int, default=4, help="threads reading ROI stores (4)")
    parser.add_argument("--model-name", default="",
                        help="which model this is, e.g. finetune_covid or random_init "
                             "(default: the model file's folder name); written to column 'model'")


def run_predict_site(args) -> int:
    from covidct.sheet import check_sheet, read_sheet

    sheet = check_sheet(read_sheet(args.sheet), path=args.sheet)
    table = predict_site(args.model, sheet, args.site, args.rois, batch_size=args.batch_size,
                         model_name=args.model_name, threads=args.threads)
    with atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False)
    log.info("wrote %s (%d patients, %d COVID-19)", args.out, len(table), int(table["y"].sum()))
    return 0


# --------------------------------------------------------------------------- predict (one scan)
# ``covidct predict SCAN --model MODEL.keras``: one scan through the trained system, in memory
# (no Zarr store is written), with exactly the workflow's functions: covidct.ingest (read_scan,
# orient_lps, repair_hu), covidct.segment.threshold_lung_mask or covidct.fpn.predict_mask,
# covidct.roi.roi_from_arrays (the roi stage's own array code), the model, the Cox risk
# (covidct.prognosis.risk_from_features) and the saliency (covidct.explain.saliency).
# One JSON object goes to stdout; logs go to stderr. The JSON names the scan by its file or
# folder name only and holds no DICOM header value (ingest keeps only non-identifying fields,
# and none of them is printed here).

SCAN_STEP = "predict"


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
    import dask
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    dask.config.set(scheduler="threads", num_workers=n)
    return n


def load_ct(source: str | Path, *, min_slices: int | None = None, max_gap: float | None = None,
            spacing_tolerance: float | None = None, padding_below: float | None = None,
            air: int | None = None, rescale_intercept: float | None = None
            ) -> tuple[np.ndarray, tuple[float, float, float], dict]:
    """A DICOM folder or image file as ``(int16 HU (z, y, x) in LPS, spacing (z, y, x), info)``.

    Exactly ``covidct ingest``'s steps (:func:`covidct.ingest.load_ct`), without writing the
    store. ``info`` holds only non-identifying facts (format, number of files, size); the
    defaults are ingest's.
    """
    from covidct import ingest

    given = {"min_slices": min_slices, "max_gap": max_gap, "spacing_tolerance": spacing_tolerance,
             "padding_below": padding_below, "air": air}
    loaded = ingest.load_ct(Path(source), rescale_intercept=rescale_intercept,
                            **{k: v for k, v in given.items() if v is not None})
    ct, spacing = loaded.array, loaded.spacing
    info = {"format": loaded.source_format, "files": loaded.n_files,
            "shape_zyx": [int(s) for s in ct.shape], "spacing_mm": [round(s, 6) for s in spacing],
            "padding_voxels_replaced": loaded.n_padding}
    return ct, spacing, info


def segment_ct(ct: np.ndarray, spacing, *, method: str = "threshold",
               segmenter: str | Path | None = None) -> tuple[np.ndarray, float | None, dict]:
    """Lung mask of an in-memory CT as the segment stage computes it: ``(uint8 mask, body_ml,
    info)``; ``body_ml`` is the body volume the threshold method measures (None for fpn)."""
    from covidct import segment

    if method == "threshold":
        mask, info = segment.threshold_lung_mask(ct, spacing, segment.ThresholdParams())
        body_ml = info["body_volume_ml"]
    elif method == "fpn":
        if segmenter is None:
            raise CovidctError("--segmentation fpn needs --segmenter SEG.keras", step=SCAN_STEP)
        if not Path(segmenter).is_file():
            raise CovidctError("segmentation model not found", step=SCAN_STEP, path=segmenter)
        from covidct import fpn

        mask = np.asarray(fpn.predict_mask(ct, spacing, str(segmenter)))
        body_ml = None
        info = {"lung_volume_ml": round(float(np.count_nonzero(mask)
                                              * float(np.prod(spacing)) / 1000.0), 1)}
    else:
        raise CovidctError(f"unknown segmentation method {method!r} (threshold|fpn)",
                           step=SCAN_STEP)
    return (mask > 0).astype(np.uint8), body_ml, info


def read_cox(path: str | Path) -> dict:
    """A cox.json written by ``covidct prognosis``, checked for the keys the risk needs."""
    import json

    path = Path(path)
    try:
        cox = json.loads(path.read_text())
    except FileNotFoundError:
        raise CovidctError("Cox model file not found", step=SCAN_STEP, path=path) from None
    except (OSError, ValueError) as err:
        raise CovidctError(f"cannot read the Cox model: {err}", step=SCAN_STEP, path=path) from None
    need = ("covariates", "coefficients", "mean", "sd", "cutoff")
    missing = [k for k in need if not isinstance(cox, dict) or k not in cox]
    if missing:
        raise CovidctError(f"not a cox.json from covidct prognosis (missing {', '.join(missing)})",
                           step=SCAN_STEP, path=path)
    n = len(cox["covariates"])
    if any(len(cox[k]) != n for k in ("coefficients", "mean", "sd")):
        raise CovidctError("cox.json: covariates, coefficients, mean and sd differ in length",
                           step=SCAN_STEP, path=path)
    return cox


def keras_input_shape(path: str | Path) -> tuple[int, int, int] | None:
    """The (D, H, W) input size of a saved ``.keras`` model, read from its config.json without
    importing TensorFlow; None when it cannot be read that way (then the model tells)."""
    import json
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
        inputs = [layer for layer in config["config"]["layers"]
                  if layer.get("class_name") == "InputLayer"]
        if len(inputs) != 1:
            return None
        cfg = inputs[0]["config"]
        shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
        if len(shape) != 5 or shape[-1] != 1 or any(s is None for s in shape[1:4]):
            return None
        return tuple(int(s) for s in shape[1:4])
    except Exception:  # noqa: BLE001 - any odd file: fall back to loading the model first
        return None


def preprocess_scan(scan: str | Path, size, *, segmentation: str = "threshold",
                    segmenter: str | Path | None = None, allow_fallback: bool = False,
                    min_pixels: int = 60, ingest_options: dict | None = None,
                    lung_in_roi: bool = False, keep_arrays: bool = False,
                    antialias: bool = True) -> dict:
    """Read, segment and crop one scan: the ROI (float16, ``size``) exactly as the ingest,
    segment and roi stages would write it, with its attributes and the step timings.

    ``lung_in_roi`` adds the lung mask resized into the ROI (for the saliency picture);
    ``keep_arrays`` adds the CT and the full lung mask.
    """
    import time

    from covidct.roi import RoiRejected, SegmentationFailed, crop_to_box, roi_from_arrays

    scan = Path(scan)
    seconds = {}
    t = time.perf_counter()
    ct, spacing, scan_info = load_ct(scan, **(ingest_options or {}))
    seconds["read"] = round(time.perf_counter() - t, 3)
    log.info("read %s: %s, %d file(s), %s voxels, spacing %s mm, in %.2f s", scan.name,
             scan_info["format"], scan_info["files"], "x".join(map(str, ct.shape)),
             "x".join(f"{s:.4g}" for s in spacing), seconds["read"])
    t = time.perf_counter()
    mask, body_ml, seg_info = segment_ct(ct, spacing, method=segmentation, segmenter=segmenter)
    seconds["segment"] = round(time.perf_counter() - t, 3)
    log.info("segment (%s): lung %.0f ml in %.2f s", segmentation, seg_info["lung_volume_ml"],
             seconds["segment"])
    t = time.perf_counter()
    try:
        roi, attrs = roi_from_arrays(ct, mask, spacing, size, body_ml=body_ml,
                                     allow_fallback=allow_fallback, min_pixels=min_pixels,
                                     antialias=antialias)
    except SegmentationFailed as err:
        raise err.with_context(path=scan)
    except RoiRejected as err:
        raise CovidctError(f"fallback impossible: {err.reason}", step="roi", path=scan) from None
    seconds["roi"] = round(time.perf_counter() - t, 3)
    log.info("roi: box %s -> %s%s in %.2f s", attrs["bbox"], list(size),
             f" (FALLBACK: {attrs['reason']})" if attrs["fallback"] else "", seconds["roi"])
    out = {"roi": roi, "attrs": attrs, "input": scan_info, "seconds": seconds, "lung_roi": None}
    if lung_in_roi and not attrs["fallback"]:
        from covidct.explain import lung_mask_in_roi

        out["lung_roi"] = lung_mask_in_roi(mask, attrs["bbox"], roi.shape)
        out["ct_box"] = crop_to_box(ct, attrs["bbox"])   # for the saliency on the scan's voxels
        out["lung_box"] = crop_to_box(mask, attrs["bbox"]) != 0
    if keep_arrays:
        out["ct"], out["mask"] = ct, mask
    return out


def _preprocess_child(conn, args: tuple, kwargs: dict) -> None:
    """Body of the preprocessing process: sends ("ok", result) or ("error", fields)."""
    try:
        conn.send(("ok", preprocess_scan(*args, **kwargs)))
    except CovidctError as err:
        conn.send(("error", (err.message, err.step, err.patient, err.path)))
    except BaseException as err:  # noqa: BLE001 - reported by the parent, with the traceback
        import traceback

        conn.send(("crash", "".join(traceback.format_exception(err))))
    finally:
        conn.close()


class _Preprocessing:
    """:func:`preprocess_scan` in a forked process, so that it runs on another core while this
    process imports TensorFlow and loads the model (both hold the GIL: threads would take turns).

    The process is forked before TensorFlow is imported; it sends back only the ROI (about 8 MB at
    the paper size), its attributes and the small lung-in-ROI mask.
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
                               " out of memory?)", step=SCAN_STEP, path=scan) from None
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


def _import_and_load(model_path: Path):
    import time

    t = time.perf_counter()
    import keras  # noqa: F401 - TensorFlow start-up: timed apart from the model load

    t_import = time.perf_counter() - t
    feature_model, model = load_feature_model(model_path)
    return feature_model, model, round(t_import, 3), round(time.perf_counter() - t - t_import, 3)


def predict_scan(scan: str | Path, model_path: str | Path, *, cox_path: str | Path | None = None,
                 age: float | None = None, sex: str | None = None,
                 comorbidity: float | None = None, saliency_path: str | Path | None = None,
                 segmentation: str = "threshold", segmenter: str | Path | None = None,
                 threshold: float = 0.5, allow_fallback: bool = False, min_pixels: int = 60,
                 ingest_options: dict | None = None, parallel: bool = True,
                 return_arrays: bool = False, antialias: bool = True) -> dict:
    """Run one scan through the system; returns the JSON-ready result (see the CLI help).

    With ``parallel`` (and a ``.keras`` file whose input size can be read without TensorFlow),
    reading, segmentation and the ROI run in a forked process while this one imports
    TensorFlow and loads the model. ``return_arrays`` (in-process, not parallel) adds the
    numpy arrays under ``"_arrays"`` (ct, mask, roi, saliency) for tests and benchmarks.
    """
    import time

    from covidct import __version__

    t_start = time.perf_counter()
    scan, model_path = Path(scan), Path(model_path)
    cox = None
    if cox_path is not None:
        missing = [n for n, v in (("--age", age), ("--sex", sex), ("--comorbidity", comorbidity))
                   if v is None]
        if missing:
            raise CovidctError(f"--cox needs the clinical values {', '.join(missing)} "
                               "(the Cox model uses age, sex and comorbidity)", step=SCAN_STEP,
                               path=cox_path)
        cox = read_cox(cox_path)
    if not model_path.is_file():
        raise CovidctError("model file not found", step=SCAN_STEP, path=model_path)
    if not scan.exists():
        raise CovidctError("no such file or folder", step=SCAN_STEP, path=scan)
    pre_kwargs = dict(segmentation=segmentation, segmenter=segmenter,
                      allow_fallback=allow_fallback, min_pixels=min_pixels,
                      ingest_options=ingest_options, lung_in_roi=saliency_path is not None,
                      keep_arrays=return_arrays, antialias=antialias)

    seconds: dict[str, float] = {}
    size = None if return_arrays or not parallel else keras_input_shape(model_path)
    if size is not None:
        job = _Preprocessing(scan, size, **pre_kwargs)
        try:
            feature_model, model, seconds["model_import"], seconds["model_load"] = \
                _import_and_load(model_path)
            t = time.perf_counter()
            pre = job.result(scan)
            seconds["wait_preprocess"] = round(time.perf_counter() - t, 3)
        finally:
            job.cancel()
        if tuple(model_input_shape(model)) != tuple(size):
            raise CovidctError(f"the model's input {model_input_shape(model)} differs from its "
                               f"saved config {size}", step=SCAN_STEP, path=model_path)
    else:
        feature_model, model, seconds["model_import"], seconds["model_load"] = \
            _import_and_load(model_path)
        size = model_input_shape(model)
        if any(s is None for s in size):
            raise CovidctError(f"the model accepts any input size {tuple(size)}: the ROI size "
                               "must be fixed", step=SCAN_STEP, path=model_path)
        pre = preprocess_scan(scan, size, **pre_kwargs)
    seconds = {**pre["seconds"], **seconds}
    log.info("model %s: input %s, TensorFlow import %.2f s, load %.2f s", model_path.name,
             "x".join(map(str, size)), seconds["model_import"], seconds["model_load"])
    roi16, roi_attrs = pre["roi"], pre["attrs"]

    t = time.perf_counter()
    roi = roi16.astype(np.float32)            # what predict-site feeds: the float16 ROI as float32
    prob, feat = feature_model([roi[None, ..., None]], training=False)
    prob = float(np.asarray(prob, dtype=np.float64).ravel()[0])
    feature = np.asarray(feat, dtype=np.float64).ravel()
    if not np.isfinite(prob) or not np.isfinite(feature).all():
        raise CovidctError("the model gave a non-finite probability or feature", step=SCAN_STEP,
                           path=model_path)
    seconds["inference"] = round(time.perf_counter() - t, 3)
    label = "covid" if prob >= threshold else "non-covid"
    log.info("COVID-19 probability %.4f (threshold %g: %s) in %.2f s", prob, threshold, label,
             seconds["inference"])

    risk = group = direction = None
    if cox is not None:
        from covidct.prognosis import DIRECTION, risk_from_features

        try:
            risk, group = risk_from_features(cox, feature, age, sex, comorbidity)
        except (ValueError, KeyError, TypeError) as err:
            raise CovidctError(f"cannot score the Cox model: {err}", step=SCAN_STEP,
                               path=cox_path) from None
        direction = cox.get("direction", DIRECTION)
        log.info("risk %.4f: %s (cut-off %.4f; %s)", risk, group, float(cox["cutoff"]), direction)

    sal = None
    saliency_in_lung = None
    if saliency_path is not None:
        from covidct.explain import (plot_saliency, saliency, saliency_fraction_in_lung,
                                     saliency_on_ct)

        t = time.perf_counter()
        sal = saliency(model, roi)
        ct_sal = None
        if pre.get("ct_box") is not None:
            ct_sal = saliency_on_ct(sal, pre["ct_box"], pre["lung_box"], roi_attrs)
            saliency_in_lung = {"roi": saliency_fraction_in_lung(sal, pre["lung_roi"]),
                                "ct": saliency_fraction_in_lung(ct_sal, pre["lung_box"])}
        plot_saliency(Path(saliency_path), roi, sal,
                      f"COVID-19 probability {prob:.3f} ({label} at threshold {threshold:g})",
                      lung_mask_roi=pre["lung_roi"], ct_box=pre.get("ct_box"),
                      ct_saliency=ct_sal, lung_box=pre.get("lung_box"))
        seconds["saliency"] = round(time.perf_counter() - t, 3)
        log.info("saliency -> %s in %.2f s", saliency_path, seconds["saliency"])
    seconds["total"] = round(time.perf_counter() - t_start, 3)

    result = {
        "scan": scan.name,
        "probability": prob,
        "threshold": float(threshold),
        "prediction": label,
        "dl_feature": [float(v) for v in feature],
        "risk": risk,
        "risk_group": group,
        "risk_direction": direction,
        "clinical": None if cox is None else {"age": float(age), "sex": str(sex),
                                              "comorbidity": int(comorbidity)},
        "roi": {"bbox": roi_attrs["bbox"], "bbox_convention": roi_attrs["bbox_convention"],
                "size": roi_attrs["size"], "fallback": roi_attrs["fallback"],
                "reason": roi_attrs["reason"], "lung_volume_ml": roi_attrs["lung_volume_ml"],
                "clip_hu": roi_attrs["clip_hu"], "clamp_hu": roi_attrs["clamp_hu"],
                "antialias": roi_attrs["antialias"],
                "min_pixels": roi_attrs["rules"]["min_pixels"]},
        "input": pre["input"],
        "segmentation": segmentation,
        "saliency": None if saliency_path is None else str(saliency_path),
        "saliency_in_lung": saliency_in_lung,
        "model": str(model_path),
        "cox": None if cox_path is None else str(cox_path),
        "timing_s": seconds,
        "covidct_version": __version__,
    }
    if return_arrays:
        result["_arrays"] = {"ct": pre["ct"], "mask": pre["mask"], "roi": roi16, "saliency": sal}
    return result


def add_arguments_predict(parser) -> None:
    parser.add_argument("scan", type=Path, help="DICOM folder (searched recursively) or "
                        "NIfTI/MHA/NRRD file of one chest CT")
    parser.add_argument("--model", required=True, type=Path,
                        help="trained COVID-19Net (.keras), e.g. results/models/finetune_covid/"
                             "model.keras; the ROI size is its input size")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="probability at or above which the prediction is 'covid' "
                             "(%(default)s)")
    parser.add_argument("--cox", type=Path, default=None, metavar="COX.json",
                        help="Cox model from covidct prognosis (results/prognosis/cox.json); "
                             "needs --age, --sex and --comorbidity")
    parser.add_argument("--age", type=float, default=None, help="age in years (with --cox)")
    parser.add_argument("--sex", type=str.upper, choices=("M", "F"), default=None,
                        help="M or F (with --cox)")
    parser.add_argument("--comorbidity", type=int, choices=(0, 1), default=None,
                        help="1 = any comorbidity, 0 = none (with --cox)")
    parser.add_argument("--saliency", type=Path, default=None, metavar="OUT.png",
                        help="write the saliency picture (|d probability / d input| on three "
                             "axial ROI slices) here")
    parser.add_argument("--segmentation", choices=("threshold", "fpn"), default="threshold",
                        help="lung segmentation method (%(default)s)")
    parser.add_argument("--segmenter", type=Path, default=None, metavar="SEG.keras",
                        help="trained lung FPN for --segmentation fpn")
    parser.add_argument("--min-pixels", type=int, default=None,
                        help="reject lung boxes narrower in-plane than this many voxels "
                             "(default: as the model's training ROIs, from the run.json beside "
                             "it; else 60, the paper's)")
    parser.add_argument("--allow-fallback", action="store_true",
                        help="on a failed segmentation crop the body's bounding box instead of "
                             "failing (recorded as roi.fallback)")
    parser.add_argument("--antialias", action=argparse.BooleanOptionalAction, default=None,
                        help="anti-aliased ROI resize, as the workflow's roi.antialias; it must "
                             "match how the model's training ROIs were made (default: as "
                             "recorded in the run.json beside the model; else on)")
    parser.add_argument("--rescale-intercept", type=float, default=None,
                        help="as in covidct ingest: add this to images without any voxel below 0")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for TensorFlow, SimpleITK and dask (0 = all cores, default)")
    parser.add_argument("--sequential", dest="parallel", action="store_false",
                        help="do not read and segment the scan in a second process while "
                             "TensorFlow starts (slower; for debugging)")


ROI_DEFAULTS = {"min_pixels": 60, "antialias": True}


def roi_settings(model_path: str | Path, given: dict) -> dict:
    """The ROI settings to predict with: each one as ``given`` on the command line, else as the
    model's training ROIs were made (``roi`` in the run.json that ``covidct train`` writes beside
    model.keras), else :data:`ROI_DEFAULTS`. A given value that differs from the recorded one is
    kept, with a warning: the model never saw ROIs made that way."""
    import json

    recorded = {}
    run_json = Path(model_path).parent / "run.json"
    if run_json.is_file():
        try:
            recorded = json.loads(run_json.read_text()).get("roi") or {}
        except (OSError, ValueError, AttributeError) as err:
            log.warning("%s: unreadable (%s); ROI settings from the command line or defaults",
                        run_json, err)
    settings = {}
    for key, default in ROI_DEFAULTS.items():
        value, known = given.get(key), recorded.get(key)
        if value is None:
            settings[key] = default if known is None else known
            source = "default" if known is None else f"the model's training ROIs ({run_json})"
            log.info("ROI %s = %s, from %s", key, settings[key], source)
        else:
            settings[key] = value
            if known is not None and known != value:
                log.warning("ROI %s = %s as given, but the model's training ROIs were made "
                            "with %s (%s)", key, value, known, run_json)
    return settings


def run_predict(args) -> int:
    import contextlib
    import json
    import sys

    set_predict_threads(args.threads)
    roi = roi_settings(args.model, {"min_pixels": args.min_pixels, "antialias": args.antialias})
    # anything a library prints goes to stderr: stdout holds the JSON object only
    with contextlib.redirect_stdout(sys.stderr):
        result = predict_scan(
            args.scan, args.model, cox_path=args.cox, age=args.age, sex=args.sex,
            comorbidity=args.comorbidity, saliency_path=args.saliency,
            segmentation=args.segmentation, segmenter=args.segmenter, threshold=args.threshold,
            allow_fallback=args.allow_fallback, min_pixels=roi["min_pixels"],
            ingest_options={"rescale_intercept": args.rescale_intercept},
            parallel=args.parallel, antialias=roi["antialias"])
    sys.stdout.write(json.dumps(result, allow_nan=False) + "\n")
    sys.stdout.flush()
    return 0
