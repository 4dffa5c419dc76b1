"""Adaptive batching inside the worker: concurrent requests are decoded together.

A request that finds the model idle is decoded at once: a lone request never waits for company.
Requests that arrive while a batch is decoding queue up and go together as the next batch, up to
``max_batch_size``. The audio stays in memory: no serialization, no spool file, no loopback call.

Batches run on one dedicated thread, not on the event loop's shared pool: the model is used by
one batch at a time anyway, and glibc gives each thread that allocates its own malloc arena, so
decoding on whichever pool thread is free spreads the decoder's buffers over many arenas that
each keep their freed pages (the worker's RSS grew in steps as more pool threads took a turn).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, Optional, TypeVar

J = TypeVar("J")
R = TypeVar("R")


class Overloaded(Exception):
    """The request waited in the queue longer than ``max_wait_s``; it was not decoded."""


class Batcher(Generic[J, R]):
    """Runs ``decode(jobs) -> results`` (in a thread) on batches of the jobs submitted."""

    def __init__(self, decode: Callable[[list[J]], Sequence[R]], *, max_batch_size: int, max_wait_s: float) -> None:
        self._decode = decode
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._queue: collections.deque[tuple[J, asyncio.Future, float]] = collections.deque()
        self._worker: Optional[asyncio.Task] = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="whisper-decode")

    async def submit(self, job: J) -> tuple[R, int]:
        """The job's result and the number of jobs decoded in its batch."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((job, future, time.monotonic()))
        if self._worker is None:
            self._worker = loop.create_task(self._run())
        return await future

    async def _run(self) -> None:
        try:
            while self._queue:
                batch = self._next_batch()
                if not batch:
                    continue
                try:
                    results = await asyncio.get_running_loop().run_in_executor(
                        self._thread, self._decode, [job for job, _ in batch]
                    )
                except Exception as exc:  # every request of the batch gets the error
                    for _, future in batch:
                        _settle(future, exception=exc)
                    continue
                for (_, future), result in zip(batch, results):
                    _settle(future, result=(result, len(batch)))
        finally:
            self._worker = None

    def _next_batch(self) -> list[tuple[J, asyncio.Future]]:
        batch: list[tuple[J, asyncio.Future]] = []
        now = time.monotonic()
        while self._queue and len(batch) < self._max_batch_size:
            job, future, queued = self._queue.popleft()
            if future.done():  # its request went away
                continue
            if now - queued > self._max_wait_s:
                _settle(future, exception=Overloaded(f"waited {now - queued:.1f} s for the model"))
                continue
            batch.append((job, future))
        return batch


def _settle(future: asyncio.Future, *, result: Any = None, exception: Optional[BaseException] = None) -> None:
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
