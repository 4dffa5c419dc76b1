"""Padding: short windows encoded at their own length (``pad_to_30s=false``) vs padded to 30 s.

faster-whisper pads every window's features to 3000 frames, so the encoder of a 3 s clip runs on
27 s of padding; on CPU the encoder is most of a short clip's time (section 2's cost table). With
``pad_to_30s=false`` the flavor cuts the padding (keeping 2 s after the content). Each of the 27
real clips in 9 languages is decoded both ways through the flavor's transcription path (base
int8, beam 5, language forced), interleaved clip by clip, ``reps`` times; per language: time and
CER/WER against the references, and the share of clips with the same text either way.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench import models
from bench.common import BEAM_SIZE, log, ratio

MODEL = "base"
COMPUTE_TYPE = "int8"


def run(settings) -> dict[str, Any]:
    from faster_whisper import WhisperModel

    from mlflow_faster_whisper import transcription
    from mlflow_faster_whisper.decoding import DecodingOptions
    from tests.fixtures.audio import read_wav
    from whisper_registry.metrics import score

    logged = models.ensure_logged(MODEL, COMPUTE_TYPE)
    model = WhisperModel(str(logged.data_dir), device="cpu", compute_type=COMPUTE_TYPE,
                         cpu_threads=settings.cpu_threads, local_files_only=True)
    clips = models.clips()
    if settings.mode != "full":
        clips = list({a.language: a for a in clips}.values())
    samples = {a.name: read_wav(a.path)[0].astype(np.float32) for a in clips}
    reps = 2 if settings.mode == "full" else 1
    ways = {"padded": True, "unpadded": False}
    seconds: dict[str, dict[str, list[float]]] = {w: {a.name: [] for a in clips} for w in ways}
    texts: dict[str, dict[str, str]] = {w: {} for w in ways}
    transcription.transcribe(model, samples[clips[0].name], DecodingOptions())  # warm-up
    for rep in range(reps):
        log("padding: rep %d/%d over %d clips", rep + 1, reps, len(clips))
        for index, audio in enumerate(clips):
            order = list(ways) if (rep + index) % 2 == 0 else list(ways)[::-1]
            for way in order:
                options = DecodingOptions.parse({"beam_size": BEAM_SIZE, "language": audio.language, "pad_to_30s": ways[way]})
                started = time.perf_counter()
                texts[way][audio.name] = transcription.transcribe(model, samples[audio.name], options).text
                seconds[way][audio.name].append(time.perf_counter() - started)
    languages = sorted({a.language for a in clips})
    rows = {}
    for language in languages + ["all"]:
        chosen = [a for a in clips if language in ("all", a.language)]
        refs, langs = [a.reference for a in chosen], [a.language for a in chosen]
        row: dict[str, Any] = {"clips": len(chosen)}
        for way in ways:
            row[f"{way}_s"] = round(sum(float(np.median(seconds[way][a.name])) for a in chosen), 2)
            scored = score(refs, [texts[way][a.name] for a in chosen], langs)
            row[f"{way}_wer"], row[f"{way}_cer"] = scored.get("wer"), scored.get("cer")
        row["speedup"] = ratio(row["padded_s"], row["unpadded_s"])
        row["same_text"] = round(sum(texts["padded"][a.name] == texts["unpadded"][a.name] for a in chosen) / len(chosen), 3)
        rows[language] = row
    return {"model": MODEL, "compute_type": COMPUTE_TYPE, "cpu_threads": settings.cpu_threads, "beam_size": BEAM_SIZE,
            "reps": reps, "audio_s": round(sum(len(s) for s in samples.values()) / 16000, 1), "languages": rows}
