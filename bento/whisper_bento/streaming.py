"""A request's life beside its client: streaming responses (server-sent events as segments are
decoded) and work that is given up as soon as the client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import bentoml
from fastapi import Request
from starlette.responses import Response, StreamingResponse

from whisper_bento.errors import ApiError, overloaded_error

with bentoml.importing():
    from mlflow_faster_whisper import transcription
    from mlflow_faster_whisper.decoding import DecodingOptions
    from mlflow_faster_whisper.errors import Overloaded

if TYPE_CHECKING:
    import numpy as np

    from mlflow_faster_whisper.engine import Ticket
    from whisper_bento.slots import Served

_logger = logging.getLogger(__name__)

T = TypeVar("T")


class Holder(Protocol):
    """What a request's hold on a version is given back to (a model's entry, a slot)."""

    def release(self, served: Served) -> None: ...


async def respond(
    slot: Holder, served: Served, request: Request, audio: np.ndarray, options: DecodingOptions, threads: ThreadPoolExecutor
) -> Response:
    """Server-sent events as segments are decoded (OpenAI's transcript.text.* events); the
    windows go through the engine's shared passes like every other request's. It owns the
    request's hold on ``served`` from its first line (see ``Stream``)."""
    from mlflow_faster_whisper.engine import Ticket

    stream = Stream(slot, served, Ticket(), threads)
    try:
        info = await unless_gone(request, stream.run(stream.start, audio, options), abandon=stream.close)
    except Overloaded as exc:
        stream.close()
        raise overloaded_error(exc) from None
    except BaseException:
        stream.close()
        raise
    return EventStream(stream, _events(stream, request, info, options), media_type="text/event-stream")


async def _events(stream: Stream, request: Request, info: Any, options: DecodingOptions) -> AsyncIterator[str]:
    """The events, each segment taken on the stream's thread while the client is watched: a
    client gone (before the first event or between two) ends the stream at once."""
    try:
        done = []
        while (segment := await unless_gone(request, stream.run(stream.next_segment), abandon=stream.close)) is not None:
            done.append(segment)
            yield sse({"type": "transcript.text.delta", "delta": segment.text, "segment": segment.model_dump()})
        yield sse(
            {
                "type": "transcript.text.done",
                "text": transcription.join_text(done),
                "language": info.language,
                "duration": float(info.duration),
                "decoding": options.model_dump(mode="json"),
                "model": stream.served.model_info,
            }
        )
    except ApiError as exc:  # the client has gone: nobody reads an event any more
        _logger.info("Stream ended: %s", exc.message)
    except Exception as exc:  # the status line is sent already: report in the stream
        _logger.exception("Streaming transcription failed")
        yield sse({"type": "error", **ApiError(500, f"{type(exc).__name__}: {exc}").body()})
    finally:
        stream.close()


class Stream:
    """A streaming request's hold on its version and on the engine, let go of once, however the
    stream ends: answered, failed, or its client gone (while queued for the model, before the
    first event, between two).

    One stream thread at a time is inside its segments. Closing cancels the engine ticket (its
    waiting windows leave the queue, its next model call fails), then, once no thread is inside
    (a running generator cannot be closed), closes the segments and releases the version.
    """

    def __init__(self, slot: Holder, served: Served, ticket: Ticket, threads: ThreadPoolExecutor) -> None:
        self.slot, self.served, self.ticket = slot, served, ticket
        self._threads = threads
        self._segments: Any = None  # the engine's segments generator, once started
        self._inside: Future | None = None  # the last work handed to a stream thread
        self._lock = threading.Lock()
        self._closed = False

    def start(self, audio: np.ndarray, options: DecodingOptions) -> Any:
        """(On a stream thread.) Admit the request to the engine; faster-whisper's info."""
        self._segments, info = self.served.engine.stream(audio, options, self.ticket)
        return info

    def next_segment(self) -> Any:
        """(On a stream thread.) The next segment, or None after the last."""
        return next(self._segments, None)

    def run(self, work: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``work(*args)`` on a stream thread; awaiting it can be given up at any time."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the stream is closed")
            self._inside = self._threads.submit(work, *args)
            return asyncio.wrap_future(self._inside)

    def close(self) -> None:
        """Let go, from any thread, any number of times: now, or when the thread inside returns."""
        self.ticket.cancel()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            inside = self._inside
        if inside is None:
            self._release()
        else:
            inside.add_done_callback(lambda _: self._release())

    def _release(self) -> None:
        try:
            if self._segments is not None:
                self._segments.close()  # the engine's hold on the request
        finally:
            self.slot.release(self.served)

    def __del__(self) -> None:  # a response never sent (its request cancelled in between)
        self.close()


class EventStream(StreamingResponse):
    """A ``Stream``'s events; the stream is let go of when the response ends, however it ends:
    Starlette neither closes nor resumes an events iterator whose client went or whose send failed."""

    def __init__(self, stream: Stream, events: AsyncIterator[str], **options: Any) -> None:
        super().__init__(events, **options)
        self._stream = stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.close()


async def _client_gone(request: Request, every_s: float = 0.2) -> None:
    """Returns once the client has closed its connection."""
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)


async def unless_gone(request: Request, work: Awaitable[T], *, abandon: Callable[[], None]) -> T:
    """``work``'s result, unless its client closes the connection first (499) or this request is
    cancelled (BentoML's timeout): then ``abandon()`` lets go of what the work holds, and the
    work's result, whenever it comes, is dropped."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.add_done_callback(_drop_result)
            abandon()
    if not task.done():
        raise ApiError(499, "The client closed the connection before the answer; the request was dropped.")
    return task.result()


def _drop_result(work: asyncio.Future) -> None:
    if not work.cancelled():
        work.exception()  # read: an abandoned work's error is nobody's to log


def nothing() -> None:
    """Abandoning the work lets go of nothing (it holds neither a version nor the engine)."""


def sse(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
