"""One batched decoding engine for every front-end; its unit of work is a 30 s window.

Each request runs faster-whisper's own decoding (``transcription.stream_segments``: sequential
long-form, or the batched pipeline) on its own thread, against a view of the model whose
CTranslate2 calls (``encode``, ``generate``, ``detect_language``, ``align``) are not run on that
thread but handed to the engine. One scheduler thread runs every forward pass: it takes the
first waiting call in turn and every other waiting call that can share its CTranslate2 call, up
to ``batch_size`` windows, runs them as one batch and hands each request its rows back.

- Any encode shares a pass with any other of the same kind of request (short or long, below); a
  generate shares one with every generate whose decoding arguments are the same, whatever its
  prompt (language, task, previous text): one prompt per batch item. Requests whose arguments
  differ form their own passes, taken in turn.
- A request alone makes exactly the calls ``WhisperModel.transcribe`` makes, with the same
  inputs: it decodes the same text, and starts at once.
- A long file's windows go one after the other (seek, previous text, temperature fallback are
  faster-whisper's own), each step sharing a pass with other long requests' windows. Short
  requests (one window) go first and share passes among themselves: one sent while a file
  decodes waits for the pass in flight, not behind the file. A call passed over twice goes
  next, so a file keeps going under a stream of short requests.
- The service's requests (streaming too), the pyfunc's rows and an evaluation's utterances all
  go through it, so they all share passes.
- On a CPU an encode pass runs its windows through the encoder one at a time: there a window
  costs more batched than alone, while generate's cost per window falls (BENCHMARKS.md
  section 2). On a GPU both calls are batched.

Which calls share a pass, how long a pass waits for company and how an encode pass is split are
``batching.BatchPolicy``'s decisions; this module runs them on its threads.

CTranslate2 is only ever called from the scheduler thread: one thread's CUDA and allocator state.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from mlflow_faster_whisper import transcription
from mlflow_faster_whisper.batching import BatchPolicy
from mlflow_faster_whisper.constants import SAMPLE_RATE
from mlflow_faster_whisper.decoding import DecodingOptions
from mlflow_faster_whisper.errors import Cancelled, Overloaded
from mlflow_faster_whisper.malloc import release_free_memory
from mlflow_faster_whisper.transcription import Segment, Transcription

_logger = logging.getLogger(__name__)

# Whisper's window: a request with more audio than this is long (several windows, in turn).
_WINDOW_SAMPLES = 30 * SAMPLE_RATE


@dataclass(frozen=True)
class PassStats:
    """One forward pass: what ran, for how many windows of which requests."""

    op: str
    windows: int
    requests: int
    seconds: float
    tickets: tuple[Ticket, ...] = ()
    waited_passes: int = 0  # other engines' passes that went while this one waited for its turn (``Turns``)
    started_at: float = 0.0  # time.monotonic() when it started


@dataclass
class Ticket:
    """A request in the engine: cancel it, and read how it was batched."""

    submitted: float = field(default_factory=time.monotonic)
    queue_wait_s: Optional[float] = None  # submission to its first forward pass
    decode_s: Optional[float] = None  # submission to its result (or error)
    max_requests_per_pass: int = 1  # the most requests that shared one of its passes
    pass_s: float = 0.0  # time in the forward passes it took part in
    cancelled: bool = False
    long: bool = False  # more than one 30 s window of audio (set by the engine at submission)

    def cancel(self) -> None:
        """Drop its waiting windows; its thread stops at its next model call."""
        self.cancelled = True


class Engine:
    """Decodes every submitted request through shared forward passes of one model.

    Args:
        model: a ``faster_whisper.WhisperModel``.
        batch_size, gather_s, encode_batch_size: its ``BatchPolicy`` (None: the policy's default).
        max_requests: requests held at once (decoding or waiting for a thread); one more is
            refused with ``Overloaded``.
        max_wait_s: a request that waits longer than this for its first pass is refused with
            ``Overloaded`` (a full engine answers "retry later" rather than queueing forever).
        on_pass: called after each forward pass with its ``PassStats`` (metrics).
        defer: while it returns True, no pass is run (a shadow engine defers to the engine
            serving production: it uses only the time that one leaves idle).
        turns: the device's turn-taker, shared with the engines of other models on it: each
            pass waits for its turn, so one model's burst cannot starve another's request.

    Options submitted are taken as checked against the model: the engine belongs to a
    ``loaded.LoadedVersion``, whose ``resolve`` (every front-end's) has run ``check_options``.
    """

    def __init__(
        self,
        model,
        *,
        batch_size: Optional[int] = None,
        max_requests: int = 64,
        max_wait_s: float = 600.0,
        gather_s: Optional[float] = None,
        encode_batch_size: Optional[int] = None,
        on_pass: Optional[Callable[[PassStats], None]] = None,
        defer: Optional[Callable[[], bool]] = None,
        turns: Optional[Turns] = None,
    ) -> None:
        given: dict[str, Any] = {"batch_size": batch_size, "gather_s": gather_s, "encode_batch_size": encode_batch_size}
        self.policy = BatchPolicy(**{k: v for k, v in given.items() if v is not None})
        if max_requests < 1:
            raise ValueError("max_requests must be at least 1")
        self.model = model
        self.max_requests = max_requests
        self.max_wait_s = max_wait_s
        self.on_pass = on_pass
        self.defer = defer
        self.turns = turns
        self._ct2 = model.model
        self._cond = threading.Condition()
        self._waiting: list[_Call] = []
        self._held = 0  # requests admitted and not finished
        self._computing = 0  # admitted requests whose thread is not waiting on a call
        self._closed = False
        # Enough threads to fill two passes; more requests wait for a thread (they are held).
        self._threads = ThreadPoolExecutor(max_workers=max(2 * self.batch_size, 4), thread_name_prefix="whisper-request")
        self._scheduler = threading.Thread(target=self._run, name="whisper-engine", daemon=True)
        self._scheduler.start()

    @property
    def batch_size(self) -> int:
        """The most windows one forward pass takes."""
        return self.policy.batch_size

    @property
    def encode_batch_size(self) -> int:
        """The most windows one encoder call takes, on this model's device."""
        return self.policy.encoder_batch_size(self._ct2.device)

    # -- front-ends -------------------------------------------------------------------------

    def submit(self, audio: np.ndarray, options: DecodingOptions, ticket: Optional[Ticket] = None) -> Future:
        """Start decoding; a future of its ``Transcription``.

        Raises:
            Overloaded: the engine holds ``max_requests`` already.
        """
        ticket = _admitted_ticket(ticket, audio)
        self._admit(computing=False)  # computing once a thread takes it
        try:
            return self._threads.submit(self._decode, audio, options, ticket)
        except BaseException:
            self._release(computing=False)
            raise

    def transcribe(self, audio: np.ndarray, options: DecodingOptions) -> Transcription:
        """Decode one request and wait for it (a front-end's thread)."""
        return self.submit(audio, options).result()

    def transcribe_many(
        self, items: Iterable[tuple[np.ndarray, DecodingOptions] | BaseException], *, window: Optional[int] = None
    ) -> Iterator[tuple[Optional[Ticket], Transcription | BaseException]]:
        """Decode items through shared passes; yields, in order, (ticket, result or its own exception).

        Items are taken lazily, at most ``window`` in flight (default: two passes' worth), so a
        large batch of rows is never all in memory as audio; an item that is an exception is
        passed through as its result (with no ticket).
        """
        window = window or min(self.max_requests, 2 * self.batch_size)
        in_flight: collections.deque[tuple[Optional[Ticket], Future | BaseException]] = collections.deque()
        for item in items:
            while len(in_flight) >= window:
                yield _settled(*in_flight.popleft())
            if isinstance(item, BaseException):
                in_flight.append((None, item))
                continue
            ticket = Ticket()
            while True:
                try:
                    in_flight.append((ticket, self.submit(*item, ticket)))
                    break
                except Overloaded:  # other front-ends fill the engine: wait for one of ours
                    if not in_flight:
                        time.sleep(0.05)
                        continue
                    yield _settled(*in_flight.popleft())
        while in_flight:
            yield _settled(*in_flight.popleft())

    def stream(self, audio: np.ndarray, options: DecodingOptions, ticket: Optional[Ticket] = None):
        """(segments iterator, faster-whisper info); decoded as the caller iterates, in passes
        shared with every other request. Close the iterator (or cancel the ticket) to stop.

        Raises:
            Overloaded: the engine holds ``max_requests`` already.
        """
        ticket = _admitted_ticket(ticket, audio)
        self._admit(computing=True)  # the caller's thread runs it
        try:
            segments, info = transcription.stream_segments(self._view(ticket), audio, options, batch_size=self.batch_size, checked=True)
        except BaseException:
            self._release(computing=True)
            raise
        return _Held(segments, lambda: self._release(computing=True)), info

    def busy(self) -> bool:
        """Whether it holds a request (decoding, or waiting for the model)."""
        return self._held > 0

    @property
    def held(self) -> int:
        """Requests it holds now (decoding, or waiting for the model); at ``max_requests`` it admits no more."""
        return self._held

    def close(self, wait: bool = False) -> None:
        """Stop: the calls already waiting are run, a request's later calls fail with ``Cancelled``,
        and it returns once the scheduler has ended. With ``wait``, also once the request threads
        have ended (they hold the model until then).

        The scheduler is joined because its thread may hold the last reference to the model: the
        model's destructor releases the GIL, and a thread that takes it back while the interpreter
        exits is ended mid-destructor, which aborts the process (``terminate called without an
        active exception``, exit status 134, seen with ``close()`` just before exit).
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._threads.shutdown(wait=wait, cancel_futures=True)
        if threading.current_thread() is not self._scheduler:
            self._scheduler.join()

    # -- requests ---------------------------------------------------------------------------

    def _admit(self, *, computing: bool) -> None:
        with self._cond:
            if self._held >= self.max_requests:
                raise Overloaded(f"{self._held} requests are being decoded, the most this engine holds")
            self._held += 1
            self._computing += int(computing)

    def _release(self, *, computing: bool) -> None:
        with self._cond:
            self._held -= 1
            if computing:
                self._computing -= 1
            self._cond.notify_all()
            idle = self._held == 0
        if idle:  # not between two passes of a request, whose next pass would fault the pages back in
            release_free_memory()

    def _decode(self, audio: np.ndarray, options: DecodingOptions, ticket: Ticket) -> Transcription:
        with self._cond:
            self._computing += 1
        try:
            if ticket.cancelled:
                raise Cancelled("the request was cancelled")
            return transcription.transcribe(self._view(ticket), audio, options, batch_size=self.batch_size, checked=True)
        finally:
            ticket.decode_s = time.monotonic() - ticket.submitted
            self._release(computing=True)

    def _view(self, ticket: Ticket):
        """The model as one request sees it: its CTranslate2 calls go through the engine."""
        return transcription.with_ct2(self.model, _Routed(self, ticket))

    def _call(self, ticket: Ticket, op: str, key: tuple, windows: int, args: dict[str, Any]) -> Any:
        """Queue one model call of a request's thread and wait for its result."""
        call = _Call(ticket, op, key, windows, args)
        with self._cond:
            if ticket.cancelled:
                raise Cancelled("the request was cancelled")
            if self._closed:
                raise Cancelled("the engine was closed before the request was decoded; send it again")
            self._waiting.append(call)
            self._computing -= 1  # until the scheduler settles the call (_settle)
            self._cond.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    # -- the scheduler ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed and not self._waiting:
                    return
            while self.defer is not None and not self._closed and self.defer():
                time.sleep(0.005)
            with self.turns.turn() if self.turns is not None else contextlib.nullcontext(0) as waited:
                with self._cond:
                    self._wait_for_company()
                    batch = self._next_batch()
                if batch:
                    self._execute(batch, waited_passes=waited)

    def _wait_for_company(self) -> None:
        """Wait (briefly) for the windows of requests that are about to make their next call."""
        deadline = time.monotonic() + self.policy.gather_s
        while self.policy.gathers(sum(c.windows for c in self._waiting), self._computing):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _next_batch(self) -> list[_Call]:
        """Settle the cancelled and expired calls, then take the policy's next batch of the rest."""
        now = time.monotonic()
        live: list[_Call] = []
        for call in self._waiting:
            ticket = call.ticket
            if ticket.cancelled:
                self._settle([call], error=Cancelled("the request was cancelled"))
            elif ticket.queue_wait_s is None and now - ticket.submitted > self.max_wait_s:
                self._settle([call], error=Overloaded(f"waited {now - ticket.submitted:.1f} s for the model"))
            else:
                live.append(call)
        batch = self.policy.next_batch(live)
        taken = {id(c) for c in batch}
        self._waiting = [c for c in live if id(c) not in taken]
        for call in self.policy.passed_over(live, batch):
            call.skips += 1
        return batch

    def _execute(self, batch: list[_Call], waited_passes: int = 0) -> None:
        started = time.perf_counter()
        now = time.monotonic()
        tickets = tuple({id(c.ticket): c.ticket for c in batch}.values())
        requests = len(tickets)
        for call in batch:
            if call.ticket.queue_wait_s is None:
                call.ticket.queue_wait_s = now - call.ticket.submitted
            call.ticket.max_requests_per_pass = max(call.ticket.max_requests_per_pass, requests)
        try:
            results = _OPS[batch[0].op](self, batch)
        except Exception as exc:
            if len(batch) == 1:
                self._settle(batch, error=exc)
            else:  # one bad call must not fail the others: run each alone
                for call in batch:
                    self._execute([call])
                return
        else:
            self._settle(batch, results)
        seconds = time.perf_counter() - started
        for ticket in tickets:
            ticket.pass_s += seconds
        if self.on_pass is not None:
            stats = PassStats(batch[0].op, sum(c.windows for c in batch), requests, seconds, tickets, waited_passes, now)
            try:
                self.on_pass(stats)
            except Exception:  # metrics must never stop decoding
                _logger.exception("on_pass failed")

    def _settle(self, calls: list[_Call], results: Optional[list[Any]] = None, error: Optional[BaseException] = None) -> None:
        """Answer calls, each with its result or ``error``. Their threads compute again from now
        on: the next pass waits for their next calls (``gather_s``) although they have not woken yet."""
        with self._cond:
            self._computing += len(calls)
            for i, call in enumerate(calls):
                call.result, call.error = (results[i] if results is not None else None), error
                call.done.set()

    # -- the CTranslate2 calls, batched -----------------------------------------------------

    def _encode(self, batch: list[_Call]) -> list[_Encoded]:
        calls = self.policy.encoder_calls(sum(c.windows for c in batch), self._ct2.device)
        if len(batch) == 1 and len(calls) <= 1:  # as faster-whisper made it
            block = _Block(self._ct2.encode(batch[0].args["features"], to_cpu=False))
        else:
            features = _HostStorage(np.concatenate([np.asarray(c.args["features"]) for c in batch]))
            if len(calls) <= 1:
                block = _Block(self._ct2.encode(features.view, to_cpu=False))
            else:  # in the policy's encoder calls, their outputs stacked on the host
                parts = [_HostStorage(features.array[r.start : r.stop]) for r in calls]
                block = _Block.stacked([_Block(self._ct2.encode(p.view, to_cpu=False)).host() for p in parts])
        encoded, row = [], 0
        for call in batch:
            encoded.append(_Encoded(block, range(row, row + call.windows)))
            row += call.windows
        return encoded

    def _generate(self, batch: list[_Call]) -> list[list[Any]]:
        features, _ = _rows([c.args["encoder_output"] for c in batch])
        prompts = [p for c in batch for p in c.args["prompts"]]
        return _split(self._ct2.generate(features, prompts, **batch[0].args["kwargs"]), batch)

    def _detect_language(self, batch: list[_Call]) -> list[list[Any]]:
        features, _ = _rows([c.args["encoder_output"] for c in batch])
        return _split(self._ct2.detect_language(features), batch)

    def _align(self, batch: list[_Call]) -> list[Any]:
        (call,) = batch  # word alignment runs per call (its key is unique)
        a = call.args
        features, _ = _rows([a["encoder_output"]])
        return [self._ct2.align(features, a["start_sequence"], a["text_tokens"], a["num_frames"], **a["kwargs"])]


class Turns:
    """Forward passes on one device taken in turn by the engines of several models.

    One pass at a time, in the order the engines asked: an engine asks again after each of its
    passes, so it goes behind every engine already waiting (round robin among those with work),
    and a model's lone request waits at most one pass of each other model per pass of its own.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()
        self._busy = False
        self.passes = 0  # passes run under a turn, all engines together

    @contextlib.contextmanager
    def turn(self) -> Iterator[int]:
        """Hold the device for one pass; yields how many passes went while this one waited."""
        me = object()
        with self._cond:
            asked = self.passes
            self._queue.append(me)
            while self._busy or self._queue[0] is not me:
                self._cond.wait()
            self._queue.popleft()
            self._busy = True
            waited = self.passes - asked
        try:
            yield waited
        finally:
            with self._cond:
                self._busy = False
                self.passes += 1
                self._cond.notify_all()


def _admitted_ticket(ticket: Optional[Ticket], audio: np.ndarray) -> Ticket:
    ticket = ticket or Ticket()
    ticket.long = len(audio) > _WINDOW_SAMPLES
    return ticket


def _settled(ticket: Optional[Ticket], pending: Future | BaseException) -> tuple[Optional[Ticket], Transcription | BaseException]:
    if isinstance(pending, BaseException):
        return ticket, pending
    try:
        return ticket, pending.result()
    except Exception as exc:
        return ticket, exc


_OPS: dict[str, Callable[[Engine, list[_Call]], list[Any]]] = {
    "encode": Engine._encode,
    "generate": Engine._generate,
    "detect_language": Engine._detect_language,
    "align": Engine._align,
}


class _Held:
    """A streaming request's segments; the engine holds the request until they are exhausted or
    closed (or, as a last resort, collected: a response that never started is never iterated)."""

    def __init__(self, segments: Generator[Segment, None, None], release: Callable[[], None]) -> None:
        self._segments, self._release, self._open = segments, release, True

    def __iter__(self) -> _Held:
        return self

    def __next__(self) -> Segment:
        try:
            return next(self._segments)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                self._segments.close()
            finally:
                self._release()

    def __del__(self) -> None:
        self.close()


@dataclass(eq=False)
class _Call:
    ticket: Ticket
    op: str
    key: tuple
    windows: int
    args: dict[str, Any]
    skips: int = 0  # passes that went before it although it was older
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: Optional[BaseException] = None

    @property
    def long(self) -> bool:
        return self.ticket.long


class _Block:
    """One encode pass's output; rows are read back on the host only when passes regroup them."""

    def __init__(self, storage, host: Optional[np.ndarray] = None) -> None:
        self.storage = storage
        self.size = storage.shape[0]
        self._host = host  # the array ``storage`` borrows, if it was built from one

    @classmethod
    def stacked(cls, parts: list[np.ndarray]) -> _Block:
        host = _HostStorage(np.concatenate(parts))
        return cls(host.view, host.array)

    def host(self) -> np.ndarray:
        if self._host is None:
            import ctranslate2

            storage = self.storage if self.storage.device == "cpu" else self.storage.to_device(ctranslate2.Device.cpu)
            self._host = np.array(storage, copy=True)
        return self._host


@dataclass(frozen=True)
class _Encoded:
    """What faster-whisper gets for an ``encode``: opaque, handed back to the engine's calls."""

    block: _Block
    rows: range


def _rows(encoded: list[_Encoded]) -> tuple[Any, Optional[_HostStorage]]:
    """The encoder output of the given rows, in order, as one batch: a pass's own output when it
    is exactly that, else the rows stacked on the host (with the array to keep alive)."""
    blocks = {id(e.block) for e in encoded}
    if len(blocks) == 1:
        block = encoded[0].block
        if [r for e in encoded for r in e.rows] == list(range(block.size)):
            return block.storage, None
    stacked = _HostStorage(np.stack([e.block.host()[r] for e in encoded for r in e.rows]))
    return stacked.view, stacked


class _HostStorage:
    """A StorageView over a host array, with the array it borrows (``from_array`` does not copy)."""

    def __init__(self, array: np.ndarray) -> None:
        import ctranslate2

        self.array = np.ascontiguousarray(array)
        self.view = ctranslate2.StorageView.from_array(self.array)


def _split(results: list[Any], batch: list[_Call]) -> list[list[Any]]:
    out, row = [], 0
    for call in batch:
        out.append(results[row : row + call.windows])
        row += call.windows
    return out


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


class _Routed:
    """A request's view of the CTranslate2 model: its forward passes go through the engine."""

    def __init__(self, engine: Engine, ticket: Ticket) -> None:
        self._engine = engine
        self._ticket = ticket

    def __getattr__(self, name: str) -> Any:  # device, is_multilingual, n_mels, ...
        return getattr(self._engine._ct2, name)

    def encode(self, features, to_cpu: bool = False) -> _Encoded:
        # Windows of one length share a pass (a window encoded at its own length has fewer frames).
        key = ("encode", tuple(features.shape[1:]))
        return self._engine._call(self._ticket, "encode", key, features.shape[0], {"features": features})

    def generate(self, encoder_output: _Encoded, prompts, **kwargs) -> list[Any]:
        key = ("generate", _freeze(kwargs))
        args = {"encoder_output": encoder_output, "prompts": prompts, "kwargs": kwargs}
        return self._engine._call(self._ticket, "generate", key, len(encoder_output.rows), args)

    def detect_language(self, encoder_output: _Encoded) -> list[Any]:
        args = {"encoder_output": encoder_output}
        return self._engine._call(self._ticket, "detect_language", ("detect_language",), len(encoder_output.rows), args)

    def align(self, encoder_output: _Encoded, start_sequence, text_tokens, num_frames, **kwargs) -> list[Any]:
        args = {
            "encoder_output": encoder_output,
            "start_sequence": start_sequence,
            "text_tokens": text_tokens,
            "num_frames": num_frames,
            "kwargs": kwargs,
        }
        return self._engine._call(self._ticket, "align", ("align", object()), len(encoder_output.rows), args)
