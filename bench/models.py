"""The models and audio the benchmark runs on, prepared once into ``.bench/``.

Models are real Whisper weights (shared/FIXTURES.md): openai/whisper-base and whisper-tiny.en,
each as a transformers float32 checkpoint rebuilt exactly from its CTranslate2 release, logged
with our flavor per quantization into the benchmark's own tracking store and registered as
``bench-<model>-<quantization>`` with the alias ``bench``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bench.common import REPO, WORK, dir_size, log

MODELS = ("base", "tiny_en")
ALIAS = "bench"
SAMPLE_RATE = 16000


def checkpoint(model: str) -> Path:
    """The float32 transformers checkpoint of ``model`` (rebuilt from the CTranslate2 release)."""
    from devkit import real

    if model == "base":
        return real.whisper_base_hf()
    if model == "tiny_en":
        target = WORK / "fixtures" / "whisper-tiny-en-hf"
        if not (target / "model.safetensors").is_file():
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            run_child(["rebuild", str(real.whisper_tiny_en_ct2()), str(tmp)], "rebuild-tiny-en")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        return target
    raise ValueError(f"Unknown model {model!r}; use one of {', '.join(MODELS)}.")


def checkpoint_weights_bytes(model: str) -> int:
    """Size of the float32 checkpoint's weight files (what model.bin is compared with)."""
    path = checkpoint(model)
    return dir_size(path, "*.safetensors") or dir_size(path, "*.bin")


def checkpoint_bytes(model: str) -> int:
    """Size of the whole float32 checkpoint directory: weights, tokenizer and configs, as the
    artifact's model/ directory holds model.bin, tokenizer, vocabulary and configs."""
    return dir_size(checkpoint(model), "*")


def registered_name(model: str, quantization: str) -> str:
    return f"bench-{model.replace('_', '-')}-{quantization.replace('_', '-')}"


@dataclass(frozen=True)
class LoggedModel:
    name: str
    version: str
    uri: str  # models:/NAME@bench
    local_dir: Path  # the MLflow model directory
    size_bytes: int
    quantization: str

    @property
    def data_dir(self) -> Path:
        return self.local_dir / "model"


def run_child(args: list[str], log_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``bench.convert_child`` in a fresh process.

    Returns:
        (its JSON result with the child's own VmHWM, what the parent measured: wall seconds).
    """
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{log_name}.out", logs / f"{log_name}.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "bench.convert_child", *args], cwd=REPO, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = err_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"bench.convert_child {' '.join(args)} failed ({proc.returncode}):\n{tail}")
    result = json.loads(out_path.read_text().strip().splitlines()[-1])
    # ru_maxrss is kept for reference only: it includes the forked parent's high-water mark.
    return result, {"wall_s": wall, "ru_maxrss_bytes": usage.ru_maxrss * 1024}


def ensure_logged(model: str, quantization: str) -> LoggedModel:
    """The registered ``bench`` version of (model, quantization); converts and logs it if missing."""
    name = registered_name(model, quantization)
    found = _lookup(name)
    if found is None:
        log("Logging %s (%s) with our flavor ...", model, quantization)
        run_child(["ours", str(checkpoint(model)), quantization, name], f"ensure-{name}")
        found = _lookup(name)
        if found is None:
            raise RuntimeError(f"{name}@{ALIAS} is missing right after logging it")
    return found


def _lookup(name: str) -> Optional[LoggedModel]:
    import mlflow
    from mlflow.exceptions import MlflowException

    import mlflow_faster_whisper as mfw
    from mlflow_faster_whisper import constants as c

    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None
    uri = f"models:/{name}@{ALIAS}"
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}"))
    conf = mfw.flavor_config(str(local))
    return LoggedModel(name, str(version.version), uri, local, int(conf[c.SIZE_BYTES]), conf[c.QUANTIZATION])


# ------------------------------------------------------------------------------------------ audio


@dataclass(frozen=True)
class Audio:
    """A WAV file with its reference, as bytes (what every path receives) and as samples."""

    name: str
    path: Path
    language: str
    reference: str

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()

    @property
    def seconds(self) -> float:
        from devkit.audio import read_wav

        samples, rate = read_wav(self.path)
        return len(samples) / rate


def clips(languages: Optional[list[str]] = None) -> list[Audio]:
    from devkit import real

    return [Audio(f"{c.language}/{c.name}", c.path, c.language, c.text) for c in real.speech_clips(languages)]


def clip(name: str) -> Audio:
    """A clip by its file name (``hello_world``) or ``<language>/<name>``."""
    for audio in clips():
        if name in (audio.name, audio.name.split("/", 1)[1]):
            return audio
    raise ValueError(f"No speech clip named {name!r}")


def long_audio(seconds: Optional[float]) -> Audio:
    """The >= 2 min English file of interleaved real clips, or its first ``seconds`` (cut in a gap)."""
    from devkit import real
    from devkit.audio import read_wav, write_wav

    path = real.long_speech(min_seconds=120)
    segments = json.loads(path.with_suffix(".json").read_text())
    if seconds is not None:
        kept = [s for s in segments if s["end"] <= seconds] or segments[:1]
        cut = kept[-1]["end"] + 1.0  # inside the silence after the last kept clip
        target = WORK / "audio" / f"long_speech_{int(cut)}s.wav"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            samples, _ = read_wav(path)
            write_wav(target, samples[: int(cut * SAMPLE_RATE)].astype(np.float32))
        path, segments = target, kept
    reference = " ".join(s["text"] for s in segments)
    return Audio(path.stem, path, "en", reference)
