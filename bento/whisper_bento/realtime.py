"""Live transcription: OpenAI's Realtime API, transcription sessions, over a WebSocket
(``/v1/realtime?intent=transcription``), as the ``openai`` SDK's ``client.realtime.connect`` speaks it.

A session takes ``session.update`` (type ``transcription``: ``audio/pcm`` at 24 kHz or 16 kHz, the
transcription model, language and prompt, ``server_vad`` turn detection or none) and
``input_audio_buffer.append|commit|clear``; it answers ``session.created|updated``,
``input_audio_buffer.speech_started|speech_stopped|committed|cleared``,
``conversation.item.input_audio_transcription.delta|completed|failed`` and ``error`` (a bad event
fails alone; the session goes on). While a turn is open its audio so far is decoded again every
``partial_interval_s`` through the served version's one engine (so live turns share forward
passes with each other and with files), and the words two decodes agree on are sent as deltas
(``realtime_turns.Agreement``); the turn's final decode is its ``completed`` transcript.

Each turn holds the version it started on until its text is sent: a session follows the served
version between turns. A session ends, and lets go of every engine request it holds, as soon as
its client goes. Close codes: 1013 (try again later) when the worker holds ``max_sessions``
already; 1008 (policy) when a session has been idle for ``idle_timeout_s`` or open for
``max_session_s``; each comes after an ``error`` event saying why. Without the API key, the
handshake is refused (HTTP 401 where the server can send it, 403 otherwise).
"""

from __future__ import annotations

import logging

from starlette.websockets import WebSocket

from whisper_bento import auth
from whisper_bento.errors import ApiError
from whisper_bento.realtime_session import CLOSE_POLICY, CLOSE_TRY_LATER, Backend, Session, close_with_error

__all__ = ["PATH", "Backend", "serve"]

_logger = logging.getLogger(__name__)

PATH = "/v1/realtime"
KEY_PROTOCOL = "openai-insecure-api-key."  # what OpenAI's browser clients send the key as
PROTOCOL = "realtime"  # the subprotocol answered to a browser that offers it


class _Held:
    sessions = 0  # in this worker: one event loop, so no lock


async def serve(websocket: WebSocket, backend: Backend) -> None:
    """One client's session, from the handshake to its end (however it ends)."""
    if backend.keys is not None and not _authorized(websocket, backend.keys):
        await _deny(websocket)
        return
    offered = websocket.scope.get("subprotocols") or []
    await websocket.accept(subprotocol=PROTOCOL if PROTOCOL in offered else None)
    intent = websocket.query_params.get("intent", "transcription")
    settings = backend.settings
    if _Held.sessions >= settings.max_sessions:
        await close_with_error(
            websocket, CLOSE_TRY_LATER, "sessions_full", f"This worker holds {settings.max_sessions} live sessions; retry later."
        )
        return
    if intent != "transcription":
        await close_with_error(
            websocket, CLOSE_POLICY, "unsupported_intent", f"intent={intent!r} is not served: connect with intent=transcription."
        )
        return
    _Held.sessions += 1
    try:
        await Session(websocket, backend, websocket.query_params.get("model")).run()
    finally:
        _Held.sessions -= 1


def _authorized(websocket: WebSocket, keys: tuple[bytes, ...]) -> bool:
    scheme, _, token = auth.header_bytes(websocket.scope, b"authorization").partition(b" ")
    given = [token.strip()] if scheme.lower() == b"bearer" else []
    given += [p[len(KEY_PROTOCOL) :].encode() for p in websocket.scope.get("subprotocols") or [] if p.startswith(KEY_PROTOCOL)]
    if "api_key" in websocket.query_params:
        given.append(websocket.query_params["api_key"].encode())
    return any(auth.matches(token, keys) for token in given)


async def _deny(websocket: WebSocket) -> None:
    error = ApiError(
        401,
        "Missing or wrong API key: send 'Authorization: Bearer <key>' (the openai client's api_key=), or from a browser "
        f"the subprotocols '{PROTOCOL}' and '{KEY_PROTOCOL}<key>', or ?api_key=<key>.",
        code="invalid_api_key",
    )
    _logger.info("Refused a realtime session: %s", error.message)
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(error.response(headers={"WWW-Authenticate": "Bearer"}))
    else:  # the server answers 403 to a socket closed before it is accepted
        await websocket.close(CLOSE_POLICY)
