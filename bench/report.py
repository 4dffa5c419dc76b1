"""Merge run results and render BENCHMARKS.md from them (never edit BENCHMARKS.md by hand:
change this file or bench/readings.py and run ``python -m bench --render-only``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import readings
from bench.fmt import num, pct, sec, status, table
from bench.common import write_json
from bench.sections import SECTIONS

TITLES = {
    "single": "1. Single stream: raw faster-whisper vs pyfunc vs bento (HTTP)",
    "concurrency": "2. Concurrency: the decoding engine over HTTP vs raw sequential and the one-call limit",
    "padding": "2b. Less encoder work on short windows: unpadded (pad_to_30s=false) and packed, vs padded to 30 s",
    "quantization": "3. Quantization: size, RTF, WER/CER",
    "conversion": "4. Conversion: log_model wall time and peak RSS",
    "scaling": "4b. Conversion at scale: tiny to medium shapes, against CTranslate2's converter",
    "merge": "4c. Merging a LoRA adapter at scale: in memory, against the merge-save-convert scripts",
    "service": "5. Service: cold start and RSS growth",
    "soak": "6. Soak and faults: 16 clients for 10 minutes, a killed worker, clients that go away",
    "field": "6b. Field faults: hostile and unlucky traffic, a killed worker, oversized uploads",
    "batch": "7. Batch transcription: a pyfunc loop vs whisper-registry transcribe, here and on Spark",
    "promotion": "8. Live promotion: alias move to the new version's first answer, and latency with a shadow",
    "multimodel": "9. Several models in one service: throughput against one service per model, loads and swaps",
    "realtime": "10. Live streams: concurrent real-time sessions, shared passes against one pass per window",
}


TARGET_HEADER = ["target", "figure", "status", "mode"]


def merge(path: Path, run: dict[str, Any]) -> None:
    """Keep the latest result per section; a quick (smoke) result never replaces a full one."""
    merged = json.loads(path.read_text()) if path.is_file() else {"runs": {}, "sections": {}}
    meta = {k: v for k, v in run.items() if k != "sections"}
    used = False
    for name, result in run["sections"].items():
        old = merged["sections"].get(name)
        if old is not None and old.get("mode") == "full" and result.get("mode") != "full":
            continue
        merged["sections"][name] = result
        used = True
    if used:
        merged["runs"][run["run_id"]] = meta
    live = {s["run_id"] for s in merged["sections"].values()}
    merged["runs"] = {k: v for k, v in merged["runs"].items() if k in live}
    write_json(path, merged)


def render_file(merged_path: Path, out: Path) -> None:
    """Render ``out`` from the merged results. Where ``out`` holds sections the merged results lack
    (a machine without the earlier runs' JSON: ``bench/results/`` is not in git), only the sections
    and runs measured here are written into it, and the rest of it is kept as it is."""
    merged = json.loads(merged_path.read_text())
    old = out.read_text() if out.is_file() else ""
    kept = [name for name in SECTIONS if f"\n## {TITLES[name]}\n" in old and name not in merged["sections"]]
    out.write_text(splice(old, merged) if kept else render(merged))


def splice(old: str, merged: dict[str, Any]) -> str:
    """``old`` with each section of ``merged`` rendered in its place (or after the section before
    it), and ``merged``'s runs added to the machine table."""
    blocks = old.rstrip("\n").split("\n\n## ")
    heads = [b.split("\n", 1)[0] for b in blocks]
    for name, result in merged["sections"].items():
        block = f"{TITLES[name]}\n\n{_section_body(name, result)}"
        if TITLES[name] in heads:
            blocks[heads.index(TITLES[name])] = block
            continue
        before = [TITLES[n] for n in SECTIONS[: SECTIONS.index(name)] if TITLES[n] in heads]
        at = heads.index(before[-1]) + 1 if before else len(blocks)
        blocks.insert(at, block)
        heads.insert(at, TITLES[name])
    if "Targets" in heads:  # the measured sections' rows replace theirs; the others' stay
        at = heads.index("Targets")
        lines = blocks[at].split("\n")
        rows = targets(merged["sections"])
        fresh = {row[0]: line for row, line in zip(rows, table(TARGET_HEADER, rows).split("\n")[2:])}
        lines = [fresh.pop(line.split(" | ")[0].lstrip("| "), line) for line in lines]
        blocks[at] = "\n".join(lines + list(fresh.values()))
    machine = heads.index("Machine, versions, command")
    lines = blocks[machine].split("\n")
    present = {line.split(" | ")[0].lstrip("| ") for line in lines}
    new_rows = [row for row in _machine(merged["runs"]).split("\n")[2:] if row.split(" | ")[0].lstrip("| ") not in present]
    blocks[machine] = "\n".join(lines + new_rows)
    return "\n\n## ".join(blocks) + "\n"


# ------------------------------------------------------------------------------------- targets


def targets(sections: dict[str, Any]) -> list[list[Any]]:
    """(target, figure, status, section mode) rows for the summary table."""
    rows = []
    single = sections.get("single", {})
    for model, body in (single.get("models") or {}).items():
        for workload, fig in body.get("workloads", {}).items():
            for key, baseline in (("ratios", "raw"), ("ratios_to_raw_samples", "raw on decoded samples")):
                for path, value in fig.get(key, {}).items():
                    rows.append([f"single stream {path} / {baseline} <= 1.03 ({model}, {workload})", num(value),
                                 status(value is not None and value <= single["target_ratio_max"]), single.get("mode")])
    conc = sections.get("concurrency", {})
    short = (conc.get("workloads") or {}).get("short_en", {})
    if short.get("bento_c8"):
        mode = conc.get("mode")
        rows.append(["8 clients >= 0.9 of the one-call limit (CPU, short English)", num(short["bento_c8"]["of_limit"], 2),
                     status(short["bento_c8"]["of_limit"] >= 0.9), mode])
        for key, w in conc["workloads"].items():
            for clients in (k for k in w if k.startswith("bento_c")):
                rows.append([f"never below raw sequential ({key}, {clients[7:]} clients)", num(w[clients]["speedup"], 2),
                             status(w[clients]["speedup"] >= 1.0), mode])
        rows.append(["lone request over HTTP <= 1.03 of raw", num(conc["lone"]["ratio"], 3), status(conc["lone"]["ratio"] <= 1.03), mode])
        rows.append(["short request beside the long file <= 2x alone", num(conc["beside_long"]["ratio"], 2),
                     status(conc["beside_long"]["ratio"] <= 2.0), mode])
    pad = (sections.get("padding") or {}).get("languages", {})
    for way, label, speedup in (("unpadded", "pad_to_30s=false", "speedup"), ("packed", "packing short clips", "packed_speedup")):
        if pad.get("all", {}).get(f"{way}_cer") is None:
            continue
        worst = max((k for k in pad if k != "all"), key=lambda k: (pad[k][f"{way}_cer"] or 0) - (pad[k]["padded_cer"] or 0))
        delta = 100 * ((pad[worst][f"{way}_cer"] or 0) - (pad[worst]["padded_cer"] or 0))
        rows.append([f"{label} a default only if no language's CER rises > 0.5 points (worst: {worst})",
                     f"{delta:+.1f} points; {num(pad['all'][speedup], 2)}x faster", status(delta <= 0.5), sections["padding"].get("mode")])
    quant = sections.get("quantization", {})
    for model, body in (quant.get("models") or {}).items():
        int8 = body["quantizations"].get("int8", {})
        if int8.get("size_ratio_to_fp32_checkpoint") is not None:
            r = int8["size_ratio_to_fp32_checkpoint"]
            rows.append([f"int8 size / fp32 checkpoint <= 0.27 ({model})", num(r), status(r <= 0.27), quant.get("mode")])
        for metric in ("wer", "cer"):
            delta = int8.get(f"{metric}_delta_points")
            if delta is not None:
                rows.append([f"int8 {metric.upper()} within 0.3 points of float32 ({model})", f"{delta:+.2f} points",
                             status(abs(delta) <= 0.3), quant.get("mode")])
    conv = sections.get("conversion", {})
    for model, body in (conv.get("models") or {}).items():
        for q, row in body["quantizations"].items():
            r = row.get("peak_rss_ratio_to_checkpoint")
            rows.append([f"log_model peak RSS <= 2x checkpoint ({model}, {q})", num(r, 2), status(r is not None and r <= 2.0),
                         conv.get("mode")])
    scaling = sections.get("scaling", {})
    for shape, body in (scaling.get("shapes") or {}).items():
        for q in ("float32", "int8"):
            v = body["quantizations"][q]["ours"]["above_floor_over_weights"]
            rows.append([f"conversion (peak RSS - import floor) <= 1.5x weights ({shape}, {q})", num(v, 2), status(v <= 1.5),
                         scaling.get("mode")])
    merge = sections.get("merge", {})
    for shape, body in (merge.get("shapes") or {}).items():
        for q, row in body["quantizations"].items():
            v = row["ours"]["above_floor_over_weights"]
            rows.append([f"adapter merge + conversion (peak RSS - import floor) <= 1.5x base weights ({shape}, {q})", num(v, 2),
                         status(v <= 1.5), merge.get("mode")])
    svc = sections.get("service", {})
    for mode, label in readings.COLD_START_MODES.items():
        if mode in (svc.get("cold_start") or {}):
            v = svc["cold_start"][mode]["cold_start_s"]["median"]
            rows.append([f"cold start to /readyz <= 5 s (base int8, CPU, {label})", sec(v), status(v <= 5.0), svc.get("mode")])
    if (svc.get("rss") or {}).get("growth_total") is not None:
        rss = svc["rss"]
        last = rss["samples"][-1]["requests"]
        rows.append([f"worker RSS growth 10 -> {last} requests < 5 %", f"{pct(rss['growth_worker'])} (server {pct(rss['growth_total'])})",
                     status(rss["growth_worker"] < 0.05), svc.get("mode")])
    soak = (sections.get("soak") or {}).get("soak")
    if soak:
        rows.append([f"soak: 0 errors ({soak['clients']} clients, {sec(soak['seconds'], 0)})", f"{soak['errors']} of {soak['requests']}",
                     status(soak["errors"] == 0), sections["soak"].get("mode")])
    batch = sections.get("batch") or {}
    if batch.get("spark_over_local") is not None:
        rows.append([f"Spark {batch['spark_master']} within {batch['target_spark_over_local_max']}x of local workers (one machine)",
                     num(batch["spark_over_local"], 2), status(batch["spark_over_local"] <= batch["target_spark_over_local_max"]),
                     batch.get("mode")])
    live = sections.get("realtime") or {}
    for model, per in (live.get("models") or {}).items():
        v = per.get("streams_shared_over_alone")
        rows.append([f"live streams sustained, shared passes >= 2x one pass per window ({model})",
                     f"{num(v, 2)} ({per['shared']['max_streams']} vs {per['alone']['max_streams']})",
                     status(v is not None and v >= 2.0), live.get("mode")])
    return rows


# ------------------------------------------------------------------------------------- sections


def render(merged: dict[str, Any]) -> str:
    sections, runs = merged["sections"], merged["runs"]
    out = [readings.PREAMBLE, "## Machine, versions, command", _machine(runs)]
    if any(s.get("mode") != "full" for s in sections.values()):
        out.append("> **Smoke-test figures.** Sections marked *quick* come from `python -m bench --quick` "
                   "(1-2 repetitions, 30 s audio) on a machine shared with other work: they show the "
                   "harness runs, not how fast anything is. Run `make bench` on a quiet machine.")
    out += ["## Targets", table(TARGET_HEADER, targets(sections)) or "(none measured)"]
    for name in SECTIONS:
        out.append(f"## {TITLES[name]}")
        result = sections.get(name)
        out.append(_section_body(name, result) if result is not None
                   else "Not measured yet: `python -m bench --only %s`." % name)
    gpus = {meta["machine"].get("gpu") for meta in runs.values()} - {None}
    out.append(readings.GPU if not gpus else readings.GPU_PRESENT.format(gpus=", ".join(sorted(gpus))))
    return "\n\n".join(out) + "\n"


def _section_body(name: str, result: dict[str, Any]) -> str:
    head = f"*Run {result['run_id']}, mode {result['mode']}, {result.get('section_seconds', 0):.0f} s.*"
    if result.get("error"):
        return f"{head}\n\nFailed: `{result['error']}` (traceback in bench/results/{result['run_id']}.json)."
    if result.get("skipped"):
        return f"{head}\n\nSkipped: {result['skipped'].splitlines()[0]}"
    return f"{head}\n\n{getattr(readings, name)(result)}"


def _machine(runs: dict[str, Any]) -> str:
    rows = []
    for run_id, meta in sorted(runs.items()):
        m, v = meta["machine"], meta["versions"]
        rows.append([
            run_id, f"`{meta['command']}`",
            f"{m['cpu_model']}, {m['affinity_cores']} cores ({', '.join(m['simd']) or 'no AVX2'}), {m['ram_gb']} GiB RAM, "
            f"GPU: {m['gpu'] or 'none'}; CTranslate2 CPU path: {_gemm_path(m)}; load avg at start {m['load_average_at_start'][0]}",
            ", ".join(f"{k} {v[k]}" for k in ("ctranslate2", "faster-whisper", "mlflow", "bentoml", "torch", "transformers")),
            f"{v.get('git_commit')}{' (dirty)' if v.get('git_dirty') else ''}, Python {m['python']}",
        ])
    return table(["run", "command", "machine", "versions", "commit"], rows)


def _gemm_path(m: dict[str, Any]) -> str:
    if "ct2_mkl" not in m:
        return "not recorded"
    why = f"CT2_USE_MKL={m['ct2_use_mkl_env']}" if m.get("ct2_use_mkl_env") else m.get("cpu_vendor") or "?"
    return f"{'MKL' if m['ct2_mkl'] else 'oneDNN/ruy (not MKL)'} ({why})"


def console_summary(run: dict[str, Any]) -> str:
    lines = [f"bench {run['run_id']} ({run['mode']})"]
    for row in targets(run["sections"]):
        lines.append(f"  {row[2]:>10}  {row[0]}: {row[1]}")
    for name, result in run["sections"].items():
        if result.get("skipped") or result.get("error"):
            lines.append(f"  {name}: {'SKIPPED ' + result['skipped'].splitlines()[0] if result.get('skipped') else 'ERROR ' + result['error']}")
    return "\n".join(lines)
