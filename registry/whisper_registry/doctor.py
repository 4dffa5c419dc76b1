"""What this machine can run a faster-whisper model on, checked for real.

``doctor`` reports the runtime facts of ``mlflow_faster_whisper.devices`` (CUDA devices, driver,
compute types per device, where cuBLAS 12 was found, library versions) and, given a model, loads
it on every device there is and transcribes one second of audio on each, timed. A device that
cannot load or run the model is reported with the error, not raised: the doctor is what a user
runs when something is wrong.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from mlflow_faster_whisper import constants as c
from mlflow_faster_whisper import devices, transcription
from mlflow_faster_whisper.decoding import DecodingOptions

SMOKE_SECONDS = 1.0


@dataclass(frozen=True)
class Smoke:
    """One device's smoke transcription: how it was placed, how long it took, or why it failed."""

    device: str
    ok: bool
    compute_type: Optional[str] = None
    load_s: Optional[float] = None
    transcribe_s: Optional[float] = None
    text: Optional[str] = None
    error: Optional[str] = None


def doctor(model_uri: Optional[str] = None) -> dict[str, Any]:
    """The runtime facts, plus one smoke transcription per device when ``model_uri`` is given.

    Returns:
        ``devices.runtime_facts()`` with ``smoke``: a list of ``Smoke`` dicts (empty without a model),
        and ``ok``: False when any smoke transcription failed.
    """
    facts = devices.runtime_facts()
    smokes: list[Smoke] = []
    if model_uri is not None:
        local_path = _local_copy(model_uri)
        targets = ["cpu"] + (["cuda"] if facts["cuda_device_count"] else [])
        smokes = [_smoke(local_path, device) for device in targets]
    facts["model_uri"] = model_uri
    facts["smoke"] = [asdict(s) for s in smokes]
    facts["ok"] = all(s.ok for s in smokes)
    return facts


def _local_copy(model_uri: str) -> str:
    import os

    if os.path.isdir(model_uri):
        return model_uri
    from mlflow_faster_whisper._mlflow_compat import _download_artifact_from_uri

    return _download_artifact_from_uri(artifact_uri=model_uri)


def _smoke(local_path: str, device: str) -> Smoke:
    import mlflow_faster_whisper as mfw

    try:
        started = time.perf_counter()
        # LoadOptions' defaults, the one policy: what `bentoml serve` runs on this device.
        model = mfw.load_model(local_path, device=device)
        loaded = time.perf_counter()
        result = transcription.transcribe(model, _smoke_audio(), DecodingOptions.parse({"beam_size": 1, "temperature": 0}))
        done = time.perf_counter()
    except Exception as exc:  # noqa: BLE001 - the doctor reports every failure, whatever its type
        return Smoke(device=device, ok=False, error=f"{type(exc).__name__}: {exc}")
    return Smoke(
        device=device,
        ok=True,
        compute_type=model.model.compute_type,
        load_s=round(loaded - started, 3),
        transcribe_s=round(done - loaded, 3),
        text=result.text,
    )


def _smoke_audio() -> np.ndarray:
    """One second of a quiet 440 Hz tone at 16 kHz: enough to run the encoder and decoder once."""
    t = np.arange(int(SMOKE_SECONDS * c.SAMPLE_RATE), dtype=np.float32) / c.SAMPLE_RATE
    return (0.1 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)


def format_report(facts: dict[str, Any]) -> list[str]:
    """The report as lines of text, for the CLI."""
    cublas = facts["cublas"]
    lines = [
        f"ctranslate2 {facts['ctranslate2']}, faster-whisper {facts['faster_whisper']}, python {facts['python']}",
        f"NVIDIA driver: {facts['driver'] or 'none found'}",
        f"CUDA devices: {facts['cuda_device_count']}",
    ]
    for d in facts["devices"]:
        name = f" ({d['name']})" if d.get("name") else ""
        lines.append(f"  {d['device']}{name}: {', '.join(d['compute_types'])}")
    if cublas["found"]:
        lines.append(f"cuBLAS 12: found ({cublas['source']}: {cublas['path']})")
    else:
        lines.append(f"cuBLAS 12: not found ({cublas['detail']})")
    if facts["model_uri"] is None:
        lines.append("smoke transcription: skipped (give --model MODEL_URI to load and run a model on each device)")
    for s in facts["smoke"]:
        if s["ok"]:
            lines.append(
                f"smoke {s['device']} {s['compute_type']}: ok, load {s['load_s']:.2f} s, "
                f"{SMOKE_SECONDS:.0f} s of audio in {s['transcribe_s']:.2f} s"
            )
        else:
            lines.append(f"smoke {s['device']}: FAILED {s['error']}")
    return lines
