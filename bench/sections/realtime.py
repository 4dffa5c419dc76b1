"""Live streams: how many concurrent real-time streams one service sustains, with its engine
sharing forward passes across streams, against the same streams decoded one pass per window
(``batch_size=1``: no stream shares a pass, as a server that decodes each stream on its own).

A level of N streams is sustained when, over all its turns, the final text comes at most
``FINAL_P95_S`` after the turn's speech ends (p95) and the first delta at most
``FIRST_DELTA_P95_S`` after it starts (p95), with every turn completed. Levels rise until one is
not sustained. The live text's word error is measured against the file transcription of the same
speech by the same service (normalized words).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jiwer
import numpy as np

from bench import models
from bench.common import log, ratio
from bench.realtime import latencies, one_turn, run_streams
from bench.server import BentoServer, ServiceUnavailable, service_code_present
from devkit import audio, real

MODELS = ("tiny_en", "base")
COMPUTE_TYPE = "int8"
FINAL_P95_S = 1.5
FIRST_DELTA_P95_S = 2.0
LEVELS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32)
MODES = {"shared": {}, "alone": {"batch_size": "1"}}
REALTIME = {"max_sessions": max(LEVELS), "partial_interval_s": 0.5}


def run(settings) -> dict[str, Any]:
    skip = service_code_present()
    if skip:
        return {"skipped": skip}
    quick = settings.mode == "quick"
    clips = {c.name: audio.read_wav(c.path)[0] for c in real.speech_clips(["en"])}
    speech = one_turn(clips)
    turns = 1 if quick else 2
    results: dict[str, Any] = {
        "final_p95_bound_s": FINAL_P95_S,
        "first_delta_p95_bound_s": FIRST_DELTA_P95_S,
        "turn_speech_s": round(len(speech) / 16000, 2),
        "turns_per_stream": turns,
        "cpu_threads": settings.cpu_threads,
        "models": {},
    }
    for model in MODELS[:1] if quick else MODELS:
        logged = models.ensure_logged(model, COMPUTE_TYPE)
        results["models"][model] = per_model = {}
        for mode, extra in MODES.items():
            server = BentoServer(
                logged.uri,
                cpu_threads=settings.cpu_threads,
                log_name=f"realtime-{model}-{mode}",
                extra_args={**extra, "realtime": json.dumps(REALTIME)},
            )
            try:
                server.start()
            except ServiceUnavailable as exc:
                log("realtime: skipped: %s", str(exc).splitlines()[0])
                return {**results, "skipped": f"bento service did not start: {exc}"}
            try:
                per_model[mode] = _ramp(server.url, speech, turns, LEVELS[:2] if quick else LEVELS)
                per_model[mode]["wer_vs_file"] = _wer(server.url, speech, per_model[mode].pop("texts"))
            finally:
                server.stop()
        per_model["streams_shared_over_alone"] = ratio(per_model["shared"]["max_streams"], per_model["alone"]["max_streams"])
    return results


def _ramp(url: str, speech: np.ndarray, turns: int, levels: tuple[int, ...]) -> dict[str, Any]:
    run_streams(url, speech, 1, 1)  # warm-up: the first pass of a fresh engine is slower
    found: dict[str, Any] = {"levels": {}, "max_streams": 0, "texts": []}
    for count in levels:
        results = run_streams(url, speech, count, turns)
        figures = latencies(results)
        found["levels"][count] = figures
        found["texts"] += [t.transcript for r in results for t in r.turns if t.transcript]
        sustained = (
            figures["completed"] == figures["turns"]
            and not figures["errors"]
            and figures["final_p95_s"] is not None
            and figures["final_p95_s"] <= FINAL_P95_S
            and figures["first_delta_p95_s"] is not None
            and figures["first_delta_p95_s"] <= FIRST_DELTA_P95_S
        )
        log(
            "realtime: %d stream(s): final p95 %s s, first delta p95 %s s, %s",
            count,
            figures["final_p95_s"],
            figures["first_delta_p95_s"],
            "sustained" if sustained else "not sustained",
        )
        if not sustained:
            break
        found["max_streams"] = count
    return found


def _wer(url: str, speech: np.ndarray, texts: list[str]) -> dict[str, Any]:
    """Each live turn's text against the file transcription of its speech (one turn may come in
    two pieces where server VAD cut it: their texts are joined)."""
    from whisper_registry.normalize import normalizer_for

    upload = {"file": ("turn.wav", audio.pcm16_wav_bytes(speech), "audio/wav")}
    response = httpx.post(f"{url}/transcribe", files=upload, data={"language": "en"}, timeout=300)
    response.raise_for_status()
    normalize = normalizer_for("en")
    reference = normalize(response.json()["text"])
    errors = [jiwer.wer(reference, normalize(t)) for t in texts if t]
    return {
        "file_text": response.json()["text"],
        "turns": len(errors),
        "mean": round(float(np.mean(errors)), 4) if errors else None,
        "max": round(max(errors), 4) if errors else None,
    }
