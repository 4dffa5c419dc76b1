"""The GPU reading: a model on each compute type, on the long file, against raw faster-whisper;
then the decoding engine under 1, 8 and 32 concurrent clients against raw sequential and the
one-call limit (issue 11's GPU figures).

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

The engine part (``--engine-compute-types``, default int8_float16; ``--clips`` a .npz of the real
clips and a .json of their languages and texts, which bench/gpu_kit.py packs) runs in the same
way, one child per compute type, in process (the kit carries no BentoML): client threads each
send their share of the requests to ``Engine.transcribe`` one after the other, as HTTP clients
would; raw sequential is ``WhisperModel.transcribe`` over the same requests; the limit is ONE
``BatchedInferencePipeline`` call over the same windows.

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


def engine_child(args: argparse.Namespace) -> list[dict]:
    """The engine's throughput against raw sequential and the one-call limit, one compute type."""
    import threading

    from faster_whisper import BatchedInferencePipeline

    import mlflow_faster_whisper as mfw
    from mlflow_faster_whisper import transcription
    from mlflow_faster_whisper.decoding import DecodingOptions
    from mlflow_faster_whisper.engine import Engine

    arrays = np.load(args.clips)
    meta = json.loads(args.clips.with_suffix(".json").read_text())
    clips = [(arrays[m["key"]], m["language"], m["text"]) for m in meta]
    english = [c for c in clips if c[1] == "en"]
    long_audio = read_wav(args.audio)
    model = mfw.load_model(str(args.model), device=args.device, compute_type=args.compute_type)
    engine = Engine(model, batch_size=args.batch_size, max_requests=256)

    def opts(language, detect=False):
        return DecodingOptions.parse({"beam_size": 5} if detect else {"beam_size": 5, "language": language})

    def raw_sequential(requests, detect=False):
        return [transcription.transcribe(model, a, opts(lang, detect)).text for a, lang, _ in requests]

    def limit(requests):
        audio = np.concatenate([a for a, _, _ in requests])
        starts = np.cumsum([0] + [len(a) for a, _, _ in requests])
        windows = [{"start": s / 16000, "end": e / 16000} for s, e in zip(starts[:-1], starts[1:])]
        segments, _ = BatchedInferencePipeline(model).transcribe(
            audio, clip_timestamps=windows, batch_size=args.batch_size, **opts(requests[0][1]).to_transcribe_kwargs())
        return list(segments)

    def clients_run(requests, clients, detect=False, **extra):
        texts = [""] * len(requests)

        def loop(index):
            for i in range(index, len(requests), clients):
                a, lang, _ = requests[i]
                texts[i] = engine.transcribe(a, DecodingOptions.layered(opts(lang, detect), extra)).text

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return texts

    def timed(fn, *a, **k):
        started = time.perf_counter()
        out = fn(*a, **k)
        return time.perf_counter() - started, out

    raw_sequential(english[:1]), clients_run(english[:2], 2), limit(english[:2])  # warm-up
    rows = []
    n = args.requests
    short = [english[i % len(english)] for i in range(n)]
    mixed = [clips[i % len(clips)] for i in range(n)]
    for name, requests, detect, client_counts, with_limit in (
        (f"{n} short English", short, False, (1, 8, 32), True),
        (f"{n} requests, 9 languages, forced", mixed, False, (8, 32), False),
        (f"{n} requests, 9 languages, detected", mixed, True, (8, 32), False),
    ):
        raw_s, raw_texts = timed(raw_sequential, requests, detect)
        row = {"workload": name, "raw_s": round(raw_s, 2)}
        if with_limit:
            row["limit_s"] = round(timed(limit, requests)[0], 2)
        for clients in client_counts:
            wall, texts = timed(clients_run, requests, clients, detect)
            row[f"c{clients}"] = {"wall_s": round(wall, 2), "speedup": round(raw_s / wall, 2),
                                  "same_text": round(sum(a == b for a, b in zip(texts, raw_texts)) / len(requests), 3)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    reference = reference_text(args.audio)
    one = [(long_audio, "en", reference)]
    seq_s, seq_text = timed(raw_sequential, one)
    batched_s, batched_text = timed(clients_run, one, 1, long_form="batched")
    rows.append({"workload": "the long file", "raw_s": round(seq_s, 2), "batched_s": round(batched_s, 2),
                 "speedup": round(seq_s / batched_s, 2), "wer_sequential": round(wer(reference, seq_text[0]), 4),
                 "wer_batched": round(wer(reference, batched_text[0]), 4)})
    probe = english[1]
    alone = [timed(clients_run, [probe], 1)[0] for _ in range(3)]
    holder = threading.Thread(target=clients_run, args=(one, 1))
    holder.start()
    time.sleep(0.2)
    beside = []
    while holder.is_alive() and len(beside) < 3:
        beside.append(timed(clients_run, [probe], 1)[0])
    holder.join()
    rows.append({"workload": "short beside the long file", "alone_s": round(statistics.median(alone), 3),
                 "beside_s": round(statistics.median(beside), 3) if beside else None})
    engine.close()
    return rows


def _engine_rows(compute_type: str, rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if "c8" in r or "c32" in r:
            cells = [f"{k[1:]} clients {r[k]['speedup']}x (same text {r[k]['same_text']})" for k in ("c1", "c8", "c32") if k in r]
            limit = f"; one-call limit {r['raw_s'] / r['limit_s']:.2f}x" if r.get("limit_s") else ""
            out.append(f"| {compute_type} | {r['workload']} | raw sequential {r['raw_s']} s{limit}; " + "; ".join(cells) + " |")
        elif "batched_s" in r:
            out.append(f"| {compute_type} | {r['workload']} | sequential {r['raw_s']} s (WER {r['wer_sequential']:.3f}); "
                       f"long_form=batched {r['batched_s']} s, {r['speedup']}x (WER {r['wer_batched']:.3f}) |")
        else:
            ratio = f"{r['beside_s'] / r['alone_s']:.2f}x" if r.get("beside_s") else "n/a (the file finished first)"
            out.append(f"| {compute_type} | {r['workload']} | alone {r['alone_s']} s; beside {r['beside_s']} s: {ratio} |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a faster_whisper MLflow model directory")
    parser.add_argument("--audio", type=Path, required=True, help="16 kHz mono WAV with a .json of segments beside it")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compute-types", default=",".join(COMPUTE_TYPES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True, help="the markdown section to write")
    parser.add_argument("--clips", type=Path, help="a .npz of real clips (.json beside it): runs the engine part")
    parser.add_argument("--engine-compute-types", default="int8_float16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64, help="requests per engine workload")
    parser.add_argument("--compute-type", help=argparse.SUPPRESS)  # set in the child
    parser.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)  # set in the child
    args = parser.parse_args(argv)
    if args.compute_type:
        print(json.dumps(engine_child(args) if args.engine else child(args)))
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
    if args.clips is None or not args.engine_compute_types:
        return 0
    with args.out.open("a") as f:
        f.write(f"\n## GPU: the decoding engine, concurrent clients (batch_size {args.batch_size}, beam 5)\n\n"
                "x: throughput against raw sequential faster-whisper over the same requests, same run.\n\n"
                "| compute type | workload | figures |\n|---|---|---|\n")
    for compute_type in args.engine_compute_types.split(","):
        command = [sys.executable, __file__, "--model", str(args.model), "--audio", str(args.audio), "--device", args.device,
                   "--out", str(args.out), "--compute-type", compute_type, "--engine", "--clips", str(args.clips),
                   "--batch-size", str(args.batch_size), "--requests", str(args.requests)]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
        if done.returncode != 0:
            lines_out = [f"| {compute_type} | failed | {' '.join(done.stderr.strip().splitlines()[-1:])[:300]} |"]
        else:
            lines_out = _engine_rows(compute_type, json.loads(done.stdout.strip().splitlines()[-1]))
        print("\n".join(lines_out), flush=True)
        with args.out.open("a") as f:
            f.write("\n".join(lines_out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
