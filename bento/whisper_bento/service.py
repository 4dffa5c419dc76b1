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
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import bentoml
from fastapi import FastAPI, Request, WebSocket
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from whisper_bento import auth, connections, errors, formats, forms, metrics, model_ref, openapi, page, realtime, startup, streaming
from whisper_bento.config import bound_violation
from whisper_bento.errors import ApiError, bad_request, invalid_value, overloaded_error, too_large
from whisper_bento.metrics import QUEUE_WAIT
from whisper_bento.models import Hosted, Models
from whisper_bento.slots import Served, Slot, load
from whisper_bento.streaming import nothing, unless_gone

with bentoml.importing():
    from mlflow_faster_whisper import constants as c
    from mlflow_faster_whisper import devices, uris
    from mlflow_faster_whisper.decoding import DecodingOptions
    from mlflow_faster_whisper.errors import AudioDecodeError, AudioTooLongError, DecodingOptionsError, Overloaded
    from mlflow_faster_whisper.transcription import Transcription

# The decoding stack (numpy, CTranslate2, faster-whisper, PyAV: mlflow_faster_whisper.engine and
# .audio) is imported where a version is loaded: in a worker. The `bentoml serve` process and
# `bentoml build` import this module only for the service's definition; the stack would add a
# quarter of a second to the serve process, which every cold start waits for before its worker.
if TYPE_CHECKING:
    import numpy as np

    from mlflow_faster_whisper.engine import Ticket

_logger = logging.getLogger(__name__)
# BentoML's server logging keeps the root at WARNING; the service's own lines (model loaded,
# batch sizes) are part of what an operator reads.
logging.getLogger("whisper_bento").setLevel(logging.INFO)

# The one start-up step (configuration, model, checks); an error it cannot heal ends the server
# with one line that names the fix, in the `bentoml serve` process and in a worker alike.
CONFIG, MODELS, KEYS = startup.start()
MODEL = MODELS[0]  # the first: what a request that names no model gets
# Every response names the version that answered it.
VERSION_HEADER = "x-whisper-model-version"
MODEL_HEADER = "x-whisper-model"  # and the model (the name a request's `model` field would give)
ADMIN_KEYS = KEYS.admin  # read by the start-up, which ends it on a missing variable or file
ADMIN_HEADER = uris.ADMIN_HEADER
WEBHOOK_SECRETS = KEYS.webhook
WEBHOOK_MAX_BYTES = 64 * 1024
WEBHOOK_DELIVERIES = auth.SeenDeliveries()  # refuses a signed delivery sent again
# What a client connection may hold (whisper_bento.connections). Middleware runs in the order
# added, after BentoML's own: body deadline, then the API key, then the count of requests in flight.
MAX_CONCURRENCY = 64  # requests in flight per worker; the next gets 503
WEBHOOK_CONCURRENCY = 4  # the webhook needs no API key: its own small pool, so it never takes a keyed request's place
WEBHOOK_BODY_TIMEOUT_S = 10.0  # an MLflow event is a few hundred bytes

app = FastAPI(title=page.TITLE, version=page.package_version(), docs_url=None, redoc_url=None, openapi_url=None)
page.install(app)  # the service's page at GET /, BentoML's at /docs, and the OpenAPI document
errors.install(app)  # every error in the one JSON shape


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
    """Whisper speech-to-text on registered model versions (a request's ``model`` picks one), with
    an optional shadow candidate of the first."""

    bento_model = MODEL.ref  # the others are added to the service's models below the class

    def __init__(self) -> None:
        from mlflow_faster_whisper.engine import Turns

        # One turn-taker for the device: the models' engines take their forward passes in turn.
        self.models = Models(MODELS, CONFIG, Turns())
        # A BoundsError is the configuration's to fix: it ends the server (startup.cannot_heal).
        self.models.preload()
        self.runtime = devices.runtime_facts()
        self.uploads = forms.Uploads(CONFIG.max_upload_bytes, CONFIG.upload_budget_bytes)
        # A stream's thread is inside its segments while it waits for the model: one per stream the
        # engines admit (the old and the new version's during a move), never anyio's shared pool.
        self._stream_threads = ThreadPoolExecutor(
            max_workers=2 * CONFIG.max_requests * len(CONFIG.models), thread_name_prefix="whisper-stream"
        )
        # A request whose model is loading waits on one of these, off the event loop (one per request admitted).
        self._model_waits = ThreadPoolExecutor(max_workers=MAX_CONCURRENCY, thread_name_prefix="whisper-model-wait")
        self.shadow = None
        if CONFIG.shadow:
            from whisper_bento.shadow import Shadow  # and the registry's scorer: only a shadowing service needs them

            # The candidate's engine runs a pass only while production's holds no request.
            options = {
                "defer": self._primary_busy,
                "on_pass": None,
                "max_requests": 2 * CONFIG.batch_size,
                "max_wait_s": CONFIG.shadow_max_wait_s,
            }
            tag, registered = model_ref.import_from_registry(CONFIG.shadow)
            served = load(bentoml.models.get(tag), registered, CONFIG.shadow, "registry", CONFIG, **options)
            self.shadow = Shadow(
                Slot("shadow", served, CONFIG.shadow, "registry", CONFIG, engine_options=options),
                fraction=CONFIG.shadow_fraction,
                report_every=CONFIG.shadow_report_every,
            )

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        if self.shadow is not None:
            self.shadow.report(write=True)

    @property
    def primary(self) -> Slot | None:
        """The first model's slot while it is loaded."""
        return self.models.first.slot

    async def hold(self, model: str | None) -> tuple[Hosted, Served]:
        """The model a request names and the version of it the request holds until
        ``entry.release(served)``; waits (off the event loop) while that model is loaded.

        Raises:
            ApiError: 404 model_not_found; 503 when it cannot be loaded (the reason) or not in time.
        """
        entry = self.models.select(model)
        served = self.models.try_acquire(entry)
        if served is not None:
            return entry, served
        pending = asyncio.get_running_loop().run_in_executor(self._model_waits, self.models.acquire, entry)
        try:
            return entry, await asyncio.shield(pending)
        except asyncio.CancelledError:  # the request ended while its model loaded: let go once it has it

            def let_go(done: asyncio.Future[Served]) -> None:
                if not done.cancelled() and done.exception() is None:
                    entry.release(done.result())

            pending.add_done_callback(let_go)
            raise

    def _slots(self) -> list[Slot]:
        """The loaded models' slots, and the shadow's when there is one."""
        return self.models.slots() + ([self.shadow.slot] if self.shadow else [])

    def _primary_busy(self) -> bool:
        slot = self.primary
        engine = slot.served.version.started_engine if slot is not None else None
        return engine is not None and engine.busy()

    async def __is_ready__(self) -> bool:
        """BentoML's /readyz: 503 once a loaded model's engine has admitted no request for
        ``unready_after_full_s`` (it holds all it may), 200 again as soon as it admits one."""
        return all(slot.admits(CONFIG.unready_after_full_s) for slot in self.models.slots())

    async def __metrics__(self, content: str) -> str:
        """BentoML's /metrics, with gauges read as it is scraped: requests each engine holds, the
        versions in this worker's memory (a retired one leaves once it is unloaded), and each
        configured model's state and counts."""
        return metrics.gauges(content, self._slots(), self.uploads.in_flight, self.models)

    def _retarget(self, uri: str) -> tuple[Hosted, Served]:
        """Serve what the registry URI ``uri`` names, and follow it from now on if it is an alias
        (the control route): as the configured model of that name, else as the first; the served
        version stays if it cannot be served."""
        try:
            holder = model_ref.registry_version(uri)
        except Exception as exc:
            # MLflow answers an unknown alias with INVALID_PARAMETER_VALUE, an unknown version with RESOURCE_DOES_NOT_EXIST.
            missing = getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
            raise ApiError(
                404 if missing else 503,
                f"{uri} could not be resolved in the registry: {exc}",
                code="model_not_found" if missing else "registry_unavailable",
            ) from None
        if holder is None:
            raise bad_request(f"{uri!r} is not a registry URI: send models:/NAME/VERSION or models:/NAME@ALIAS.", param="model")
        entry = next((e for e in self.models.entries if e.name == holder.name), self.models.first)
        held = self.models.acquire(entry)  # loaded, and not unloaded while it moves
        try:
            assert entry.slot is not None, "a held model is loaded"
            return entry, entry.slot.move_to(holder, uri)
        except Exception as exc:
            raise ApiError(
                422,
                f"{holder.name} version {holder.version} was not served ({type(exc).__name__}: "
                f"{exc}); version {held.model_info['version']} still is.",
                code="model_not_served",
            ) from None
        finally:
            entry.release(held)

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

    @app.websocket(realtime.PATH)
    async def realtime_session(self, websocket: WebSocket) -> None:
        """OpenAI's Realtime API, transcription sessions (whisper_bento.realtime): each turn holds
        the version of the session's model it started on, as a request does."""
        await realtime.serve(websocket, realtime.Backend(self.hold, self._resolve, KEYS.api, CONFIG.realtime))

    @app.get("/v1/models", **openapi.read_route())
    async def openai_models(self) -> Response:
        return JSONResponse({"object": "list", "data": [_openai_model(self.models, entry) for entry in self.models.entries]})

    @app.get("/v1/models/{model_id}", **openapi.read_route(404))
    async def openai_model(self, model_id: str) -> Response:
        return JSONResponse(_openai_model(self.models, self.models.select(model_id)))

    @app.get("/info", **openapi.read_route())
    async def info(self) -> Response:
        """The first model's version at the top (as for one model), every model under ``models``."""
        first = self.models.first
        served = first.slot.served if first.slot is not None else None
        # No place on this machine (checkpoint, key files, libraries) and no process id: an API
        # key holder learns what is served, not how to reach the host.
        return JSONResponse(
            auth.hide_local_paths(
                {
                    "model": served.model_info if served else first.last_info or first.report(),
                    "device": served.placement.device if served else None,
                    "compute_type": served.placement.compute_type if served else None,
                    "requested_compute_type": served.placement.requested_compute_type if served else None,
                    "follow": first.slot.follow.report() if first.slot is not None else None,
                    "models": [entry.report() for entry in self.models.entries],
                    "memory": {"budget_bytes": self.models.budget_bytes, "loaded_bytes": self.models.used_bytes()},
                    "shadow": self.shadow.report() if self.shadow else None,
                    # What an API key holder may see: whether each secret is configured, not where it is.
                    "config": {
                        **CONFIG.model_dump(mode="json"),
                        "model": auth.public_uri(CONFIG.model),
                        "models": [auth.public_uri(uri) for uri in CONFIG.models],
                        **{name: getattr(CONFIG, name) is not None for name in ("api_key", "admin_key", "webhook_secret")},
                    },
                    "decoding": {
                        "version_defaults": served.version_defaults.explicit(),
                        "service_defaults": CONFIG.decoding.explicit(),
                        "effective": served.defaults.model_dump(mode="json"),
                    }
                    if served
                    else None,
                    "load_seconds": served.load_seconds if served else None,
                    "runtime": self.runtime,
                    # Serving needs neither torch, transformers nor (once resolved) MLflow; this shows it live.
                    "imports": {name: name in sys.modules for name in ("torch", "transformers", "mlflow")},
                }
            )
        )

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
            problem = auth.signature_problem(body, request.headers, WEBHOOK_SECRETS) or WEBHOOK_DELIVERIES.add(
                request.headers[auth.MLFLOW_DELIVERY]
            )
        if problem is not None:
            _logger.warning("Refused a webhook call: %s", problem)
            raise ApiError(401, f"Webhook call refused: {problem}.", code="invalid_signature")
        try:
            event = json.loads(body)
            data = event.get("data") or {}
            entity, name, alias = event.get("entity"), data.get("name"), data.get("alias")
        except (ValueError, AttributeError, RecursionError):  # RecursionError: JSON nested too deep
            raise bad_request("A signed webhook body must be MLflow's JSON event.") from None
        named = uris.alias_uri(str(name), str(alias)) if entity == "model_version_alias" else None
        woken = [slot for slot in self._slots() if named is not None and slot.follow.target == named]
        if not woken:
            why = "; ".join(f"{slot.role}: {slot.follow.why}" for slot in self._slots()) or "no model is loaded"
            return JSONResponse({"ignored": f"not an event on a followed alias ({why})"})
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
            raise ApiError(
                401,
                f"Missing or wrong control key: send the header '{ADMIN_HEADER}: <key>' with the key admin_key names.",
                code="invalid_admin_key",
            )
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            body = None
        uri = body.get("model") if isinstance(body, dict) else None
        if not isinstance(uri, str) or not uri:
            raise bad_request('Send a JSON body {"model": "models:/NAME/VERSION"} (or models:/NAME@ALIAS).', param="model")
        entry, served = await run_in_threadpool(self._retarget, uri)
        return JSONResponse({"model": served.model_info, "follow": entry.slot.follow.report() if entry.slot else None})

    async def _serve(self, request: Request, parsed: forms.ParsedRequest, *, native: bool = False) -> Response:
        """Every transcription route's request, once parsed: it holds the version it started on
        until it ends, and lets go of that (and of the engine) as soon as its client goes away."""
        try:
            entry, served = await self.hold(parsed.model)
        except BaseException:
            parsed.release_upload()
            raise
        handed = False  # to the stream, which releases the version once its engine work has ended
        try:
            formats.check_format(parsed.response_format, native=native)
            options = self._resolve(served, parsed.overrides)
            audio = await unless_gone(request, run_in_threadpool(_decode_audio, parsed.audio), abandon=nothing)
            parsed.release_upload()
            if parsed.stream:
                handed = True
                response = await streaming.respond(entry, served, request, audio, options, self._stream_threads)
            else:
                result, ticket = await self._decode(served, request, audio, options)
                response = formats.render(
                    parsed.response_format, formats.Result(result, options, served.model_info, ticket.max_requests_per_pass)
                )
                if self.shadow is not None and entry.first:  # the candidate is the first model's
                    self.shadow.offer(audio, parsed.overrides, result, ticket, served.model_info)
        finally:
            parsed.release_upload()
            if not handed:
                entry.release(served)
        response.headers[VERSION_HEADER] = str(served.model_info["version"])
        response.headers[MODEL_HEADER] = self.models.label(entry)
        return response

    def _resolve(self, served: Served, overrides: dict[str, Any]) -> DecodingOptions:
        """Version defaults < service config < request, then the service's bounds."""
        try:
            options = served.version.resolve(overrides)
        except DecodingOptionsError as exc:
            raise invalid_value(exc.message, param=exc.field) from None
        problem = bound_violation(CONFIG, options)
        if problem is not None:
            raise invalid_value(problem.message, param=problem.field, code="out_of_bounds")
        return options

    async def _decode(self, served: Served, request: Request, audio: np.ndarray, options: DecodingOptions) -> tuple[Transcription, Ticket]:
        """A non-streaming request through the engine: its result, and its ticket (how it was batched).

        A request whose client goes away is cancelled: its waiting windows leave the queue, and
        it stops at its next forward pass, so abandoned requests do not hold the model.
        """
        from mlflow_faster_whisper.engine import Ticket

        ticket = Ticket()
        try:
            future = served.engine.submit(audio, options, ticket)
        except Overloaded as exc:
            raise overloaded_error(exc) from None
        # Gone: the engine settles the future (Cancelled) and nobody reads it.
        try:
            result = await unless_gone(request, asyncio.wrap_future(future), abandon=ticket.cancel)
        except Overloaded as exc:
            raise overloaded_error(exc) from None
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


# BentoML's decorators make Transcriber a bentoml Service; its type stubs do not say so.
_SERVICE: Any = Transcriber
# A worker whose service cannot be created for a reason a restart cannot fix ends the server.
# Built bentos carry every configured model's version (BentoML reads the first from the class).
_SERVICE.models.extend(bentoml.models.BentoModel(tag) for tag in dict.fromkeys(str(m.ref.tag) for m in MODELS) if tag != str(MODEL.ref.tag))
_SERVICE.add_asgi_middleware(startup.EndServerOnFailedStart)
_SERVICE.add_asgi_middleware(page.JsonRoutingErrors)  # BentoML's own 404/405 in the one error shape
connections.limit_request_heads(CONFIG.header_timeout_s)
_SERVICE.add_asgi_middleware(connections.BodyDeadline, seconds=CONFIG.body_timeout_s, tighter={auth.WEBHOOK_PATH: WEBHOOK_BODY_TIMEOUT_S})
if KEYS.api:
    _SERVICE.add_asgi_middleware(auth.ApiKeyMiddleware, keys=KEYS.api)
_SERVICE.add_asgi_middleware(
    connections.ConcurrencyLimit, limit=MAX_CONCURRENCY, pools={auth.WEBHOOK_PATH: WEBHOOK_CONCURRENCY}, exempt=auth.PROBES | {"/metrics"}
)


def _openai_model(models: Models, entry: Hosted) -> dict[str, Any]:
    report = entry.report()
    return {
        "id": models.label(entry),
        "object": "model",
        "created": 0,
        "owned_by": "whisper-bento",
        **{key: report[key] for key in ("version", "quantization", "loaded", "state")},
    }


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
