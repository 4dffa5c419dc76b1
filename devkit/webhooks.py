"""MLflow registry webhook deliveries, signed as MLflow signs them, for tests and bench."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any, Optional

import httpx


def signed_headers(secret: str, body: bytes, *, delivery: Optional[str] = None, timestamp: Optional[int] = None) -> dict[str, str]:
    """The headers of a delivery of ``body``: HMAC-SHA256 of "id.timestamp.body" under ``secret``."""
    delivery = delivery or str(uuid.uuid4())
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{delivery}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return {"content-type": "application/json", "x-mlflow-signature": "v1," + base64.b64encode(digest).decode(),
            "x-mlflow-timestamp": str(timestamp), "x-mlflow-delivery-id": delivery}


def post_signed(url: str, secret: str, event: Any, *, delivery: Optional[str] = None, timestamp: Optional[int] = None,
                body: Optional[bytes] = None, timeout: float = 60) -> httpx.Response:
    """POST ``event`` (or the raw ``body``) to the service at ``url`` as a signed delivery."""
    body = json.dumps(event).encode() if body is None else body
    headers = signed_headers(secret, body, delivery=delivery, timestamp=timestamp)
    return httpx.post(url + "/webhooks/mlflow", content=body, headers=headers, timeout=timeout)
