"""The GPU reading: a model on each compute type, on the long file, against raw faster-whisper.

Self-contained: it needs the flavor (``plugin/``), the registry's text normalizer, ctranslate2, faster-whisper, pydantic, numpy and
PyYAML, and nothing from MLflow, the registry or a package index, so it runs on a GPU machine that
reaches no registry (``bench/gpu_kit.py`` packs what it needs). Each compute type runs in a child
process of its own, so its first-load time is a process's first CUDA model (context and cuBLAS
set-up included) and its GPU memory is that model's alone. In the child, the model is loaded
through the flavor (``mlflow_faster_whisper.load_model``: checksums, ``devices.place``, the cuBLAS
12 preload), and the long file is transcribed through the flavor's path and through raw
faster-whisper on the same loaded weights, interleaved, ``--runs`` times each; medians are
reported, with WER against the file's reference text.

    PYTHONPATH=plugin:registry python bench/gpu.py --model DIR --audio long.wav --device cuda --out gpu.md
    PYTHONPATH=plugin:registry python bench/gpu.py --model DIR --audio long.wav --device cpu \
        --compute-types int8,float32 --runs 1 --out /tmp/gpu.md        # the same script, tried on CPU

The section is written row by row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np

COMPUTE_TYPES = ("float16", "int8_float16", "bfloat16", "int8")
DECODING = {"language": "en", "beam_size": 5}


def read_wav(path: Path) -> np.ndarray:
    """16 kHz mono 16-bit PCM as float32 (the long file's format; no PyAV needed)."""
    with wave.open(str(path)) as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (16000, 1, 2):
            raise SystemExit(f"{path}: need 16 kHz mono 16-bit PCM")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def reference_text(audio: Path) -> str:
    """The long file's reference: the texts of the segments in the .json beside it."""
    return " ".join(s["text"] for s in json.loads(audio.with_suffix(".json").read_text()))


def wer(reference: str, hypothesis: str) -> float:
    ref, hyp = _words(reference), _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
    return row[-1] / max(len(ref), 1)


def _words(text: str) -> list[str]:
    from whisper_registry.normalize import normalize_english  # pure Python; numbers as digits, as in evaluate

    return normalize_english(text).split()


def child(args: argparse.Namespace) -> dict:
    """One compute type in this fresh process: load, then interleaved runs of both paths."""
    import faster_whisper

    import mlflow_faster_whisper as mfw
    from mlflow_faster_whisper import devices, transcription
    from mlflow_faster_whisper.decoding import DecodingOptions

    audio = read_wav(args.audio)
    options = DecodingOptions.parse(DECODING)
    before = devices.gpu_memory_used_mib()
    started = time.perf_counter()
    model = mfw.load_model(str(args.model), device=args.device, compute_type=args.compute_type)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    first = transcription.transcribe(model, audio, options)
    first_s = time.perf_counter() - started
    after = devices.gpu_memory_used_mib()
    reference = reference_text(args.audio)
    ours, raw, text_ours, text_raw = [], [], first.text, ""
    for _ in range(args.runs):
        started = time.perf_counter()
        text_ours = transcription.transcribe(model, audio, options).text
        ours.append(time.perf_counter() - started)
        started = time.perf_counter()
        segments, _ = model.transcribe(audio, **options.to_transcribe_kwargs())
        text_raw = " ".join(s.text.strip() for s in segments)
        raw.append(time.perf_counter() - started)
    return {
        "compute_type": args.compute_type,
        "placed": model.model.compute_type,
        "device": model.model.device,
        "cublas": devices.load_cublas().__dict__ if model.model.device == "cuda" else None,
        "faster_whisper": faster_whisper.__version__,
        "audio_s": round(len(audio) / 16000, 1),
        "first_load_s": round(load_s, 2),
        "first_transcribe_s": round(first_s, 2),
        "ours_s": round(statistics.median(ours), 3),
        "raw_s": round(statistics.median(raw), 3),
        "wer_ours": round(wer(reference, text_ours), 4),
        "wer_raw": round(wer(reference, text_raw), 4),
        "same_text": text_ours.strip() == text_raw.strip(),
        "gpu_mib": None if before is None or after is None else round(after - before),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a faster_whisper MLflow model directory")
    parser.add_argument("--audio", type=Path, required=True, help="16 kHz mono WAV with a .json of segments beside it")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compute-types", default=",".join(COMPUTE_TYPES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True, help="the markdown section to write")
    parser.add_argument("--compute-type", help=argparse.SUPPRESS)  # set in the child
    args = parser.parse_args(argv)
    if args.compute_type:
        print(json.dumps(child(args)))
        return 0

    from mlflow_faster_whisper import devices

    facts = devices.runtime_facts()
    gpus = ", ".join(d.get("name") or d["device"] for d in facts["devices"][1:]) or "none"
    lines = [
        "## GPU: compute types on the long file",
        "",
        f"Machine: {platform.node()}, GPUs: {gpus}, driver {facts['driver']}, ctranslate2 {facts['ctranslate2']}, "
        f"faster-whisper {facts['faster_whisper']}, Python {facts['python']}. Model: `{args.model.name}`; "
        f"decoding {DECODING}; medians of {args.runs} interleaved runs per path; each compute type in a fresh process.",
        "",
        "| compute type (in force) | first load s | first transcription s | flavor s | raw faster-whisper s | "
        "flavor / raw | x realtime | WER flavor | WER raw | same text | GPU MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    for compute_type in args.compute_types.split(","):
        command = [sys.executable, __file__, "--model", str(args.model), "--audio", str(args.audio), "--device",
                   args.device, "--runs", str(args.runs), "--out", str(args.out), "--compute-type", compute_type]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
        if done.returncode != 0:
            row = f"| {compute_type} | failed: {' '.join(done.stderr.strip().splitlines()[-1:])[:300]} |"
        else:
            r = json.loads(done.stdout.strip().splitlines()[-1])
            row = (f"| {compute_type} ({r['placed']}) | {r['first_load_s']} | {r['first_transcribe_s']} | {r['ours_s']} | "
                   f"{r['raw_s']} | {r['ours_s'] / r['raw_s']:.3f} | {r['audio_s'] / r['ours_s']:.0f} | {r['wer_ours']:.3f} | "
                   f"{r['wer_raw']:.3f} | {'yes' if r['same_text'] else 'no'} | {r['gpu_mib']} |")
            if r["cublas"]:
                row += f"\n<!-- cuBLAS: {r['cublas']} -->"
        print(row, flush=True)
        with args.out.open("a") as f:
            f.write(row + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
