"""API keys: ``--arg api_key=env:VARIABLE`` (or ``file:PATH``) locks every route but the probes.

The configuration names where the keys are, never the keys themselves, so ``/info`` and the log
can show the configuration as it is. Requests carry ``Authorization: Bearer KEY`` (what the
``openai`` SDK sends for ``api_key=``). The middleware wraps BentoML's whole app, so ``/metrics``
and ``/docs.json`` are locked too; ``/livez`` and ``/readyz`` stay open for orchestrators' probes.
"""

from __future__ import annotations

import hmac
import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from whisper_bento.errors import ApiError

OPEN_PATHS = frozenset({"/livez", "/readyz"})
REFERENCE = re.compile(r"^(env|file):(.+)$")


def load_keys(reference: str) -> tuple[bytes, ...]:
    """The keys ``reference`` points at: comma-, space- or newline-separated.

    Raises:
        ValueError: the variable or file is missing or holds no key (the service does not start).
    """
    match = REFERENCE.match(reference)
    if match is None:
        raise ValueError(f"api_key must be env:VARIABLE or file:PATH (got {reference.split(':')[0]!r}...).")
    kind, where = match.groups()
    if kind == "env":
        if where not in os.environ:
            raise ValueError(f"api_key names the environment variable {where}, which is not set: export it.")
        text = os.environ[where]
    else:
        try:
            text = Path(where).read_text()
        except OSError as exc:
            raise ValueError(f"api_key names the file {where}, which cannot be read ({exc.strerror}).") from None
    keys = tuple(k.encode() for k in re.split(r"[\s,]+", text) if k)
    if not keys:
        raise ValueError(f"api_key: {kind} {where} holds no key; put one or more keys there.")
    return keys


class ApiKeyMiddleware:
    """Pure ASGI middleware: 401 with an OpenAI-style JSON error unless a key matches."""

    def __init__(self, app, keys: tuple[bytes, ...]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = ApiError(
            401,
            "Missing or wrong API key: send the header 'Authorization: Bearer <key>' "
            "(the openai client's api_key=).",
            code="invalid_api_key",
        )
        response = error.response()
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)

    def _authorized(self, scope) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        # Every key is compared, each in constant time: the answer's timing says nothing of them.
        return sum(hmac.compare_digest(token, key) for key in self.keys) > 0


def redact_uri(uri: str | None) -> str | None:
    """``uri`` without a password (``https://user:secret@host`` -> ``https://user:***@host``)."""
    if not uri:
        return uri
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
