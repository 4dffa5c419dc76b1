"""Audio bytes -> 16 kHz mono float32 samples, with errors a client can act on."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np

from mlflow_faster_whisper.constants import SAMPLE_RATE
from mlflow_faster_whisper.errors import AudioDecodeError, AudioTooLongError


def decode_audio(data: bytes | bytearray | memoryview | np.ndarray, *, max_seconds: float | None = None) -> np.ndarray:
    """Decode any container PyAV reads (wav, flac, mp3, ogg, ...) to 16 kHz mono float32.

    A float array is taken as already-decoded 16 kHz samples.

    Args:
        data: the file's bytes, or samples.
        max_seconds: refuse longer audio, by the duration the container declares before any
            decoding and by the samples decoded so far (a few KB of FLAC can declare 10 hours,
            and a stream may declare nothing): memory stays bounded by the limit.

    Raises:
        AudioTooLongError: the audio is longer than ``max_seconds``.
        AudioDecodeError: the bytes are not decodable audio, they hold no samples, or samples
            that are not sound (NaN, infinite, or far outside [-1, 1]).
    """
    limit = None if max_seconds is None else int(max_seconds * SAMPLE_RATE)
    limit_s = float("inf") if max_seconds is None else max_seconds  # named only where limit is set
    if isinstance(data, np.ndarray):
        samples = data.astype(np.float32, copy=False).reshape(-1)
        if limit is not None and samples.size > limit:
            raise AudioTooLongError(samples.size / SAMPLE_RATE, limit_s)
    else:
        if not data:
            raise AudioDecodeError("The audio is empty (0 bytes): send a wav, flac, mp3 or ogg file.")
        _check_wav_length(bytes(data[:_WAV_SCAN_BYTES]), len(data))
        try:
            samples = _decode_container(bytes(data), max_seconds)
        except AudioDecodeError:
            raise
        except Exception as exc:  # PyAV raises many types (InvalidDataError, ValueError, ...)
            raise AudioDecodeError(
                f"Could not decode the audio ({type(exc).__name__}: {exc}); send a complete wav, flac, mp3 or ogg file."
            ) from None
    if samples.size == 0:
        raise AudioDecodeError("The audio has no samples (0 seconds): send a non-empty recording.")
    _check_levels(samples)
    return samples


# Sound is in [-1, 1]; a float file may overshoot a little. Far beyond, the log-mel overflows
# (1e30 -> inf -> NaN features) and the decoder spends every temperature on garbage.
_MAX_PEAK = 100.0


def _check_levels(samples: np.ndarray) -> None:
    peak = float(np.max(np.abs(samples)))  # NaN propagates through max
    if not np.isfinite(peak):
        raise AudioDecodeError(
            "The audio holds NaN or infinite samples, which are not sound: send a recording whose "
            "samples are finite (a float WAV file written from a broken signal can hold them)."
        )
    if peak > _MAX_PEAK:
        raise AudioDecodeError(
            f"The audio's samples reach {peak:.3g}, far outside the [-1, 1] range of sound: scale "
            "float samples to [-1, 1] (divide integer PCM by 32768) before sending them."
        )


def _decode_container(data: bytes, max_seconds: float | None) -> np.ndarray:
    """PyAV decode + resample to 16 kHz mono float32, stopping past ``max_seconds``.

    faster_whisper.decode_audio does the same but runs gc.collect() on every call (0.2-1 s in a
    process holding a model and MLflow); here the resampler is freed by normal collection.
    Frames FFmpeg cannot decode are skipped, as faster-whisper does.
    """
    import av

    limit = None if max_seconds is None else int(max_seconds * SAMPLE_RATE)
    limit_s = float("inf") if max_seconds is None else max_seconds  # named only where limit is set
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    chunks, decoded = [], 0
    with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise AudioDecodeError("The file has no audio stream: send a wav, flac, mp3 or ogg recording.")
        declared = (container.duration or 0) / av.time_base  # seconds; 0 where not declared
        if max_seconds is not None and declared > max_seconds + 1:  # + 1: container rounding
            raise AudioTooLongError(declared, max_seconds)
        for frame in _valid_frames(container.decode(audio=0)):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
                decoded += chunks[-1].size
            if limit is not None and decoded > limit:
                raise AudioTooLongError(decoded / SAMPLE_RATE, limit_s, at_least=True)
        chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))  # flush
    samples = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    if limit is not None and samples.size > limit:
        raise AudioTooLongError(samples.size / SAMPLE_RATE, limit_s)
    return samples


def _valid_frames(frames):
    import av

    iterator = iter(frames)
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except av.error.InvalidDataError:
            continue


# How far into a file to look for the WAV data chunk's header.
_WAV_SCAN_BYTES = 1 << 16
# Streaming writers put these in the size fields when the length is not known up front.
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)


def _check_wav_length(head: bytes, total: int) -> None:
    """Refuse a WAV file cut short: PyAV would silently decode the part that is there.

    Raises:
        AudioDecodeError: the data chunk declares more bytes than the file holds.
    """
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return
    offset = 12
    while offset + 8 <= len(head):
        chunk_id, size = head[offset : offset + 4], int.from_bytes(head[offset + 4 : offset + 8], "little")
        if chunk_id == b"data":
            available = total - (offset + 8)
            if size not in _UNKNOWN_SIZES and size > available:
                raise AudioDecodeError(
                    f"The WAV file is truncated: its header declares {size} bytes of audio but only "
                    f"{available} are there. Send the complete file."
                )
            return
        offset += 8 + size + (size & 1)  # chunks are word-aligned


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
                "The audio string is not base64. Send the file's bytes base64-encoded; paths and URLs are not read."
            ) from None
        return decode_audio(raw)
    raise AudioDecodeError(f"Unsupported audio value of type {type(value).__name__}: send bytes or a base64 string.")
