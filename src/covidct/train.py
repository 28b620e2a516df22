"""``covidct train``: train COVID-19Net on lung ROIs, tracked in MLflow (one call per rule).

The three training rules of the workflow are the same command:

    pretrain_egfr      --task egfr  (EGFR-mutant = 1; no class weight unless given)
    finetune_covid     --task covid --init results/models/pretrain_egfr/model.keras
    random_init        --task covid (the Table S2 ablation: no pretraining)

Method (supplementary S5): binary cross-entropy with class weight C on the NEGATIVE class
(non-COVID cost x5), SGD lr 0.005, learning rate x0.8 after 2 epochs without a lower validation
loss. A seeded, patient-level stratified internal split selects the checkpoint: the epoch with the
best validation AUC (exact, from the validation predictions; ties broken by the lower validation
loss), or the lowest validation loss with ``--select val_loss``.

Outputs in ``--out``: ``model.keras`` (the selected weights, saved under the float32 policy
whatever the training precision), ``history.csv``, ``val_predictions.csv`` and, LAST and
atomically, ``run.json`` (MLflow run id, model URI, registered version, ...): a failed run leaves
no run.json. Heavy modules (Keras, MLflow) are imported inside :func:`run` only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from covidct.errors import CovidctError
from covidct.zarrio import atomic_path

log = logging.getLogger(__name__)

DEFAULT_CLASS_WEIGHT = {"covid": 5.0, "egfr": 1.0}
PRECISION_POLICIES = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


# ---- command line ----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from covidct.tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI

    p = parser
    p.add_argument("--name", required=True,
                   help="run name (e.g. pretrain_egfr, finetune_covid, random_init); the model is "
                        "registered in MLflow as covidct-NAME")
    p.add_argument("--task", required=True, choices=("covid", "egfr"),
                   help="covid: y = 1 for COVID-19; egfr: y = 1 for EGFR-mutant")
    p.add_argument("--sheet", required=True, nargs="+", type=Path,
                   help="sample sheet(s) (TSV), e.g. one per training site")
    p.add_argument("--rois", required=True, nargs="+", type=Path, metavar="ROI.zarr",
                   help="roi.zarr stores, results/patients/{site}/{patient}/roi.zarr")
    p.add_argument("--out", required=True, type=Path, help="output folder (model.keras, run.json...)")
    p.add_argument("--init", type=Path, default=None,
                   help="pretrained model.keras to start from (same architecture and input size)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    p.add_argument("--batch-size", type=int, default=4, help="patients per batch (default 4)")
    p.add_argument("--lr", type=float, default=0.005, help="SGD learning rate (default 0.005)")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default 0)")
    p.add_argument("--bn-momentum", type=float, default=0.99,
                   help="BatchNorm moving-average momentum (default 0.99, Keras's; 0.8-0.9 suits "
                        "short demo runs, whose few steps leave 0.99's moving statistics unsettled)")
    p.add_argument("--lr-factor", type=float, default=0.8,
                   help="learning-rate factor on a validation-loss plateau (default 0.8)")
    p.add_argument("--lr-patience", type=int, default=2,
                   help="epochs without improvement before the factor applies (default 2)")
    p.add_argument("--class-weight", type=float, default=None,
                   help="weight C of the negative (y = 0) class; default 5 for covid, 1 for egfr")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of patients in the internal validation split, per class (default 0.2;"
                        " 0 = none: the last epoch is kept)")
    p.add_argument("--select", choices=("val_auc", "val_loss"), default="val_auc",
                   help="checkpoint selection on the internal split (default val_auc)")
    p.add_argument("--seed", type=int, default=0, help="seed of split, shuffling, weights, augmentation")
    p.add_argument("--augment", action="store_true",
                   help="random slice-wise affine augmentation (rotation/scale/shift per volume)")
    p.add_argument("--augment-non-lung", type=float, default=0.0, metavar="P",
                   help="with --augment: probability of replacing the voxels outside the lung by a "
                        "random level plus noise (needs the roi stage's lung label; default 0)")
    p.add_argument("--augment-noise", type=float, default=0.0, metavar="SD",
                   help="with --augment: additive Gaussian noise, sd up to SD z-units (default 0)")
    p.add_argument("--augment-blur", type=float, default=0.0, metavar="SIGMA",
                   help="with --augment: in-plane Gaussian blur, sigma up to SIGMA voxels (default 0)")
    p.add_argument("--mixed-precision", choices=tuple(PRECISION_POLICIES), default="none",
                   help="training precision policy (bf16 = mixed_bfloat16)")
    p.add_argument("--workers", type=int, default=2, help="threads reading ROI batches (default 2)")
    p.add_argument("--steps-per-execution", type=int, default=1, metavar="N",
                   help="training steps per compiled call (default 1); 4 nearly doubles the "
                        "throughput on a GPU (benchmarks/bench_train_gpu.py)")
    p.add_argument("--cache", type=int, default=0,
                   help="decoded ROIs kept in memory per dataset (default 0: read every epoch)")
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI,
                   help=f"MLflow tracking URI (default {DEFAULT_TRACKING_URI})")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name")
    p.add_argument("--config", default=None, help="workflow config file (hashed into a tag)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="MLflow run tag (repeatable), e.g. --tag rule=finetune_covid")
    p.add_argument("--no-register", action="store_true",
                   help="log the model without registering it in the model registry")


# ---- pure helpers ----------------------------------------------------------------------------
def parse_tags(items: Sequence[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CovidctError(f"--tag expects KEY=VALUE, got {item!r}")
        tags[key.strip()] = value.strip()
    return tags


def training_table(sheet: Path, rois: Sequence[Path], task: str) -> pd.DataFrame:
    """One row per ROI store: patient, site, y, roi (path). Checks each ROI against the sheet."""
    from covidct.dataset import patient_of
    from covidct.sheet import check_sheet, read_sheet

    df = check_sheet(read_sheet(sheet), path=sheet)
    rows, seen = [], {}
    for roi in rois:
        patient = patient_of(roi)
        if patient in seen:
            raise CovidctError(f"two ROI stores for one patient (also {seen[patient]})",
                               patient=patient, path=roi)
        seen[patient] = roi
        if not Path(roi).exists():
            raise CovidctError("ROI store not found", patient=patient, path=roi)
        if patient not in df.index:
            raise CovidctError(f"patient is not in the sample sheet {sheet}", patient=patient,
                               path=roi)
        row = df.loc[patient]
        if row["task"] != task:
            raise CovidctError(f"patient belongs to task {row['task']!r}, not {task!r}",
                               patient=patient, path=roi)
        rows.append({"patient": patient, "site": row["site"], "label": row["label"],
                     "y": int(row["y"]), "roi": str(roi)})
    if not rows:
        raise CovidctError("no ROI stores given", path=sheet)
    return pd.DataFrame(rows)


def stratified_split(y: Sequence[int], val_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded patient-level split: round(val_fraction x n_c) patients of each class c to
    validation (at least one when the class has two or more patients). Returns sorted indices."""
    if not 0.0 <= val_fraction < 1.0:
        raise CovidctError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    y = np.asarray(y)
    rng = np.random.default_rng([seed, 0x5917])
    val = []
    if val_fraction > 0:
        for cls in np.unique(y):
            members = rng.permutation(np.flatnonzero(y == cls))
            k = int(round(val_fraction * len(members)))
            k = min(max(k, 1 if len(members) >= 2 else 0), len(members) - 1)
            val.extend(members[:k].tolist())
    val_idx = np.array(sorted(val), dtype=int)
    train_idx = np.setdiff1d(np.arange(len(y)), val_idx)
    return train_idx, val_idx


def binary_auc(y: Sequence[int], p: Sequence[float]) -> float:
    """Exact ROC AUC (NaN when only one class is present)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, np.asarray(p, dtype=np.float64)))


def binary_cross_entropy(y: Sequence[int], p: Sequence[float]) -> float:
    """Mean unweighted binary cross-entropy (Keras's clipping at 1e-7)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def weights_digest(weights: Sequence[np.ndarray]) -> str:
    """A short SHA-256 of a model's weights (order, shapes and float32 values)."""
    h = hashlib.sha256()
    for w in weights:
        w = np.ascontiguousarray(np.asarray(w, dtype=np.float32))
        h.update(str(w.shape).encode())
        h.update(w.tobytes())
    return h.hexdigest()[:16]


def write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


# ---- Keras -----------------------------------------------------------------------------------
def configure_keras(seed: int, precision: str = "none"):
    """Seed everything, make TensorFlow ops deterministic, set the dtype policy; returns keras."""
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(int(seed))
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_dtype_policy(PRECISION_POLICIES[precision])
    return keras


def load_pretrained(init: Path, input_shape: Sequence[int]):
    """The weights of a saved COVID-19Net, checked against ``input_shape`` (D, H, W)."""
    import keras

    if not Path(init).exists():
        raise CovidctError("pretrained model not found", path=init)
    try:
        pre = keras.saving.load_model(init, compile=False)
    except Exception as err:  # noqa: BLE001
        raise CovidctError(f"cannot load the pretrained model ({err})", path=init) from err
    pre_shape = tuple(pre.inputs[0].shape[1:4])
    if pre_shape != tuple(input_shape):
        raise CovidctError(f"pretrained model input {'x'.join(map(str, pre_shape))} differs from "
                           f"the ROIs' {'x'.join(map(str, input_shape))}", path=init)
    return pre.get_weights()


def initial_model(input_shape: Sequence[int], init: Path | None = None, name: str = "covid19net",
                  bn_momentum: float = 0.99):
    """COVID-19Net under the current dtype policy, with ``init``'s weights when given."""
    from covidct.model import covid19net

    model = covid19net(input_shape, name=name, bn_momentum=bn_momentum)
    if init is not None:
        weights = load_pretrained(init, input_shape)
        mine = model.get_weights()
        if len(weights) != len(mine) or any(a.shape != b.shape for a, b in zip(weights, mine)):
            raise CovidctError("pretrained model is not COVID-19Net (weights differ in number or "
                               "shape)", path=init)
        model.set_weights(weights)
    return model


def predict_probabilities(model, dataset) -> np.ndarray:
    return np.asarray(model.predict(dataset, verbose=0), dtype=np.float64).reshape(-1)


def _epoch_callback(keras, *, val_data, val_y, epochs: int, select: str, tracker):
    """The per-epoch callback: exact validation metrics, the log line, MLflow metrics and the
    in-memory best checkpoint. Must come before ReduceLROnPlateau (it fills val_loss)."""

    class EpochEnd(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rows: list[dict[str, float]] = []
            self.best: tuple | None = None
            self.best_weights = None
            self.best_epoch = 0
            self.last_predictions = self.best_predictions = None
            self._start = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            row = {"epoch": epoch + 1, "loss": float(logs.get("loss", math.nan)),
                   "auc": float(logs.get("auc", math.nan)), "val_loss": math.nan,
                   "val_auc": math.nan, "lr": lr}
            if val_data is not None:
                p = predict_probabilities(self.model, val_data)
                self.last_predictions = p
                row["val_loss"] = binary_cross_entropy(val_y, p)
                row["val_auc"] = binary_auc(val_y, p)
                logs["val_loss"], logs["val_auc"] = row["val_loss"], row["val_auc"]
            row["seconds"] = time.perf_counter() - self._start
            self.rows.append(row)
            if val_data is None:
                key = (epoch,)                                    # keep the last epoch
            elif select == "val_loss" or math.isnan(row["val_auc"]):
                key = (-row["val_loss"],)
            else:
                key = (row["val_auc"], -row["val_loss"])
            if self.best is None or key > self.best:
                self.best, self.best_epoch = key, epoch + 1
                self.best_weights = [np.array(w) for w in self.model.get_weights()]
                self.best_predictions = self.last_predictions
            log.info("epoch %d/%d loss %.3f auc %.2f val_loss %.2f val_auc %.2f lr %.3g %.1f s",
                     epoch + 1, epochs, row["loss"], row["auc"], row["val_loss"], row["val_auc"],
                     lr, row["seconds"])
            if tracker is not None:
                tracker.log_metrics({k: v for k, v in row.items()
                                     if k not in ("epoch",) and not math.isnan(v)},
                                    step=epoch + 1)

    return EpochEnd()


def training_roi_settings(roi_attrs: Sequence[Mapping]) -> dict:
    """The roi-stage settings the training ROIs were made with, from their stores' attributes.

    ``{"antialias": bool, "min_pixels": int}``, a value None where the stores do not record it
    or disagree. run.json keeps it so that ``covidct predict`` makes its ROI the same way.
    """
    seen: dict[str, set] = {"antialias": set(), "min_pixels": set()}
    for attrs in roi_attrs:
        seen["antialias"].add(attrs.get("antialias"))
        seen["min_pixels"].add((attrs.get("rules") or {}).get("min_pixels"))
    settings = {}
    for key, values in seen.items():
        settings[key] = next(iter(values)) if len(values) == 1 else None
        if len(values) > 1:
            log.warning("the training ROIs were made with different %s (%s): not recorded",
                        key, ", ".join(map(str, sorted(values, key=str))))
    return settings


# ---- the stage -------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_json = out / "run.json"
    if run_json.exists():       # a failed re-run must not leave the previous run's record
        run_json.unlink()
    if args.epochs < 0 or args.batch_size < 1 or args.workers < 0 or args.steps_per_execution < 1:
        raise CovidctError("--epochs must be >= 0, --batch-size >= 1, --workers >= 0 and "
                           "--steps-per-execution >= 1")
    user_tags = parse_tags(args.tag)

    from covidct.dataset import Augment, RoiDataset, roi_metadata

    table = training_table(args.sheet, args.rois, args.task)
    shapes, roi_attrs = {}, []
    for patient, roi in zip(table["patient"], table["roi"]):
        shape, attrs = roi_metadata(roi)
        shapes.setdefault(shape, (patient, roi))
        roi_attrs.append(attrs)
    if len(shapes) > 1:
        (s1, (p1, _)), (s2, (p2, r2)) = list(shapes.items())[:2]
        raise CovidctError(f"ROI shape {'x'.join(map(str, s2))} differs from patient {p1}'s "
                           f"{'x'.join(map(str, s1))}", patient=p2, path=r2)
    input_shape = next(iter(shapes))
    roi_settings = training_roi_settings(roi_attrs)
    train_idx, val_idx = stratified_split(table["y"].to_numpy(), args.val_fraction, args.seed)
    train_t, val_t = table.iloc[train_idx], table.iloc[val_idx]
    if len(train_t) == 0:
        raise CovidctError("no patients left for training after the validation split",
                           path=args.sheet)
    if train_t["y"].nunique() < 2:
        log.warning("the training split holds one class only (y = %s)", train_t["y"].iloc[0])
    c = DEFAULT_CLASS_WEIGHT[args.task] if args.class_weight is None else args.class_weight
    class_weight = None if c == 1.0 else {0: float(c), 1: 1.0}
    sites = sorted(table["site"].unique())

    keras = configure_keras(args.seed, args.mixed_precision)
    backend = keras.backend.backend()
    model = initial_model(input_shape, args.init, bn_momentum=args.bn_momentum)
    init_digest = weights_digest(model.get_weights())
    augment = Augment(non_lung=args.augment_non_lung, noise=args.augment_noise,
                      blur=args.augment_blur) if args.augment else None
    train_ds = RoiDataset(train_t["roi"].tolist(), train_t["y"].to_numpy(),
                          batch_size=args.batch_size, shuffle=True, seed=args.seed,
                          class_weight=class_weight, augment=augment, cache=args.cache,
                          workers=args.workers)
    val_ds = None
    if len(val_t):
        val_ds = RoiDataset(val_t["roi"].tolist(), None, batch_size=args.batch_size,
                            cache=args.cache, workers=args.workers)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=args.lr, momentum=args.momentum),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.AUC(name="auc")],
        steps_per_execution=args.steps_per_execution,
    )

    params = {
        "name": args.name, "task": args.task, "epochs": args.epochs,
        "batch_size": args.batch_size, "optimizer": "SGD", "lr": args.lr,
        "momentum": args.momentum, "bn_momentum": args.bn_momentum, "lr_factor": args.lr_factor,
        "lr_patience": args.lr_patience,
        "class_weight_negative": float(c), "val_fraction": args.val_fraction,
        "select": args.select, "seed": args.seed, "augment": bool(args.augment),
        "augment_non_lung": augment.non_lung if augment else 0.0,
        "augment_noise": augment.noise if augment else 0.0,
        "augment_blur": augment.blur if augment else 0.0,
        "mixed_precision": args.mixed_precision, "workers": args.workers,
        "steps_per_execution": args.steps_per_execution,
        "init": str(args.init) if args.init else "none", "init_digest": init_digest,
        "input_shape": "x".join(map(str, input_shape)), "n_train": len(train_t),
        "n_val": len(val_t), "n_train_positive": int(train_t["y"].sum()),
        "n_val_positive": int(val_t["y"].sum()), "sites": ",".join(sites), "backend": backend,
        "keras_version": keras.__version__, "n_params": int(model.count_params()),
        **{f"roi_{k}": "unknown" if v is None else v for k, v in roi_settings.items()},
    }
    tags = {"rule": args.name, "task": args.task, "sites": ",".join(sites)}
    tags.update(user_tags)
    log.info("training %s (%s): %d train (%d positive), %d validation patients, ROI %s, "
             "backend %s, %s precision, class weight %s", args.name, args.task, len(train_t),
             params["n_train_positive"], len(val_t), params["input_shape"], backend,
             args.mixed_precision, class_weight)

    from covidct.tracking import mlflow_run

    with mlflow_run(args.tracking_uri, args.name, experiment=args.experiment, tags=tags,
                    params=params, config=args.config) as active:
        import mlflow

        epoch_end = _epoch_callback(keras, val_data=val_ds,
                                    val_y=val_t["y"].to_numpy(), epochs=args.epochs,
                                    select=args.select, tracker=mlflow)
        plateau = keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss" if val_ds is not None else "loss", factor=args.lr_factor,
            patience=args.lr_patience, verbose=0)
        if args.epochs:
            model.fit(train_ds, epochs=args.epochs, shuffle=False, verbose=0,
                      callbacks=[epoch_end, plateau])
        best = epoch_end.best_weights or model.get_weights()

        # The selected weights in a float32 model: model.keras is independent of the precision.
        keras.mixed_precision.set_dtype_policy("float32")
        final = initial_model(input_shape, None, bn_momentum=args.bn_momentum)
        final.set_weights(best)
        history = pd.DataFrame(epoch_end.rows, columns=["epoch", "loss", "auc", "val_loss",
                                                        "val_auc", "lr", "seconds"])
        if val_ds is None:
            val_p = np.zeros(0)
        elif args.mixed_precision == "none" and epoch_end.best_predictions is not None:
            val_p = epoch_end.best_predictions      # same weights, same float32 arithmetic
        else:
            val_p = predict_probabilities(final, val_ds)
        val_pred = pd.DataFrame({"patient": val_t["patient"].to_numpy(),
                                 "y": val_t["y"].to_numpy(dtype=int), "probability": val_p})
        val_auc = binary_auc(val_pred["y"], val_pred["probability"])
        write_csv(history, out / "history.csv")
        write_csv(val_pred, out / "val_predictions.csv")
        with atomic_path(out / "model.keras") as tmp:
            final.save(tmp)
        mlflow.log_metrics({"selected_epoch": epoch_end.best_epoch,
                            **({"selected_val_auc": val_auc} if not math.isnan(val_auc) else {})})
        mlflow.log_artifact(str(out / "history.csv"))
        mlflow.log_artifact(str(out / "val_predictions.csv"))
        registered = None if args.no_register else f"covidct-{args.name}"
        info = log_keras_model(final, input_shape, registered)
        version = info.registered_model_version
        record = {
            "run_id": active.info.run_id, "experiment_id": active.info.experiment_id,
            "tracking_uri": args.tracking_uri, "model_uri": info.model_uri,
            "registered_model": registered, "version": None if version is None else int(version),
            "val_auc": None if math.isnan(val_auc) else val_auc, "n_train": len(train_t),
            "n_val": len(val_t), "input_shape": list(input_shape), "backend": backend,
            "selected_epoch": epoch_end.best_epoch, "init": params["init"],
            "init_digest": init_digest, "roi": roi_settings,
        }
    with atomic_path(run_json) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    log.info("selected epoch %d (val_auc %s); model %s, MLflow run %s, %s version %s",
             epoch_end.best_epoch, record["val_auc"], out / "model.keras", record["run_id"],
             registered, record["version"])
    return 0


def log_keras_model(model, input_shape: Sequence[int], registered_name: str | None):
    """Log ``model`` with the MLflow Keras flavour (explicit requirements and a tensor signature,
    so MLflow neither re-imports the model nor stores an example) and register it."""
    import keras
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape, 1), "roi")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1), "probability")]))
    requirements = [f"keras=={keras.__version__}", f"mlflow=={mlflow.__version__}"]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        requirements.append(f"tensorflow=={tf.__version__}")
    elif keras.backend.backend() == "jax":
        import jax

        requirements.append(f"jax=={jax.__version__}")
    return mlflow.keras.log_model(model, name="model", signature=signature,
                                  registered_model_name=registered_name,
                                  pip_requirements=requirements)
