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


CONFIG_HASH_ENV = "COVIDCT_CONFIG_HASH"   # the workflow's effective config hash, for its jobs
PARENT_RUN_ENV = "COVIDCT_PARENT_RUN_ID"  # the workflow invocation's run, parent of its jobs' runs
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # UI opens on the runs
BUSY_TIMEOUT_S = 60                       # SQLite waits this long for a lock before failing
CANDIDATE_ALIAS = "candidate"             # set on every newly registered model version
PATH_COLUMNS = ("image", "roi", "source")  # file paths: never part of a logged dataset


def config_hash(config: Mapping[str, Any] | str | Path | None = None) -> str:
    """A short, stable hash of a config (a mapping, or a YAML/JSON file).

    Without one, the workflow's hash of its effective config (``COVIDCT_CONFIG_HASH``, set for
    every rule) is used; outside the workflow, "none".
    """
    if config is None:
        return os.environ.get(CONFIG_HASH_ENV) or "none"
    if isinstance(config, (str, Path)):
        text = Path(config).read_text(encoding="utf-8") if Path(config).exists() else str(config)
        try:
            import yaml

            config = yaml.safe_load(text)
        except Exception:           # hash the raw text when it is not YAML
            return hashlib.sha256(text.encode()).hexdigest()[:12]
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI (None for other URIs)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0])


def store_uri(tracking_uri: str) -> str:
    """The URI MLflow is given: a SQLite database waits for locks (``timeout``) instead of
    failing with "database is locked" when parallel jobs log at once."""
    if sqlite_path(tracking_uri) is None or "?" in tracking_uri:
        return tracking_uri
    return f"{tracking_uri}?timeout={BUSY_TIMEOUT_S}"


def ensure_sqlite_dir(tracking_uri: str) -> None:
    """Create the folder of a ``sqlite:///path`` database."""
    db = sqlite_path(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)


@contextmanager
def first_open_lock(tracking_uri: str) -> Iterator[None]:
    """Serialise the processes that open a SQLite tracking database: the first one creates
    MLflow's tables, which races ("table ... already exists") when jobs start together."""
    db = sqlite_path(tracking_uri)
    if db is None:
        yield
        return
    import fcntl

    ensure_sqlite_dir(tracking_uri)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def client(tracking_uri: str):
    """An ``MlflowClient`` on the tracking (and registry) URI."""
    import mlflow

    uri = store_uri(tracking_uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def get_experiment_id(tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT,
                      artifact_root: str | Path | None = None) -> str:
    """The experiment's id, creating it once (typed for model training, so that the UI opens
    on its runs), safe when jobs race to create the database or the experiment."""
    from mlflow.exceptions import MlflowException

    with first_open_lock(tracking_uri):
        mlflow_client = client(tracking_uri)
        found = mlflow_client.get_experiment_by_name(experiment)
        if found is not None:
            for key, value in EXPERIMENT_KIND.items():
                if key not in found.tags:
                    mlflow_client.set_experiment_tag(found.experiment_id, key, value)
            return found.experiment_id
        db = sqlite_path(tracking_uri)
        if artifact_root is None and db is not None:
            artifact_root = db.parent / "mlartifacts"
        try:
            location = Path(artifact_root).resolve().as_uri() if artifact_root else None
            return mlflow_client.create_experiment(experiment, artifact_location=location,
                                                   tags=EXPERIMENT_KIND)
        except MlflowException:
            found = mlflow_client.get_experiment_by_name(experiment)
            if found is None:
                raise
            return found.experiment_id


def standard_tags(config: Mapping[str, Any] | str | Path | None = None) -> dict[str, str]:
    """The tags every covidct run carries besides its own (``covidct.rule`` etc.)."""
    tags = {"mlflow.source.git.commit": git_commit(), "covidct.config_hash": config_hash(config)}
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    return tags


@contextmanager
def mlflow_run(tracking: TrackingParams, run_name: str, *,
               tags: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
               config: Mapping[str, Any] | str | Path | None = None,
               run_id: str | None = None) -> Iterator[Any]:
    """Start an MLflow run with the project's standard tags; yields the ``mlflow`` module's run.
    ``run_id``: continue that run (a resumed training), its tags and params already logged.

    Tags: ``covidct.rule`` etc. from ``tags``, plus ``mlflow.source.git.commit``,
    ``covidct.config_hash`` and, inside a workflow run, ``mlflow.parentRunId``.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    experiment_id = get_experiment_id(tracking.tracking_uri, tracking.experiment)
    mlflow.set_tracking_uri(store_uri(tracking.tracking_uri))
    mlflow.set_registry_uri(store_uri(tracking.tracking_uri))
    if run_id is not None:
        with mlflow.start_run(run_id=run_id) as run:
            yield run
        return
    all_tags = standard_tags(config)
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags) as run:
        if params:
            mlflow.log_params({k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                               for k, v in params.items()})
        yield run


# --------------------------------------------------------------------------- the workflow's run

def start_workflow_run(tracking: TrackingParams, config: Mapping[str, Any], *,
                       run_name: str, tags: Mapping[str, Any] | None = None) -> str:
    """The parent run of one workflow invocation, with the effective config as an artifact;
    its id goes to the jobs through ``COVIDCT_PARENT_RUN_ID``."""
    import tempfile

    import yaml

    experiment_id = get_experiment_id(tracking.tracking_uri, tracking.experiment)
    mlflow_client = client(tracking.tracking_uri)
    all_tags = {**standard_tags(config), "mlflow.runName": run_name,
                "covidct.rule": "workflow", **{k: str(v) for k, v in (tags or {}).items()}}
    all_tags.pop("mlflow.parentRunId", None)
    run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(json.loads(json.dumps(config, default=str)),
                                       sort_keys=False), encoding="utf-8")
        mlflow_client.log_artifact(run.info.run_id, str(path))
    return run.info.run_id


def end_workflow_run(tracking: TrackingParams, run_id: str, ok: bool) -> None:
    """Close the workflow's parent run as FINISHED or FAILED."""
    client(tracking.tracking_uri).set_terminated(run_id, "FINISHED" if ok else "FAILED")


# --------------------------------------------------------------------------- inputs and models

def sheet_dataset(rows, source: str | Path, name: str):
    """An MLflow dataset for a site's sheet rows: its schema, row count and a digest of the rows
    (patients and their labels), never the file paths."""
    import mlflow.data

    table = rows.drop(columns=[c for c in PATH_COLUMNS if c in rows.columns]).astype(str)
    digest = hashlib.sha256(table.to_csv(sep="\t", index=False).encode()).hexdigest()[:16]
    return mlflow.data.from_pandas(table, source=str(source), name=name, digest=digest)


def log_sheet_inputs(mlflow, sheet, source: str | Path, context: str, model_id: str | None = None
                     ) -> None:
    """Log each site's sheet rows as a dataset input of the active run (``context`` e.g.
    training, evaluation), with the model it was used with."""
    from mlflow.entities import LoggedModelInput

    model = LoggedModelInput(model_id=model_id) if model_id else None
    for site, rows in sheet.groupby("site", sort=True):
        mlflow.log_input(sheet_dataset(rows, source, f"{site} sheet"), context=context,
                         model=model)


def set_candidate_alias(tracking: TrackingParams, name: str, version: int | str) -> None:
    """Point the registered model's ``candidate`` alias at a new version."""
    client(tracking.tracking_uri).set_registered_model_alias(name, CANDIDATE_ALIAS, str(version))


def model_version_of(tracking: TrackingParams, registered: str, version: int | str):
    """The registry's model version (None when the registry does not know it)."""
    from mlflow.exceptions import MlflowException

    try:
        return client(tracking.tracking_uri).get_model_version(registered, str(version))
    except MlflowException:
        return None


def log_files(tracking: TrackingParams, run_name: str, rule: str, files, *,
              metrics: Mapping[str, float] | None = None) -> str | None:
    """One run of a gather stage (tables, flow, learning curve) holding its tables and figures
    as artifacts; None when tracking is off."""
    if not tracking.enabled:
        return None
    import mlflow

    with mlflow_run(tracking, run_name, tags={"covidct.rule": rule}) as run:
        if metrics:
            mlflow.log_metrics(dict(metrics))
        for path in files:
            mlflow.log_artifact(str(path))
        return run.info.run_id


def logged_model_exists(tracking: TrackingParams, model_id: str) -> bool:
    """Whether the tracking store holds the logged model ``model_id``."""
    from mlflow.exceptions import MlflowException

    try:
        client(tracking.tracking_uri).get_logged_model(model_id)
        return True
    except MlflowException:
        return False
