"""Whisper source -> CTranslate2 directory faster-whisper can load, offline.

One path for every transformers-shaped source: make it a transformers directory (saving in-memory
models and merging adapters into a temporary one), convert with CTranslate2's
``TransformersConverter``, then write ``tokenizer.json`` and ``preprocessor_config.json`` from
the checkpoint's own processor and check the result.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mlflow_faster_whisper import compute_types, ct2, malloc, sources
from mlflow_faster_whisper.constants import REQUIRED_CT2_FILES
from mlflow_faster_whisper.errors import (
    ConversionError,
    InvalidSourceError,
    UnsupportedQuantizationError,
    extra_imports,
    first_line,
)

_logger = logging.getLogger(__name__)

# CTranslate2's quantizations (its compute types); "none" keeps the checkpoint's dtype.
QUANTIZATIONS = (*compute_types.NAMES, "none")
# The CPU-serving choice: a byte per weight, at nearly float32's error (BENCHMARKS.md section 3).
DEFAULT_QUANTIZATION = "int8"
# Written indented by transformers and CTranslate2; compact, the same content is smaller in every
# copy of the artifact.
_JSON_TO_COMPACT = ("tokenizer.json", "vocabulary.json")


@dataclass(frozen=True)
class ConvertedModel:
    """Facts about a written CTranslate2 directory."""

    quantization: str
    n_mels: int
    multilingual: bool
    transformers_version: Optional[str]


def check_quantization(quantization: Optional[str], source: sources.WhisperSource) -> Optional[str]:
    """Validate the requested quantization for a source; None means the default for that source.

    Raises:
        UnsupportedQuantizationError: a name CTranslate2 does not know.
    """
    if quantization is None:
        return None if source.kind == sources.CTRANSLATE2 else DEFAULT_QUANTIZATION
    return quantization_name(quantization)


def quantization_name(quantization: str) -> str:
    """``quantization`` as CTranslate2 names it ("INT8 " -> "int8").

    Raises:
        UnsupportedQuantizationError: a name CTranslate2 does not know.
    """
    name = str(quantization).strip().lower()
    if name not in QUANTIZATIONS:
        raise UnsupportedQuantizationError(f"Unknown quantization {quantization!r}. Use one of: {', '.join(QUANTIZATIONS)}.")
    return name


def convert(source: sources.WhisperSource, output_dir: Path, quantization: Optional[str]) -> ConvertedModel:
    """Write the CTranslate2 model for ``source`` into ``output_dir`` (which must not exist).

    Raises:
        InvalidSourceError: the source cannot be loaded as Whisper (adapter/base mismatch, ...).
        ConversionError: CTranslate2 failed or wrote a model faster-whisper cannot use.
    """
    if source.kind == sources.CTRANSLATE2:
        return _copy_ct2(Path(source.model), output_dir, check_quantization(quantization, source))
    quantization = check_quantization(quantization, source) or DEFAULT_QUANTIZATION  # never None past a CT2 copy
    check_memory(source)
    # torch, transformers (and peft) come with the convert extra: a missing one is named with it.
    with tempfile.TemporaryDirectory(prefix="mlflow-faster-whisper-") as tmp, malloc.big_blocks_mapped(), extra_imports():
        checkpoint, processor, merged = _transformers_checkpoint(source, Path(tmp))
        _check_mel_bins(checkpoint, processor, source.revision)
        converter = _converter(checkpoint, quantization, source.revision, processor.tokenizer, merged)
        del merged  # the converter's now: it frees each float tensor once quantized
        _run_converter(converter, source.model if isinstance(source.model, str) else checkpoint, output_dir, quantization)
    _write_processor_files(processor, output_dir)
    for name in _JSON_TO_COMPACT:
        _compact_json(output_dir / name)
    return _inspect(output_dir, quantization)


# A conversion's peak memory, with a margin over the peaks measured from tiny to medium shapes with
# or without an adapter (BENCHMARKS.md sections 4b, 4c): safetensors weights are read once
# (``lowmem``); other weight files load through ``from_pretrained`` (memory-mapped, copied on
# write); the imports (torch, transformers) count where they are not loaded yet.
_PEAK_PER_SAFETENSORS_BYTE = 1.1
_PEAK_PER_OTHER_WEIGHT_BYTE = 1.5
_FIXED_BYTES = 300 << 20
_IMPORT_FLOOR_BYTES = 600 << 20
_WEIGHT_FILES = ("model*.safetensors", "pytorch_model*.bin", "adapter_model.*")
# Set to 0 to convert even when the estimate says the memory here is too small.
MEMORY_CHECK_ENV = "MLFLOW_FASTER_WHISPER_MEMORY_CHECK"


def check_memory(source: sources.WhisperSource) -> None:
    """Refuse, before loading anything, a local checkpoint whose conversion would not fit the
    memory available here (the OOM killer would end the process with no message).

    Raises:
        ConversionError: naming the estimated need, the memory available and the fixes.
    """
    if os.environ.get(MEMORY_CHECK_ENV, "1") == "0":
        return
    folders = [source.model, source.base_model] if source.kind == sources.PEFT else [source.model]
    local = [Path(f) for f in folders if isinstance(f, str) and Path(f).is_dir()]
    if source.kind not in (sources.TRANSFORMERS, sources.PEFT) or len(local) != len(folders):
        return  # weights in memory already, or behind a hub id: their size is not known here
    files = [f for d in local for pattern in _WEIGHT_FILES for f in d.glob(pattern)]
    weights = sum(f.stat().st_size for f in files)
    need = sum(
        f.stat().st_size * (_PEAK_PER_SAFETENSORS_BYTE if f.suffix == ".safetensors" else _PEAK_PER_OTHER_WEIGHT_BYTE) for f in files
    )
    need += _FIXED_BYTES + (0 if "torch" in sys.modules else _IMPORT_FLOOR_BYTES)
    available = available_memory_bytes()
    if available is not None and need > available:
        gib = 1 << 30
        raise ConversionError(
            f"Converting {source.model} needs about {need / gib:.1f} GiB of memory ({weights / gib:.1f} GiB of "
            f"weights), but {available / gib:.1f} GiB is available here. Free memory, or convert on a machine with "
            f"more (the converted model serves in far less); set {MEMORY_CHECK_ENV}=0 to try anyway."
        )


def available_memory_bytes() -> Optional[int]:
    """What this process may still allocate: the system's MemAvailable, or less under a cgroup
    (container) memory limit; None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    for limit, usage in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            cap = Path("/sys/fs/cgroup", limit).read_text().strip()
            if cap.isdigit() and int(cap) < 1 << 60:
                found.append(int(cap) - int(Path("/sys/fs/cgroup", usage).read_text()))
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def _transformers_checkpoint(source: sources.WhisperSource, tmp: Path) -> tuple[str, Any, Any]:
    """A directory or hub id TransformersConverter can load, the checkpoint's processor, and the
    model merged here from an adapter on disk (None otherwise), to convert as it is in memory."""
    if source.kind in (sources.TRANSFORMERS, sources.HUB):
        return source.model, _load_processor(source.model, source.revision), None
    if source.kind == sources.IN_MEMORY:
        return _save_checkpoint(source.model, source.processor, tmp / "checkpoint"), source.processor, None
    model, processor = _merge_adapter(source)
    if not isinstance(source.model, str):  # a copy of the caller's PeftModel, on its device: saved, read back
        return _save_checkpoint(model, processor, tmp / "checkpoint"), processor, None
    config_dir = tmp / "config"
    model.config.save_pretrained(config_dir)  # all the converter reads from disk besides the model
    return str(config_dir), processor, model


def _base_of(source: sources.WhisperSource) -> str:
    """The base checkpoint an adapter applies to (sources sets it wherever one is read)."""
    if not source.base_model:
        raise InvalidSourceError("The adapter does not name its base model: pass base_model=<checkpoint dir or hub id>.")
    return source.base_model


def _merge_adapter(source: sources.WhisperSource) -> tuple[Any, Any]:
    """Load the base, apply the adapter and fold its weights in (CT2 cannot convert LoRA layers).
    A local safetensors base is read into memory once (``lowmem``) and merged in place. The
    processor is loaded first: its tokenizer peaks above what it keeps while it loads, which
    would otherwise land on top of the base's weights."""
    from peft import PeftModel

    processor = source.processor
    on_disk = isinstance(source.model, str)
    if processor is None and on_disk and (Path(source.model) / "preprocessor_config.json").is_file():
        processor = _load_processor(source.model, None)
    if processor is None:
        processor = _load_processor(_base_of(source), source.revision)
    if not on_disk:  # the caller's, merged in a copy: merge_and_unload strips the LoRA layers it is called on
        return copy.deepcopy(source.model).merge_and_unload(), processor
    base = _load_base(_base_of(source), source.revision)
    try:
        peft_model = PeftModel.from_pretrained(base, source.model)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise InvalidSourceError(
            f"The adapter at {source.model} does not fit the base model {source.base_model}: "
            f"{first_line(exc)}. Pass base_model= the checkpoint the adapter was trained on."
        ) from None
    return peft_model.merge_and_unload(), processor


def _load_base(name_or_path: str, revision: Optional[str]) -> Any:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from mlflow_faster_whisper import lowmem

    if not revision and Path(name_or_path).is_dir():
        config = _load(WhisperConfig.from_pretrained, name_or_path, None)
        try:
            model = lowmem.load_pretrained(WhisperForConditionalGeneration, name_or_path, config)
        except ValueError as exc:
            raise InvalidSourceError(f"Could not load the base model {name_or_path!r}: {first_line(exc)}") from None
        if model is not None:
            return model
    return _load(WhisperForConditionalGeneration.from_pretrained, name_or_path, revision)


def _save_checkpoint(model: Any, processor: Any, target: Path) -> str:
    # The converter reads the vocabulary and language ids from the tokenizer beside the weights;
    # save_pretrained of a model (merged or not) writes no tokenizer.
    model.save_pretrained(target)
    processor.save_pretrained(target)
    processor.feature_extractor.save_pretrained(target)
    return str(target)


def _load_processor(name_or_path: str, revision: Optional[str]):
    from transformers import WhisperProcessor

    return _load(WhisperProcessor.from_pretrained, name_or_path, revision)


def _load(loader, name_or_path: str, revision: Optional[str]):
    kwargs = {"revision": revision} if revision else {}
    try:
        return loader(name_or_path, **kwargs)
    except OSError as exc:
        raise InvalidSourceError(
            f"Could not load {name_or_path!r}: {first_line(exc)}. Pass a local checkpoint directory, "
            "or make the hub reachable (HF_HUB_OFFLINE unset) for a hub id."
        ) from None


def _check_mel_bins(checkpoint: str, processor: Any, revision: Optional[str]) -> None:
    # A 128-mel (large-v3 style) model with an 80-mel feature extractor converts fine and then
    # transcribes garbage: refuse it here.
    from transformers import WhisperConfig

    config = _load(WhisperConfig.from_pretrained, checkpoint, revision)
    feature_size = processor.feature_extractor.feature_size
    if config.num_mel_bins != feature_size:
        raise InvalidSourceError(
            f"The model expects {config.num_mel_bins} mel bins but its feature extractor makes "
            f"{feature_size}: save the feature extractor that belongs to this checkpoint."
        )


def _converter(checkpoint: str, quantization: str, revision: Optional[str], tokenizer: Any, model: Any) -> Any:
    from mlflow_faster_whisper import lowmem

    row = compute_types.get(quantization)
    return lowmem.Converter(
        checkpoint,
        revision=revision,
        low_cpu_mem_usage=True,
        tokenizer=tokenizer,
        model=model,
        load_as_float16=row is not None and row.load_as_float16,
    )


def _run_converter(converter: Any, name: str, output_dir: Path, quantization: str) -> None:
    try:
        converter.convert(str(output_dir), quantization=None if quantization == "none" else quantization)
    except Exception as exc:
        shutil.rmtree(output_dir, ignore_errors=True)
        raise ConversionError(f"CTranslate2 could not convert {name}: {first_line(exc)}") from exc


def _write_processor_files(processor: Any, output_dir: Path) -> None:
    """Write the files faster-whisper reads beside model.bin (it goes to the hub without them)."""
    with tempfile.TemporaryDirectory() as tmp:
        processor.tokenizer.save_pretrained(tmp)
        processor.feature_extractor.save_pretrained(tmp)
        for name in ("tokenizer.json", "preprocessor_config.json"):
            if not (Path(tmp) / name).is_file():
                raise ConversionError(
                    f"The processor did not produce {name}; use a fast Whisper tokenizer "
                    "(WhisperTokenizerFast) and a WhisperFeatureExtractor."
                )
            shutil.copyfile(Path(tmp) / name, output_dir / name)


def _compact_json(path: Path) -> None:
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def _copy_ct2(source_dir: Path, output_dir: Path, quantization: Optional[str]) -> ConvertedModel:
    """Validate an existing CTranslate2 directory and copy it as is."""
    missing = [f for f in ("model.bin", "config.json", "tokenizer.json") if not (source_dir / f).is_file()]
    if missing:
        raise InvalidSourceError(
            f"The CTranslate2 directory {source_dir} lacks {', '.join(missing)}. Copy tokenizer.json "
            "from the original checkpoint (or convert with copy_files=['tokenizer.json', "
            "'preprocessor_config.json']): faster-whisper would otherwise fetch it from the hub."
        )
    stored = ct2.stored_quantization(source_dir)
    row = compute_types.get(quantization)
    if quantization is not None and (row.stored_as if row else quantization) != stored:
        raise UnsupportedQuantizationError(
            f"{source_dir} is stored as {stored} and a CTranslate2 directory is logged as is: "
            f"pass quantization=None, or convert the transformers checkpoint to {quantization}."
        )
    shutil.copytree(source_dir, output_dir)
    if not (output_dir / "preprocessor_config.json").is_file():
        _write_default_feature_extractor(output_dir)
    return _inspect(output_dir, stored)


def _write_default_feature_extractor(output_dir: Path) -> None:
    # The standard Whisper feature extractor, with the mel count the model itself was built for.
    import ctranslate2

    n_mels = ctranslate2.models.Whisper(str(output_dir), device="cpu").n_mels
    _logger.info("No preprocessor_config.json in the CTranslate2 directory: writing the standard %d-mel one", n_mels)
    config = {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": n_mels,
        "sampling_rate": 16000,
        "hop_length": 160,
        "chunk_length": 30,
        "n_fft": 400,
        "n_samples": 480000,
        "nb_max_frames": 3000,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
        "processor_class": "WhisperProcessor",
    }
    (output_dir / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def _inspect(output_dir: Path, quantization: str) -> ConvertedModel:
    missing = [f for f in REQUIRED_CT2_FILES if not (output_dir / f).is_file()]
    if missing:
        raise ConversionError(f"The converted model lacks {', '.join(missing)}.")
    multilingual = ct2.is_multilingual(output_dir)
    if multilingual and not ct2.lang_ids(output_dir):
        raise ConversionError(
            "The converted multilingual model has no language ids (config.json lang_ids is empty), "
            "so language detection would crash. The checkpoint's generation_config.json lacks "
            "lang_to_id: it was probably saved with _from_model_config=true. Save the model with the "
            "generation config of the original Whisper checkpoint (lang_to_id, task_to_id, alignment_heads)."
        )
    _check_vocabulary(output_dir)
    feature_size = json.loads((output_dir / "preprocessor_config.json").read_text())["feature_size"]
    return ConvertedModel(
        quantization=quantization,
        n_mels=int(feature_size),
        multilingual=multilingual,
        transformers_version=_transformers_version(),
    )


def _check_vocabulary(output_dir: Path) -> None:
    """The special tokens must sit at the same ids in model vocabulary and tokenizer.json."""
    tokenizer = json.loads((output_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocabulary = ct2.vocabulary(output_dir)
    for token in tokenizer.get("added_tokens", []):
        index = token["id"]
        if index < len(vocabulary) and vocabulary[index] != token["content"]:
            raise ConversionError(
                f"The converted vocabulary has {vocabulary[index]!r} at id {index} where the tokenizer has "
                f"{token['content']!r}: the tokenizer saved with the checkpoint does not belong to it."
            )


def _transformers_version() -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return None
