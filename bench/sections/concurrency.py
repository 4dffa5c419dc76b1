"""Concurrency: the decoding engine over HTTP against raw sequential and the one-call limit.

Through a real ``bentoml serve`` (base int8, the service's decoding defaults with the language
forced or detected, beam 5), measured in the same run:

- ``raw``: faster-whisper's ``WhisperModel.transcribe`` in this process, the requests one after the
  other, same model directory, compute type, threads and options;
- ``limit``: ONE ``BatchedInferencePipeline.transcribe`` call over the same windows (the clips laid
  end to end, one ``clip_timestamps`` window each, ``batch_size`` as the service's): what the
  library does with all the windows in hand at once (first temperature only, no previous text);
- ``bento_cN``: N clients, each sending its share of the requests one after the other.

Workloads: short English clips (1, 8 and 32 clients); the 27 clips in 9 languages, language forced
and detected (8 clients); the long file alone (sequential and ``long_form=batched``); a short
request's latency alone and while the long file decodes. Texts are compared with raw sequential:
same-text rate, and WER/CER of both against the references.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from bench import models
from bench.common import BEAM_SIZE, log, ratio, summary, threads_wall
from bench.costs import breakdown
from bench.server import BentoServer, ServiceUnavailable, service_code_present, transcribe_http

MODEL = "base"
COMPUTE_TYPE = "int8"
BATCH_SIZE = 8
SHORT_REQUESTS = 32


def run(settings) -> dict[str, Any]:
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    from devkit.audio import read_wav

    skip = service_code_present()
    if skip:
        return {"skipped": skip}
    logged = models.ensure_logged(MODEL, COMPUTE_TYPE)
    raw = WhisperModel(str(logged.data_dir), device="cpu", compute_type=COMPUTE_TYPE,
                       cpu_threads=settings.cpu_threads, local_files_only=True)
    samples = {}

    def pcm(audio: models.Audio) -> np.ndarray:
        if audio.name not in samples:
            samples[audio.name] = read_wav(audio.path)[0].astype(np.float32)
        return samples[audio.name]

    english = models.clips(["en"])
    short = [english[i % len(english)] for i in range(SHORT_REQUESTS if settings.mode == "full" else 8)]
    every = models.clips()
    if settings.mode != "full":  # one clip per language
        every = list({a.language: a for a in every}.values())
    long_file = models.long_audio(settings.long_seconds)

    def options(audio: models.Audio, detect: bool = False) -> dict[str, Any]:
        return {"beam_size": BEAM_SIZE} if detect else {"beam_size": BEAM_SIZE, "language": audio.language}

    def run_raw(requests: list[models.Audio], detect: bool = False, **extra: Any) -> list[str]:
        texts = []
        for audio in requests:
            segments, _ = raw.transcribe(pcm(audio), **options(audio, detect), **extra)
            texts.append("".join(s.text for s in segments).strip())
        return texts

    def run_limit(requests: list[models.Audio]) -> list[str]:
        """One batched-pipeline call over every request's window (one language: the first's)."""
        audio = np.concatenate([pcm(a) for a in requests])
        starts = np.cumsum([0] + [len(pcm(a)) for a in requests])
        clips = [{"start": s / 16000, "end": e / 16000} for s, e in zip(starts[:-1], starts[1:])]
        segments, _ = BatchedInferencePipeline(raw).transcribe(
            audio, clip_timestamps=clips, batch_size=BATCH_SIZE, **options(requests[0]))
        texts = [""] * len(requests)
        seeks = [int(s / 16000 * raw.frames_per_second) for s in starts[:-1]]
        for segment in segments:
            owner = min(range(len(seeks)), key=lambda i: abs(seeks[i] - segment.seek))
            texts[owner] += segment.text
        return [t.strip() for t in texts]

    server = BentoServer(logged.uri, cpu_threads=settings.cpu_threads, compute_type=COMPUTE_TYPE, log_name="concurrency",
                         extra_args={"batch_size": str(BATCH_SIZE)})
    try:
        server.start()
    except ServiceUnavailable as exc:
        return {"skipped": f"bento service did not start: {exc}"}

    def run_bento(requests: list[models.Audio], clients: int, detect: bool = False, **extra: Any) -> dict[str, Any]:
        import httpx

        texts: list[str] = [""] * len(requests)
        latencies: list[float] = []
        shared: list[int] = []
        barrier = threading.Barrier(clients)

        def client_loop(index: int) -> None:
            with httpx.Client(timeout=1800) as client:
                barrier.wait()
                for i in range(index, len(requests), clients):
                    started = time.perf_counter()
                    body = transcribe_http(client, server.url, requests[i].data, {**options(requests[i], detect), **extra})
                    latencies.append(time.perf_counter() - started)
                    shared.append(int(body.get("batch_size", 1)))
                    texts[i] = body["text"]

        wall = threads_wall(client_loop, clients)
        return {"texts": texts, "wall": wall, "latency": summary(latencies), "max_requests_per_pass": max(shared)}

    def timed(fn, *args, **kwargs) -> tuple[float, Any]:
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        return time.perf_counter() - started, out

    results: dict[str, Any] = {"model": MODEL, "registered_model": f"{logged.name}/{logged.version}", "compute_type": COMPUTE_TYPE,
                               "cpu_threads": settings.cpu_threads, "batch_size": BATCH_SIZE, "beam_size": BEAM_SIZE}
    try:
        log("concurrency: warm-up")
        run_raw(english[:1])
        run_bento(english[:2], 2)
        results["server_config"] = {k: server.info().get("config", {}).get(k) for k in ("batch_size", "max_requests", "max_latency_ms")}

        log("concurrency: lone requests (1 client) vs raw")
        lone = english * (3 if settings.mode == "full" else 1)
        raw_lone, bento_lone = [], []
        for a in lone:  # interleaved, request by request
            raw_lone.append(timed(run_raw, [a])[0])
            bento_lone.append(run_bento([a], 1)["wall"])
        results["lone"] = {"raw_s": summary(raw_lone), "bento_s": summary(bento_lone),
                           "ratio": ratio(float(np.median(bento_lone)), float(np.median(raw_lone)))}

        reps = 3 if settings.mode == "full" else 1
        workloads: dict[str, Any] = {}
        for name, requests, detect, clients_list in (
            ("short_en", short, False, (8, 32) if settings.mode == "full" else (8,)),
            ("languages_forced", every, False, (8,)),
            ("languages_detected", every, True, (8,)),
        ):
            runners = {"raw": lambda: run_raw(requests, detect)}
            if name == "short_en":
                runners["limit"] = lambda: run_limit(requests)
            for clients in clients_list:
                runners[f"bento_c{clients}"] = lambda clients=clients: run_bento(requests, clients, detect)
            walls: dict[str, list[float]] = {k: [] for k in runners}
            outs: dict[str, Any] = {}
            for rep in range(reps):  # interleaved, the order reversed every other repetition
                for key in list(runners)[:: 1 if rep % 2 == 0 else -1]:
                    log("concurrency: %s: %s, %d requests (rep %d/%d)", name, key, len(requests), rep + 1, reps)
                    wall, outs[key] = timed(runners[key])
                    walls[key].append(wall)
            raw_s = float(np.median(walls["raw"]))
            raw_texts = outs["raw"]
            body: dict[str, Any] = {"requests": len(requests), "audio_s": round(sum(len(pcm(a)) for a in requests) / 16000, 1),
                                    "reps": reps, "raw_s": round(raw_s, 2), "raw_walls": walls["raw"], "wer_raw": _wer(requests, raw_texts)}
            if "limit" in runners:
                limit_s = float(np.median(walls["limit"]))
                body.update(limit_s=round(limit_s, 2), limit_speedup=ratio(raw_s, limit_s), wer_limit=_wer(requests, outs["limit"]))
            for clients in clients_list:
                key = f"bento_c{clients}"
                out, wall = outs[key], float(np.median(walls[key]))
                body[key] = {
                    "wall_s": round(wall, 2), "walls": walls[key], "speedup": ratio(raw_s, wall),
                    "of_limit": ratio(body["limit_s"], wall) if "limit_s" in body else None,
                    "latency_s": out["latency"], "max_requests_per_pass": out["max_requests_per_pass"],
                    "same_text_rate": round(sum(a == b for a, b in zip(out["texts"], raw_texts)) / len(requests), 3),
                    "wer": _wer(requests, out["texts"]),
                }
            workloads[name] = body
        results["workloads"] = workloads

        log("concurrency: the long file (%.0f s): raw, bento sequential, raw batched, bento batched", long_file.seconds)
        raw_long, raw_long_text = timed(run_raw, [long_file])
        raw_batched, raw_batched_text = timed(lambda: [_text(BatchedInferencePipeline(raw).transcribe(
            pcm(long_file), batch_size=BATCH_SIZE, vad_filter=True, **options(long_file))[0])])
        bento_long = run_bento([long_file], 1)
        bento_batched = run_bento([long_file], 1, long_form="batched")
        results["long"] = {
            "audio_s": round(long_file.seconds, 1),
            "raw_sequential_s": round(raw_long, 2), "wer_raw_sequential": _wer([long_file], raw_long_text),
            "bento_sequential_s": round(bento_long["wall"], 2), "wer_bento_sequential": _wer([long_file], bento_long["texts"]),
            "raw_batched_s": round(raw_batched, 2), "wer_raw_batched": _wer([long_file], raw_batched_text),
            "bento_batched_s": round(bento_batched["wall"], 2), "wer_bento_batched": _wer([long_file], bento_batched["texts"]),
            "bento_batched_speedup": ratio(raw_long, bento_batched["wall"]),
        }

        log("concurrency: a short request alone and while the long file decodes")
        probe = english[1]
        alone = [run_bento([probe], 1)["wall"] for _ in range(3)]
        beside: list[float] = []
        holder = threading.Thread(target=run_bento, args=([long_file], 1))
        holder.start()
        time.sleep(2.0)
        while holder.is_alive() and len(beside) < 3:
            beside.append(run_bento([probe], 1)["wall"])
        holder.join()
        results["beside_long"] = {"alone_s": summary(alone), "beside_long_s": summary(beside),
                                  "ratio": ratio(float(np.median(beside)), float(np.median(alone)))}
        results["server_rss_bytes"] = server.rss()["total_bytes"]
    finally:
        server.stop()
    log("concurrency: encode/generate cost at batch 1 vs %d (raw CTranslate2 calls)", BATCH_SIZE)
    results["costs"] = breakdown(raw, [pcm(a) for a in english], BATCH_SIZE, 3 if settings.mode == "full" else 1)
    return results


def _text(segments) -> str:
    return "".join(s.text for s in segments).strip()


def _wer(requests: list[models.Audio], texts: list[str]) -> dict[str, Any]:
    from whisper_registry.metrics import score

    scored = score([a.reference for a in requests], texts, [a.language for a in requests])
    return {k: scored.get(k) for k in ("wer", "cer")}
