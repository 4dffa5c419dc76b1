"""Concurrency: 8 clients at once against the bento (adaptive batching) vs raw, one clip at a time.

Each client sends its clips one after the other (a new request when the previous one returns);
the raw baseline decodes exactly the same list of clips sequentially in this process, with the
same model artifact, compute_type, cpu_threads and decoding options. Throughput = clips / wall s.
Raw and bento runs alternate, starting with a different one each repetition.
"""

from __future__ import annotations

import io
import threading
import time
from typing import Any

from bench import models
from bench.common import decoding_for, log, ratio, summary
from bench.costs import breakdown
from bench.server import BentoServer, ServiceUnavailable, service_code_present, transcribe_http

CLIENTS = 8
COMPUTE_TYPE = "int8"
TARGET = 2.0  # bento throughput / raw sequential throughput
MODEL = "base"


def run(settings) -> dict[str, Any]:
    import httpx
    from faster_whisper import WhisperModel

    from whisper_registry.metrics import score

    skip = service_code_present()
    if skip:
        return {"skipped": skip}
    logged = models.ensure_logged(MODEL, COMPUTE_TYPE)
    english = models.clips(["en"])  # one language: requests with equal options can share a batch
    plan = [[english[(c + j) % len(english)] for j in range(settings.clips_per_client)] for c in range(CLIENTS)]
    flat = [a for client in plan for a in client]
    payloads = {a.name: a.data for a in english}
    raw = WhisperModel(str(logged.data_dir), device="cpu", compute_type=COMPUTE_TYPE,
                       cpu_threads=settings.cpu_threads, local_files_only=True)
    server = BentoServer(logged.uri, cpu_threads=settings.cpu_threads, compute_type=COMPUTE_TYPE,
                         log_name="concurrency")
    try:
        server.start()
    except ServiceUnavailable as exc:
        log("concurrency: skipped: %s", str(exc).splitlines()[0])
        return {"skipped": f"bento service did not start: {exc}"}

    def run_raw() -> list[str]:
        texts = []
        for audio in flat:
            segments, _ = raw.transcribe(io.BytesIO(payloads[audio.name]), **decoding_for(audio.language))
            texts.append("".join(s.text for s in segments).strip())
        return texts

    def run_bento() -> tuple[list[str], list[float], list[int]]:
        texts: list[list[str]] = [[] for _ in plan]
        latencies: list[float] = []
        batch_sizes: list[int] = []
        barrier = threading.Barrier(CLIENTS)
        errors: list[BaseException] = []

        def client_loop(index: int) -> None:
            try:
                with httpx.Client(timeout=600) as client:
                    barrier.wait()
                    for audio in plan[index]:
                        started = time.perf_counter()
                        body = transcribe_http(client, server.url, payloads[audio.name], decoding_for(audio.language))
                        latencies.append(time.perf_counter() - started)
                        batch_sizes.append(int(body.get("batch_size", 1)))
                        texts[index].append(body["text"])
            except BaseException as exc:  # reported after the join
                errors.append(exc)

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return [t for client in texts for t in client], latencies, batch_sizes

    try:
        log("concurrency: warm-up")
        segments, _ = raw.transcribe(io.BytesIO(payloads[flat[0].name]), **decoding_for("en"))
        list(segments)
        run_bento()
        config = server.info().get("config", {})
        walls: dict[str, list[float]] = {"raw_sequential": [], "bento_concurrent": []}
        latencies, batch_sizes, texts = [], [], {}
        for rep in range(settings.concurrency_reps):
            order = ["raw_sequential", "bento_concurrent"][:: 1 if rep % 2 == 0 else -1]
            for name in order:
                log("concurrency: rep %d/%d %s (%d clips)", rep + 1, settings.concurrency_reps, name, len(flat))
                started = time.perf_counter()
                if name == "raw_sequential":
                    texts[name] = run_raw()
                else:
                    texts[name], lat, sizes = run_bento()
                    latencies += lat
                    batch_sizes += sizes
                walls[name].append(time.perf_counter() - started)
        rss = server.rss()
    finally:
        server.stop()
    log("concurrency: encode/generate cost at batch 1 vs %d (raw CTranslate2 calls)", CLIENTS)
    from tests.fixtures.audio import read_wav

    costs = breakdown(raw, [read_wav(a.path)[0] for a in english], CLIENTS, 3 if settings.mode == "full" else 1)
    audio_seconds = sum(a.seconds for a in flat)
    refs = [a.reference for a in flat]
    stats = {name: summary(values) for name, values in walls.items()}
    throughput = {name: len(flat) / s["median"] for name, s in stats.items()}
    return {
        "model": MODEL,
        "registered_model": f"{logged.name}/{logged.version}",
        "compute_type": COMPUTE_TYPE,
        "cpu_threads": settings.cpu_threads,
        "clients": CLIENTS,
        "clips_per_client": settings.clips_per_client,
        "requests": len(flat),
        "audio_seconds": round(audio_seconds, 2),
        "wall_seconds": stats,
        "throughput_clips_per_s": throughput,
        "throughput_audio_s_per_s": {k: v * audio_seconds / len(flat) for k, v in throughput.items()},
        "throughput_ratio": ratio(throughput["bento_concurrent"], throughput["raw_sequential"]),
        "target_ratio_min": TARGET,
        "bento_latency_s": summary(latencies),
        "bento_batch_sizes": {str(k): batch_sizes.count(k) for k in sorted(set(batch_sizes))},
        "wer": {name: score(refs, t, "en").get("wer") for name, t in texts.items()},
        "server_rss_bytes": rss["total_bytes"],
        "costs": costs,
        "server_config": {k: config.get(k) for k in ("batch_size", "max_requests", "max_latency_ms", "num_workers")},
    }
