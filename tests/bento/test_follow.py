"""A service started on models:/NAME@ALIAS follows the alias: a real `bentoml serve`, a real
sqlite registry, whisper-tiny.en, a request loop from several clients while the alias moves and
while the worker is killed."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import mlflow
import mlflow_faster_whisper as mfw
import pytest
from mlflow import MlflowClient

from bench import faults
from tests.bento.conftest import RequestLoop, bentoml_serve, make_registry, server_env, until

pytestmark = [pytest.mark.real_weights, pytest.mark.server]

NAME = "tiny-follow"
OTHER = "not-whisper"  # another registered model, of another flavor: its version 1 cannot be served
ADMIN_KEY = "follow-admin-key"


class _NotWhisper(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


def _loaded(http) -> dict[tuple[str, str], float]:
    """The model versions in the worker's memory, as /metrics counts them."""
    found = {}
    for line in http.get("/metrics").text.splitlines():
        match = re.fullmatch(r'whisper_version_loaded\{name="([^"]*)",version="([^"]*)"\} (\S+)', line)
        if match:
            found[(match[1], match[2])] = float(match[3])
    return found



def _kill_worker(url: str) -> float:
    """SIGKILL the worker; once BentoML's new worker answers, when it was killed."""
    old = faults.worker_pid(url)
    killed = time.monotonic()
    os.kill(old, signal.SIGKILL)
    until(lambda: faults.worker_pid(url) not in (None, old), "a new worker answers", timeout_s=240)
    return killed


def test_the_service_follows_its_alias_without_a_failed_request(tmp_path, whisper_tiny_en_ct2, speech_clips):
    registry = make_registry(tmp_path / "registry", whisper_tiny_en_ct2, name=NAME)  # version 1 @production
    client = MlflowClient(registry.uri)
    mlflow.set_tracking_uri(registry.uri)
    try:
        mlflow.set_experiment("bento")
        for _ in range(2):  # versions 2 and 3: the same weights, each logged on its own
            with mlflow.start_run():
                mfw.log_model(str(whisper_tiny_en_ct2), name="model", registered_model_name=NAME)
        with mlflow.start_run():
            mlflow.pyfunc.log_model(name="model", python_model=_NotWhisper(), registered_model_name=OTHER,
                                    pip_requirements=["mlflow"])
        # Version 3 is tampered with after registration: its checksums no longer hold.
        logged = client.get_logged_model(client.get_model_version(NAME, "3").source.removeprefix("models:/"))
    finally:
        mlflow.set_tracking_uri(None)
    config = Path(logged.artifact_location.removeprefix("file://")) / "model" / "config.json"
    with open(config, "a") as f:
        f.write(" ")

    clip = next(c for c in speech_clips if c.name == "quick_brown_fox").path
    args = {"model": f"models:/{NAME}@production", "follow_interval_s": "1", "compute_type": "int8",
            "admin_key": "env:WHISPER_TEST_ADMIN_KEY"}
    env = {**server_env(tmp_path / "bentoml", registry.uri), "WHISPER_TEST_ADMIN_KEY": ADMIN_KEY}
    with bentoml_serve("whisper_bento:Transcriber", args, env, tmp_path / "serve.log") as server, server.client() as http:
        info = http.get("/info").json()
        assert info["follow"]["following"] and info["follow"]["alias"] == f"models:/{NAME}@production"
        with RequestLoop(server.url, clip) as loop:
            loop.first_answer_by("1", after=0)
            moves = {}
            for version in ("2", "1") * 4 + ("2",):
                moved = time.monotonic()
                client.set_registered_model_alias(NAME, "production", version)
                moves.setdefault(version, []).append(round(loop.first_answer_by(version, after=moved) - moved, 2))
                # The old version leaves the worker's memory once its last request is answered:
                # one version loaded, whatever the number of moves (none kept per move).
                until(lambda v=version: _loaded(http) == {(NAME, v): 1}, f"version {version} alone is loaded")

            # A control call to another model's version 1 is refused and noted as that model's:
            # this alias's own version 1 is still served once the alias names it again.
            refused = http.put("/admin/model", json={"model": f"models:/{OTHER}/1"}, headers={"x-whisper-admin-key": ADMIN_KEY})
            assert refused.status_code == 422 and refused.json()["error"]["code"] == "model_not_served", refused.text
            follow = http.get("/info").json()["follow"]
            assert (follow["failed_model"], follow["failed_version"]) == (OTHER, "1"), follow
            moved = time.monotonic()
            client.set_registered_model_alias(NAME, "production", "1")
            loop.first_answer_by("1", after=moved, timeout=60)

            moved = time.monotonic()
            client.set_registered_model_alias(NAME, "production", "3")
            until(lambda: http.get("/info").json()["follow"]["failed_version"] == "3", "version 3 is refused")
            loop.first_answer_by("1", after=time.monotonic())  # the served version still answers
            info = http.get("/info").json()
            metrics = http.get("/metrics").text

            # Promoted, then the worker is killed: the new worker serves what the alias names now,
            # from its first answer (not what `bentoml serve` resolved when it started).
            client.set_registered_model_alias(NAME, "production", "2")
            loop.first_answer_by("2", after=time.monotonic())
            loop.pause()
            killed = _kill_worker(server.url)
            loop.go.set()
            loop.first_answer_by("2", after=killed, timeout=120)
            restarted = http.get("/info").json()
            # The alias now names a version that cannot be loaded: a worker restarted then still
            # starts, on the version `bentoml serve` resolved, and notes the refused one.
            client.set_registered_model_alias(NAME, "production", "3")
            until(lambda: http.get("/info").json()["follow"]["failed_version"] == "3", "version 3 is refused again")
            loop.pause()
            killed_again = _kill_worker(server.url)
            loop.go.set()
            loop.first_answer_by("1", after=killed_again, timeout=120)
            until(lambda: http.get("/info").json()["follow"]["failed_version"] == "3", "the new worker refuses version 3")
        answers = loop.answers

    failed = [a for a in answers if a[1] != 200]
    assert not failed, failed[:5]  # the loop was paused across each kill
    assert info["model"]["version"] == "1" and info["follow"]["swaps"] == 10
    assert (info["follow"]["failed_model"], info["follow"]["failed_version"]) == (NAME, "3")
    assert "ChecksumError" in info["follow"]["last_error"]
    assert all(v != "3" for t, _, v in answers if t > moved)  # the tampered one never answered
    assert any(line.startswith("whisper_model_swaps_total{") and 'role="primary"' in line and 'outcome="failed"' in line
               and line.endswith(" 2.0") for line in metrics.splitlines()), metrics  # the control call, version 3
    after_kill = [v for t, _, v in answers if killed < t < killed_again]
    assert after_kill and set(after_kill) == {"2"}, after_kill  # the restarted worker's every answer
    assert restarted["model"]["version"] == "2" and restarted["follow"]["swaps"] == 0
    assert {v for t, _, v in answers if t > killed_again} == {"1"}
    print(f"alias move -> first answer by the new version: {moves}; {len(answers)} answers")
