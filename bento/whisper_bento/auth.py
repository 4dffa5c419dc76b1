"""API keys: ``--arg api_key=env:VARIABLE`` (or ``file:PATH``) locks every route but the probes.

The configuration names where the keys are, never the keys themselves; ``/info`` shows only
whether each is configured. Requests carry ``Authorization: Bearer KEY`` (what the ``openai``
SDK sends for ``api_key=``). The middleware wraps BentoML's whole app, so ``/metrics`` and
``/docs.json`` are locked too; ``/livez`` and ``/readyz`` stay open for orchestrators' probes,
the MLflow webhook, which MLflow signs instead (``delivery_problem``, ``signature_problem``),
and the service's page, which holds no data: it asks for the key and calls the locked routes.
Keys are compared as the raw bytes of the header against their UTF-8 encoding.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Optional
from urllib.parse import urlsplit, urlunsplit

from whisper_bento.errors import ApiError

PROBES = frozenset({"/livez", "/readyz"})
WEBHOOK_PATH = "/webhooks/mlflow"
PAGE_PATH = "/"
OPEN_PATHS = PROBES | {WEBHOOK_PATH, PAGE_PATH}
# MLflow's webhook headers (mlflow.webhooks.constants), how old a delivery may be, and how far in
# the future its timestamp may be (clock skew between MLflow's host and this one).
MLFLOW_SIGNATURE, MLFLOW_TIMESTAMP, MLFLOW_DELIVERY = "x-mlflow-signature", "x-mlflow-timestamp", "x-mlflow-delivery-id"
WEBHOOK_TOLERANCE_S = 300.0
WEBHOOK_SKEW_S = 30.0
_DELIVERY_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # MLflow sends a UUID
REFERENCE = re.compile(r"^(env|file):(.+)$")


class Keys(NamedTuple):
    """The keys a service's configuration names, read once at start-up (None: not configured)."""

    api: Optional[tuple[bytes, ...]]
    admin: Optional[tuple[bytes, ...]]
    webhook: Optional[tuple[bytes, ...]]

    @classmethod
    def load(cls, api_key: Optional[str], admin_key: Optional[str], webhook_secret: Optional[str]) -> Keys:
        """Raises ValueError, as ``load_keys``: a named variable or file is missing or holds no key.
        The control key and a webhook secret are one key each, taken whole; API keys are a list."""
        return cls(
            load_keys(api_key) if api_key else None,
            load_keys(admin_key, "admin_key", whole=True) if admin_key else None,
            load_keys(webhook_secret, "webhook_secret", whole=True) if webhook_secret else None,
        )


def load_keys(reference: str, setting: str = "api_key", *, whole: bool = False) -> tuple[bytes, ...]:
    """The keys ``reference`` (the value of ``setting``) points at.

    Args:
        reference: ``env:VARIABLE`` or ``file:PATH``.
        setting: the configuration field, named in errors.
        whole: one key, taken whole (spaces and commas are part of it; a file's one trailing
            newline is not): a webhook secret or the control key. Otherwise API keys,
            comma-, space- or newline-separated.

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
        if whole:  # editors end a file with a newline; it is not part of the secret
            text = text.removesuffix("\n").removesuffix("\r")
    keys = (text.encode(),) if whole else tuple(k.encode() for k in re.split(r"[\s,]+", text) if k)
    if not any(keys):
        raise ValueError(f"{setting}: {kind} {where} holds no key; put {'the key' if whole else 'one or more keys'} there.")
    return keys


def header_bytes(scope: Mapping[str, Any], name: bytes) -> bytes:
    """The raw value of header ``name`` (lower case) as sent: no text decoding, so a key that is
    not ASCII compares as the UTF-8 bytes a client sends."""
    return next((value for key, value in scope["headers"] if key == name), b"")


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
            "Missing or wrong API key: send the header 'Authorization: Bearer <key>' (the openai client's api_key=).",
            code="invalid_api_key",
        )
        await error.response(headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)

    def _authorized(self, scope) -> bool:
        scheme, _, token = header_bytes(scope, b"authorization").partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return matches(token.strip(), self.keys)


def matches(token: bytes, keys: tuple[bytes, ...]) -> bool:
    """Whether ``token`` is one of ``keys``: every key is compared, each in constant time, so the
    answer's timing says nothing of them."""
    return sum(hmac.compare_digest(token, key) for key in keys) > 0


def delivery_problem(headers, seen: SeenDeliveries, now: float | None = None) -> str | None:
    """Why a webhook delivery is refused from its headers alone, before its body is read; None
    when it may be MLflow's: signed, timestamped within ``WEBHOOK_TOLERANCE_S`` in the past (and
    ``WEBHOOK_SKEW_S`` in the future), with a delivery id not seen in that time."""
    signature, timestamp, delivery = (headers.get(h) for h in (MLFLOW_SIGNATURE, MLFLOW_TIMESTAMP, MLFLOW_DELIVERY))
    if not (signature and timestamp and delivery):
        return (
            "it is not signed (X-MLflow-Signature, X-MLflow-Timestamp and X-MLflow-Delivery-Id are needed): "
            "register the webhook in MLflow with the secret webhook_secret names"
        )
    if not signature.startswith("v1,"):
        return f"signature version {signature.partition(',')[0][:20]!r} is not v1"
    if not timestamp.isdigit() or len(timestamp) > 12:
        return f"X-MLflow-Timestamp {timestamp[:40]!r} is not a Unix time"
    if _DELIVERY_ID.match(delivery) is None:
        return "X-MLflow-Delivery-Id is not an id (letters, digits, '-', at most 128)"
    age = (time.time() if now is None else now) - int(timestamp)
    if age > WEBHOOK_TOLERANCE_S:
        return f"it was signed {age:.0f} s ago, more than {WEBHOOK_TOLERANCE_S:.0f} s (a replay, or the clocks differ)"
    if -age > WEBHOOK_SKEW_S:
        return f"it is dated {-age:.0f} s in the future, more than {WEBHOOK_SKEW_S:.0f} s (the clocks differ)"
    if seen.has(delivery, now):
        return f"delivery {delivery} was received already (a replay)"
    return None


def signature_problem(body: bytes, headers, secrets: tuple[bytes, ...]) -> str | None:
    """Why ``body`` is not signed with one of ``secrets`` as MLflow signs: HMAC-SHA256 of
    ``"{delivery id}.{timestamp}.{body}"``, sent as ``X-MLflow-Signature: v1,<base64>``; None
    when it is. Call after ``delivery_problem`` found none."""
    delivery, timestamp = headers.get(MLFLOW_DELIVERY), headers.get(MLFLOW_TIMESTAMP)
    given = headers.get(MLFLOW_SIGNATURE, "").partition(",")[2]
    content = f"{delivery}.{timestamp}.".encode() + body
    expected = tuple(base64.b64encode(hmac.new(s, content, hashlib.sha256).digest()) for s in secrets)
    if not matches(given.encode(), expected):
        return "the signature does not match the webhook secret: register the webhook in MLflow with the secret webhook_secret names"
    return None


class SeenDeliveries:
    """The ids of accepted webhook deliveries, each kept as long as its signature would be
    accepted again, and at most ``max_ids`` of them: memory stays bounded whatever is sent."""

    def __init__(self, keep_s: float = WEBHOOK_TOLERANCE_S + WEBHOOK_SKEW_S, max_ids: int = 10_000) -> None:
        self.keep_s = keep_s
        self.max_ids = max_ids
        self._ids: OrderedDict[str, float] = OrderedDict()  # id -> when it expires, oldest first

    def _expire(self, now: float) -> None:
        while self._ids and next(iter(self._ids.values())) <= now:
            self._ids.popitem(last=False)

    def has(self, delivery: str, now: float | None = None) -> bool:
        self._expire(time.time() if now is None else now)
        return delivery in self._ids

    def add(self, delivery: str, now: float | None = None) -> str | None:
        """Remember an accepted delivery; why it cannot be accepted (seen already, or too many
        deliveries in the tolerance window), or None."""
        now = time.time() if now is None else now
        self._expire(now)
        if delivery in self._ids:
            return f"delivery {delivery} was received already (a replay)"
        if len(self._ids) >= self.max_ids:
            return f"more than {self.max_ids} deliveries in {self.keep_s:.0f} s"
        self._ids[delivery] = now + self.keep_s
        return None


LOCAL_PATH = "(a local path)"
_LOCAL = re.compile(r"^(/|~|file:|[A-Za-z]:[\\/]|\.{1,2}[\\/])")  # absolute, home, file:, Windows, relative


def redact_uri(uri: str | None) -> str | None:
    """``uri`` without a password (``https://user:secret@host`` -> ``https://user:***@host``)."""
    if not uri:
        return uri
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def public_uri(uri: str | None) -> str | None:
    """What a client may see of a model URI: no password, and no path on this machine (the
    operator's log keeps the path: ``redact_uri``)."""
    if uri and (urlsplit(uri).scheme in ("", "file") or _LOCAL.match(uri)):
        return LOCAL_PATH
    return redact_uri(uri)


def hide_local_paths(value: Any) -> Any:
    """``value`` (JSON-like) with every string that names a place on this machine (an absolute,
    home or file: path) replaced by ``LOCAL_PATH``: what a client may see of lineage and runtime."""
    if isinstance(value, dict):
        return {k: hide_local_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [hide_local_paths(v) for v in value]
    if isinstance(value, str) and _LOCAL.match(value):
        return LOCAL_PATH
    return value
