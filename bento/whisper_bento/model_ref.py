"""Which model the service serves: a registry URI resolved once, imported into BentoML's store.

In development (``bentoml serve whisper_bento:Transcriber --arg model=models:/NAME@ALIAS``) the
alias is resolved against the MLflow registry at start-up and that version is imported into the
BentoML model store (once: the tag carries the version and a content digest). The ``bentoml
serve`` process resolves it; its workers, which import this module again, take that resolution
from the environment they inherit, so every worker serves the same version; a worker that
follows the alias asks the registry again, so one restarted after a move serves what it names
then. ``bentoml build`` runs the same code, so the bento records that model; serving the built
bento reads the model from the bento's own record and never contacts the registry.

A registry that is an MLflow server (an ``http(s)://`` tracking or registry URI: what a service
talks to in production) is asked over MLflow's REST API, and a version already in the BentoML
store is found by its registry identity: starting on an alias, and polling it, then import no
MLflow (its import cost: BENCHMARKS.md, section 5). MLflow itself is imported only to copy a new version into the
store, and to ask any other kind of registry (a sqlite file, Databricks).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import bentoml
from bentoml.exceptions import NotFound

import mlflow_faster_whisper
from mlflow_faster_whisper import checksums, uris
from mlflow_faster_whisper import constants as c
from mlflow_faster_whisper.uris import RegistryUri, parse_registry_uri, sqlite_database

_logger = logging.getLogger(__name__)

MLFLOW_MODEL_FOLDER = "mlflow_model"  # where bentoml.mlflow.import_model puts the MLflow model
# Bento model metadata keys.
META_URI = "model_uri"
META_NAME = "registered_model_name"
META_VERSION = "registered_model_version"
META_ALIASES = "aliases"
META_RUN_ID = "run_id"
META_SOURCE = "registry_source"  # the version's source (its artifacts' URI) as the registry gave it
# How the ``bentoml serve`` process hands its resolution to the workers it starts.
RESOLVED_ENV = "WHISPER_BENTO_RESOLVED_MODEL"


@dataclass(frozen=True)
class RegistryVersion:
    """A registered model version as the registry described it at import time."""

    name: str
    version: str
    aliases: tuple[str, ...]
    run_id: Optional[str]
    source: Optional[str] = None


class RegistryError(Exception):
    """The registry refused or failed a lookup; ``error_code`` is MLflow's (RESOURCE_DOES_NOT_EXIST, ...)."""

    def __init__(self, message: str, error_code: str = "INTERNAL_ERROR"):
        super().__init__(message)
        self.error_code = error_code


@dataclass(frozen=True)
class ModelChoice:
    """The BentoML model reference the service declares, and where it came from."""

    ref: bentoml.models.BentoModel
    source: str  # "registry" (resolved at start-up) or "bento" (recorded at build time)
    registry: Optional[RegistryVersion] = None
    # A worker that found its alias moved since the serving process resolved it: that process's
    # choice, served instead if the version the alias names now cannot be loaded.
    fallback: Optional[ModelChoice] = None


def bento_model_for(model_uri: str, *, follow: bool = False) -> ModelChoice:
    """The BentoML model the service declares for ``model_uri``.

    Inside a built bento: the model the bento was built with, with no registry lookup.
    Otherwise: the registry version the URI names now, imported into the BentoML model store if
    it is not there yet.

    Args:
        model_uri: what the service serves.
        follow: the service follows the alias ``model_uri`` names. A worker then asks the
            registry what the alias names now instead of taking the serving process's resolution,
            which a worker restarted after the alias moved would otherwise serve until its first poll.
    """
    bento_dir = running_bento_dir()
    if bento_dir is not None:
        return ModelChoice(ref=_model_recorded_in_bento(bento_dir, model_uri), source="bento")
    inherited = _resolved_by_parent(model_uri)
    if inherited is not None:
        if follow and alias_of(model_uri):
            return alias_now(model_uri, *inherited)
        tag, registered = inherited
    else:
        tag, registered = import_from_registry(model_uri)
        # One entry per configured model: a service of several models resolves each in turn.
        resolved = json.loads(os.environ.get(RESOLVED_ENV) or "null") or {}
        if resolved.get("pid") != os.getpid():
            resolved = {"pid": os.getpid(), "models": {}}
        resolved["models"][model_uri] = {"tag": tag, "registry": asdict(registered) if registered else None}
        os.environ[RESOLVED_ENV] = json.dumps(resolved)
    return ModelChoice(ref=bentoml.models.BentoModel(tag), source="registry", registry=registered)


def alias_now(model_uri: str, tag: str, registered: Optional[RegistryVersion]) -> ModelChoice:
    """In a worker: the version the alias ``model_uri`` names now, with the serving process's
    resolution (``tag``, ``registered``) as its fallback; that resolution alone, with a warning,
    if the registry cannot say or the new version cannot be imported."""
    inherited = ModelChoice(ref=bentoml.models.BentoModel(tag), source="registry", registry=registered)
    try:
        now = registry_version(model_uri)
        if now is None or registered is None or (now.name, now.version) == (registered.name, registered.version):
            return inherited
        _logger.info(
            "%s names version %s now (the serving process resolved version %s): serving it", model_uri, now.version, registered.version
        )
        # The version seen, not the alias again: one lookup, and no race with a later move.
        tag_now, registered_now = import_from_registry(uris.version_uri(now.name, now.version))
    except Exception as exc:
        _logger.warning(
            "Could not serve what %s names now (%s: %s); serving %s, as the serving process resolved it "
            "at start-up, until the alias is checked again",
            model_uri,
            type(exc).__name__,
            exc,
            tag,
        )
        return inherited
    return ModelChoice(ref=bentoml.models.BentoModel(tag_now), source="registry", registry=registered_now, fallback=inherited)


def _resolved_by_parent(model_uri: str) -> Optional[tuple[str, Optional[RegistryVersion]]]:
    """The ``bentoml serve`` process's resolution of ``model_uri``, in one of its workers.

    Only a BentoML worker whose parent wrote the resolution takes it; any other process (the
    serve process itself, a test, a build) resolves afresh, so an alias moved since is seen. It
    may be stale in a worker started later (BentoML restarts a worker that died): a worker that
    follows the alias checks it (``bento_model_for``).
    """
    from bentoml._internal.context import server_context

    resolved = json.loads(os.environ.get(RESOLVED_ENV) or "null")
    if server_context.worker_index is None or not resolved or resolved.get("pid") != os.getppid():
        return None
    payload = (resolved.get("models") or {}).get(model_uri)
    if not payload:
        return None
    registered = payload.get("registry")
    _logger.info("Serving %s as resolved by the serving process: %s", model_uri, payload["tag"])
    return payload["tag"], RegistryVersion(**{**registered, "aliases": tuple(registered["aliases"])}) if registered else None


def running_bento_dir() -> Optional[Path]:
    """The bento directory when this code runs from a built bento's ``src/``, else None."""
    candidate = Path(__file__).resolve().parents[2]
    return candidate if (candidate / "bento.yaml").is_file() else None


def import_from_registry(model_uri: str) -> tuple[str, Optional[RegistryVersion]]:
    """Import the MLflow model ``model_uri`` names into the BentoML model store.

    Returns:
        The BentoML tag, and the registry version when the URI is a registry URI.

    Raises:
        RegistryError: the URI does not resolve (unknown name, alias, run; ``error_code`` is
            MLflow's) or the registry cannot be reached.
        mlflow_faster_whisper.errors.FasterWhisperFlavorError: it is not a faster_whisper model.
    """
    registered = registry_version(model_uri)
    stored = _stored_tag(registered) if registered else None
    if stored is not None:
        _logger.info("Model %s (%s) is already in the BentoML model store", stored, model_uri)
        return stored, registered
    _use_default_tracking_store(model_uri)
    pinned_uri = uris.version_uri(registered.name, registered.version) if registered else model_uri
    with _mlflow_errors(pinned_uri):
        return _copy_into_store(model_uri, pinned_uri, registered)


@contextlib.contextmanager
def _mlflow_errors(model_uri: str) -> Iterator[None]:
    """MLflow's refusals while copying ``model_uri`` as RegistryError, one line, ``error_code`` kept."""
    from mlflow.exceptions import MlflowException

    from whisper_bento.auth import redact_uri

    try:
        yield
    except MlflowException as exc:
        detail = " ".join(exc.message.split())
        raise RegistryError(f"MLflow could not read {redact_uri(model_uri)}: {detail}", exc.error_code) from None


def _copy_into_store(model_uri: str, pinned_uri: str, registered: Optional[RegistryVersion]) -> tuple[str, Optional[RegistryVersion]]:
    conf = mlflow_faster_whisper.flavor_config(pinned_uri)
    digest = checksums.digest(conf[c.CHECKSUMS])
    if registered:
        tag = f"{_slug(registered.name)}:v{_slug(registered.version)}-{digest[:12]}"
    else:
        tag = f"whisper:{digest[:16]}"
    try:
        bentoml.models.get(tag)
        _logger.info("Model %s (%s) is already in the BentoML model store", tag, model_uri)
        return tag, registered
    except NotFound:
        pass
    metadata: dict[str, Any] = {META_URI: model_uri}
    if registered:
        metadata.update(
            {
                META_NAME: registered.name,
                META_VERSION: registered.version,
                META_ALIASES: list(registered.aliases),
                META_RUN_ID: registered.run_id,
                META_SOURCE: registered.source,
            }
        )
    _logger.info("Importing %s (%s) into the BentoML model store as %s", model_uri, pinned_uri, tag)
    bentoml.mlflow.import_model(
        tag,
        pinned_uri,
        labels={"flavor": c.FLAVOR_NAME, c.QUANTIZATION: str(conf.get(c.QUANTIZATION))},
        metadata=metadata,
    )
    return tag, registered


def alias_of(model_uri: str) -> Optional[tuple[str, str]]:
    """(name, alias) of a ``models:/NAME@ALIAS`` URI, else None."""
    match = parse_registry_uri(model_uri)
    return (match.name, match.alias) if match and match.alias else None


def registry_version(model_uri: str) -> Optional[RegistryVersion]:
    """The registry version a ``models:/`` URI names now (an alias resolved); None for other URIs.

    Raises:
        RegistryError: unknown name, version or alias (the message names the fix; ``error_code``
            is MLflow's), no registry where the URI points, or the registry cannot be reached.
    """
    match = parse_registry_uri(model_uri)
    if match is None:  # runs:/, models:/m-<id>, a path: not a registry version
        return None
    server = _registry_server()
    if server is not None:
        try:
            if match.alias:
                found = _rest_get(server, "registered-models/alias", name=match.name, alias=match.alias)
            else:
                found = _rest_get(server, "model-versions/get", name=match.name, version=str(match.version))
        except RegistryError as exc:
            raise _lookup_failed(model_uri, match, str(exc), exc.error_code, server) from None
        mv = found["model_version"]
        return RegistryVersion(
            name=mv["name"],
            version=str(mv["version"]),
            aliases=tuple(mv.get("aliases") or ()),
            run_id=mv.get("run_id") or None,
            source=mv.get("source"),
        )
    _use_default_tracking_store(model_uri)
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    where = mlflow.get_registry_uri()
    client = MlflowClient()
    try:
        if match.alias:
            mv = client.get_model_version_by_alias(match.name, match.alias)
        else:
            mv = client.get_model_version(match.name, str(match.version))
    except MlflowException as exc:
        raise _lookup_failed(model_uri, match, exc.message, exc.error_code, where) from None
    return RegistryVersion(
        name=mv.name, version=str(mv.version), aliases=tuple(getattr(mv, "aliases", []) or []), run_id=mv.run_id, source=mv.source
    )


_MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND", "HTTP_404")


def _lookup_failed(model_uri: str, match: RegistryUri, detail: str, code: str, where: str) -> RegistryError:
    """The registry's refusal of ``model_uri`` as one line that names the fix (``code`` kept)."""
    from whisper_bento.auth import redact_uri

    detail = " ".join(detail.split()).rstrip(".")
    if code not in _MISSING:
        return RegistryError(detail, code)
    if match.alias:
        fix = f"promote a version of {match.name!r} to {match.alias!r} first, or serve another alias or version"
    else:
        fix = f"serve a version {match.name!r} has, or an alias"
    return RegistryError(
        f"{model_uri} names no model version in the registry at {redact_uri(where)} ({detail}): "
        f"{fix}; or set MLFLOW_TRACKING_URI to the registry that has it.",
        code,
    )


def _require_sqlite_file(uri: str) -> None:
    """Refuse a ``sqlite:///`` registry whose database file does not exist (opening it creates one)."""
    database = sqlite_database(uri)
    if database is None or Path(database).is_file():
        return
    raise RegistryError(
        f"There is no registry at {uri}: {Path(database).resolve()} does not exist (nothing was created). Start "
        "from the folder that holds the registry's database, or set MLFLOW_TRACKING_URI to it "
        "(sqlite:////absolute/path/mlflow.db, or a tracking server's http(s):// URL).",
        "RESOURCE_DOES_NOT_EXIST",
    )


def _registry_server() -> Optional[str]:
    """The registry's base URL when it is an MLflow server, else None (ask it through MLflow)."""
    if "mlflow" in sys.modules:  # set in this process (a test, the deployment client): MLflow's own answer
        import mlflow

        uri = mlflow.get_registry_uri()
    else:
        uri = os.environ.get("MLFLOW_REGISTRY_URI") or os.environ.get("MLFLOW_TRACKING_URI") or ""
    return uri.rstrip("/") if urllib.parse.urlparse(uri).scheme in ("http", "https") else None


def _rest_get(server: str, endpoint: str, **query: str) -> dict[str, Any]:
    """GET ``/api/2.0/mlflow/<endpoint>`` with MLflow's client settings (token or basic auth, TLS)."""
    request = urllib.request.Request(f"{server}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}")
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        user = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
        request.add_header("Authorization", f"Basic {base64.b64encode(user.encode()).decode()}")
    context = None
    if server.startswith("https:"):
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            context = ssl._create_unverified_context()
        else:
            context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
        except ValueError:
            body = {}
        raise RegistryError(body.get("message") or f"HTTP {exc.code} from {server}", body.get("error_code") or f"HTTP_{exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise RegistryError(f"the registry at {server} did not answer: {getattr(exc, 'reason', exc)}", "TEMPORARILY_UNAVAILABLE") from None


def _stored_tag(registered: RegistryVersion) -> Optional[str]:
    """The BentoML model already imported from this registry version (same name, version, run and
    source), or None. Its files are verified against their checksums when it is loaded."""
    if not registered.source:
        return None
    identity = (registered.name, registered.version, registered.run_id, registered.source)
    try:
        candidates = bentoml.models.list(_slug(registered.name))
    except NotFound:
        return None
    for stored in candidates:
        meta = stored.info.metadata
        if (meta.get(META_NAME), meta.get(META_VERSION), meta.get(META_RUN_ID), meta.get(META_SOURCE)) == identity:
            return str(stored.tag)
    return None


def _use_default_tracking_store(model_uri: str) -> None:
    """``models:/`` and ``runs:/`` URIs need a tracking store: the registry's embedded default when
    none is set. A sqlite store must exist already.

    Raises:
        RegistryError: the store is a sqlite file that does not exist (nothing is created).
    """
    if not model_uri.startswith(("models:/", "runs:/")):
        return
    import mlflow

    from whisper_registry.tracking import default_tracking_uri  # the one definition of the default

    if not os.environ.get("MLFLOW_TRACKING_URI") and not mlflow.is_tracking_uri_set():
        mlflow.set_tracking_uri(default_tracking_uri())
    # MLflow would create an empty database there, then find nothing in it.
    _require_sqlite_file(mlflow.get_registry_uri() if model_uri.startswith("models:/") else mlflow.get_tracking_uri())


def _model_recorded_in_bento(bento_dir: Path, model_uri: str) -> bentoml.models.BentoModel:
    import yaml

    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    tags = sorted({m["tag"] for m in _model_entries(info)})
    if not tags:
        raise RuntimeError(f"The bento at {bento_dir} records no model; rebuild it with bentoml build.")
    match = parse_registry_uri(model_uri)
    wanted = _slug(match.name) if match else "whisper"
    chosen = [t for t in tags if t.split(":")[0] == wanted] or tags
    if len(chosen) > 1:
        raise RuntimeError(f"The bento at {bento_dir} records several models ({', '.join(chosen)}) for {model_uri}.")
    _logger.info("Serving %s, the model this bento was built with (no registry lookup)", chosen[0])
    return bentoml.models.BentoModel(chosen[0])


def _model_entries(node: Any):
    """Every ``{tag: ...}`` entry under a ``models`` key of bento.yaml (its layout varies by version)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "models" and isinstance(value, list):
                yield from (m for m in value if isinstance(m, dict) and "tag" in m)
            else:
                yield from _model_entries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _model_entries(item)


def _slug(text: str) -> str:
    """A BentoML tag part: lowercase letters, digits, '-', '_', '.'."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return slug or "model"


def model_path(stored: bentoml.Model) -> str:
    """The MLflow model directory inside a BentoML model imported by ``import_from_registry``."""
    return stored.path_of(MLFLOW_MODEL_FOLDER)
