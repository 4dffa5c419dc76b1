"""Shared helpers of the registry tests: manifests of the real clips, a registered tiny model."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import mlflow
import pytest

from whisper_registry.evaluate import evaluate
from whisper_registry.register import register

# Random weights: greedy, no temperature fallback, short outputs, so decoding is fast and deterministic.
TINY_DECODING = {"beam_size": 1, "temperature": 0.0, "max_new_tokens": 12, "condition_on_previous_text": False}
LANGUAGES = ("en", "zh")


def write_manifest(path: Path, rows: list[dict], fmt: str = "jsonl") -> Path:
    """Write manifest rows (dicts with audio, text, optional language) as jsonl or csv."""
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["audio", "text", "language"])
            writer.writeheader()
            writer.writerows(rows)
    return path


def clip_rows(clips) -> list[dict]:
    return [{"audio": str(c.path), "text": c.text, "language": c.language} for c in clips]


@pytest.fixture(scope="session")
def en_zh_clips(speech_clips):
    return [c for c in speech_clips if c.language in LANGUAGES]


@pytest.fixture
def clips_manifest(tmp_path, en_zh_clips) -> Path:
    return write_manifest(tmp_path / "clips.jsonl", clip_rows(en_zh_clips))


def _build_template(root: Path, build) -> tuple[Path, str, object]:
    """Run ``build()`` against a fresh store in ``root``; tests get copies of its database."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        experiment_id = mlflow.create_experiment("tests", artifact_location=(root / "mlartifacts").as_uri())
        mp.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
        try:
            result = build()
        finally:
            mlflow.set_tracking_uri(None)
    return root / "mlflow.db", experiment_id, result


def _use_copy(template, tmp_path, monkeypatch):
    database, experiment_id, result = template
    copy = tmp_path / "mlflow.db"
    shutil.copyfile(database, copy)
    uri = f"sqlite:///{copy}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    mlflow.set_tracking_uri(uri)
    return result


@pytest.fixture(scope="session")
def two_clips_manifest(tmp_path_factory, en_zh_clips) -> Path:
    """One English and one Chinese clip: enough for the mechanics, quick on the tiny model."""
    picked = [next(c for c in en_zh_clips if c.language == lang) for lang in LANGUAGES]
    return write_manifest(tmp_path_factory.mktemp("manifest") / "two.jsonl", clip_rows(picked))


@pytest.fixture(scope="session")
def _tiny_template(tmp_path_factory, tiny_whisper_hf):
    root = tmp_path_factory.mktemp("tiny-template")
    return _build_template(root, lambda: register(tiny_whisper_hf, "tiny", ["int8", "float32"], decoding=TINY_DECODING))


@pytest.fixture(scope="session")
def _tiny_evaluated_template(tmp_path_factory, tiny_whisper_hf, two_clips_manifest):
    def build():
        result = register(tiny_whisper_hf, "tiny", ["int8", "float32"], decoding=TINY_DECODING)
        evaluations = [evaluate(v.model_uri, two_clips_manifest) for v in result.versions]
        return result, evaluations

    return _build_template(tmp_path_factory.mktemp("tiny-evaluated"), build)


@pytest.fixture
def tiny_registered(_tiny_template, tmp_path, monkeypatch):
    """A private store with the tiny random Whisper registered as 'tiny': int8 is version 1, float32
    version 2. The database is a copy of a session template; artifacts stay in the template's store."""
    yield _use_copy(_tiny_template, tmp_path, monkeypatch)
    _reset()


@pytest.fixture
def tiny_evaluated(_tiny_evaluated_template, tmp_path, monkeypatch):
    """Like ``tiny_registered``, both versions also evaluated on ``two_clips_manifest``.

    Yields (RegistrationResult, [EvaluationResult of v1, of v2])."""
    yield _use_copy(_tiny_evaluated_template, tmp_path, monkeypatch)
    _reset()


def _reset():
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def kill_when_in_store(proc, database: Path, query: str, params: tuple = (), timeout_s: float = 300.0) -> bool:
    """SIGKILL ``proc`` the moment ``query`` (a count over the sqlite store) finds a row.

    Each look is made holding the database's write lock (BEGIN EXCLUSIVE), and the kill happens
    before it is let go: the process cannot have written anything after the row the test saw.
    The lock is asked for again at once when the process holds it, not through sqlite's busy
    handler, whose sleeps (up to 100 ms) would let the process write several transactions past
    the row before the next look. Returns False if the process ended first.
    """
    import signal
    import sqlite3
    import time

    deadline = time.monotonic() + timeout_s  # a failure bound only
    db = sqlite3.connect(database, timeout=0, isolation_level=None)
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                db.execute("BEGIN EXCLUSIVE")
            except sqlite3.OperationalError:  # the process holds the lock: look again once it lets go
                time.sleep(0.0002)
                continue
            try:
                if db.execute(query, params).fetchone()[0]:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return True
            finally:
                db.execute("ROLLBACK")
            time.sleep(0.0002)  # let the process reach the database between looks
        return False
    finally:
        db.close()


def dead_process_owner() -> str:
    """An owner (``tracking.owner()`` format) of this host whose process has ended."""
    import socket
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}:"
