"""One loaded version: its model, the decoding defaults it was stored with, and its engine.

The one place decoding options are resolved for a request, by every caller that holds a loaded
version (the pyfunc, the service's primary and shadow, ``whisper-registry evaluate``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional, Union

from mlflow_faster_whisper.decoding import DecodingOptions
from mlflow_faster_whisper.transcription import check_options

if TYPE_CHECKING:
    from mlflow_faster_whisper.engine import Engine

Layer = Optional[Union[DecodingOptions, Mapping[str, Any]]]


class LoadedVersion:
    """A model with its stored defaults (``version_defaults``), the caller's defaults layered over
    them (``defaults``) and its decoding engine, started on first use with ``engine_options``."""

    def __init__(self, model: Any, version_defaults: Layer = None, service_defaults: Layer = None, **engine_options: Any):
        self.model = model
        self.version_defaults = DecodingOptions.parse(version_defaults)
        self.defaults = DecodingOptions.layered(self.version_defaults, service_defaults)
        self.engine_options = engine_options
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        """The decoding engine of this model, started on first use."""
        if self._engine is None:
            from mlflow_faster_whisper.engine import Engine

            self._engine = Engine(self.model, **self.engine_options)
        return self._engine

    def start(self) -> Engine:
        """Start the engine now rather than on first use; the engine."""
        return self.engine

    @property
    def started_engine(self) -> Engine | None:
        """The engine if it has been started (None before its first use, and once unloaded)."""
        return self._engine

    def resolve(self, *overrides: Layer) -> DecodingOptions:
        """Version defaults < the caller's defaults < ``overrides`` (later ones winning), checked
        against this model.

        Raises:
            DecodingOptionsError: options that are not valid, or that this model cannot decode with.
        """
        options = DecodingOptions.layered(self.defaults, *overrides)
        check_options(self.model, options)
        return options

    def unload(self) -> Engine | None:
        """Let go of the model and the engine; the engine returned is the caller's to close."""
        engine, self.model, self._engine = self._engine, None, None
        return engine
