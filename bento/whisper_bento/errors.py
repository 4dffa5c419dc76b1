"""HTTP errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

Every bad input ends here as a 4xx JSON body that names the problem; the worker keeps serving.
Every refusal for capacity is a 503 in this shape with ``Retry-After`` (``overloaded``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

_logger = logging.getLogger(__name__)

# Seconds a refused client waits before trying again: a decode frees capacity within about that.
RETRY_AFTER_S = 1


class ApiError(Exception):
    """A request the service refuses; ``status`` is the HTTP status code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        """The JSON response; a 503 (overloaded, or not ready yet) says when to retry."""
        extra = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else {}
        return JSONResponse(self.body(), status_code=self.status, headers={**extra, **(headers or {})})


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def invalid_value(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    """422: a field the service understands, with a value it will not use (bounds included)."""
    return ApiError(422, message, param=param, code=code)


def too_large(message: str, param: str | None = "file", code: str = "too_large") -> ApiError:
    return ApiError(413, message, param=param, code=code)


def overloaded(message: str) -> ApiError:
    """503: the service holds as many requests as it takes; the response carries ``Retry-After``."""
    return ApiError(503, message, code="overloaded")


def overloaded_error(exc: Exception) -> ApiError:
    """The 503 of a request the decoding engine is too full to take (``Overloaded``)."""
    return overloaded(f"The service is overloaded ({exc}); retry later.")


def install(app) -> None:
    """Every error the app raises answered in the one shape: refusals, routing's own answers, crashes."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        _logger.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Routing's own answers (no such path, wrong method: its Allow header kept) in the one shape too.
        return ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}").response(exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        _logger.exception("%s %s failed", request.method, request.url.path)
        return ApiError(500, f"Internal error ({type(exc).__name__}); see the server log.").response()
