"""``covidct train``: COVID-19Net on lung ROIs, one call per training rule.

    pretrain_egfr      --task egfr  (EGFR-mutant = 1)
    finetune_covid     --task covid --init results/models/pretrain_egfr/model.keras
    random_init        --task covid (the Table S2 ablation: no pretraining)

Binary cross-entropy with a class weight on the negative class, SGD, the learning rate x0.8
after 2 epochs without a lower validation loss (supplementary S5). A seeded, patient-level
stratified internal split selects the epoch with the best exact validation AUC (ties: the lower
validation loss). ``model.keras`` holds the selected weights in float32 whatever the training
precision; ``val_predictions.csv`` the internal split's predictions.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from covidct.errors import CovidctError
from covidct.io.atomic import write_csv
from covidct.io.stores import add_store_arguments, stores_for
from covidct.model.trainer import Trainer, set_threads, weights_digest
from covidct.params import TrackingParams, TrainParams, add_options, from_args

log = logging.getLogger(__name__)

TASKS = ("covid", "egfr")


# ---- data ------------------------------------------------------------------------------------

def training_table(sheet: Sequence[Path] | Path, rois: Sequence[Path], task: str) -> pd.DataFrame:
    """One row per ROI store: patient, site, label, y, roi (path). Checks each ROI against the
    sample sheet."""
    from covidct.io.sheet import check_sheet, read_sheet
    from covidct.io.stores import store_patient

    df = check_sheet(read_sheet(sheet), path=sheet)
    rows, seen = [], {}
    for roi in rois:
        patient = store_patient(roi)
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


def training_subset(y: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """Seeded, class-stratified subset: round(fraction x n_c) of each class c (at least one).
    The subsets of growing fractions are nested. Returns sorted positions into ``y``."""
    y = np.asarray(y)
    if fraction >= 1.0:
        return np.arange(len(y))
    rng = np.random.default_rng([seed, 0xF4AC])
    keep = []
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        keep.extend(members[:max(1, int(round(fraction * len(members))))].tolist())
    return np.array(sorted(keep), dtype=int)


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


# ---- Keras -----------------------------------------------------------------------------------

def resolve_model(source: str | Path, tracking: TrackingParams) -> Path:
    """A .keras file as given, or the model.keras of an MLflow model URI (downloaded)."""
    from covidct.model.saved import download_model, is_model_uri

    return download_model(str(source), tracking) if is_model_uri(source) else Path(source)


def load_pretrained(init: Path, input_shape: Sequence[int],
                    architecture: str = TrainParams.architecture):
    """The weights of a saved COVID-19Net (a ``.keras`` file, or the authors' Keras 2 ``.h5``),
    checked against ``input_shape`` (D, H, W) and the ``architecture`` it must have."""
    import keras

    from covidct.model.architecture import architecture_of
    from covidct.model.authors import ARCHITECTURE as AUTHORS
    from covidct.model.authors import authors_model, is_keras2_file

    if not Path(init).exists():
        raise CovidctError("pretrained model not found", path=init)
    if is_keras2_file(init):             # the authors' published weights, read as import-weights
        if architecture != AUTHORS:
            raise CovidctError(f"the authors' weights need training.architecture: {AUTHORS} "
                               f"(not {architecture})", path=init)
        return authors_model(init, input_shape)[0].get_weights()
    try:
        pre = keras.saving.load_model(init, compile=False)
    except Exception as err:           # any unreadable or foreign file
        raise CovidctError(f"cannot load the pretrained model ({err})", path=init) from err
    pre_shape = tuple(pre.inputs[0].shape[1:4])
    if pre_shape != tuple(input_shape):
        raise CovidctError(f"pretrained model input {'x'.join(map(str, pre_shape))} differs from "
                           f"the ROIs' {'x'.join(map(str, input_shape))}", path=init)
    try:
        found = architecture_of(pre)
    except ValueError as err:
        raise CovidctError(f"pretrained model: {err}", path=init) from None
    if found != architecture:
        raise CovidctError(f"the pretrained model has the {found} architecture, training asks "
                           f"for {architecture} (training.architecture)", path=init)
    return pre.get_weights()


def initial_model(input_shape: Sequence[int], init: Path | None = None, name: str = "covid19net",
                  bn_momentum: float = TrainParams.bn_momentum,
                  architecture: str = TrainParams.architecture):
    """COVID-19Net (``architecture``) under the current dtype policy, with ``init``'s weights
    when given."""
    from covidct.model.architecture import covid19net

    model = covid19net(input_shape, name=name, bn_momentum=bn_momentum,
                       architecture=architecture)
    if init is not None:
        weights = load_pretrained(init, input_shape, architecture)
        mine = model.get_weights()
        if len(weights) != len(mine) or any(a.shape != b.shape for a, b in zip(weights, mine)):
            raise CovidctError("pretrained model is not COVID-19Net (weights differ in number or "
                               "shape)", path=init)
        model.set_weights(weights)
    return model


def predict_probabilities(model, dataset) -> np.ndarray:
    return np.asarray(model.predict(dataset, verbose=0), dtype=np.float64).reshape(-1)


def resumable_plateau(keras):
    """ReduceLROnPlateau whose counters a resumed run puts back (``pending``): Keras resets
    them when training begins."""

    class Plateau(keras.callbacks.ReduceLROnPlateau):
        pending: dict | None = None

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if self.pending:
                self.wait = self.pending["wait"]
                self.best = self.pending["best"]
                self.cooldown_counter = self.pending["cooldown_counter"]

    return Plateau


class ClassifierTrainer(Trainer):
    """COVID-19Net on the ROI stores of a sample sheet (one task: covid or egfr)."""

    model_kind = "covid19net"

    def __init__(self, out, params: TrainParams, *, name: str, task: str,
                 sheet: Sequence[Path] | Path, rois: Sequence[Path], init: Path | None = None,
                 synthetic: bool = False, tracking: TrackingParams = TrackingParams(),
                 register: bool = True, tags: dict[str, str] | None = None, config=None):
        if task not in TASKS:
            raise CovidctError(f"unknown task {task!r} ({' or '.join(TASKS)})")
        super().__init__(out, name=name, epochs=params.epochs, seed=params.seed,
                         tracking=tracking, register=register, tags=tags, config=config)
        self.p, self.task, self.sheet, self.rois = params, task, sheet, list(rois)
        self.init = None if init is None else str(init)
        self.synthetic = bool(synthetic)
        self.precision = params.mixed_precision
        self.loop, self.devices = params.loop, params.devices
        self.steps_per_call = params.steps_per_execution
        self.rule = name

    # ---- hooks -----------------------------------------------------------------------------
    def prepare(self) -> None:
        from covidct.io.provenance import agreed_preprocessing
        from covidct.model.dataset import roi_metadata

        table = training_table(self.sheet, self.rois, self.task)
        shapes = {}
        for patient, roi in zip(table["patient"], table["roi"]):
            shape, _ = roi_metadata(roi)
            shapes.setdefault(shape, (patient, roi))
        if len(shapes) > 1:
            (s1, (p1, _)), (s2, (p2, r2)) = list(shapes.items())[:2]
            raise CovidctError(f"ROI shape {'x'.join(map(str, s2))} differs from patient {p1}'s "
                               f"{'x'.join(map(str, s1))}", patient=p2, path=r2)
        self.input_shape = next(iter(shapes))
        self.preprocessing = agreed_preprocessing(table["roi"].tolist())
        self.training_data = {
            "sites": sorted(table["site"].unique()), "n": len(table),
            "labels": {k: int(v) for k, v in table["label"].value_counts().sort_index().items()},
            "synthetic": self.synthetic}
        train_idx, val_idx = stratified_split(table["y"].to_numpy(), self.p.val_fraction,
                                              self.seed)
        self.train_t, self.val_t = table.iloc[train_idx], table.iloc[val_idx]
        if self.p.train_fraction < 1.0:
            subset = training_subset(self.train_t["y"].to_numpy(), self.p.train_fraction,
                                     self.seed)
            log.info("training on %d of the %d patients of the training split (fraction %g)",
                     len(subset), len(self.train_t), self.p.train_fraction)
            self.train_t = self.train_t.iloc[subset]
        if len(self.train_t) == 0:
            raise CovidctError("no patients left for training after the validation split",
                               path=self.sheet)
        if self.train_t["y"].nunique() < 2:
            log.warning("the training split holds one class only (y = %s)",
                        self.train_t["y"].iloc[0])
        c = self.p.negative_weight(self.task)
        self.class_weight = None if c == 1.0 else {0: float(c), 1: 1.0}
        self.sites = sorted(table["site"].unique())
        self.val_y = self.val_t["y"].to_numpy()

    def build(self, keras):
        init = None if self.init is None else resolve_model(self.init, self.tracking)
        model = initial_model(self.input_shape, init, bn_momentum=self.p.bn_momentum,
                              architecture=self.p.architecture)
        self.init_digest = weights_digest(model.get_weights())
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=self.p.lr, momentum=self.p.momentum),
            loss=keras.losses.BinaryCrossentropy(),
            metrics=[keras.metrics.AUC(name="auc")],
            steps_per_execution=self.p.steps_per_execution,
        )
        log.info("training %s (%s): %d train (%d positive), %d validation patients, ROI %s, "
                 "backend %s, %s precision, class weight %s", self.name, self.task,
                 len(self.train_t), int(self.train_t["y"].sum()), len(self.val_t),
                 "x".join(map(str, self.input_shape)), keras.backend.backend(), self.precision,
                 self.class_weight)
        return model

    def data(self):
        from covidct.model.dataset import Augment, RoiDataset

        p = self.p
        augment = Augment(non_lung=p.augment_non_lung, noise=p.augment_noise,
                          blur=p.augment_blur) if p.augment else None
        train = RoiDataset(self.train_t["roi"].tolist(), self.train_t["y"].to_numpy(),
                           batch_size=p.batch_size, shuffle=True, seed=self.seed,
                           class_weight=self.class_weight, augment=augment, cache=p.cache,
                           workers=p.workers)
        self.val_data = None
        if len(self.val_t):
            self.val_data = RoiDataset(self.val_t["roi"].tolist(), None, batch_size=p.batch_size,
                                       cache=p.cache, workers=p.workers)
        self.last_predictions = self.best_predictions = None
        self.plateau = self.plateau_state = None
        return train

    def callbacks(self, keras) -> list:
        self.plateau = resumable_plateau(keras)(
            monitor="val_loss" if self.val_data is not None else "loss",
            factor=self.p.lr_factor, patience=self.p.lr_patience, verbose=0)
        self.plateau.pending = self.plateau_state
        return [self.plateau]

    def validate(self, model) -> dict[str, float]:
        if self.val_data is None:
            return {"val_loss": math.nan, "val_auc": math.nan}
        p = predict_probabilities(model, self.val_data)
        self.last_predictions = p
        return {"val_loss": binary_cross_entropy(self.val_y, p),
                "val_auc": binary_auc(self.val_y, p)}

    def score(self, row) -> tuple:
        if self.val_data is None:
            return (row["epoch"],)                       # keep the last epoch
        if self.p.select == "val_loss" or math.isnan(row["val_auc"]):
            return (-row["val_loss"],)
        return (row["val_auc"], -row["val_loss"])

    def on_best(self, epoch: int) -> None:
        self.best_predictions = self.last_predictions

    def resume_state(self) -> dict:
        best = self.best_predictions
        plateau = self.plateau
        return {"best_predictions": None if best is None else np.asarray(best).tolist(),
                "plateau": {"wait": int(plateau.wait), "best": float(plateau.best),
                            "cooldown_counter": int(plateau.cooldown_counter)}}

    def restore(self, state: dict) -> None:
        best = state.get("best_predictions")
        self.best_predictions = None if best is None else np.asarray(best, dtype=np.float64)
        self.plateau_state = state.get("plateau")      # read by callbacks(), called after

    def final_model(self, keras, model, weights):
        # the selected weights in a float32 model: model.keras is independent of the precision
        keras.mixed_precision.set_dtype_policy("float32")
        final = initial_model(self.input_shape, None, bn_momentum=self.p.bn_momentum,
                              architecture=self.p.architecture)
        final.set_weights(weights)
        return final

    def after_training(self, final) -> dict[str, float]:
        if self.val_data is None:
            val_p = np.zeros(0)
        elif self.precision == "none" and self.best_predictions is not None:
            val_p = self.best_predictions      # the same weights, the same float32 arithmetic
        else:
            val_p = predict_probabilities(final, self.val_data)
        table = pd.DataFrame({"patient": self.val_t["patient"].to_numpy(),
                              "y": self.val_t["y"].to_numpy(dtype=int), "probability": val_p})
        path = write_csv(self.out / "val_predictions.csv", table)
        self.artifacts.append(path)
        val_auc = binary_auc(table["y"], table["probability"])
        return {"val_auc": None if math.isnan(val_auc) else val_auc}

    def params(self) -> dict:
        p = self.p
        return {
            "task": self.task, "architecture": p.architecture, "batch_size": p.batch_size,
            "optimizer": "SGD", "lr": p.lr,
            "momentum": p.momentum, "bn_momentum": p.bn_momentum, "lr_factor": p.lr_factor,
            "lr_patience": p.lr_patience,
            "class_weight_negative": float(p.negative_weight(self.task)),
            "val_fraction": p.val_fraction, "train_fraction": p.train_fraction,
            "select": p.select, "augment": bool(p.augment),
            "augment_non_lung": p.augment_non_lung if p.augment else 0.0,
            "augment_noise": p.augment_noise if p.augment else 0.0,
            "augment_blur": p.augment_blur if p.augment else 0.0,
            "mixed_precision": p.mixed_precision, "workers": p.workers,
            "steps_per_execution": p.steps_per_execution,
            "init": str(self.init) if self.init else "none", "init_digest": self.init_digest,
            "input_shape": "x".join(map(str, self.input_shape)), "n_train": len(self.train_t),
            "n_val": len(self.val_t), "n_train_positive": int(self.train_t["y"].sum()),
            "n_val_positive": int(self.val_t["y"].sum()), "sites": ",".join(self.sites),
            "synthetic": self.synthetic,
            **{f"roi_{k}": (self.preprocessing["roi"] or {}).get(k, "unknown")
               for k in ("antialias", "min_pixels")},
        }

    def tags(self) -> dict[str, str]:
        return {"covidct.task": self.task, "covidct.sites": ",".join(self.sites)}

    def log_inputs(self, mlflow) -> None:
        from covidct.io.tracking import log_sheet_inputs

        source = ", ".join(map(str, self.sheet)) if isinstance(self.sheet, (list, tuple)) \
            else str(self.sheet)
        log_sheet_inputs(mlflow, self.train_t, source, "training")
        if len(self.val_t):
            log_sheet_inputs(mlflow, self.val_t, source, "validation")

    def record(self) -> dict:
        return {"task": self.task, "architecture": self.p.architecture,
                "n_train": len(self.train_t), "n_val": len(self.val_t),
                "train_fraction": self.p.train_fraction,
                "init": str(self.init) if self.init else "none", "init_digest": self.init_digest,
                "preprocessing": self.preprocessing, "training_data": self.training_data}


def train(params: TrainParams, *, name: str, task: str, sheet, rois, out,
          init: Path | str | None = None, synthetic: bool = False,
          tracking: TrackingParams = TrackingParams(), register: bool = True,
          tags: dict[str, str] | None = None, config=None) -> dict:
    """Train COVID-19Net into ``out`` (model.keras, history.csv, val_predictions.csv, run.json);
    returns the run.json record. ``init``: a .keras file or an MLflow model URI."""
    return ClassifierTrainer(out, params, name=name, task=task, sheet=sheet, rois=rois,
                             init=init, synthetic=synthetic, tracking=tracking,
                             register=register, tags=tags, config=config).run()


# ---- command line ----------------------------------------------------------------------------

def parse_tags(items: Sequence[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CovidctError(f"--tag expects KEY=VALUE, got {item!r}")
        tags[key.strip()] = value.strip()
    return tags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--name", required=True,
                   help="run name (e.g. pretrain_egfr, finetune_covid, random_init); the model is "
                        "registered in MLflow as covidct-NAME")
    p.add_argument("--task", required=True, choices=TASKS,
                   help="covid: y = 1 for COVID-19; egfr: y = 1 for EGFR-mutant")
    p.add_argument("--sheet", required=True, nargs="+", type=Path,
                   help="sample sheet(s) (TSV), e.g. one per training site")
    add_store_arguments(p, "--rois", "roi", "roi.zarr")
    p.add_argument(
        "--out", required=True, type=Path, help="output folder (model.keras, run.json...)"
    )
    p.add_argument("--init", default=None,
                   help="the model to start from (same architecture and input size): a .keras "
                        "file or an MLflow model URI (models:/NAME/VERSION, models:/NAME@ALIAS)")
    p.add_argument("--synthetic", action="store_true",
                   help="the ROIs are the synthetic demo cohort's (recorded in the run)")
    add_options(p, TrainParams)
    add_options(p, TrackingParams)
    p.add_argument("--config", default=None, help="workflow config file (hashed into a tag)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="MLflow run tag (repeatable), e.g. --tag covidct.rule=finetune_covid")
    p.add_argument("--no-register", action="store_true",
                   help="log the model without registering it in the model registry")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads of the network's operations, 0 = all (default 0)")


def sheet_rois(sheet: Sequence[Path], task: str, patients: Path) -> list[Path]:
    """The roi.zarr below ``patients`` of every patient of ``task`` in the sheet(s)."""
    from covidct.io.sheet import read_sheet

    table = read_sheet(sheet)
    return stores_for(table[table["task"] == task], patients, "roi")


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    rois = args.rois or sheet_rois(args.sheet, args.task, args.patients)
    train(from_args(TrainParams, args), name=args.name, task=args.task, sheet=args.sheet,
          rois=rois, out=args.out, init=args.init, synthetic=args.synthetic,
          tracking=from_args(TrackingParams, args), register=not args.no_register,
          tags=parse_tags(args.tag), config=args.config)
    return 0
