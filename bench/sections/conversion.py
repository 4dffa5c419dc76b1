"""Conversion: wall time and peak RSS of ``log_model`` per quantization, one fresh process per run.

Each run is ``python -m bench.convert_child ours ...``: import, ``log_model(checkpoint,
quantization=q, registered_model_name=...)`` in a run of the benchmark's sqlite store. Peak RSS is
the VmHWM the child reads from /proc/self/status at exit. (Not ``ru_maxrss``: on Linux a child's
ru_maxrss includes the high-water mark of the parent's memory it was forked from, so a parent
that once held a model inflates every child's figure.) Two floors, measured the same
way: the imports alone, and CTranslate2's ``TransformersConverter.convert`` alone.
"""

from __future__ import annotations

from typing import Any

from bench import models
from bench.common import WORK, log, ratio, summary
from bench.sections.quantization import CPU_QUANTIZATIONS, GPU_QUANTIZATIONS

TARGET_RSS_RATIO = 2.0  # peak RSS / checkpoint size
RAW_FLOOR_QUANTIZATIONS = ("float32", "int8")


def run(settings) -> dict[str, Any]:
    results: dict[str, Any] = {"target_rss_ratio_max": TARGET_RSS_RATIO, "models": {}}
    floor, parent = models.run_child(["imports"], "conversion-imports")
    results["imports_floor"] = {"peak_rss_bytes": floor["vmhwm_bytes"], "import_s": floor["import_s"]}
    for model in models.MODELS:
        path = models.checkpoint(model)
        checkpoint_bytes = models.checkpoint_weights_bytes(model)
        rows: dict[str, Any] = {}
        for quantization in CPU_QUANTIZATIONS + GPU_QUANTIZATIONS:
            main = model == "base" and quantization in RAW_FLOOR_QUANTIZATIONS
            # The figures the targets are read on get the most repetitions; tiny.en's mostly show the floor.
            reps = settings.conversion_reps if main else max(1, settings.conversion_reps - (1 if model == "base" else 2))
            raw_reps = max(1, reps - 1) if main else 0
            runs, raw_runs = [], []
            for rep in range(reps):  # ours and the raw converter alternate
                log("conversion: %s %s rep %d/%d (ours)", model, quantization, rep + 1, reps)
                child, parent = models.run_child(
                    ["ours", str(path), quantization, models.registered_name(model, quantization)],
                    f"conversion-{model}-{quantization}-{rep}",
                )
                runs.append({**child, **parent})
                if rep < raw_reps:
                    log("conversion: %s %s rep %d/%d (raw TransformersConverter)", model, quantization, rep + 1, raw_reps)
                    child, parent = models.run_child(
                        ["raw", str(path), quantization, str(WORK / "raw-convert")],
                        f"conversion-raw-{model}-{quantization}-{rep}",
                    )
                    raw_runs.append({**child, **parent})
            row = _row(runs, checkpoint_bytes)
            if raw_runs:
                row["raw_converter"] = {
                    "convert_s": summary([r["convert_s"] for r in raw_runs]),
                    "process_s": summary([r["wall_s"] for r in raw_runs]),
                    "peak_rss_bytes": summary([r["vmhwm_bytes"] for r in raw_runs]),
                }
                row["log_model_over_raw_convert"] = ratio(row["log_model_s"]["median"], row["raw_converter"]["convert_s"]["median"])
                row["peak_rss_over_raw"] = ratio(row["peak_rss_bytes"]["median"], row["raw_converter"]["peak_rss_bytes"]["median"])
            rows[quantization] = row
        results["models"][model] = {"checkpoint_weights_bytes": checkpoint_bytes, "quantizations": rows}
    return results


def _row(runs: list[dict[str, Any]], checkpoint_bytes: int) -> dict[str, Any]:
    peak = summary([r["vmhwm_bytes"] for r in runs])
    return {
        "log_model_s": summary([r["log_model_s"] for r in runs]),
        "process_s": summary([r["wall_s"] for r in runs]),
        "import_s": summary([r["import_s"] for r in runs]),
        "peak_rss_bytes": peak,
        "vmhwm_after_imports_bytes": summary([r["vmhwm_after_imports_bytes"] for r in runs]),
        "peak_rss_ratio_to_checkpoint": ratio(peak["median"], checkpoint_bytes),
        "size_bytes": runs[-1]["size_bytes"],
        "registered_model": f"{runs[-1]['registered_model']}/{runs[-1]['version']}",
        "phases_last_run": runs[-1].get("phases", []),
    }
