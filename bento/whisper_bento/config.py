"""The service's configuration: one typed model read with ``bentoml.use_arguments``.

Values come from ``bentoml serve ... --arg key=value`` (strings) or ``--arg-file config.yaml``
(typed YAML). ``--arg`` values are strings, so list fields also accept "en,zh" and ``decoding``
also accepts a JSON object string: ``--arg 'decoding={"beam_size": 1}'``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlflow_faster_whisper.batching import BatchPolicy
from mlflow_faster_whisper.decoding import DecodingOptions
from mlflow_faster_whisper.devices import LoadOptions
from mlflow_faster_whisper.errors import DecodingOptionsError
from whisper_bento.realtime_events import RealtimeSettings


class ServiceConfig(BaseModel):
    """How the service loads its model, decodes, and bounds what a request may ask."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        ...,
        min_length=1,
        description="The model to serve: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/..., or a path; "
        "with `models`, the first of them (what a request that names no model, or whisper-1, gets).",
    )
    models: tuple[str, ...] = Field(
        (),
        description="Several models to serve from one worker (models:/whisper-zh@production,models:/whisper-en@production): "
        "a request's `model` field picks one by registered name (or NAME@ALIAS); each is loaded on first use "
        "within memory_budget_bytes. Empty: `model` alone.",
    )
    memory_budget_bytes: Optional[int] = Field(
        None,
        gt=0,
        description="Memory the loaded models may take together (their artifact size scaled to the compute type "
        "in force); the least recently used idle model is unloaded to make room, never one with requests in "
        "flight. Default: half the RAM on a CPU, 80% of the GPU's memory on CUDA.",
    )
    model_ttl_s: float = Field(
        0.0, ge=0, description="A model no request has used this long is unloaded (0: never); the next request loads it again."
    )
    preload: Optional[tuple[str, ...]] = Field(
        None,
        description="Models loaded at start-up, by registered name or URI (default: the first); the others load on first use.",
    )
    model_load_timeout_s: float = Field(
        300.0,
        gt=0,
        description="How long a request waits for its model to be loaded (and for room in the budget) before it gets 503.",
    )
    load: LoadOptions = Field(
        default_factory=LoadOptions,
        description="How the model is loaded (the flavor's LoadOptions, the policy evaluation uses too); "
        "given flat as --arg device=cuda, compute_type=int8, cpu_threads=4, num_workers=2.",
    )
    decoding: DecodingOptions = Field(
        default_factory=DecodingOptions,
        description="Decoding defaults; they override the model version's stored defaults.",
    )
    # Request bounds.
    max_beam_size: int = Field(5, ge=1, description="Largest beam_size a request may ask.")
    allowed_languages: Optional[tuple[str, ...]] = Field(None, description="Languages a request may name (None: every Whisper language).")
    allowed_tasks: tuple[Literal["transcribe", "translate"], ...] = Field(
        ("transcribe", "translate"), description="Tasks a request may ask for."
    )
    max_audio_seconds: float = Field(1800.0, gt=0, description="Longer audio gets 413.")
    max_upload_bytes: int = Field(100 * 1024 * 1024, gt=0, description="Bigger uploads get 413.")
    # The decoding engine (mlflow_faster_whisper.engine).
    batch_size: int = Field(BatchPolicy.batch_size, ge=1, description="Most 30 s windows in one forward pass, from all requests in flight.")
    max_requests: int = Field(64, ge=1, description="Requests held at once (decoding, or waiting for the model); one more gets 503.")
    max_latency_ms: int = Field(
        120_000,
        ge=100,
        description="A request that waited longer than this for its first forward pass gets 503; Whisper "
        "on CPU takes seconds per pass, so keep it large.",
    )
    request_timeout_s: int = Field(600, ge=1, description="BentoML traffic timeout per request.")
    header_timeout_s: float = Field(
        20.0,
        gt=0,
        description="A connection that sends no complete request head (request line and headers) this "
        "long after it opened or after its last answer is closed: idle and half-sent connections hold nothing.",
    )
    body_timeout_s: float = Field(
        120.0,
        gt=0,
        description="A request's whole body must arrive within this of its head, or it gets 408 and its "
        "connection is closed; raise it for large uploads over slow links (the webhook's is at most 10 s).",
    )
    follow_interval_s: float = Field(
        30.0,
        ge=0,
        description="A service started on models:/NAME@ALIAS checks the alias this often and moves to the version "
        "it names (0: never); a pinned version, a path or a built bento never moves.",
    )
    shadow: Optional[str] = Field(
        None,
        pattern=r"^models:/",
        description="A candidate registry version (models:/NAME@staging) that also decodes a sampled fraction of "
        "live requests, only in the time production leaves idle; its agreement, WER/CER against production's "
        "text and latency ratio are written to its model version as shadow.* tags. Followed like the model.",
    )
    shadow_fraction: float = Field(0.1, ge=0, le=1, description="Fraction of requests the shadow decodes too.")
    shadow_report_every: int = Field(
        50, ge=1, description="Write the shadow figures to MLflow every N shadowed requests (and at shutdown)."
    )
    shadow_max_wait_s: float = Field(
        30.0, gt=0, description="Shadow work not started this long after its request is dropped (and counted)."
    )
    webhook_secret: Optional[str] = Field(
        None,
        pattern=r"^(env|file):.+$",
        description="Where the secret of an MLflow registry webhook is, env:VARIABLE or file:PATH; set, "
        "POST /webhooks/mlflow takes its signed model_version_alias events and checks the followed alias at "
        "once (an unsigned or forged call gets 401); unset, that route does not exist.",
    )
    admin_key: Optional[str] = Field(
        None,
        pattern=r"^(env|file):.+$",
        description="Where the control key is, env:VARIABLE or file:PATH; set, PUT /admin/model with "
        "'X-Whisper-Admin-Key: KEY' moves the service to another registry version or alias (what "
        "`mlflow deployments update -t bentoml` calls); unset, that route does not exist.",
    )
    api_key: Optional[str] = Field(
        None,
        pattern=r"^(env|file):.+$",
        description="Where the API keys are, env:VARIABLE or file:PATH (comma/space/newline-separated); "
        "set, every route but /livez and /readyz needs 'Authorization: Bearer KEY'.",
    )
    max_inflight_upload_bytes: Optional[int] = Field(
        None,
        gt=0,
        description="Bytes that all uploads in flight may hold together (a body is counted from its Content-Length, "
        "or as it arrives when chunked, until its audio is decoded); an upload beyond it gets 503 before its body "
        "is read, so many large uploads at once cannot fill the worker's memory and disk. Default: 4 x "
        "max_upload_bytes; at least max_upload_bytes.",
    )
    unready_after_full_s: float = Field(
        30.0,
        gt=0,
        description="/readyz answers 503 once the engine has held max_requests requests (it admits no more) for "
        "this long, and 200 again once it admits work; a load balancer then sends new work elsewhere.",
    )
    realtime: RealtimeSettings = Field(
        default_factory=RealtimeSettings,
        description="Bounds of live transcription sessions (/v1/realtime): sessions held, their length, idle time, "
        """turn and event sizes; --arg 'realtime={"max_sessions": 8}'.""",
    )

    @property
    def upload_budget_bytes(self) -> int:
        """max_inflight_upload_bytes, or its default."""
        return self.max_inflight_upload_bytes or 4 * self.max_upload_bytes

    @model_validator(mode="after")
    def _budget_holds_one_upload(self) -> ServiceConfig:
        if self.upload_budget_bytes < self.max_upload_bytes:
            raise ValueError(
                f"max_inflight_upload_bytes={self.max_inflight_upload_bytes} is below max_upload_bytes="
                f"{self.max_upload_bytes}: no upload of the largest size would ever be read. Raise it."
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _model_list(cls, values: Any) -> Any:
        # `model` alone is a list of one; `models` alone makes its first the default `model`.
        if not isinstance(values, dict):
            return values
        values = dict(values)
        models = values.get("models")
        if isinstance(models, str):
            models = [m.strip() for m in models.split(",") if m.strip()]
        if models:
            models = list(models)
            model = values.get("model")
            if model is None:
                values["model"] = models[0]
            elif model != models[0]:
                models = [model, *(m for m in models if m != model)]
            values["models"] = tuple(models)
        elif values.get("model") is not None:
            values["models"] = (values["model"],)
        for key in ("preload",):
            if isinstance(values.get(key), str):
                values[key] = tuple(v.strip() for v in values[key].split(",") if v.strip())
        return values

    @model_validator(mode="after")
    def _distinct_models(self) -> ServiceConfig:
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models lists a URI twice ({', '.join(self.models)}): list each model once.")
        return self

    @model_validator(mode="before")
    @classmethod
    def _flat_load_options(cls, values: Any) -> Any:
        # `--arg device=cuda` reads better than a nested object: lift the flat keys into `load`.
        if isinstance(values, dict):
            flat = {k: values[k] for k in LoadOptions.model_fields if k in values}
            if flat:
                values = {k: v for k, v in values.items() if k not in flat}
                values["load"] = {**dict(values.get("load") or {}), **flat}
        return values

    @field_validator("decoding", mode="before")
    @classmethod
    def _decoding(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = json.loads(value) if value.strip() else {}
        # Validate through the flavor's own parser so errors name the closest valid option.
        return _parse_options(value)

    @field_validator("allowed_languages", "allowed_tasks", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
            return tuple(items) or None
        return value

    @field_validator("allowed_languages")
    @classmethod
    def _known_languages(cls, value: Optional[tuple[str, ...]]) -> Optional[tuple[str, ...]]:
        if value is None:
            return None
        return tuple(_parse_options({"language": code}).language or code for code in value)  # a given code parses to one


def _parse_options(value: Any) -> DecodingOptions:
    # pydantic reports only ValueErrors as field errors.
    try:
        return DecodingOptions.parse(value)
    except DecodingOptionsError as exc:
        raise ValueError(exc.message) from None


def bound_violation(config: ServiceConfig, options: DecodingOptions) -> Optional[DecodingOptionsError]:
    """The first bound ``options`` break (the error names its field), or None."""
    if options.beam_size > config.max_beam_size:
        return DecodingOptionsError(
            f"beam_size={options.beam_size} is above this service's maximum of {config.max_beam_size}.", field="beam_size"
        )
    if config.allowed_languages is not None and options.language is not None:
        if options.language not in config.allowed_languages:
            allowed = ", ".join(config.allowed_languages)
            return DecodingOptionsError(f"language {options.language!r} is not served here; allowed: {allowed}.", field="language")
    if options.task not in config.allowed_tasks:
        return DecodingOptionsError(f"task {options.task!r} is not served here; allowed: {', '.join(config.allowed_tasks)}.", field="task")
    return None


class DroppedArgumentsError(Exception):
    """``bentoml serve BENTO --arg ...`` asks for configuration a built bento would not apply."""


def refuse_dropped_arguments(config: ServiceConfig, argv: Sequence[str]) -> None:
    """Refuse ``bentoml serve`` arguments that a built bento would silently drop.

    BentoML 1.4 serves a built bento with the arguments it was built with: ``--arg`` and
    ``--arg-file`` on the ``bentoml serve`` command line are replaced by the bento's own. A value
    that differs from the build's would not be applied (``device=cpu`` on a CUDA bento still loads
    on CUDA), so the start fails instead, naming the fix. ``argv`` is the ``bentoml serve`` process's
    command line; values equal to the build's pass.
    """
    built = config.model_dump()

    def changes(values: dict[str, Any]) -> bool:
        try:
            return ServiceConfig.model_validate({**built, **values}) != config
        except ValidationError:  # an invalid value would be dropped too
            return True

    given = command_line_arguments(argv)
    known = {*ServiceConfig.model_fields, *LoadOptions.model_fields}
    unknown = [k for k in given if k not in known]
    if unknown:  # a typo or a decoding option: no bento would take it
        raise DroppedArgumentsError(
            f"Unknown service configuration key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: the keys are "
            f"{', '.join(k for k in sorted(known) if k != 'load')}; decoding options go in "
            """decoding='{"beam_size": 1}'."""
        )
    if not changes(given):
        return
    flat = {**built, **built["load"]}
    differ = ", ".join(f"{k}={v} (built with {flat.get(k)})" for k, v in given.items() if changes({k: v}))
    raise DroppedArgumentsError(
        f"This is a built bento: BentoML serves it with the configuration it was built with and drops the "
        f"`bentoml serve` arguments, so these would not be applied: {differ}. Build a bento with them "
        "(python -m whisper_bento.build --arg model=... --arg KEY=VALUE), or serve from source "
        "(bentoml serve whisper_bento:Transcriber --arg model=... --arg KEY=VALUE)."
    )


def command_line_arguments(argv: Sequence[str]) -> dict[str, Any]:
    """The ``--arg KEY=VALUE`` and ``--arg-file FILE`` values of a ``bentoml serve`` command line,
    merged as BentoML's CLI merges them (``--arg`` over the file)."""
    from_args: dict[str, Any] = {}
    from_files: dict[str, Any] = {}
    items = iter(argv[1:])
    for item in items:
        option, inline, value = item.partition("=")
        if option not in ("--arg", "--arg-file"):
            continue
        value = value if inline else next(items, "")
        if option == "--arg-file":
            from_files.update(yaml.safe_load(Path(value).read_text()) or {})
        else:
            key, _, val = value.partition("=")
            from_args[key] = val
    return {**from_files, **from_args}
