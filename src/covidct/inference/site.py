"""``covidct predict-site``: the COVID-19 probability and 64-d DL feature of every patient of a
site, from the patients' roi.zarr stores, into the site's predictions.csv."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from covidct.errors import CovidctError
from covidct.io.results import prediction_table, write_predictions
from covidct.io.stores import add_store_arguments, open_roi, store_patient, stores_for

log = logging.getLogger(__name__)


def read_roi(path: str | Path, expected: Sequence[int | None], patient: str | None = None
             ) -> np.ndarray:
    """A roi.zarr store as a float32 (D, H, W) array, checked against the model's input size."""
    array = open_roi(path, patient=patient).read()
    if any(e is not None and e != s for e, s in zip(expected, array.shape)):
        raise CovidctError(f"ROI shape {tuple(array.shape)} does not fit the model input "
                           f"{tuple(expected)}", patient=patient, path=path)
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise CovidctError("ROI holds NaN or infinite values", patient=patient, path=path)
    return array


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def patients_of_rois(rois: Sequence[str | Path]) -> list[str]:
    """The patient ids of ROI stores (each patient once)."""
    patients = [store_patient(r) for r in rois]
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
    """The predictions table of one site.

    ``sheet`` is the checked sample sheet (covidct.io.sheet.check_sheet), indexed by patient.
    Stores are read by a thread pool one batch ahead of the network.
    """
    from covidct.model.saved import load_feature_model, model_input_shape

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

    return prediction_table(patients, site, [sheet.loc[p, "label"] for p in patients],
                            [int(sheet.loc[p, "y"]) for p in patients], probabilities, features,
                            model_name or Path(model_path).parent.name)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="trained model (.keras)")
    parser.add_argument("--sheet", required=True, nargs="+", type=Path,
                        help="sample sheet(s) (TSV), e.g. the site's sheet")
    parser.add_argument("--site", required=True, help="the site these patients belong to")
    add_store_arguments(parser, "--rois", "roi", "site's roi.zarr")
    parser.add_argument("--out", required=True, type=Path, help="predictions.csv to write")
    parser.add_argument("--batch-size", type=int, default=4, help="patients per batch (4)")
    parser.add_argument("--threads", type=int, default=4, help="threads reading ROI stores (4)")
    parser.add_argument("--model-name", default="",
                        help="which model this is, e.g. finetune_covid or random_init "
                             "(default: the model file's folder name); written to column 'model'")


def run(args) -> int:
    from covidct.io.sheet import check_sheet, read_sheet

    sheet = check_sheet(read_sheet(args.sheet), path=args.sheet)
    rois = args.rois or stores_for(sheet[sheet["site"] == args.site], args.patients, "roi")
    table = predict_site(args.model, sheet, args.site, rois, batch_size=args.batch_size,
                         model_name=args.model_name, threads=args.threads)
    write_predictions(args.out, table)
    log.info("wrote %s (%d patients, %d COVID-19)", args.out, len(table), int(table["y"].sum()))
    return 0
