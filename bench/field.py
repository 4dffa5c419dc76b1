"""Field drills against a running service: what hostile and unlucky clients do, and what the
service answers. Each drill sends traffic only to the service's loopback address, is bounded in
count and time, returns what it counted, and never asserts: the tests assert, the bench reports.
"""

from __future__ import annotations

import collections
import os
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlparse

import httpx


def _address(url: str) -> tuple[str, int]:
    parts = urlparse(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def _closed(sock: socket.socket) -> bool:
    """Whether the peer closed (or answered on) this connection."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)
    except (OSError, ValueError):
        return True


def status_counts(responses: list[Any]) -> dict[str, int]:
    """``{"200": n, "503 ours": n, "429 other": n, "ConnectError": n}``: a status, and whether its
    body is the service's JSON error shape ({"error": {"message", "type", ...}})."""
    counts: collections.Counter[str] = collections.Counter()
    for response in responses:
        if isinstance(response, Exception):
            counts[type(response).__name__] += 1
            continue
        if response.status_code < 400:
            counts[str(response.status_code)] += 1
            continue
        try:
            ours = isinstance(response.json().get("error"), dict)
        except ValueError:
            ours = False
        counts[f"{response.status_code} {'ours' if ours else 'other'}"] += 1
    return dict(sorted(counts.items()))


def burst(url: str, clip: bytes, *, clients: int, headers: Optional[dict] = None, path: str = "/transcribe",
          fields: Optional[dict] = None) -> dict[str, int]:
    """``clients`` requests sent at once, one each; their statuses."""
    responses: list[Any] = []
    lock = threading.Lock()
    gate = threading.Barrier(clients)

    def one() -> None:
        gate.wait()
        try:
            response: Any = httpx.post(url + path, files={"file": ("clip.wav", clip, "audio/wav")}, data=fields or {},
                                       headers=headers or {}, timeout=600)
        except httpx.HTTPError as exc:
            response = exc
        with lock:
            responses.append(response)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return status_counts(responses)


def slow_bodies(url: str, path: str, *, connections: int, declared: int, bytes_per_s: float, seconds: float,
                during: Callable[[], Any]) -> dict[str, Any]:
    """``connections`` unauthenticated POSTs to ``path`` that declare ``declared`` bytes and send
    them at ``bytes_per_s``; ``during()`` runs meanwhile (the legitimate traffic). Returns when
    each slow connection was cut by the server (or None: still open after ``seconds``) and what
    ``during`` returned."""
    host, port = _address(url)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    started = time.monotonic()
    cut: list[Optional[float]] = [None] * connections

    def slow(index: int) -> None:
        try:
            with socket.create_connection((host, port), timeout=10) as sock:
                sock.sendall(head)
                sent = 0
                while time.monotonic() - started < seconds and sent < declared:
                    if _closed(sock):
                        cut[index] = time.monotonic() - started
                        return
                    sock.sendall(b" ")
                    sent += 1
                    time.sleep(1 / bytes_per_s)
        except OSError:
            cut[index] = time.monotonic() - started

    threads = [threading.Thread(target=slow, args=(i,), daemon=True) for i in range(connections)]
    for thread in threads:
        thread.start()
    time.sleep(min(2.0, seconds / 4))  # every slow connection is open before the real traffic
    outcome = during()
    for thread in threads:
        thread.join()
    done = [c for c in cut if c is not None]
    return {"connections": connections, "cut": len(done), "cut_by_s": round(max(done), 1) if done else None,
            "during": outcome}


def idle_connections(url: str, *, connections: int, seconds: float) -> dict[str, Any]:
    """``connections`` sockets, half sending nothing and half a partial request line; how many the
    server closed within ``seconds``."""
    host, port = _address(url)
    socks = []
    for index in range(connections):
        try:
            sock = socket.create_connection((host, port), timeout=10)
        except OSError:
            break
        if index % 2:
            sock.sendall(b"GET /info HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        socks.append(sock)
    started = time.monotonic()
    closed_at: dict[int, float] = {}
    while time.monotonic() - started < seconds and len(closed_at) < len(socks):
        for index, sock in enumerate(socks):
            if index not in closed_at and _closed(sock):
                closed_at[index] = time.monotonic() - started
        time.sleep(0.2)
    for sock in socks:
        sock.close()
    return {"connections": len(socks), "closed": len(closed_at),
            "closed_by_s": round(max(closed_at.values()), 1) if closed_at else None}


def dropped_streams(url: str, clip: bytes, *, clients: int, hold_s: float, headers: Optional[dict] = None,
                    probe: bytes, within_s: float) -> dict[str, Any]:
    """``clients`` ``stream=true`` requests that go away after ``hold_s`` without reading an event;
    then how long until a new request is answered 200 (polling every second, up to ``within_s``)."""
    host, port = _address(url)
    boundary = "drop"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"stream\"\r\n\r\ntrue\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode() + clip + f"\r\n--{boundary}--\r\n".encode()
    auth = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (f"POST /transcribe HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}Content-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    socks = []
    for _ in range(clients):
        sock = socket.create_connection((host, port), timeout=30)
        sock.sendall(head + body)
        socks.append(sock)
    time.sleep(hold_s)
    for sock in socks:
        sock.close()
    gone = time.monotonic()
    statuses: list[Any] = []
    while time.monotonic() - gone < within_s:
        try:
            response: Any = httpx.post(url + "/transcribe", files={"file": ("p.wav", probe, "audio/wav")},
                                       headers=headers or {}, timeout=120)
        except httpx.HTTPError as exc:
            response = exc
        statuses.append(response)
        if not isinstance(response, Exception) and response.status_code == 200:
            return {"clients": clients, "hold_s": hold_s, "first_200_after_s": round(time.monotonic() - gone, 1),
                    "refused_before": status_counts(statuses[:-1])}
        time.sleep(1)
    return {"clients": clients, "hold_s": hold_s, "first_200_after_s": None, "refused_before": status_counts(statuses)}


def spooled_bytes(pid: int, folder: str) -> int:
    """Bytes of the regular files under ``folder`` that process ``pid`` holds open (deleted ones
    included: a spooled upload is unlinked while it is read)."""
    total = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return 0
    for fd in fds:
        try:
            target = os.readlink(fd)
            if target.startswith(folder):
                total += os.stat(fd).st_size
        except OSError:
            continue
    return total


def big_uploads(url: str, *, clients: int, size: int, pid: int, tmp_folder: str, rss: Callable[[], int],
                headers: Optional[dict] = None, chunked: bool = False) -> dict[str, Any]:
    """``clients`` uploads of ``size`` bytes at once (not audio: the answer is a refusal or a 400);
    the peak worker RSS and spooled bytes while they run, and their statuses."""
    peak = {"rss": rss(), "spool": 0}
    before = peak["rss"]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], rss())
            peak["spool"] = max(peak["spool"], spooled_bytes(pid, tmp_folder))
            time.sleep(0.05)

    def body():
        boundary = b"--big\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\n\r\n"
        yield boundary
        block = b"\0" * (1 << 20)
        left = size
        while left > 0:
            yield block[: min(left, len(block))]
            left -= len(block)
        yield b"\r\n--big--\r\n"

    responses: list[Any] = []
    lock = threading.Lock()

    def one() -> None:
        content: Any = body() if chunked else b"".join(body())
        try:
            response: Any = httpx.post(url + "/transcribe", content=content, timeout=300,
                                       headers={**(headers or {}), "content-type": "multipart/form-data; boundary=big"})
        except httpx.HTTPError as exc:
            response = exc
        with lock:
            responses.append(response)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=one, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    sampler.join()
    return {"clients": clients, "size_bytes": size, "chunked": chunked, "statuses": status_counts(responses),
            "worker_rss_growth_bytes": peak["rss"] - before, "peak_spooled_bytes": peak["spool"]}


