"""Soak and faults: many clients for minutes, a worker killed under load, clients that go away.

Through a real ``bentoml serve`` of tiny.en int8 on CPU, with the real English and multilingual
clips (each client goes round them): 16 clients for ``soak_seconds`` (600 in a full run), errors,
p50/p95/p99 latency and RSS at the start and the end; then the worker killed with SIGKILL under
8 clients (how many requests failed, how long until a new worker answered); then 50 clients that
go away, half mid-upload and half right after sending, and how long until the queue drained and
a request was answered again, against that request's latency before the storm.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from bench import faults, models
from bench.common import log
from bench.server import BentoServer, ServiceUnavailable, service_code_present

MODEL = "tiny_en"
COMPUTE_TYPE = "int8"
SOAK_CLIENTS = 16
KILL_CLIENTS = 8
STORM_CLIENTS = 50


def run(settings) -> dict[str, Any]:
    skip = service_code_present()
    if skip:
        return {"skipped": skip}
    soak_seconds = 20 if settings.mode == "quick" else 600
    logged = models.ensure_logged(MODEL, COMPUTE_TYPE)
    clips = [c.path.read_bytes() for c in models.clips()]
    results: dict[str, Any] = {"model": MODEL, "registered_model": f"{logged.name}/{logged.version}", "clips": len(clips),
                               "cpu_threads": settings.cpu_threads}
    server = BentoServer(logged.uri, cpu_threads=settings.cpu_threads, log_name="soak")
    try:
        server.start()
    except ServiceUnavailable as exc:
        return {**results, "skipped": f"bento service did not start: {exc}"}
    try:
        faults.request_loop(server.url, clips, clients=2, seconds=5)  # warm-up, not counted
        rss_start = server.rss()
        log("soak: %d clients for %d s", SOAK_CLIENTS, soak_seconds)
        load = faults.request_loop(server.url, clips, clients=SOAK_CLIENTS, seconds=soak_seconds)
        rss_end = server.rss()
        results["soak"] = {
            "clients": SOAK_CLIENTS, "seconds": round(load.ended - load.started, 1), "requests": len(load.timeline),
            "errors": len(load.failures), "error_kinds": sorted(set(load.failures))[:5],
            "requests_per_s": round(len(load.timeline) / (load.ended - load.started), 2), **load.percentiles(),
            "rss_start_bytes": rss_start["total_bytes"], "rss_end_bytes": rss_end["total_bytes"],
            "worker_rss_start_bytes": rss_start["worker_bytes"], "worker_rss_end_bytes": rss_end["worker_bytes"],
        }
        log("soak: worker killed under %d clients", KILL_CLIENTS)
        results["kill"] = {"clients": KILL_CLIENTS, **faults.kill_worker_under_load(
            server.url, clips, clients=KILL_CLIENTS, seconds=40 if settings.mode == "full" else 20, kill_after_s=8)}
        log("soak: %d clients go away", STORM_CLIENTS)
        before = _one_request(server.url, clips[0])
        storm = faults.disconnect_storm(server.url, clips[0], clients=STORM_CLIENTS)
        storm_end = time.monotonic()
        after = _one_request(server.url, clips[0])
        results["disconnects"] = {**storm, "latency_before_s": round(before, 3), "first_answer_after_storm_s": round(after, 3),
                                  "drained_s": round(time.monotonic() - storm_end, 2),
                                  "latency_after_drain_s": round(_one_request(server.url, clips[0]), 3)}
    finally:
        server.stop()
    return results


def _one_request(url: str, clip: bytes) -> float:
    started = time.monotonic()
    response = httpx.post(url + "/transcribe", files={"file": ("clip.wav", clip, "audio/wav")}, timeout=600)
    response.raise_for_status()
    return time.monotonic() - started
