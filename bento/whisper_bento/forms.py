"""Multipart requests -> (audio bytes, decoding overrides, response options), or an ``ApiError``.

Two request shapes share one resolution path:

* ``POST /transcribe``: ``file`` plus any field of ``DecodingOptions`` (``beam_size=1``,
  ``language=zh``, ``temperature=0``, ``vad_parameters={...}``); an unknown field is a 422.
* ``POST /v1/audio/transcriptions|translations``: the OpenAI fields (``file``, ``model``,
  ``language``, ``prompt``, ``temperature``, ``response_format``, ``timestamp_granularities[]``,
  ``stream``), mapped onto ``DecodingOptions``; fields OpenAI clients may send that have no
  meaning here (``chunking_strategy``, ``include[]``) are accepted and ignored.

Both take ``model``: which of the service's models answers (the service resolves the name).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.types import Message, Receive

from mlflow_faster_whisper.decoding import coerce_text_value
from whisper_bento.errors import ApiError, bad_request, invalid_value, too_large

FILE_FIELDS = ("file", "audio")
_MULTIPART_SLACK = 64 * 1024  # boundaries and small fields around the file
_OPENAI_IGNORED = ("chunking_strategy", "include[]", "include")
_TRUE = ("1", "true", "yes", "on")


class Uploads:
    """The bounds on request bodies: one upload's size, and the bytes all uploads in flight hold
    together. One worker's event loop does all the counting, so it takes no lock."""

    def __init__(self, max_upload_bytes: int, budget_bytes: int) -> None:
        self.max_upload_bytes = max_upload_bytes
        self.budget_bytes = budget_bytes
        self.in_flight = 0  # bytes held by bodies being read, or read and not yet decoded

    def start(self) -> Upload:
        """One request's share, empty until its body is declared or arrives."""
        return Upload(self)


class Upload:
    """One request's share of the uploads' budget: its declared Content-Length, or (chunked) the
    bytes arrived so far. Released once, when its audio is decoded or the request fails."""

    def __init__(self, uploads: Uploads) -> None:
        self._uploads = uploads
        self.held = 0
        self.received = 0

    @property
    def limit(self) -> int:
        return self._uploads.max_upload_bytes + _MULTIPART_SLACK

    def hold(self, size: int) -> None:
        """Hold ``size`` bytes in all: 413 past one upload's limit, 503 past the budget.

        An upload is refused for the budget only while others hold bytes: one alone is always read.
        """
        uploads = self._uploads
        if size > self.limit:
            raise too_large(
                f"The upload is more than {self.limit} bytes; this service accepts files of at most "
                f"{uploads.max_upload_bytes} bytes: send a smaller or more compressed recording."
            )
        if size <= self.held:
            return
        others = uploads.in_flight - self.held
        if others and others + size > uploads.budget_bytes:
            raise ApiError(
                503,
                f"The service is reading other uploads ({others} of the {uploads.budget_bytes} bytes "
                "it holds for uploads in flight); retry later.",
                param="file",
                code="uploads_full",
            )
        uploads.in_flight += size - self.held
        self.held = size

    def metered(self, receive: Receive) -> Receive:
        """``receive`` that counts the body as it arrives, and stops reading at the first byte too many."""

        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
                self.hold(self.received)
            return message

        return counted

    def release(self) -> None:
        self._uploads.in_flight -= self.held
        self.held = 0


@dataclass
class ParsedRequest:
    """What a request asks for, before the service's layers and bounds are applied."""

    audio: bytes
    overrides: dict[str, Any] = field(default_factory=dict)
    response_format: str = "json"  # /transcribe: "native" (the full JSON) unless the request says
    stream: bool = False
    word_granularity: bool = False
    model: str | None = None  # the model it names (None: the service's first)
    upload: Upload | None = None  # its share of the uploads' budget, held until release_upload

    def release_upload(self) -> None:
        """Drop the uploaded bytes (once decoded) and give their share of the budget back."""
        self.audio = b""
        if self.upload is not None:
            self.upload.release()


async def read_form(request: Request, upload: Upload) -> FormData:
    """Parse a multipart/urlencoded body within ``upload``'s bounds: a declared size beyond them is
    refused before a byte is read, a chunked body as soon as its bytes pass them."""
    length = request.headers.get("content-length")
    declared = int(length) if length is not None and length.isdigit() else None
    if declared is not None and declared > upload.limit:
        upload.hold(declared)  # 413
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise bad_request(
            f"Send the audio as multipart/form-data with a 'file' field (got content-type {content_type or 'none'!r}).",
            param="file",
        )
    if declared is not None:
        upload.hold(declared)
    try:
        return await Request(request.scope, upload.metered(request.receive)).form()
    except ApiError:
        raise
    except Exception as exc:  # python-multipart raises several types for malformed bodies
        raise bad_request(f"The multipart body could not be parsed: {exc}.", param="file") from None


@contextlib.asynccontextmanager
async def _uploaded(request: Request, uploads: Uploads) -> AsyncIterator[tuple[FormData, bytes, Upload]]:
    """The form, its file's bytes and their share of the budget (let go here if parsing fails)."""
    upload = uploads.start()
    try:
        form = await read_form(request, upload)
        try:  # the form's files are spooled to disk: closed at once, not when collected
            yield form, await audio_bytes(form, uploads.max_upload_bytes), upload
        finally:
            await form.close()
    except BaseException:
        upload.release()
        raise


async def read_body(request: Request, max_bytes: int, what: str = "The body") -> bytes:
    """A raw body of at most ``max_bytes``, counted as it arrives (413 beyond, read no further)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large(f"{what} is at most {max_bytes} bytes.", param=None)
        chunks.append(chunk)
    return b"".join(chunks)


async def audio_bytes(form: FormData, max_upload_bytes: int) -> bytes:
    upload = next((form[name] for name in FILE_FIELDS if name in form), None)
    if upload is None:
        raise bad_request("The request has no 'file' field: attach the audio as a file named 'file'.", param="file")
    if not isinstance(upload, UploadFile):
        raise bad_request("The 'file' field must be a file upload, not a text field.", param="file")
    data = await upload.read(max_upload_bytes + 1)
    if len(data) > max_upload_bytes:
        raise too_large(f"The file is larger than this service's limit of {max_upload_bytes} bytes.")
    return data


async def parse_native(request: Request, uploads: Uploads) -> ParsedRequest:
    """``POST /transcribe``: a file plus decoding option fields."""
    async with _uploaded(request, uploads) as (form, audio, upload):
        parsed = ParsedRequest(audio=audio, response_format="native", upload=upload)
        for name, value in form.multi_items():
            if name in FILE_FIELDS:
                continue
            if name == "stream":
                parsed.stream = _flag(value)
            elif name == "response_format":
                parsed.response_format = str(value)
            elif name == "model":
                parsed.model = _text(name, value)
            else:
                parsed.overrides[name] = coerce_text_value(name, _text(name, value))
    return parsed


async def parse_openai(request: Request, uploads: Uploads, *, task: str) -> ParsedRequest:
    """``POST /v1/audio/{transcriptions,translations}``: OpenAI's fields."""
    async with _uploaded(request, uploads) as (form, audio, upload):
        parsed = ParsedRequest(audio=audio, overrides={"task": task}, upload=upload)
        _openai_fields(parsed, form, task)
    return parsed


def _openai_fields(parsed: ParsedRequest, form: FormData, task: str) -> None:
    for name, value in form.multi_items():
        if name in FILE_FIELDS or name in _OPENAI_IGNORED:
            continue
        text = _text(name, value)
        if name == "language" and task == "transcribe":
            parsed.overrides["language"] = text
        elif name == "prompt":
            parsed.overrides["initial_prompt"] = text or None
        elif name == "temperature":
            parsed.overrides["temperature"] = coerce_text_value("temperature", text)
        elif name == "response_format":
            parsed.response_format = text
        elif name in ("timestamp_granularities[]", "timestamp_granularities"):
            if text not in ("word", "segment"):
                raise invalid_value(f"timestamp_granularities must be 'word' or 'segment', got {text!r}.", param=name)
            parsed.word_granularity |= text == "word"
        elif name == "stream":
            parsed.stream = _flag(text)
        elif name == "model":
            parsed.model = text
        else:
            raise invalid_value(
                f"Unknown field {name!r}. Fields: file, model, language, prompt, temperature, "
                "response_format, timestamp_granularities[], stream.",
                param=name,
            )
    if parsed.word_granularity:
        parsed.overrides["word_timestamps"] = True


def _text(name: str, value: Any) -> str:
    if isinstance(value, UploadFile):
        raise bad_request(f"The field {name!r} must be a text field, not a file.", param=name)
    return str(value)


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in _TRUE
