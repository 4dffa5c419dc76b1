"""Paths, environment, statistics and process measurements shared by every section."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from devkit.offline import OFFLINE

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".bench"  # scratch: tracking store, artifacts, BentoML home, server logs (gitignored)
RESULTS = REPO / "bench" / "results"
TRACKING_DB = WORK / "mlflow.db"
EXPERIMENT = "bench"


@dataclass(frozen=True)
class Settings:
    """How much to measure: ``quick`` is a smoke test (numbers not for reading), ``full`` the record."""

    mode: str
    cpu_threads: int
    reps_short: int  # latency repetitions on a short clip
    reps_long: int  # latency repetitions on the long file
    long_seconds: Optional[float]  # None: the whole >= 2 min file; else its first N seconds
    concurrency_reps: int
    clips_per_client: int
    quant_passes: int  # passes over the clips per quantization (latency median per clip)
    conversion_reps: int
    cold_starts: int
    rss_requests: tuple[int, ...]  # request counts at which the service RSS is sampled
    scaling_shapes: tuple[str, ...]  # checkpoint shapes the scaling section converts
    scaling_reps: int  # conversions per (shape, quantization, converter) below 1 GiB of weights; 1 above

    @classmethod
    def for_mode(cls, quick: bool, cpu_threads: int) -> "Settings":
        if quick:
            return cls("quick", cpu_threads, 2, 1, 30.0, 1, 2, 1, 1, 1, (10, 50), ("tiny", "base"), 1)
        return cls("full", cpu_threads, 7, 5, None, 3, 3, 1, 3, 3, (10, 100, 250, 500, 1000),
                   ("tiny", "base", "small", "medium"), 2)


# Decoding options used by every path in every section: faster-whisper's defaults (beam search
# with beam_size 5, temperature fallback, condition_on_previous_text) with the language forced.
BEAM_SIZE = 5


def decoding_for(language: str) -> dict[str, Any]:
    return {"language": language, "beam_size": BEAM_SIZE}


def setup_environment() -> None:
    """Offline, no telemetry, a private tracking store and BentoML home; children inherit it."""
    WORK.mkdir(exist_ok=True)
    os.environ.update(
        {
            **OFFLINE,
            "MLFLOW_TRACKING_URI": f"sqlite:///{TRACKING_DB}",
            "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
            "BENTOML_HOME": str(WORK / "bentoml"),
        }
    )
    bin_dir = str(Path(sys.executable).parent)
    if not os.environ.get("PATH", "").startswith(bin_dir):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def ensure_experiment() -> str:
    """The benchmark experiment, its artifacts kept under ``.bench/artifacts``."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        (WORK / "artifacts").mkdir(parents=True, exist_ok=True)
        experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(WORK / "artifacts").as_uri())
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


# ------------------------------------------------------------------------------------- statistics


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median (the figure we report), spread, n and the raw values."""
    values = [float(v) for v in values]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": [round(v, 4) for v in values],
    }


def ratio(numerator: float, denominator: float) -> Optional[float]:
    return None if not denominator else numerator / denominator


def interleaved(reps: int, runners: dict[str, Callable[[], Any]], warmup: int = 1) -> dict[str, list[float]]:
    # warmup=0 when the same runners were just warmed on another input.
    """Time each runner ``reps`` times, rotating their order every repetition to cancel drift.

    Returns:
        Seconds per runner name, in repetition order (the warm-up calls are not recorded).
    """
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            started = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - started)
    return times


# ----------------------------------------------------------------------------------- processes


def proc_status_kb(pid: int | str, field: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/<pid>/status`` (VmRSS, VmHWM, ...)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def process_tree_rss(pid: int) -> list[dict[str, Any]]:
    """RSS of a process and all its descendants, from ``/proc/<pid>/status``."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    rows = []
    for proc in procs:
        rss = proc_status_kb(proc.pid, "VmRSS")
        if rss is None:
            continue
        try:
            cmd = " ".join(proc.cmdline())[:160]
        except psutil.Error:
            cmd = "?"
        rows.append({"pid": proc.pid, "rss_bytes": rss * 1024, "cmd": cmd})
    return rows


def dir_size(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


# ------------------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    import psutil

    cpu_model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    info = {
        "cpu_model": cpu_model,
        "logical_cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "simd": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in flags],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "gpu": _gpu(),
        **_ct2_gemm(),
    }
    return info


def _ct2_gemm() -> dict[str, Any]:
    """Whether CTranslate2 multiplies with Intel MKL here: its CPU figures (and greedy texts) differ
    between MKL and the oneDNN/ruy paths. Unless CT2_USE_MKL says otherwise, CTranslate2's
    x86-64 wheels use MKL on GenuineIntel CPUs only (src/cpu/backend.cc, mayiuse_mkl)."""
    vendor = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("vendor_id")), platform.processor())
    forced = os.environ.get("CT2_USE_MKL") or None
    mkl = forced.strip().lower() in ("1", "true", "on", "yes") if forced else vendor == "GenuineIntel"
    return {"cpu_vendor": vendor, "ct2_use_mkl_env": forced, "ct2_mkl": mkl}


def _gpu() -> Optional[str]:
    import ctranslate2

    count = ctranslate2.get_cuda_device_count()
    return f"{count} CUDA device(s)" if count else None


def versions() -> dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("mlflow-faster-whisper", "ctranslate2", "faster-whisper", "mlflow", "bentoml",
                 "torch", "transformers", "numpy", "onnxruntime"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["git_commit"] = _git("rev-parse", "--short", "HEAD")
    out["git_dirty"] = bool(_git("status", "--porcelain"))
    return out


def _git(*args: str) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str))
    os.replace(tmp, path)


def log(message: str, *args: Any) -> None:
    """Progress on stderr (the harness is a CLI: it prints, the library code logs)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] " + (message % args if args else message), file=sys.stderr, flush=True)


def flatten(items: Iterable[Iterable[Any]]) -> list[Any]:
    return [x for group in items for x in group]


def threads_wall(target: Callable[[int], None], count: int) -> float:
    """Runs ``target(0)`` .. ``target(count - 1)`` on a thread each, all at once, and returns the
    wall seconds until the last ends; the first exception any of them raised is raised then."""
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            target(index)
        except BaseException as exc:  # raised after the join
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return wall
