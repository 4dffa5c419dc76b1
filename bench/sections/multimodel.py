"""Several models in one service: throughput against one service per model, load and swap cost,
memory per loaded model.

- Throughput: 8 clients, each sending a short real clip to tiny.en and base int8 in turn, to one
  service serving both (``models=...``, a budget that holds both) and to two single-model
  services on the same machine; the two modes interleaved, in one run.
- Cold load: the first request to the model the service did not preload, against a request to
  it once loaded (the service's own ``load_seconds`` beside it).
- Swap: a service whose budget holds one of the two; requests alternating between them each load
  the other model (``loads`` counted by the service), against the same requests to a service
  holding both.
- Memory: the worker's RSS growth when the second model loads, against its artifact size and
  against the service's estimate (what its budget counts).
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from bench import models
from bench.common import log, ratio, summary, threads_wall
from bench.server import BentoServer, ServiceUnavailable, service_code_present
from devkit import real

MODELS = ("tiny_en", "base")
COMPUTE_TYPE = "int8"
CLIENTS = 8
CLIP = "hello_world"


def run(settings) -> dict[str, Any]:
    skip = service_code_present()
    if skip:
        return {"skipped": skip}
    logged = {m: models.ensure_logged(m, COMPUTE_TYPE) for m in MODELS}
    clip = next(c for c in real.speech_clips() if c.name == CLIP).path.read_bytes()
    results: dict[str, Any] = {
        "models": {m: {"registered_model": f"{v.name}/{v.version}", "artifact_bytes": v.size_bytes} for m, v in logged.items()},
        "clients": CLIENTS,
        "clip": CLIP,
        "compute_type": COMPUTE_TYPE,
        "cpu_threads": settings.cpu_threads,
    }
    uris = [logged[m].uri for m in MODELS]
    names = [logged[m].name for m in MODELS]
    per_client = max(2, settings.clips_per_client * 2)
    try:
        shared = BentoServer(None, cpu_threads=settings.cpu_threads, log_name="multimodel-shared", extra_args={"models": ",".join(uris)})
        results["cold_load"] = _cold_load(shared, names, clip)
        singles = [BentoServer(uri, cpu_threads=settings.cpu_threads, log_name=f"multimodel-single-{i}") for i, uri in enumerate(uris)]
        for single in singles:
            single.start()
        try:
            runs: dict[str, list[float]] = {"shared": [], "separate": []}
            for rep in range(settings.concurrency_reps):
                for mode in ("shared", "separate") if rep % 2 == 0 else ("separate", "shared"):
                    targets = [(shared.url, name) for name in names] if mode == "shared" else [(s.url, None) for s in singles]
                    runs[mode].append(_throughput(targets, clip, per_client))
                    log("multimodel: %s rep %d: %.2f requests/s", mode, rep + 1, runs[mode][-1])
            results["throughput_rps"] = {mode: summary(values) for mode, values in runs.items()}
            results["shared_over_separate"] = ratio(
                results["throughput_rps"]["shared"]["median"], results["throughput_rps"]["separate"]["median"]
            )
            results["rss_bytes"] = {
                "shared_worker": shared.rss()["worker_bytes"],
                "separate_workers": [s.rss()["worker_bytes"] for s in singles],
            }
        finally:
            shared.stop()
            for single in singles:
                single.stop()
        results["swap"] = _swaps(settings, uris, names, clip, [logged[m] for m in MODELS])
    except ServiceUnavailable as exc:
        log("multimodel: skipped: %s", str(exc).splitlines()[0])
        return {**results, "skipped": f"bento service did not start: {exc}"}
    return results


def _post(http: httpx.Client, url: str, clip: bytes, model: str | None) -> httpx.Response:
    data = {"model": model} if model else {}
    response = http.post(url + "/v1/audio/transcriptions", files={"file": ("clip.wav", clip, "audio/wav")}, data=data)
    if response.status_code != 200:
        raise RuntimeError(f"{url} ({model}) -> {response.status_code}: {response.text[:300]}")
    return response


def _cold_load(server: BentoServer, names: list[str], clip: bytes) -> dict[str, Any]:
    """Start the shared service (the first model preloaded): the second model's first request
    loads it; then warm requests to it; and the worker's RSS before and after that load."""
    server.start()
    rss_before = server.rss()["worker_bytes"]
    with httpx.Client(timeout=600) as http:
        started = time.perf_counter()
        _post(http, server.url, clip, names[1])
        cold = time.perf_counter() - started
        warm = []
        for _ in range(3):
            started = time.perf_counter()
            _post(http, server.url, clip, names[1])
            warm.append(time.perf_counter() - started)
        info = {m["name"]: m for m in http.get(server.url + "/info").json()["models"]}
    rss_after = server.rss()["worker_bytes"]
    second = info[names[1]]
    return {
        "first_request_s": round(cold, 3),
        "warm_request_s": summary(warm),
        "load_seconds": second["load_seconds"],
        "memory": {
            name: {k: m[k] for k in ("size_bytes", "estimate_bytes", "loaded_bytes", "rss_growth_bytes")} for name, m in info.items()
        },
        "worker_rss_growth_bytes": (rss_after - rss_before) if rss_after and rss_before else None,
    }


def _throughput(targets: list[tuple[str, str | None]], clip: bytes, per_client: int) -> float:
    """Requests per second of ``CLIENTS`` clients, each sending ``per_client`` requests to the
    targets in turn (client i starts at target i mod n)."""

    def client(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            for k in range(per_client):
                url, model = targets[(index + k) % len(targets)]
                _post(http, url, clip, model)

    return CLIENTS * per_client / threads_wall(client, CLIENTS)


def _swaps(settings, uris: list[str], names: list[str], clip: bytes, logged: list) -> dict[str, Any]:
    """Sequential requests alternating between the two models, in a service whose budget holds
    one (each request swaps) and one that holds both."""
    from whisper_bento.models import footprint_bytes

    sizes = sorted(footprint_bytes(m.size_bytes, m.quantization, COMPUTE_TYPE) for m in logged)
    budgets = {"holds_one": sizes[1] + sizes[0] // 2, "holds_both": 4 * sum(sizes)}
    out: dict[str, Any] = {"budgets_bytes": budgets}
    for label, budget in budgets.items():
        extra = {"models": ",".join(uris), "memory_budget_bytes": str(budget)}
        with (
            BentoServer(None, cpu_threads=settings.cpu_threads, log_name=f"multimodel-swap-{label}", extra_args=extra) as server,
            httpx.Client(timeout=600) as http,
        ):
            for name in names:  # each loaded once before timing
                _post(http, server.url, clip, name)
            times = []
            for k in range(4 * max(1, settings.concurrency_reps)):
                started = time.perf_counter()
                _post(http, server.url, clip, names[k % 2])
                times.append(time.perf_counter() - started)
            info = {m["name"]: m for m in http.get(server.url + "/info").json()["models"]}
        out[label] = {
            "request_s": summary(times),
            "loads": {n: info[n]["loads"] for n in names},
            "load_seconds": {n: info[n]["load_seconds"] for n in names},
        }
        log("multimodel: %s: median request %.2f s", label, out[label]["request_s"]["median"])
    out["swap_cost_s"] = round(out["holds_one"]["request_s"]["median"] - out["holds_both"]["request_s"]["median"], 3)
    return out
