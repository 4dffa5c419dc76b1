"""Field faults: hostile and unlucky traffic, a killed worker, oversized uploads, all in one run.

One ``bentoml serve`` of whisper-tiny.en int8 from source on a registry alias, with an api_key,
an admin_key (not ASCII) and a webhook_secret (with a space and a comma in it) configured, as an
operator who locks the service down would run it. Each drill (bench/field.py) is one attack or
accident; the section records what the service answered. The registry is the bench's sqlite
store, holding two copies of the same weights as versions 1 and 2 of ``bench-field``.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import httpx

from bench import field
from bench.common import WORK, log, process_tree_rss
from bench.server import BentoServer, ServiceUnavailable, service_code_present
from devkit.webhooks import post_signed

NAME = "bench-field"
API_KEY = "bench-api-key"
ADMIN_KEY = "bench-admin-clé"  # not ASCII: the header's bytes must match as sent
SECRET = "bench webhook, secret"  # a space and a comma: one secret, not three


def run(settings) -> dict[str, Any]:
    skip = service_code_present()
    if skip:
        return {"skipped": skip}
    full = settings.mode == "full"
    from devkit import real

    clips = {c.name: c.path.read_bytes() for c in real.speech_clips(["en"])}
    short = clips["quick_brown_fox"]
    long_clip = real.long_speech(min_seconds=120).read_bytes()
    _register(real.whisper_tiny_en_ct2())
    tmp = WORK / "field-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {"BENCH_API_KEY": API_KEY, "BENCH_ADMIN_KEY": ADMIN_KEY, "BENCH_WEBHOOK_SECRET": SECRET, "TMPDIR": str(tmp)}
    server = BentoServer(f"models:/{NAME}@production", cpu_threads=settings.cpu_threads, log_name="field", env=env,
                         extra_args={"api_key": "env:BENCH_API_KEY", "admin_key": "env:BENCH_ADMIN_KEY",
                                     "webhook_secret": "env:BENCH_WEBHOOK_SECRET", "follow_interval_s": "2"})
    results: dict[str, Any] = {"model": "tiny_en", "compute_type": "int8", "cpu_threads": settings.cpu_threads}
    try:
        server.start()
    except ServiceUnavailable as exc:
        return {**results, "skipped": f"bento service did not start: {exc}"}
    auth = {"authorization": f"Bearer {API_KEY}"}
    url = server.url
    try:
        httpx.post(url + "/transcribe", files={"file": ("a.wav", short)}, headers=auth, timeout=300)  # warm-up
        drills = results["drills"] = {}

        def drill(name: str, run_it) -> None:
            try:
                drills[name] = run_it()
            except Exception as exc:  # noqa: BLE001 - one failed drill must not lose the others' answers
                drills[name] = {"error": f"{type(exc).__name__}: {exc}"}

        log("field: slow unauthenticated webhook bodies")
        drill("slow_webhooks", lambda: field.slow_bodies(
            url, "/webhooks/mlflow", connections=70, declared=2100, bytes_per_s=5, seconds=60 if full else 30,
            during=lambda: field.burst(url, short, clients=4, headers=auth)))

        log("field: streams dropped before their first event")
        drill("dropped_streams", lambda: field.dropped_streams(url, long_clip, clients=16, hold_s=20 if full else 8,
                                                               headers=auth, probe=short, within_s=600))

        log("field: 100 requests at once")
        drill("burst_100", lambda: field.burst(url, short, clients=100, headers=auth))

        log("field: idle and half-sent connections")
        drill("idle", lambda: field.idle_connections(url, connections=300, seconds=120 if full else 60))

        log("field: webhooks: whole secret, fragment, replay, nesting")
        drill("webhooks", lambda: _webhooks(url))

        log("field: admin key that is not ASCII")
        drill("admin_non_ascii", lambda: httpx.put(url + "/admin/model", json={"model": f"models:/{NAME}@production"},
                                                   headers={**auth, "x-whisper-admin-key": ADMIN_KEY.encode()},
                                                   timeout=300).status_code)
        drill("info_leaks", lambda: _info_leaks(url, auth))

        log("field: uploads at the size limit, and a chunked body over it")
        worker = _worker_pid(server)
        rss = lambda: sum(r["rss_bytes"] for r in process_tree_rss(worker))  # noqa: E731
        drill("uploads_16_max", lambda: field.big_uploads(url, clients=16, size=100 * 1024 * 1024 - 4096, pid=worker,
                                                          tmp_folder=str(tmp), rss=rss, headers=auth))
        drill("chunked_300mb", lambda: field.big_uploads(url, clients=1, size=300 * 1024 * 1024, pid=worker,
                                                         tmp_folder=str(tmp), rss=rss, headers=auth, chunked=True))

        log("field: worker killed after a promotion")
        drill("kill_after_promotion", lambda: _kill_after_promotion(server, short, auth))
    finally:
        server.stop()
    return results


def _register(ct2_dir) -> None:
    import mlflow
    from mlflow import MlflowClient

    import mlflow_faster_whisper as mfw

    client = MlflowClient()
    try:
        client.delete_registered_model(NAME)  # each run starts from versions 1 and 2
    except Exception:  # noqa: BLE001 - not there yet
        pass
    for _ in range(2):
        with mlflow.start_run():
            mfw.log_model(str(ct2_dir), name="model", registered_model_name=NAME)
    client.set_registered_model_alias(NAME, "production", "1")


def _webhooks(url: str) -> dict[str, Any]:
    event = {"entity": "model_version_alias", "action": "created",
             "data": {"name": NAME, "alias": "staging", "version": "1"}}
    whole = post_signed(url, SECRET, event)
    fragment = post_signed(url, "bench", event)
    replay_id = "bench-replayed-delivery"
    first = post_signed(url, SECRET, event, delivery=replay_id)
    again = post_signed(url, SECRET, event, delivery=replay_id)
    future = post_signed(url, SECRET, event, timestamp=int(time.time()) + 280)
    nested = post_signed(url, SECRET, event, body=b"[" * 5000 + b"]" * 5000)
    return {"whole_secret": whole.status_code, "fragment": fragment.status_code, "first": first.status_code,
            "replayed": again.status_code, "future_280s": future.status_code, "nested_10kb": nested.status_code}


def _info_leaks(url: str, auth: dict) -> dict[str, bool]:
    info = httpx.get(url + "/info", headers=auth, timeout=30).text
    return {"worker_pid": '"worker_pid"' in info, "tmp_or_home_path": str(WORK) in info}


def _worker_pid(server: BentoServer) -> int:
    rows = server.rss()["processes"]
    return next(r["pid"] for r in rows if "_bentoml_impl.worker" in r["cmd"])


def _kill_after_promotion(server: BentoServer, clip: bytes, auth: dict) -> dict[str, Any]:
    """Move production to version 2, wait until the service answers with it, SIGKILL the worker;
    the first answer after the kill: how long it took and which version gave it."""
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(NAME, "production", "2")
    url = server.url
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        answer = httpx.post(url + "/transcribe", files={"file": ("a.wav", clip)}, headers=auth, timeout=300)
        if answer.headers.get("x-whisper-model-version") == "2":
            break
        time.sleep(1)
    else:
        return {"error": "the service did not follow the alias to version 2 within 300 s"}
    os.kill(_worker_pid(server), signal.SIGKILL)
    killed = time.monotonic()
    while time.monotonic() - killed < 300:
        try:
            answer = httpx.post(url + "/transcribe", files={"file": ("a.wav", clip)}, headers=auth, timeout=300)
        except httpx.HTTPError:
            time.sleep(0.2)
            continue
        if answer.status_code == 200:
            return {"first_200_after_s": round(time.monotonic() - killed, 1),
                    "version": answer.headers.get("x-whisper-model-version"), "alias_names": "2"}
        time.sleep(0.2)
    return {"first_200_after_s": None}
