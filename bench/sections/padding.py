"""Less encoder work on short windows: unpadded (``pad_to_30s=false``) and packed, vs padded to 30 s.

faster-whisper pads every window's features to 3000 frames, so the encoder of a 3 s clip runs on
27 s of padding; on CPU the encoder is most of a short clip's time (section 2's cost table). Two
ways to do less of it (issue 11's "CPU beyond batching"):

- ``unpadded``: with ``pad_to_30s=false`` the flavor cuts the padding (keeping 2 s after the content);
- ``packed``: several short clips of one language laid end to end, with ``PACK_GAP_S`` of silence
  between them, in one window of at most 30 s, transcribed once with word timestamps; each word goes
  back to the clip its midpoint falls in (or the nearest), so each clip gets its own text.

Each of the 27 real clips in 9 languages is decoded through the flavor's transcription path (base
int8, beam 5, language forced) padded and unpadded, interleaved clip by clip, then each language's
clips packed, ``reps`` times; per language: time and CER/WER against the references, and the
share of clips with the same text as padded.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench import models
from bench.common import BEAM_SIZE, log, ratio

MODEL = "base"
COMPUTE_TYPE = "int8"
PACK_GAP_S = 1.0
WINDOW_S = 30.0


def run(settings) -> dict[str, Any]:
    from faster_whisper import WhisperModel

    from mlflow_faster_whisper import transcription
    from mlflow_faster_whisper.decoding import DecodingOptions
    from devkit.audio import read_wav
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
    texts: dict[str, dict[str, str]] = {w: {} for w in (*ways, "packed")}
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
    groups = [g for language in languages for g in _groups([a for a in clips if a.language == language], samples)]
    packed_seconds: list[list[float]] = [[] for _ in groups]
    for rep in range(reps):
        log("padding: rep %d/%d, %d clips packed in %d windows", rep + 1, reps, len(clips), len(groups))
        for index, group in enumerate(groups):
            audio, spans = _pack([samples[a.name] for a in group])
            options = DecodingOptions.parse({"beam_size": BEAM_SIZE, "language": group[0].language, "word_timestamps": True})
            started = time.perf_counter()
            packed = transcription.transcribe(model, audio, options)
            packed_seconds[index].append(time.perf_counter() - started)
            texts["packed"].update(zip((a.name for a in group), _split(packed, spans)))
    rows = {}
    for language in languages + ["all"]:
        chosen = [a for a in clips if language in ("all", a.language)]
        refs, langs = [a.reference for a in chosen], [a.language for a in chosen]
        row: dict[str, Any] = {"clips": len(chosen)}
        for way in ways:
            row[f"{way}_s"] = round(sum(float(np.median(seconds[way][a.name])) for a in chosen), 2)
        row["packed_s"] = round(sum(float(np.median(packed_seconds[i])) for i, g in enumerate(groups)
                                    if language in ("all", g[0].language)), 2)
        for way in (*ways, "packed"):
            scored = score(refs, [texts[way][a.name] for a in chosen], langs)
            row[f"{way}_wer"], row[f"{way}_cer"] = scored.get("wer"), scored.get("cer")
        row["speedup"] = ratio(row["padded_s"], row["unpadded_s"])
        row["packed_speedup"] = ratio(row["padded_s"], row["packed_s"])
        row["same_text"] = round(sum(texts["padded"][a.name] == texts["unpadded"][a.name] for a in chosen) / len(chosen), 3)
        row["packed_same_text"] = round(sum(texts["padded"][a.name] == texts["packed"][a.name] for a in chosen) / len(chosen), 3)
        rows[language] = row
    return {"model": MODEL, "compute_type": COMPUTE_TYPE, "cpu_threads": settings.cpu_threads, "beam_size": BEAM_SIZE,
            "reps": reps, "audio_s": round(sum(len(s) for s in samples.values()) / 16000, 1), "pack_gap_s": PACK_GAP_S,
            "packed_windows": len(groups), "languages": rows}


def _groups(clips: list, samples: dict[str, np.ndarray]) -> list[list]:
    """Consecutive clips of one language, as many as fit one window with the gaps between them."""
    groups: list[list] = []
    length = WINDOW_S + 1
    for clip in clips:
        seconds = len(samples[clip.name]) / 16000 + PACK_GAP_S
        if length + seconds > WINDOW_S:
            groups.append([])
            length = 0.0
        groups[-1].append(clip)
        length += seconds
    return groups


def _pack(parts: list[np.ndarray]) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """The clips end to end with PACK_GAP_S of silence after each, and each clip's (start, end) in seconds."""
    gap = np.zeros(int(PACK_GAP_S * 16000), np.float32)
    spans, start = [], 0.0
    for part in parts:
        spans.append((start, start + len(part) / 16000))
        start = spans[-1][1] + PACK_GAP_S
    return np.concatenate([x for part in parts for x in (part, gap)]), spans


def _split(packed, spans: list[tuple[float, float]]) -> list[str]:
    """Each clip's text: the packed transcription's words whose midpoint falls in its span (or nearest it)."""
    texts = [""] * len(spans)
    for segment in packed.segments:
        for word in segment.words or []:
            middle = (word.start + word.end) / 2
            owner = min(range(len(spans)), key=lambda i: max(spans[i][0] - middle, middle - spans[i][1], 0.0))
            texts[owner] += word.word
    return [t.strip() for t in texts]
