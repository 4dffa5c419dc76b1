"""Loading: a logged ``faster_whisper`` model as a ``faster_whisper.WhisperModel`` or a pyfunc.

A local model directory (a download, a bento's copy) is read without importing MLflow; only a
URI (``models:/``, ``runs:/``, ...) imports it, to resolve and download.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from mlflow_faster_whisper import checksums, devices
from mlflow_faster_whisper import constants as c
from mlflow_faster_whisper.decoding import DecodingOptions
from mlflow_faster_whisper.errors import FasterWhisperFlavorError

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

    from mlflow_faster_whisper.wrapper import FasterWhisperPyfunc

# How the pyfunc loads the model; mlflow.pyfunc.load_model(..., model_config=...) overrides them.
LOAD_DEFAULTS = devices.LoadOptions().model_dump()


def flavor_config(model_uri: str) -> dict[str, Any]:
    """The ``faster_whisper`` flavor configuration of a model, read from its MLmodel only."""
    if os.path.isdir(model_uri):
        return _local_flavor_config(Path(model_uri))
    from mlflow.models import Model

    # Model.load, not get_model_info: the latter also fetches the logged model from the tracking
    # server, which a copy of the model must not need.
    return _flavor_of(Model.load(model_uri).flavors, model_uri)


def _local_flavor_config(model_dir: Path) -> dict[str, Any]:
    """The flavor configuration in a model directory's MLmodel file."""
    import yaml

    mlmodel = model_dir / c.MLMODEL_FILE_NAME
    if not mlmodel.is_file():
        raise FasterWhisperFlavorError(
            f"{model_dir} is not an MLflow model directory (it has no {c.MLMODEL_FILE_NAME}); "
            "pass the directory log_model or save_model wrote."
        )
    return _flavor_of(yaml.safe_load(mlmodel.read_text()).get("flavors") or {}, str(model_dir))


def _flavor_of(flavors: dict[str, Any], model_uri: str) -> dict[str, Any]:
    if c.FLAVOR_NAME not in flavors:
        raise FasterWhisperFlavorError(
            f"{model_uri} has no {c.FLAVOR_NAME} flavor (flavors: {', '.join(flavors)}); log it with mlflow_faster_whisper.log_model."
        )
    return flavors[c.FLAVOR_NAME]


def load_model(model_uri: str, dst_path: Optional[str] = None, **load: Any) -> WhisperModel:
    """Load a logged model as a ``faster_whisper.WhisperModel``, after verifying its checksums.

    Args:
        model_uri: ``models:/name@alias``, ``models:/name/version``, ``runs:/...``, a path, ...
        dst_path: where to download the artifacts (a local directory without ``dst_path`` is
            loaded in place).
        **load: ``devices.LoadOptions``: ``device`` ("auto": CUDA when a GPU and cuBLAS 12 are
            there, else CPU; "cpu"; "cuda"), ``compute_type`` ("default": the stored quantization;
            a type the device cannot run falls back, with a warning), ``cpu_threads``,
            ``num_workers`` (as in ``faster_whisper.WhisperModel``).

    Raises:
        LoadOptionsError: an unknown or invalid load option.
        ChecksumError: a file is missing, extra or modified.
        DeviceError: ``device="cuda"`` with no visible GPU or no cuBLAS 12.
    """
    options = devices.LoadOptions.parse(load)
    if os.path.isdir(model_uri) and dst_path is None:
        local_path = str(model_uri)
    else:
        from mlflow_faster_whisper._mlflow_compat import _download_artifact_from_uri

        local_path = _download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path)
    return _load_local(local_path, _local_flavor_config(Path(local_path)), options)


def _load_local(local_path: str, conf: dict[str, Any], options: devices.LoadOptions) -> WhisperModel:
    from faster_whisper import WhisperModel

    data_dir = Path(local_path) / conf[c.DATA]
    checksums.verify(data_dir, conf[c.CHECKSUMS])
    placement = options.place(conf.get(c.QUANTIZATION))
    return WhisperModel(
        str(data_dir),
        device=placement.device,
        compute_type=placement.compute_type,
        cpu_threads=options.cpu_threads,
        num_workers=options.num_workers,
        local_files_only=True,
    )


# The pyfunc a Spark Python worker loaded last, by (model directory, load options). spark_udf loads
# the model once per task; Spark reuses its Python workers, so each later task of the job finds
# the model here instead of verifying and loading it again.
_SPARK_WORKER_MODEL: dict[tuple[str, str], FasterWhisperPyfunc] = {}
# How many models this process loaded as a pyfunc (read by the tests of the Spark path).
pyfunc_loads = 0


def _load_pyfunc(path: str, model_config: Optional[dict[str, Any]] = None) -> FasterWhisperPyfunc:
    """Called by ``mlflow.pyfunc.load_model``; ``model_config`` may set device, compute_type,
    cpu_threads and num_workers."""
    global pyfunc_loads
    from mlflow_faster_whisper.wrapper import FasterWhisperPyfunc

    # MLflow passes the data sub-path; the flavor configuration lives one level up.
    model_dir = Path(path) if (Path(path) / c.MLMODEL_FILE_NAME).is_file() else Path(path).parent
    key = (str(model_dir.resolve()), json.dumps(model_config or {}, sort_keys=True))
    in_spark_worker = _in_spark_task()
    if in_spark_worker and key in _SPARK_WORKER_MODEL:
        return _SPARK_WORKER_MODEL[key]
    # MLflow passes only the keys declared at save time (unknown ones are dropped with a warning).
    conf = _local_flavor_config(model_dir)
    model = _load_local(str(model_dir), conf, devices.LoadOptions.parse(model_config))
    pyfunc = FasterWhisperPyfunc(model, DecodingOptions.parse(conf.get(c.DECODING)))
    pyfunc_loads += 1
    if in_spark_worker:
        _SPARK_WORKER_MODEL.clear()  # one model per worker: another version replaces it
        _SPARK_WORKER_MODEL[key] = pyfunc
    return pyfunc


def _in_spark_task() -> bool:
    """Whether this code runs inside a Spark task (pyspark is then already imported)."""
    pyspark = sys.modules.get("pyspark")
    return pyspark is not None and pyspark.TaskContext.get() is not None
