"""Service: cold start to /readyz, and RSS growth from 10 to 1000 requests.

Cold start is timed from spawning ``bentoml serve`` to the first 200 from /readyz, in the ways a
version is served: a built bento (``python -m whisper_bento.build --arg model=...``, then
``bentoml serve whisper:<version>`` with the tracking URI pointing at a dead port: what a
deployment starts), and the service from source on a registry alias (``bentoml serve
whisper_bento:Transcriber --arg model=models:/bench-base-int8@bench``, which resolves the alias
first), with the registry an ``mlflow server`` (over the bench's own sqlite store: asked over
REST) and the sqlite file itself (asked through MLflow). The modes are interleaved. The very first
start also imports the registered version into the BentoML model store (once per version): it is
reported apart. RSS is read from /proc/<pid>/status of every process of the server (the
``bentoml serve`` process and its worker), after 10 requests and at later checkpoints up to 1000,
with a short real clip sent by 4 concurrent clients, on tiny.en int8 served from source on its
alias in the ``mlflow server`` (the per-request code is the same for any model).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any

from bench import models
from bench.common import REPO, TRACKING_DB, WORK, decoding_for, log, ratio, summary, threads_wall
from bench.server import BentoServer, ServiceUnavailable, service_args, service_code_present, transcribe_http
from devkit.processes import mlflow_server

BENTO_VERSION = "bench"
UNREACHABLE_REGISTRY = "http://127.0.0.1:9"  # a built bento must start without its registry

MODEL = "base"
COMPUTE_TYPE = "int8"
TARGET_COLD_START_S = 5.0
TARGET_RSS_GROWTH = 0.05
RSS_CLIENTS = 4
RSS_MODEL = "tiny_en"
RSS_CLIP = "hello_world"


def run(settings) -> dict[str, Any]:
    skip = service_code_present()
    if skip:
        return {"skipped": skip}
    logged = models.ensure_logged(MODEL, COMPUTE_TYPE)
    results: dict[str, Any] = {"model": MODEL, "registered_model": f"{logged.name}/{logged.version}",
                               "compute_type": COMPUTE_TYPE, "cpu_threads": settings.cpu_threads,
                               "targets": {"cold_start_s_max": TARGET_COLD_START_S, "rss_growth_max": TARGET_RSS_GROWTH}}
    try:
        with mlflow_server(WORK / "service-registry", backend_store_uri=f"sqlite:///{TRACKING_DB}") as server_uri:
            _measure(settings, logged, results, server_uri)
    except ServiceUnavailable as exc:
        log("service: skipped: %s", str(exc).splitlines()[0])
        return {**results, "skipped": f"bento service did not start: {exc}"}
    return results


def _measure(settings, logged, results: dict[str, Any], server_uri: str) -> None:
    registries = {"server": {"MLFLOW_TRACKING_URI": server_uri}, "file": {"MLFLOW_TRACKING_URI": f"sqlite:///{TRACKING_DB}"}}
    first = BentoServer(logged.uri, cpu_threads=settings.cpu_threads, log_name="service-first", env=registries["server"])
    results["first_start_s"] = first.start()  # may import into the BentoML model store
    first.stop()
    bento = _build_bento(logged.uri, service_args(settings.cpu_threads))
    servers = {
        "bento": lambda rep: BentoServer(None, bento=bento, cpu_threads=settings.cpu_threads,
                                         log_name=f"service-cold-bento-{rep}",
                                         env={"MLFLOW_TRACKING_URI": UNREACHABLE_REGISTRY}),
        **{mode: (lambda rep, mode=mode: BentoServer(logged.uri, cpu_threads=settings.cpu_threads,
                                                     log_name=f"service-cold-{mode}-{rep}", env=registries[mode]))
           for mode in registries},
    }
    cold: dict[str, dict[str, list]] = {mode: {"start": [], "load": [], "first_request": [], "mlflow_in_worker": []}
                                               for mode in servers}
    for rep in range(settings.cold_starts):
        for mode in (list(servers) if rep % 2 == 0 else list(reversed(servers))):
            log("service: cold start %d/%d (%s)", rep + 1, settings.cold_starts, mode)
            server = servers[mode](rep)
            cold[mode]["start"].append(server.start())
            try:
                info = server.info()
                cold[mode]["load"].append(float(info.get("load_seconds") or 0.0))
                cold[mode]["mlflow_in_worker"].append(bool((info.get("imports") or {}).get("mlflow")))
                cold[mode]["first_request"].append(_first_request(server))
            finally:
                server.stop()
    results["bento"] = bento
    results["cold_start"] = {
        mode: {"cold_start_s": summary(v["start"]), "model_load_s_in_worker": summary(v["load"]),
               "first_request_s": summary(v["first_request"]), "mlflow_imported_in_worker": any(v["mlflow_in_worker"])}
        for mode, v in cold.items()
    }
    results["import_floor_s"] = _import_floors()
    results["resolve_in_fresh_process_s"] = {
        mode: summary([_seconds(_RESOLVE.format(uri=logged.uri), env) for _ in range(settings.cold_starts)])
        for mode, env in registries.items()}
    # 1000 base requests would take ~15 min on 2 cores (one 30 s encoder window each); a leak in
    # the service's per-request code shows the same on tiny.en, at a quarter of the cost.
    rss_model = models.ensure_logged(RSS_MODEL, COMPUTE_TYPE)
    results["rss_registered_model"] = f"{rss_model.name}/{rss_model.version}"
    log("service: RSS over %d requests (%s)", settings.rss_requests[-1], rss_model.name)
    server = BentoServer(rss_model.uri, cpu_threads=settings.cpu_threads, log_name="service-rss", env=registries["server"])
    server.start()
    try:
        results["rss_mlflow_in_worker"] = bool((server.info().get("imports") or {}).get("mlflow"))
        results["rss"] = _rss_growth(server, settings.rss_requests)
        results["rss_mlflow_in_worker"] |= bool((server.info().get("imports") or {}).get("mlflow"))
    finally:
        server.stop()


def _build_bento(model_uri: str, args: dict[str, str]) -> str:
    """``python -m whisper_bento.build`` for ``model_uri`` with the service configuration ``args``,
    the one the other starts serve with (rebuilt each run): the bento tag."""
    tag = f"whisper:{BENTO_VERSION}"
    subprocess.run(["bentoml", "delete", "-y", tag], cwd=REPO, capture_output=True)  # absent the first time
    arguments = [x for k, v in {"model": model_uri, **args}.items() for x in ("--arg", f"{k}={v}")]
    build = subprocess.run([sys.executable, "-m", "whisper_bento.build", *arguments, "--version", BENTO_VERSION],
                           cwd=REPO, capture_output=True, text=True)
    if build.returncode != 0:
        raise ServiceUnavailable(f"bentoml build failed:\n{build.stdout[-2000:]}{build.stderr[-2000:]}")
    return tag


def _first_request(server: BentoServer) -> float:
    import httpx

    audio = models.clip(RSS_CLIP)
    with httpx.Client(timeout=600) as client:
        started = time.perf_counter()
        transcribe_http(client, server.url, audio.data, decoding_for(audio.language))
        return time.perf_counter() - started


# What the service module does at import in the bentoml serve process (its workers inherit the
# result): import the plugin and resolve the alias against the registry.
_RESOLVE = "from whisper_bento import model_ref; model_ref.import_from_registry({uri!r})"


def _seconds(code: str, env: dict[str, str] | None = None) -> float:
    """Wall seconds of a fresh interpreter running ``code`` (pieces of every cold start)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, **env} if env else None)
    return time.perf_counter() - started


def _import_floors() -> dict[str, float]:
    return {"python_bare_s": _seconds("import sys"),
            "faster_whisper_s": _seconds("import faster_whisper"),
            "mlflow_s": _seconds("import mlflow"),
            "mlflow_faster_whisper_s": _seconds("import mlflow_faster_whisper"),
            "service_module_deps_s": _seconds("import bentoml, whisper_bento.config, mlflow_faster_whisper.engine, "
                                              "whisper_bento.forms, whisper_bento.formats"),
            "bentoml_sdk_s": _seconds("import bentoml; bentoml.service; bentoml.importing")}


def _rss_growth(server: BentoServer, checkpoints: tuple[int, ...]) -> dict[str, Any]:
    import httpx

    audio = models.clip(RSS_CLIP)
    data, options = audio.data, decoding_for(audio.language)
    samples: list[dict[str, Any]] = []
    sent = 0
    started = time.perf_counter()
    for target in checkpoints:
        remaining = target - sent
        counter = iter(range(remaining))
        lock = threading.Lock()

        def client_loop(_: int) -> None:  # run by threads_wall before the next checkpoint
            with httpx.Client(timeout=600) as client:
                while True:
                    with lock:
                        if next(counter, None) is None:
                            return
                    transcribe_http(client, server.url, data, options)

        threads_wall(client_loop, min(RSS_CLIENTS, remaining))
        sent = target
        rss = server.rss()
        samples.append({"requests": sent, "elapsed_s": round(time.perf_counter() - started, 1),
                        "total_bytes": rss["total_bytes"], "worker_bytes": rss["worker_bytes"],
                        "processes": len(rss["processes"])})
        log("service: %d requests, server RSS %.0f MB (worker %.0f MB)", sent, rss["total_bytes"] / 2**20,
            (rss["worker_bytes"] or 0) / 2**20)
    first, last = samples[0], samples[-1]
    return {
        "clip": audio.name,
        "clients": RSS_CLIENTS,
        "samples": samples,
        "processes": server.rss()["processes"],
        "growth_total": ratio(last["total_bytes"] - first["total_bytes"], first["total_bytes"]),
        "growth_worker": ratio((last["worker_bytes"] or 0) - (first["worker_bytes"] or 0), first["worker_bytes"] or 0),
        "requests_per_s": (last["requests"] - 0) / max(last["elapsed_s"], 1e-9),
    }
