"""The BentoML service: ``bentoml serve whisper_bento:Transcriber --arg model=models:/NAME@production``.

Every HTTP route lives in one mounted FastAPI app (so every error is an OpenAI-style JSON body
with a precise status), and every transcription, streaming or not, from every endpoint goes
through the flavor's one decoding engine (``mlflow_faster_whisper.engine``): concurrent requests
share its forward passes, 30 s window by 30 s window.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import bentoml
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from whisper_bento import auth, forms, formats, model_ref, openapi
from whisper_bento.config import ServiceConfig, bound_violation
from whisper_bento.errors import ApiError, bad_request, invalid_value, too_large

with bentoml.importing():
    import numpy as np

    import mlflow_faster_whisper
    from mlflow_faster_whisper import checksums, devices, transcription
    from mlflow_faster_whisper.engine import Engine, Overloaded, PassStats, Ticket
    from mlflow_faster_whisper import constants as c
    from mlflow_faster_whisper.audio import decode_audio
    from mlflow_faster_whisper.decoding import DecodingOptions
    from mlflow_faster_whisper.errors import AudioDecodeError, AudioTooLongError, DecodingOptionsError
    from mlflow_faster_whisper.transcription import Transcription

_logger = logging.getLogger(__name__)
# BentoML's server logging keeps the root at WARNING; the service's own lines (model loaded,
# batch sizes) are part of what an operator reads.
logging.getLogger("whisper_bento").setLevel(logging.INFO)

CONFIG = bentoml.use_arguments(ServiceConfig)
MODEL = model_ref.bento_model_for(CONFIG.model)
_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
BATCH_SIZE = bentoml.metrics.Histogram(
    name="whisper_batch_size",
    documentation="Requests sharing one forward pass of the decoding engine.",
    buckets=_BUCKETS,
)
PASS_WINDOWS = bentoml.metrics.Histogram(
    name="whisper_pass_windows",
    documentation="30 s windows per forward pass, by CTranslate2 call (encode, generate, ...).",
    labelnames=["op"],
    buckets=_BUCKETS,
)
QUEUE_WAIT = bentoml.metrics.Histogram(
    name="whisper_queue_wait_seconds",
    documentation="From a request's admission to its first forward pass.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)

app = FastAPI(title="whisper", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> Response:
    _logger.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    return exc.response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    # Routing's own answers (no such path, wrong method) in the one error shape too.
    return ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}").response()


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> Response:
    _logger.exception("%s %s failed", request.method, request.url.path)
    return ApiError(500, f"Internal error ({type(exc).__name__}); see the server log.").response()


@bentoml.service(
    name="whisper",
    workers=1,
    resources={"cpu": "2", "memory": "2Gi"},
    traffic={"timeout": CONFIG.request_timeout_s, "max_concurrency": 64},
)
@bentoml.asgi_app(app, path="/")
class Transcriber:
    """Whisper speech-to-text on one registered model version."""

    bento_model = MODEL.ref

    def __init__(self) -> None:
        started = time.perf_counter()
        stored = self.bento_model
        self.model_dir = model_ref.model_path(stored)
        conf = mlflow_faster_whisper.flavor_config(self.model_dir)
        self.whisper = mlflow_faster_whisper.load_model(self.model_dir, **CONFIG.load.model_dump())
        # In force, after any fallback (devices.place): what /info and every response report.
        self.placement = devices.Placement(
            self.whisper.model.device, self.whisper.model.compute_type, CONFIG.load.compute_type
        )
        self.version_defaults = DecodingOptions.parse(conf.get(c.DECODING))
        self.defaults = DecodingOptions.layered(self.version_defaults, CONFIG.decoding)
        transcription.check_options(self.whisper, self.defaults)
        problem = bound_violation(CONFIG, self.defaults)
        if problem is not None:
            raise ValueError(
                f"The decoding defaults (model version + service config) break the service's bounds: "
                f"{problem.message} Lower the default or raise the bound."
            )
        self.model_info = _model_info(stored, conf, self.placement)
        self.engine = Engine(
            self.whisper,
            batch_size=CONFIG.batch_size,
            max_requests=CONFIG.max_requests,
            max_wait_s=CONFIG.max_latency_ms / 1000,
            on_pass=_observe_pass,
        )
        self.load_seconds = round(time.perf_counter() - started, 3)
        self.runtime = devices.runtime_facts()
        _logger.info(
            "Serving %s (%s) on %s/%s, loaded in %.2fs",
            self.model_info["name"],
            self.model_info["version"],
            self.placement.device,
            self.placement.compute_type,
            self.load_seconds,
        )

    @app.post("/transcribe", **openapi.transcription_route(native=True))
    async def transcribe(self, request: Request) -> Response:
        """Multipart ``file`` + optional decoding fields -> the full JSON result."""
        return await self._serve(request, await forms.parse_native(request, CONFIG.max_upload_bytes), native=True)

    @app.post("/v1/audio/transcriptions", **openapi.transcription_route(native=False))
    async def openai_transcriptions(self, request: Request) -> Response:
        return await self._serve(request, await forms.parse_openai(request, CONFIG.max_upload_bytes, task="transcribe"))

    @app.post("/v1/audio/translations", **openapi.transcription_route(native=False, task="translate"))
    async def openai_translations(self, request: Request) -> Response:
        return await self._serve(request, await forms.parse_openai(request, CONFIG.max_upload_bytes, task="translate"))

    @app.get("/v1/models", **openapi.read_route())
    async def openai_models(self) -> Response:
        return JSONResponse({"object": "list", "data": [self._openai_model()]})

    @app.get("/v1/models/{model_id}", **openapi.read_route(404))
    async def openai_model(self, model_id: str) -> Response:
        return JSONResponse(self._openai_model())

    @app.get("/info", **openapi.read_route())
    async def info(self) -> Response:
        return JSONResponse(
            {
                "model": self.model_info,
                "device": self.placement.device,
                "compute_type": self.placement.compute_type,
                "requested_compute_type": self.placement.requested_compute_type,
                "config": {**CONFIG.model_dump(mode="json"), "model": auth.redact_uri(CONFIG.model)},
                "worker_pid": os.getpid(),
                "decoding": {
                    "version_defaults": self.version_defaults.explicit(),
                    "service_defaults": CONFIG.decoding.explicit(),
                    "effective": self.defaults.model_dump(mode="json"),
                },
                "load_seconds": self.load_seconds,
                "runtime": self.runtime,
                # Serving needs neither torch, transformers nor (once resolved) MLflow; this shows it live.
                "imports": {name: name in sys.modules for name in ("torch", "transformers", "mlflow")},
            }
        )

    async def _serve(self, request: Request, parsed: forms.ParsedRequest, *, native: bool = False) -> Response:
        formats.check_format(parsed.response_format, native=native)
        options = self._resolve(parsed.overrides)
        audio = await run_in_threadpool(_decode_audio, parsed.audio)
        if parsed.stream:
            return await self._stream(audio, options)
        result, batch_size = await self._decode(request, audio, options)
        return formats.render(
            parsed.response_format, formats.Result(result, options, self.model_info, batch_size)
        )

    def _resolve(self, overrides: dict[str, Any]) -> DecodingOptions:
        """Version defaults < service config < request, then the service's bounds."""
        try:
            options = DecodingOptions.layered(self.defaults, overrides)
            transcription.check_options(self.whisper, options)
        except DecodingOptionsError as exc:
            raise invalid_value(exc.message, param=exc.field) from None
        problem = bound_violation(CONFIG, options)
        if problem is not None:
            raise invalid_value(problem.message, param=problem.field, code="out_of_bounds")
        return options

    async def _decode(self, request: Request, audio: np.ndarray, options: DecodingOptions) -> tuple[Transcription, int]:
        """A non-streaming request through the engine: its result, and the most requests that
        shared one of its forward passes.

        A request whose client goes away is cancelled: its waiting windows leave the queue, and
        it stops at its next forward pass, so abandoned requests do not hold the model.
        """
        ticket = Ticket()
        try:
            future = self.engine.submit(audio, options, ticket)
        except Overloaded as exc:
            raise _overloaded(exc) from None
        submitted = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({submitted, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not submitted.done():
            ticket.cancel()  # the engine settles the future (Cancelled); nobody reads it
            submitted.add_done_callback(lambda f: f.exception())
            raise ApiError(499, "The client closed the connection before the answer; the request was dropped.")
        try:
            result = submitted.result()
        except Overloaded as exc:
            raise _overloaded(exc) from None
        except Exception as exc:
            _logger.error("Decoding failed: %s: %s", type(exc).__name__, exc)
            raise ApiError(500, f"Decoding failed: {type(exc).__name__}: {exc}") from None
        if ticket.queue_wait_s is not None:
            QUEUE_WAIT.observe(ticket.queue_wait_s)
        _logger.info(
            "Decoded a request in %.3fs (%.1f s of audio; first pass after %.3fs; up to %d requests per pass)",
            ticket.decode_s,
            len(audio) / c.SAMPLE_RATE,
            ticket.queue_wait_s or 0.0,
            ticket.max_requests_per_pass,
        )
        return result, ticket.max_requests_per_pass

    async def _stream(self, audio: np.ndarray, options: DecodingOptions) -> Response:
        """Server-sent events as segments are decoded (OpenAI's transcript.text.* events); the
        windows go through the engine's shared passes like every other request's."""
        try:
            segments, info = await run_in_threadpool(self.engine.stream, audio, options)
        except Overloaded as exc:
            raise _overloaded(exc) from None
        return StreamingResponse(self._events(segments, info, options), media_type="text/event-stream")

    def _events(self, segments: Iterator, info: Any, options: DecodingOptions) -> Iterator[str]:
        try:
            done = []
            for segment in segments:
                done.append(segment)
                yield _sse({"type": "transcript.text.delta", "delta": segment.text, "segment": segment.model_dump()})
            yield _sse(
                {
                    "type": "transcript.text.done",
                    "text": transcription.join_text(done),
                    "language": info.language,
                    "duration": float(info.duration),
                    "decoding": options.model_dump(mode="json"),
                    "model": self.model_info,
                }
            )
        except Exception as exc:  # the status line is sent already: report in the stream
            _logger.exception("Streaming transcription failed")
            yield _sse({"type": "error", **ApiError(500, f"{type(exc).__name__}: {exc}").body()})
        finally:
            segments.close()

    def _openai_model(self) -> dict[str, Any]:
        return {"id": self.model_info["name"], "object": "model", "created": 0, "owned_by": "whisper-bento"}


if CONFIG.api_key:
    # Loaded at import: a missing variable or file stops the start-up with the reason.
    Transcriber.add_asgi_middleware(auth.ApiKeyMiddleware, keys=auth.load_keys(CONFIG.api_key))


def _observe_pass(stats: PassStats) -> None:
    BATCH_SIZE.observe(stats.requests)
    PASS_WINDOWS.labels(op=stats.op).observe(stats.windows)
    _logger.debug("Forward pass: %s of %d window(s) from %d request(s) in %.3fs", stats.op, stats.windows, stats.requests, stats.seconds)


def _overloaded(exc: Overloaded) -> ApiError:
    return ApiError(503, f"The service is overloaded ({exc}); retry later.")


def _decode_audio(data: bytes) -> np.ndarray:
    if not data:
        raise bad_request("The file is empty (0 bytes): send a wav, flac, mp3 or ogg recording.", param="file")
    try:
        return decode_audio(data, max_seconds=CONFIG.max_audio_seconds)
    except AudioTooLongError as exc:
        raise too_large(exc.message, code="audio_too_long") from None
    except AudioDecodeError as exc:
        raise bad_request(exc.message, param="file", code="invalid_audio") from None


async def _client_gone(request: Request, every_s: float = 0.2) -> None:
    """Returns once the client has closed its connection."""
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)


def _sse(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


def _model_info(stored: bentoml.Model, conf: dict[str, Any], placement: devices.Placement) -> dict[str, Any]:
    meta = stored.info.metadata
    registry = MODEL.registry
    return {
        "name": registry.name if registry else meta.get(model_ref.META_NAME, stored.tag.name),
        "version": registry.version if registry else meta.get(model_ref.META_VERSION),
        "aliases": list(registry.aliases) if registry else meta.get(model_ref.META_ALIASES, []),
        "run_id": registry.run_id if registry else meta.get(model_ref.META_RUN_ID),
        "uri": auth.redact_uri(CONFIG.model),
        "source": MODEL.source,
        "bento_model": str(stored.tag),
        "quantization": conf.get(c.QUANTIZATION),
        "compute_type": placement.compute_type,
        "device": placement.device,
        "size_bytes": conf.get(c.SIZE_BYTES),
        "sha256": checksums.digest(conf.get(c.CHECKSUMS, {})),
        "checksums": conf.get(c.CHECKSUMS, {}),
        "lineage": conf.get(c.SOURCE),
    }
