"""Registered versions for tests and bench: the same real weights logged as several versions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow import MlflowClient


def log_versions(tracking_uri: str, ct2_dir: Path, name: str, count: int, *, experiment: str = "bento", **log_options: Any) -> MlflowClient:
    """Log ``ct2_dir`` ``count`` times as new versions of ``name`` in ``tracking_uri``, each in its
    own run; a client of that store. The process's tracking URI is left as it was."""
    import mlflow

    import mlflow_faster_whisper

    previous = mlflow.get_tracking_uri()  # a bench's own store: set_tracking_uri(None) would unset it
    mlflow.set_tracking_uri(tracking_uri)
    try:
        mlflow.set_experiment(experiment)
        for _ in range(count):
            with mlflow.start_run():
                mlflow_faster_whisper.log_model(str(ct2_dir), name="model", registered_model_name=name, **log_options)
    finally:
        mlflow.set_tracking_uri(previous)
    return MlflowClient(tracking_uri)
