"""Hostile and unlucky traffic at the connection and key level, against a real ``bentoml serve``
(whisper-tiny.en) locked with API keys, a control key and a webhook secret: slow bodies without
a key, more requests than the service holds, idle and half-sent connections, webhook secrets
and deliveries, keys that are not ASCII, and what ``/info`` tells a key holder.

Every client here is on loopback, bounded in count and in time; the deadlines are configured
small so that the cuts happen within the test, and the bounds are failure bounds only.
"""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from whisper_registry.normalize import normalizer_for

from devkit.webhooks import post_signed
from tests.bento.conftest import bentoml_serve, make_registry, server_env

pytestmark = [pytest.mark.server, pytest.mark.real_weights]

NAME = "whisper-tiny-en"
API_KEYS = ("key-one-0123456789", "clé-deux-ünïcode")
ADMIN_KEY = "contrôle-ü-key"  # not ASCII: sent as its UTF-8 bytes
SECRET = "a webhook secret, with spaces and a comma"  # one secret, taken whole
HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 2, 5
MAX_CONCURRENCY = 64  # whisper_bento.service.MAX_CONCURRENCY
BOUND_S = 90  # failure bound for what the deadlines above cut in seconds


@pytest.fixture(scope="module")
def served(tmp_path_factory, whisper_tiny_en_ct2):
    root = tmp_path_factory.mktemp("hostile")
    registry = make_registry(root / "registry", whisper_tiny_en_ct2, name=NAME)
    env = server_env(root / "bentoml", registry.uri)
    env.update(WHISPER_TEST_KEYS=",".join(API_KEYS), WHISPER_TEST_ADMIN=ADMIN_KEY, WHISPER_TEST_HOOK=SECRET)
    args = {
        "model": f"models:/{NAME}@production",
        "compute_type": "int8",
        "api_key": "env:WHISPER_TEST_KEYS",
        "admin_key": "env:WHISPER_TEST_ADMIN",
        "webhook_secret": "env:WHISPER_TEST_HOOK",
        "header_timeout_s": str(HEADER_TIMEOUT_S),
        "body_timeout_s": str(BODY_TIMEOUT_S),
    }
    with bentoml_serve("whisper_bento:Transcriber", args, env, root / "serve.log") as server:
        yield server, root


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def http(server):
    with server.client(key=API_KEYS[0]) as client:
        yield client


@pytest.fixture(scope="module")
def hello(speech_clips):
    return next(c for c in speech_clips if c.name == "hello_world").path.read_bytes()


# ------------------------------------------------------------------ raw connections

@dataclass
class Answer:
    """What one raw connection got back: the bytes of the answer, and whether the server closed it."""

    raw: bytes = b""
    closed: bool = False

    @property
    def status(self) -> int | None:
        return int(self.raw.split(b" ", 2)[1]) if self.raw.startswith(b"HTTP/1.1 ") else None

    @property
    def headers(self) -> dict[str, str]:
        head = self.raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
        return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head)}

    @property
    def complete(self) -> bool:
        _, found, body = self.raw.partition(b"\r\n\r\n")
        return bool(found) and len(body) >= int(self.headers.get("content-length", 0))

    def error(self) -> dict[str, Any]:
        return json.loads(self.raw.partition(b"\r\n\r\n")[2])["error"]


def _hold(url: str, heads: list[bytes], *, trickle: bool, during: Callable[[], Any] | None = None) -> tuple[list[Answer], Any]:
    """Open one connection per head, send it, then (``trickle``) one body byte on each and nothing
    more: the body has begun and can never be complete, so the body deadline, not how the sends are
    paced, decides its end. Wait until the server has closed them all (or ``BOUND_S``); ``during()``
    runs once every head is sent. What each connection got, and what ``during`` returned."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    answers = [Answer() for _ in heads]
    selector = selectors.DefaultSelector()
    socks = []
    for index, head in enumerate(heads):
        sock = socket.create_connection((host, port), timeout=30)
        sock.sendall(head)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, index)
        socks.append(sock)
    for sock in socks if trickle else ():
        try:
            sock.send(b" ")
        except OSError:
            pass  # closed already: what it got is read below
    outcome: list[Any] = []
    runner = threading.Thread(target=lambda: outcome.append(during()), daemon=True) if during else None
    if runner:
        runner.start()
    started = time.monotonic()
    try:
        while time.monotonic() - started < BOUND_S and not all(a.closed for a in answers):
            for key, _ in selector.select(timeout=0.1):
                answer = answers[key.data]
                try:
                    data = key.fileobj.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                answer.raw += data
                if not data:
                    answer.closed = True
                    selector.unregister(key.fileobj)
        if runner:
            runner.join(timeout=BOUND_S)
    finally:
        for sock in socks:
            sock.close()
    return answers, (outcome[0] if outcome else None)


def _head(url: str, path: str, headers: dict[str, str], length: int, method: str = "POST") -> bytes:
    host = urlsplit(url).netloc
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {length}",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _looks_signed() -> dict[str, str]:
    """MLflow's webhook headers, fresh and well formed, with a signature nobody can check before the body."""
    return {"Content-Type": "application/json", "X-MLflow-Signature": "v1,AAAA", "X-MLflow-Timestamp": str(int(time.time())),
            "X-MLflow-Delivery-Id": str(uuid.uuid4())}


def _transcribe(url: str, clip: bytes, key: str = API_KEYS[0]) -> httpx.Response:
    return httpx.post(url + "/transcribe", files={"file": ("hello.wav", clip, "audio/wav")}, data={"temperature": "0"},
                      headers={"Authorization": f"Bearer {key}"}, timeout=300)


# ------------------------------------------------------------------ tests

def test_slow_bodies_without_a_key_never_take_a_keyed_request_s_place(server, hello):
    """More slow webhook bodies than the service holds requests, with no key: a keyed request is
    still answered 200, and each slow connection is refused or cut at the body deadline."""
    url = server.url
    # Signed as far as the headers tell: the body must be read to check them.
    slow = [_head(url, "/webhooks/mlflow", _looks_signed(), 2100) for _ in range(MAX_CONCURRENCY + 6)]
    answers, keyed = _hold(url, slow, trickle=True, during=lambda: _transcribe(url, hello))
    # Words, not the text as written: case and punctuation may differ with the CPU's kernels.
    normalize = normalizer_for("en")
    assert keyed.status_code == 200 and normalize(keyed.json()["text"]) == "hello world", keyed.text[:300]
    assert all(a.closed for a in answers), [a.raw[:100] for a in answers if not a.closed][:3]
    statuses = sorted(a.status for a in answers)
    assert set(statuses) <= {408, 503}, statuses  # refused (its own small pool is full) or cut at the deadline
    assert 408 in statuses, statuses  # the ones admitted were cut: their body never came
    assert all(a.error()["code"] == ("body_timeout" if a.status == 408 else "overloaded") for a in answers)
    # Unsigned: refused from the headers alone, with not one byte of the body read.
    unsigned = [_head(url, "/webhooks/mlflow", {"Content-Type": "application/json"}, 2100) for _ in range(4)]
    unsigned_answers, _ = _hold(url, unsigned, trickle=False)
    assert [a.status for a in unsigned_answers] == [401] * len(unsigned), [a.raw[:200] for a in unsigned_answers]
    assert all(a.closed and a.error()["code"] == "invalid_signature" for a in unsigned_answers)
    with httpx.Client(base_url=url, timeout=30) as anonymous:
        assert anonymous.get("/readyz").status_code == 200


def test_requests_over_capacity_get_one_documented_503(server, http):
    """More keyed requests at once than the service holds: every refusal is a 503 in the service's
    error shape with Retry-After, the status /docs.json documents for it."""
    url = server.url
    auth = {"Authorization": f"Bearer {API_KEYS[1]}", "Content-Type": "multipart/form-data; boundary=slow"}
    part = b'--slow\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'  # then the file, slowly
    heads = [_head(url, "/transcribe", auth, 100_000) + part for _ in range(MAX_CONCURRENCY + 6)]
    answers, _ = _hold(url, heads, trickle=True)
    statuses = [a.status for a in answers]
    assert all(a.closed for a in answers) and set(statuses) <= {408, 503}, statuses
    refused = [a for a in answers if a.status == 503]
    assert len(refused) >= 6, statuses  # at most MAX_CONCURRENCY are held at once
    for answer in refused:
        assert answer.error()["type"] == "server_error" and answer.error()["message"], answer.raw[:300]
        assert int(answer.headers["retry-after"]) >= 1
    documented = http.get("/docs.json").json()["paths"]["/transcribe"]["post"]["responses"]
    assert "Retry-After" in documented["503"]["headers"] and "429" not in documented


def test_idle_and_half_sent_connections_are_closed(server, http):
    """Connections that send nothing, half a request line, half the headers, or half of a second
    request after an answer, are closed by the server; none gets an answer."""
    url = server.url
    partial = [b"", b"GET /info HT", f"GET /info HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\nX-Pad: ".encode()]
    answers, _ = _hold(url, [p for p in partial for _ in range(10)], trickle=False)
    assert all(a.closed for a in answers), sum(not a.closed for a in answers)
    assert all(a.raw == b"" for a in answers)
    # A kept-alive connection: one answer, then half of the next request's head.
    host, port = urlsplit(url).hostname, urlsplit(url).port
    with socket.create_connection((host, port), timeout=BOUND_S) as sock:  # a timeout: it stayed open
        sock.sendall(f"GET /livez HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        received, half_sent = b"", False
        while chunk := sock.recv(65536):
            received += chunk
            if not half_sent and Answer(received).complete:
                sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
                half_sent = True
    assert half_sent and Answer(received).status == 200 and received.count(b"HTTP/1.1 ") == 1, received
    assert http.get("/livez").status_code == 200


def test_webhook_takes_its_secret_whole_and_each_delivery_once(server):
    event = {"entity": "model_version_alias", "action": "created", "data": {"name": NAME, "alias": "staging", "version": "1"}}
    url = server.url
    whole = post_signed(url, SECRET, event)
    assert whole.status_code == 200 and "ignored" in whole.json(), whole.text
    for fragment in ("a", "webhook", "secret"):  # what a split on spaces and commas would have made of it
        refused = post_signed(url, fragment, event)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_signature", refused.text
    first = post_signed(url, SECRET, event, delivery="delivery-sent-twice")
    again = post_signed(url, SECRET, event, delivery="delivery-sent-twice")
    assert first.status_code == 200 and again.status_code == 401, again.text
    assert "received already" in again.json()["error"]["message"]
    ahead = post_signed(url, SECRET, event, timestamp=int(time.time()) + 280)
    assert ahead.status_code == 401 and "in the future" in ahead.json()["error"]["message"], ahead.text
    nested = post_signed(url, SECRET, event, body=b"[" * 5000 + b"]" * 5000)  # signed, 10 KB, deeper than Python's recursion
    assert nested.status_code == 400 and nested.json()["error"]["type"] == "invalid_request_error", nested.text
    assert "Traceback" not in server.log_text()


def test_a_control_key_that_is_not_ascii_works_as_sent(server, http):
    def move(key: bytes) -> httpx.Response:
        return http.put("/admin/model", json={"model": f"models:/{NAME}@production"}, headers={"x-whisper-admin-key": key})

    moved = move(ADMIN_KEY.encode())  # the UTF-8 bytes, as clients send them
    assert moved.status_code == 200 and moved.json()["model"]["name"] == NAME, moved.text
    assert move(ADMIN_KEY.encode("latin-1", "replace")).status_code == 401
    assert move(b"contr").status_code == 401
    # The same for an API key that is not ASCII.
    with server.client(60) as client:
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {API_KEYS[1]}".encode()}).status_code == 200


def test_info_shows_no_secret_s_place_no_path_and_no_pid(served, http, hello, whisper_tiny_en_ct2):
    server, root = served
    text = http.get("/info").text
    info = json.loads(text)
    assert "worker_pid" not in info
    assert {k: info["config"][k] for k in ("api_key", "admin_key", "webhook_secret")} == \
        {"api_key": True, "admin_key": True, "webhook_secret": True}
    for secret_or_place in (*API_KEYS, ADMIN_KEY, SECRET, "WHISPER_TEST_", str(root), str(whisper_tiny_en_ct2),
                            str(whisper_tiny_en_ct2.parent)):
        assert secret_or_place not in text, secret_or_place
    assert info["model"]["lineage"]["path"] == "(a local path)"
    # Every transcription names its model: no place on this machine there either.
    answer = _transcribe(server.url, hello)
    assert answer.status_code == 200 and str(whisper_tiny_en_ct2) not in answer.text
