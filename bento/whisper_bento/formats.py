"""Response formats, one renderer per name (OpenAI's json, text, srt, vtt, verbose_json, plus the
service's own ``native`` JSON)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse, PlainTextResponse, Response

from mlflow_faster_whisper.decoding import DecodingOptions
from mlflow_faster_whisper.transcription import Transcription
from whisper_bento.errors import invalid_value


@dataclass(frozen=True)
class Result:
    """A finished transcription and what produced it."""

    transcription: Transcription
    options: DecodingOptions
    model: dict[str, Any]
    batch_size: int


Renderer = Callable[[Result], Response]
_RENDERERS: dict[str, Renderer] = {}


def register_format(name: str) -> Callable[[Renderer], Renderer]:
    def decorator(func: Renderer) -> Renderer:
        _RENDERERS[name] = func
        return func

    return decorator


def names(*, native: bool = False) -> list[str]:
    """The response formats a route offers (``native``: /transcribe's full JSON too)."""
    return [n for n in _RENDERERS if native or n != "native"]


def check_format(name: str, *, native: bool = False) -> None:
    """Raises a 422 ``ApiError`` listing the formats when ``name`` is not one of them."""
    if name not in names(native=native):
        raise invalid_value(
            f"Unsupported response_format {name!r}; use one of: {', '.join(names(native=native))}.", param="response_format"
        )


def render(name: str, result: Result) -> Response:
    return _RENDERERS[name](result)


def native_body(result: Result) -> dict[str, Any]:
    t = result.transcription
    return {
        "text": t.text,
        "language": t.language,
        "language_probability": t.language_probability,
        "duration": t.duration,
        "segments": [s.model_dump() for s in t.segments],
        "decoding": result.options.model_dump(mode="json"),
        "model": result.model,
        "batch_size": result.batch_size,
    }


@register_format("native")
def _native(result: Result) -> Response:
    return JSONResponse(native_body(result))


@register_format("json")
def _json(result: Result) -> Response:
    return JSONResponse({"text": result.transcription.text})


@register_format("text")
def _text(result: Result) -> Response:
    return PlainTextResponse(result.transcription.text + "\n")


@register_format("verbose_json")
def _verbose_json(result: Result) -> Response:
    t = result.transcription
    body: dict[str, Any] = {
        "task": result.options.task,
        "language": t.language,
        "duration": t.duration,
        "text": t.text,
        "segments": [
            {
                "id": s.id,
                "seek": 0,
                "start": s.start,
                "end": s.end,
                "text": s.text,
                "tokens": [],
                "temperature": s.temperature if s.temperature is not None else 0.0,
                "avg_logprob": s.avg_logprob,
                "compression_ratio": s.compression_ratio,
                "no_speech_prob": s.no_speech_prob,
            }
            for s in t.segments
        ],
    }
    if result.options.word_timestamps:
        body["words"] = [{"word": w.word.strip(), "start": w.start, "end": w.end} for s in t.segments for w in (s.words or [])]
    return JSONResponse(body)


@register_format("srt")
def _srt(result: Result) -> Response:
    blocks = [
        f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(result.transcription.segments, start=1)
    ]
    return PlainTextResponse("\n".join(blocks), media_type="application/x-subrip")


@register_format("vtt")
def _vtt(result: Result) -> Response:
    blocks = [f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n" for s in result.transcription.segments]
    return PlainTextResponse("WEBVTT\n\n" + "\n".join(blocks), media_type="text/vtt")


def _clock(seconds: float, separator: str) -> str:
    millis = int(round(max(0.0, seconds) * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"
