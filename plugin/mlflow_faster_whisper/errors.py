"""Errors of the flavor; each message names the fix.

They are plain exceptions, so that loading and serving a model imports no MLflow (its import
cost: BENCHMARKS.md, section 5). Where MLflow is the caller, the pyfunc's
``predict``, they are re-raised as ``MlflowException`` with the same message and ``error_code``,
which MLflow's scoring server turns into HTTP 400.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

DISTRIBUTION = "mlflow-faster-whisper"
# The extra that brings each optional top-level module (pyproject.toml's optional-dependencies):
# the one table every "install the extra" message comes from.
EXTRA_OF_MODULE = {
    "torch": "convert",
    "transformers": "convert",
    "peft": "convert",
    "safetensors": "convert",
    "accelerate": "finetune",
    "datasets": "finetune",
    "bentoml": "serve",
    "fastapi": "serve",
    "multipart": "serve",
    "python_multipart": "serve",
    "pyspark": "spark",
}


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type where it has none), for one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


class FasterWhisperFlavorError(Exception):
    """Base class: bad input to the flavor; the message names the fix."""

    error_code = "INVALID_PARAMETER_VALUE"  # the name of an MLflow ``ErrorCode``

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_mlflow(self):
        """This error as an ``MlflowException`` (same message and error code)."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import ErrorCode

        return MlflowException(self.message, error_code=ErrorCode.Value(self.error_code))


class InvalidSourceError(FasterWhisperFlavorError):
    """The checkpoint, adapter or CTranslate2 directory cannot be logged as a Whisper model."""


class UnsupportedQuantizationError(FasterWhisperFlavorError):
    """A quantization CTranslate2 does not know."""


class DecodingOptionsError(FasterWhisperFlavorError):
    """Decoding options that faster-whisper would reject or that do not exist.

    Attributes:
        field: the option at fault (the first one, where several are), or None.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class AudioDecodeError(FasterWhisperFlavorError):
    """Bytes that are not decodable audio, or audio with no samples."""


class AudioTooLongError(AudioDecodeError):
    """Audio longer than the caller's limit (found before or while decoding it)."""

    def __init__(self, seconds: float, limit: float, *, at_least: bool = False):
        length = f"at least {seconds:.1f}" if at_least else f"{seconds:.1f}"
        super().__init__(f"The audio is {length} s long; the limit here is {limit:g} s. Split the recording.")
        self.seconds = seconds
        self.limit = limit


class ConversionError(FasterWhisperFlavorError):
    """CTranslate2 conversion failed or produced a model faster-whisper cannot use."""

    error_code = "INTERNAL_ERROR"


class LoadOptionsError(FasterWhisperFlavorError):
    """A load option (device, compute_type, cpu_threads, num_workers) that is unknown or invalid."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class DeviceError(FasterWhisperFlavorError):
    """The device asked for cannot run a model here (no GPU visible, no cuBLAS 12)."""


class ChecksumError(FasterWhisperFlavorError):
    """An artifact file is missing or differs from the checksum recorded when it was logged."""


class Overloaded(Exception):
    """The decoding engine holds ``max_requests`` already, or the request waited past ``max_wait_s``."""


class Cancelled(Exception):
    """The request was cancelled (its client went away); its waiting windows were dropped."""


class MissingExtraError(ImportError):
    """A module that one of this distribution's extras installs is missing; the message names the
    extra and the pip command. An ``ImportError``, not bad input: nothing the caller passed is wrong.

    Attributes:
        module: the missing top-level module.
        extra: the extra that installs it.
    """

    def __init__(self, module: str, extra: str):
        self.message = f"{module} is not installed; it comes with the {extra} extra: pip install '{DISTRIBUTION}[{extra}]'"
        super().__init__(self.message, name=module)
        self.module = module
        self.extra = extra


def missing_extra(exc: BaseException) -> Optional[MissingExtraError]:
    """What ``exc`` means when it is the import of a module an extra brings, failing because the
    module is not installed; None for any other exception."""
    if isinstance(exc, MissingExtraError):
        return exc
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        module = exc.name.split(".")[0]
        if module in EXTRA_OF_MODULE:
            return MissingExtraError(module, EXTRA_OF_MODULE[module])
    return None


@contextlib.contextmanager
def extra_imports() -> Iterator[None]:
    """Imports of optional modules go through here: ``with extra_imports(): import transformers``.

    Raises:
        MissingExtraError: a module an extra brings is not installed.
    """
    try:
        yield
    except ModuleNotFoundError as exc:
        found = missing_extra(exc)
        if found is None:
            raise
        raise found from None
