"""BentoML's per-request timeout, without keeping every answered request alive for the timeout.

BentoML 1.4's ``TimeoutMiddleware`` arms ``loop.call_later(timeout, ...)`` for each request and
never cancels it. asyncio's timer handle holds a copy of the request's context variables (its
Request, tracing spans, uvicorn cycle), so each answered request stays in memory for
``request_timeout_s`` (600 s by default): a worker's RSS grows with its request rate
(BENCHMARKS.md section 5). ``release_request_timers`` replaces the middleware's ``__call__`` with
the same logic whose timer runs in an empty context and is cancelled once the response is done.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging

_logger = logging.getLogger(__name__)


def release_request_timers() -> bool:
    """Patch BentoML's TimeoutMiddleware in this process; False where its shape is not the known one."""
    try:
        from bentoml._internal.server.http.traffic import TimeoutMiddleware
    except ImportError:
        return False
    if getattr(TimeoutMiddleware, "_timer_released", False):
        return True
    if not hasattr(TimeoutMiddleware, "_set_timer_out"):
        _logger.warning("BentoML's TimeoutMiddleware changed: its per-request timers are left as they are")
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter, context=contextvars.Context())

        async def _send(message) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            try:
                await waiter
            except asyncio.TimeoutError:
                if fut.cancel():
                    from starlette.responses import JSONResponse

                    resp = JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"}, status_code=504)
                    await resp(scope, receive, send)
            else:
                await fut
        finally:
            timer.cancel()

    # BentoML's class is patched in place; mypy knows neither the added attributes nor a method assigned.
    TimeoutMiddleware._bentoml_call = TimeoutMiddleware.__call__  # type: ignore[attr-defined]  # kept for the test that shows the retention
    TimeoutMiddleware.__call__ = __call__  # type: ignore[method-assign]
    TimeoutMiddleware._timer_released = True  # type: ignore[attr-defined]
    return True
