"""The BentoML service: ``bentoml serve whisper_bento:Transcriber --arg model=models:/NAME@production``.

Every HTTP route lives in one mounted FastAPI app (so every error is an OpenAI-style JSON body
with a precise status), and every transcription, streaming or not, from every endpoint goes
through the flavor's one decoding engine (``mlflow_faster_whisper.engine``): concurrent requests
share its forward passes, 30 s window by 30 s window.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import logging
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import bentoml
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from whisper_bento import auth, connections, forms, formats, model_ref, openapi, page, startup
from whisper_bento.config import bound_violation
from whisper_bento.errors import ApiError, bad_request, invalid_value, too_large

with bentoml.importing():
    import mlflow_faster_whisper
    from mlflow_faster_whisper import checksums, devices, transcription
    from mlflow_faster_whisper.malloc import release_free_memory
    from mlflow_faster_whisper import constants as c
    from mlflow_faster_whisper.decoding import DecodingOptions
    from mlflow_faster_whisper.errors import AudioDecodeError, AudioTooLongError, DecodingOptionsError, Overloaded
    from mlflow_faster_whisper.transcription import Transcription

# The decoding stack (numpy, CTranslate2, faster-whisper, PyAV: mlflow_faster_whisper.engine and
# .audio) is imported where a version is loaded: in a worker. The `bentoml serve` process and
# `bentoml build` import this module only for the service's definition; the stack would add a
# quarter of a second to the serve process, which every cold start waits for before its worker.
if TYPE_CHECKING:
    import numpy as np

    from mlflow_faster_whisper.engine import Engine, PassStats, Ticket

_logger = logging.getLogger(__name__)
# BentoML's server logging keeps the root at WARNING; the service's own lines (model loaded,
# batch sizes) are part of what an operator reads.
logging.getLogger("whisper_bento").setLevel(logging.INFO)

# The one start-up step (configuration, model, checks); an error it cannot heal ends the server
# with one line that names the fix, in the `bentoml serve` process and in a worker alike.
CONFIG, MODEL = startup.start()
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
SWAPS = bentoml.metrics.Counter(
    name="whisper_model_swaps",
    documentation="Moves of the primary or shadow version to another: ok, or failed (the served version stays).",
    labelnames=["role", "outcome"],
)
# Every response names the version that answered it.
VERSION_HEADER = "x-whisper-model-version"
QUEUE_WAIT = bentoml.metrics.Histogram(
    name="whisper_queue_wait_seconds",
    documentation="From a request's admission to its first forward pass.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)

app = FastAPI(title=page.TITLE, version=page.package_version(), docs_url=None, redoc_url=None, openapi_url=None)
page.install(app)  # the service's OpenAPI document, which BentoML's page at GET / renders


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
    # No BentoML max_concurrency: its limiter counts requests before the API key is checked and
    # answers in its own shape; connections.ConcurrencyLimit does it after (MAX_CONCURRENCY).
    traffic={"timeout": CONFIG.request_timeout_s},
)
@bentoml.asgi_app(app, path="/")
class Transcriber:
    """Whisper speech-to-text on a registered model version, with an optional shadow candidate."""

    bento_model = MODEL.ref

    def __init__(self) -> None:
        self.primary = _Slot("primary", _load_primary(self.bento_model), CONFIG.model, MODEL.source)
        self.runtime = devices.runtime_facts()
        self.uploads = forms.Uploads(CONFIG.max_upload_bytes, CONFIG.upload_budget_bytes)
        # A stream's thread is inside its segments while it waits for the model: one per stream the
        # engines admit (the old and the new version's during a move), never anyio's shared pool.
        self._stream_threads = ThreadPoolExecutor(max_workers=2 * CONFIG.max_requests, thread_name_prefix="whisper-stream")
        self.shadow = None
        if CONFIG.shadow:
            from whisper_bento.shadow import Shadow  # and the registry's scorer: only a shadowing service needs them

            # The candidate's engine runs a pass only while production's holds no request.
            options = {"defer": self._primary_busy, "on_pass": None, "max_requests": 2 * CONFIG.batch_size,
                       "max_wait_s": CONFIG.shadow_max_wait_s}
            tag, registered = model_ref.import_from_registry(CONFIG.shadow)
            served = _load(bentoml.models.get(tag), registered, CONFIG.shadow, "registry", **options)
            self.shadow = Shadow(_Slot("shadow", served, CONFIG.shadow, "registry", engine_options=options),
                                 fraction=CONFIG.shadow_fraction, report_every=CONFIG.shadow_report_every)

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        if self.shadow is not None:
            self.shadow.report(write=True)

    @property
    def served(self) -> _Served:
        """The primary version new requests go to."""
        return self.primary.served

    def _primary_busy(self) -> bool:
        engine = self.primary.served.engine
        return engine is not None and engine.busy()

    async def __is_ready__(self) -> bool:
        """BentoML's /readyz: 503 once the primary engine has admitted no request for
        ``unready_after_full_s`` (it holds all it may), 200 again as soon as it admits one."""
        return self.primary.admits(CONFIG.unready_after_full_s)

    async def __metrics__(self, content: str) -> str:
        """BentoML's /metrics, with gauges read as it is scraped: requests each engine holds, and
        the versions in this worker's memory (a retired one leaves once it is unloaded)."""
        slots = [self.primary] + ([self.shadow.slot] if self.shadow else [])
        lines = ["# HELP whisper_requests_held Requests an engine holds now (decoding, or waiting for the model).",
                 "# TYPE whisper_requests_held gauge"]
        lines += [f'whisper_requests_held{{role="{slot.role}"}} {slot.held()}' for slot in slots]
        lines += ["# HELP whisper_version_loaded Copies of a model version in this worker's memory.",
                  "# TYPE whisper_version_loaded gauge"]
        loaded = collections.Counter(_LOADED.values())
        lines += [f'whisper_version_loaded{{name="{name}",version="{version}"}} {n}' for (name, version), n in sorted(loaded.items())]
        lines += ["# HELP whisper_upload_bytes_in_flight Bytes held by uploads being read, or read and not yet decoded.",
                  "# TYPE whisper_upload_bytes_in_flight gauge", f"whisper_upload_bytes_in_flight {self.uploads.in_flight}"]
        return content.rstrip("\n") + "\n" + "\n".join(lines) + "\n"

    def _retarget(self, uri: str) -> _Served:
        """Serve what the registry URI ``uri`` names, and follow it from now on if it is an alias
        (the control route); the served version stays if it cannot be served."""
        try:
            holder = model_ref.registry_version(uri)
        except Exception as exc:
            # MLflow answers an unknown alias with INVALID_PARAMETER_VALUE, an unknown version with RESOURCE_DOES_NOT_EXIST.
            missing = getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
            raise ApiError(404 if missing else 503, f"{uri} could not be resolved in the registry: {exc}",
                           code="model_not_found" if missing else "registry_unavailable") from None
        if holder is None:
            raise bad_request(f"{uri!r} is not a registry URI: send models:/NAME/VERSION or models:/NAME@ALIAS.",
                              param="model")
        try:
            return self.primary.move_to(holder, uri)
        except Exception as exc:
            raise ApiError(422, f"{holder.name} version {holder.version} was not served ({type(exc).__name__}: "
                           f"{exc}); version {self.served.model_info['version']} still is.",
                           code="model_not_served") from None

    @app.post("/transcribe", **openapi.transcription_route(native=True))
    async def transcribe(self, request: Request) -> Response:
        """Multipart ``file`` + optional decoding fields -> the full JSON result."""
        return await self._serve(request, await forms.parse_native(request, self.uploads), native=True)

    @app.post("/v1/audio/transcriptions", **openapi.transcription_route(native=False))
    async def openai_transcriptions(self, request: Request) -> Response:
        return await self._serve(request, await forms.parse_openai(request, self.uploads, task="transcribe"))

    @app.post("/v1/audio/translations", **openapi.transcription_route(native=False, task="translate"))
    async def openai_translations(self, request: Request) -> Response:
        return await self._serve(request, await forms.parse_openai(request, self.uploads, task="translate"))

    @app.get("/v1/models", **openapi.read_route())
    async def openai_models(self) -> Response:
        return JSONResponse({"object": "list", "data": [_openai_model(self.served)]})

    @app.get("/v1/models/{model_id}", **openapi.read_route(404))
    async def openai_model(self, model_id: str) -> Response:
        return JSONResponse(_openai_model(self.served))

    @app.get("/info", **openapi.read_route())
    async def info(self) -> Response:
        served = self.served
        # No place on this machine (checkpoint, key files, libraries) and no process id: an API
        # key holder learns what is served, not how to reach the host.
        return JSONResponse(auth.hide_local_paths(
            {
                "model": served.model_info,
                "device": served.placement.device,
                "compute_type": served.placement.compute_type,
                "requested_compute_type": served.placement.requested_compute_type,
                "follow": self.primary.follow.report(),
                "shadow": self.shadow.report() if self.shadow else None,
                # What an API key holder may see: whether each secret is configured, not where it is.
                "config": {**CONFIG.model_dump(mode="json"), "model": auth.public_uri(CONFIG.model),
                           **{name: getattr(CONFIG, name) is not None for name in ("api_key", "admin_key", "webhook_secret")}},
                "decoding": {
                    "version_defaults": served.version_defaults.explicit(),
                    "service_defaults": CONFIG.decoding.explicit(),
                    "effective": served.defaults.model_dump(mode="json"),
                },
                "load_seconds": served.load_seconds,
                "runtime": self.runtime,
                # Serving needs neither torch, transformers nor (once resolved) MLflow; this shows it live.
                "imports": {name: name in sys.modules for name in ("torch", "transformers", "mlflow")},
            }
        ))

    @app.post("/webhooks/mlflow", include_in_schema=False)
    async def mlflow_webhook(self, request: Request) -> Response:
        """An MLflow registry webhook: a signed event on the followed alias checks it at once,
        instead of at the end of the poll interval. Only with ``webhook_secret`` configured."""
        if WEBHOOK_SECRETS is None:
            raise StarletteHTTPException(404, "Not Found")  # as if the route did not exist
        # The headers first: an unsigned, stale or replayed call is refused before its body is read.
        problem = auth.delivery_problem(request.headers, WEBHOOK_DELIVERIES)
        if problem is None:
            body = await forms.read_body(request, WEBHOOK_MAX_BYTES, what="A webhook event")
            problem = (auth.signature_problem(body, request.headers, WEBHOOK_SECRETS)
                       or WEBHOOK_DELIVERIES.add(request.headers[auth.MLFLOW_DELIVERY]))
        if problem is not None:
            _logger.warning("Refused a webhook call: %s", problem)
            raise ApiError(401, f"Webhook call refused: {problem}.", code="invalid_signature")
        try:
            event = json.loads(body)
            data = event.get("data") or {}
            entity, name, alias = event.get("entity"), data.get("name"), data.get("alias")
        except (ValueError, AttributeError, RecursionError):  # RecursionError: JSON nested too deep
            raise bad_request("A signed webhook body must be MLflow's JSON event.") from None
        slots = [self.primary] + ([self.shadow.slot] if self.shadow else [])
        woken = [slot for slot in slots if entity == "model_version_alias" and slot.follow.target == f"models:/{name}@{alias}"]
        if not woken:
            return JSONResponse({"ignored": f"not an event on a followed alias ({self.primary.follow.why})"})
        for slot in woken:
            _logger.info("Webhook: %s is now version %s; checking it now", slot.follow.target, data.get("version"))
            slot.follow.webhook_events += 1
            slot.follow.wake.set()
        return JSONResponse({"checking": [slot.follow.target for slot in woken]})

    @app.put("/admin/model", include_in_schema=False)
    async def admin_model(self, request: Request) -> Response:
        """``{"model": "models:/NAME/VERSION"}`` (or ``@ALIAS``, then followed): serve it, moved to as
        a followed alias moves (no request dropped). Only with ``admin_key`` configured."""
        if ADMIN_KEYS is None:
            raise StarletteHTTPException(404, "Not Found")  # as if the route did not exist
        if not auth.matches(auth.header_bytes(request.scope, ADMIN_HEADER.encode()), ADMIN_KEYS):
            raise ApiError(401, f"Missing or wrong control key: send the header '{ADMIN_HEADER}: <key>' with the "
                           "key admin_key names.", code="invalid_admin_key")
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            body = None
        uri = body.get("model") if isinstance(body, dict) else None
        if not isinstance(uri, str) or not uri:
            raise bad_request('Send a JSON body {"model": "models:/NAME/VERSION"} (or models:/NAME@ALIAS).', param="model")
        served = await run_in_threadpool(self._retarget, uri)
        return JSONResponse({"model": served.model_info, "follow": self.primary.follow.report()})

    async def _serve(self, request: Request, parsed: forms.ParsedRequest, *, native: bool = False) -> Response:
        """Every transcription route's request, once parsed: it holds the version it started on
        until it ends, and lets go of that (and of the engine) as soon as its client goes away."""
        served = self.primary.acquire()
        handed = False  # to the stream, which releases the version once its engine work has ended
        try:
            formats.check_format(parsed.response_format, native=native)
            options = self._resolve(served, parsed.overrides)
            audio = await _unless_gone(request, run_in_threadpool(_decode_audio, parsed.audio), abandon=_nothing)
            parsed.release_upload()
            if parsed.stream:
                handed = True
                response = await self._stream(served, request, audio, options)
            else:
                result, ticket = await self._decode(served, request, audio, options)
                response = formats.render(parsed.response_format,
                                          formats.Result(result, options, served.model_info, ticket.max_requests_per_pass))
                if self.shadow is not None:
                    self.shadow.offer(audio, parsed.overrides, result, ticket, served.model_info)
        finally:
            parsed.release_upload()
            if not handed:
                self.primary.release(served)
        response.headers[VERSION_HEADER] = str(served.model_info["version"])
        return response

    def _resolve(self, served: _Served, overrides: dict[str, Any]) -> DecodingOptions:
        """Version defaults < service config < request, then the service's bounds."""
        try:
            options = DecodingOptions.layered(served.defaults, overrides)
            transcription.check_options(served.whisper, options)
        except DecodingOptionsError as exc:
            raise invalid_value(exc.message, param=exc.field) from None
        problem = bound_violation(CONFIG, options)
        if problem is not None:
            raise invalid_value(problem.message, param=problem.field, code="out_of_bounds")
        return options

    async def _decode(self, served: _Served, request: Request, audio: np.ndarray, options: DecodingOptions) -> tuple[Transcription, Ticket]:
        """A non-streaming request through the engine: its result, and its ticket (how it was batched).

        A request whose client goes away is cancelled: its waiting windows leave the queue, and
        it stops at its next forward pass, so abandoned requests do not hold the model.
        """
        from mlflow_faster_whisper.engine import Ticket

        ticket = Ticket()
        try:
            future = served.engine.submit(audio, options, ticket)
        except Overloaded as exc:
            raise _overloaded(exc) from None
        # Gone: the engine settles the future (Cancelled) and nobody reads it.
        try:
            result = await _unless_gone(request, asyncio.wrap_future(future), abandon=ticket.cancel)
        except Overloaded as exc:
            raise _overloaded(exc) from None
        except ApiError:
            raise
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
        return result, ticket

    async def _stream(self, served: _Served, request: Request, audio: np.ndarray, options: DecodingOptions) -> Response:
        """Server-sent events as segments are decoded (OpenAI's transcript.text.* events); the
        windows go through the engine's shared passes like every other request's. It owns the
        request's hold on ``served`` from its first line (see ``_Stream``)."""
        from mlflow_faster_whisper.engine import Ticket

        stream = _Stream(self.primary, served, Ticket(), self._stream_threads)
        try:
            info = await _unless_gone(request, stream.run(stream.start, audio, options), abandon=stream.close)
        except Overloaded as exc:
            stream.close()
            raise _overloaded(exc) from None
        except BaseException:
            stream.close()
            raise
        return _EventStream(stream, self._events(stream, request, info, options), media_type="text/event-stream")

    async def _events(self, stream: _Stream, request: Request, info: Any, options: DecodingOptions) -> AsyncIterator[str]:
        """The events, each segment taken on the stream's thread while the client is watched: a
        client gone (before the first event or between two) ends the stream at once."""
        try:
            done = []
            while (segment := await _unless_gone(request, stream.run(stream.next_segment), abandon=stream.close)) is not None:
                done.append(segment)
                yield _sse({"type": "transcript.text.delta", "delta": segment.text, "segment": segment.model_dump()})
            yield _sse(
                {
                    "type": "transcript.text.done",
                    "text": transcription.join_text(done),
                    "language": info.language,
                    "duration": float(info.duration),
                    "decoding": options.model_dump(mode="json"),
                    "model": stream.served.model_info,
                }
            )
        except ApiError as exc:  # the client has gone: nobody reads an event any more
            _logger.info("Stream ended: %s", exc.message)
        except Exception as exc:  # the status line is sent already: report in the stream
            _logger.exception("Streaming transcription failed")
            yield _sse({"type": "error", **ApiError(500, f"{type(exc).__name__}: {exc}").body()})
        finally:
            stream.close()


# A worker whose service cannot be created for a reason a restart cannot fix ends the server.
Transcriber.add_asgi_middleware(startup.EndServerOnFailedStart)
Transcriber.add_asgi_middleware(page.JsonRoutingErrors)  # BentoML's own 404/405 in the one error shape
# Loaded at import: a missing variable or file stops the start-up with the reason. The control
# key and a webhook secret are one key each, taken whole; API keys are a list.
ADMIN_KEYS = auth.load_keys(CONFIG.admin_key, "admin_key", whole=True) if CONFIG.admin_key else None
ADMIN_HEADER = "x-whisper-admin-key"
WEBHOOK_SECRETS = auth.load_keys(CONFIG.webhook_secret, "webhook_secret", whole=True) if CONFIG.webhook_secret else None
WEBHOOK_MAX_BYTES = 64 * 1024
WEBHOOK_DELIVERIES = auth.SeenDeliveries()  # refuses a signed delivery sent again
# What a client connection may hold (whisper_bento.connections). Middleware runs in the order
# added, after BentoML's own: body deadline, then the API key, then the count of requests in flight.
MAX_CONCURRENCY = 64  # requests in flight per worker; the next gets 503
WEBHOOK_CONCURRENCY = 4  # the webhook needs no API key: its own small pool, so it never takes a keyed request's place
WEBHOOK_BODY_TIMEOUT_S = 10.0  # an MLflow event is a few hundred bytes
connections.limit_request_heads(CONFIG.header_timeout_s)
Transcriber.add_asgi_middleware(connections.BodyDeadline, seconds=CONFIG.body_timeout_s,
                                tighter={auth.WEBHOOK_PATH: WEBHOOK_BODY_TIMEOUT_S})
if CONFIG.api_key:
    Transcriber.add_asgi_middleware(auth.ApiKeyMiddleware, keys=auth.load_keys(CONFIG.api_key))
Transcriber.add_asgi_middleware(connections.ConcurrencyLimit, limit=MAX_CONCURRENCY,
                                pools={auth.WEBHOOK_PATH: WEBHOOK_CONCURRENCY}, exempt=auth.PROBES | {"/metrics"})


@dataclass(eq=False)
class _Served:
    """One loaded version: its model, engine, decoding defaults and what responses report. A
    request holds it (``users``) from admission to its last byte."""

    whisper: Any
    engine: Engine
    placement: devices.Placement
    version_defaults: DecodingOptions
    defaults: DecodingOptions
    model_info: dict[str, Any]
    load_seconds: float
    users: int = 0


# Every model this worker holds in memory -> (name, version): a retired version leaves it once its
# memory can go back (/metrics' whisper_version_loaded).
_LOADED: weakref.WeakKeyDictionary[Any, tuple[str, str]] = weakref.WeakKeyDictionary()


def _load(stored: bentoml.Model, registry: model_ref.RegistryVersion | None, uri: str, source: str,
          **engine_options: Any) -> _Served:
    """Load a stored version (checksums verified) with the service's options and start its engine;
    ``uri`` named it, resolved from ``source`` ("registry" or "bento").

    Raises:
        ValueError: its decoding defaults, with the service's, break the service's bounds.
    """
    started = time.perf_counter()
    model_dir = model_ref.model_path(stored)
    conf = mlflow_faster_whisper.flavor_config(model_dir)
    whisper = mlflow_faster_whisper.load_model(model_dir, **CONFIG.load.model_dump())
    # In force, after any fallback (devices.place): what /info and every response report.
    placement = devices.Placement(whisper.model.device, whisper.model.compute_type, CONFIG.load.compute_type)
    version_defaults = DecodingOptions.parse(conf.get(c.DECODING))
    defaults = DecodingOptions.layered(version_defaults, CONFIG.decoding)
    transcription.check_options(whisper, defaults)
    problem = bound_violation(CONFIG, defaults)
    if problem is not None:
        raise ValueError(
            f"The decoding defaults (model version + service config) break the service's bounds: "
            f"{problem.message} Lower the default or raise the bound."
        )
    from mlflow_faster_whisper.engine import Engine

    engine = Engine(
        whisper,
        **{"batch_size": CONFIG.batch_size, "max_requests": CONFIG.max_requests,
           "max_wait_s": CONFIG.max_latency_ms / 1000, "on_pass": _observe_pass, **engine_options},
    )
    served = _Served(whisper, engine, placement, version_defaults, defaults, _model_info(stored, conf, placement, registry, uri, source),
                     round(time.perf_counter() - started, 3))
    _LOADED[whisper] = (str(served.model_info["name"]), str(served.model_info["version"]))
    _logger.info("Serving %s (%s) on %s/%s, loaded in %.2fs", served.model_info["name"], served.model_info["version"],
                 placement.device, placement.compute_type, served.load_seconds)
    return served


def _load_primary(stored: bentoml.Model) -> _Served:
    """The version the service starts on; in a worker whose alias had moved since the serving
    process resolved it and whose new version cannot be loaded, that process's version."""
    try:
        return _load(stored, MODEL.registry, CONFIG.model, MODEL.source)
    except Exception as exc:
        fallback = MODEL.fallback
        if fallback is None:
            raise
        _logger.warning("%s version %s could not be loaded (%s: %s); serving version %s, as the serving process "
                        "resolved it at start-up", CONFIG.model, MODEL.registry.version if MODEL.registry else "?",
                        type(exc).__name__, exc, fallback.registry.version if fallback.registry else fallback.ref.tag)
        return _load(bentoml.models.get(fallback.ref.tag), fallback.registry, CONFIG.model, fallback.source)


def _smoke_decode(served: _Served) -> None:
    """One cheap pass through a just-loaded version: 1 s of silence, greedy, at most 8 tokens, no
    temperature fallback (silence under beam search with fallback can take seconds)."""
    import numpy as np

    options = DecodingOptions.layered(served.defaults, {"beam_size": 1, "temperature": 0.0, "max_new_tokens": 8,
                                                        "vad_filter": False, "without_timestamps": True})
    served.engine.transcribe(np.zeros(c.SAMPLE_RATE, dtype=np.float32), options)


def _retire(served: _Served) -> None:
    """Stop a version no request holds any more and give its memory back, off the event loop."""

    def retire() -> None:
        engine, served.whisper, served.engine = served.engine, None, None
        engine.close(wait=True)  # its threads hold the model until they end
        del engine
        gc.collect()
        release_free_memory()
        _logger.info("Version %s unloaded", served.model_info["version"])

    threading.Thread(target=retire, name="whisper-retire", daemon=True).start()


class _Stream:
    """A streaming request's hold on its version and on the engine, let go of once, however the
    stream ends: answered, failed, or its client gone (while queued for the model, before the
    first event, between two).

    One stream thread at a time is inside its segments. Closing cancels the engine ticket (its
    waiting windows leave the queue, its next model call fails), then, once no thread is inside
    (a running generator cannot be closed), closes the segments and releases the version.
    """

    def __init__(self, slot: _Slot, served: _Served, ticket: Ticket, threads: ThreadPoolExecutor) -> None:
        self.slot, self.served, self.ticket = slot, served, ticket
        self._threads = threads
        self._segments: Iterator[Any] | None = None
        self._inside: Future | None = None  # the last work handed to a stream thread
        self._lock = threading.Lock()
        self._closed = False

    def start(self, audio: np.ndarray, options: DecodingOptions) -> Any:
        """(On a stream thread.) Admit the request to the engine; faster-whisper's info."""
        self._segments, info = self.served.engine.stream(audio, options, self.ticket)
        return info

    def next_segment(self) -> Any:
        """(On a stream thread.) The next segment, or None after the last."""
        return next(self._segments, None)

    def run(self, work: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``work(*args)`` on a stream thread; awaiting it can be given up at any time."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the stream is closed")
            self._inside = self._threads.submit(work, *args)
            return asyncio.wrap_future(self._inside)

    def close(self) -> None:
        """Let go, from any thread, any number of times: now, or when the thread inside returns."""
        self.ticket.cancel()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            inside = self._inside
        if inside is None:
            self._release()
        else:
            inside.add_done_callback(lambda _: self._release())

    def _release(self) -> None:
        try:
            if self._segments is not None:
                self._segments.close()  # the engine's hold on the request
        finally:
            self.slot.release(self.served)

    def __del__(self) -> None:  # a response never sent (its request cancelled in between)
        self.close()


class _EventStream(StreamingResponse):
    """A ``_Stream``'s events; the stream is let go of when the response ends, however it ends:
    Starlette neither closes nor resumes an events iterator whose client went or whose send failed."""

    def __init__(self, stream: _Stream, events: AsyncIterator[str], **options: Any) -> None:
        super().__init__(events, **options)
        self._stream = stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.close()


class _Slot:
    """A served version that may move: the primary, or the shadow candidate.

    A request holds the version it started on (``acquire``) to its end, whatever moves meanwhile.
    A move (the followed alias names another version, a webhook, the control route) imports the
    new version, verifies its checksums, loads it and warms it with one smoke decode beside the
    served one, then swaps it in between two requests; the old one is unloaded once no request
    holds it. A version that fails is not served, and not retried until the alias moves again.
    """

    def __init__(self, role: str, served: _Served, uri: str, source: str, engine_options: dict[str, Any] | None = None):
        self.role = role
        self.served = served
        self.engine_options = engine_options or {}
        self.follow = _Follow(CONFIG.follow_interval_s)
        self.follow.point_at(uri, source)
        self._lock = threading.Lock()  # self.served and its users
        self._moving = threading.Lock()  # one move at a time: the follower's or the control route's
        self._follower: threading.Thread | None = None
        self._full_since: float | None = None  # when admits() first saw the engine full, since
        self._start_follower()

    def acquire(self) -> _Served:
        with self._lock:
            served = self.served
            served.users += 1
            return served

    def release(self, served: _Served) -> None:
        with self._lock:
            served.users -= 1
            retired = served is not self.served and served.users == 0
        if retired:
            _retire(served)

    def held(self) -> int:
        """Requests the served version's engine holds now."""
        engine = self.served.engine
        return engine.held if engine is not None else 0

    def admits(self, full_for_s: float) -> bool:
        """False once the engine has held every request it may (``max_requests``) for ``full_for_s``,
        as the calls to this see it (the readiness probe's, each few seconds)."""
        engine = self.served.engine
        if engine is None or engine.held < engine.max_requests:
            self._full_since = None
            return True
        now = time.monotonic()
        if self._full_since is None:
            self._full_since = now
        return now - self._full_since < full_for_s

    def _start_follower(self) -> None:
        if self.follow.target is not None and self._follower is None:
            self._follower = threading.Thread(target=self._follow_alias, name=f"whisper-follow-{self.role}", daemon=True)
            self._follower.start()

    def _follow_alias(self) -> None:
        """Check the followed alias every interval (or when woken) and move to the version it names."""
        follow = self.follow
        while True:  # MLflow is imported only where the registry needs it (model_ref): not at start-up
            follow.wake.wait(follow.interval_s)
            follow.wake.clear()
            target = follow.target
            if target is None:  # pinned since, through the control route
                continue
            try:
                holder = model_ref.registry_version(target)
            except Exception as exc:  # the registry is unreachable: keep serving, say so
                follow.note_error(f"checking {target}: {type(exc).__name__}: {exc}")
                continue
            follow.last_check = time.time()
            served = self.served.model_info
            if (holder is None or (holder.name, holder.version) == follow.failed or follow.target != target
                    or (holder.name, holder.version) == (served["name"], served["version"])):
                continue  # nothing to do: no lock taken, nothing recomputed, on the common poll
            try:
                self.move_to(holder, target)
            except Exception:  # noted by move_to; the served version stays
                pass

    def move_to(self, holder: model_ref.RegistryVersion, uri: str) -> _Served:
        """Serve ``holder`` (named by ``uri``, followed from now on if an alias); the version served.

        Raises:
            Exception: why ``holder`` cannot be served (noted in /info and /metrics); nothing moved.
        """
        with self._moving:
            old = self.served
            if (holder.name, holder.version) != (old.model_info["name"], old.model_info["version"]):
                self._swap_in(holder, uri, old)
            self.follow.point_at(uri, "registry")
        self._start_follower()
        return self.served

    def _swap_in(self, holder: model_ref.RegistryVersion, uri: str, old: _Served) -> None:
        _logger.info("Loading %s version %s beside version %s (%s)", holder.name, holder.version,
                     old.model_info["version"], self.role)
        new = None
        try:
            # The version seen, not the URI again: one registry lookup, and no race with a later move.
            tag, registered = model_ref.import_from_registry(f"models:/{holder.name}/{holder.version}")
            new = _load(bentoml.models.get(tag), registered, uri, "registry", **self.engine_options)
            _smoke_decode(new)
        except Exception as exc:
            if new is not None:  # loaded, but its smoke decode failed
                _retire(new)
            self.follow.failed = (holder.name, holder.version)
            self.follow.note_error(f"version {holder.version} was not served: {type(exc).__name__}: {exc}")
            SWAPS.labels(role=self.role, outcome="failed").inc()
            raise
        with self._lock:
            self.served = new
            idle = old.users == 0
        self.follow.failed, self.follow.last_error = None, None
        self.follow.swaps += 1
        SWAPS.labels(role=self.role, outcome="ok").inc()
        _logger.info("Now serving %s version %s as %s (was %s; loaded in %.2fs)", new.model_info["name"],
                     new.model_info["version"], self.role, old.model_info["version"], new.load_seconds)
        if idle:
            _retire(old)
        del old, new  # this thread's last references: a retired version's memory goes back


class _Follow:
    """Which alias the service follows, if any, and what happened so far (/info)."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.wake = threading.Event()  # set: check the alias now, not at the end of the interval
        self.target: str | None = None
        self.why = ""
        self.last_check: float | None = None
        self.last_error: str | None = None
        # (name, version) that failed: not retried until the alias moves again. The name too: a control
        # call's version 1 of another model must not stop this alias's version 1.
        self.failed: tuple[str, str] | None = None
        self.swaps = 0
        self.webhook_events = 0  # signed events on the followed alias

    def point_at(self, model_uri: str, source: str) -> None:
        """Serving ``model_uri`` (resolved from ``source``) from now on: follow it if it is an alias."""
        alias = model_ref.alias_of(model_uri) if source == "registry" else None
        self.target = f"models:/{alias[0]}@{alias[1]}" if alias and self.interval_s > 0 else None
        if self.target:
            self.why = f"follows {self.target} every {self.interval_s:g} s"
        elif source == "bento":
            self.why = "pinned: a built bento serves the version recorded in it"
        elif alias:
            self.why = "pinned: follow_interval_s=0"
        else:
            self.why = f"pinned: {auth.public_uri(model_uri)} names one version"
        self.failed = None

    def note_error(self, message: str) -> None:
        self.last_error = message
        _logger.warning("Following the alias: %s", message)

    def report(self) -> dict[str, Any]:
        return {"following": self.target is not None, "alias": self.target, "interval_s": self.interval_s,
                "why": self.why, "last_check": self.last_check, "swaps": self.swaps,
                "failed_version": self.failed[1] if self.failed else None,
                "failed_model": self.failed[0] if self.failed else None, "last_error": self.last_error,
                "webhook": CONFIG.webhook_secret is not None, "webhook_events": self.webhook_events}


def _openai_model(served: _Served) -> dict[str, Any]:
    return {"id": served.model_info["name"], "object": "model", "created": 0, "owned_by": "whisper-bento"}


def _observe_pass(stats: PassStats) -> None:
    BATCH_SIZE.observe(stats.requests)
    PASS_WINDOWS.labels(op=stats.op).observe(stats.windows)
    _logger.debug("Forward pass: %s of %d window(s) from %d request(s) in %.3fs", stats.op, stats.windows, stats.requests, stats.seconds)


def _overloaded(exc: Overloaded) -> ApiError:
    return ApiError(503, f"The service is overloaded ({exc}); retry later.")


def _decode_audio(data: bytes) -> np.ndarray:
    from mlflow_faster_whisper.audio import decode_audio

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


T = TypeVar("T")


async def _unless_gone(request: Request, work: Awaitable[T], *, abandon: Callable[[], None]) -> T:
    """``work``'s result, unless its client closes the connection first (499) or this request is
    cancelled (BentoML's timeout): then ``abandon()`` lets go of what the work holds, and the
    work's result, whenever it comes, is dropped."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.add_done_callback(_drop_result)
            abandon()
    if not task.done():
        raise ApiError(499, "The client closed the connection before the answer; the request was dropped.")
    return task.result()


def _drop_result(work: asyncio.Future) -> None:
    if not work.cancelled():
        work.exception()  # read: an abandoned work's error is nobody's to log


def _nothing() -> None:
    """Abandoning the work lets go of nothing (it holds neither a version nor the engine)."""


def _sse(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


def _model_info(stored: bentoml.Model, conf: dict[str, Any], placement: devices.Placement,
                registry: model_ref.RegistryVersion | None, uri: str, source: str) -> dict[str, Any]:
    meta = stored.info.metadata
    return {
        "name": registry.name if registry else meta.get(model_ref.META_NAME, stored.tag.name),
        "version": registry.version if registry else meta.get(model_ref.META_VERSION),
        "aliases": list(registry.aliases) if registry else meta.get(model_ref.META_ALIASES, []),
        "run_id": registry.run_id if registry else meta.get(model_ref.META_RUN_ID),
        "uri": auth.public_uri(uri),  # every response carries it: no local path
        "source": source,
        "bento_model": str(stored.tag),
        "quantization": conf.get(c.QUANTIZATION),
        "compute_type": placement.compute_type,
        "device": placement.device,
        "size_bytes": conf.get(c.SIZE_BYTES),
        "sha256": checksums.digest(conf.get(c.CHECKSUMS, {})),
        "checksums": conf.get(c.CHECKSUMS, {}),
        "lineage": auth.hide_local_paths(conf.get(c.SOURCE)),
    }
