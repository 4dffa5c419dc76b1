"""A service started on models:/NAME@ALIAS follows the alias: a real `bentoml serve`, a real
sqlite registry, whisper-tiny.en, a request loop from several clients while the alias moves."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

import mlflow_faster_whisper as mfw

from tests.bento.conftest import RequestLoop, bentoml_serve, make_registry, server_env

pytestmark = [pytest.mark.real_weights, pytest.mark.server]

NAME = "tiny-follow"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_the_service_follows_its_alias_without_a_failed_request(tmp_path, whisper_tiny_en_ct2, speech_clips):
    registry = make_registry(tmp_path / "registry", whisper_tiny_en_ct2, name=NAME)  # version 1 @production
    client = MlflowClient(registry.uri)
    mlflow.set_tracking_uri(registry.uri)
    try:
        mlflow.set_experiment("bento")
        for _ in range(2):  # versions 2 and 3: the same weights, each logged on its own
            with mlflow.start_run():
                mfw.log_model(str(whisper_tiny_en_ct2), name="model", registered_model_name=NAME)
        # Version 3 is tampered with after registration: its checksums no longer hold.
        logged = client.get_logged_model(client.get_model_version(NAME, "3").source.removeprefix("models:/"))
    finally:
        mlflow.set_tracking_uri(None)
    config = Path(logged.artifact_location.removeprefix("file://")) / "model" / "config.json"
    with open(config, "a") as f:
        f.write(" ")

    clip = next(c for c in speech_clips if c.name == "quick_brown_fox").path
    args = {"model": f"models:/{NAME}@production", "follow_interval_s": "1", "compute_type": "int8"}
    with bentoml_serve("whisper_bento:Transcriber", args, server_env(tmp_path / "bentoml", registry.uri),
                       tmp_path / "serve.log") as server, server.client() as http:
        info = http.get("/info").json()
        assert info["follow"]["following"] and info["follow"]["alias"] == f"models:/{NAME}@production"
        pid = info["worker_pid"]
        with RequestLoop(server.url, clip) as loop:
            loop.first_answer_by("1", after=0)
            # Memory is compared with no request in flight: before the moves, and after them.
            loop.pause()
            rss_before = _rss_kb(pid)
            loop.go.set()
            moves = {}
            rss = []
            for done, version in enumerate(("2", "1") * 4, start=1):
                moved = time.monotonic()
                client.set_registered_model_alias(NAME, "production", version)
                moves.setdefault(version, []).append(round(loop.first_answer_by(version, after=moved) - moved, 2))
                # The old version is unloaded once its last request is answered.
                deadline = time.monotonic() + 60
                while server.log_text().count(" unloaded") < done and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert server.log_text().count(" unloaded") == done
                loop.pause()
                rss.append(_rss_kb(pid))
                loop.go.set()
            print("RSS", rss_before, rss)

            moved = time.monotonic()
            client.set_registered_model_alias(NAME, "production", "3")
            deadline = time.monotonic() + 60
            while http.get("/info").json()["follow"]["failed_version"] != "3" and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2)
        answers = loop.answers
        info = http.get("/info").json()
        metrics = http.get("/metrics").text

    failed = [a for a in answers if a[1] != 200]
    assert not failed, failed[:5]
    assert info["model"]["version"] == "1" and info["follow"]["swaps"] == 8
    assert info["follow"]["failed_version"] == "3" and "ChecksumError" in info["follow"]["last_error"]
    assert all(v != "3" for t, _, v in answers if t > moved) and answers[-1][2] == "1"  # the tampered one never answered
    assert any(line.startswith("whisper_model_swaps_total{") and 'role="primary"' in line and 'outcome="failed"' in line
               and line.endswith(" 1.0") for line in metrics.splitlines()), metrics
    # Each retired version's memory goes back. A tiny.en version holds 55-70 MB of the worker's
    # 390-480 MB: one version kept per move would add some 15 % a move, without end. What the
    # allocators keep (fragments of the heap, MKL's buffers where CTranslate2 runs on MKL) swings
    # with the version served and levels off: at most 14 % here, 23 % with CT2_USE_MKL=1, over
    # eight moves. So the last four readings are within 10 % of the first four (a version kept per
    # move: some 60 %), and none is 1.4x before (some 120 %).
    assert (statistics.mean(rss[4:]) - statistics.mean(rss[:4])) / rss_before < 0.10, (rss_before, rss)
    assert max(rss) < rss_before * 1.4, (rss_before, rss)
    print(f"alias move -> first answer by the new version: {moves}; worker RSS {rss_before} -> {rss} kB; "
          f"{len(answers)} answers")
