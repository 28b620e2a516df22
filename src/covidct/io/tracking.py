"""MLflow tracking of the gather and per-site stages (never the per-patient fan-out).

The default backend is a SQLite database (MLflow 3.13+ refuses the file store). MLflow is imported
inside these functions only, so stages that do not track never load it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from covidct.params import DEFAULT_EXPERIMENT, TrackingParams

log = logging.getLogger(__name__)


def git_commit(repo: str | Path | None = None) -> str:
    """The checkout's commit (with '-dirty' when it has changes), or 'unknown' outside git."""
    cwd = str(repo) if repo else None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def config_hash(config: Mapping[str, Any] | str | Path | None) -> str:
    """A short, stable hash of a config (a mapping or a YAML/JSON file).

    Without one, the file named by ``COVIDCT_CONFIG`` (set by the workflow for every rule) is used.
    """
    if config is None:
        config = os.environ.get("COVIDCT_CONFIG") or None
    if config is None:
        return "none"
    if isinstance(config, (str, Path)):
        text = Path(config).read_text() if Path(config).exists() else str(config)
        try:
            import yaml

            config = yaml.safe_load(text)
        except Exception:           # hash the raw text when it is not YAML
            return hashlib.sha256(text.encode()).hexdigest()[:12]
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def ensure_sqlite_dir(tracking_uri: str) -> None:
    """Create the folder of a ``sqlite:///path`` database."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)


def get_experiment_id(tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT,
                      artifact_root: str | Path | None = None) -> str:
    """The experiment's id, creating it once (safe when rules race to create it)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    ensure_sqlite_dir(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    if artifact_root is None and tracking_uri.startswith("sqlite:///"):
        artifact_root = Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts"
    try:
        location = Path(artifact_root).resolve().as_uri() if artifact_root else None
        return client.create_experiment(experiment, artifact_location=location)
    except MlflowException:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


@contextmanager
def mlflow_run(tracking: TrackingParams, run_name: str, *,
               tags: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
               config: Mapping[str, Any] | str | Path | None = None) -> Iterator[Any]:
    """Start an MLflow run with the project's standard tags; yields the ``mlflow`` module's run.

    Tags: ``covidct.rule`` etc. from ``tags``, plus ``mlflow.source.git.commit`` and
    ``covidct.config_hash``.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    tracking_uri = tracking.tracking_uri
    experiment_id = get_experiment_id(tracking_uri, tracking.experiment)
    mlflow.set_tracking_uri(tracking_uri)
    all_tags = {"mlflow.source.git.commit": git_commit(),
                "covidct.config_hash": config_hash(config)}
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags) as run:
        if params:
            mlflow.log_params({k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                               for k, v in params.items()})
        yield run
