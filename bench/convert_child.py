"""One conversion in a fresh process, so its peak RSS is its own: ``python -m bench.convert_child``.

Modes:
  ours CHECKPOINT QUANTIZATION NAME   mlflow_faster_whisper.log_model(..., registered_model_name=NAME),
                                      then alias ``bench`` on the new version
  raw CHECKPOINT QUANTIZATION OUT     ctranslate2 TransformersConverter alone, as its command line
                                      runs it (the floor)
  save CHECKPOINT QUANTIZATION OUT    mlflow_faster_whisper.save_model (conversion, no registry)
  load MODEL_DIR CLIP                 mlflow_faster_whisper.load_model, then one transcription
  merge ADAPTER BASE QUANTIZATION OUT mlflow_faster_whisper.save_model of a LoRA adapter on BASE
  merge_raw ADAPTER BASE OUT          the script it replaces: PEFT merge_and_unload, save_pretrained
                                      (then ``raw`` on OUT, in a process of its own)
  adapter BASE DEST                   write a random LoRA adapter (r=32 on q_proj, v_proj) for BASE
  imports [MODULE ...]                the imports ``ours`` needs (and MODULEs), nothing else (the RSS floor)
  rebuild CT2_DIR DEST                write a transformers checkpoint rebuilt from a CTranslate2 dir
  random SHAPE DEST                   write a random-weight Whisper checkpoint shaped like SHAPE

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

    _imports()  # the same floor as ``save``: the comparison is the conversion alone
    imported = time.perf_counter()
    converter = ctranslate2.converters.TransformersConverter(
        checkpoint, copy_files=["tokenizer.json", "preprocessor_config.json"], low_cpu_mem_usage=True,
        load_as_float16=quantization in ("float16", "int8_float16"),  # as ct2-transformers-converter does
    )
    started = time.perf_counter()
    converter.convert(out, quantization=quantization, force=True)
    seconds = time.perf_counter() - started
    from bench.common import dir_size

    size = dir_size(out)
    shutil.rmtree(out, ignore_errors=True)
    return {"import_s": imported - STARTED, "convert_s": seconds, "size_bytes": size}


def _save(checkpoint: str, quantization: str, out: str) -> dict:
    import mlflow_faster_whisper as mfw
    from bench.common import dir_size

    _imports()
    imported = time.perf_counter()
    mfw.save_model(checkpoint, out, quantization=quantization)
    return {"import_s": imported - STARTED, "convert_s": time.perf_counter() - imported, "size_bytes": dir_size(out)}


def _merge(adapter: str, base: str, quantization: str, out: str) -> dict:
    import mlflow_faster_whisper as mfw
    from bench.common import dir_size

    _imports("peft")
    imported = time.perf_counter()
    mfw.save_model(adapter, out, base_model=base, quantization=quantization)
    return {"import_s": imported - STARTED, "convert_s": time.perf_counter() - imported, "size_bytes": dir_size(out)}


def _merge_raw(adapter: str, base: str, out: str) -> dict:
    import shutil
    from pathlib import Path

    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    _imports("peft")
    imported = time.perf_counter()
    merged = PeftModel.from_pretrained(WhisperForConditionalGeneration.from_pretrained(base), adapter).merge_and_unload()
    merged.save_pretrained(out)
    for name in ("tokenizer.json", "preprocessor_config.json"):  # what ct2-transformers-converter copies
        shutil.copyfile(Path(base) / name, Path(out) / name)
    return {"import_s": imported - STARTED, "convert_s": time.perf_counter() - imported}


def _adapter(base: str, dest: str) -> dict:
    """Random non-zero LoRA weights in the common Whisper recipe (r=32, alpha 64, q_proj and v_proj)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = LoraConfig(r=32, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(WhisperForConditionalGeneration.from_pretrained(base), config).save_pretrained(dest)
    return {}


def _load(model_dir: str, clip: str) -> dict:
    from pathlib import Path

    import mlflow_faster_whisper as mfw
    from bench.common import proc_status_kb
    from mlflow_faster_whisper.audio import decode_audio

    imported = time.perf_counter()
    whisper = mfw.load_model(model_dir, device="cpu")
    loaded = time.perf_counter()
    rss_loaded = (proc_status_kb("self", "VmRSS") or 0) * 1024
    audio = decode_audio(Path(clip).read_bytes())
    # Random weights say nothing sensible: the decode is capped so each size decodes as much.
    segments, _ = whisper.transcribe(audio, beam_size=1, temperature=0.0, max_new_tokens=32, language="en",
                                     without_timestamps=True, condition_on_previous_text=False)
    list(segments)
    return {"import_s": imported - STARTED, "load_s": loaded - imported, "first_transcription_s": time.perf_counter() - loaded,
            "rss_after_load_bytes": rss_loaded}


def _random(shape: str, dest: str) -> dict:
    """A random-weight checkpoint shaped like ``shape`` (devkit.tiny's builder, real tokenizer)."""
    from pathlib import Path

    from bench.sections.scaling import SHAPES
    from devkit import tiny

    tiny.save_whisper(*tiny.tiny_whisper_objects(SHAPES[shape]), Path(dest))
    return {}


def _imports(*extra: str) -> dict:
    import importlib

    import ctranslate2  # noqa: F401
    import mlflow  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import WhisperForConditionalGeneration, WhisperProcessor  # noqa: F401

    import mlflow_faster_whisper  # noqa: F401

    for module in extra:
        importlib.import_module(module)
    return {"import_s": time.perf_counter() - STARTED}


def _rebuild(ct2_dir: str, dest: str) -> dict:
    """Rebuild a transformers checkpoint from a CTranslate2 dir (here, so the harness stays small)."""
    from pathlib import Path

    from devkit import real

    real.rebuild_hf_checkpoint(Path(ct2_dir), Path(dest))
    return {}


def main(argv: list[str]) -> int:
    mode, *args = argv
    result = {"ours": _ours, "raw": _raw, "save": _save, "load": _load, "imports": _imports, "rebuild": _rebuild,
              "random": _random, "merge": _merge, "merge_raw": _merge_raw, "adapter": _adapter}[mode](*args)
    result["process_s"] = time.perf_counter() - STARTED
    result["vmhwm_bytes"] = _vmhwm()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
