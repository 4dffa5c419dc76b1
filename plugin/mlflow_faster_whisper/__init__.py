"""The ``faster_whisper`` MLflow flavor: a fine-tuned Whisper checkpoint, converted and quantized
with CTranslate2, logged as an MLflow model that loads as a ``faster_whisper.WhisperModel``.

    import mlflow_faster_whisper as mfw
    info = mfw.log_model("./whisper-small-zh", name="model", quantization="int8",
                         decoding={"language": "zh", "beam_size": 5},
                         registered_model_name="whisper-zh")
    model = mfw.load_model(f"models:/whisper-zh/{info.registered_model_version}")

Loading and serving import neither torch nor transformers; only conversion does. Loading a local
model directory does not import MLflow either: ``saving`` (log_model, save_model), which needs
MLflow, is imported on first use.
"""

from __future__ import annotations

import importlib.metadata as _metadata
from typing import Any

from mlflow_faster_whisper.constants import FLAVOR_NAME
from mlflow_faster_whisper.conversion import QUANTIZATIONS
from mlflow_faster_whisper.decoding import DecodingOptions
from mlflow_faster_whisper.devices import LoadOptions
from mlflow_faster_whisper.loading import _load_pyfunc, flavor_config, load_model  # noqa: F401 (_load_pyfunc: MLflow's loader_module hook)

__all__ = [
    "FLAVOR_NAME",
    "QUANTIZATIONS",
    "DecodingOptions",
    "LoadOptions",
    "get_default_pip_requirements",
    "get_default_conda_env",
    "save_model",
    "log_model",
    "load_model",
    "flavor_config",
]
try:  # one version, the distribution's (pyproject.toml)
    __version__ = _metadata.version("mlflow-faster-whisper")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

_SAVING = ("save_model", "log_model", "get_default_pip_requirements", "get_default_conda_env", "default_signature")


def __getattr__(name: str) -> Any:
    if name in _SAVING:
        from mlflow_faster_whisper import saving

        return getattr(saving, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
