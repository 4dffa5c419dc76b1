"""What one client connection may hold of the worker, whoever sends it.

* ``limit_request_heads``: a connection must send a complete request head (request line and
  headers) within a deadline of being opened or of its last answer, or it is closed. uvicorn's
  keep-alive timeout starts only after a first answer, and its h11 protocol has no timeout on
  the head: idle and half-sent connections would stay open for good.
* ``BodyDeadline``: a request's whole body must arrive within a deadline of its head; a slower
  one is answered 408 and its connection closed. An answer sent before the body arrived (a 401,
  a refused webhook) closes the connection too, so a client cannot trickle the rest.
* ``ConcurrencyLimit``: requests in flight, in pools (a route that needs no API key has its
  own), over the limit answered 503 in the service's error shape, after the API key check:
  traffic without a key never takes an authenticated request's place.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Collection, Mapping
from typing import Any

from whisper_bento.errors import ApiError, overloaded

_logger = logging.getLogger(__name__)
# uvicorn's HTTP/1.1 protocols: h11 (what BentoML runs here), httptools where it is installed.
_PROTOCOLS = (("uvicorn.protocols.http.h11_impl", "H11Protocol"), ("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol"))
_CLOSE = (b"connection", b"close")


def limit_request_heads(timeout_s: float) -> list[str]:
    """Close, in this process, any uvicorn connection that has sent no complete request head
    ``timeout_s`` after it opened or after its last answer; the protocols it applies to.

    A request in flight is never cut by it (its body has ``BodyDeadline``)."""
    applied = []
    for module_name, class_name in _PROTOCOLS:
        try:
            protocol = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        if not all(hasattr(protocol, name) for name in ("connection_made", "on_response_complete", "connection_lost")):
            _logger.warning("uvicorn's %s changed: its connections have no request-head deadline", class_name)
            continue
        if not hasattr(protocol, "_head_timeout_s"):
            _wrap(protocol)
        protocol._head_timeout_s = timeout_s
        applied.append(class_name)
    return applied


def _wrap(protocol: Any) -> None:
    made, complete, lost = protocol.connection_made, protocol.on_response_complete, protocol.connection_lost

    def connection_made(self, transport) -> None:
        made(self, transport)
        _arm(self)

    def on_response_complete(self) -> None:
        complete(self)
        _arm(self)

    def connection_lost(self, exc) -> None:
        _disarm(self)
        lost(self, exc)

    protocol.connection_made, protocol.on_response_complete, protocol.connection_lost = (
        connection_made,
        on_response_complete,
        connection_lost,
    )


def _disarm(connection: Any) -> None:
    timer = getattr(connection, "_head_timer", None)
    if timer is not None:
        timer.cancel()
        connection._head_timer = None


def _arm(connection: Any) -> None:
    _disarm(connection)
    if not connection.transport.is_closing():
        connection._head_timer = connection.loop.call_later(connection._head_timeout_s, _expire, connection)


def _expire(connection: Any) -> None:
    connection._head_timer = None
    transport = connection.transport
    cycle = connection.cycle
    if transport.is_closing() or transport.get_protocol() is not connection:  # closed, or a WebSocket now
        return
    if cycle is not None and not cycle.response_complete:  # a request in flight: its head came in time
        return
    transport.close()


class BodyDeadline:
    """Pure ASGI middleware: a request's body must arrive within ``seconds`` of its head (the
    ``tighter`` deadline on those paths); then 408 in the service's error shape, connection closed."""

    def __init__(self, app, seconds: float, tighter: Mapping[str, float] | None = None) -> None:
        self.app = app
        self.seconds = seconds
        self.tighter = dict(tighter or {})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        seconds = min(self.seconds, self.tighter.get(scope["path"], self.seconds))
        deadline = loop.time() + seconds
        headers = dict(scope["headers"])
        state = {"body_done": b"content-length" not in headers and b"transfer-encoding" not in headers, "started": False, "answered": False}

        async def guarded_send(message) -> None:
            if state["answered"]:
                return  # the 408 went out; the route's own answer comes too late
            if message["type"] == "http.response.start":
                state["started"] = True
                if not state["body_done"]:
                    message = {**message, "headers": [*message.get("headers", []), _CLOSE]}
            await send(message)

        async def guarded_receive():
            if state["body_done"] or state["started"]:  # an answer under way needs no more of the body
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                error = body_timeout(seconds)
                state["started"] = state["answered"] = True
                await error.response(headers={"Connection": "close"})(scope, receive, send)
                _logger.info("%s %s -> 408: its body did not arrive within %g s", scope["method"], scope["path"], seconds)
                raise error from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except ApiError:
            if not state["answered"]:
                raise  # not ours: the app's own handlers let it through


def body_timeout(seconds: float) -> ApiError:
    return ApiError(
        408, f"The request body did not arrive within {seconds:g} s; send it faster, or in a smaller upload.", code="body_timeout"
    )


class ConcurrencyLimit:
    """Pure ASGI middleware: at most ``limit`` requests in flight (``pools`` gives some paths a
    limit of their own, counted apart), the next answered 503 with Retry-After; ``exempt`` paths
    (probes, metrics) are never counted."""

    def __init__(self, app, limit: int, pools: Mapping[str, int] | None = None, exempt: Collection[str] = ()) -> None:
        self.app = app
        self.limits: dict[str | None, int] = {None: limit}  # None: every other path
        self.limits.update(pools or {})
        self.in_flight: dict[str | None, int] = dict.fromkeys(self.limits, 0)
        self.exempt = frozenset(exempt)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        pool = path if path in self.limits else None
        if self.in_flight[pool] >= self.limits[pool]:  # one event loop: no lock between the test and the count
            error = overloaded(f"The service holds {self.limits[pool]} requests at once{' on ' + path if pool else ''}; retry later.")
            await error.response()(scope, receive, send)
            return
        self.in_flight[pool] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[pool] -= 1
