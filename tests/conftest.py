"""Test-wide settings: no model hub, no telemetry, a private MLflow store per test."""

from devkit.offline import go_offline

go_offline()  # before anything imports transformers, huggingface_hub, mlflow or bentoml

import mlflow  # noqa: E402
import pytest  # noqa: E402

pytest_plugins = ["devkit.pytest_plugin"]


@pytest.fixture(autouse=True)
def _experiment_stays_in_its_test(monkeypatch):
    """``mlflow.set_experiment`` writes MLFLOW_EXPERIMENT_ID into os.environ, past any monkeypatch:
    a test's experiment id would reach the next test's subprocesses, whose store lacks it. Recorded
    here as absent, it is absent again after every test."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A real sqlite-backed tracking store and registry in tmp_path, with artifacts beside it.

    Yields the tracking URI; MLFLOW_TRACKING_URI is set for subprocesses too.
    """
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment("tests", artifact_location=(tmp_path / "mlartifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
