"""Scaling: conversion peak RSS, time and artifact size as the checkpoint grows, against
CTranslate2's own converter in the same run; then load and first transcription per size.

Checkpoints shaped like whisper-tiny, -base, -small and -medium (80 mels, the real multilingual
tokenizer and generation settings) with random weights, built once into ``.bench/fixtures``:
memory and time depend on the shapes, not on the values. Each conversion is one fresh process
(``bench.convert_child``): ``save`` runs ``mlflow_faster_whisper.save_model`` (conversion,
processor files, checksums; no registry) and ``raw`` CTranslate2's ``TransformersConverter`` as
its command line runs it. Peak RSS is the child's VmHWM; the floor is the ``imports`` child's (the
imports a conversion needs before it reads a weight). Then ``load`` times ``load_model`` and one
transcription of a real clip, capped at 32 tokens since random weights decode noise.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from bench import models
from bench.common import WORK, dir_size, log, ratio, summary

# Whisper's published shapes (d_model, layers, heads; FFN 4 x d_model).
SHAPES = {
    name: {"d_model": d, "encoder_layers": layers, "decoder_layers": layers, "encoder_attention_heads": heads,
           "decoder_attention_heads": heads, "encoder_ffn_dim": 4 * d, "decoder_ffn_dim": 4 * d, "vocab_size": 51865,
           "num_mel_bins": 80, "max_source_positions": 1500, "max_target_positions": 448}
    for name, d, layers, heads in (("tiny", 384, 4, 6), ("base", 512, 6, 8), ("small", 768, 12, 12), ("medium", 1024, 24, 16))
}
QUANTIZATIONS = ("float32", "int8", "float16")
TARGET_PEAK_OVER_WEIGHTS = 1.5  # (peak RSS - import floor) / checkpoint weights
CLIP = "hello_world"


def checkpoint(shape: str):
    target = WORK / "fixtures" / f"random-whisper-{shape}"
    if not (target / "model.safetensors").is_file():
        log("scaling: writing a random %s-shaped checkpoint", shape)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        models.run_child(["random", shape, str(tmp)], f"scaling-random-{shape}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def run(settings) -> dict[str, Any]:
    floor, _ = models.run_child(["imports"], "scaling-imports")
    results: dict[str, Any] = {"imports_floor_bytes": floor["vmhwm_bytes"],
                               "target_peak_over_weights_max": TARGET_PEAK_OVER_WEIGHTS, "shapes": {}}
    clip = models.clip(CLIP).path
    for shape in settings.scaling_shapes:
        path = checkpoint(shape)
        weights = dir_size(path, "*.safetensors")
        reps = settings.scaling_reps if weights < 1 << 30 else 1
        rows: dict[str, Any] = {}
        for quantization in QUANTIZATIONS:
            runs: dict[str, list] = {"ours": [], "ctranslate2": []}
            out = WORK / "scaling-out"
            for rep in range(reps):
                for who, mode in (("ours", "save"), ("ctranslate2", "raw")):
                    log("scaling: %s %s rep %d/%d (%s)", shape, quantization, rep + 1, reps, who)
                    shutil.rmtree(out, ignore_errors=True)
                    child, parent = models.run_child([mode, str(path), quantization, str(out)],
                                                     f"scaling-{shape}-{quantization}-{who}-{rep}")
                    runs[who].append({**child, **parent})
            loads = []
            if quantization == "int8":  # the CPU serving choice: load it and transcribe once
                shutil.rmtree(out, ignore_errors=True)
                models.run_child(["save", str(path), quantization, str(out)], f"scaling-{shape}-save-for-load")
                for rep in range(reps):
                    child, _ = models.run_child(["load", str(out), str(clip)], f"scaling-{shape}-load-{rep}")
                    loads.append(child)
            shutil.rmtree(out, ignore_errors=True)
            rows[quantization] = {who: figures(r, weights, floor["vmhwm_bytes"]) for who, r in runs.items()}
            rows[quantization]["peak_ours_over_ctranslate2"] = ratio(rows[quantization]["ours"]["peak_rss_bytes"],
                                                                     rows[quantization]["ctranslate2"]["peak_rss_bytes"])
            if loads:
                rows[quantization]["load"] = {"load_s": summary([x["load_s"] for x in loads]),
                                              "first_transcription_s": summary([x["first_transcription_s"] for x in loads]),
                                              "rss_after_load_bytes": summary([x["rss_after_load_bytes"] for x in loads])}
        results["shapes"][shape] = {"weights_bytes": weights, "quantizations": rows}
    results["slopes"] = _slopes(results)
    return results


def figures(runs: list[dict], weights: int, floor: int) -> dict[str, Any]:
    peak = summary([r["vmhwm_bytes"] for r in runs])["median"]
    return {"n": len(runs), "peak_rss_bytes": peak, "above_floor_over_weights": ratio(peak - floor, weights),
            "convert_s": summary([r["convert_s"] for r in runs])["median"],
            "process_s": summary([r["wall_s"] for r in runs])["median"],
            "artifact_bytes": runs[-1]["size_bytes"]}


def _slopes(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Least-squares slope of peak RSS (and of conversion time per GiB) against weights, per path."""
    slopes: dict[str, dict[str, float]] = {}
    shapes = list(results["shapes"].values())
    xs = [s["weights_bytes"] for s in shapes]
    for quantization in QUANTIZATIONS:
        for who in ("ours", "ctranslate2"):
            ys = [s["quantizations"][quantization][who]["peak_rss_bytes"] for s in shapes]
            ts = [s["quantizations"][quantization][who]["convert_s"] for s in shapes]
            slopes.setdefault(quantization, {})[who] = _fit(xs, ys)
            slopes[quantization][f"{who}_s_per_gib"] = _fit(xs, ts) * (1 << 30)
    return slopes


def _fit(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
