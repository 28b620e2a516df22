"""One Keras training protocol for every network of the pipeline.

:class:`Trainer` owns what every training run does: seeding, the epoch loop with best-epoch
selection, the atomic save of ``model.keras``, ``history.csv``, MLflow (params, per-epoch metrics,
artifacts, the registered model) and, last, ``run.json``. A network is a small subclass that
overrides the hooks: :meth:`prepare`, :meth:`build`, :meth:`data`, :meth:`validate`,
:meth:`score`, and, where it needs to, :meth:`callbacks`, :meth:`final_model`,
:meth:`after_training`, :meth:`resume_state` and :meth:`restore`.

A killed run resumes: after every epoch the run's state goes to ``OUT/resume/`` (weights with
the optimizer's state, the epoch rows, the best epoch's weights, the MLflow run), and a restart
with the same parameters continues after the last finished epoch, in the same MLflow run, with
the data order an uninterrupted run has. A finished run removes the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidct.errors import CovidctError
from covidct.io.atomic import atomic_path, write_csv
from covidct.io.results import remove_run, write_run
from covidct.io.tracking import CANDIDATE_ALIAS, set_candidate_alias
from covidct.params import PRECISION_POLICIES, TrackingParams

log = logging.getLogger(__name__)


def configure_keras(seed: int, precision: str = "none", deterministic: bool = True):
    """Seed everything, optionally make TensorFlow ops deterministic, set the dtype policy;
    returns the ``keras`` module."""
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(int(seed))
    if deterministic and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_dtype_policy(PRECISION_POLICIES[precision])
    return keras


@contextlib.contextmanager
def data_parallel(keras, devices: int):
    """Within the block, Keras distributes training over ``devices`` accelerators (0 = all) of
    the JAX backend (``keras.distribution.DataParallel``); yields how many take part."""
    if keras.backend.backend() != "jax" or devices == 1:
        yield 1
        return
    import jax

    available = jax.devices()
    if devices > len(available):
        raise CovidctError(f"training.devices is {devices} but JAX sees {len(available)} "
                           f"device(s): {', '.join(str(d) for d in available)}")
    chosen = available[:devices] if devices else available
    if len(chosen) == 1:
        yield 1
        return
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=chosen))
    try:
        yield len(chosen)
    finally:
        keras.distribution.set_distribution(previous)


def compute_device(keras) -> str:
    """The device the backend computes on, e.g. 'gpu:0 (NVIDIA H200)' or 'cpu'."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return f"{device.platform}:{device.id} ({device.device_kind})"
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return f"gpu:0 ({gpus[0].name})" if gpus else "cpu"
    if backend == "torch":
        import torch

        return f"gpu:0 ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return "unknown"


def set_threads(n: int) -> None:
    """Limit TensorFlow's CPU threads (0 = all cores); call before any TF op runs."""
    if n <= 0:
        return
    for var in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ[var] = str(n)
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(n)
            tf.config.threading.set_inter_op_parallelism_threads(n)
        except RuntimeError:   # already initialised: the environment variables still apply
            pass


def weights_digest(weights: Sequence[np.ndarray]) -> str:
    """A short SHA-256 of a model's weights (order, shapes and float32 values)."""
    h = hashlib.sha256()
    for w in weights:
        w = np.ascontiguousarray(np.asarray(w, dtype=np.float32))
        h.update(str(w.shape).encode())
        h.update(w.tobytes())
    return h.hexdigest()[:16]


def log_keras_model(model, registered_name: str | None):
    """Log ``model`` with the MLflow Keras flavour and register it as ``registered_name``.

    The signature is a tensor spec of the model's input and output, and the requirements are
    explicit, so MLflow neither re-imports the model nor stores an input example.
    """
    import keras
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def spec(tensor, name):
        return Schema([TensorSpec(np.dtype(np.float32), (-1, *tensor.shape[1:]), name)])

    signature = ModelSignature(inputs=spec(model.inputs[0], model.layers[0].name),
                               outputs=spec(model.outputs[0], model.layers[-1].name))
    requirements = [f"keras=={keras.__version__}", f"mlflow=={mlflow.__version__}"]
    backend = keras.backend.backend()
    if backend in ("tensorflow", "jax"):
        module = __import__(backend)
        requirements.append(f"{backend}=={module.__version__}")
    return mlflow.keras.log_model(model, name="model", signature=signature,
                                  registered_model_name=registered_name,
                                  pip_requirements=requirements)


class Trainer:
    """One training run into the folder ``out`` (see the module docstring for the hooks).

    ``name`` names the run, the MLflow run and the registered model (``covidct-NAME``).
    """

    rule = "train"                 # the workflow rule, an MLflow tag
    precision = "none"             # a key of PRECISION_POLICIES
    deterministic = True           # TensorFlow op determinism
    loop = "fit"                   # auto | fit | jax (see training_loop)
    steps_per_call = 1             # batches per compiled call of the jax loop
    devices = 1                    # data-parallel devices on the JAX backend (0 = all)
    model_kind = "model"

    def __init__(self, out: str | Path, *, name: str, epochs: int, seed: int,
                 tracking: TrackingParams = TrackingParams(), register: bool = True,
                 tags: dict[str, str] | None = None, config: str | Path | None = None):
        self.out = Path(out)
        self.name = name
        self.epochs = int(epochs)
        self.seed = int(seed)
        self.tracking = tracking
        self.register = register
        self.extra_tags = dict(tags or {})
        self.config = config
        self.artifacts: list[Path] = []

    # ---- hooks ---------------------------------------------------------------------------
    def prepare(self) -> None:
        """Read and check the training data (before Keras starts)."""

    def build(self, keras):
        """The compiled model to train."""
        raise NotImplementedError

    def data(self):
        """The training data (a ``keras.utils.PyDataset``)."""
        raise NotImplementedError

    def callbacks(self, keras) -> list:
        """Callbacks after the epoch bookkeeping (they see its validation metrics in ``logs``)."""
        return []

    def validate(self, model) -> dict[str, float]:
        """This epoch's validation metrics (empty without validation data)."""
        return {}

    def score(self, row: dict[str, float]) -> tuple:
        """The epoch's rank for selection: the largest is kept (default: the last epoch)."""
        return (row["epoch"],)

    def on_best(self, epoch: int) -> None:
        """Called when ``epoch`` becomes the best so far."""

    def final_model(self, keras, model, weights):
        """The model to save, holding the selected ``weights``."""
        model.set_weights(weights)
        return model

    def after_training(self, final) -> dict[str, float]:
        """Write the variant's own outputs (listed in ``self.artifacts``); returns summary
        metrics of the selected model (logged as ``selected_*`` and kept in run.json).
        ``self.selected_row`` is the selected epoch's row of history.csv."""
        return {}

    def params(self) -> dict[str, Any]:
        """MLflow params of this run."""
        return {}

    def tags(self) -> dict[str, str]:
        return {}

    def record(self) -> dict[str, Any]:
        """What run.json holds besides the common keys."""
        return {}

    def log_inputs(self, mlflow) -> None:
        """Log the training data as the MLflow run's dataset inputs."""

    def resume_state(self) -> dict[str, Any]:
        """JSON-able state of the subclass that a resumed run needs (saved every epoch)."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back :meth:`resume_state`'s dict when resuming."""

    # ---- the protocol --------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train, select, save and record; returns the run.json record."""
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.out.mkdir(parents=True, exist_ok=True)
        remove_run(self.out)          # a failed re-run must not leave the previous record
        self.prepare()
        keras = configure_keras(self.seed, self.precision, self.deterministic)
        with data_parallel(keras, self.devices) as n_devices:
            return self._train(keras, n_devices)

    def _train(self, keras, n_devices: int) -> dict[str, Any]:
        model = self.build(keras)
        data = self.data()
        device = compute_device(keras)
        loop = self.training_loop(keras)
        log.info("%s: Keras %s on %s, computing on %s%s, training loop %s", self.name,
                 keras.__version__, keras.backend.backend(), device,
                 f" and {n_devices - 1} more (data parallel)" if n_devices > 1 else "",
                 loop if loop == "fit" else f"{loop} ({self.steps_per_call} steps a call)")
        params = {**self.params(), "name": self.name, "epochs": self.epochs, "seed": self.seed,
                  "backend": keras.backend.backend(), "device": device,
                  "keras_version": keras.__version__, "loop": loop, "devices": n_devices,
                  "n_params": int(model.count_params())}
        tags = {"covidct.rule": self.rule, "covidct.model": self.model_kind, **self.tags(),
                **self.extra_tags}
        resume = ResumePoint(self.out / RESUME_DIR, params)
        state = resume.load()
        with self._tracking_run(tags, params, state) as (mlflow, active):
            if mlflow is not None and state is None:
                self.log_inputs(mlflow)
            epochs = epoch_log(self, keras, mlflow)
            done = 0 if state is None else resume.restore(model, epochs, state, self, data)
            if self.epochs and done < self.epochs:
                run_id = None if active is None else active.info.run_id
                self.fit(keras, model, data, done, [epochs, *self.callbacks(keras),
                                                    resume.callback(keras, epochs, self, run_id)])
            best = epochs.best_weights or model.get_weights()
            self.selected_row = epochs.rows[epochs.best_epoch - 1] if epochs.rows else {}
            final = self.final_model(keras, model, best)
            history = self.out / "history.csv"
            write_csv(history, epochs.table())
            with atomic_path(self.out / "model.keras") as tmp:
                final.save(tmp)
            summary = self.after_training(final)
            record = {"name": self.name, "selected_epoch": epochs.best_epoch,
                      "input_shape": [int(s) for s in final.inputs[0].shape[1:-1]],
                      "backend": params["backend"], "device": device,
                      "history": history.name, **summary,
                      **self.record(), "run_id": None, "experiment_id": None,
                      "tracking_uri": None, "model_uri": None, "model_id": None,
                      "registered_model": None, "version": None, "alias": None}
            if mlflow is not None:
                selected = {f"selected_{k}": v for k, v in summary.items()
                            if isinstance(v, (int, float)) and math.isfinite(v)}
                mlflow.log_metrics({"selected_epoch": epochs.best_epoch, **selected})
                for path in (history, *self.artifacts):
                    mlflow.log_artifact(str(path))
                registered = f"covidct-{self.name}" if self.register else None
                info = log_keras_model(final, registered)
                version = info.registered_model_version
                record.update(run_id=active.info.run_id,
                              experiment_id=active.info.experiment_id,
                              tracking_uri=self.tracking.tracking_uri, model_uri=info.model_uri,
                              model_id=info.model_id, registered_model=registered,
                              version=None if version is None else int(version))
                if registered and version is not None:
                    set_candidate_alias(self.tracking, registered, version)
                    record["alias"] = f"models:/{registered}@{CANDIDATE_ALIAS}"
        write_run(self.out, record)
        resume.clear()
        log.info("selected epoch %d (%s); model %s, MLflow run %s, %s version %s",
                 epochs.best_epoch, ", ".join(f"{k} {v:.4g}" for k, v in summary.items()
                                              if isinstance(v, float)) or "no validation",
                 self.out / "model.keras", record["run_id"], record["registered_model"],
                 record["version"])
        return record

    def training_loop(self, keras) -> str:
        """``jax`` (the compiled loop of :mod:`covidct.model.jax_loop`) or ``fit``."""
        if self.loop == "auto":
            return "jax" if keras.backend.backend() == "jax" else "fit"
        if self.loop == "jax" and keras.backend.backend() != "jax":
            raise CovidctError(f"the jax training loop needs the JAX backend, not "
                               f"{keras.backend.backend()} (set KERAS_BACKEND=jax, or "
                               f"training.loop: fit)")
        return self.loop

    def fit(self, keras, model, data, initial_epoch: int, callbacks: list) -> None:
        """Train ``model`` on ``data`` from ``initial_epoch`` with ``callbacks``."""
        if self.training_loop(keras) == "jax":
            from covidct.model.jax_loop import JaxLoop

            JaxLoop(model, self.steps_per_call).fit(data, epochs=self.epochs,
                                                    initial_epoch=initial_epoch,
                                                    callbacks=callbacks)
        else:
            model.fit(data, epochs=self.epochs, initial_epoch=initial_epoch, shuffle=False,
                      verbose=0, callbacks=callbacks)

    @contextlib.contextmanager
    def _tracking_run(self, tags, params, state=None):
        if not self.tracking.enabled:
            yield None, None
            return
        import mlflow

        from covidct.io.tracking import mlflow_run

        run_id = (state or {}).get("run_id")
        with mlflow_run(self.tracking, self.name, tags=tags, params=params,
                        config=self.config, run_id=run_id) as active:
            yield mlflow, active


RESUME_DIR = "resume"


class ResumePoint:
    """The last finished epoch of a training run, in ``folder`` (OUT/resume/).

    ``state.json`` holds the parameters' fingerprint, the epochs done, the history rows, the
    best epoch and its score, the MLflow run, the subclass's :meth:`Trainer.resume_state` and
    the names of ``epochN.weights.h5`` (the model's and the optimizer's variables after epoch N)
    and ``bestM.npz`` (the best epoch's weights). A state whose fingerprint differs (other
    parameters, data or network) is discarded.
    """

    def __init__(self, folder: Path, params: dict[str, Any]):
        self.folder = Path(folder)
        text = json.dumps(params, sort_keys=True, default=str)
        self.fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]

    def load(self) -> dict[str, Any] | None:
        path = self.folder / "state.json"
        if not path.is_file():
            return None
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("fingerprint") != self.fingerprint:
            log.warning("%s holds a run with other parameters: starting afresh", self.folder)
            self.clear()
            return None
        return state

    def save(self, model, epochs, trainer: Trainer, run_id: str | None) -> None:
        """This epoch's state, in files named by the epoch; ``state.json``, replaced last,
        names them, so a run killed at any moment leaves a state and weights that agree."""
        self.folder.mkdir(parents=True, exist_ok=True)
        done = len(epochs.rows)
        latest = f"epoch{done}.weights.h5"
        model.save_weights(str(self.folder / latest), overwrite=True)
        best = f"best{epochs.best_epoch}.npz"
        if not (self.folder / best).exists():
            with atomic_path(self.folder / best) as tmp, open(tmp, "wb") as f:
                np.savez(f, *epochs.best_weights)
        state = {"fingerprint": self.fingerprint, "epochs_done": done, "weights": latest,
                 "best_weights": best, "rows": epochs.rows, "best_epoch": epochs.best_epoch,
                 "best_score": list(epochs.best), "run_id": run_id,
                 "trainer": trainer.resume_state()}
        with atomic_path(self.folder / "state.json") as tmp:
            Path(tmp).write_text(json.dumps(state), encoding="utf-8")
        for old in self.folder.glob("*.h5"):
            if old.name != latest:
                old.unlink()
        for old in self.folder.glob("*.npz"):
            if old.name != best:
                old.unlink()

    def restore(self, model, epochs, state: dict[str, Any], trainer: Trainer, data) -> int:
        """Put the saved state back into ``model``, ``epochs``, ``trainer`` and ``data``;
        returns the number of epochs done."""
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(str(self.folder / state["weights"]))
        with np.load(self.folder / state["best_weights"]) as best:
            epochs.best_weights = [best[f"arr_{i}"] for i in range(len(best.files))]
        epochs.rows = [dict(row) for row in state["rows"]]
        epochs.best, epochs.best_epoch = tuple(state["best_score"]), int(state["best_epoch"])
        trainer.restore(state["trainer"])
        done = int(state["epochs_done"])
        if hasattr(data, "start_at"):
            data.start_at(done)
        else:    # e.g. the segmenter's slice sampler, whose draws follow one running generator
            log.warning("%s: its data cannot start at epoch %d: the resumed epochs draw other "
                        "samples than an uninterrupted run", trainer.name, done + 1)
        log.info("%s: resuming after epoch %d of %d (best so far: epoch %d), from %s",
                 trainer.name, done, trainer.epochs, epochs.best_epoch, self.folder)
        return done

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def callback(self, keras, epochs, trainer: Trainer, run_id: str | None):
        """A Keras callback, last in the list, that saves the state after every epoch but the
        last (when every other callback, e.g. the learning-rate schedule, has updated it)."""
        point = self

        class SaveResumePoint(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch + 1 < trainer.epochs:
                    point.save(self.model, epochs, trainer, run_id)

        return SaveResumePoint()


def epoch_log(trainer: Trainer, keras, mlflow):
    """The per-epoch bookkeeping as a Keras callback: validation metrics (put into ``logs`` for
    the callbacks after it), the log line, MLflow metrics and the best epoch's weights."""

    class EpochLog(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rows: list[dict[str, float]] = []
            self.best: tuple | None = None
            self.best_weights = None
            self.best_epoch = 0
            self.start = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            row = {"epoch": epoch + 1, "loss": float(logs.get("loss", math.nan)),
                   **{k: float(v) for k, v in logs.items() if k != "loss"}}
            validation = trainer.validate(self.model)
            row.update(validation)
            logs.update(validation)
            row["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            row["seconds"] = time.perf_counter() - self.start
            self.rows.append(row)
            key = trainer.score(row)
            if self.best is None or key > self.best:
                self.best, self.best_epoch = key, epoch + 1
                self.best_weights = [np.array(w) for w in self.model.get_weights()]
                trainer.on_best(epoch + 1)
            log.info("epoch %d/%d %s %.1f s", epoch + 1, trainer.epochs,
                     " ".join(f"{k} {v:.4g}" for k, v in row.items()
                              if k not in ("epoch", "seconds")), row["seconds"])
            if mlflow is not None:
                mlflow.log_metrics({k: v for k, v in row.items()
                                    if k != "epoch" and not math.isnan(v)}, step=epoch + 1)

        def table(self) -> pd.DataFrame:
            return pd.DataFrame(self.rows)

    return EpochLog()
