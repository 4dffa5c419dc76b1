"""What the service says about itself: its own page at ``GET /`` (``page.html``: transcribe a file
or the microphone, see what is served), its OpenAPI document (``/docs.json``, which BentoML's page,
moved to ``/docs``, renders) and the answer to a path or method it does not have.

BentoML builds ``/docs.json`` from the service's name, a README it writes itself and the mounted
FastAPI app's routes, under one "default" tag. ``install`` serves the document from the mounted
app instead (its routes are matched before BentoML's own), built from BentoML's (which merges the
app's routes with BentoML's probes) with this project's title, versions (the package's and the
served model's), a description saying how to call it, routes grouped by tags, and the decoding
fields typed as ``DecodingOptions`` declares them.
"""

from __future__ import annotations

import copy
import functools
import json
from http import HTTPStatus
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Optional

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse

from mlflow_faster_whisper.decoding import DecodingOptions
from mlflow_faster_whisper.errors import DISTRIBUTION
from whisper_bento.auth import PAGE_PATH
from whisper_bento.errors import ApiError

TITLE = "Whisper speech-to-text"
DOCS_PATH = "/docs"  # BentoML's page of the OpenAPI document, moved from / to make room for ours
# The page holds no data (what it shows comes from keyed routes, called with the key typed into
# it), so it is served without a key; it may not be framed, where a key is typed.
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "frame-ancestors 'none'; base-uri 'none'; form-action 'none'; object-src 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
TRANSCRIPTION, OPENAI, CONTROL, OPERATIONS = "transcription", "OpenAI-compatible", "registry control", "operations"
TAGS = [
    {
        "name": TRANSCRIPTION,
        "description": "Transcribe (or translate to English) an audio file: the full result, "
        "segments with timestamps, in JSON, text, SRT or VTT, or streamed as server-sent events.",
    },
    {
        "name": OPENAI,
        "description": "OpenAI's audio API: the `openai` SDK and other OpenAI clients work unchanged "
        "with `base_url` set to this service's `/v1`.",
    },
    {
        "name": CONTROL,
        "description": "Move the service to another registry version or alias (with an admin key), "
        "or wake it on an MLflow registry webhook; routes that exist only when configured.",
    },
    {"name": OPERATIONS, "description": "Probes, metrics and what is served."},
]
# (tag, summary) of each route; a route not listed is an operation (BentoML's probes among them).
ROUTES = {
    "/transcribe": (TRANSCRIPTION, "Transcribe an audio file with any decoding option"),
    "/v1/audio/transcriptions": (OPENAI, "Create a transcription (OpenAI)"),
    "/v1/audio/translations": (OPENAI, "Create a translation to English (OpenAI)"),
    "/v1/models": (OPENAI, "List the served model (OpenAI)"),
    "/v1/models/{model_id}": (OPENAI, "Describe the served model (OpenAI)"),
    "/admin/model": (CONTROL, "Serve another registry version or alias"),
    "/webhooks/mlflow": (CONTROL, "Receive an MLflow registry webhook event"),
    "/info": (OPERATIONS, "The served model, device, configuration and decoding defaults"),
    "/livez": (OPERATIONS, "Liveness: the worker runs"),
    "/healthz": (OPERATIONS, "Liveness, as /livez"),
    "/readyz": (OPERATIONS, "Readiness: the model is loaded and a request would be admitted"),
    "/metrics": (OPERATIONS, "Prometheus metrics"),
}
_DESCRIPTION = """\
Transcribes speech with Whisper (faster-whisper on CTranslate2), serving **{model}** from an MLflow
registry. Every error is a JSON body `{{"error": {{"message", "type", "param", "code"}}}}` whose
message names the fix.

Send the audio as a multipart `file` field, with any decoding option as a form field:

```
curl -F file=@speech.wav -F language=en -F beam_size=1 {{BASE}}/transcribe
curl -F file=@speech.wav -F response_format=srt {{BASE}}/v1/audio/transcriptions
```

or with the OpenAI SDK:

```python
from openai import OpenAI
client = OpenAI(base_url="{{BASE}}/v1", api_key="<key, or anything if none is configured>")
client.audio.transcriptions.create(model="whisper-1", file=open("speech.wav", "rb"))
```

An option not sent takes the served version's stored default, then the service's configuration
(see `GET /info`); the service may bound what a request asks (beam size, languages, tasks).
"""


def package_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # imported from a source tree that is not installed
        return "unknown"


def document(spec: dict[str, Any], model: Optional[dict[str, Any]], base_url: str) -> dict[str, Any]:
    """The service's OpenAPI document: BentoML's ``spec`` made this project's, naming ``model``
    (the served version's ``model_info``: name, version, ...); its examples call ``base_url``."""
    spec = copy.deepcopy(spec)
    served = f"{model['name']} version {model['version']}" if model else "the configured model"
    spec["info"] = {
        "title": TITLE,
        "version": f"{package_version()} (model: {served})",
        "description": _DESCRIPTION.format(model=served).replace("{BASE}", base_url.rstrip("/")),
        "x-package": {"name": DISTRIBUTION, "version": package_version()},
        "x-model": {key: model.get(key) for key in ("name", "version", "aliases", "quantization", "device", "compute_type", "source")}
        if model
        else None,
    }
    spec["tags"] = TAGS
    json_fields = {name for name, field in decoding_fields().items() if field.get("type") in ("array", "object")}
    for path, item in spec.get("paths", {}).items():
        tag, summary = ROUTES.get(path, (OPERATIONS, None))
        for operation in item.values():
            if isinstance(operation, dict) and "responses" in operation:
                operation["tags"] = [tag]
                if summary:
                    operation["summary"] = summary
                form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
                if form is not None:  # lists and objects travel as JSON text in their part
                    sent_as_json = json_fields & set(form.get("schema", {}).get("properties", {}))
                    form["encoding"] = {name: {"contentType": "application/json"} for name in sorted(sent_as_json)}
    return spec


def decoding_fields() -> dict[str, dict[str, Any]]:
    """The form field of each decoding option, typed and bounded as ``DecodingOptions`` declares it.

    A form carries text: numbers and booleans are read from it as JSON would read them, lists and
    objects are sent as JSON text (``temperature=[0.0, 0.2]``), and strings as they are
    (``forms`` and ``mlflow_faster_whisper.decoding.coerce_text_value``). No default is shown: an
    option not sent takes the served version's default, which /info reports.
    """
    schema = DecodingOptions.model_json_schema(mode="validation")
    definitions = schema.get("$defs", {})
    fields = {}
    for name, field_schema in schema["properties"].items():
        converted = _openapi_30(field_schema, definitions)
        converted.pop("default", None)
        converted.pop("title", None)
        if converted.get("type") in ("array", "object"):
            converted["description"] = f"{converted.get('description', '')} Sent as JSON text.".strip()
        fields[name] = converted
    return fields


def _openapi_30(schema: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    """A pydantic (JSON Schema 2020-12) schema as OpenAPI 3.0 reads it: references inlined,
    ``anyOf [X, null]`` as a nullable X, numeric exclusive bounds as booleans."""
    if "$ref" in schema:
        return _openapi_30(definitions[schema["$ref"].rsplit("/", 1)[-1]], definitions)
    result = {key: value for key, value in schema.items() if key not in ("anyOf", "$defs")}
    options = [s for s in schema.get("anyOf", []) if s.get("type") != "null"]
    if "anyOf" in schema:
        if len(options) == 1:
            result.update(_openapi_30(options[0], definitions))
        else:
            result["anyOf"] = [_openapi_30(s, definitions) for s in options]
        if len(options) < len(schema["anyOf"]):
            result["nullable"] = True
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(result.get(exclusive), (int, float)) and not isinstance(result[exclusive], bool):
            result[bound], result[exclusive] = result[exclusive], True
    if "items" in result:
        result["items"] = _openapi_30(result["items"], definitions)
    if "prefixItems" in result:  # a fixed-length tuple: OpenAPI 3.0 has no such thing
        items = [_openapi_30(s, definitions) for s in result.pop("prefixItems")]
        result["items"] = items[0] if len({json.dumps(i, sort_keys=True) for i in items}) == 1 else {"anyOf": items}
    if "properties" in result:
        result["properties"] = {k: _openapi_30(v, definitions) for k, v in result["properties"].items()}
    return result


@functools.lru_cache(maxsize=1)
def page_html() -> str:
    """The service's page, shipped as package data."""
    return resources.files("whisper_bento").joinpath("page.html").read_text(encoding="utf-8")


def bentoml_docs_page() -> Path:
    """BentoML's Swagger UI page, which renders ``./docs.json`` with ``./static_content``: both
    resolve to BentoML's routes from ``DOCS_PATH`` as they did from ``/``."""
    from _bentoml_impl.server import app as bentoml_app

    return Path(bentoml_app.__file__).with_name("main-openapi.html")


def install(app: Any) -> None:
    """Serve, from the mounted FastAPI ``app``: the service's page at ``/`` (the app's routes are
    matched before BentoML's own index), BentoML's page at ``DOCS_PATH``, and the service's
    OpenAPI document at ``/docs.json``."""

    @app.get(PAGE_PATH, include_in_schema=False)
    async def service_page() -> HTMLResponse:
        return HTMLResponse(page_html(), headers=PAGE_HEADERS)

    @app.get(DOCS_PATH, include_in_schema=False)
    async def api_docs() -> FileResponse:
        return FileResponse(bentoml_docs_page(), media_type="text/html")

    @app.get("/docs.json", include_in_schema=False)
    async def openapi_document(request: Request) -> JSONResponse:
        import bentoml

        instance = bentoml.get_current_service()
        primary = getattr(instance, "primary", None)  # the first model's slot, while it is loaded
        model = primary.served.model_info if primary is not None else None
        return JSONResponse(document(instance.bento_service.openapi_spec.asdict(), model, str(request.base_url)))


class JsonRoutingErrors:
    """ASGI middleware: a 404 or 405 answered by BentoML's own router (a path the mounted app does
    not have, a wrong method on a probe) in the service's JSON error shape, as the app's are."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        replaced = False

        async def send_json(message: dict) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] in (404, 405) and not _is_json(message):
                status = message["status"]
                error = ApiError(status, f"{HTTPStatus(status).phrase}: {scope['method']} {scope['path']}")
                body = json.dumps(error.body()).encode()
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({**message, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                replaced = True
                return
            if replaced:  # the plain-text body of the answer replaced
                return
            await send(message)

        await self.app(scope, receive, send_json)


def _is_json(message: dict) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"application/json") for k, v in message.get("headers", []))
