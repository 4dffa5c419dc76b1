"""What a request holds in a real ``bentoml serve`` (whisper-tiny.en) and that it lets go: a stream
whose client leaves gives its engine slot back, /readyz says whether the worker admits work, and
upload bodies are bounded one by one (chunked too) and all together. Every check is a count the
service reports (/metrics) or what a raw client sees, polled with generous failure bounds."""

from __future__ import annotations

import json
import re
import select
import socket
from urllib.parse import urlparse

import numpy as np
import pytest

from tests.bento.conftest import (
    bentoml_serve,
    make_registry,
    passes_observed,
    server_env,
    until,
)
from devkit import audio

pytestmark = [pytest.mark.server, pytest.mark.real_weights]

NAME = "tiny-slots"
MAX_REQUESTS = 4
MAX_UPLOAD = 4 * 1024 * 1024
BUDGET = 3 * MAX_UPLOAD  # the four streams' uploads fit; three of the largest size fill it
BOUNDARY = "slots"


@pytest.fixture(scope="module")
def server(tmp_path_factory, whisper_tiny_en_ct2):
    root = tmp_path_factory.mktemp("slots")
    registry = make_registry(root / "registry", whisper_tiny_en_ct2, name=NAME)
    args = {"model": f"models:/{NAME}@production", "compute_type": "int8", "follow_interval_s": "0",
            "max_requests": str(MAX_REQUESTS), "max_upload_bytes": str(MAX_UPLOAD),
            "max_inflight_upload_bytes": str(BUDGET), "unready_after_full_s": "1",
            "batch_size": "1"}  # one window a forward pass: passes count windows
    with bentoml_serve("whisper_bento:Transcriber", args, server_env(root / "bentoml", registry.uri), root / "serve.log") as server:
        yield server


@pytest.fixture(scope="module")
def six_minutes(long_speech) -> bytes:
    """Six minutes of real speech as FLAC (under 3 MB): a stream that decodes for a while."""
    samples, _ = audio.read_wav(long_speech)
    return audio.encode(np.concatenate([samples] * 3), "flac", "flac", 16000, channels=1)


@pytest.fixture(scope="module")
def hello(speech_clips) -> bytes:
    return next(c for c in speech_clips if c.name == "hello_world").path.read_bytes()


FILE_HEAD = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.flac"\r\n'
             "Content-Type: application/octet-stream\r\n\r\n").encode()


def _multipart(data: bytes, **fields: str) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    return b"".join(parts) + FILE_HEAD + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def _connect(url: str, length: int | None) -> socket.socket:
    """A raw connection with a POST /transcribe's head sent: Content-Length ``length``, or chunked."""
    host, port = urlparse(url).hostname, urlparse(url).port
    sock = socket.create_connection((host, port), timeout=30)
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    sock.sendall(f"POST /transcribe HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; "
                 f"boundary={BOUNDARY}\r\n{framing}\r\n\r\n".encode())
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of a complete (Content-Length) answer."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b""
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE)[1])
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), json.loads(body[:length])


def _metric(http, name: str, role: str | None = None) -> float | None:
    label = f'{{role="{role}"}}' if role else ""
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{label} "):
            return float(line.rsplit(" ", 1)[1])
    return None



def _start_streams(url: str, body: bytes) -> list[socket.socket]:
    """MAX_REQUESTS streams, each sent whole and answered with its head (200, events to come)."""
    streams = []
    for _ in range(MAX_REQUESTS):
        sock = _connect(url, len(body))
        sock.sendall(body)
        streams.append(sock)
    for sock in streams:
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)  # byte by byte: nothing of the events is read
        assert head.startswith(b"HTTP/1.1 200"), head
    return streams


def _generated(http) -> float:
    return passes_observed(http.get("/metrics").text, "generate")[1]


def test_streams_whose_clients_leave_before_the_first_event_stop_at_once(server, six_minutes, hello):
    body = _multipart(six_minutes, stream="true", temperature="0")
    with server.client() as http:
        until(lambda: _metric(http, "whisper_requests_held", "primary") == 0, "the engine is idle")
        streams = _start_streams(server.url, body)
        until(lambda: _metric(http, "whisper_requests_held", "primary") == MAX_REQUESTS, "the engine holds every stream")
        before = _generated(http)
        for sock in streams:  # no event read: each stream still needs its first window decoded
            sock.close()
        until(lambda: _metric(http, "whisper_requests_held", "primary") == 0, "the engine lets go of every stream")
        # Each stream let go at its next model call: at most the pass in flight when the clients
        # left ran (and one that started as they did); decoding on to each stream's first segment
        # would take a generate pass per stream.
        assert _generated(http) - before <= 2, (before, _generated(http))
        assert http.get("/readyz").status_code == 200
        after = http.post("/transcribe", files={"file": ("a.wav", hello, "audio/wav")}, data={"temperature": "0"})
        assert after.status_code == 200 and after.json()["text"].strip() == "Hello world."
    assert "Traceback" not in server.log_text()


def test_a_full_engine_is_unready_until_its_clients_leave(server, six_minutes, hello):
    body = _multipart(six_minutes, stream="true", temperature="0")
    with server.client() as http:
        until(lambda: _metric(http, "whisper_requests_held", "primary") == 0, "the engine is idle")
        assert http.get("/readyz").status_code == 200
        streams = _start_streams(server.url, body)
        until(lambda: _metric(http, "whisper_requests_held", "primary") == MAX_REQUESTS, "the engine holds every stream")
        # Admitting no request for longer than unready_after_full_s: not ready.
        until(lambda: http.get("/readyz").status_code == 503, "/readyz answers 503 while the engine is full")
        refused = http.post("/transcribe", files={"file": ("a.wav", hello, "audio/wav")})
        assert refused.status_code == 503 and "overloaded" in refused.json()["error"]["message"], refused.text
        # One client reads its first event (mid-stream), the others read nothing: all of them go.
        streams[0].settimeout(120)
        first = b""
        while b"transcript.text.delta" not in first:
            first += streams[0].recv(65536)
        for sock in streams:
            sock.close()
        until(lambda: _metric(http, "whisper_requests_held", "primary") == 0, "the engine lets go of every stream")
        until(lambda: http.get("/readyz").status_code == 200, "/readyz answers 200 again")
    assert "Traceback" not in server.log_text()


def test_a_chunked_body_over_the_limit_is_refused_as_it_arrives(server, hello):
    chunk = b"\0" * (256 * 1024)
    total = 16 * MAX_UPLOAD
    sock = _connect(server.url, None)
    sent = 0
    with sock:
        sock.sendall(f"{len(FILE_HEAD):x}\r\n".encode() + FILE_HEAD + b"\r\n")
        while sent < total and not select.select([sock], [], [], 0.01)[0]:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
        status, answer = _answer(sock)
    assert status == 413 and answer["error"]["code"] == "too_large", answer
    # Answered while the client was still sending: the worker read no more than it had to.
    assert sent < total, sent
    with server.client() as http:
        until(lambda: _metric(http, "whisper_upload_bytes_in_flight") == 0, "the refused body holds nothing")


def test_uploads_in_flight_share_one_budget(server, hello):
    large = _multipart(b"\0" * (MAX_UPLOAD - 4096))
    declared = len(large)
    with server.client() as http:
        assert _metric(http, "whisper_upload_bytes_in_flight") == 0
        # Three uploads of (nearly) the largest size, half sent: their declared bytes fill the budget.
        halves = []
        for _ in range(3):
            sock = _connect(server.url, declared)
            sock.sendall(large[: declared // 2])
            halves.append(sock)
        until(lambda: _metric(http, "whisper_upload_bytes_in_flight") == 3 * declared, "the uploads hold their bytes")
        # A fourth is refused from its head alone, before a byte of its body is sent.
        with _connect(server.url, len(_multipart(hello))) as fourth:
            status, answer = _answer(fourth)
        assert status == 503 and answer["error"]["code"] == "uploads_full", answer
        for sock in halves:  # clients that go mid-upload give their share back
            sock.close()
        until(lambda: _metric(http, "whisper_upload_bytes_in_flight") == 0, "the abandoned uploads hold nothing")
        after = http.post("/transcribe", files={"file": ("a.wav", hello, "audio/wav")}, data={"temperature": "0"})
        assert after.status_code == 200, after.text
        assert _metric(http, "whisper_upload_bytes_in_flight") == 0
