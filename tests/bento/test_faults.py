"""Faults against a real ``bentoml serve`` (whisper-tiny.en): clients that go away mid-upload and
mid-decode, and the worker killed with SIGKILL under load. The drills are bench/faults.py's, here
short; the soak section of the benchmarks runs them long and reports the figures."""

from __future__ import annotations

import httpx
import pytest

from bench import faults
from tests.bento.conftest import passes_observed, bentoml_serve, make_registry, server_env

pytestmark = [pytest.mark.server, pytest.mark.real_weights]

NAME = "whisper-tiny-en"


@pytest.fixture(scope="module")
def server(tmp_path_factory, whisper_tiny_en_ct2):
    root = tmp_path_factory.mktemp("faults")
    registry = make_registry(root / "registry", whisper_tiny_en_ct2, name=NAME)
    env = server_env(root / "bentoml", registry.uri)
    with bentoml_serve("whisper_bento:Transcriber", {"model": f"models:/{NAME}@production", "compute_type": "int8"}, env, root / "serve.log") as server:
        yield server


@pytest.fixture(scope="module")
def clip(speech_clips) -> bytes:
    return next(c for c in speech_clips if c.name == "hello_world").path.read_bytes()


def _transcribe(server, clip) -> httpx.Response:
    with server.client() as http:
        return http.post("/transcribe", files={"file": ("clip.wav", clip, "audio/wav")}, data={"temperature": "0"})


def _decoded(server) -> float:
    with server.client() as http:
        return passes_observed(http.get("/metrics").text, "generate")[1]


def test_clients_that_go_away_leave_the_service_serving(server, clip):
    pid = faults.worker_pid(server.url)
    decoded = _decoded(server)
    storm = faults.disconnect_storm(server.url, clip, clients=30)  # 15 go mid-upload, 15 after sending
    assert storm["clients"] == 30
    after = _transcribe(server, clip)
    assert after.status_code == 200 and after.json()["text"].strip() == "Hello world."
    # The 15 complete requests' windows queued for the model; those whose client had gone were
    # dropped instead of decoded (only the ones already in a running pass were).
    assert _decoded(server) - decoded - 1 <= 5
    assert "client closed the connection" in server.log_text()
    load = faults.request_loop(server.url, clip, clients=4, seconds=8)
    assert not load.failures and load.latencies  # capacity is back: every request answered
    assert faults.worker_pid(server.url) == pid  # the worker was never replaced
    assert "Traceback" not in server.log_text()


def test_a_killed_worker_is_restarted_and_only_requests_in_flight_fail(server, clip):
    drill = faults.kill_worker_under_load(server.url, clip, clients=3, seconds=30, kill_after_s=4)
    assert drill["new_worker_pid"] not in (None, drill["old_worker_pid"]), drill  # BentoML started a new worker
    assert drill["failed"] <= 3, drill  # at most one request in flight per client
    assert drill["failed_sent_after_back"] == 0 and drill["ok_after_back"] > 0, drill
    assert _transcribe(server, clip).status_code == 200
