"""The URIs the flavor, the registry and the service share: one grammar for a registered version
(``models:/NAME/VERSION``, ``models:/NAME@ALIAS``), the sqlite store's database path, and the
service's control header.

The grammar is MLflow's own (``mlflow.store.artifact.utils.models._parse_model_uri``): a name is
anything but blank, without ``/`` (nor ``@``, which starts an alias); a version is digits. Its
other forms (``models:/NAME/latest``, a stage, ``models:/m-<id>``) name no registered version here.
"""

from __future__ import annotations

from typing import NamedTuple, Optional
from urllib.parse import unquote, urlparse

MODELS_SCHEME = "models:/"
# The header that carries the service's control key (PUT /admin/model).
ADMIN_HEADER = "x-whisper-admin-key"


class RegistryUri(NamedTuple):
    """A parsed ``models:/NAME/VERSION`` (``version`` set) or ``models:/NAME@ALIAS`` (``alias`` set)."""

    name: str
    version: Optional[str] = None
    alias: Optional[str] = None

    def __str__(self) -> str:
        return alias_uri(self.name, self.alias) if self.alias else version_uri(self.name, str(self.version))


def parse_registry_uri(uri: str) -> Optional[RegistryUri]:
    """The registered version or alias ``uri`` names, or None for any other URI."""
    if not isinstance(uri, str) or not uri.startswith(MODELS_SCHEME):
        return None
    parts = uri[len(MODELS_SCHEME) :].split("/")
    if len(parts) == 2 and _is_name(parts[0]) and parts[1].isdigit():
        return RegistryUri(parts[0], version=parts[1])
    if len(parts) == 1 and "@" in parts[0]:
        name, alias = parts[0].rsplit("@", 1)
        if _is_name(name) and _is_name(alias):
            return RegistryUri(name, alias=alias)
    return None


def version_uri(name: str, version: str | int) -> str:
    return f"{MODELS_SCHEME}{name}/{version}"


def alias_uri(name: str, alias: str) -> str:
    return f"{MODELS_SCHEME}{name}@{alias}"


def _is_name(text: str) -> bool:
    return bool(text.strip()) and "/" not in text and "@" not in text


def sqlite_database(uri: str) -> Optional[str]:
    """The database path of a ``sqlite:///relative/path`` or ``sqlite:////absolute/path`` store;
    None for another kind of store, or an in-memory one."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None
    database = unquote(parsed.path)
    if uri.startswith("sqlite:////"):
        database = "/" + database.lstrip("/")
    elif database.startswith("/"):
        database = database[1:]
    return None if not database or database == ":memory:" else database
