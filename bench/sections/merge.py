"""Merging a LoRA adapter at scale: peak RSS and time of ``save_model(adapter, base_model=...)``
against the scripts it replaces, in the same run.

The bases are the scaling section's random checkpoints (tiny to medium shapes); each gets a random
LoRA adapter in the common Whisper recipe (r=32 on q_proj and v_proj). Ours is one fresh process
(``bench.convert_child merge``): the base is read once into memory, merged in place and converted
from memory. The scripts are two processes, as they are run: PEFT's ``merge_and_unload`` and
``save_pretrained`` (``merge_raw``), then CTranslate2's converter on the saved merge (``raw``); their
peak is the larger of the two, their time the sum. Beside them, ours converts the base alone
(``save``): what the merge adds to a conversion. The floors are the ``imports peft`` child's for the
merges and the ``imports`` child's for the base alone.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from bench import models
from bench.common import WORK, dir_size, log, ratio, summary
from bench.sections import scaling

QUANTIZATIONS = ("float32", "int8")


def adapter(shape: str):
    base = scaling.checkpoint(shape)
    target = base.with_name(base.name + "-lora")
    if not (target / "adapter_config.json").is_file():
        log("merge: writing a random LoRA adapter for the %s-shaped checkpoint", shape)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        models.run_child(["adapter", str(base), str(tmp)], f"merge-adapter-{shape}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return base, target


def run(settings) -> dict[str, Any]:
    floor, _ = models.run_child(["imports", "peft"], "merge-imports")
    plain_floor, _ = models.run_child(["imports"], "merge-imports-plain")
    results: dict[str, Any] = {"imports_floor_bytes": floor["vmhwm_bytes"], "plain_imports_floor_bytes": plain_floor["vmhwm_bytes"],
                               "target_peak_over_weights_max": scaling.TARGET_PEAK_OVER_WEIGHTS, "shapes": {}}
    for shape in settings.scaling_shapes:
        base, lora = adapter(shape)
        weights = dir_size(base, "*.safetensors")
        reps = settings.scaling_reps if weights < 1 << 30 else 1
        rows: dict[str, Any] = {}
        out, merged = WORK / "merge-out", WORK / "merge-merged"
        for quantization in QUANTIZATIONS:
            ours, scripts, plain = [], [], []
            for rep in range(reps):
                log("merge: %s %s rep %d/%d", shape, quantization, rep + 1, reps)
                shutil.rmtree(out, ignore_errors=True)
                child, parent = models.run_child(["merge", str(lora), str(base), quantization, str(out)],
                                                 f"merge-{shape}-{quantization}-ours-{rep}")
                ours.append({**child, **parent})
                shutil.rmtree(out, ignore_errors=True)
                child, parent = models.run_child(["save", str(base), quantization, str(out)],
                                                 f"merge-{shape}-{quantization}-plain-{rep}")
                plain.append({**child, **parent})
                shutil.rmtree(merged, ignore_errors=True)
                step1, wall1 = models.run_child(["merge_raw", str(lora), str(base), str(merged)],
                                                f"merge-{shape}-{quantization}-scripts-merge-{rep}")
                shutil.rmtree(out, ignore_errors=True)
                step2, wall2 = models.run_child(["raw", str(merged), quantization, str(out)],
                                                f"merge-{shape}-{quantization}-scripts-convert-{rep}")
                scripts.append({"vmhwm_bytes": max(step1["vmhwm_bytes"], step2["vmhwm_bytes"]),
                                "merge_vmhwm_bytes": step1["vmhwm_bytes"], "convert_vmhwm_bytes": step2["vmhwm_bytes"],
                                "convert_s": step1["convert_s"] + step2["convert_s"],
                                "wall_s": wall1["wall_s"] + wall2["wall_s"], "size_bytes": step2["size_bytes"]})
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(merged, ignore_errors=True)
            row = rows[quantization] = {"ours": scaling.figures(ours, weights, floor["vmhwm_bytes"]),
                                        "scripts": scaling.figures(scripts, weights, floor["vmhwm_bytes"]),
                                        "base_alone": scaling.figures(plain, weights, plain_floor["vmhwm_bytes"])}
            for step in ("merge", "convert"):
                row["scripts"][f"{step}_step_peak_rss_bytes"] = summary([s[f"{step}_vmhwm_bytes"] for s in scripts])["median"]
            row["peak_ours_over_scripts"] = ratio(row["ours"]["peak_rss_bytes"], row["scripts"]["peak_rss_bytes"])
            row["above_floor_merge_over_base_alone"] = ratio(row["ours"]["above_floor_over_weights"],
                                                             row["base_alone"]["above_floor_over_weights"])
        results["shapes"][shape] = {"weights_bytes": weights, "adapter_bytes": dir_size(lora, "*.safetensors"),
                                    "quantizations": rows}
    return results

