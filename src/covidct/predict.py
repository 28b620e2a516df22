"""Prediction with a trained COVID-19Net.

``covidct predict-site``: the COVID-19 probability and the 64-d DL feature of every patient of one
site, from the patients' ``roi.zarr`` stores, into ``results/eval/{site}/predictions.csv`` with
columns patient, site, label, y, probability, feature_0..feature_63, model.

(The single-scan ``covidct predict`` stage lives in this module too; see its own section.)
TensorFlow/Keras is imported inside the functions that need it only.
"""

from __future__ import annotations

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
