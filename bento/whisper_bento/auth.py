"""API keys: ``--arg api_key=env:VARIABLE`` (or ``file:PATH``) locks every route but the probes.

The configuration names where the keys are, never the keys themselves, so ``/info`` and the log
can show the configuration as it is. Requests carry ``Authorization: Bearer KEY`` (what the
``openai`` SDK sends for ``api_key=``). The middleware wraps BentoML's whole app, so ``/metrics``
and ``/docs.json`` are locked too; ``/livez`` and ``/readyz`` stay open for orchestrators' probes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from whisper_bento.errors import ApiError

# The probes, and the MLflow webhook, which MLflow signs instead (mlflow_signature_problem).
OPEN_PATHS = frozenset({"/livez", "/readyz", "/webhooks/mlflow"})
# MLflow's webhook headers (mlflow.webhooks.constants) and how old a delivery may be.
MLFLOW_SIGNATURE, MLFLOW_TIMESTAMP, MLFLOW_DELIVERY = "x-mlflow-signature", "x-mlflow-timestamp", "x-mlflow-delivery-id"
WEBHOOK_TOLERANCE_S = 300.0
REFERENCE = re.compile(r"^(env|file):(.+)$")


def load_keys(reference: str, setting: str = "api_key") -> tuple[bytes, ...]:
    """The keys ``reference`` (the value of ``setting``) points at: comma-, space- or newline-separated.

    Raises:
        ValueError: the variable or file is missing or holds no key (the service does not start).
    """
    match = REFERENCE.match(reference)
    if match is None:
        raise ValueError(f"{setting} must be env:VARIABLE or file:PATH (got {reference.split(':')[0]!r}...).")
    kind, where = match.groups()
    if kind == "env":
        if where not in os.environ:
            raise ValueError(f"{setting} names the environment variable {where}, which is not set: export it.")
        text = os.environ[where]
    else:
        try:
            text = Path(where).read_text()
        except OSError as exc:
            raise ValueError(f"{setting} names the file {where}, which cannot be read ({exc.strerror}).") from None
    keys = tuple(k.encode() for k in re.split(r"[\s,]+", text) if k)
    if not keys:
        raise ValueError(f"{setting}: {kind} {where} holds no key; put one or more keys there.")
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
        return matches(token.strip(), self.keys)


def matches(token: bytes, keys: tuple[bytes, ...]) -> bool:
    """Whether ``token`` is one of ``keys``: every key is compared, each in constant time, so the
    answer's timing says nothing of them."""
    return sum(hmac.compare_digest(token, key) for key in keys) > 0


def mlflow_signature_problem(body: bytes, headers, secrets: tuple[bytes, ...], now: float | None = None) -> str | None:
    """Why a webhook delivery is not MLflow's, signed with one of ``secrets``; None when it is.

    MLflow signs ``"{delivery id}.{timestamp}.{body}"`` with HMAC-SHA256 and sends
    ``X-MLflow-Signature: v1,<base64>``; a delivery more than ``WEBHOOK_TOLERANCE_S`` from now is
    refused as a replay.
    """
    signature, timestamp, delivery = (headers.get(h) for h in (MLFLOW_SIGNATURE, MLFLOW_TIMESTAMP, MLFLOW_DELIVERY))
    if not (signature and timestamp and delivery):
        return "it is not signed (X-MLflow-Signature, X-MLflow-Timestamp and X-MLflow-Delivery-Id are needed)"
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        return f"X-MLflow-Timestamp {timestamp[:40]!r} is not a Unix time"
    if age > WEBHOOK_TOLERANCE_S:
        return f"it was signed {age:.0f} s from now, more than {WEBHOOK_TOLERANCE_S:.0f} s (a replay, or the clocks differ)"
    version, _, given = signature.partition(",")
    if version != "v1":
        return f"signature version {version[:20]!r} is not v1"
    content = f"{delivery}.{timestamp}.".encode() + body
    expected = tuple(base64.b64encode(hmac.new(s, content, hashlib.sha256).digest()) for s in secrets)
    if not matches(given.encode(), expected):
        return "the signature does not match the webhook secret"
    return None


def redact_uri(uri: str | None) -> str | None:
    """``uri`` without a password (``https://user:secret@host`` -> ``https://user:***@host``)."""
    if not uri:
        return uri
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
