"""Multipart requests -> (audio bytes, decoding overrides, response options), or an ``ApiError``.

Two request shapes share one resolution path:

* ``POST /transcribe``: ``file`` plus any field of ``DecodingOptions`` (``beam_size=1``,
  ``language=zh``, ``temperature=0``, ``vad_parameters={...}``); an unknown field is a 422.
* ``POST /v1/audio/transcriptions|translations``: the OpenAI fields (``file``, ``model``,
  ``language``, ``prompt``, ``temperature``, ``response_format``, ``timestamp_granularities[]``,
  ``stream``), mapped onto ``DecodingOptions``; fields OpenAI clients may send that have no
  meaning here (``model``, ``chunking_strategy``, ``include[]``) are accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from mlflow_faster_whisper.decoding import coerce_text_value
from whisper_bento.errors import bad_request, invalid_value, too_large

FILE_FIELDS = ("file", "audio")
_MULTIPART_SLACK = 64 * 1024  # boundaries and small fields around the file
_OPENAI_IGNORED = ("model", "chunking_strategy", "include[]", "include")
_TRUE = ("1", "true", "yes", "on")


@dataclass
class ParsedRequest:
    """What a request asks for, before the service's layers and bounds are applied."""

    audio: bytes
    overrides: dict[str, Any] = field(default_factory=dict)
    response_format: str = "json"  # /transcribe: "native" (the full JSON) unless the request says
    stream: bool = False
    word_granularity: bool = False


async def read_form(request: Request, max_upload_bytes: int) -> FormData:
    """Parse a multipart/urlencoded body, refusing oversized uploads before reading them."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_upload_bytes + _MULTIPART_SLACK:
        raise too_large(f"The upload is {int(length)} bytes; this service accepts at most {max_upload_bytes}.")
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise bad_request(
            "Send the audio as multipart/form-data with a 'file' field "
            f"(got content-type {content_type or 'none'!r}).",
            param="file",
        )
    try:
        return await request.form()
    except Exception as exc:  # python-multipart raises several types for malformed bodies
        raise bad_request(f"The multipart body could not be parsed: {exc}.", param="file") from None


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


async def parse_native(request: Request, max_upload_bytes: int) -> ParsedRequest:
    """``POST /transcribe``: a file plus decoding option fields."""
    form = await read_form(request, max_upload_bytes)
    parsed = ParsedRequest(audio=await audio_bytes(form, max_upload_bytes), response_format="native")
    for name, value in form.multi_items():
        if name in FILE_FIELDS:
            continue
        if name == "stream":
            parsed.stream = _flag(value)
        elif name == "response_format":
            parsed.response_format = str(value)
        else:
            parsed.overrides[name] = coerce_text_value(name, _text(name, value))
    return parsed


async def parse_openai(request: Request, max_upload_bytes: int, *, task: str) -> ParsedRequest:
    """``POST /v1/audio/{transcriptions,translations}``: OpenAI's fields."""
    form = await read_form(request, max_upload_bytes)
    parsed = ParsedRequest(audio=await audio_bytes(form, max_upload_bytes), overrides={"task": task})
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
                raise invalid_value(
                    f"timestamp_granularities must be 'word' or 'segment', got {text!r}.", param=name
                )
            parsed.word_granularity |= text == "word"
        elif name == "stream":
            parsed.stream = _flag(text)
        else:
            raise invalid_value(
                f"Unknown field {name!r}. Fields: file, model, language, prompt, temperature, "
                "response_format, timestamp_granularities[], stream.",
                param=name,
            )
    if parsed.word_granularity:
        parsed.overrides["word_timestamps"] = True
    return parsed


def _text(name: str, value: Any) -> str:
    if isinstance(value, UploadFile):
        raise bad_request(f"The field {name!r} must be a text field, not a file.", param=name)
    return str(value)


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in _TRUE
