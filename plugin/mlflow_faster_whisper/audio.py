"""Audio bytes -> 16 kHz mono float32 samples, with errors a client can act on."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np

from mlflow_faster_whisper.constants import SAMPLE_RATE
from mlflow_faster_whisper.errors import AudioDecodeError


def decode_audio(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Decode any container PyAV reads (wav, flac, mp3, ogg, ...) to 16 kHz mono float32.

    A float array is taken as already-decoded 16 kHz samples.

    Raises:
        AudioDecodeError: the bytes are not decodable audio, or they hold no samples.
    """
    if isinstance(data, np.ndarray):
        samples = data.astype(np.float32, copy=False).reshape(-1)
    else:
        if not data:
            raise AudioDecodeError("The audio is empty (0 bytes): send a wav, flac, mp3 or ogg file.")
        from faster_whisper.audio import decode_audio as _decode  # PyAV underneath

        try:
            samples = _decode(io.BytesIO(bytes(data)), sampling_rate=SAMPLE_RATE)
        except Exception as exc:  # PyAV raises many types (InvalidDataError, ValueError, ...)
            raise AudioDecodeError(
                f"Could not decode the audio ({type(exc).__name__}: {exc}); "
                "send a complete wav, flac, mp3 or ogg file."
            ) from None
    if samples.size == 0:
        raise AudioDecodeError("The audio has no samples (0 seconds): send a non-empty recording.")
    return samples


def audio_from_cell(value: object) -> np.ndarray:
    """Decode one pyfunc input cell: raw bytes, a base64 string, or a float array.

    Strings are never read as file paths or URLs: a served model must not read the server's
    files or fetch addresses on a client's behalf.

    Raises:
        AudioDecodeError: the cell is not audio in one of those forms.
    """
    if isinstance(value, (bytes, bytearray, memoryview, np.ndarray)):
        return decode_audio(value)
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise AudioDecodeError(
                "The audio string is not base64. Send the file's bytes base64-encoded; "
                "paths and URLs are not read."
            ) from None
        return decode_audio(raw)
    raise AudioDecodeError(
        f"Unsupported audio value of type {type(value).__name__}: send bytes or a base64 string."
    )
