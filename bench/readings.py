"""The text of BENCHMARKS.md around the figures: tables per section and a short reading of what
limits each figure, computed from the JSON so the words follow the numbers."""

from __future__ import annotations

from typing import Any

from bench.fmt import mib, num, pct, sec, table

PREAMBLE = """# Benchmarks

Rendered by `python -m bench` from `bench/results/merged.json`; do not edit by hand (edit
`bench/readings.py`, then `python -m bench --render-only`).

**How to run.** `make bench` (= `.venv/bin/python -m bench`, about 85 minutes on 2 cores);
`python -m bench --quick` is a smoke test; `python -m bench --only SECTION` runs one of
`single`, `concurrency`, `padding`, `quantization`, `conversion`, `scaling`, `merge`, `service`, `soak`,
`field`, `batch`, `promotion`. Each run writes
`bench/results/<run>.json`; the latest full result per section is kept in `merged.json`.
Everything runs offline on real weights (openai/whisper-base and whisper-tiny.en, rebuilt as float32
transformers checkpoints from their CTranslate2 releases, shared/FIXTURES.md) and real speech
(27 clips in 9 languages; a >= 2 min English file of interleaved clips).

**Conventions.** Every figure is a median of n runs (n is given); the baseline (raw
faster-whisper) is measured in the same run, interleaved with ours (order rotated each
repetition) after one warm-up call, and figures are reported as ratios. Decoding everywhere:
beam_size 5, the language forced, every other option faster-whisper's default (temperature
fallback, condition_on_previous_text). The same compute_type and cpu_threads on every path.
Models are logged with our flavor into a private sqlite store under `.bench/` and registered as
`bench-<model>-<quantization>@bench`."""

GPU = """## GPU column

No GPU on the machine of these runs: float16 and int8_float16 rows have sizes only. On a GPU
machine, `python -m bench --only quantization` decodes them on CUDA and fills the column; the
single-stream, concurrency and service sections pin device=cpu and have no GPU variant yet.

The GPU reading is `bench/gpu.py`, one self-contained script for a GPU machine that reaches no
package registry. Its first table is the compute types (float16, int8_float16, bfloat16, int8) on
the long file: first-load time, the flavor against raw faster-whisper, WER, GPU memory. Its second
is issue 11's measure: a bento built for device=cuda, served by `bentoml serve` and driven over
HTTP by 1, 8 and 32 clients (short English, 9 languages forced and detected, the long file, a
short request beside it), against raw sequential faster-whisper and one batched-pipeline call over
the same windows in the same run, with the GPU targets read off the rows. `python -m
bench.gpu_kit` packs the Python 3.12 wheels (the service's stack, less the heavy packages the GPU
image holds), a BentoML home with the bento and its model, the long file and the clips, in parts
under 64 MiB; `bash bench/gpu_run.sh` (once per part) stages them and runs it, writing this
section's tables. It has been tried on CPU only (a kit built with `--device cpu`, in a Python 3.12
environment holding only those heavy packages); no GPU machine was lent to the sessions so far."""

GPU_PRESENT = """## GPU column

A GPU was present ({gpus}): the float16 and int8_float16 rows of section 3 were decoded on CUDA.
The single-stream, concurrency and service sections pin device=cpu and have no GPU variant yet."""


def single(r: dict[str, Any]) -> str:
    rows, notes = [], []
    for model, body in r["models"].items():
        for workload, f in body["workloads"].items():
            s = f["seconds"]
            to_samples = f.get("ratios_to_raw_samples", {})
            rows.append([
                model, f"{workload} ({f['audio_seconds']:.0f} s)", s["raw"]["n"], sec(s["raw"]["median"], 3),
                sec(s.get("raw_samples", {}).get("median"), 3),
                sec(s["pyfunc"]["median"], 3), sec(s.get("http", {}).get("median"), 3),
                num(f["ratios"].get("pyfunc")), num(f["ratios"].get("http")),
                f"{f['overhead_ms'].get('pyfunc', 0):+.0f} / {f['overhead_ms'].get('http', 0):+.0f}",
                "yes" if all(f["same_text_as_raw"].values()) else "no",
                f"{num(to_samples.get('pyfunc'))} / {num(to_samples.get('http'))}" if to_samples else "—",
            ])
        if body.get("http_skipped"):
            notes.append(f"HTTP path skipped for {model}: {body['http_skipped'].splitlines()[0]}")
    text = table(["model", "audio", "n", "raw", "raw (samples)", "pyfunc", "bento HTTP", "pyfunc/raw", "HTTP/raw",
                  "overhead ms (pyfunc/HTTP)", "same text", "pyfunc/HTTP vs raw (samples)"], rows)
    for model, body in r["models"].items():
        o = body.get("pyfunc_overhead_ms") or {}
        if "outside_faster_whisper" in o:
            notes.append(
                f"{model}: pyfunc.predict spends {o['outside_faster_whisper']['median']:.1f} ms per call outside "
                f"faster-whisper's transcribe (n={o['outside_faster_whisper']['n']}, {o['audio']}), of which "
                f"{o['audio_decode']['median']:.1f} ms is decoding the audio with the plugin's decoder. Raw faster-whisper "
                f"decodes inside transcribe with its own decode_audio, {o.get('faster_whisper_audio_decode', {}).get('median', float('nan')):.1f} ms "
                "here: it runs gc.collect() on every call, whose cost grows with the process's heap (this one holds "
                "mlflow and pandas). That is why ours can beat raw on a short clip; the raw_samples column "
                "(transcribe on already-decoded samples) removes the effect."
            )
        splits = body.get("http_server_split_ms") or {}
        if "transcribe_minus_decode" in splits:  # results recorded before the split was per workload
            splits = {"all workloads": splits}
        for workload, per in splits.items():
            split = per.get("transcribe_minus_decode")
            if split:
                notes.append(
                    f"{model}, {workload}: in the bento, each /transcribe spent a median {split['median']:.0f} ms "
                    f"(max {split['max']:.0f} ms, n={split['n']}, warm-up included) outside its decode: multipart "
                    "parsing, audio decoding and batching (BentoML's access log and the service's batch log)."
                )
        if body.get("pyfunc_model_config_honoured") is False:
            notes.append(
                f"{model}: MLflow ignored the load-time model_config (cpu_threads, compute_type): the flavor "
                "logs no default model_config, so MLflow refuses overrides. The pyfunc ran with CTranslate2's "
                "default threads, pinned by OMP_NUM_THREADS to the same count."
            )
    reading = (
        f"**Reading.** compute_type {r['compute_type']}, cpu_threads {r['cpu_threads']}, {r['decoding']}. "
        "All three paths run the same CTranslate2 calls; ours add fixed work per request: the pyfunc "
        "enforces the ParamSchema, builds a DataFrame and shapes the output with pydantic (measured "
        "above); the bento adds multipart parsing, audio decoding and the hand-off to the decoding engine "
        "(the samples stay in memory). Fixed costs weigh on the "
        "3 s clip, whose own cost is one 30 s encoder window plus a few beam-search steps, and vanish "
        "on the long file, where the decoder's time per window (identical on every path) limits all three."
    )
    return "\n\n".join([text, *notes, reading])


def concurrency(r: dict[str, Any]) -> str:
    rows = []
    names = {"short_en": "short English clips", "languages_forced": "27 clips, 9 languages, forced",
             "languages_detected": "27 clips, 9 languages, detected"}
    for key, w in r["workloads"].items():
        rows.append([names.get(key, key), "raw sequential", w["requests"], sec(w["raw_s"]), "1.00", "", "1.000",
                     pct(w["wer_raw"]["wer"]), pct(w["wer_raw"]["cer"])])
        if "limit_s" in w:
            rows.append(["", "one-call limit (BatchedInferencePipeline)", w["requests"], sec(w["limit_s"]),
                         num(w["limit_speedup"], 2), "1.00", "", pct(w["wer_limit"]["wer"]), pct(w["wer_limit"]["cer"])])
        for clients in sorted((k for k in w if k.startswith("bento_c")), key=lambda k: int(k[7:])):
            b = w[clients]
            rows.append(["", f"bento, {clients[7:]} clients", w["requests"], sec(b["wall_s"]), num(b["speedup"], 2),
                         num(b["of_limit"], 2) if b.get("of_limit") is not None else "", num(b["same_text_rate"]),
                         pct(b["wer"]["wer"]), pct(b["wer"]["cer"])])
    parts = [table(["workload", "path", "requests", "wall", "x raw sequential", "of the limit", "same text as raw", "WER", "CER"], rows)]
    lone, beside, long = r["lone"], r["beside_long"], r["long"]
    parts.append(table(
        ["measure", "figure"],
        [["lone request over HTTP / raw (median latency, 1 client)",
          f"{num(lone['ratio'], 3)} ({sec(lone['bento_s']['median'])} vs {sec(lone['raw_s']['median'])}, n={lone['raw_s']['n']})"],
         ["short request beside the long file / alone (median latency)",
          f"{num(beside['ratio'], 2)} ({sec(beside['beside_long_s']['median'])} vs {sec(beside['alone_s']['median'])}, n={beside['beside_long_s']['n']})"],
         [f"long file ({long['audio_s']:.0f} s), raw sequential", f"{sec(long['raw_sequential_s'])}, WER {pct(long['wer_raw_sequential']['wer'])}"],
         ["long file over HTTP, long_form=sequential", f"{sec(long['bento_sequential_s'])}, WER {pct(long['wer_bento_sequential']['wer'])}"],
         ["long file, raw BatchedInferencePipeline (VAD chunks, its default without_timestamps=True)", f"{sec(long['raw_batched_s'])}, WER {pct(long['wer_raw_batched']['wer'])}"],
         ["long file over HTTP, long_form=batched", f"{sec(long['bento_batched_s'])} ({num(long['bento_batched_speedup'], 2)}x raw sequential), "
          f"WER {pct(long['wer_bento_batched']['wer'])}"]],
    ))
    parts.append(
        f"**Reading.** {r['model']} {r['compute_type']}, cpu_threads {r['cpu_threads']}, beam {r['beam_size']}, server config "
        f"{r['server_config']}; walls are medians of {next(iter(r['workloads'].values())).get('reps', 1)} interleaved "
        "repetitions. Every request, from any client, goes through the flavor's decoding engine "
        "(mlflow_faster_whisper.engine): faster-whisper's own decoding per request, its encode and generate calls "
        "run in passes shared with the other requests' windows, up to batch_size windows per pass (on a CPU an "
        "encode pass runs its windows through the encoder one at a time, below). Short requests (one "
        "window) go before a long file's windows, in passes of their own (a call passed over twice goes next): a short "
        "request sent while the long file decodes waits for the pass in flight, then its own passes run back to back. "
        "'x raw sequential' "
        "is throughput against faster-whisper's transcribe over the same requests one after the other, in the same "
        "run; 'of the limit' is against ONE BatchedInferencePipeline call over all the windows at once (first "
        "temperature only, no previous text), the most the library gets from batching them. Same text: the share "
        "of requests whose text equals raw sequential's. long_form=batched runs that pipeline with the flavor's "
        "decoding options (timestamps on, as transcribe has them); with its own default (no timestamps) the pipeline "
        f"dropped much of each chunk after its first sentences on this file. {_spread(r)}"
    )
    costs = r.get("costs")
    if costs:
        one, many = costs["batch_1"], costs[f"batch_{costs['batch']}"]
        parts.append(table(
            ["CTranslate2 call, per 30 s window", "batch 1", f"batch {costs['batch']}"],
            [["encode", sec(one["encode_s_per_window"]["median"], 3), sec(many["encode_s_per_window"]["median"], 3)],
             ["generate (beam 5)", sec(one["generate_s_per_window"]["median"], 3), sec(many["generate_s_per_window"]["median"], 3)],
             ["mel features (per clip)", sec(costs["features_s_per_clip"], 3), ""]],
        ))
        parts.append(
            f"The encoder is {pct(costs['encoder_share_batch_1'], 0)} of a short clip's model time at batch 1, and "
            f"batching both calls (as the one-call limit does) would change throughput by "
            f"{num(costs['batching_speedup_bound'], 2)}x. Here the encoder's cost per window "
            + ("does not fall" if many["encode_s_per_window"]["median"] >= one["encode_s_per_window"]["median"] else "falls")
            + " with batching; on a CPU the engine runs it one window at a time and batches only generate: "
            + (f"{num(costs['engine_speedup_bound'], 2)}x if only these calls mattered. "
               if "engine_speedup_bound" in costs else "")
            + "That bounds what any batching gives here."
        )
    return "\n\n".join(parts)


def _spread(r: dict[str, Any]) -> str:
    spreads = [(max(w["raw_walls"]) - min(w["raw_walls"])) / min(w["raw_walls"]) for w in r["workloads"].values()
               if len(w.get("raw_walls") or []) > 1]
    if not spreads:
        return ""
    return (f"Raw sequential's own repetitions of the same work differed by up to {pct(max(spreads), 0)} on this machine: "
            "ratios within a few percent of 1.00 are within its run-to-run noise.")


def padding(r: dict[str, Any]) -> str:
    rows = []
    for language, x in r["languages"].items():
        rows.append([language, x["clips"], sec(x["padded_s"]), sec(x["unpadded_s"]), num(x["speedup"], 2), sec(x["packed_s"]),
                     num(x["packed_speedup"], 2), pct(x["padded_cer"]), pct(x["unpadded_cer"]), pct(x["packed_cer"]),
                     pct(x["padded_wer"]), pct(x["unpadded_wer"]), pct(x["packed_wer"]), num(x["same_text"]),
                     num(x["packed_same_text"])])
    text = table(["language", "clips", "padded", "unpadded", "speedup", "packed", "speedup", "CER padded", "CER unpadded",
                  "CER packed", "WER padded", "WER unpadded", "WER packed", "same text unpadded", "same text packed"], rows)
    return text + "\n\n" + (
        f"**Reading.** {r['model']} {r['compute_type']}, cpu_threads {r['cpu_threads']}, beam {r['beam_size']}, language "
        f"forced; padded and unpadded times are sums over the clips of each clip's median of {r['reps']} interleaved "
        f"runs ({r['audio_s']:.0f} s of audio). Packed: each language's clips end to end with {r['pack_gap_s']:g} s of "
        f"silence between them, in {r['packed_windows']} windows of at most 30 s, transcribed once each with word "
        "timestamps and split back by the words' times; its time is the sum of those windows' medians. Speedups are "
        "against padded; same text is the share of clips whose text equals padded's. Whisper base is weak on several "
        "of these languages whichever way, so the error columns move by whole clips: read them per language. Packing "
        f"puts the clips in each other's context; packed CER against padded, by more than 0.5 points: {_moved(r, 'packed')}. "
        "Each is a default only where no "
        "language's error rises by more than 0.5 points: pad_to_30s=false stays an option; packing is not shipped, "
        "since it would also tie unrelated requests' texts and latencies to each other."
    )


def _moved(r: dict[str, Any], way: str) -> str:
    """The languages whose ``way`` CER moved more than 0.5 points from padded's, down then up."""
    deltas = {language: x[f"{way}_cer"] - x["padded_cer"] for language, x in r["languages"].items()
              if language != "all" and x.get(f"{way}_cer") is not None and x.get("padded_cer") is not None}
    down = [f"{k} {100 * d:+.1f}" for k, d in sorted(deltas.items(), key=lambda kv: kv[1]) if d < -0.005]
    up = [f"{k} {100 * d:+.1f}" for k, d in sorted(deltas.items(), key=lambda kv: -kv[1]) if d > 0.005]
    return f"down {', '.join(down) or 'none'}; up {', '.join(up) or 'none'}"


def batch(r: dict[str, Any]) -> str:
    labels = {"pyfunc_loop": "pyfunc, one predict per file (a Python loop)", "command_local": "whisper-registry transcribe (local)",
              "command_spark": f"whisper-registry transcribe --spark {r['spark_master']}"}
    ones = r.get("one_file_seconds", {})
    rows = [[labels[way], sec(s["median"]), f"{sec(s['min'])} - {sec(s['max'])}",
             sec(ones[way]["median"]) if way in ones else "", num(r["files_per_s"][way], 3),
             num(r["same_text_as_loop"].get(way, 1.0))] for way, s in r["seconds"].items()]
    text = table(["way", "wall (median)", "range", "one file (start-up)", "files/s", "same text as the loop"], rows)
    beyond = r.get("spark_over_local_beyond_one_file")
    flips = r["same_text_as_loop"].get("command_spark", 1.0) < 1.0
    return text + "\n\n" + (
        f"**Reading.** {r['files']} real clips in 9 languages, {r['model']} {r['compute_type']}, the version's stored "
        f"decoding, language detected; each way a whole process started cold (model load and, for Spark, the JVM "
        f"included), {r['reps']} interleaved runs. Spark over local: {num(r['spark_over_local'], 2)}x (target <= "
        f"{r['target_spark_over_local_max']}); the command over the loop: {num(r['local_speedup_over_loop'], 2)}x "
        "faster (its rows share the engine's passes). On one machine Spark can only add overhead (its JVM, a job per "
        "chunk, the files shipped to Python workers); its worth is more machines. "
        + (f"Less each way's one-file run (its start-up and one file), Spark over local is {num(beyond, 2)}x. "
           if beyond is not None else "")
        + (f"Same text: the loop and the local command ran CTranslate2 with {r['cpu_threads']} threads, each of Spark's "
           f"two workers with {max(1, r['cpu_threads'] // 2)}; int8 results depend on the thread count (raw "
           "faster-whisper, base int8, beam 5, 9 of these clips: 1 differs between 1 and 2 threads, a language detected "
           "differently), and base is weak on several of these languages, so borderline clips flip. " if flips else "")
        + "At equal threads the tests find spark_udf's texts equal to the pyfunc's, row by row, on all 27 clips "
        "(tiny.en, greedy)."
    )


def promotion(r: dict[str, Any]) -> str:
    def p(d: dict[str, Any]) -> str:
        return f"{sec(d['p50'])} / {sec(d['p99'])} (n {d['n']})" if d.get("n") else "-"

    move_rows = [[mode, f"{m['follow_interval_s']:g} s", sec(m["move_to_first_answer_s"]["median"]),
                  f"{sec(m['move_to_first_answer_s']['min'])} - {sec(m['move_to_first_answer_s']['max'])}",
                  m["move_to_first_answer_s"]["n"], f"{m['failed']} of {m['requests']}", p(m["latency_steady_s"]),
                  p(m["latency_during_swap_s"])] for mode, m in r["moves"].items()]
    shadow_rows = [[name.replace("_", " "), p(s), num(s["p50_vs_no_shadow"], 2), num(s["p99_vs_no_shadow"], 2),
                    s["shadow_decoded"], s["shadow_dropped"]] for name, s in r["shadow"].items()]
    return "\n\n".join([
        table(["follow by", "poll interval", "move -> first answer (median)", "range", "moves", "failed requests",
               "p50 / p99 steady", "p50 / p99 during a swap"], move_rows),
        table(["production", "p50 / p99", "p50 vs no shadow", "p99 vs no shadow", "shadow decoded", "shadow dropped"],
              shadow_rows),
        f"**Reading.** {r['model']} {r['compute_type']}, {r['clients']} clients posting en/{r['clip'].split('/')[-1]} "
        f"(3 s) with {r['think_s'][0]:g}-{r['think_s'][1]:g} s between requests, {r['cpu_threads'] or 'default'} CTranslate2 threads. A move "
        "is import (copy into the BentoML store), checksum verification, load and one smoke decode beside the served "
        "version, then the next request; the poll adds up to its interval, the webhook takes its place. On 2 cores the "
        "new version's load and warm-up compete with the requests in flight, which is what a swap costs production "
        "here. The shadow runs only while production's engine holds no request; a production request can still wait "
        "for the one shadow pass in flight, which is the cost the ratios show (CPU: both versions share the cores).",
    ])


def quantization(r: dict[str, Any]) -> str:
    parts = []
    for model, body in r["models"].items():
        rows = []
        for q, row in body["quantizations"].items():
            rows.append([
                q, mib(row["size_bytes"]), num(row["size_ratio_to_fp32_checkpoint"]),
                num(row.get("rtf_long")), num(row.get("rtf_clips")),
                pct(row.get("wer")), pct(row.get("cer")), pct(row.get("long_wer")),
                _delta(row, "wer"), _delta(row, "cer"), row.get("decoding_skipped", row.get("device", "")),
            ])
        parts.append(f"**{model}** (float32 checkpoint {mib(body.get('checkpoint_bytes'))}, of which weights "
                     f"{mib(body['checkpoint_weights_bytes'])}; "
                     f"{body['n_clips']} clips; long file {body['long_audio_seconds']:.0f} s)")
        parts.append(table(["quantization", "artifact", "size / fp32", "RTF long", "RTF clips", "WER clips", "CER clips",
                            "WER long", "dWER pts", "dCER pts", "device"], rows))
    for model, body in r["models"].items():
        int8 = body["quantizations"].get("int8")
        if int8 and "bytes_by_dtype" in int8:
            other_files = int8["size_bytes"] - int8["model_bin_bytes"]
            floats = sum(v for k, v in int8["bytes_by_dtype"].items() if k.startswith("float"))
            parts.append(
                f"{model} int8: the artifact's model/ directory is {num(int8['size_ratio_to_fp32_checkpoint'])} of the "
                f"float32 checkpoint directory; model.bin alone is {num(int8.get('model_bin_ratio_to_fp32_weights'))} "
                f"of the checkpoint's weights. The other files (tokenizer.json, vocabulary.json, configs: "
                f"{mib(other_files)}, required by faster-whisper offline, written compact) sit on both sides "
                f"of the first ratio. Inside model.bin, {mib(floats)} stay in float "
                "(per-channel scales, biases, layer norms, the encoder's position encodings "
                f"{mib(dict(int8['largest_float_tensors']).get('encoder/position_encodings/encodings'))})."
            )
    parts.append(
        f"**Reading.** cpu_threads {r['cpu_threads']}, {r['decoding']}; RTF = decoding seconds / audio seconds "
        "(1 pass on the long file). Sizes are the artifact's model/ directory. int8 and int8_float32 "
        "are stored identically (the same bytes) and differ only in compute. Clip RTF is inflated by "
        "padding every clip to a 30 s window; the long file's RTF is the speed figure. Error rates on "
        "short clips move in steps of one word (one word error is several points for a language with "
        "~20 words): a delta within 0.3 points means the same transcripts. Absolute WER is high "
        "because Whisper writes the counting clips as digits and whisper_registry's normaliser maps "
        "number words to digits for English only (digits to characters for Chinese): the es, fr, it, "
        "pt, pl and hi counting clips are scored as errors in every quantization alike. float32 on "
        "this CPU did not reproduce bit for bit between runs (cause not traced): in two runs of "
        "whisper-base float32 (20261125T054422Z and 20261125T082138Z, converted afresh from the same "
        "checkpoint for each) base's "
        "garbled pl/witaj_swiecie came out 'Wytarzu jest tak.' and then 'Pytaj swy asi.', which "
        "moved float32's CER by 0.50 points while int8's transcripts were identical in both. On "
        "these 27 clips a delta under about half a point is within that noise."
    )
    return "\n\n".join(parts)


def _delta(row: dict[str, Any], metric: str) -> str:
    value = row.get(f"{metric}_delta_points")
    return "—" if value is None else f"{value:+.2f}"


def conversion(r: dict[str, Any]) -> str:
    parts = []
    floor = r["imports_floor"]
    for model, body in r["models"].items():
        rows = []
        for q, row in body["quantizations"].items():
            raw = row.get("raw_converter", {})
            rows.append([
                q, row["log_model_s"]["n"], sec(row["log_model_s"]["median"], 1), sec(row["process_s"]["median"], 1),
                mib(row["peak_rss_bytes"]["median"]), num(row["peak_rss_ratio_to_checkpoint"], 2),
                sec(raw.get("convert_s", {}).get("median"), 1), mib(raw.get("peak_rss_bytes", {}).get("median")),
                mib(row["size_bytes"]),
            ])
        parts.append(f"**{model}** (checkpoint weights {mib(body['checkpoint_weights_bytes'])})")
        parts.append(table(["quantization", "n", "log_model", "whole process", "peak RSS", "RSS / checkpoint",
                            "raw convert", "raw peak RSS", "artifact"], rows))
    for model, body in r["models"].items():
        phases = _phase_line(body["quantizations"].get("int8", {}).get("phases_last_run", []), body["checkpoint_weights_bytes"])
        if phases:
            parts.append(f"Where the peak comes from ({model}, int8, last run): {phases}.")
    ratios = ", ".join(f"{floor['peak_rss_bytes'] / body['checkpoint_weights_bytes']:.2f}x {model}'s checkpoint"
                       for model, body in r["models"].items())
    parts.append(
        f"**Reading.** One fresh process per run; peak RSS = the child's VmHWM read at its exit. The floor "
        f"of any conversion process is its imports (torch, transformers, ctranslate2, mlflow, the plugin): "
        f"{mib(floor['peak_rss_bytes'])} peak RSS after {sec(floor['import_s'], 1)}, i.e. {ratios} before a "
        "single weight is read. A 2x-checkpoint target therefore cannot be met by any in-process "
        "conversion that imports torch, and tiny.en, whose checkpoint is smaller than the imports, is "
        "furthest from it. Above the floor, the conversion (mlflow_faster_whisper.lowmem: CTranslate2's "
        "converter, loading the weights tensor by tensor into one float copy) holds that copy, the "
        "processor's tokenizer and, while quantizing, one tensor's temporaries (the step line above); "
        "the raw converter is CTranslate2's TransformersConverter alone after the same imports. "
        "log_model then adds the processor files, sha256 checksums (streamed, 1 MiB chunks), the MLflow "
        "run, the artifact copy and registration, which cost time but no memory peak. Section 4b has "
        "the same comparison from tiny to medium shapes."
    )
    return "\n\n".join(parts)


def _phase_line(marks: list, checkpoint_bytes: int) -> str:
    """RSS at the plugin's steps: after imports, after loading the processor, CTranslate2's peak."""
    at = {label: (rss, hwm) for _, label, rss, hwm in marks}
    if "imported" not in at or "< _run_converter" not in at or "> _run_converter" not in at:
        return ""
    imported = at["imported"][0]
    before = at["> _run_converter"][1]
    peak = at["< _run_converter"][1]
    return (f"{mib(imported)} after importing mlflow and the plugin; {mib(before)} once the processor is "
            f"loaded (this imports torch and transformers); {mib(peak)} at the end of the "
            f"conversion (+{mib(peak - before)}, {(peak - before) / checkpoint_bytes:.2f}x the checkpoint)")


def scaling(r: dict[str, Any]) -> str:
    parts = []
    shapes = r.get("shapes") or {}
    floor = r.get("imports_floor_bytes")
    for quantization in ("float32", "int8", "float16"):
        rows = []
        for shape, body in shapes.items():
            q = body["quantizations"].get(quantization)
            if not q:
                continue
            ours, theirs = q["ours"], q["ctranslate2"]
            rows.append([shape, mib(body["weights_bytes"]), ours["n"], mib(ours["peak_rss_bytes"]),
                         num(ours["above_floor_over_weights"], 2), mib(theirs["peak_rss_bytes"]),
                         num(theirs["above_floor_over_weights"], 2), num(q["peak_ours_over_ctranslate2"], 2),
                         sec(ours["convert_s"], 1), sec(theirs["convert_s"], 1), mib(ours["artifact_bytes"])])
        if rows:
            parts.append(f"**{quantization}**")
            parts.append(table(["shape", "weights", "n", "peak RSS (ours)", "(peak - floor) / weights", "peak RSS (CTranslate2)",
                                "(peak - floor) / weights", "ours / CTranslate2", "save_model", "CTranslate2 convert", "artifact"],
                               rows))
    slopes = r.get("slopes") or {}
    if slopes:
        parts.append("Peak RSS per byte of checkpoint weights (least-squares slope over the shapes): " + "; ".join(
            f"{q} ours {num(v['ours'], 2)}, CTranslate2 {num(v['ctranslate2'], 2)}" for q, v in slopes.items()) +
            ". Conversion time per GiB of weights: " + "; ".join(
            f"{q} ours {sec(v['ours_s_per_gib'], 1)}, CTranslate2 {sec(v['ctranslate2_s_per_gib'], 1)}" for q, v in slopes.items()) + ".")
    loads = []
    for shape, body in shapes.items():
        load = body["quantizations"].get("int8", {}).get("load")
        if load:
            loads.append([shape, mib(body["weights_bytes"]), sec(load["load_s"]["median"]),
                          sec(load["first_transcription_s"]["median"]), mib(load["rss_after_load_bytes"]["median"])])
    if loads:
        parts.append("**int8 artifact: `load_model` (checksums verified) and a first transcription** (hello_world, greedy, "
                     "capped at 32 tokens: random weights decode noise)")
        parts.append(table(["shape", "weights", "load_model", "first transcription", "RSS after load"], loads))
    if shapes and floor:
        labels = ", ".join(f'"{shape}"' for shape in shapes)
        lines = []
        for who, label in (("ours", "ours"), ("ctranslate2", "CTranslate2")):
            for quantization in ("float32", "int8"):
                values = ", ".join(f"{shapes[s]['quantizations'][quantization][who]['above_floor_over_weights']:.2f}" for s in shapes)
                lines.append(f"    line [{values}]")
        parts.append(
            "(Peak RSS - floor) / weights by shape; lines, top to bottom in the legend order: ours float32, ours int8, "
            "CTranslate2 float32, CTranslate2 int8; the target is 1.5.\n\n```mermaid\nxychart-beta\n"
            f'    title "Conversion peak above the import floor, per byte of weights"\n    x-axis [{labels}]\n'
            '    y-axis "x weights" 0 --> 3\n' + "\n".join(lines) + "\n```")
    parts.append(
        f"**Reading.** Floor (the imports a conversion needs before reading a weight): {mib(floor)}. "
        "Random weights shaped like each Whisper size, float32 safetensors; one fresh process per conversion, "
        "ours (`save_model`: conversion, processor files, checksums) and CTranslate2's converter as its command line "
        "runs it alternating. " + SCALING_READING)
    return "\n\n".join(parts)


# The reading of the latest full run of the scaling section (its figures are the tables above).
SCALING_READING = (
    "Ours reads the safetensors tensor by tensor into anonymous memory (mlflow_faster_whisper.lowmem), frees what "
    "CTranslate2's converter is done with (each fused q/k/v projection once fused, each float tensor once quantized, "
    "the model before quantizing), quantizes int8 a block of rows at a time (CTranslate2's arithmetic; its own makes "
    "two float copies of the whole tensor, and the 51,865-token embedding is 55 % of tiny's weights), and maps every "
    "block of 1 MiB or more on its own during the conversion (mlflow_faster_whisper.malloc: with glibc's moving "
    "threshold, freed tensors stayed on the heap, and the same small int8 conversion peaked 1.08x to 1.32x from run "
    "to run). Its peak is the imports, one float copy of the weights and a fixed part (the processor's tokenizer, "
    "about 50 MiB); its model.bin is byte for byte CTranslate2's (tests/plugin/test_conversion.py). CTranslate2's "
    "converter loads through `from_pretrained`, which in transformers 5 memory-maps the file: the mapped pages count "
    "in RSS beside every copy the converter makes. Per byte of weights (the slope over the four shapes) ours takes "
    "1.00 (float32), 1.00 (int8) and 0.49 (float16: read as float16, as CTranslate2's command line loads a float16 "
    "target) against CTranslate2's 1.31, 1.27 and 1.50; the 1.5x target is met at every shape for float32 and int8 "
    "(tiny 1.43x and 1.44x, where the tokenizer is a third of the weights; medium 1.02x and 1.02x against "
    "CTranslate2's 1.32x and 1.31x). Time is linear in the weights for both; ours is slower (medium float32 17.2 s "
    "against 9.1 s, int8 11.5 s against 8.6 s): it includes what save_model adds (processor files, the sha256 of "
    "every file, the requirements MLflow infers). `load_model` verifies the checksums (it reads every byte once) and "
    "loads model.bin into memory: CTranslate2 does not map it."
)


def merge(r: dict[str, Any]) -> str:
    parts = []
    shapes = r.get("shapes") or {}
    for quantization in ("float32", "int8"):
        rows = []
        for shape, body in shapes.items():
            q = body["quantizations"].get(quantization)
            if not q:
                continue
            ours, scripts, alone = q["ours"], q["scripts"], q["base_alone"]
            rows.append([shape, mib(body["weights_bytes"]), mib(body["adapter_bytes"]), ours["n"], mib(ours["peak_rss_bytes"]),
                         num(ours["above_floor_over_weights"], 2), num(alone["above_floor_over_weights"], 2),
                         num(q["above_floor_merge_over_base_alone"], 2), mib(scripts["merge_step_peak_rss_bytes"]),
                         mib(scripts["convert_step_peak_rss_bytes"]), num(scripts["above_floor_over_weights"], 2),
                         num(q["peak_ours_over_scripts"], 2), f"{sec(ours['convert_s'], 1)} / {sec(ours['process_s'], 1)}",
                         f"{sec(scripts['convert_s'], 1)} / {sec(scripts['process_s'], 1)}"])
        if rows:
            parts.append(f"**{quantization}**")
            parts.append(table(["shape", "base weights", "adapter", "n", "peak RSS (ours)", "(peak - floor) / weights",
                                "same, base alone", "merge / base alone", "scripts: merge + save", "scripts: convert",
                                "scripts: (peak - floor) / weights", "peak ours / scripts", "ours: work / process",
                                "scripts: work / processes"], rows))
    parts.append(
        f"**Reading.** Floors (the imports before a weight is read): {mib(r.get('imports_floor_bytes'))} with PEFT, "
        f"{mib(r.get('plain_imports_floor_bytes'))} without (the base alone). Random LoRA adapters (r=32 on q_proj and "
        "v_proj) on the scaling section's random checkpoints. Ours is `save_model(adapter, base_model=base)` in one fresh "
        "process: the base is read once into memory (mlflow_faster_whisper.lowmem), merged in place and converted from "
        "memory, never saved and read again; \"base alone\" is `save_model(base)` in the same run. The scripts are two "
        "processes: PEFT's merge_and_unload with save_pretrained, then CTranslate2's converter on the saved merge; their "
        "peak is the larger of the two, their time the sum (work: after the imports; processes: wall, imports included). "
        "The merged model.bin is byte for byte what CTranslate2 writes from the saved merge (tests/plugin/test_peft.py). "
        + MERGE_READING)
    return "\n\n".join(parts)


# The reading of the latest full run of the merge section (its figures are the tables above).
MERGE_READING = (
    "Merging adds at most 2 % to what converting the base alone takes above the floor (tiny 1.43x against 1.43x to "
    "1.44x; medium 1.04x against 1.02x, 64 MiB more for 2.9 GiB of weights), so a merge does not double the peak, and "
    "the 1.5x target is met at every shape. The processor is loaded before the base: its tokenizer peaks above what "
    "it keeps while it loads, and loaded after the base that peak landed on the base's weights (the previous run, "
    "20261206T063414Z: tiny 1.55x against 1.42x to 1.47x alone). The scripts peak at 1.30x to 2.00x, in their "
    "converter step (CTranslate2 on the saved merge, memory-mapped, which imports no PEFT: against the PEFT floor its "
    "figure is if anything low); their merge step alone is about the base plus its imports. Ours is 0.82x to 0.93x "
    "their peak, and one process where they are two: 22.7 s against 31.9 s of processes for medium int8 (11.0 s "
    "against 13.2 s after the imports)."
)


# How the service section starts a cold server (its result keys), as the tables name them.
COLD_START_MODES = {"bento": "built bento", "server": "from source on an alias, registry an mlflow server (REST)",
                    "file": "from source on an alias, registry a sqlite file (MLflow client)"}


def service(r: dict[str, Any]) -> str:
    parts = []
    floors = r.get("import_floor_s", {})
    rows = []
    for mode, label in COLD_START_MODES.items():
        c = (r.get("cold_start") or {}).get(mode)
        if not c:
            continue
        rows += [
            [f"**{label}**: cold start to /readyz", c["cold_start_s"]["n"], sec(c["cold_start_s"]["median"]),
             sec(c["cold_start_s"]["max"])],
            ["  of which model load in the worker (/info load_seconds)", c["model_load_s_in_worker"]["n"],
             sec(c["model_load_s_in_worker"]["median"]), sec(c["model_load_s_in_worker"]["max"])],
            ["  first /transcribe after ready (hello_world clip)", c["first_request_s"]["n"],
             sec(c["first_request_s"]["median"]), sec(c["first_request_s"]["max"])],
        ]
    rows.append(["first start of the run (imports the version into the BentoML store if missing)", 1,
                 sec(r.get("first_start_s")), ""])
    parts.append(table(["figure", "n", "median", "max"], rows))
    workers = {label: (r.get("cold_start") or {}).get(mode, {}).get("mlflow_imported_in_worker")
               for mode, label in COLD_START_MODES.items()}
    parts.append("MLflow imported in the worker at /readyz (/info imports): " +
                 "; ".join(f"{label}: {'yes' if v else 'no'}" for label, v in workers.items() if v is not None) + ".")
    parts.append("Fresh-interpreter times (pieces of a cold start): " +
                 ", ".join(f"import {k.removesuffix('_s')} {sec(v)}" for k, v in floors.items()) + ".")
    resolve = r.get("resolve_in_fresh_process_s") or {}
    if "server" in resolve:
        parts.append(
            f"Resolving `{r['registered_model'].split('/')[0]}@bench` in a fresh interpreter "
            f"(`whisper_bento.model_ref.import_from_registry`, the model already in the BentoML store): "
            f"{sec(resolve['server']['median'])} from the mlflow server (REST, no MLflow import), "
            f"{sec(resolve['file']['median'])} from the sqlite file (imports MLflow and its sqlite store) "
            f"(n={resolve['server']['n']}). From source, the `bentoml serve` process does this once and its "
            "worker inherits the result; a built bento does not do it at all."
        )
    rss = r.get("rss")
    if rss:
        parts.append(table(["requests", "elapsed", "server RSS (all processes)", "worker RSS", "processes"],
                           [[s["requests"], sec(s["elapsed_s"], 0), mib(s["total_bytes"]), mib(s["worker_bytes"]), s["processes"]]
                            for s in rss["samples"]]))
        parts.append(
            f"RSS growth from {rss['samples'][0]['requests']} to {rss['samples'][-1]['requests']} requests: "
            f"{pct(rss['growth_worker'])} for the worker, {pct(rss['growth_total'])} for the whole server "
            f"({rss['clients']} concurrent clients, clip {rss['clip']}, {num(rss['requests_per_s'], 2)} requests/s; "
            f"tiny.en int8 from source on its alias in the mlflow server; MLflow imported in the worker: "
            f"{'yes' if r.get('rss_mlflow_in_worker') else 'no'})."
        )
    parts.append(SERVICE_READING)
    return "\n\n".join(parts)


# The reading of the latest full run of section 5 (its figures are the tables above).
SERVICE_READING = (
    "**Reading.** A cold start is two interpreters starting one after the other. The `bentoml serve` process: "
    "BentoML's CLI (1.0 s under a profiler, most of it importing BentoML's cloud client and its schemas, which "
    "`bentoml serve` imports whether or not it talks to a cloud), then the service module for the service's "
    "definition (FastAPI, the routes, the config), then, from source, the alias resolved. Its worker: BentoML's "
    "worker (1.2 s before the service module starts), the service module again, then the version loaded: "
    "faster-whisper, CTranslate2 and PyAV imported, the sha256 of every model file, CTranslate2's load (the model "
    "load line, which now counts those imports too: 0.47 s against 0.38 s before). The serve process imports none "
    "of the decoding stack (numpy, CTranslate2, faster-whisper, PyAV): faster-whisper's language list is read on "
    "first use and the service imports the engine and the audio decoder "
    "where a version loads (a test reads /proc/<pid>/maps: CTranslate2 and PyAV are mapped in the worker, not in "
    "the serve process). Measured on its own, interleaved A/B on this machine (6 starts each, from source on an "
    "alias in an MLflow server): 4.62 s before, 4.34 s after. The run above was also on a faster day than the "
    "previous one (import mlflow 2.69 s against 3.44 s, import faster_whisper 0.44 s against 0.58 s): of the drop "
    "from 5.11 s / 5.20 s to 3.93 s / 3.85 s, the A/B is the change's share, the rest is the machine. Serving a "
    "built bento or a pinned version imports neither torch, transformers nor MLflow. From source, the registry is "
    "asked once by the serve process and the worker inherits the answer. An MLflow server is asked over its REST "
    "API and a version already in the BentoML store is found by its registry identity (name, version, run, "
    "source), so the serve process imports no MLflow; a registry that is a sqlite file is asked through MLflow, "
    "which costs its import and its SqlAlchemy store (7.0 s to /readyz; the resolve line: 5.2 s against 1.1 s), "
    "and its worker imports MLflow at its first poll (follow_interval_s after the start). The RSS table is tiny.en "
    "int8 served from source on its alias in an MLflow server (1000 base requests, one 30 s encoder window each, "
    "would take more than the whole benchmark budget on 2 cores; the per-request code is the same). In this run "
    "that version was registered anew (the plugin's code had changed) and its first start imported it into the "
    "BentoML store through MLflow, so the serve process holds MLflow (about 210 MB); the worker never imports it. "
    "The worker holds still: glibc keeps at most two malloc arenas "
    "(mlflow_faster_whisper.malloc.limit_retained_memory), and BentoML's TimeoutMiddleware no longer keeps each "
    "answered request (its Request, uvicorn cycle and tracing spans, through the context its `call_later` timer "
    "copies) for `request_timeout_s`: whisper_bento.traffic runs that timer in an empty context and cancels it with "
    "the response (a unit test shows BentoML's own middleware keeping every request and ours none). A run with "
    "MLflow imported in the worker and the timers kept grew 16.9 % from request 10 to 1000."
)


def soak(r: dict[str, Any]) -> str:
    parts = []
    s = r.get("soak")
    if s:
        parts.append(table(
            ["clients", "seconds", "requests", "errors", "requests/s", "p50", "p95", "p99", "server RSS start -> end", "worker RSS start -> end"],
            [[s["clients"], sec(s["seconds"], 0), s["requests"], s["errors"], num(s["requests_per_s"], 2), sec(s["p50_s"]),
              sec(s["p95_s"]), sec(s["p99_s"]), f"{mib(s['rss_start_bytes'])} -> {mib(s['rss_end_bytes'])}",
              f"{mib(s['worker_rss_start_bytes'])} -> {mib(s['worker_rss_end_bytes'])}"]]))
        if s["error_kinds"]:
            parts.append("Errors seen: " + "; ".join(f"`{e}`" for e in s["error_kinds"]))
    k = r.get("kill")
    if k:
        parts.append(
            f"**Worker killed with SIGKILL** under {k['clients']} clients: {k['failed']} of {k['requests']} requests failed "
            f"({k['failed_sent_before_kill']} of them sent before the kill, {k['failed_sent_after_back']} sent after the new "
            f"worker answered); BentoML started a new worker (pid {k['old_worker_pid']} -> {k['new_worker_pid']}) that "
            f"answered /info {sec(k['back_s'])} after the kill; {k['ok_after_back']} requests succeeded after it."
            + (f" Failures: {'; '.join(f'`{e}`' for e in k['failures'])}." if k["failures"] else "")
        )
    d = r.get("disconnects")
    if d:
        parts.append(
            f"**{d['clients']} clients gone away** (half mid-upload, half right after sending): the next request was "
            f"answered after {sec(d['first_answer_after_storm_s'])} (the queue of abandoned requests drained first), and "
            f"the one after that took {sec(d['latency_after_drain_s'])} against {sec(d['latency_before_s'])} before the storm."
        )
    parts.append(
        f"**Reading.** tiny.en int8, the {r.get('clips')} real clips in 9 languages in turn per client (the "
        "English-only model on other languages often falls back through every temperature, which is what makes "
        "these requests slow), faster-whisper's default decoding, CPU only: 16 clients queue behind 2 cores, "
        "so the latencies are mostly queueing. A request whose client went away is dropped from the batch queue "
        "(only one already in a running batch is decoded): before that change the same storm held the next answer "
        "for 33.7 s (a quick run of this section on the code before it). A killed worker costs the requests in "
        "flight on it and nothing else: requests sent while it restarts wait in the socket's backlog and are "
        "answered by the new worker. What RSS growth there is over 10 minutes includes BentoML's uncancelled "
        "per-request timeout timers (section 5), which level off after `request_timeout_s`."
    )
    return "\n\n".join(parts)


# What the probe of the service before these defences saw (the code at cdf30fd, driven by hand
# with the same attacks); the "this run" column is measured.
FIELD_BEFORE = {
    "slow_webhooks": "every authenticated request 429 for 60 s; /readyz 200",
    "dropped_streams": "503 to everyone for about 6 minutes (once over 10)",
    "burst_100": "16 x 200, 48 x 503 ours, 36 x 429 BentoML's shape",
    "idle": "never timed out",
    "webhooks": "fragments accepted, the whole secret refused; replays accepted; nesting 500",
    "admin_non_ascii": "401: could never match",
    "info_leaks": "key file path, checkpoint path and worker pid shown",
    "uploads_16_max": "+974 MiB RSS, +1.5 GB spooled, no bound across requests",
    "chunked_300mb": "read and spooled whole (+312 MB), then 413",
    "kill_after_promotion": "served version 1 (what bentoml serve resolved at start) until the next poll",
}


def field(r: dict[str, Any]) -> str:
    d = r.get("drills") or {}

    def answer(name: str) -> str:
        v = d.get(name)
        if v is None:
            return "not run"
        if isinstance(v, dict) and set(v) == {"error"}:
            return f"drill failed: `{v['error']}`"
        if name == "slow_webhooks":
            return (f"{v['cut']} of {v['connections']} slow connections cut (the last at {sec(v['cut_by_s'], 1)}); "
                    f"authenticated requests meanwhile: {_counts(v['during'])}")
        if name == "dropped_streams":
            return (f"first 200 {sec(v['first_200_after_s'], 1)} after {v['clients']} clients left"
                    + (f"; before it: {_counts(v['refused_before'])}" if v["refused_before"] else ""))
        if name == "burst_100":
            return _counts(v)
        if name == "idle":
            return f"{v['closed']} of {v['connections']} closed by the server (the last at {sec(v['closed_by_s'], 1)})"
        if name == "webhooks":
            return ", ".join(f"{k} {s}" for k, s in v.items())
        if name == "admin_non_ascii":
            return f"HTTP {v}"
        if name == "info_leaks":
            leaks = [k for k, leaked in v.items() if leaked]
            return "shows " + ", ".join(leaks) if leaks else "none of them shown"
        if name in ("uploads_16_max", "chunked_300mb"):
            return (f"{_counts(v['statuses'])}; worker RSS +{mib(v['worker_rss_growth_bytes'])}, "
                    f"at most {mib(v['peak_spooled_bytes'])} spooled")
        if name == "kill_after_promotion":
            if v.get("error"):
                return v["error"]
            return f"first 200 {sec(v['first_200_after_s'], 1)} after the kill, from version {v['version']} (the alias names {v['alias_names']})"
        return str(v)

    rows = [[title, FIELD_BEFORE[name], answer(name)] for name, title in (
        ("slow_webhooks", "70 unauthenticated webhook bodies at 5 B/s, 4 authenticated requests meanwhile"),
        ("dropped_streams", "16 streams of the long file dropped before their first event"),
        ("burst_100", "100 requests at once"),
        ("idle", "300 idle or half-sent connections"),
        ("webhooks", "signed webhooks: whole secret / a fragment / first / replayed / 280 s ahead / 10 KB nesting"),
        ("admin_non_ascii", "an admin key that is not ASCII"),
        ("info_leaks", "/info read with an API key"),
        ("uploads_16_max", "16 uploads at the size limit at once"),
        ("chunked_300mb", "a 300 MB chunked body"),
        ("kill_after_promotion", "worker SIGKILLed after the service followed a promotion"),
    )]
    return "\n\n".join([
        table(["attack or accident", "before", "this run"], rows),
        "**Reading.** tiny.en int8 from source on `models:/bench-field@production`, with an api_key, a non-ASCII "
        "admin_key and a webhook_secret holding a space and a comma, CPU only. Each row is one drill of "
        "`bench/field.py` against that one service, in the order given; the before column is what the same "
        "attacks got from the service before its field defences. The uploads are zeros, not audio: one the service "
        "admits is read and answered 400, one past the in-flight upload budget is refused with 503 before its body is "
        "read, so the RSS and spool figures are the budget's. The registry's own faults (a register or a "
        "promote killed mid-way) are drilled by the tests (tests/registry), not timed here.",
    ])


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} x {status}" for status, n in counts.items()) or "none"


def multimodel(r: dict[str, Any]) -> str:
    names = list(r["models"])
    rps = r["throughput_rps"]
    cold, swap = r["cold_load"], r["swap"]
    memory_rows = [[name, mib(m["size_bytes"]), mib(m["estimate_bytes"]), mib(m.get("loaded_bytes")), mib(m.get("rss_growth_bytes"))]
                   for name, m in cold["memory"].items()]
    return "\n\n".join([
        table(["service", "requests/s (median)", "range", "reps"],
              [[mode, num(s["median"], 2), f"{num(s['min'], 2)} - {num(s['max'], 2)}", s["n"]] for mode, s in rps.items()]),
        f"One service holding both over two single-model services: **{num(r['shared_over_separate'], 2)}x** the requests "
        f"per second. Worker RSS: {mib(r['rss_bytes']['shared_worker'])} for the one service, "
        f"{' + '.join(mib(b) for b in r['rss_bytes']['separate_workers'])} for the two.",
        table(["first request to the model not preloaded", "warm request (median)", "its load (service's load_seconds)",
               "worker RSS growth"],
              [[sec(cold["first_request_s"]), sec(cold["warm_request_s"]["median"]), sec(cold["load_seconds"]),
                mib(cold["worker_rss_growth_bytes"])]]),
        table(["model", "artifact", "budget counts before loading", "once loaded", "worker RSS growth at its load (not counted)"], memory_rows),
        table(["budget", "request (median, alternating models)", "loads"],
              [[label, sec(swap[label]["request_s"]["median"]), ", ".join(f"{n} {c}" for n, c in swap[label]["loads"].items())]
               for label in ("holds_one", "holds_both")]),
        f"**Reading.** {', '.join(names)} {r['compute_type']}, {r['clients']} clients each posting {r['clip']} to the "
        "models in turn; the two modes interleaved in one run on the same machine. One service takes forward passes "
        "in turn across its models' engines, where two services' engines compete for the same cores; a budget that "
        f"holds one model makes every alternating request load the other (swap cost {sec(swap['swap_cost_s'])} a "
        "request here), so size `memory_budget_bytes` for the models in use.",
    ])


def realtime(r: dict[str, Any]) -> str:
    def at(level: dict[str, Any] | None) -> str:
        return "—" if not level else f"{sec(level['first_delta_p95_s'])} / {sec(level['final_p95_s'])}"

    rows = []
    for model, per in r["models"].items():
        for mode in ("shared", "alone"):
            m = per[mode]
            levels = {int(k): v for k, v in m["levels"].items()}
            beyond = min((n for n in levels if n > m["max_streams"]), default=None)
            rows.append([model, "shared passes" if mode == "shared" else "one pass per window (batch_size=1)", m["max_streams"],
                         at(levels.get(m["max_streams"])), f"{beyond}: {at(levels[beyond])}" if beyond else "—",
                         f"{num(m['wer_vs_file']['mean'], 3)} / {num(m['wer_vs_file']['max'], 3)}"])
    ratios = ", ".join(f"{model} " + (f"{num(per['streams_shared_over_alone'], 2)}x" if per["streams_shared_over_alone"] else "—")
                       for model, per in r["models"].items())
    return "\n\n".join([
        table(["model", "engine", "streams sustained", "there: first delta / final text p95", "first level not sustained",
               "WER vs file (mean / max)"], rows),
        f"Streams sustained, shared passes over one pass per window: {ratios} (— where neither sustains one).",
        f"**Reading.** Each stream sends {r['turn_speech_s']:g} s of speech ({r['turns_per_stream']} turns) at real-time pace "
        f"over the realtime socket, server VAD cutting turns, an interim decode each 0.5 s of new audio; "
        f"{r['cpu_threads'] or 'default'} CTranslate2 threads. A level is sustained when every turn completes, the final "
        f"text comes at most {r['final_p95_bound_s']:g} s after its speech ends (p95) and the first delta at most "
        f"{r['first_delta_p95_bound_s']:g} s after it starts (p95); levels rise until one is not. Every interim decode "
        "encodes a whole 30 s window however short the turn, so on this CPU the encoder bounds the streams, and a shared "
        "pass of several windows costs nearly as much as the windows one by one (section 2): sharing pays where a pass of "
        "several windows costs little more than one, as on a GPU (not measured here). The word error compares each live turn with the same service's file "
        "transcription of the same speech.",
    ])
