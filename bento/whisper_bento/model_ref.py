"""Which model the service serves: a registry URI resolved once, imported into BentoML's store.

In development (``bentoml serve whisper_bento:Transcriber --arg model=models:/NAME@ALIAS``) the
alias is resolved against the MLflow registry at start-up and that version is imported into the
BentoML model store (once: the tag carries the version and a content digest). The ``bentoml
serve`` process resolves it; its workers, which import this module again, take that resolution
from the environment they inherit, so every worker serves the same version and none imports
MLflow or queries the registry. ``bentoml build`` runs the same code, so the bento records that
model; serving the built bento reads the model from the bento's own record and never contacts
the registry.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import bentoml
from bentoml.exceptions import NotFound

import mlflow_faster_whisper
from mlflow_faster_whisper import checksums
from mlflow_faster_whisper import constants as c

_logger = logging.getLogger(__name__)

MLFLOW_MODEL_FOLDER = "mlflow_model"  # where bentoml.mlflow.import_model puts the MLflow model
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")
# Bento model metadata keys.
META_URI = "model_uri"
META_NAME = "registered_model_name"
META_VERSION = "registered_model_version"
META_ALIASES = "aliases"
META_RUN_ID = "run_id"
# How the ``bentoml serve`` process hands its resolution to the workers it starts.
RESOLVED_ENV = "WHISPER_BENTO_RESOLVED_MODEL"


@dataclass(frozen=True)
class RegistryVersion:
    """A registered model version as the registry described it at import time."""

    name: str
    version: str
    aliases: tuple[str, ...]
    run_id: Optional[str]


@dataclass(frozen=True)
class ModelChoice:
    """The BentoML model reference the service declares, and where it came from."""

    ref: bentoml.models.BentoModel
    source: str  # "registry" (resolved at start-up) or "bento" (recorded at build time)
    registry: Optional[RegistryVersion] = None


def bento_model_for(model_uri: str) -> ModelChoice:
    """The BentoML model the service declares for ``model_uri``.

    Inside a built bento: the model the bento was built with, with no registry lookup.
    Otherwise: the registry version the URI names now, imported into the BentoML model store if
    it is not there yet.
    """
    bento_dir = running_bento_dir()
    if bento_dir is not None:
        return ModelChoice(ref=_model_recorded_in_bento(bento_dir, model_uri), source="bento")
    inherited = _resolved_by_parent(model_uri)
    if inherited is not None:
        tag, registered = inherited
    else:
        tag, registered = import_from_registry(model_uri)
        os.environ[RESOLVED_ENV] = json.dumps(
            {"uri": model_uri, "pid": os.getpid(), "tag": tag, "registry": asdict(registered) if registered else None}
        )
    return ModelChoice(ref=bentoml.models.BentoModel(tag), source="registry", registry=registered)


def _resolved_by_parent(model_uri: str) -> Optional[tuple[str, Optional[RegistryVersion]]]:
    """The ``bentoml serve`` process's resolution of ``model_uri``, in one of its workers.

    Only a BentoML worker whose parent wrote the resolution takes it; any other process (the
    serve process itself, a test, a build) resolves afresh, so an alias moved since is seen.
    """
    from bentoml._internal.context import server_context

    payload = json.loads(os.environ.get(RESOLVED_ENV) or "null")
    if server_context.worker_index is None or not payload:
        return None
    if payload.get("uri") != model_uri or payload.get("pid") != os.getppid():
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
        mlflow.exceptions.MlflowException: the URI does not resolve (unknown name, alias, run).
        mlflow_faster_whisper.errors.FasterWhisperFlavorError: it is not a faster_whisper model.
    """
    _use_default_tracking_store(model_uri)
    registered = registry_version(model_uri)
    pinned_uri = f"models:/{registered.name}/{registered.version}" if registered else model_uri
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
    match = _REGISTRY_URI.match(model_uri)
    return (match["name"], match["alias"]) if match and match["alias"] else None


def registry_version(model_uri: str) -> Optional[RegistryVersion]:
    """The registry version a ``models:/`` URI names now (an alias resolved); None for other URIs."""
    match = _REGISTRY_URI.match(model_uri)
    if match is None:  # runs:/, models:/m-<id>, a path: not a registry version
        return None
    _use_default_tracking_store(model_uri)
    from mlflow import MlflowClient

    client = MlflowClient()
    if match["alias"]:
        mv = client.get_model_version_by_alias(match["name"], match["alias"])
    else:
        mv = client.get_model_version(match["name"], match["version"])
    return RegistryVersion(
        name=mv.name, version=str(mv.version), aliases=tuple(getattr(mv, "aliases", []) or []), run_id=mv.run_id
    )


def _use_default_tracking_store(model_uri: str) -> None:
    """``models:/`` URIs need a registry: the registry's embedded default when none is set."""
    if not model_uri.startswith("models:/") or os.environ.get("MLFLOW_TRACKING_URI"):
        return
    import mlflow

    from whisper_registry.tracking import default_tracking_uri  # the one definition of the default

    if not mlflow.is_tracking_uri_set():
        mlflow.set_tracking_uri(default_tracking_uri())


def _model_recorded_in_bento(bento_dir: Path, model_uri: str) -> bentoml.models.BentoModel:
    import yaml

    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    tags = sorted({m["tag"] for m in _model_entries(info)})
    if not tags:
        raise RuntimeError(f"The bento at {bento_dir} records no model; rebuild it with bentoml build.")
    match = _REGISTRY_URI.match(model_uri)
    wanted = _slug(match["name"]) if match else "whisper"
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
