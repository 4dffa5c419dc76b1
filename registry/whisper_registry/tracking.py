"""Where runs and versions go: MLFLOW_TRACKING_URI when set, else an embedded sqlite store.

The embedded default is ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlartifacts``.
MLflow itself would put a sqlite store's artifacts in ``./mlruns``, so the registry's experiment
is created with an explicit artifact location beside the database. Against a tracking server
(``http://...``) the server decides where artifacts go (``--artifacts-destination``).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlflow
from mlflow import MlflowClient

from mlflow_faster_whisper.uris import sqlite_database
from whisper_registry import tags

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
    database = sqlite_database(uri)
    if database is None:
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


# Run tag naming the process that runs a workflow (``owner()``): a later workflow on the same host
# can tell a run whose process died (SIGKILL, OOM, power) from one still going, and end it.
RUN_OWNER = "whisper_registry.owner"


def owner() -> str:
    """This process as ``host:pid:start``; ``start`` tells a dead process from a later one with its pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid()) or ''}"


def owner_is_dead(text: Optional[str]) -> bool:
    """Whether the process ``owner()`` described (maybe followed by ``:<more>``) is known to have ended.

    Only a process of this host can be checked: one of another host, or an unreadable owner,
    counts as alive.
    """
    host, pid_text, start = ((text or "").split(":") + ["", "", ""])[:3]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's process: alive
    now = _start_time(pid)
    # A zombie has ended; a different start time means the pid now names another process.
    return now == "Z" or bool(start and now and now != start)


def _start_time(pid: int) -> Optional[str]:
    """The start time of ``pid`` in clock ticks since boot (Linux ``/proc``), ``"Z"`` for a zombie, or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return "Z"
    return fields[19] if len(fields) > 19 else None


def end_dead_runs(experiment_id: str, kind: str) -> list[str]:
    """End as KILLED the RUNNING runs of workflow ``kind`` whose process on this host has died.

    Their logged models still PENDING are marked FAILED. A run of a process on another host is
    left alone: its liveness cannot be checked from here.

    Returns:
        The ids of the runs ended.
    """
    mlflow_client = client()
    ended = []
    runs = mlflow_client.search_runs([experiment_id], filter_string=f"tags.`{tags.RUN_KIND}` = '{kind}' and attributes.status = 'RUNNING'")
    for run in runs:
        holder = run.data.tags.get(RUN_OWNER)
        if not owner_is_dead(holder):
            continue
        _logger.warning("Ending run %s: its process %s died while it ran", run.info.run_id, holder)
        _fail_pending_models(mlflow_client, experiment_id, run.info.run_id)
        mlflow_client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    return ended


def _fail_pending_models(mlflow_client: MlflowClient, experiment_id: str, run_id: str) -> None:
    from mlflow.entities import LoggedModelStatus

    found = mlflow_client.search_logged_models(experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'")
    for model in found:
        if model.status == LoggedModelStatus.PENDING:
            mlflow_client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)


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
