"""One conversion in a fresh process, so its peak RSS is its own: ``python -m bench.convert_child``.

Modes:
  ours CHECKPOINT QUANTIZATION NAME   mlflow_faster_whisper.log_model(..., registered_model_name=NAME),
                                      then alias ``bench`` on the new version
  raw CHECKPOINT QUANTIZATION OUT     ctranslate2 TransformersConverter alone (the floor)
  imports                             the imports ``ours`` needs, nothing else (the RSS floor)
  rebuild CT2_DIR DEST                write a transformers checkpoint rebuilt from a CTranslate2 dir

Prints one JSON line: timings and ``vmhwm_bytes`` (VmHWM read by this process at the end).
"""

from __future__ import annotations

import json
import sys
import time

STARTED = time.perf_counter()
ALIAS = "bench"


def _vmhwm() -> int:
    from bench.common import proc_status_kb

    return (proc_status_kb("self", "VmHWM") or 0) * 1024


# Plugin steps whose RSS we record on entry and exit (measurement only; a renamed step is skipped).
_PHASES = (
    ("mlflow_faster_whisper.conversion", "_load_processor"),
    ("mlflow_faster_whisper.conversion", "_run_converter"),
    ("mlflow_faster_whisper.conversion", "_write_processor_files"),
    ("mlflow_faster_whisper.checksums", "compute"),
)


def _trace_phases(marks: list) -> None:
    import importlib

    def mark(label: str) -> None:
        from bench.common import proc_status_kb

        marks.append([round(time.perf_counter() - STARTED, 3), label,
                      (proc_status_kb("self", "VmRSS") or 0) * 1024, (proc_status_kb("self", "VmHWM") or 0) * 1024])

    def wrapped(func, label):
        def call(*args, **kwargs):
            mark(f"> {label}")
            try:
                return func(*args, **kwargs)
            finally:
                mark(f"< {label}")
        return call

    for module_name, attr in _PHASES:
        module = importlib.import_module(module_name)
        if callable(getattr(module, attr, None)):
            setattr(module, attr, wrapped(getattr(module, attr), attr))
    mark("imported")


def _ours(checkpoint: str, quantization: str, name: str) -> dict:
    import mlflow

    import mlflow_faster_whisper as mfw
    from bench.common import ensure_experiment
    from mlflow_faster_whisper import constants as c

    marks: list = []
    _trace_phases(marks)
    imported = time.perf_counter()
    after_imports = _vmhwm()
    ensure_experiment()
    with mlflow.start_run(run_name=f"convert-{name}"):
        started = time.perf_counter()
        info = mfw.log_model(checkpoint, name="model", quantization=quantization, registered_model_name=name)
        seconds = time.perf_counter() - started
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, ALIAS, info.registered_model_version)
    conf = info.flavors[c.FLAVOR_NAME]
    return {
        "import_s": imported - STARTED,
        "vmhwm_after_imports_bytes": after_imports,
        "log_model_s": seconds,
        "model_uri": info.model_uri,
        "registered_model": name,
        "version": str(info.registered_model_version),
        "size_bytes": conf[c.SIZE_BYTES],
        "quantization": conf[c.QUANTIZATION],
        "phases": marks,  # [seconds since start, step, VmRSS, VmHWM]
    }


def _raw(checkpoint: str, quantization: str, out: str) -> dict:
    import shutil

    import ctranslate2

    imported = time.perf_counter()
    converter = ctranslate2.converters.TransformersConverter(
        checkpoint, copy_files=["tokenizer.json", "preprocessor_config.json"], low_cpu_mem_usage=True
    )
    started = time.perf_counter()
    converter.convert(out, quantization=quantization, force=True)
    seconds = time.perf_counter() - started
    from bench.common import dir_size

    size = dir_size(out)
    shutil.rmtree(out, ignore_errors=True)
    return {"import_s": imported - STARTED, "convert_s": seconds, "size_bytes": size}


def _imports() -> dict:
    import ctranslate2  # noqa: F401
    import mlflow  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import WhisperForConditionalGeneration, WhisperProcessor  # noqa: F401

    import mlflow_faster_whisper  # noqa: F401

    return {"import_s": time.perf_counter() - STARTED}


def _rebuild(ct2_dir: str, dest: str) -> dict:
    """Rebuild a transformers checkpoint from a CTranslate2 dir (here, so the harness stays small)."""
    from pathlib import Path

    from tests.fixtures import real

    real.rebuild_hf_checkpoint(Path(ct2_dir), Path(dest))
    return {}


def main(argv: list[str]) -> int:
    mode, *args = argv
    result = {"ours": _ours, "raw": _raw, "imports": _imports, "rebuild": _rebuild}[mode](*args)
    result["process_s"] = time.perf_counter() - STARTED
    result["vmhwm_bytes"] = _vmhwm()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
