"""``covidct explain``: saliency maps, filter patterns and the PCA of the DL feature (Figures 4-5).

Outputs (under ``--out-dir``)::

    saliency/{site}_{patient}.png      overlays for the sampled COVID-19 patients
    saliency_in_lung.csv               site, patient, fraction, lung_volume_fraction,
                                       fraction_ct, lung_volume_fraction_ct
    saliency_in_lung_by_site.csv       the same, averaged per site
    filters_{layer}.png, filters.csv   filter patterns; activation before/after per filter
    feature_pca.png, feature_pca.csv   the PCA figure and coordinates
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covidct.errors import CovidctError
from covidct.io.atomic import write_csv
from covidct.io.results import read_predictions
from covidct.io.stores import add_store_arguments, stores_for
from covidct.params import ExplainParams, TrackingParams, add_options, from_args

log = logging.getLogger(__name__)

FRACTION_COLUMNS = ("site", "patient", "fraction", "lung_volume_fraction", "fraction_ct",
                    "lung_volume_fraction_ct")


@dataclass
class PatientStores:
    """One patient's stores: the ROI, its lung mask and CT (these two may be absent)."""

    roi: Path
    lung: Path
    ct: Path


def patient_stores(rois: Sequence[Path], lungs: Sequence[Path] | None = None,
                   cts: Sequence[Path] | None = None) -> dict[str, PatientStores]:
    """The stores of each patient, by the ROI's patient id; lung.zarr and ct.zarr default to
    the ones beside each roi.zarr."""
    from covidct.io.stores import store_patient

    for name, given in (("--lungs", lungs), ("--cts", cts)):
        if given and len(given) != len(rois):
            raise CovidctError(f"{name} gives {len(given)} stores for {len(rois)} --rois")
    lungs = lungs or [Path(r).parent / "lung.zarr" for r in rois]
    cts = cts or [Path(r).parent / "ct.zarr" for r in rois]
    return {store_patient(r): PatientStores(Path(r), Path(lung), Path(ct))
            for r, lung, ct in zip(rois, lungs, cts)}


def sample_patients(preds: pd.DataFrame, available: set[str], n_per_site: int,
                    seed: int) -> dict[str, list[str]]:
    """Seeded sample of ``n_per_site`` COVID-19 patients with an ROI, per site (sorted ids)."""
    rng = np.random.default_rng(seed)
    chosen = {}
    for site in dict.fromkeys(preds["site"]):
        pool = sorted(p for p in preds.loc[(preds["site"] == site) & (preds["y"].astype(int) == 1),
                                           "patient"] if p in available)
        k = min(max(int(n_per_site), 0), len(pool))
        chosen[site] = sorted(rng.choice(pool, size=k, replace=False).tolist()) if k else []
    return chosen


def saliency_of(model) -> Callable[[np.ndarray], np.ndarray]:
    """``roi -> d p / d roi``: the model translated to ONNX with its input gradient, in
    onnxruntime (:mod:`covidct.model.onnx_gradient`), else where it has no translation Keras's
    automatic differentiation; the log says which."""
    import os

    from covidct.explain.saliency import saliency
    from covidct.model.onnx_graph import OnnxFeatureModel

    try:
        translated = OnnxFeatureModel.of_keras(
            model, int(os.environ.get("OMP_NUM_THREADS", 0)), saliency=True)
    except (CovidctError, ImportError) as err:
        log.info("saliency by the Keras backend's automatic differentiation (no ONNX "
                 "translation: %s)", err)
        return lambda roi: saliency(model, roi)
    log.info("saliency by onnxruntime on the model's ONNX translation with its input gradient")
    return lambda roi: translated.with_saliency(roi)[2]


def explain_patient(gradient: Callable[[np.ndarray], np.ndarray], site: str, patient: str,
                    stores: PatientStores, figure: Path | None,
                    params: ExplainParams) -> dict | None:
    """The saliency (``gradient`` of the ROI, see :func:`saliency_of`) of one patient: its
    in-lung fractions (None without a lung mask) and, with ``figure``, the overlay picture."""
    from covidct.explain.figures import plot_saliency
    from covidct.explain.saliency import saliency_fraction_in_lung, saliency_on_ct
    from covidct.io.stores import open_image, open_roi, read_label, roi_box
    from covidct.preprocess.roi import crop_to_box, lung_in_roi

    roi_img = open_roi(stores.roi, patient=patient)
    roi = roi_img.read().astype(np.float32)
    grad = gradient(roi)
    lung_img = open_image(stores.lung, what="lung mask", patient=patient) \
        if stores.lung.exists() else None
    mask = read_label(stores.roi, "lung")
    try:
        if mask is None and lung_img is not None:          # stores from before the lung label
            mask = lung_in_roi(lung_img.array, roi_box(roi_img.attrs), roi.shape)
        row = {"site": site, "patient": patient}
        if mask is not None:
            mask = mask.astype(bool)
            row.update(fraction=saliency_fraction_in_lung(grad, mask),
                       lung_volume_fraction=float(mask.mean()))
        ct_box = lung_box = ct_grad = None
        if lung_img is not None and stores.ct.exists() and not roi_img.attrs.get("fallback"):
            bbox = roi_box(roi_img.attrs)
            ct_box = crop_to_box(open_image(stores.ct, what="CT", patient=patient).array, bbox)
            lung_box = crop_to_box(lung_img.array, bbox) != 0
            ct_grad = saliency_on_ct(grad, ct_box, lung_box, roi_img.attrs)
            row.update(fraction_ct=saliency_fraction_in_lung(ct_grad, lung_box),
                       lung_volume_fraction_ct=float(lung_box.mean()))
    except (KeyError, ValueError) as err:
        raise CovidctError(f"cannot place the saliency in the lung: {err}", patient=patient,
                           path=stores.roi) from err
    if figure is not None:
        plot_saliency(figure, roi, grad, f"{site} / {patient}: |gradient of p(COVID-19)|",
                      sigma=params.smooth_sigma, lung_mask_roi=mask, ct_box=ct_box,
                      ct_saliency=ct_grad, lung_box=lung_box)
    if mask is None and ct_grad is None:
        log.warning("no lung mask for patient %s (%s): no in-lung fraction", patient,
                    stores.lung)
        return None
    log.info("saliency %s %s: %s of |d p / d ROI| and %s of |d p / d HU| inside the lung",
             site, patient, _pct(row.get("fraction")), _pct(row.get("fraction_ct")))
    return row


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def filter_pattern_figures(model, params: ExplainParams, out: Path, model_path: Path
                           ) -> tuple[list[str], pd.DataFrame]:
    """Filter patterns of the configured layers: their figures and the activations table."""
    from covidct.explain.figures import plot_filters
    from covidct.explain.filters import conv_layers, default_layers, filter_patterns

    layers = [name for name in (params.layers or default_layers(model)) if name.lower() != "none"]
    rows = []
    for li, name in enumerate(layers, 1):
        try:
            channels = int(model.get_layer(name).output.shape[-1])
        except ValueError as err:
            raise CovidctError(f"the model has no layer {name!r} (convolutions: "
                               f"{', '.join(conv_layers(model))})", path=model_path) from err
        filters = list(range(min(int(params.filters_per_layer), channels)))
        patterns, start, end = filter_patterns(
            model, name, filters, steps=params.steps, step_size=params.step_size,
            seed=params.seed + li, input_shape=params.pattern_shape)
        plot_filters(out / f"filters_{name}.png", name, patterns, filters, start, end)
        rows += [{"layer": name, "filter": f, "activation_noise": a0, "activation_pattern": a1}
                 for f, a0, a1 in zip(filters, start, end)]
        log.info("filter patterns %d/%d: layer %s, %d filters, mean activation %.4g -> %.4g",
                 li, len(layers), name, len(filters), float(start.mean()), float(end.mean()))
    return layers, pd.DataFrame(rows, columns=["layer", "filter", "activation_noise",
                                               "activation_pattern"])


def explain(model_path: Path, predictions: Sequence[Path], stores: dict[str, PatientStores],
            out: Path, params: ExplainParams = ExplainParams(),
            tracking: TrackingParams = TrackingParams(), config=None) -> pd.DataFrame:
    """Every explanation of the model into ``out``; returns the per-site saliency table."""
    import keras

    from covidct.explain.features import feature_pca
    from covidct.explain.figures import plot_feature_pca

    preds = read_predictions(predictions)
    if not Path(model_path).exists():
        raise CovidctError("model file not found", path=model_path)
    model = keras.models.load_model(model_path, compile=False)
    log.info("model %s loaded (%s backend), input %s", model_path, keras.backend.backend(),
             tuple(model.inputs[0].shape))

    sample = sample_patients(preds, set(stores), params.n_per_site, params.seed)
    covid = preds[preds["y"].astype(int) == 1]
    targets = sample if params.fraction_for == "sample" else {
        s: sorted(p for p in covid.loc[covid["site"] == s, "patient"] if p in stores)
        for s in sample}
    gradient = saliency_of(model)
    rows = []
    for site, patients in targets.items():
        if not patients:
            log.warning("site %s: no COVID-19 patient with an ROI store: no saliency", site)
        for patient in patients:
            figure = out / "saliency" / f"{site}_{patient}.png" \
                if patient in sample.get(site, []) else None
            row = explain_patient(gradient, site, patient, stores[patient], figure, params)
            if row is not None:
                rows.append(row)
    fractions = pd.DataFrame(rows, columns=list(FRACTION_COLUMNS))
    by_site = (fractions.groupby("site", sort=False)
               .agg(n=("patient", "size"), mean_fraction=("fraction", "mean"),
                    mean_lung_volume_fraction=("lung_volume_fraction", "mean"),
                    mean_fraction_ct=("fraction_ct", "mean"),
                    mean_lung_volume_fraction_ct=("lung_volume_fraction_ct", "mean"))
               .reset_index())
    write_csv(out / "saliency_in_lung.csv", fractions, float_format="%.6g")
    write_csv(out / "saliency_in_lung_by_site.csv", by_site, float_format="%.6g")

    layers, filters = filter_pattern_figures(model, params, out, Path(model_path))
    write_csv(out / "filters.csv", filters)

    coords, ratio = feature_pca(preds)
    plot_feature_pca(out / "feature_pca.png", coords, ratio)
    write_csv(out / "feature_pca.csv", coords, float_format="%.6g")
    log.info("feature PCA: %d patients, explained variance %.1f%% + %.1f%%", len(coords),
             100 * ratio[0], 100 * ratio[1])

    if tracking.enabled:
        _track(tracking, params, model_path, out, by_site, ratio, layers, config)
    return by_site


def _track(tracking: TrackingParams, params: ExplainParams, model_path: Path, out: Path,
           by_site: pd.DataFrame, ratio, layers, config) -> None:
    import mlflow

    from covidct.io.tracking import mlflow_run

    logged = {"model": str(model_path), "n_per_site": params.n_per_site, "seed": params.seed,
              "layers": ", ".join(layers), "steps": params.steps, "step_size": params.step_size,
              "smooth_sigma": params.smooth_sigma, "fraction_for": params.fraction_for}
    with mlflow_run(tracking, "explain", params=logged, config=config,
                    tags={"covidct.rule": "explain"}):
        metrics = {"pca_explained_variance_1": float(ratio[0]),
                   "pca_explained_variance_2": float(ratio[1])}
        for r in by_site.itertuples():
            site = re.sub(r"[^\w\-.]", "_", str(r.site))
            if np.isfinite(r.mean_fraction):
                metrics[f"saliency_in_lung_{site}"] = float(r.mean_fraction)
            if np.isfinite(r.mean_fraction_ct):
                metrics[f"saliency_in_lung_ct_{site}"] = float(r.mean_fraction_ct)
        mlflow.log_metrics(metrics)
        for png in sorted(out.glob("*.png")):
            mlflow.log_artifact(str(png))
        for png in sorted((out / "saliency").glob("*.png")):
            mlflow.log_artifact(str(png), artifact_path="saliency")
        for csv in sorted(out.glob("*.csv")):
            mlflow.log_artifact(str(csv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path,
                        help="trained COVID-19Net (results/models/finetune_covid/model.keras)")
    parser.add_argument("--predictions", nargs="+", required=True, type=Path,
                        metavar="PREDICTIONS.csv",
                        help="results/eval/{site}/predictions.csv (classes, features, sites)")
    add_store_arguments(parser, "--rois", "roi", "patients' roi.zarr")
    parser.add_argument("--lungs", nargs="*", default=None, type=Path, metavar="LUNG.zarr",
                        help="lung masks in the order of --rois (default: lung.zarr beside "
                             "each roi.zarr)")
    parser.add_argument("--cts", nargs="*", default=None, type=Path, metavar="CT.zarr",
                        help="CT stores in the order of --rois, for the saliency on the scan's "
                             "voxels (default: ct.zarr beside each roi.zarr; none there = skipped)")
    parser.add_argument("--out-dir", type=Path, default=Path("results/explain"))
    add_options(parser, ExplainParams)
    add_options(parser, TrackingParams)
    parser.add_argument("--config", default=None, help="workflow config (hashed into MLflow tags)")


def run(args: argparse.Namespace) -> int:
    if args.rois is None:                 # --patients: the stores of the predictions' patients
        from covidct.io.results import read_predictions

        args.rois = stores_for(read_predictions(args.predictions), args.patients, "roi")
    explain(args.model, args.predictions, patient_stores(args.rois, args.lungs, args.cts),
            Path(args.out_dir), from_args(ExplainParams, args), from_args(TrackingParams, args),
            args.config)
    return 0
