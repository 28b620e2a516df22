"""Trained COVID-19Net files: loading one with its DL feature, and its input size read without
importing the network's backend."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from covidct.errors import CovidctError

FEATURE_LAYER = "dl_feature"


def load_feature_model(path: str | Path):
    """Load a saved Keras model and wrap it to return (probability, dl_feature)."""
    import keras

    path = Path(path)
    if not path.exists():
        raise CovidctError("model file not found", path=path)
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as err:       # any load failure is a bad model file
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


def keras_input_shape(path: str | Path) -> tuple[int, int, int] | None:
    """The (D, H, W) input size of a saved ``.keras`` model, read from its config.json without
    importing TensorFlow; None when it cannot be read that way (then the model tells)."""
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
    except Exception:              # any odd file: the model itself tells, once loaded
        return None


MODEL_URI_SCHEMES = ("models:/", "runs:/")


def is_model_uri(source) -> bool:
    """An MLflow model URI (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/...``)."""
    return str(source).startswith(MODEL_URI_SCHEMES)


def download_model(uri: str, tracking, dst: str | Path | None = None) -> Path:
    """The model.keras of a model logged to MLflow, downloaded (into ``dst`` or a temporary
    folder). ``tracking`` (TrackingParams) names the tracking server and registry."""
    import tempfile

    import mlflow

    if not tracking.enabled:
        raise CovidctError(f"{uri} is an MLflow model URI, but tracking is off "
                           "(--tracking-uri none)")
    mlflow.set_tracking_uri(tracking.tracking_uri)
    mlflow.set_registry_uri(tracking.tracking_uri)
    dst = Path(dst or tempfile.mkdtemp(prefix="covidct-model-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as err:        # MLflow raises several kinds for an unknown model
        raise CovidctError(f"cannot fetch the model {uri} from {tracking.tracking_uri} "
                           f"({type(err).__name__}: {err})") from None
    found = sorted(local.rglob("*.keras"))
    if not found:
        raise CovidctError(f"the MLflow model {uri} holds no .keras file", path=local)
    return found[0]
