"""Every stage's parameters and their defaults: one frozen dataclass per stage.

The command line derives its options from these classes (:func:`add_options`, :func:`from_args`),
the stage functions take them, the workflow turns its config sections into them
(:func:`from_config`, :func:`as_options`), and a test checks that the config schema's defaults
are the same values.
"""

from __future__ import annotations

import argparse
import math
import shlex
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal, get_args, get_origin

from covidct.errors import CovidctError

DEFAULT_TRACKING_URI = "sqlite:///results/mlflow.db"
DEFAULT_EXPERIMENT = "covidct"
# Weight of the negative (y = 0) class in the loss, by task, when none is given.
DEFAULT_CLASS_WEIGHT = {"covid": 5.0, "egfr": 1.0}
PRECISION_POLICIES = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def option(default: Any, help: str, **argparse_kwargs: Any):
    """A dataclass field with its command-line help (and any extra argparse keywords)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


def ridge_penalizer(text: Any) -> str | float:
    """'auto' or a positive number (the type of ``PrognosisParams.ridge_penalizer``)."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive number, got {text!r}")
    return value


# --------------------------------------------------------------------------- the stages

@dataclass(frozen=True)
class IngestParams:
    """How ``covidct ingest`` reads a scan into HU."""

    min_slices: int = option(3, "refuse series with fewer slices")
    max_gap: float = option(1.5, "a slice step over this x the median step means missing slices")
    spacing_tolerance: float = option(
        0.1, "allowed relative deviation of a slice step from the median")
    padding_below: float = option(-1200.0, "HU under which a voxel is padding, set to --air")
    air: int = option(-1024, "HU written for padding voxels")
    rescale_intercept: float | None = option(
        None, "add this to images without any voxel below 0 HU (stored values missing their "
              "rescale); default: refuse such images")
    clevel: int = option(1, "zstd compression level of ct.zarr")


@dataclass(frozen=True)
class ThresholdParams:
    """The threshold lung segmentation (every value is recorded in lung.zarr)."""

    threshold: float | None = option(
        None, "HU between lung and tissue; default: Otsu's threshold inside the body, clamped "
              "to --otsu-range")
    otsu_range: tuple[float, float] = option((-550.0, -300.0), "clamp of the Otsu threshold (HU)")
    body_hu: float = option(-500.0, "the body is the largest component above this HU")
    work_xy_mm: float = option(2.0, "working grid: in-plane spacing target (mm)")
    work_z_mm: float = option(2.5, "working grid: slice spacing target (mm)")
    airway_search_mm: float = option(60.0, "trachea seed search depth from the top slice (mm)")
    airway_area_factor: float = option(
        2.5, "an airway blob is at most this times the tracheal area")
    airway_max_mm: float = option(250.0, "airway tracking length below the seed (mm)")
    min_lung_ml: float = option(30.0, "smaller components are not lung (ml)")
    close_mm: float = option(3.0, "3-D closing ball radius (mm)")
    pleural_depth_mm: float = option(
        20.0, "fill bays on the costal side of the lungs (dense lesions on the pleura) up to "
              "this depth (mm; 0 = off)")
    lesion_fill: bool = option(
        False, "add the dense lesions each lung's cavity holds (against the chest wall, spine, "
               "diaphragm and mediastinum) to the mask (off by default: on normal scans it "
               "adds liver and chest wall)")


@dataclass(frozen=True)
class RoiParams:
    """The lung ROI: box rules, non-lung suppression and the network's input size."""

    size: tuple[int, int, int] = option((48, 240, 360), "ROI size D H W (the paper's 48 240 360)",
                                        metavar=("D", "H", "W"))
    min_area_fraction: float = option(
        0.03, "drop end slices with less lung than this fraction of the largest slice's")
    min_slices: int = option(3, "reject lung boxes with fewer slices")
    min_pixels: int = option(
        60, "reject lung boxes narrower in-plane than this many voxels (the paper's 60 is for "
            "512x512 slices)")
    percentile: float = option(95.0, "clip the box at this percentile")
    n_std: float = option(4.0, "clamp voxels outside the lung to lung mean +/- N sd")
    min_lung_ml: float = option(200.0, "a smaller lung mask is a failed segmentation (ml)")
    max_lung_ml: float = option(12000.0, "a larger lung mask is a failed segmentation (ml)")
    max_body_fraction: float = option(
        0.6, "a lung mask above this fraction of the body volume is a failed segmentation")
    antialias: bool = option(
        True, "Gaussian-smooth each shrinking axis before the cubic resize, so slice thickness "
              "and noise matter less between scanners (--no-antialias: the authors' plain resize)")
    allow_fallback: bool = option(
        False, "on a failed segmentation crop the body's bounding box instead of failing")
    slice_rule: Literal["ends", "neighbours"] = option(
        "ends", "slices of the box: ends (drop end slices under --min-area-fraction) or "
                "neighbours (the authors': keep a slice only if it and both neighbours pass; the "
                "box spans the kept slices)")
    plane_box: Literal["kept_slices", "whole_mask"] = option(
        "kept_slices", "in-plane box of the mask over the kept slices, or over the whole mask "
                       "(the authors')")
    drop_scan_ends: bool = option(
        False, "leave the scan's first and last slice out of the box (the authors': their 2.5-D "
               "segmenter has no neighbour there)")
    clip_resized: bool = option(
        False, "clip the resized ROI to the suppressed box's min and max, removing the cubic "
               "overshoot (the authors')")
    zscore: Literal["box", "resized"] = option(
        "box", "z-score with the suppressed box's mean and sd (box) or the resized ROI's "
               "(resized: the authors')")


AUTHORS_ROI = {"slice_rule": "neighbours", "plane_box": "whole_mask", "drop_scan_ends": True,
               "clip_resized": True, "zscore": "resized", "antialias": False}
"""The RoiParams values of the authors' lung ROI (lungSegNet4seg19Conv.py, COVIDGenerator.py)."""

ARCHITECTURES = ("covidct", "authors")


@dataclass(frozen=True)
class TrainParams:
    """Training COVID-19Net (EGFR pretraining, COVID-19 fine-tuning, random init)."""

    architecture: Literal["covidct", "authors"] = option(
        "covidct", "COVID-19Net's layer arrangement: authors (their myDense.py: pre-activation "
                   "blocks, their layer names, their published weights load) or covidct "
                   "(post-activation Conv-BN-ReLU throughout)")
    epochs: int = option(30, "training epochs")
    batch_size: int = option(4, "patients per batch")
    lr: float = option(0.005, "SGD learning rate")
    momentum: float = option(0.0, "SGD momentum")
    bn_momentum: float = option(
        0.99, "BatchNorm moving-average momentum (Keras's; 0.8-0.9 suits short demo runs)")
    lr_factor: float = option(0.8, "learning-rate factor on a validation-loss plateau")
    lr_patience: int = option(2, "epochs without improvement before the factor applies")
    class_weight: float | None = option(
        None, "weight of the negative (y = 0) class; default 5 for covid, 1 for egfr")
    val_fraction: float = option(
        0.2, "share of patients per class in the internal validation split (0 = none: the "
             "last epoch is kept)")
    train_fraction: float = option(
        1.0, "share of the training split used, per class (the validation split unchanged): "
             "the learning curve's smaller training sets")
    select: Literal["val_auc", "val_loss"] = option(
        "val_auc", "checkpoint selection on the internal split")
    seed: int = option(0, "seed of the split, shuffling, weights and augmentation")
    augment: bool = option(True, "random slice-wise affine augmentation (rotation/zoom/shift)")
    augment_non_lung: float = option(
        0.0, "with --augment: probability of replacing the voxels outside the lung by a random "
             "level plus noise (needs the roi stage's lung label)")
    augment_noise: float = option(
        0.0, "with --augment: additive Gaussian noise, sd up to this (z units)")
    augment_blur: float = option(
        0.0, "with --augment: in-plane Gaussian blur, sigma up to this (voxels)")
    mixed_precision: Literal["none", "bf16", "fp16"] = option(
        "none", "training precision policy (bf16 = mixed_bfloat16)")
    workers: int = option(2, "threads reading ROI batches")
    steps_per_execution: int = option(
        1, "training steps per compiled call (4 nearly doubles the throughput on a GPU)")
    loop: Literal["auto", "jax", "fit"] = option(
        "auto", "training loop: jax (several steps compiled into one call, the state kept on "
                "the device; the JAX backend only), fit (Keras's model.fit) or auto (jax on the "
                "JAX backend, fit on the others)")
    devices: int = option(
        0, "data-parallel training over this many accelerators of the node on the JAX backend "
           "(0 = all it sees; the batch is split between them)")
    cache: int = option(0, "decoded ROIs kept in memory per dataset (0: read every epoch)")

    def __post_init__(self):
        if self.epochs < 0 or self.batch_size < 1 or self.workers < 0 \
                or self.steps_per_execution < 1 or self.devices < 0:
            raise CovidctError("epochs must be >= 0, batch size >= 1, workers >= 0, steps "
                               "per execution >= 1 and devices >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise CovidctError(f"the validation fraction must be in [0, 1), got "
                               f"{self.val_fraction}")
        if not 0.0 < self.train_fraction <= 1.0:
            raise CovidctError(f"the training fraction must be in (0, 1], got "
                               f"{self.train_fraction}")

    def negative_weight(self, task: str) -> float:
        """The weight of the negative class for ``task``."""
        return DEFAULT_CLASS_WEIGHT[task] if self.class_weight is None else self.class_weight


@dataclass(frozen=True)
class SegmenterTrainParams:
    """Training the DenseNet121-FPN lung segmenter."""

    epochs: int = option(4, "epochs")
    batch_size: int = option(8, "slices per batch")
    size: int = option(128, "network input size, a multiple of 32 (the paper: 256)")
    slices_per_scan: int = option(
        24, "slices drawn per training scan and epoch, 80%% from the lung (0 = all lung slices "
            "and 25%% more outside)")
    fov_mm: float = option(
        320.0, "in-plane field of view (mm) each slice is cropped/padded to about its centre "
               "before the resize: a fixed mm per network pixel whatever the scanner (0 = whole "
               "slices)")
    lr: float = option(1e-3, "Adam learning rate")
    pyramid_filters: int = option(256, "FPN width")
    segmentation_filters: int = option(128, "segmentation-head width")
    bn_momentum: float = option(0.9, "BatchNormalization momentum")
    augment: bool = option(True, "light in-plane augmentation")
    val_fraction: float = option(0.2, "fraction of the patients held out for validation")
    seed: int = option(0, "random seed")

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise CovidctError("epochs and batch size must be at least 1", step="train-segmenter")
        if self.size < 32 or self.size % 32:
            raise CovidctError(f"the FPN input size must be a multiple of 32 (got {self.size})",
                               step="train-segmenter")


@dataclass(frozen=True)
class EvaluationParams:
    """Diagnostic evaluation of one site."""

    threshold: float = option(
        0.5, "probability at or above which a patient is called COVID-19 (the authors' code "
             "used 0.8: config/paper.yaml)")
    ci: Literal["delong", "bootstrap"] = option("delong", "AUC confidence interval method")
    ci_level: float = option(0.95, "confidence level")
    n_bootstrap: int = option(2000, "bootstrap resamples with --ci bootstrap")
    seed: int = option(0, "bootstrap seed")
    calibration_bins: int = option(10, "calibration bins")
    calibration_strategy: Literal["quantile", "uniform"] = option(
        "quantile", "equal-count (quantile) or equal-width bins")
    hl_groups: int = option(10, "Hosmer-Lemeshow groups g (df = g - 2)")
    age_bands: tuple[int, ...] = option(
        (50, 65), "cut points (years) of the age-band subgroups, lower <= age < upper: 50 65 "
                  "gives <50, 50-64, >=65 (none: no age subgroups)", metavar="AGE")

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise CovidctError(f"threshold {self.threshold} is not a probability in [0, 1]")
        if any(b <= a for a, b in zip(self.age_bands, self.age_bands[1:])):
            raise CovidctError(f"age bands {list(self.age_bands)} are not increasing")


@dataclass(frozen=True)
class PrognosisParams:
    """The Cox model of hospital stay and its risk groups."""

    selection: Literal["forward", "backward", "stepwise", "aic", "ridge"] = option(
        "stepwise", "covariate selection: by Wald p-value (forward, backward, stepwise), by "
                    "-2logL + k*params (aic), or none: every candidate in one L2-penalised model "
                    "(ridge)")
    ridge_penalizer: str | float = option(
        "auto", "L2 penalizer of --selection ridge: a positive number, or auto: chosen by "
                "cross-validated partial likelihood on the training patients",
        type=ridge_penalizer, metavar="auto|X")
    p_enter: float = option(0.05, "entry level of the p-value selections")
    p_stay: float = option(0.10, "stay level of the p-value selections")
    ic_penalty: float = option(2.0, "penalty per parameter for --selection aic (2 = AIC)")
    max_features: int = option(10, "at most this many covariates in a selected model")
    events_per_feature: float = option(
        10.0, "at most one selected covariate per this many training discharges (0 = no cap)")
    penalizer: float = option(0.0, "lifelines L2 penalizer of a selected model (0 = plain Cox)")
    min_events: int = option(10, "fewest discharges the training patients need")
    min_follow_up_days: float = option(
        0.0, "keep the COVID-19 patients with at least this many days of follow-up (stay_days; "
             "the paper: 5)")
    n_boot: int = option(1000, "bootstrap resamples for the C-index CI")
    seed: int = option(0, "seed of the bootstrap and the ridge cross-validation")


@dataclass(frozen=True)
class ExplainParams:
    """Saliency maps, filter patterns and the PCA of the DL feature."""

    n_per_site: int = option(3, "COVID-19 patients per site with a saliency figure")
    fraction_for: Literal["sample", "all"] = option(
        "all", "in-lung saliency fraction for the sampled patients or every COVID-19 patient")
    smooth_sigma: float = option(1.0, "Gaussian sigma (voxels) of the |gradient| overlay")
    layers: tuple[str, ...] = option(
        (), "layers for filter patterns (none given: 4 Conv3D layers spread from first to last; "
            "'none': skip)")
    filters_per_layer: int = option(9, "filters per layer")
    steps: int = option(40, "gradient-ascent steps")
    step_size: float = option(0.1, "RMS size of one gradient-ascent step (input is z-scored)")
    pattern_shape: tuple[int, int, int] | None = option(
        None, "input size for filter patterns (default: the model's input)",
        metavar=("D", "H", "W"))
    seed: int = option(0, "seed of the patient sample and the filter patterns' noise")


@dataclass(frozen=True)
class TrackingParams:
    """Where runs are tracked. ``none`` turns tracking off."""

    tracking_uri: str = option(DEFAULT_TRACKING_URI,
                               "MLflow tracking URI (a sqlite:/// database or http://host:port;"
                               " 'none' = no tracking)")
    experiment: str = option(DEFAULT_EXPERIMENT, "MLflow experiment")

    @property
    def enabled(self) -> bool:
        return str(self.tracking_uri).strip().lower() != "none"


# --------------------------------------------------------------------------- the command line

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _argparse_kwargs(f, hint) -> dict:
    """argparse keywords for one field, from its type hint and metadata."""
    meta = dict(f.metadata)
    kwargs: dict[str, Any] = {"help": meta.pop("help", "")}
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]                                        # X | None
    origin = get_origin(hint)
    if hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        kwargs["choices"] = get_args(hint)
    elif origin is tuple:
        inner = get_args(hint)
        kwargs["nargs"] = "*" if len(inner) == 2 and inner[1] is Ellipsis else len(inner)
        kwargs["type"] = inner[0]
    elif hint in (int, float, str):
        kwargs["type"] = hint
    kwargs.update(meta)
    if f.default is not MISSING and f.default not in (None, ()):
        shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        kwargs["help"] += f" (default: {shown})".replace("%", "%%")
    kwargs["default"] = f.default
    return kwargs


def add_options(parser: argparse.ArgumentParser, cls, *, exclude: tuple[str, ...] = (),
                defaults: Mapping[str, Any] | None = None) -> None:
    """One ``--option`` per field of the dataclass ``cls`` (``defaults`` override its defaults,
    e.g. a value a model's plan recorded)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in exclude:
            continue
        kwargs = _argparse_kwargs(f, hints[f.name])
        if defaults and f.name in defaults:
            kwargs["default"] = defaults[f.name]
        parser.add_argument(_flag(f.name), dest=f.name, **kwargs)


def from_args(cls, args: argparse.Namespace, **overrides):
    """The dataclass ``cls`` from parsed options (tuples for list values)."""
    values = {}
    for f in fields(cls):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def from_config(cls, section: Mapping[str, Any] | None, **overrides):
    """The dataclass ``cls`` from a config section (keys that are not fields are ignored)."""
    names = {f.name for f in fields(cls)}
    values = {k: (tuple(v) if isinstance(v, list) else v)
              for k, v in (section or {}).items() if k in names}
    values.update(overrides)
    return cls(**values)


def as_options(params, *, exclude: tuple[str, ...] = ()) -> str:
    """The command-line options that give ``params`` (every field, quoted for a shell)."""
    words: list[str] = []
    defaults = {f.name: f.default for f in fields(params)}
    for name, value in asdict(params).items():
        if name in exclude or value is None:
            continue
        if isinstance(value, bool):
            words.append(_flag(name) if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, (tuple, list)):
            if value or defaults.get(name):              # a bare flag empties a default list
                words += [_flag(name), *map(str, value)]
        else:
            words += [_flag(name), str(value)]
    return " ".join(shlex.quote(w) for w in words)


STAGE_PARAMS = {
    "ingest": IngestParams, "segmentation.threshold": ThresholdParams, "roi": RoiParams,
    "training": TrainParams, "segmentation.train": SegmenterTrainParams,
    "evaluation": EvaluationParams, "prognosis": PrognosisParams, "explain": ExplainParams,
    "mlflow": TrackingParams,
}
"""Config section -> the dataclass of its stage parameters (the schema test reads this)."""
