"""HTTP errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

Every bad input ends here as a 4xx JSON body that names the problem; the worker keeps serving.
"""

from __future__ import annotations

from typing import Optional

from starlette.responses import JSONResponse


class ApiError(Exception):
    """A request the service refuses; ``status`` is the HTTP status code."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None):
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

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, param: Optional[str] = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def invalid_value(message: str, param: Optional[str] = None, code: str = "invalid_value") -> ApiError:
    """422: a field the service understands, with a value it will not use (bounds included)."""
    return ApiError(422, message, param=param, code=code)


def too_large(message: str, param: str = "file", code: str = "too_large") -> ApiError:
    return ApiError(413, message, param=param, code=code)
