"""Single stream: raw faster-whisper vs our pyfunc predict vs our bento over HTTP.

Every path gets the same WAV bytes (so each decodes the audio itself), the same registered
artifact, compute_type int8, the same cpu_threads and the same decoding options. The three paths
are timed in turn, their order rotated every repetition, after one warm-up call each.
"""

from __future__ import annotations

import io
import re
import time
from typing import Any

from bench import models
from bench.common import decoding_for, interleaved, log, ratio, summary
from bench.server import BentoServer, ServiceUnavailable, service_code_present, transcribe_http

COMPUTE_TYPE = "int8"
TARGET = 1.03  # ours / raw


def run(settings) -> dict[str, Any]:
    results = {"compute_type": COMPUTE_TYPE, "cpu_threads": settings.cpu_threads, "target_ratio_max": TARGET,
               "decoding": "beam_size 5, language forced, other options faster-whisper defaults", "models": {}}
    workloads = [models.clip("quick_brown_fox"), models.long_audio(settings.long_seconds)]
    for model in models.MODELS:
        logged = models.ensure_logged(model, COMPUTE_TYPE)
        results["models"][model] = _run_model(settings, logged, workloads)
    return results


def _run_model(settings, logged: models.LoggedModel, workloads: list[models.Audio]) -> dict[str, Any]:
    import httpx
    import mlflow.pyfunc
    import pandas as pd
    from faster_whisper import WhisperModel

    raw = WhisperModel(str(logged.data_dir), device="cpu", compute_type=COMPUTE_TYPE,
                       cpu_threads=settings.cpu_threads, local_files_only=True)
    pyfunc = mlflow.pyfunc.load_model(
        logged.uri, model_config={"device": "cpu", "compute_type": COMPUTE_TYPE, "cpu_threads": settings.cpu_threads}
    )
    skip = service_code_present()
    server = None
    if skip is None:
        server = BentoServer(logged.uri, cpu_threads=settings.cpu_threads, compute_type=COMPUTE_TYPE,
                             log_name=f"single-{logged.name}")
        try:
            server.start()
        except ServiceUnavailable as exc:
            skip, server = f"bento service did not start: {exc}", None
            log("single: %s", skip.splitlines()[0])
    out: dict[str, Any] = {
        "registered_model": f"{logged.name}/{logged.version}",
        "http_skipped": skip,
        # MLflow passes load-time model_config to _load_pyfunc only when the model was logged with
        # one; otherwise cpu_threads comes from OMP_NUM_THREADS (set by the harness).
        "pyfunc_model_config_honoured": bool(getattr(pyfunc, "model_config", None)),
        "workloads": {},
    }
    try:
        with httpx.Client(timeout=600) as client:
            for audio in workloads:
                data, options = audio.data, decoding_for(audio.language)
                texts: dict[str, str] = {}

                def run_raw():
                    segments, _ = raw.transcribe(io.BytesIO(data), **options)
                    texts["raw"] = "".join(s.text for s in segments).strip()

                def run_pyfunc():
                    rows = pyfunc.predict(pd.DataFrame({"audio": [data]}), params=options)
                    texts["pyfunc"] = rows[0]["text"]

                def run_http():
                    texts["http"] = transcribe_http(client, server.url, data, options)["text"]

                runners = {"raw": run_raw, "pyfunc": run_pyfunc}
                if audio is workloads[0]:
                    # faster-whisper's own decode_audio runs gc.collect() on every call, which costs
                    # more in a bigger process: this baseline takes decoded samples, so the ratio to
                    # it bounds our overhead without that effect.
                    samples = decode_samples(data)

                    def run_raw_samples():
                        segments, _ = raw.transcribe(samples, **options)
                        texts["raw_samples"] = "".join(s.text for s in segments).strip()

                    runners["raw_samples"] = run_raw_samples
                if server is not None:
                    runners["http"] = run_http
                reps = settings.reps_short if audio.seconds < 30 else settings.reps_long
                log("single: %s on %s (%.0f s audio), %d reps x %s", logged.name, audio.name, audio.seconds, reps,
                    "/".join(runners))
                log_start = len(server.log_tail(10**7)) if server is not None else 0
                times = interleaved(reps, runners, warmup=1 if audio is workloads[0] else 0)
                out["workloads"][audio.name] = _figures(audio, times, texts)
                if server is not None:
                    split = server_split(server.log_tail(10**7)[log_start:])
                    out.setdefault("http_server_split_ms", {})[audio.name] = split
            out["pyfunc_overhead_ms"] = _pyfunc_overhead(pyfunc, workloads[0], settings.reps_short)
    finally:
        if server is not None:
            server.stop()
    return out


_ACCESS = re.compile(r"path=/transcribe,.*\) (?P<ms>[\d.]+)ms \(trace=")
_DECODED = re.compile(r"Decoded a request in (?P<s>[\d.]+)s")


def server_split(log_text: str) -> dict[str, Any]:
    """From the server log of one sequential client: per /transcribe (BentoML's access log), the
    time outside its decode (the "Decoded a request" line just before it): multipart parsing,
    audio decoding. Lines are paired in order: BentoML reuses one trace id across requests."""
    outside, decoded = [], None
    for line in log_text.splitlines():
        if match := _DECODED.search(line):
            decoded = float(match["s"]) * 1000
        elif (match := _ACCESS.search(line)) and decoded is not None:
            outside.append(float(match["ms"]) - decoded)
            decoded = None
    if not outside:
        return {"skipped": "no /transcribe access line after a 'Decoded a request' line in the server log"}
    return {"transcribe_minus_decode": summary(outside)}


class _TimedTranscribe:
    """Wraps ``WhisperModel.transcribe`` (the class's, so the engine's per-request views of the
    model are timed too) and sums the time spent in it and in iterating its segments."""

    def __init__(self) -> None:
        from faster_whisper import WhisperModel

        self.original, self.inner_s = WhisperModel.transcribe, 0.0

    def __enter__(self) -> "_TimedTranscribe":
        from faster_whisper import WhisperModel

        timer = self

        def transcribe(model, *args, **kwargs):
            started = time.perf_counter()
            segments, info = timer.original(model, *args, **kwargs)
            timer.inner_s += time.perf_counter() - started
            return timer._timed(segments), info

        WhisperModel.transcribe = transcribe
        return self

    def __exit__(self, *exc: Any) -> None:
        from faster_whisper import WhisperModel

        WhisperModel.transcribe = self.original

    def _timed(self, segments):
        iterator = iter(segments)
        while True:
            started = time.perf_counter()
            try:
                segment = next(iterator)
            except StopIteration:
                self.inner_s += time.perf_counter() - started
                return
            self.inner_s += time.perf_counter() - started
            yield segment


def _pyfunc_overhead(pyfunc, audio: models.Audio, reps: int) -> dict[str, Any]:
    """Milliseconds of pyfunc.predict spent outside faster-whisper's transcribe (schema checks,
    DataFrame, audio decoding, pydantic), measured call by call: steadier than a ratio of totals."""
    import pandas as pd

    from faster_whisper.audio import decode_audio

    outside = []
    with _TimedTranscribe() as timed:
        for _ in range(max(reps, 3)):
            timed.inner_s = 0.0
            started = time.perf_counter()
            pyfunc.predict(pd.DataFrame({"audio": [audio.data]}), params=decoding_for(audio.language))
            outside.append(time.perf_counter() - started - timed.inner_s)
    ours, theirs = [], []
    for _ in range(max(reps, 3)):
        started = time.perf_counter()
        decode_samples(audio.data)
        ours.append(time.perf_counter() - started)
        started = time.perf_counter()
        decode_audio(io.BytesIO(audio.data), sampling_rate=16000)
        theirs.append(time.perf_counter() - started)
    # Raw faster-whisper decodes the audio inside transcribe(); the pyfunc does it before, with
    # the plugin's decoder.
    return {"audio": audio.name, "outside_faster_whisper": summary([x * 1000 for x in outside]),
            "audio_decode": summary([x * 1000 for x in ours]),
            "faster_whisper_audio_decode": summary([x * 1000 for x in theirs])}


def decode_samples(data: bytes):
    from mlflow_faster_whisper.audio import decode_audio

    return decode_audio(data)


def _figures(audio: models.Audio, times: dict[str, list[float]], texts: dict[str, str]) -> dict[str, Any]:
    stats = {name: summary(values) for name, values in times.items()}
    raw = stats["raw"]["median"]
    figures: dict[str, Any] = {"audio_seconds": round(audio.seconds, 2), "seconds": stats, "ratios": {},
                               "per_rep_ratio_median": {}, "overhead_ms": {}, "same_text_as_raw": {}}
    for name in stats:
        if name.startswith("raw"):
            continue
        figures["ratios"][name] = ratio(stats[name]["median"], raw)
        per_rep = sorted(o / r for o, r in zip(times[name], times["raw"]))
        figures["per_rep_ratio_median"][name] = per_rep[len(per_rep) // 2]
        figures["overhead_ms"][name] = (stats[name]["median"] - raw) * 1000
        figures["same_text_as_raw"][name] = texts.get(name) == texts.get("raw")
        if "raw_samples" in stats:
            figures.setdefault("ratios_to_raw_samples", {})[name] = ratio(stats[name]["median"], stats["raw_samples"]["median"])
    figures["rtf_raw"] = raw / audio.seconds
    return figures
