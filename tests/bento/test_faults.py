"""Faults against a real ``bentoml serve`` (whisper-tiny.en): clients that go away mid-upload and
mid-decode, and the worker killed with SIGKILL under load. The drills are bench/faults.py's, here
short; the soak section of the benchmarks runs them long and reports the figures."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from whisper_registry.normalize import normalizer_for

from bench import faults
from tests.bento.conftest import bentoml_serve, make_registry, passes_observed, server_env, until

pytestmark = [pytest.mark.server, pytest.mark.real_weights]

NAME = "whisper-tiny-en"
BOUND_S = 300  # failure bound for anything awaited here; never the property checked


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


def _windows(server, op: str) -> float:
    with server.client() as http:
        return passes_observed(http.get("/metrics").text, op)[1]


def _gauges(server) -> dict[str, float]:
    """The service's own gauges from /metrics (requests held per role, upload bytes in flight)."""
    with server.client() as http:
        text = http.get("/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(("whisper_requests_held{", "whisper_upload_bytes_in_flight"))}


def _hello(response: httpx.Response) -> bool:
    # Words, not the text as written: case and punctuation may differ with the CPU's kernels.
    normalize = normalizer_for("en")
    return response.status_code == 200 and normalize(response.json()["text"]) == normalize("Hello world.")


def test_clients_that_go_away_leave_the_service_serving(server, clip):
    pid = faults.worker_pid(server.url)
    encoded = _windows(server, "encode")
    storm = faults.disconnect_storm(server.url, clip, clients=30)  # 15 go mid-upload, 15 after sending
    assert storm["clients"] == 30
    # Whenever the service notices each client gone, it ends holding nothing: no request, no upload.
    gauges = until(lambda: (g := _gauges(server)) and not any(g.values()) and g, "the service holds nothing", BOUND_S)
    assert 'whisper_requests_held{role="primary"}' in gauges and "whisper_upload_bytes_in_flight" in gauges, gauges
    after = _transcribe(server, clip)
    assert _hello(after), after.text[:300]
    # A half-sent body is never decoded, and no request twice: at most the 15 whole requests' one
    # window each (how many were dropped before their pass depends on timing) and the one above.
    assert _windows(server, "encode") - encoded <= 15 + 1
    assert "client closed the connection" in server.log_text()
    # Capacity is back: a fixed number of requests, four at a time, every one answered.
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _transcribe(server, clip), range(12)))
    assert all(_hello(a) for a in answers), [a.text[:200] for a in answers if not _hello(a)]
    assert faults.worker_pid(server.url) == pid  # the worker was never replaced
    assert "Traceback" not in server.log_text()


def _dead(pid: int) -> bool:
    """Whether ``pid`` runs no more (gone, or a zombie its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_a_killed_worker_is_restarted_and_only_requests_in_flight_fail(server, clip):
    old = faults.worker_pid(server.url)
    sent: list[tuple[float, bool, str]] = []  # (sent at, answered 200, what failed)
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            at = time.monotonic()
            try:  # a new connection each time: none is kept to the worker that is killed
                response = _transcribe(server, clip)
                sent.append((at, response.status_code == 200, f"HTTP {response.status_code}"))
            except httpx.HTTPError as exc:
                sent.append((at, False, repr(exc)))

    clients = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        until(lambda: sum(ok for _, ok, _ in sent) >= 3, "three answers before the kill", BOUND_S)
        os.kill(old, signal.SIGKILL)
        until(lambda: _dead(old), "the worker is dead", BOUND_S)
        dead_at = time.monotonic()
        # Requests sent once it is dead wait on the listening socket for the new worker's answer.
        until(lambda: any(ok for at, ok, _ in list(sent) if at > dead_at), "an answer after the kill", BOUND_S)
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=BOUND_S)
    new = faults.worker_pid(server.url)
    assert new not in (None, old), (old, new)  # BentoML started a new worker
    failed = [(at, what) for at, ok, what in sent if not ok]
    # Only requests in flight at the kill failed: sent before the worker died, one per client at most.
    assert all(at < dead_at for at, _ in failed) and len(failed) <= len(clients), failed
    assert _hello(_transcribe(server, clip))
