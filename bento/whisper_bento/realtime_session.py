"""A live transcription session, from its first event to its end (``whisper_bento.realtime``
accepts the socket): its audio, its turns and their decodes through the engine, its events."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import bentoml
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect

from whisper_bento import realtime_events as events
from whisper_bento.errors import ApiError
from whisper_bento.realtime_events import EventError, RealtimeSettings
from whisper_bento.realtime_turns import SAMPLE_RATE, Agreement, AudioBuffer, Pcm16, TurnDetector

with bentoml.importing():
    from mlflow_faster_whisper.errors import Cancelled, Overloaded

if TYPE_CHECKING:
    from mlflow_faster_whisper.decoding import DecodingOptions
    from mlflow_faster_whisper.engine import Ticket
    from whisper_bento.slots import Served

_logger = logging.getLogger(__name__)

CLOSE_TRY_LATER, CLOSE_POLICY = 1013, 1008
_MIN_INTERIM_S = 0.5  # a shorter turn is not worth an interim decode
_INTERIM_TICK_S = 0.05  # how often the open turn's audio is looked at for a due interim decode
_MIN_COMMIT_MS = 100  # OpenAI's smallest committed buffer


@dataclass(frozen=True)
class Backend:
    """What a session needs of the service: ``hold(model)`` (None: the default model) gives the
    model's holder and the version held until ``holder.release(version)``; ``resolve`` layers
    options as for files (raising the routes' ApiError); the API keys; the session limits."""

    hold: Callable[[Optional[str]], Awaitable[tuple[Any, Served]]]
    resolve: Callable[[Served, dict[str, Any]], DecodingOptions]
    keys: Optional[tuple[bytes, ...]]
    settings: RealtimeSettings


async def close_with_error(websocket: WebSocket, code: int, error_code: str, message: str) -> None:
    _logger.info("Closed a realtime session (%d): %s", code, message)
    try:
        await websocket.send_text(json.dumps(events.error_event(message, error_code, status=503 if code == CLOSE_TRY_LATER else 400)))
        await websocket.close(code, reason=error_code)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass


@dataclass(eq=False)
class Turn:
    """One turn of speech: its audio's first sample, the version it holds, its decodes."""

    item_id: str
    start: int
    holder: Any  # what the version is released to
    served: Served
    options: DecodingOptions
    end: Optional[int] = None
    interim_due: int = 0  # the sample the turn's audio must reach for its next interim decode
    agreement: Agreement = field(default_factory=Agreement)
    tickets: list[Ticket] = field(default_factory=list)
    final: Optional[asyncio.Future] = None
    _released: bool = False

    def __post_init__(self) -> None:
        self.interim_due = self.start + int(_MIN_INTERIM_S * SAMPLE_RATE)

    def submit(self, audio: Any, *, interim: bool = False) -> asyncio.Future:
        """Decode ``audio`` through the version's engine (raises Overloaded when it is full). An
        interim decode tries the first temperature only: its text is provisional, and a fallback
        would take several passes on the audio of a word cut in half."""
        from mlflow_faster_whisper.engine import Ticket

        ticket = Ticket()
        options = self.options.model_copy(update={"temperature": self.options.temperature[:1]}) if interim else self.options
        future = self.served.engine.submit(audio, options, ticket)
        self.tickets = [t for t in self.tickets if t.decode_s is None] + [ticket]
        return asyncio.wrap_future(future)

    def cancel_decodes(self) -> None:
        for ticket in self.tickets:
            ticket.cancel()

    def let_go(self) -> None:
        """Cancel its decodes and release its version, once."""
        self.cancel_decodes()
        if not self._released:
            self._released = True
            self.holder.release(self.served)


class Session:
    """A client's transcription session (see the module docstring)."""

    def __init__(self, websocket: WebSocket, backend: Backend, model: Optional[str]) -> None:
        self.ws, self.backend, self.settings = websocket, backend, backend.settings
        self.id = events.new_id("sess")
        self.expires_at = time.time() + self.settings.max_session_s
        self.config = events.SessionConfig(transcription={"model": model, "language": None, "prompt": None})
        self.pcm = Pcm16(self.config.rate)
        self.buffer = AudioBuffer()
        self.detector: Optional[TurnDetector] = None
        self.max_turn = int(self.settings.max_turn_s * SAMPLE_RATE)
        self.open: Optional[Turn] = None
        self.closed_at = 0  # the end of the last turn: the next one starts after it
        self.last_item: Optional[str] = None
        self.finishing: deque[Turn] = deque()
        self.finished = asyncio.Event()  # set when a turn joins ``finishing``
        self._send_lock = asyncio.Lock()
        self._reset_detector()

    # -- the session's life --------------------------------------------------------------------

    async def run(self) -> None:
        tasks = [asyncio.ensure_future(self._interim_decodes()), asyncio.ensure_future(self._final_texts())]
        try:
            await self.send({"type": "session.created", "session": self.config.describe(self.id, self.expires_at)})
            await self._receive()
        except (WebSocketDisconnect, OSError):
            pass
        finally:
            for task in tasks:
                task.cancel()
            turns = [turn for turn in [self.open, *self.finishing] if turn is not None]
            in_flight = sum(ticket.decode_s is None for turn in turns for ticket in turn.tickets)
            for turn in turns:
                turn.let_go()
            self.open = None
            self.finishing.clear()
            _logger.info("Realtime session %s ended; %d decode(s) in flight cancelled", self.id, in_flight)

    async def _receive(self) -> None:
        while True:
            left = self.expires_at - time.time()
            try:
                message = await asyncio.wait_for(self.ws.receive(), min(self.settings.idle_timeout_s, max(left, 0.001)))
            except asyncio.TimeoutError:
                expired = time.time() >= self.expires_at
                if not expired and self.finishing:  # quiet while it waits for text still owed: not idle
                    continue
                why = (
                    f"The session reached its {self.settings.max_session_s:g} s limit; open a new one."
                    if expired
                    else f"No event for {self.settings.idle_timeout_s:g} s; the session was closed."
                )
                await close_with_error(self.ws, CLOSE_POLICY, "session_expired" if expired else "idle_timeout", why)
                return
            if message["type"] == "websocket.disconnect":
                return
            event_id = None
            try:
                event = self._parse(message)
                event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
                await self._handle(event)
            except EventError as exc:
                await self.send(events.error_event(exc.message, exc.code, exc.param, event_id, exc.status))
            except (WebSocketDisconnect, OSError):
                raise
            except Exception as exc:  # the service's fault, not the session's: say so, and go on
                _logger.exception("A realtime event failed")
                await self.send(
                    events.error_event(
                        f"Internal error ({type(exc).__name__}); see the server log.", "server_error", event_id=event_id, status=500
                    )
                )

    def _parse(self, message: Any) -> dict:
        text = message.get("text")
        if text is None:
            raise EventError("Send events as JSON text messages, not binary ones.", "invalid_event")
        if len(text) > self.settings.max_event_bytes:
            raise EventError(
                f"The event is {len(text)} bytes, above this service's {self.settings.max_event_bytes}: append audio in smaller pieces.",
                "event_too_large",
                status=413,
            )
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):
            raise EventError("The event is not JSON.", "invalid_json") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise EventError("An event is a JSON object with a string 'type'.", "invalid_event", "type")
        return event

    async def _handle(self, event: dict) -> None:
        kind = event["type"]
        if kind == "session.update":
            await self._update(event.get("session"))
            await self.send({"type": "session.updated", "session": self.config.describe(self.id, self.expires_at)})
        elif kind == "input_audio_buffer.append":
            await self._append(event.get("audio"))
        elif kind == "input_audio_buffer.commit":
            await self._commit()
        elif kind == "input_audio_buffer.clear":
            if self.open is not None:
                self.open.let_go()
                self.open = None
            self.buffer.clear()
            self.closed_at = self.buffer.end
            self._reset_detector()
            await self.send({"type": "input_audio_buffer.cleared"})
        else:
            raise EventError(
                f"Unknown event type {kind[:80]!r}: a transcription session takes session.update and "
                "input_audio_buffer.append, .commit and .clear.",
                "unknown_event",
                "type",
            )

    # -- configuration ----------------------------------------------------------------------------

    async def _update(self, session: Any) -> None:
        """Apply a session.update: all of it, or (an error) none of it."""
        config = self.config.updated(session)
        if config.transcription != self.config.transcription:
            await self._check(config.transcription)
        if config.rate != self.config.rate:
            self.pcm = Pcm16(config.rate)
        vad_changed = config.vad != self.config.vad
        self.config = config
        if vad_changed:
            self._reset_detector()

    async def _check(self, transcription: dict[str, Any]) -> None:
        """Resolve the options on the served version now, so a bad language fails the update."""
        holder, served = await self._hold(transcription["model"])
        try:
            self.backend.resolve(served, self._overrides(transcription))
        except ApiError as exc:
            raise EventError(
                exc.message, exc.code or "invalid_value", f"session.audio.input.transcription.{events.option_field(exc.param)}", exc.status
            ) from None
        finally:
            holder.release(served)

    async def _hold(self, model: Optional[str]) -> tuple[Any, Served]:
        try:
            return await self.backend.hold(model)
        except ApiError as exc:
            raise EventError(exc.message, exc.code or "model_not_found", "session.audio.input.transcription.model", exc.status) from None

    @staticmethod
    def _overrides(transcription: dict[str, Any]) -> dict[str, Any]:
        overrides = {}
        if transcription["language"] is not None:
            overrides["language"] = transcription["language"]
        if transcription["prompt"] is not None:
            overrides["initial_prompt"] = transcription["prompt"]
        return overrides

    def _reset_detector(self) -> None:
        position = self.buffer.end
        vad = self.config.vad
        self.detector = None if vad is None else TurnDetector(vad, self.max_turn, position, self.open.start if self.open else None)

    # -- audio and turns --------------------------------------------------------------------------

    async def _append(self, audio: Any) -> None:
        if not isinstance(audio, str):
            raise EventError("input_audio_buffer.append needs 'audio': base64 PCM16.", "invalid_value", "audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise EventError("'audio' is not valid base64.", "invalid_audio", "audio") from None
        if len(data) % 2:
            raise EventError("'audio' must be whole 16-bit samples (an even number of bytes).", "invalid_audio", "audio")
        samples = await run_in_threadpool(self.pcm, data)
        held_from = self.open.start if self.open is not None else self.buffer.start
        if self.config.vad is None and self.buffer.end + len(samples) - held_from > self.max_turn:
            raise EventError(
                f"The input audio buffer would hold more than {self.settings.max_turn_s:g} s: commit or clear it first.",
                "input_audio_buffer_full",
                "audio",
            )
        self.buffer.append(samples)
        if self.detector is None:
            if self.open is None and self.buffer.end > self.buffer.start:
                await self._open(self.buffer.start)
            return
        boundaries = await run_in_threadpool(self.detector.feed, samples, max(self.closed_at, self.buffer.start))
        for boundary in boundaries:
            if boundary.kind == "started":
                try:
                    await self._open(boundary.sample)
                except EventError as exc:  # this turn goes untranscribed; the session goes on
                    await self.send(events.error_event(exc.message, exc.code, exc.param, status=exc.status))
                if self.open is not None:
                    await self.send(
                        {
                            "type": "input_audio_buffer.speech_started",
                            "audio_start_ms": events.ms(boundary.sample),
                            "item_id": self.open.item_id,
                        }
                    )
            elif self.open is not None:
                item = self.open.item_id
                await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": events.ms(boundary.sample), "item_id": item})
                await self._close(boundary.sample)
        if self.open is None:
            prefix = self.config.vad.prefix_padding_ms * SAMPLE_RATE // 1000 if self.config.vad else 0
            self.buffer.trim(max(self.closed_at, self.detector.position - prefix))

    async def _open(self, start: int) -> None:
        holder, served = await self._hold(self.config.transcription["model"])
        try:
            options = self.backend.resolve(served, self._overrides(self.config.transcription))
        except ApiError as exc:
            holder.release(served)
            raise EventError(exc.message, exc.code or "invalid_value", None, exc.status) from None
        except BaseException:
            holder.release(served)
            raise
        self.open = Turn(events.new_id("item"), start, holder, served, options)

    async def _commit(self) -> None:
        if self.open is None and self.buffer.end - max(self.buffer.start, self.closed_at) > 0:
            await self._open(max(self.buffer.start, self.closed_at))
        turn = self.open
        if turn is None or (self.buffer.end - turn.start) * 1000 < _MIN_COMMIT_MS * SAMPLE_RATE:
            raise EventError(
                f"The input audio buffer holds less than {_MIN_COMMIT_MS} ms of audio: append audio before committing.",
                "input_audio_buffer_commit_empty",
            )
        await self._close(self.buffer.end)
        self._reset_detector()

    async def _close(self, end: int) -> None:
        """The open turn ends at sample ``end``: committed, and its final decode started."""
        turn, self.open = self.open, None
        if turn is None:
            return
        turn.end, self.closed_at = end, end
        turn.cancel_decodes()  # an interim decode in flight is of no use now
        await self.send({"type": "input_audio_buffer.committed", "item_id": turn.item_id, "previous_item_id": self.last_item})
        self.last_item = turn.item_id
        try:
            if len(self.finishing) >= self.settings.max_pending_turns:
                raise Overloaded(f"{len(self.finishing)} turns of this session are still being transcribed")
            turn.final = turn.submit(self.buffer.slice(turn.start, end))
        except Overloaded as exc:
            turn.let_go()
            await self._failed(turn, f"The service is overloaded ({exc}); this turn was not transcribed.")
            return
        finally:
            self.buffer.trim(end)
        self.finishing.append(turn)
        self.finished.set()

    async def _interim_decodes(self) -> None:
        """Decode the open turn again every ``partial_interval_s``, one decode at a time, and send
        the words two successive decodes agree on."""
        loop = asyncio.get_running_loop()
        interval = self.settings.partial_interval_s
        last_started = -interval
        while True:
            # Due by the audio, not by a clock of its own: the first decode as soon as the turn
            # holds _MIN_INTERIM_S, the next once it grew by an interval (and an interval later).
            await asyncio.sleep(min(interval, _INTERIM_TICK_S))
            turn = self.open
            if turn is None:
                continue
            end = self.buffer.end
            if end < turn.interim_due or loop.time() - last_started < interval:
                continue
            turn.interim_due, last_started = end + int(interval * SAMPLE_RATE), loop.time()
            try:
                result = await turn.submit(self.buffer.slice(turn.start, end), interim=True)
            except (Cancelled, Overloaded):
                continue
            except Exception:
                _logger.exception("An interim decode of a live turn failed")
                continue
            if turn is self.open:  # a closed turn's final decode decides its last delta
                delta = turn.agreement.update(result.text)
                if delta:
                    await self.send(events.delta(turn.item_id, delta))

    async def _final_texts(self) -> None:
        """Send each committed turn's transcript, in the order the turns were committed."""
        while True:
            while not self.finishing:
                self.finished.clear()
                await self.finished.wait()
            turn = self.finishing[0]
            assert turn.final is not None
            try:
                result = await turn.final
            except Exception as exc:
                self.finishing.popleft()
                turn.let_go()
                await self._failed(turn, f"The turn could not be transcribed: {type(exc).__name__}: {exc}")
                continue
            self.finishing.popleft()
            turn.let_go()
            delta = turn.agreement.finish(result.text)
            if delta:
                await self.send(events.delta(turn.item_id, delta))
            await self.send(
                {
                    "type": "conversation.item.input_audio_transcription.completed",
                    "item_id": turn.item_id,
                    "content_index": 0,
                    "transcript": result.text,
                    "usage": {"type": "duration", "seconds": round((turn.end or turn.start) / SAMPLE_RATE - turn.start / SAMPLE_RATE, 3)},
                }
            )

    async def _failed(self, turn: Turn, message: str) -> None:
        await self.send(
            {
                "type": "conversation.item.input_audio_transcription.failed",
                "item_id": turn.item_id,
                "content_index": 0,
                "error": {"type": "server_error", "code": "overloaded", "message": message, "param": None},
            }
        )

    async def send(self, event: dict[str, Any]) -> None:
        """Send one event; to a client already gone, nothing (the receiving side ends the session)."""
        async with self._send_lock:
            try:
                await self.ws.send_text(json.dumps({"event_id": events.new_id("event"), **event}, ensure_ascii=False))
            except (WebSocketDisconnect, RuntimeError, OSError):
                pass
