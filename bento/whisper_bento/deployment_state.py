"""A ``bentoml`` deployment's settings, its recorded state, and the checks made before anything runs.

Each deployment lives in ``$WHISPER_DEPLOYMENTS_HOME/NAME`` (default ``~/.whisper-bento/deployments``):
``deployment.json`` (what ``create`` recorded), ``serve.log`` and ``admin.key`` (the control key).
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, INVALID_STATE, RESOURCE_DOES_NOT_EXIST

from mlflow_faster_whisper.constants import FLAVOR_NAME
from mlflow_faster_whisper.uris import ADMIN_HEADER, version_uri

FLAVOR = FLAVOR_NAME
HOME_ENV = "WHISPER_DEPLOYMENTS_HOME"
STATE_FILE = "deployment.json"
LOG_FILE = "serve.log"
KEY_FILE = "admin.key"
# -C keys of the deployment itself; every other key is service configuration (whisper_bento.config).
DEPLOYMENT_KEYS = {
    "port": "TCP port the service listens on (default 3000)",
    "host": "interface it binds (default 127.0.0.1; 0.0.0.0 for every interface)",
    "startup_timeout_s": "how long create waits for the service to be ready (default 600)",
}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass
class Settings:
    """A deployment's configuration: where it listens, and the service's own arguments."""

    port: int = 3000
    host: str = "127.0.0.1"
    startup_timeout_s: float = 600.0
    service_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, model_uri: str, config: Optional[dict[str, Any]]) -> Settings:
        """Raises MlflowException (INVALID_PARAMETER_VALUE) naming the key to fix."""
        from pydantic import ValidationError

        from whisper_bento.config import ServiceConfig

        config = dict(config or {})
        settings = cls()
        try:
            settings.port = int(config.pop("port", settings.port))
            settings.host = str(config.pop("host", settings.host))
            settings.startup_timeout_s = float(config.pop("startup_timeout_s", settings.startup_timeout_s))
        except ValueError as exc:
            raise invalid(f"-C port and -C startup_timeout_s take numbers: {exc}") from None
        if not 0 < settings.port < 65536:
            raise invalid(f"-C port={settings.port} is not a TCP port: pass 1-65535.")
        for reserved in ("model", "admin_key"):
            if reserved in config:
                raise invalid(f"-C {reserved} is set by the deployment; pass the model with -m.")
        try:
            ServiceConfig.model_validate({"model": model_uri, **config})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
            raise invalid(f"Invalid -C configuration: {problems}. `mlflow deployments help -t bentoml` lists the keys.") from None
        settings.service_args = config
        return settings


@dataclass
class State:
    """What ``create`` recorded of a deployment (``deployment.json``)."""

    name: str
    model_uri: str
    registered_model_name: Optional[str]
    model_version: Optional[str]
    bento: str
    url: str
    pid: int
    port: int
    host: str
    service_args: dict[str, Any]
    tracking_uri: str
    created: float

    @classmethod
    def load(cls, name: str) -> State:
        path = deployment_dir(name) / STATE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise MlflowException(
                f"No bentoml deployment named {name!r} (in {deployments_home()}); `mlflow deployments list -t bentoml` lists them.",
                RESOURCE_DOES_NOT_EXIST,
            ) from None

    def save(self) -> None:
        path = deployment_dir(self.name) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)


def require_serve_extra() -> None:
    """BentoML serves the deployment: without it, say which extra brings it (before anything runs)."""
    from mlflow_faster_whisper.errors import MissingExtraError, extra_imports

    try:
        with extra_imports():
            import bentoml  # noqa: F401
            import httpx  # noqa: F401
    except MissingExtraError as exc:
        raise MlflowException(exc.message, INVALID_STATE) from None


def deployments_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".whisper-bento" / "deployments")


def deployment_dir(name: str) -> Path:
    return deployments_home() / name


def check_name(name: str) -> None:
    if not name or not _NAME.match(name):
        raise invalid(f"Deployment name {name!r}: use lowercase letters, digits, '-' and '_' (at most 63).")


def check_flavor(flavor: Optional[str]) -> None:
    if flavor not in (None, FLAVOR):
        raise invalid(f"The bentoml target serves the {FLAVOR} flavor only (got --flavor {flavor}).")


def check_port(host: str, port: int) -> None:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise invalid(f"Port {port} on {host} is not free ({exc.strerror}): pass another with -C port=N.") from None


def client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def current_tracking_uri() -> str:
    import mlflow

    if os.environ.get("MLFLOW_TRACKING_URI") or mlflow.is_tracking_uri_set():
        return mlflow.get_tracking_uri()
    from whisper_registry.tracking import default_tracking_uri

    return default_tracking_uri()


def resolve_version(model_uri: str):
    """The registry version ``model_uri`` names (None for other URIs), checked to be a faster_whisper model."""
    import mlflow

    import mlflow_faster_whisper
    from mlflow_faster_whisper.errors import FasterWhisperFlavorError
    from whisper_bento.model_ref import registry_version

    mlflow.set_tracking_uri(current_tracking_uri())
    registered = registry_version(model_uri)
    pinned = version_uri(registered.name, registered.version) if registered else model_uri
    try:
        mlflow_faster_whisper.flavor_config(pinned)
    except FasterWhisperFlavorError as exc:
        raise invalid(f"{model_uri} cannot be deployed to bentoml: {exc}") from None
    return registered


def request_headers(state: State) -> dict[str, str]:
    headers = {ADMIN_HEADER: (deployment_dir(state.name) / KEY_FILE).read_text().strip()}
    api_key = state.service_args.get("api_key")
    if api_key:  # the service locks its routes: send the first of its keys
        from whisper_bento.auth import load_keys

        headers["authorization"] = f"Bearer {load_keys(api_key)[0].decode()}"
    return headers


def invalid(message: str) -> MlflowException:
    return MlflowException(message, INVALID_PARAMETER_VALUE)
