"""Resolve what the user named to a registered model version, with errors that say what exists."""

from __future__ import annotations

import re
from typing import Optional

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mlflow_faster_whisper.uris import parse_registry_uri
from whisper_registry import tags, tracking
from whisper_registry.errors import ModelNotFoundError, WrongModelError


def from_uri(model_uri: str) -> ModelVersion:
    """The version of ``models:/<name>/<version>`` or ``models:/<name>@<alias>``.

    Raises:
        ModelNotFoundError: another kind of URI, or a name/version/alias that does not exist.
    """
    parsed = parse_registry_uri(model_uri)
    if parsed is not None and parsed.version is not None:
        return get(parsed.name, parsed.version)
    if parsed is not None and parsed.alias is not None:
        return by_alias(parsed.name, parsed.alias)
    raise ModelNotFoundError(f"{model_uri!r} is not a registered version: use models:/<name>/<version> or models:/<name>@<alias>.")


def get(name: str, version: str | int) -> ModelVersion:
    """Version ``version`` of ``name``; ``version`` may also be ``models:/<name>/<version>``.

    Raises:
        ModelNotFoundError: the model or version does not exist (the message lists the versions).
        WrongModelError: a URI of a version of another registered model.
    """
    version = str(version).strip()
    if version.startswith("models:/"):
        m = parse_registry_uri(version)
        if m is None or m.version is None:
            raise ModelNotFoundError(f"{version!r} is not a version URI: use a version number or models:/{name}/<version>.")
        if m.name != name:
            raise WrongModelError(
                f"{version} is a version of {m.name!r}, not {name!r}: name the model {m.name!r}, "
                f"or register that checkpoint under {name!r} first."
            )
        version = m.version
    if not version.isdigit():
        raise ModelNotFoundError(f"{version!r} is not a version number: use e.g. 1, or models:/{name}/1.")
    _require_model(name)
    try:
        found = tracking.client().get_model_version(name, version)
    except MlflowException:
        raise ModelNotFoundError(f"{name!r} has no version {version} (versions: {', '.join(list_numbers(name)) or 'none'}).") from None
    return _complete(found)


def by_alias(name: str, alias: str) -> ModelVersion:
    """The version holding ``alias``.

    Raises:
        ModelNotFoundError: the model does not exist or no version holds the alias.
    """
    found = holder(name, alias)
    if found is None:
        raise ModelNotFoundError(f"No version of {name!r} holds the alias {alias!r}: promote a version to {alias} first.")
    return _complete(found)


def is_complete(mv: ModelVersion) -> bool:
    """False for a version a register run created but never finished tagging.

    ``register`` creates a version with all its tags in one call; releases before it tagged the
    version afterwards, so a process killed in between left a version with no quantization or
    checksums digest. ``register_run`` is among the tags it writes; a version without it that no
    register run created (logged with ``registered_model_name``, or in the MLflow UI) is complete.
    """
    if (mv.tags or {}).get(tags.REGISTER_RUN) or not mv.run_id:
        return True
    try:
        run = tracking.client().get_run(mv.run_id)
    except MlflowException:
        return True  # its run was deleted: nothing tells it apart from any other version
    return run.data.tags.get(tags.RUN_KIND) != "register"


def _complete(mv: ModelVersion) -> ModelVersion:
    if not is_complete(mv):
        raise ModelNotFoundError(
            f"Version {mv.version} of {mv.name!r} is an unfinished registration (run {mv.run_id} was stopped "
            "before it tagged the version): it has no quantization or checksums and is not used. Register the "
            "checkpoint again; that removes the unfinished version."
        )
    return mv


def holder(name: str, alias: str) -> Optional[ModelVersion]:
    """The version holding ``alias``, or None."""
    model = _require_model(name)
    if alias not in (model.aliases or {}):
        return None
    return tracking.client().get_model_version_by_alias(name, alias)


def list_all(name: str) -> list[ModelVersion]:
    """Every version of ``name``, oldest first."""
    _require_model(name)
    found = tracking.client().search_model_versions(f"name = '{_quote(name)}'")
    return sorted(found, key=lambda v: int(v.version))


def list_numbers(name: str) -> list[str]:
    return [str(v.version) for v in list_all(name)]


def aliases_by_version(name: str) -> dict[str, list[str]]:
    """``{version: [aliases]}``."""
    result: dict[str, list[str]] = {}
    for alias, version in (_require_model(name).aliases or {}).items():
        result.setdefault(str(version), []).append(alias)
    return result


def logged_model_id(mv: ModelVersion) -> Optional[str]:
    """The id of the logged model behind a version (MLflow 3's ``models:/m-<id>`` source).

    The sqlite and REST stores of MLflow 3.17 leave ``ModelVersion.model_id`` empty for versions
    registered by ``log_model``; their ``source`` still names the logged model.
    """
    if mv.model_id:
        return mv.model_id
    m = re.match(r"^models:/(m-[0-9a-f]+)$", mv.source or "")
    return m.group(1) if m else None


def _require_model(name: str):
    try:
        return tracking.client().get_registered_model(name)
    except MlflowException:
        raise ModelNotFoundError(
            f"There is no registered model {name!r} at {tracking.client().tracking_uri}: register it first, "
            "or set MLFLOW_TRACKING_URI to the store that has it."
        ) from None


def _quote(name: str) -> str:
    return name.replace("'", "\\'")
