"""The workflows against a real `mlflow server`: PostgreSQL backend store, artifacts served by the
server (--artifacts-destination). PostgreSQL comes from .ci/postgres.sh (`make postgres`)."""

from __future__ import annotations

import os
import traceback
import uuid
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import mlflow
import pytest
from mlflow import MlflowClient

from devkit import processes

from tests.registry.conftest import TINY_DECODING
from whisper_registry.cli import main
from whisper_registry.compare import compare
from whisper_registry.errors import GateFailedError
from whisper_registry.evaluate import evaluate
from whisper_registry.promote import audit_trail, promote, rollback
from whisper_registry.register import register

pytestmark = pytest.mark.server

DEFAULT_POSTGRES_URI = "postgresql://mlflow:mlflow@127.0.0.1:5432/mlflow"
URI_FILE = Path(os.environ.get("MFW_TEST_POSTGRES_URI_FILE", "/tmp/mfw-test-postgres-uri"))


def _postgres_uri() -> str:
    if os.environ.get("MFW_TEST_POSTGRES_URI"):
        return os.environ["MFW_TEST_POSTGRES_URI"]
    if URI_FILE.is_file():
        return URI_FILE.read_text().strip()
    return DEFAULT_POSTGRES_URI


def _store_uri(uri: str, database: str) -> str:
    # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the dev extra installs psycopg2.
    parsed = urlparse(uri)
    scheme = "postgresql+psycopg2" if parsed.scheme in ("postgresql", "postgres") else parsed.scheme
    return urlunparse(parsed._replace(scheme=scheme, path=f"/{database}"))


@pytest.fixture(scope="module")
def postgres_database():
    """A fresh database per test session, dropped at the end."""
    import psycopg2  # the dev extra
    uri = _postgres_uri()
    try:
        admin = psycopg2.connect(uri, connect_timeout=3)
    except psycopg2.OperationalError as exc:
        why = (f"PostgreSQL is not reachable at {uri} ({str(exc).strip().splitlines()[0]}); run `make postgres` "
               "(.ci/postgres.sh) or set MFW_TEST_POSTGRES_URI")
        if os.environ.get("CI") == "true":  # CI installs and starts it: not reaching it is a failure there
            pytest.fail(why)
        pytest.skip(why)
    admin.autocommit = True
    name = f"mfw_test_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _store_uri(uri, name)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="module")
def mlflow_server(postgres_database, tmp_path_factory):
    """`mlflow server` as a real process; yields (tracking URI, artifacts destination)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with processes.mlflow_server(root, backend_store_uri=postgres_database) as url:
        yield url, root / "artifacts"


@pytest.fixture
def server_uri(mlflow_server, monkeypatch):
    url, artifacts = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(url)
    yield url, artifacts
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def test_register_evaluate_compare_promote_rollback_on_a_server(server_uri, tiny_whisper_hf, two_clips_manifest, tmp_path, capsys):
    url, artifacts = server_uri
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    result = register(tiny_whisper_hf, name, ["int8", "float32"], decoding=TINY_DECODING)
    assert [v.version for v in result.versions] == ["1", "2"]
    client = MlflowClient()
    assert client.get_experiment_by_name("whisper-registry").artifact_location.startswith("mlflow-artifacts:")
    # The artifacts went through the server to its destination, not to the local disk.
    assert list(artifacts.rglob("model.bin")) and not Path("mlartifacts").exists()

    evaluations = [evaluate(v.model_uri, two_clips_manifest) for v in result.versions]
    assert client.get_model_version(name, "1").tags["eval.run_id"] == evaluations[0].run_id
    comparison = compare(name, output_dir=tmp_path)
    assert [r["quantization"] for r in comparison.rows()] == ["int8", "float32"]
    assert {a.path for a in client.list_artifacts(comparison.run_id, "compare")} >= {f"compare/{name}-compare.png"}

    cer1 = evaluations[0].metrics["cer"]
    promote(name, "1", "staging", gates=[f"cer<={cer1 + 0.01}"])
    promote(name, "1", "production", gates=[f"cer<={cer1 + 0.01}"])
    with pytest.raises(GateFailedError):
        promote(name, "2", "production", gates=["cer<0"])
    assert str(client.get_registered_model(name).aliases["production"]) == "1"
    promote(name, "2", "production", max_regression=10)
    assert rollback(name, "production").to_version == "1"
    assert str(client.get_registered_model(name).aliases["production"]) == "1"

    # The CLI against the same server, through MLFLOW_TRACKING_URI.
    assert main(["compare", name, "--no-log", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "production,staging" in out
    assert main(["promote", name, "2", "--to", "staging", "--gate", "rtf<0"]) == 1
    assert str(client.get_registered_model(name).aliases["staging"]) == "1"


def test_concurrent_promotions_of_one_alias_keep_the_trail_and_the_gates(server_uri, tiny_whisper_hf, two_clips_manifest):
    """Promotions of one alias started at the same instant, six at a time, three rounds: every move
    is recorded in order, the alias is where the trail ends, and a version whose gate fails is
    never promoted."""
    import threading

    name = f"race-{uuid.uuid4().hex[:6]}"
    result = register(tiny_whisper_hf, name, ["int8", "float32"], decoding=TINY_DECODING)
    cers = [evaluate(v.model_uri, two_clips_manifest).metrics["cer"] for v in result.versions]
    calls = [
        ("1", [f"cer<={cers[0] + 0.01}"], "a"),
        ("2", [f"cer<={cers[1] + 0.01}"], "b"),
        ("2", ["cer<0"], "c"),  # never holds
        ("1", [], "d"),
        ("2", [], "e"),
        ("1", ["cer<0"], "f"),  # never holds
    ]
    moves = 0
    for _ in range(3):
        start = threading.Barrier(len(calls))
        outcomes: dict[str, object] = {}

        def call(version, gates, user):
            start.wait()
            try:
                outcomes[user] = promote(name, version, "production", gates=gates, user=user)
            except Exception as exc:  # noqa: BLE001 - asserted below, with what it was
                exc.add_note(traceback.format_exc())
                outcomes[user] = exc

        threads = [threading.Thread(target=call, args=c) for c in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        for user in "abde":
            assert not isinstance(outcomes[user], Exception), outcomes[user].__notes__
        for user in "cf":  # refused by its gate, unless its version held the alias already
            assert isinstance(outcomes[user], GateFailedError) or not outcomes[user].moved, outcomes[user]
        moves += sum(1 for r in outcomes.values() if not isinstance(r, Exception) and r.moved)

    events = audit_trail(name, "production")
    assert events and events[0]["from_version"] is None
    for before, after in zip(events, events[1:]):
        assert after["from_version"] == before["to_version"], events  # no event lost or written twice
    assert len(events) == moves  # one event per move, none overwritten
    assert str(MlflowClient().get_registered_model(name).aliases["production"]) == events[-1]["to_version"]
    assert not {e["user"] for e in events} & {"c", "f"}  # a failing gate moved nothing
    assert not [m for m in MlflowClient().search_registered_models() if m.name.endswith(".lock")]  # locks released
