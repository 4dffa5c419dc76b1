"""What the routes document in the service's OpenAPI (``/docs.json``): request bodies and statuses.

The routes read their multipart forms themselves (``forms``), so FastAPI cannot infer the bodies;
they are written here from the same field lists. Every status a route can answer is listed, each
error with the one JSON shape of ``errors.ApiError``; a 500 is never documented: it is a bug.
"""

from __future__ import annotations

from typing import Any

from whisper_bento import formats, page

_ERROR = {
    "description": "",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["message", "type"],
                        "properties": {
                            "message": {"type": "string"},
                            "type": {"type": "string"},
                            "param": {"type": "string", "nullable": True},
                            "code": {"type": "string", "nullable": True},
                        },
                    }
                },
            }
        }
    },
}
_WHY = {
    400: "The audio or the form is malformed (the message names it).",
    401: "An API key is configured and the request has none or a wrong one.",
    404: "No such path (a path parameter that is not valid UTF-8, say), or no such model (code model_not_found).",
    408: "The request body did not arrive within body_timeout_s of its head; the connection is closed.",
    413: "The upload or the audio is longer than this service accepts.",
    422: "A field has a value this service will not use (its name is in error.param).",
    503: "The service holds as many requests as it takes (or is still loading): retry after Retry-After seconds. "
    "The one status of every refusal for capacity.",
}
_FILE = {"type": "string", "format": "binary", "description": "The audio: wav, flac, mp3, ogg, ..."}


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}


def _errors(*statuses: int) -> dict[int, dict[str, Any]]:
    return {status: {**_ERROR, "description": _WHY[status], **({"headers": _RETRY_AFTER} if status == 503 else {})} for status in statuses}


def _form(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": properties}}},
        }
    }


# Which of the service's models answers (an unknown one: 404 model_not_found).
_MODEL = {"type": "string", "description": "A served model's registered name, or NAME@ALIAS; whisper-1 or none: the first."}


def transcription_route(native: bool, task: str = "transcribe") -> dict[str, Any]:
    """``responses`` and ``openapi_extra`` for a transcription route (native, or OpenAI's ``task``)."""
    if native:
        properties = {
            "file": _FILE,
            "model": _MODEL,
            "stream": {"type": "boolean"},
            "response_format": {"type": "string", "enum": formats.names(native=True)},
        }
        # Every decoding option, typed and bounded as DecodingOptions declares it (forms parses the text).
        properties.update(page.decoding_fields())
    else:
        properties = {
            "file": _FILE,
            "model": _MODEL,
            **({"language": {"type": "string"}} if task == "transcribe" else {}),  # translations take none
            "prompt": {"type": "string"},
            "temperature": {"type": "number"},
            "response_format": {"type": "string", "enum": formats.names()},
            "timestamp_granularities[]": {"type": "array", "items": {"type": "string", "enum": ["word", "segment"]}},
            "stream": {"type": "boolean"},
        }
    return {
        "responses": {
            200: {"description": "The transcription (JSON, text, srt, vtt, or server-sent events)."},
            **_errors(400, 401, 404, 408, 413, 422, 503),
        },
        "openapi_extra": _form(properties),
    }


def read_route(*statuses: int) -> dict[str, Any]:
    """``responses`` for a GET route: 401, 503 (over capacity), and ``statuses``."""
    return {"responses": _errors(401, *statuses, 503)}
