"""The BentoML service for ``faster_whisper`` models: ``bentoml serve whisper_bento:Transcriber``.

The service module runs the service's start-up when imported (``whisper_bento.startup.start``:
configuration, model resolution, checks), so this package imports it only when ``Transcriber`` is
asked for (``whisper_bento.build`` does not).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Transcriber"]


def __getattr__(name: str) -> Any:
    if name == "Transcriber":
        from whisper_bento.service import Transcriber

        return Transcriber
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
