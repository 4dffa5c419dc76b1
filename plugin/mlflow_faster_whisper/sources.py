"""What ``log_model`` was given, resolved to one of five kinds of Whisper source.

Resolution is cheap (file checks, no weights loaded) so bad input is refused before MLflow
creates a logged model or a run artifact.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mlflow_faster_whisper.errors import InvalidSourceError

TRANSFORMERS = "transformers"  # a local transformers checkpoint directory
HUB = "hub"  # a model hub id, resolved by transformers
IN_MEMORY = "in_memory"  # a WhisperForConditionalGeneration (+ processor) object
PEFT = "peft"  # a PEFT/LoRA adapter (directory or PeftModel) merged into its base
CTRANSLATE2 = "ctranslate2"  # an existing CTranslate2 Whisper directory, logged as is


@dataclass(frozen=True)
class WhisperSource:
    """A resolved source. ``model`` is a path/hub id (str) or an in-memory object."""

    kind: str
    model: Any
    processor: Any = None
    base_model: Optional[str] = None
    adapter: Optional[str] = None
    revision: Optional[str] = None
    run_id: Optional[str] = None
    origin: Optional[str] = None  # the runs:/ or models:/ URI a directory was downloaded from

    def lineage(self) -> dict[str, Optional[str]]:
        """The source lineage recorded in the flavor configuration."""
        from mlflow_faster_whisper import constants as c

        path = self.origin or (self.model if isinstance(self.model, str) else None)
        return {
            c.SOURCE_KIND: self.kind,
            c.SOURCE_PATH: path,
            c.SOURCE_BASE_MODEL: self.base_model,
            c.SOURCE_ADAPTER: self.origin if self.kind == PEFT and self.origin else self.adapter,
            c.SOURCE_REVISION: self.revision,
            c.SOURCE_RUN_ID: self.run_id,
        }


def resolve_source(
    model: Any,
    *,
    processor: Any = None,
    base_model: Optional[str] = None,
    revision: Optional[str] = None,
) -> WhisperSource:
    """Classify ``model`` and check it can be a Whisper source.

    Args:
        model: a directory (transformers, PEFT adapter or CTranslate2), a hub id, an
            ``mlflow-artifacts``/``runs:/``/``models:/`` URI of such a directory, or an in-memory
            ``WhisperForConditionalGeneration`` / ``PeftModel``.
        processor: the ``WhisperProcessor`` for an in-memory model (optional for a PeftModel
            whose base is given as a directory or hub id).
        base_model: the base checkpoint an adapter applies to (directory or hub id). Defaults to
            the adapter's ``base_model_name_or_path``.
        revision: hub revision for hub ids.

    Raises:
        InvalidSourceError: the input is not a Whisper checkpoint, adapter or CT2 directory.
    """
    if isinstance(model, WhisperSource):  # resolved already (and downloaded, for a URI)
        return model
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str):
        return _in_memory_source(model, processor, base_model)
    if _is_mlflow_uri(model):
        source = _directory_source(_download(model), base_model, _run_id_of(model))
        return dataclasses.replace(source, origin=model)
    if os.path.isdir(model):
        return _directory_source(model, base_model, None)
    if os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise InvalidSourceError(
            f"{model!r} is not a directory. Pass a Whisper checkpoint directory, a PEFT adapter "
            "directory, a CTranslate2 Whisper directory, or a model hub id such as 'openai/whisper-small'."
        )
    return WhisperSource(kind=HUB, model=model, revision=revision, base_model=model)


def _directory_source(path: str, base_model: Optional[str], run_id: Optional[str]) -> WhisperSource:
    root = Path(path)
    if (root / "adapter_config.json").is_file():
        adapter_config = _read_json(root / "adapter_config.json")
        base = base_model or adapter_config.get("base_model_name_or_path")
        if not base:
            raise InvalidSourceError(f"The adapter at {path} does not name its base model: pass base_model=<checkpoint dir or hub id>.")
        return WhisperSource(kind=PEFT, model=path, base_model=str(base), adapter=path, run_id=run_id)
    if (root / "model.bin").is_file():
        return WhisperSource(kind=CTRANSLATE2, model=path, run_id=run_id)
    if not (root / "config.json").is_file():
        raise InvalidSourceError(
            f"{path} holds no config.json, model.bin or adapter_config.json: it is not a Whisper "
            "checkpoint, a CTranslate2 model or a PEFT adapter."
        )
    model_type = _read_json(root / "config.json").get("model_type")
    if model_type != "whisper":
        raise InvalidSourceError(
            f"{path} is a {model_type!r} checkpoint, not Whisper: log a "
            "WhisperForConditionalGeneration checkpoint (config.json model_type 'whisper')."
        )
    return WhisperSource(kind=TRANSFORMERS, model=path, base_model=path, run_id=run_id)


def _in_memory_source(model: Any, processor: Any, base_model: Optional[str]) -> WhisperSource:
    class_name = type(model).__name__
    if class_name in ("PeftModel", "PeftModelForSeq2SeqLM"):
        base = base_model or getattr(model.peft_config.get("default"), "base_model_name_or_path", None)
        inner = model.get_base_model()
        if type(inner).__name__ != "WhisperForConditionalGeneration":
            raise InvalidSourceError(f"The PeftModel wraps a {type(inner).__name__}, not a WhisperForConditionalGeneration.")
        if processor is None and not base:
            raise InvalidSourceError("Pass processor=WhisperProcessor(...) with an in-memory PeftModel.")
        return WhisperSource(kind=PEFT, model=model, processor=processor, base_model=base)
    if class_name != "WhisperForConditionalGeneration":
        raise InvalidSourceError(
            f"Cannot log a {class_name}: pass a WhisperForConditionalGeneration (with its "
            "WhisperProcessor), a PeftModel on one, or a checkpoint/adapter/CTranslate2 directory."
        )
    if processor is None:
        raise InvalidSourceError("An in-memory Whisper model needs its processor: pass processor=WhisperProcessor.from_pretrained(...).")
    base = base_model or getattr(model.config, "_name_or_path", None) or None
    return WhisperSource(kind=IN_MEMORY, model=model, processor=processor, base_model=base)


def _is_mlflow_uri(value: str) -> bool:
    return value.startswith(("runs:/", "models:/", "mlflow-artifacts:/"))


def _run_id_of(uri: str) -> Optional[str]:
    if uri.startswith("runs:/"):
        return uri[len("runs:/") :].split("/", 1)[0]
    return None


def _download(uri: str) -> str:
    import mlflow

    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except Exception as exc:
        raise InvalidSourceError(f"Could not download {uri}: {exc}") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidSourceError(f"{path} is not readable JSON: {exc}") from None
