"""Batch transcription: the same files through a pyfunc loop, the command here, and Spark.

Three whole processes, each started cold and timed from start to exit, over the 27 real clips
(base int8, the version's stored decoding, language detected): a Python loop calling the pyfunc
once per file (what a team writes today); ``whisper-registry transcribe`` on local workers (this
process, rows batched through the engine); and the same command with ``--spark local[2]`` (two
Python workers, one model each, the cores shared between them). Interleaved, the order rotated
every repetition; medians. Spark's worth is more machines: on one, its overhead is the figure.
Each way also runs over one file, right after its run over all of them: its start-up (interpreter,
model load, and for Spark the JVM and its workers' model loads), to tell a fixed cost from a
per-file one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import models
from bench.common import WORK, log, ratio, summary

MODEL = "base"
COMPUTE_TYPE = "int8"
SPARK_MASTER = "local[2]"
TARGET_SPARK_OVER_LOCAL = 1.2

_PYFUNC_LOOP = """
import json, sys
from pathlib import Path
import mlflow.pyfunc, pandas as pd
uri, folder, out = sys.argv[1:]
model = mlflow.pyfunc.load_model(uri)
texts = {}
for path in sorted(str(p.resolve()) for p in Path(folder).rglob("*.wav")):
    texts[path] = model.predict(pd.DataFrame({"audio": [Path(path).read_bytes()]}))[0]["text"]
Path(out).write_text(json.dumps(texts))
"""


def run(settings) -> dict[str, Any]:
    import pandas as pd

    logged = models.ensure_logged(MODEL, COMPUTE_TYPE)
    folder = models.clips()[0].path.parent.parent  # <language>/<name>.wav (+ reference .txt files)
    n_files = len(list(folder.rglob("*.wav")))
    scratch = WORK / "batch"
    one = scratch / "one-file"
    shutil.rmtree(one, ignore_errors=True)
    (one / "en").mkdir(parents=True)
    shutil.copy2(models.clips(["en"])[0].path, one / "en")
    exe = str(Path(sys.executable).parent / "whisper-registry")
    commands = {
        "pyfunc_loop": lambda src, out: [sys.executable, "-c", _PYFUNC_LOOP, logged.uri, str(src), str(out / "texts.json")],
        "command_local": lambda src, out: [exe, "transcribe", logged.uri, str(src), "--output", str(out), "--no-progress"],
        "command_spark": lambda src, out: [exe, "transcribe", logged.uri, str(src), "--output", str(out), "--no-progress",
                                           "--spark", SPARK_MASTER],
    }
    reps = 2 if settings.mode == "full" else 1
    seconds: dict[str, list[float]] = {k: [] for k in commands}
    one_file: dict[str, list[float]] = {k: [] for k in commands}
    texts: dict[str, dict[str, str]] = {}

    def timed_run(way: str, src: Path, out: Path) -> float:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        started = time.perf_counter()
        proc = subprocess.run(commands[way](src, out), capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"batch {way} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        return time.perf_counter() - started

    for rep in range(reps):
        order = list(commands)[rep % 3:] + list(commands)[:rep % 3]
        for way in order:
            log("batch: rep %d/%d %s over %d files, then over one", rep + 1, reps, way, n_files)
            out = scratch / way
            seconds[way].append(timed_run(way, folder, out))
            one_file[way].append(timed_run(way, one, scratch / f"{way}-one"))
            if way == "pyfunc_loop":
                texts[way] = json.loads((out / "texts.json").read_text())
            else:
                frame = pd.read_parquet(out)
                texts[way] = dict(zip(frame["path"], frame["text"]))
    medians = {way: summary(values)["median"] for way, values in seconds.items()}
    starts = {way: summary(values)["median"] for way, values in one_file.items()}
    base = texts["pyfunc_loop"]
    return {
        "model": MODEL, "compute_type": COMPUTE_TYPE, "files": n_files, "reps": reps, "spark_master": SPARK_MASTER,
        "cpu_threads": settings.cpu_threads, "target_spark_over_local_max": TARGET_SPARK_OVER_LOCAL,
        "seconds": {way: summary(values) for way, values in seconds.items()},
        "files_per_s": {way: round(n_files / m, 3) for way, m in medians.items()},
        "one_file_seconds": {way: summary(values) for way, values in one_file.items()},
        "spark_over_local": ratio(medians["command_spark"], medians["command_local"]),
        # Without each way's one-file time (its start-up and one file): the cost of the other files.
        "spark_over_local_beyond_one_file": ratio(medians["command_spark"] - starts["command_spark"],
                                                  medians["command_local"] - starts["command_local"]),
        "local_speedup_over_loop": ratio(medians["pyfunc_loop"], medians["command_local"]),
        "same_text_as_loop": {way: round(sum(texts[way].get(p) == t for p, t in base.items()) / len(base), 3)
                              for way in ("command_local", "command_spark")},
    }
