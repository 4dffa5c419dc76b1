"""Logging and saving: convert a Whisper source with CTranslate2 and write it as an MLflow model.

This is the MLflow-facing half of the flavor and imports MLflow; ``loading`` is the half a
serving process needs.
"""

from __future__ import annotations

import os
import shutil
import sys
import typing
from pathlib import Path
from typing import Any, Optional

import mlflow
from mlflow import pyfunc
from mlflow.models import Model, ModelSignature
from mlflow.types.schema import Array, ColSpec, DataType, Object, Property, Schema, TensorSpec
from pydantic import BaseModel

from mlflow_faster_whisper import _mlflow_compat as _mc
from mlflow_faster_whisper import checksums, sources
from mlflow_faster_whisper import constants as c
from mlflow_faster_whisper.conversion import check_quantization, convert
from mlflow_faster_whisper.decoding import DecodingOptions, param_schema
from mlflow_faster_whisper.loading import LOAD_DEFAULTS
from mlflow_faster_whisper.transcription import Transcription

_PACKAGE_DIR = Path(__file__).resolve().parent
_FLAVOR_MODULE = "mlflow_faster_whisper"  # the flavor's public module: MLflow calls its save_model and _load_pyfunc


def get_default_pip_requirements() -> list[str]:
    """What serving a logged model needs: no torch, no transformers."""
    return [_mc._get_pinned_requirement(p) for p in ("mlflow", "ctranslate2", "faster-whisper", "pydantic")]


def get_default_conda_env() -> dict:
    return _mc._mlflow_conda_env(additional_pip_deps=get_default_pip_requirements())


def default_signature(decoding: Optional[DecodingOptions] = None) -> ModelSignature:
    """Input: an ``audio`` column of bytes (base64 in JSON); output: one transcription per row
    (``mlflow.pyfunc.spark_udf`` infers its struct result type from it); params: the decoding
    options."""
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, c.AUDIO_COLUMN)]),
        outputs=output_schema(),
        params=param_schema(decoding),
    )


def output_schema() -> Schema:
    """What ``predict`` returns per row: the fields of ``Transcription`` (all empty on a row whose
    audio could not be decoded) and ``error``."""
    columns: list[ColSpec | TensorSpec] = [
        ColSpec(_spec_type(f.annotation), name, required=False) for name, f in Transcription.model_fields.items()
    ]
    return Schema(columns + [ColSpec(DataType.string, c.ERROR_COLUMN, required=False)])


_SCALARS = {str: DataType.string, float: DataType.double, int: DataType.long, bool: DataType.boolean}


def _spec_type(annotation):
    """The MLflow schema type of a ``Transcription`` field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union:  # Optional[X]
        return _spec_type(args[0])
    if typing.get_origin(annotation) is list:
        return Array(_spec_type(args[0]))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return Object([Property(name, _spec_type(f.annotation), required=f.is_required()) for name, f in annotation.model_fields.items()])
    return _SCALARS[annotation]


def save_model(
    model: Any,
    path: str | os.PathLike,
    *,
    quantization: Optional[str] = None,
    processor: Any = None,
    base_model: Optional[str] = None,
    revision: Optional[str] = None,
    decoding: DecodingOptions | dict | None = None,
    mlflow_model: Optional[Model] = None,
    signature: Optional[ModelSignature] = None,
    input_example: Any = None,
    pip_requirements: Optional[list[str]] = None,
    extra_pip_requirements: Optional[list[str]] = None,
    conda_env: Any = None,
    metadata: Optional[dict[str, Any]] = None,
) -> None:
    """Convert a Whisper source with CTranslate2 and save it as an MLflow model directory.

    Args:
        model: a transformers Whisper checkpoint directory or hub id; an in-memory
            ``WhisperForConditionalGeneration`` (with ``processor``); a PEFT/LoRA adapter
            directory or ``PeftModel`` (with ``base_model``, merged before conversion); a
            ``runs:/``/``models:/`` URI of such a directory; or an existing CTranslate2 Whisper
            directory (validated and saved as is).
        path: the MLflow model directory to create; must not exist or be empty.
        quantization: one of ``QUANTIZATIONS``; default int8 (a CTranslate2 directory: as stored).
        processor: the ``WhisperProcessor`` of an in-memory model.
        base_model: the base checkpoint of an adapter (default: the adapter's own record).
        revision: hub revision for a hub id.
        decoding: the version's default decoding options (dict or ``DecodingOptions``).
        mlflow_model, signature, input_example, pip_requirements, extra_pip_requirements,
            conda_env, metadata: as in every MLflow flavor.

    Raises:
        InvalidSourceError, UnsupportedQuantizationError, DecodingOptionsError: bad arguments;
            nothing is written.
        ConversionError: conversion failed; the partial directory is removed.
    """
    source = sources.resolve_source(model, processor=processor, base_model=base_model, revision=revision)
    quantization = check_quantization(quantization, source)
    decoding = DecodingOptions.parse(decoding)
    _mc._validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    path = os.path.abspath(path)
    _mc._validate_and_prepare_target_save_path(path)
    try:
        _write_model_dir(source, Path(path), quantization, decoding, mlflow_model or Model(), signature, input_example, metadata)
        _mc.write_environment_files(path, conda_env, pip_requirements, extra_pip_requirements, get_default_pip_requirements())
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # a failed save leaves nothing behind
        raise


def _write_model_dir(source, path, quantization, decoding, mlflow_model, signature, input_example, metadata):
    data_dir = path / c.MODEL_DATA_SUBPATH
    converted = convert(source, data_dir, quantization)
    sums = checksums.compute(data_dir)
    mlflow_model.signature = signature or default_signature(decoding)
    if input_example is not None:
        from mlflow.models.utils import _save_example

        _save_example(mlflow_model, input_example, str(path))
    if metadata is not None:
        mlflow_model.metadata = metadata
    code_subpath = _mc._validate_and_copy_code_paths([str(_PACKAGE_DIR)], str(path))
    pyfunc.add_to_model(
        mlflow_model,
        loader_module=_FLAVOR_MODULE,
        data=c.MODEL_DATA_SUBPATH,
        code=code_subpath,
        conda_env=_mc._CONDA_ENV_FILE_NAME,
        python_env=_mc._PYTHON_ENV_FILE_NAME,
        # Declared so mlflow.pyfunc.load_model(uri, model_config={...}) may override them.
        model_config=dict(LOAD_DEFAULTS),
    )
    lineage = source.lineage()
    if lineage[c.SOURCE_RUN_ID] is None and (run := mlflow.active_run()) is not None:
        lineage[c.SOURCE_RUN_ID] = run.info.run_id
    mlflow_model.add_flavor(
        c.FLAVOR_NAME,
        **{
            c.DATA: c.MODEL_DATA_SUBPATH,
            c.QUANTIZATION: converted.quantization,
            c.CTRANSLATE2_VERSION: _version("ctranslate2"),
            c.FASTER_WHISPER_VERSION: _version("faster-whisper"),
            c.TRANSFORMERS_VERSION: converted.transformers_version,
            c.SOURCE: lineage,
            c.CHECKSUMS: sums,
            c.SIZE_BYTES: checksums.total_size(data_dir),
            c.N_MELS: converted.n_mels,
            c.MULTILINGUAL: converted.multilingual,
            c.DECODING: decoding.explicit(),
        },
    )
    mlflow_model.model_size_bytes = checksums.total_size(path)
    mlflow_model.save(str(path / c.MLMODEL_FILE_NAME))


def log_model(
    model: Any,
    name: str = "model",
    *,
    registered_model_name: Optional[str] = None,
    await_registration_for: int = 300,
    params: Optional[dict[str, Any]] = None,
    tags: Optional[dict[str, Any]] = None,
    model_type: Optional[str] = None,
    step: int = 0,
    model_id: Optional[str] = None,
    **save_kwargs: Any,
):
    """Convert and log a Whisper source as an MLflow model; optionally register it.

    Takes ``save_model``'s arguments (``quantization``, ``processor``, ``base_model``,
    ``revision``, ``decoding``, ``signature``, ...). Arguments are validated before MLflow creates
    anything; a conversion that fails midway leaves the logged model marked FAILED and registers
    no version.

    Returns:
        ``mlflow.models.model.ModelInfo`` (``registered_model_version`` set when registered).
    """
    source = sources.resolve_source(
        model,
        processor=save_kwargs.get("processor"),
        base_model=save_kwargs.get("base_model"),
        revision=save_kwargs.get("revision"),
    )
    check_quantization(save_kwargs.get("quantization"), source)
    DecodingOptions.parse(save_kwargs.get("decoding"))
    return Model.log(
        artifact_path=None,
        name=name,
        metadata=save_kwargs.pop("metadata", None),
        flavor=sys.modules[_FLAVOR_MODULE],
        registered_model_name=registered_model_name,
        await_registration_for=await_registration_for,
        params=params,
        tags=tags,
        model_type=model_type,
        step=step,
        model_id=model_id,
        model=source,  # resolved once: a runs:/ source is not downloaded again
        **save_kwargs,
    )


def _version(distribution: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
