"""The events of OpenAI's Realtime transcription sessions as this service speaks them: the
session limits, a refused event, the server events' shapes, and the ``session.update`` fields
(``whisper_bento.realtime`` runs the session)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from whisper_bento.errors import ApiError
from whisper_bento.realtime_turns import SAMPLE_RATE, ServerVad


class RealtimeSettings(BaseModel):
    """What live sessions may hold of a worker; ``--arg 'realtime={"max_sessions": 8}'``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_sessions: int = Field(16, ge=1, description="Sessions a worker holds at once; the next is closed with 1013 (try again later).")
    max_session_s: float = Field(3600.0, gt=0, description="A session open this long is closed (1008).")
    idle_timeout_s: float = Field(120.0, gt=0, description="A session that sends no event this long is closed (1008).")
    max_turn_s: float = Field(
        30.0,
        gt=0,
        le=30.0,
        description="Longest turn (one Whisper window): server VAD closes a longer one; without VAD, "
        "an append past it is refused until the buffer is committed or cleared.",
    )
    max_event_bytes: int = Field(4 * 1024 * 1024, gt=0, description="Largest client event (JSON text); a larger one gets an error.")
    max_pending_turns: int = Field(2, ge=1, description="Turns of a session whose final text is being decoded; one more fails.")
    partial_interval_s: float = Field(1.0, gt=0, description="How often an open turn is decoded again for deltas.")

    @model_validator(mode="before")
    @classmethod
    def _json_text(cls, value: Any) -> Any:
        # `--arg` values are strings: realtime='{"max_sessions": 8}'.
        return json.loads(value) if isinstance(value, str) else value


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class EventError(Exception):
    """A client event the session refuses; the session goes on."""

    def __init__(self, message: str, code: str, param: Optional[str] = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.code, self.param, self.status = message, code, param, status


def error_event(message: str, code: str, param: Optional[str] = None, event_id: Optional[str] = None, status: int = 400) -> dict:
    error = ApiError(status, message, param=param, code=code).body()["error"]
    return {"type": "error", "event_id": new_id("event"), "error": {**error, "event_id": event_id}}


def delta(item_id: str, text: str) -> dict[str, Any]:
    return {"type": "conversation.item.input_audio_transcription.delta", "item_id": item_id, "content_index": 0, "delta": text}


def ms(sample: int) -> int:
    return sample * 1000 // SAMPLE_RATE


def option_field(param: Optional[str]) -> str:
    return "prompt" if param == "initial_prompt" else param or "language"


def pcm_rate(fmt: Any) -> int:
    if not isinstance(fmt, dict) or fmt.get("type", "audio/pcm") != "audio/pcm":
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        raise EventError(
            f"Audio format {str(kind)[:40]!r} is not served: send audio/pcm (PCM16 mono) at 24000 or 16000 Hz.",
            "unsupported_format",
            "session.audio.input.format",
        )
    rate = fmt.get("rate", 24000)
    if rate not in (24000, 16000):
        raise EventError(
            f"audio/pcm at {str(rate)[:20]} Hz is not served: send 24000 or 16000 Hz.",
            "unsupported_format",
            "session.audio.input.format.rate",
        )
    return int(rate)


def server_vad(value: Any) -> Optional[ServerVad]:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") != "server_vad":
        kind = value.get("type") if isinstance(value, dict) else value
        raise EventError(
            f"Turn detection {str(kind)[:40]!r} is not served: send server_vad, or null to commit turns yourself.",
            "invalid_value",
            "session.audio.input.turn_detection",
        )
    defaults = ServerVad()
    given = {k: v for k, v in value.items() if v is not None}  # null: the default
    try:
        threshold = float(given.get("threshold", defaults.threshold))
        prefix = int(given.get("prefix_padding_ms", defaults.prefix_padding_ms))
        silence = int(given.get("silence_duration_ms", defaults.silence_duration_ms))
    except (TypeError, ValueError):
        raise EventError(
            "server_vad's threshold is a number, its *_ms fields integers.", "invalid_value", "session.audio.input.turn_detection"
        ) from None
    if not 0.0 <= threshold <= 1.0 or not 0 <= prefix <= 10_000 or not 0 < silence <= 10_000:
        raise EventError(
            "server_vad: threshold in [0, 1], prefix_padding_ms in [0, 10000], silence_duration_ms in (0, 10000].",
            "invalid_value",
            "session.audio.input.turn_detection",
        )
    return ServerVad(threshold, prefix, silence)


@dataclass(frozen=True)
class SessionConfig:
    """What a client set with session.update: the input format, transcription, turn detection."""

    rate: int = 24000
    transcription: dict[str, Any] = field(default_factory=lambda: {"model": None, "language": None, "prompt": None})
    vad: Optional[ServerVad] = field(default_factory=ServerVad)

    def describe(self, session_id: str, expires_at: float) -> dict[str, Any]:
        """The session as OpenAI describes a transcription session."""
        return {
            "type": "transcription",
            "object": "realtime.transcription_session",
            "id": session_id,
            "expires_at": int(expires_at),
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": self.rate},
                    "transcription": dict(self.transcription),
                    "turn_detection": self.vad.event_fields() if self.vad else None,
                    "noise_reduction": None,
                }
            },
            "include": None,
        }

    def updated(self, session: Any) -> SessionConfig:
        """This configuration with a session.update's ``session`` applied (fields it leaves out stay).

        Raises:
            EventError: a field that is not served; nothing is applied.
        """
        if not isinstance(session, dict):
            raise EventError("session.update needs a 'session' object.", "invalid_value", "session")
        if session.get("type", "transcription") != "transcription":
            raise EventError("Only transcription sessions are served: send session.type 'transcription'.", "invalid_value", "session.type")
        audio = session.get("audio") or {}
        given = audio.get("input") or {} if isinstance(audio, dict) else None
        if not isinstance(given, dict):
            raise EventError("session.audio.input must be an object.", "invalid_value", "session.audio.input")
        changes: dict[str, Any] = {}
        if "format" in given:
            changes["rate"] = pcm_rate(given["format"])
        if given.get("transcription") is not None:
            asked = given["transcription"]
            if not isinstance(asked, dict):
                raise EventError("audio.input.transcription must be an object.", "invalid_value", "session.audio.input.transcription")
            transcription = dict(self.transcription)
            for name in ("model", "language", "prompt"):
                if name in asked:
                    if asked[name] is not None and not isinstance(asked[name], str):
                        param = f"session.audio.input.transcription.{name}"
                        raise EventError(f"transcription.{name} must be a string.", "invalid_value", param)
                    transcription[name] = asked[name] or None
            changes["transcription"] = transcription
        if "turn_detection" in given:
            changes["vad"] = server_vad(given["turn_detection"])
        return replace(self, **changes)
