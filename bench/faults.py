"""Load and fault drills against a running service: a request loop, a worker killed under load,
clients that go away mid-upload and mid-decode. Used by the soak section (long) and the tests
(short); each drill returns what it counted and never asserts.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlparse

import httpx

from devkit.processes import bentoml_worker_pid


@dataclass
class Load:
    """What a request loop saw: latencies of the answered requests and every failure."""

    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    ended: float = 0.0
    # (monotonic time sent, seconds, ok) per request, for drills that split it around an event.
    timeline: list[tuple[float, float, bool]] = field(default_factory=list)

    def percentiles(self) -> dict[str, Optional[float]]:
        if not self.latencies:
            return {"p50_s": None, "p95_s": None, "p99_s": None}
        cuts = statistics.quantiles(self.latencies, n=100, method="inclusive") if len(self.latencies) > 1 else self.latencies * 99
        return {"p50_s": round(cuts[49], 3), "p95_s": round(cuts[94], 3), "p99_s": round(cuts[98], 3)}


def request_loop(url: str, clip: bytes | list[bytes], *, clients: int, seconds: float, headers: Optional[dict] = None,
                 fields: Optional[dict] = None, stop: Optional[threading.Event] = None) -> Load:
    """``clients`` threads POST /transcribe back to back for ``seconds``, each going round ``clip``
    (one clip or several)."""
    clips = [clip] if isinstance(clip, bytes) else list(clip)
    load = Load()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    stop = stop or threading.Event()

    def client(first: int) -> None:
        turn = first
        with httpx.Client(base_url=url, timeout=300, headers=headers or {}) as http:
            while time.monotonic() < deadline and not stop.is_set():
                data, turn = clips[turn % len(clips)], turn + 1
                sent = time.monotonic()
                try:
                    response = http.post("/transcribe", files={"file": ("clip.wav", data, "audio/wav")}, data=fields or {})
                    ok, what = response.status_code == 200, f"HTTP {response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, what = False, f"{type(exc).__name__}: {exc}"
                took = time.monotonic() - sent
                with lock:
                    load.timeline.append((sent, took, ok))
                    if ok:
                        load.latencies.append(took)
                    else:
                        load.failures.append(what)

    threads = [threading.Thread(target=client, args=(index,), daemon=True) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    load.ended = time.monotonic()
    return load


def worker_pid(url: str, headers: Optional[dict] = None) -> Optional[int]:
    """The service's worker once it answers ``/info`` (None until then), found in the process tree:
    ``/info`` does not show its pid."""
    try:
        answers = httpx.get(url + "/info", headers=headers or {}, timeout=5).status_code == 200
    except httpx.HTTPError:
        return None
    return bentoml_worker_pid(url) if answers else None


def kill_worker_under_load(url: str, clip: bytes, *, clients: int, seconds: float, kill_after_s: float,
                           headers: Optional[dict] = None) -> dict:
    """SIGKILL the worker while ``clients`` keep sending; how many failed, how long until it is back."""
    old = worker_pid(url, headers)
    result: dict = {"old_worker_pid": old}
    loads: list[Load] = []
    loop = threading.Thread(target=lambda: loads.append(request_loop(url, clip, clients=clients, seconds=seconds, headers=headers)))
    loop.start()
    time.sleep(kill_after_s)
    killed_at = time.monotonic()
    os.kill(old, signal.SIGKILL)
    new = None
    while time.monotonic() - killed_at < 120:
        new = worker_pid(url, headers)
        if new is not None and new != old:
            break
        time.sleep(0.1)
    result["new_worker_pid"] = new
    result["back_s"] = round(time.monotonic() - killed_at, 2) if new not in (None, old) else None
    loop.join()
    load = loads[0]
    back_at = killed_at + (result["back_s"] or 0)
    result.update(
        requests=len(load.timeline),
        failed=len(load.failures),
        failed_sent_before_kill=sum(1 for sent, _, ok in load.timeline if not ok and sent < killed_at),
        failed_sent_after_back=sum(1 for sent, _, ok in load.timeline if not ok and sent > back_at),
        ok_after_back=sum(1 for sent, _, ok in load.timeline if ok and sent > back_at),
        failures=sorted(set(load.failures))[:5],
    )
    return result


def disconnect_storm(url: str, clip: bytes, *, clients: int, headers: Optional[dict] = None) -> dict:
    """``clients`` connections that go away: half mid-upload, half right after sending (mid-decode)."""
    host, port = urlparse(url).hostname, urlparse(url).port
    boundary = "storm"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"clip.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode() + clip + f"\r\n--{boundary}--\r\n".encode()
    auth = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (f"POST /transcribe HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}Content-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    started = time.monotonic()
    for index in range(clients):
        with socket.create_connection((host, port), timeout=10) as sock:
            if index % 2 == 0:
                sock.sendall(head + body[: len(body) // 2])  # mid-upload
            else:
                sock.sendall(head + body)  # the whole request, gone before the answer
    return {"clients": clients, "sent_s": round(time.monotonic() - started, 2)}
