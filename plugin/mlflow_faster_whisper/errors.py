"""Errors of the flavor. Each is an ``MlflowException`` so MLflow's CLI and scoring server turn it
into a clear message (HTTP 400 for bad parameters) instead of a stack trace."""

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE


class FasterWhisperFlavorError(MlflowException):
    """Base class: bad input to the flavor; the message names the fix."""

    def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE):
        super().__init__(message, error_code=error_code)


class InvalidSourceError(FasterWhisperFlavorError):
    """The checkpoint, adapter or CTranslate2 directory cannot be logged as a Whisper model."""


class UnsupportedQuantizationError(FasterWhisperFlavorError):
    """A quantization CTranslate2 does not know."""


class DecodingOptionsError(FasterWhisperFlavorError):
    """Decoding options that faster-whisper would reject or that do not exist."""


class AudioDecodeError(FasterWhisperFlavorError):
    """Bytes that are not decodable audio, or audio with no samples."""


class ConversionError(FasterWhisperFlavorError):
    """CTranslate2 conversion failed or produced a model faster-whisper cannot use."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INTERNAL_ERROR)


class ChecksumError(FasterWhisperFlavorError):
    """An artifact file is missing or differs from the checksum recorded when it was logged."""
