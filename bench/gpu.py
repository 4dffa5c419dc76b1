"""The GPU reading: a model on each compute type, on the long file, against raw faster-whisper;
then the decoding engine under 1, 8 and 32 concurrent clients against raw sequential and the
one-call limit (issue 11's GPU figures).

Self-contained: it needs the flavor (``plugin/``), the registry's text normalizer, the checkout's
stdlib-only server helpers (``devkit/processes.py``, ``bench/server.py``), ctranslate2,
faster-whisper, PyAV, pydantic, numpy and PyYAML (and, for the HTTP part, BentoML), and nothing
from MLflow or a package index, so it runs on a GPU machine that reaches no registry
(``bench/gpu_kit.py`` packs what it needs). Each compute type runs in a child
process of its own, so its first-load time is a process's first CUDA model (context and cuBLAS
set-up included) and its GPU memory is that model's alone. In the child, the model is loaded
through the flavor (``mlflow_faster_whisper.load_model``: checksums, ``devices.place``, the cuBLAS
12 preload), and the long file is transcribed through the flavor's path and through raw
faster-whisper on the same loaded weights, interleaved, ``--runs`` times each; medians are
reported, with WER against the file's reference text.

    PYTHONPATH=.:plugin:registry python bench/gpu.py --model DIR --audio long.wav --device cuda --out gpu.md
    PYTHONPATH=.:plugin:registry python bench/gpu.py --model DIR --audio long.wav --device cpu \
        --compute-types int8,float32 --runs 1 --out /tmp/gpu.md        # the same script, tried on CPU

The engine part (``--clips``, a .json of the real clips' files, languages and texts, which
bench/gpu_kit.py packs; ``--engine-compute-types``, default int8_float16) runs one child per
compute type. With ``--bento TAG`` (the kit's bento, built for device=cuda, in ``BENTOML_HOME``)
the child starts ``bentoml serve TAG`` on the same device and compute type and sends the requests
over HTTP, as issue 11 measures; without it, to the flavor's ``Engine`` in process. Client threads
each send their share of the requests one after the other; raw sequential is the flavor's
``transcribe`` over the same requests on the child's own copy of the model; the limit is ONE
``BatchedInferencePipeline`` call over the same windows. Each workload's row is followed by the
issue's GPU targets, read off the rows.

The section is written row by row, and each child's progress goes to a log beside it, so a run cut
short keeps what it measured.
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
from pathlib import Path

import numpy as np

COMPUTE_TYPES = ("float16", "int8_float16", "bfloat16", "int8")
DECODING = {"language": "en", "beam_size": 5}


def model_name(model: Path) -> str:
    """The model directory's name, or NAME:VERSION for a model in a BentoML home (.../NAME/VERSION/mlflow_model)."""
    return f"{model.parent.parent.name}:{model.parent.name}" if model.name == "mlflow_model" else model.name


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

    from mlflow_faster_whisper.audio import decode_audio

    audio = decode_audio(args.audio.read_bytes())
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


def engine_child(args: argparse.Namespace) -> dict:
    """The engine's throughput against raw sequential and the one-call limit, one compute type.

    With ``--bento`` the requests go over HTTP to ``bentoml serve`` of that bento on the same
    device and compute type (the issue's measure); without, to the flavor's engine in process.
    """
    import threading

    from faster_whisper import BatchedInferencePipeline

    import mlflow_faster_whisper as mfw
    from mlflow_faster_whisper import transcription
    from mlflow_faster_whisper.audio import decode_audio
    from mlflow_faster_whisper.decoding import DecodingOptions

    def request(path: Path, language: str, text: str) -> tuple:
        """(samples, file bytes, language, reference): the in-process paths decode the bytes the
        server is sent, as the service does, so every path sees the same samples."""
        data = path.read_bytes()
        return decode_audio(data), data, language, text

    clips = [request(args.clips.parent / m["file"], m["language"], m["text"]) for m in json.loads(args.clips.read_text())]
    english = [c for c in clips if c[2] == "en"]
    model = mfw.load_model(str(args.model), device=args.device, compute_type=args.compute_type)
    front = BentoFront(args) if args.bento else EngineFront(model, args.batch_size)

    def opts(language, detect=False):
        return {"beam_size": 5} if detect else {"beam_size": 5, "language": language}

    def raw_sequential(requests, detect=False):
        return [transcription.transcribe(model, a, DecodingOptions.parse(opts(lang, detect))).text
                for a, _, lang, _ in requests]

    def limit(requests):
        audio = np.concatenate([r[0] for r in requests])
        starts = np.cumsum([0] + [len(r[0]) for r in requests])
        windows = [{"start": s / 16000, "end": e / 16000} for s, e in zip(starts[:-1], starts[1:])]
        segments, _ = BatchedInferencePipeline(model).transcribe(
            audio, clip_timestamps=windows, batch_size=front.batch_size,
            **DecodingOptions.parse(opts(requests[0][2])).to_transcribe_kwargs())
        return list(segments)

    def clients_run(requests, clients, detect=False, **extra):
        texts, errors = [""] * len(requests), []

        def loop(index):
            try:
                for i in range(index, len(requests), clients):
                    samples, data, lang, _ = requests[i]
                    texts[i] = front.transcribe(samples, data, {**opts(lang, detect), **extra})
            except BaseException as exc:  # raised after the join
                errors.append(exc)

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return texts

    def timed(fn, *a, **k):
        started = time.perf_counter()
        out = fn(*a, **k)
        return time.perf_counter() - started, out

    try:
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
        one = [request(args.audio, "en", reference)]
        seq_s, seq_text = timed(raw_sequential, one)
        front_seq_s, front_seq_text = timed(clients_run, one, 1)
        batched_s, batched_text = timed(clients_run, one, 1, long_form="batched")
        rows.append({"workload": "the long file", "raw_s": round(seq_s, 2), "sequential_s": round(front_seq_s, 2),
                     "batched_s": round(batched_s, 2), "speedup": round(seq_s / batched_s, 2),
                     "wer_raw": round(wer(reference, seq_text[0]), 4),
                     "wer_sequential": round(wer(reference, front_seq_text[0]), 4),
                     "wer_batched": round(wer(reference, batched_text[0]), 4)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
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
        return {"front": front.describe(), "rows": rows}
    finally:
        front.close()


class EngineFront:
    """Requests to the flavor's decoding engine in this process."""

    def __init__(self, model, batch_size: int) -> None:
        from mlflow_faster_whisper.engine import Engine

        self.batch_size = batch_size
        self.engine = Engine(model, batch_size=batch_size, max_requests=256)

    def transcribe(self, samples: np.ndarray, data: bytes, options: dict) -> str:
        from mlflow_faster_whisper.decoding import DecodingOptions

        return self.engine.transcribe(samples, DecodingOptions.parse(options)).text

    def describe(self) -> str:
        return f"the engine in process (batch_size {self.batch_size})"

    def close(self) -> None:
        self.engine.close()


class BentoFront:
    """Requests over HTTP to ``bentoml serve BENTO`` on this device and compute type (BENTOML_HOME
    holds the bento); each client thread has its own connection, as separate clients would."""

    def __init__(self, args: argparse.Namespace) -> None:
        import threading
        import urllib.request

        from devkit.processes import ServerProcess, free_port

        self.url = f"http://127.0.0.1:{free_port()}"
        # A built bento serves with the configuration it was built with (device, compute type, batch_size).
        command = [sys.executable, "-m", "bentoml", "serve", args.bento, "--host", "127.0.0.1",
                   "--port", self.url.rsplit(":", 1)[1]]
        self.server = ServerProcess(command, ready_url=self.url + "/readyz", timeout_s=300,
                                    log_path=args.out.with_name(f"bento-{args.compute_type}.log"),
                                    fail_marker="Application startup failed")
        self.server.start()
        with urllib.request.urlopen(self.url + "/info", timeout=10) as response:
            self.info = json.loads(response.read())
        self.batch_size = self.info["config"]["batch_size"]
        self.bento = args.bento
        self.local = threading.local()

    def transcribe(self, samples: np.ndarray, data: bytes, options: dict) -> str:
        import httpx

        from bench.server import transcribe_http

        if not hasattr(self.local, "client"):
            self.local.client = httpx.Client(timeout=1800)
        return transcribe_http(self.local.client, self.url, data, options)["text"]

    def describe(self) -> str:
        return (f"`bentoml serve {self.bento}` over HTTP ({self.info.get('device')}, "
                f"{self.info.get('compute_type')} in force, batch_size {self.batch_size})")

    def close(self) -> None:
        self.server.stop()


def _engine_rows(compute_type: str, result: dict) -> list[str]:
    """The engine table's rows for one compute type, then issue 11's GPU targets read off them."""
    out, rows = [f"| {compute_type} | front-end | {result['front']} |"], result["rows"]
    for r in rows:
        if "c8" in r or "c32" in r:
            cells = [f"{k[1:]} client{'s' * (k != 'c1')} {r[k]['speedup']}x (same text {r[k]['same_text']})" for k in ("c1", "c8", "c32") if k in r]
            limit = f"; one-call limit {r['raw_s'] / r['limit_s']:.2f}x" if r.get("limit_s") else ""
            out.append(f"| {compute_type} | {r['workload']} | raw sequential {r['raw_s']} s{limit}; " + "; ".join(cells) + " |")
        elif "batched_s" in r:
            out.append(f"| {compute_type} | {r['workload']} | raw sequential {r['raw_s']} s (WER {r['wer_raw']:.3f}); "
                       f"long_form=sequential {r['sequential_s']} s (WER {r['wer_sequential']:.3f}); "
                       f"long_form=batched {r['batched_s']} s, {r['speedup']}x raw (WER {r['wer_batched']:.3f}) |")
        else:
            ratio = f"{r['beside_s'] / r['alone_s']:.2f}x" if r.get("beside_s") else "n/a (the file finished first)"
            out.append(f"| {compute_type} | {r['workload']} | alone {r['alone_s']} s; beside {r['beside_s']} s: {ratio} |")
    english, forced, detected, long_file = rows[0], rows[1], rows[2], rows[3]

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    targets = [
        ("32 clients >= 8x raw sequential (short English)", f"{english['c32']['speedup']}x", english["c32"]["speedup"] >= 8),
        ("8 clients >= 4x raw sequential (short English)", f"{english['c8']['speedup']}x", english["c8"]["speedup"] >= 4),
    ]
    for label, row in (("forced", forced), ("detected", detected)):
        for clients in (8, 32):
            share = row[f"c{clients}"]["speedup"] / english[f"c{clients}"]["speedup"]
            targets.append((f"9 languages ({label}) >= 0.8 of English, {clients} clients", f"{share:.2f}", share >= 0.8))
    targets.append(("long file, long_form=batched >= 2.5x raw sequential, WER not above it",
                    f"{long_file['speedup']}x, WER {long_file['wer_batched']:.3f} vs {long_file['wer_raw']:.3f}",
                    long_file["speedup"] >= 2.5 and long_file["wer_batched"] <= long_file["wer_raw"]))
    out += [f"| {compute_type} | target: {label} | {figure}: {verdict(ok)} |" for label, figure, ok in targets]
    return out


def run_child(command: list[str], log: Path) -> subprocess.CompletedProcess:
    """Run a child; its stderr (progress rows, errors) goes to ``log`` as it comes, so a run cut
    short still brings it back; the result's ``stderr`` is the log's last line."""
    with log.open("w") as f:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=f, text=True, env=os.environ)
    done.stderr = " ".join(log.read_text().strip().splitlines()[-1:])
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a faster_whisper MLflow model directory")
    parser.add_argument("--audio", type=Path, required=True, help="16 kHz mono WAV with a .json of segments beside it")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compute-types", default=",".join(COMPUTE_TYPES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True, help="the markdown section to write")
    parser.add_argument("--clips", type=Path, help="a .json of real clips (file, language, text; bench/gpu_kit.py "
                        "packs it): runs the engine part")
    parser.add_argument("--engine-compute-types", help="default: --bentos' compute types, else int8_float16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64, help="requests per engine workload")
    parser.add_argument("--bentos", type=Path, help="a JSON of bento tags in BENTOML_HOME by compute type "
                        "(bench/gpu_kit.py builds them): the engine part serves each over HTTP (default: the engine "
                        "in process); the engine compute types default to its keys")
    parser.add_argument("--bento", help=argparse.SUPPRESS)  # set in the child
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
        f"faster-whisper {facts['faster_whisper']}, Python {facts['python']}. Model: `{model_name(args.model)}`; "
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
        done = run_child(command, args.out.with_name(f"load-{compute_type}.log"))
        if done.returncode != 0:
            row = f"| {compute_type} | failed: {done.stderr[:300]} |"
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
    if args.clips is None:
        return 0
    with args.out.open("a") as f:
        f.write("\n## GPU: the decoding engine, concurrent clients (beam 5)\n\n"
                "x: throughput against raw sequential faster-whisper over the same requests, same run.\n\n"
                "| compute type | workload | figures |\n|---|---|---|\n")
    bentos = json.loads(args.bentos.read_text()) if args.bentos else {}
    for compute_type in (args.engine_compute_types or ",".join(bentos) or "int8_float16").split(","):
        command = [sys.executable, __file__, "--model", str(args.model), "--audio", str(args.audio), "--device", args.device,
                   "--out", str(args.out), "--compute-type", compute_type, "--engine", "--clips", str(args.clips),
                   "--batch-size", str(args.batch_size), "--requests", str(args.requests)]
        if bentos and compute_type not in bentos:
            lines_out = [f"| {compute_type} | failed | no bento for it in {args.bentos} |"]
        elif (done := run_child(command + (["--bento", bentos[compute_type]] if bentos else []),
                                args.out.with_name(f"engine-{compute_type}.log"))).returncode != 0:
            lines_out = [f"| {compute_type} | failed | {done.stderr[:300]} |"]
        else:
            lines_out = _engine_rows(compute_type, json.loads(done.stdout.strip().splitlines()[-1]))
        print("\n".join(lines_out), flush=True)
        with args.out.open("a") as f:
            f.write("\n".join(lines_out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
