"""Where runs and versions go: MLFLOW_TRACKING_URI when set, else an embedded sqlite store.

The embedded default is ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlartifacts``.
MLflow itself would put a sqlite store's artifacts in ``./mlruns``, so the registry's experiment
is created with an explicit artifact location beside the database. Against a tracking server
(``http://...``) the server decides where artifacts go (``--artifacts-destination``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

import mlflow
from mlflow import MlflowClient

_logger = logging.getLogger(__name__)

DEFAULT_DATABASE = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
# Runs of the registry workflows go here unless MLFLOW_EXPERIMENT_ID / MLFLOW_EXPERIMENT_NAME say otherwise.
DEFAULT_EXPERIMENT = "whisper-registry"


@dataclass(frozen=True)
class Tracking:
    """The resolved tracking URI and the experiment the workflows log runs to."""

    uri: str
    experiment_id: str


def default_tracking_uri(cwd: Optional[Path] = None) -> str:
    """The embedded default: ``sqlite:///<cwd>/mlflow.db`` (an absolute path, so a later chdir is harmless)."""
    return f"sqlite:///{(cwd or Path.cwd()).resolve() / DEFAULT_DATABASE}"


def artifact_root_for(uri: str) -> Optional[str]:
    """Where a local store keeps artifacts: ``mlartifacts`` beside a sqlite database; None otherwise."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None
    database = unquote(parsed.path)
    if uri.startswith("sqlite:////"):
        database = "/" + database.lstrip("/")  # sqlite:////abs/path
    elif database.startswith("/"):
        database = database[1:]  # sqlite:///relative/path
    if not database or database == ":memory:":
        return None
    return (Path(database).resolve().parent / DEFAULT_ARTIFACTS).as_uri()


def configure(tracking_uri: Optional[str] = None) -> Tracking:
    """Point MLflow at the registry's store and make sure the experiment exists.

    Precedence: ``tracking_uri``; a URI already set (``MLFLOW_TRACKING_URI`` or
    ``mlflow.set_tracking_uri``); the embedded sqlite default in the working directory.

    Returns:
        The tracking URI in use and the experiment id for new runs.
    """
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    elif not mlflow.is_tracking_uri_set():
        mlflow.set_tracking_uri(default_tracking_uri())
    uri = mlflow.get_tracking_uri()
    return Tracking(uri=uri, experiment_id=_experiment_id(uri))


def _experiment_id(uri: str) -> str:
    explicit_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if explicit_id:
        return explicit_id
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = artifact_root_for(uri)
    _logger.info("Creating experiment %r (artifacts: %s)", name, location or "the server's default")
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another process created it between the lookup and the create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def client() -> MlflowClient:
    """A client on the configured tracking and registry URIs."""
    return MlflowClient()


# Settings that would point MLflow somewhere other than the embedded default.
_TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


def fresh_embedded_workdir(workdir: Path) -> None:
    """Empty ``workdir``, make it the cwd and drop tracking settings from the environment, so the
    embedded default (./mlflow.db + ./mlartifacts there) is what MLflow uses. For the demos."""
    import shutil

    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    os.chdir(workdir)
    for name in _TRACKING_ENV:
        os.environ.pop(name, None)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")
