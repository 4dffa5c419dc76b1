"""The one typed definition of faster-whisper's decoding options.

``DecodingOptions`` produces the pyfunc ``ParamSchema``, the service's configuration and request
schema, and the CLI's ``--decoding key=value`` parsing. Values resolve in layers: the defaults
stored with a model version < the service configuration < a request. A layer only overrides the
fields it sets explicitly (pydantic's ``model_fields_set``).
"""

from __future__ import annotations

import difflib
import functools
import json
import numbers
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from mlflow_faster_whisper.errors import DecodingOptionsError


@functools.cache
def whisper_languages() -> tuple[str, ...]:
    """faster-whisper's own language codes, so a code it rejects deep inside transcribe() is
    refused up front with the valid ones. Read on first use: importing faster-whisper (numpy,
    CTranslate2, PyAV) is a quarter of a second that a process only defining options (the
    ``bentoml serve`` process, the CLI) does not need."""
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    return tuple(_LANGUAGE_CODES)


# Bounds on what one request may ask. Every value inside them decodes (CTranslate2 and
# faster-whisper accept it and finish in bounded time); outside them some crash the decoder,
# loop for minutes, or overflow (patience=1e308, best_of=1000, length_penalty=5e16).
MAX_LENGTH = 448  # tokens per window of every Whisper model (faster-whisper's max_length)
MAX_BEAMS = 32  # beam_size and best_of
MAX_TEMPERATURES = 16
MAX_TEXT_CHARS = 10_000  # initial_prompt, prefix, hotwords (faster-whisper keeps <= 223 tokens)
MAX_MS = 3_600_000  # VAD durations


class VadParameters(BaseModel):
    """Silero VAD settings (faster_whisper.vad.VadOptions)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    threshold: float = Field(0.5, ge=0.0, le=1.0, description="Speech probability threshold.")
    neg_threshold: Optional[float] = Field(None, ge=0.0, le=1.0, description="Silence threshold.")
    min_speech_duration_ms: int = Field(0, ge=0, le=MAX_MS, description="Drop speech chunks shorter than this.")
    # None (faster-whisper's inf): never split a chunk. Not inf itself: the options used are part of
    # every answer, and JSON has no inf (a service answering vad_parameters={} failed to render it).
    max_speech_duration_s: Optional[float] = Field(None, gt=0, description="Split longer chunks (none: never).")
    min_silence_duration_ms: int = Field(2000, ge=0, le=MAX_MS, description="Silence that ends a chunk.")
    speech_pad_ms: int = Field(400, ge=0, le=MAX_MS, description="Padding added to each side of a chunk.")


class DecodingOptions(BaseModel):
    """Options of ``faster_whisper.WhisperModel.transcribe``; defaults are faster-whisper's.

    Every number is finite and within the bounds the decoder accepts; what depends on the model
    (token ids, prompt length) is checked by ``transcription.check_options``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    language: Optional[str] = Field(None, description="Language code (e.g. 'en', 'zh'); None detects it.")
    task: Literal["transcribe", "translate"] = Field("transcribe", description="Transcribe, or translate to English.")
    beam_size: int = Field(5, ge=1, le=MAX_BEAMS, description="Beam width; 1 is greedy decoding.")
    best_of: int = Field(5, ge=1, le=MAX_BEAMS, description="Candidates sampled at non-zero temperature.")
    patience: float = Field(1.0, gt=0, le=10, description="Beam search patience factor.")
    length_penalty: float = Field(1.0, ge=0, le=10, description="Exponential length penalty.")
    repetition_penalty: float = Field(1.0, ge=0.01, le=100, description="Penalty (>1) on previously generated tokens.")
    no_repeat_ngram_size: int = Field(0, ge=0, le=MAX_LENGTH, description="Forbid repeating n-grams of this size (0 = off).")
    temperature: tuple[float, ...] = Field(
        (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
        description="Temperatures tried in turn when a decode fails the thresholds.",
    )
    compression_ratio_threshold: Optional[float] = Field(2.4, description="Retry above this gzip ratio.")
    log_prob_threshold: Optional[float] = Field(-1.0, description="Retry below this average log probability.")
    no_speech_threshold: Optional[float] = Field(0.6, description="Skip a window above this no-speech probability.")
    condition_on_previous_text: bool = Field(True, description="Prompt each window with the previous text.")
    prompt_reset_on_temperature: float = Field(0.5, ge=0, le=1, description="Drop the prompt above this temperature.")
    initial_prompt: Optional[str] = Field(None, max_length=MAX_TEXT_CHARS, description="Text that primes the first window.")
    prefix: Optional[str] = Field(None, max_length=MAX_TEXT_CHARS, description="Text the first window's transcript starts with.")
    suppress_blank: bool = Field(True, description="Suppress blank outputs at the start of sampling.")
    suppress_tokens: tuple[int, ...] = Field((-1,), description="Token ids to suppress (-1 = the model's default set).")
    without_timestamps: bool = Field(False, description="Sample text tokens only.")
    max_initial_timestamp: float = Field(1.0, ge=0, le=30, description="Latest allowed first timestamp (s).")
    word_timestamps: bool = Field(False, description="Add word-level timestamps (cross-attention alignment).")
    vad_filter: bool = Field(False, description="Drop non-speech with the Silero VAD first.")
    vad_parameters: Optional[VadParameters] = Field(None, description="VAD settings (a JSON object).")
    max_new_tokens: Optional[int] = Field(None, ge=1, le=MAX_LENGTH, description="Maximum new tokens per window.")
    chunk_length: Optional[int] = Field(None, ge=1, le=30, description="Window length in seconds (default 30).")
    hallucination_silence_threshold: Optional[float] = Field(
        None, ge=0, description="Skip silent periods longer than this around suspected hallucinations."
    )
    hotwords: Optional[str] = Field(None, max_length=MAX_TEXT_CHARS, description="Hint phrases (ignored when prefix is set).")
    language_detection_threshold: Optional[float] = Field(0.5, ge=0, le=1, description="Accept a detected language above this.")
    language_detection_segments: int = Field(1, ge=1, le=30, description="Windows used to detect the language.")
    pad_to_30s: bool = Field(
        True,
        description="Pad every window to 30 s for the encoder, as Whisper was trained; false encodes a shorter "
        "window at its own length (+2 s): short clips decode faster, and the error rate moves, differently "
        "for each language.",
    )
    long_form: Literal["sequential", "batched"] = Field(
        "sequential",
        description="Audio longer than one window: 'sequential' decodes its windows in turn, each prompted with "
        "the previous text (faster-whisper's transcribe); 'batched' cuts it at pauses (Silero VAD) and decodes "
        "the chunks side by side (faster-whisper's BatchedInferencePipeline).",
    )

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        code = value.strip().lower()
        if code in ("", "auto"):
            return None
        if code not in whisper_languages():
            close = difflib.get_close_matches(code, whisper_languages(), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown language {value!r}; use a Whisper language code such as 'en' or 'zh'.{hint}")
        return code

    @field_validator("temperature", mode="before")
    @classmethod
    def _temperature_tuple(cls, value: Any) -> Any:
        def number(t: Any) -> bool:
            return isinstance(t, numbers.Real) and not isinstance(t, bool)

        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if number(value):
            return (float(value),)
        if not isinstance(value, (str, bytes, Mapping)) and isinstance(value, Iterable):
            items = list(value)
            if all(number(t) for t in items):
                return tuple(float(t) for t in items)
        # Said here: pydantic would only say "Input should be a valid tuple".
        raise ValueError(
            f"temperature is the sampling temperature: a number from 0 (greedy) to 5, e.g. 0, or a list of them "
            f"tried in turn when a decode fails the thresholds, e.g. [0, 0.2, 0.4]; got {value!r}"
        )

    @field_validator("temperature")
    @classmethod
    def _temperature_range(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or len(value) > MAX_TEMPERATURES or any(not 0 <= t <= 5 for t in value):
            raise ValueError(f"temperature must be one value from 0 to 5 or a list of 1 to {MAX_TEMPERATURES} of them")
        return value

    @field_validator("patience")
    @classmethod
    def _enough_hypotheses(cls, value: float, info: ValidationInfo) -> float:
        # CTranslate2 keeps round(beam_size * patience) hypotheses and needs at least one.
        beam_size = info.data.get("beam_size")
        if beam_size is not None and beam_size * value < 0.5:
            raise ValueError(
                f"beam_size * patience must be at least 0.5 (CTranslate2 keeps round(beam_size * "
                f"patience) hypotheses); with beam_size={beam_size}, use patience >= {0.5 / beam_size:g}"
            )
        return value

    @field_validator("suppress_tokens")
    @classmethod
    def _token_ids(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        # Ids above the vocabulary depend on the model: transcription.check_options.
        if any(t < -1 for t in value):
            raise ValueError("suppress_tokens holds token ids >= 0, or -1 for the model's default set")
        return tuple(dict.fromkeys(value))  # a repeated id suppresses nothing more

    @field_validator("vad_parameters", mode="before")
    @classmethod
    def _vad_from_json(cls, value: Any) -> Any:
        # Params and CLI values arrive as strings; a JSON object is the natural spelling there.
        if isinstance(value, str):
            value = value.strip()
            if not value:
                return None
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"vad_parameters must be a JSON object: {exc}") from None
        return value

    @classmethod
    def parse(cls, value: DecodingOptions | Mapping[str, Any] | None = None) -> DecodingOptions:
        """Validate options given as an object, a mapping or None.

        Raises:
            DecodingOptionsError: an unknown option (with the closest valid names) or a bad value.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise DecodingOptionsError(f"Decoding options must be a dict or DecodingOptions, got {type(value).__name__}.")
        unknown = [k for k in value if k not in cls.model_fields]
        if unknown:
            raise DecodingOptionsError(_unknown_message(unknown), field=unknown[0])
        try:
            return cls.model_validate(dict(value))
        except ValidationError as exc:
            raise DecodingOptionsError(_validation_message(exc), field=_first_field(exc)) from None

    @classmethod
    def layered(cls, *layers: DecodingOptions | Mapping[str, Any] | None) -> DecodingOptions:
        """Resolve layers, later ones winning; a layer only overrides the fields it set."""
        merged: dict[str, Any] = {}
        for layer in layers:
            merged.update(cls.parse(layer).explicit())
        return cls.parse(merged)

    def explicit(self) -> dict[str, Any]:
        """The fields set explicitly, JSON-ready (what a version stores as its defaults)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def as_params(self) -> dict[str, Any]:
        """The fields set explicitly as pyfunc params (``predict(params=...)``, ``spark_udf``), in
        the ``param_schema``'s types: nested options as a JSON object string."""
        return {name: json.dumps(value) if isinstance(getattr(self, name), BaseModel) else value for name, value in self.explicit().items()}

    def to_transcribe_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``WhisperModel.transcribe``."""
        kwargs = self.model_dump(exclude={"long_form", "pad_to_30s"})
        kwargs["temperature"] = list(self.temperature)
        kwargs["suppress_tokens"] = list(self.suppress_tokens)
        if self.vad_parameters is not None and self.vad_parameters.max_speech_duration_s is None:
            del kwargs["vad_parameters"]["max_speech_duration_s"]  # faster-whisper's default: inf
        return kwargs


def parse_cli_assignments(assignments: list[str] | None) -> dict[str, Any]:
    """Turn ``["beam_size=1", "language=zh"]`` into a mapping for ``DecodingOptions.parse``.

    Values are read as JSON when they parse (numbers, booleans, lists, objects), else as strings.

    Raises:
        DecodingOptionsError: an item without '=' or an unknown option name.
    """
    result: dict[str, Any] = {}
    for item in assignments or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DecodingOptionsError(f"Decoding option {item!r} must be written key=value, e.g. beam_size=1.")
        result[key.strip()] = coerce_text_value(key.strip(), raw)
    return result


def coerce_text_value(name: str, raw: str) -> Any:
    """A value typed as text (CLI, form field) for option ``name``: text fields stay strings
    (``initial_prompt=123`` is the prompt "123"), the rest is read as JSON when it parses."""
    field = DecodingOptions.model_fields.get(name)
    if field is not None and _is_text(field.annotation):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw  # validation then names the field and the bad value


def _is_text(annotation: Any) -> bool:
    if get_origin(annotation) is Union:  # Optional[X]
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return annotation is str or get_origin(annotation) is Literal


def param_schema(defaults: DecodingOptions | None = None):
    """The pyfunc ``ParamSchema``: one param per option, defaulting to the version's defaults."""
    from mlflow.types.schema import ParamSchema, ParamSpec

    options = defaults or DecodingOptions()
    specs = []
    for name, field in DecodingOptions.model_fields.items():
        dtype, shape = _param_type(field.annotation)
        value = getattr(options, name)
        if isinstance(value, BaseModel):
            value = value.model_dump_json()
        elif isinstance(value, tuple):
            value = list(value)
        specs.append(ParamSpec(name, dtype, value, shape))
    return ParamSchema(specs)


_SCALAR_TYPES = {bool: "boolean", int: "long", float: "double", str: "string"}


def _param_type(annotation: Any) -> tuple[str, tuple[int, ...] | None]:
    """Map a field annotation to an MLflow param dtype and shape."""
    if get_origin(annotation) is Union:  # Optional[X]
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Literal:
        return "string", None
    if get_origin(annotation) is tuple:
        return _SCALAR_TYPES[get_args(annotation)[0]], (-1,)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "string", None  # nested options travel as a JSON object string
    return _SCALAR_TYPES[annotation], None


def _unknown_message(unknown: list[str]) -> str:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, DecodingOptions.model_fields, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"Unknown decoding option {', '.join(parts)}. Valid options: {', '.join(DecodingOptions.model_fields)}."


def _first_field(exc: ValidationError) -> Optional[str]:
    errors = exc.errors()
    return str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None


def _validation_message(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "options"
        problems.append(f"{where}: {error['msg']}")
    return "Invalid decoding options: " + "; ".join(problems)
