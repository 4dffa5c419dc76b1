"""Per quantization: artifact size, size / float32 checkpoint, RTF, WER/CER on real speech.

Each quantization is logged with our flavor from the float32 transformers checkpoint and loaded
back with ``mlflow_faster_whisper.load_model`` (checksums verified) with compute_type equal to the
quantization. Error rates: every real clip (base: 9 languages, tiny.en: English), language forced,
scored by ``whisper_registry.metrics.score``; plus the long English file. RTF = decoding seconds
/ audio seconds on the long file (the short clips are each padded to a 30 s window, so their RTF
says more about padding than about speed; it is reported too).
"""

from __future__ import annotations

import time
from typing import Any

from bench import models
from bench.common import decoding_for, log, ratio, summary

CPU_QUANTIZATIONS = ("float32", "int8", "int8_float32")
GPU_QUANTIZATIONS = ("float16", "int8_float16")
TARGET_INT8_SIZE_RATIO = 0.27
TARGET_ERROR_DELTA_POINTS = 0.3


def run(settings) -> dict[str, Any]:
    import ctranslate2

    gpu = ctranslate2.get_cuda_device_count() > 0
    results: dict[str, Any] = {
        "cpu_threads": settings.cpu_threads,
        "decoding": "beam_size 5, language forced per clip",
        "targets": {"int8_size_ratio_max": TARGET_INT8_SIZE_RATIO, "error_delta_points_max": TARGET_ERROR_DELTA_POINTS},
        "models": {},
    }
    long_audio = models.long_audio(settings.long_seconds)
    for model in models.MODELS:
        checkpoint_bytes, weights_bytes = models.checkpoint_bytes(model), models.checkpoint_weights_bytes(model)
        clips = models.clips(["en"] if model == "tiny_en" else None)
        if settings.mode == "quick":  # one clip per language (the last: a sentence, not counting)
            clips = [c for i, c in enumerate(clips) if i == len(clips) - 1 or clips[i + 1].language != c.language]
        rows: dict[str, Any] = {}
        for quantization in CPU_QUANTIZATIONS + GPU_QUANTIZATIONS:
            logged = models.ensure_logged(model, quantization)
            row: dict[str, Any] = {
                "registered_model": f"{logged.name}/{logged.version}",
                "size_bytes": logged.size_bytes,
                "model_bin_bytes": (logged.data_dir / "model.bin").stat().st_size,
                "size_ratio_to_fp32_checkpoint": ratio(logged.size_bytes, checkpoint_bytes),
                "model_bin_ratio_to_fp32_weights": ratio((logged.data_dir / "model.bin").stat().st_size, weights_bytes),
                **stored_bytes_by_dtype(logged.data_dir / "model.bin"),
            }
            if quantization in GPU_QUANTIZATIONS and not gpu:
                row["decoding_skipped"] = "needs a GPU (CPU would run it as float32/int8_float32)"
            else:
                row.update(_evaluate(settings, logged, quantization, "cuda" if gpu and quantization in GPU_QUANTIZATIONS else "cpu", clips, long_audio))
            rows[quantization] = row
        _deltas(rows)
        results["models"][model] = {"checkpoint_bytes": checkpoint_bytes, "checkpoint_weights_bytes": weights_bytes, "n_clips": len(clips),
                                    "long_audio_seconds": round(long_audio.seconds, 1), "quantizations": rows}
    return results


def _evaluate(settings, logged, quantization, device, clips, long_audio) -> dict[str, Any]:
    import mlflow_faster_whisper as mfw
    from whisper_registry.metrics import score

    started = time.perf_counter()
    model = mfw.load_model(logged.uri, device=device, compute_type=quantization, cpu_threads=settings.cpu_threads)
    load_s = time.perf_counter() - started

    def transcribe(audio: models.Audio) -> tuple[str, float]:
        begun = time.perf_counter()
        segments, _ = model.transcribe(str(audio.path), **decoding_for(audio.language))
        text = "".join(s.text for s in segments).strip()
        return text, time.perf_counter() - begun

    log("quantization: %s on %d clips x %d pass(es) + the long file", logged.name, len(clips), settings.quant_passes)
    transcribe(clips[0])  # warm-up
    hyps, clip_times = {}, {a.name: [] for a in clips}
    for _ in range(settings.quant_passes):
        for audio in clips:
            hyps[audio.name], seconds = transcribe(audio)
            clip_times[audio.name].append(seconds)
    clip_latency = {name: summary(times)["median"] for name, times in clip_times.items()}
    scores = score([a.reference for a in clips], [hyps[a.name] for a in clips], [a.language for a in clips])
    long_text, long_s = transcribe(long_audio)
    long_score = score([long_audio.reference], [long_text], "en")
    return {
        "device": device,
        "load_s": load_s,
        "wer": scores.get("wer"),
        "cer": scores.get("cer"),
        "per_language": {k: v for k, v in scores.items() if k.startswith(("wer_", "cer_"))},
        "long_wer": long_score.get("wer"),
        "rtf_long": long_s / long_audio.seconds,
        "long_seconds": long_s,
        "rtf_clips": sum(clip_latency.values()) / sum(a.seconds for a in clips),
        "clip_latency_median_s": summary(list(clip_latency.values()))["median"],
        "hypotheses": hyps,
    }


def _deltas(rows: dict[str, Any]) -> None:
    """Error-rate differences to float32, in points (percentage points)."""
    base = rows.get("float32", {})
    for row in rows.values():
        for metric in ("wer", "cer", "long_wer"):
            if row.get(metric) is not None and base.get(metric) is not None:
                row[f"{metric}_delta_points"] = (row[metric] - base[metric]) * 100


def stored_bytes_by_dtype(model_bin) -> dict[str, Any]:
    """Bytes of model.bin per stored dtype, and the largest tensors kept in float: what stops a
    quantized artifact from being exactly 1/4 (int8) or 1/2 (float16) of the float32 one."""
    from devkit.ct2_format import read_model_bin

    model = read_model_bin(model_bin)
    by_dtype: dict[str, int] = {}
    floats = []
    for name, array in model.variables.items():
        by_dtype[str(array.dtype)] = by_dtype.get(str(array.dtype), 0) + array.nbytes
        if array.dtype.kind == "f" and array.nbytes > 1 << 20:
            floats.append((array.nbytes, name))
    floats.sort(reverse=True)
    return {"bytes_by_dtype": by_dtype, "largest_float_tensors": [[n, b] for b, n in floats[:5]]}
