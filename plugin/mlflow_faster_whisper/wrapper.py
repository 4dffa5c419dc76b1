"""The python_function wrapper: a column of audio in, one transcription per row out.

The rows of one ``predict`` call (a Spark UDF's Arrow batch, a DataFrame sent to ``mlflow models
serve``) are decoded through the flavor's engine, so they share forward passes.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from typing import Any, Optional

import pandas as pd

from mlflow_faster_whisper import constants as c
from mlflow_faster_whisper.audio import audio_from_cell
from mlflow_faster_whisper.decoding import DecodingOptions
from mlflow_faster_whisper.errors import AudioDecodeError, FasterWhisperFlavorError
from mlflow_faster_whisper.loaded import LoadedVersion
from mlflow_faster_whisper.transcription import Transcription

_logger = logging.getLogger(__name__)


class FasterWhisperPyfunc:
    """``predict`` transcribes each row; a bad row gets an ``error`` instead of failing the batch."""

    def __init__(self, model, defaults: DecodingOptions, *, batch_size: Optional[int] = None):  # None: the engine's
        self.version = LoadedVersion(model, defaults, batch_size=batch_size)

    @property
    def model(self):
        return self.version.model

    @property
    def defaults(self) -> DecodingOptions:
        return self.version.defaults

    @property
    def engine(self):
        """The decoding engine of this model, started on first use."""
        return self.version.engine

    def get_raw_model(self):
        """The ``faster_whisper.WhisperModel`` (MLflow's accessor for the underlying model)."""
        return self.model

    def predict(self, data: Any, params: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
        """Transcribe audio.

        Args:
            data: a DataFrame with an ``audio`` column (or a single column), a list, or one value;
                each value raw bytes or a base64 string of any container PyAV decodes.
            params: decoding options overriding the version's defaults (see the ParamSchema).

        Returns:
            One dict per row: text, language, language_probability, duration, segments (each
            with ``words``, empty unless ``word_timestamps``), error: "" when the row was
            transcribed, else why its audio could not be decoded (text and language are then
            "", the numbers None).

        Raises:
            MlflowException: params that are not valid decoding options (for this model), or
                ``data`` with no audio column (INVALID_PARAMETER_VALUE: HTTP 400 from
                ``mlflow models serve``).
        """
        try:
            options = self.version.resolve(_drop_none(params))
            cells = _audio_cells(data)
        except FasterWhisperFlavorError as exc:
            raise exc.to_mlflow() from exc

        def rows():
            for index, cell in enumerate(cells):
                try:
                    yield audio_from_cell(_base64_text_decoded(cell)), options
                except AudioDecodeError as exc:
                    _logger.warning("Row %d: %s", index, exc.message)
                    yield exc

        results = []
        for _, outcome in self.engine.transcribe_many(rows()):
            if isinstance(outcome, AudioDecodeError):
                results.append(error_row(outcome.message))
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                results.append(_row(outcome))
        return results


# A row's strings are never None and its arrays never null: mlflow.pyfunc.spark_udf turns a None
# in a string field of its struct result into the string "nan" (it casts the column with astype)
# and fails on a null array inside a struct (MLflow 3.17). Empty is what the rows say instead.


def _row(transcription) -> dict[str, Any]:
    row = transcription.model_dump()
    for segment in row["segments"]:
        segment["words"] = segment["words"] or []
    return {**row, c.ERROR_COLUMN: ""}


def error_row(message: str) -> dict[str, Any]:
    """The output row of audio that could not be decoded: ``error`` says why, the strings are empty."""
    return {**{name: None for name in Transcription.model_fields}, "text": "", "language": "", "segments": [], c.ERROR_COLUMN: message}


def _drop_none(params: Optional[dict[str, Any]]) -> dict[str, Any]:
    # MLflow fills absent params with the schema's defaults (the version's defaults); None there
    # means "not set", which must not override a non-None version default.
    return {k: v for k, v in (params or {}).items() if v is not None}


# No audio container starts with 16 base64 characters: RIFF, fLaC, OggS, ID3 and MP4's size field
# are followed or led by bytes outside that alphabet.
_BASE64_HEAD = re.compile(rb"[A-Za-z0-9+/]{16}")


def _base64_text_decoded(cell: Any) -> Any:
    """A cell as ``audio_from_cell`` takes it. MLflow's scoring server hands the base64 string of
    an ``inputs`` / ``instances`` payload over as that text's bytes (its schema enforcement encodes
    a str for the binary column; ``dataframe_split`` and ``dataframe_records`` decode it): such
    bytes are decoded back here."""
    if isinstance(cell, (bytes, bytearray)) and _BASE64_HEAD.match(cell):
        try:
            return base64.b64decode(cell, validate=True)
        except (binascii.Error, ValueError):
            return cell
    return cell


def _audio_cells(data: Any) -> list:
    if isinstance(data, pd.DataFrame):
        if c.AUDIO_COLUMN in data.columns:
            return list(data[c.AUDIO_COLUMN])
        if len(data.columns) == 1:
            return list(data.iloc[:, 0])
        raise FasterWhisperFlavorError(f"Expected a column named {c.AUDIO_COLUMN!r}; got columns {list(data.columns)}.")
    if isinstance(data, pd.Series):
        return list(data)
    if isinstance(data, dict) and c.AUDIO_COLUMN in data:
        value = data[c.AUDIO_COLUMN]
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(data, (list, tuple)):
        return list(data)
    return [data]
