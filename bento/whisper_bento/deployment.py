"""``mlflow deployments -t bentoml``: a registered Whisper version as a running BentoML service.

    mlflow deployments create -t bentoml --name asr -m models:/whisper-zh@production -C port=3001 -C device=cpu
    mlflow deployments predict -t bentoml --name asr --input-path request.json
    mlflow deployments update -t bentoml --name asr -m models:/whisper-zh/4
    mlflow deployments get -t bentoml --name asr
    mlflow deployments delete -t bentoml --name asr
    mlflow deployments run-local -t bentoml --name asr -m models:/whisper-zh@production -C port=3001

``create`` builds a self-contained bento of the version (``whisper_bento.build``) and starts
``bentoml serve`` on it as a background process of this machine; its state, log and control key
live in ``$WHISPER_DEPLOYMENTS_HOME/NAME`` (default ``~/.whisper-bento/deployments``). ``update``
moves the running service to another version through its control route (``PUT /admin/model``):
the service loads and warms the new version beside the old one and swaps between requests, so no
request fails. The service runs one worker, so that one call reaches all of it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    INVALID_STATE,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
)

FLAVOR = "faster_whisper"
HOME_ENV = "WHISPER_DEPLOYMENTS_HOME"
STATE_FILE = "deployment.json"
LOG_FILE = "serve.log"
KEY_FILE = "admin.key"
ADMIN_HEADER = "x-whisper-admin-key"
# -C keys of the deployment itself; every other key is service configuration (whisper_bento.config).
DEPLOYMENT_KEYS = {
    "port": "TCP port the service listens on (default 3000)",
    "host": "interface it binds (default 127.0.0.1; 0.0.0.0 for every interface)",
    "startup_timeout_s": "how long create waits for the service to be ready (default 600)",
}
MOVE_TIMEOUT_S = 600.0  # update: the service imports, loads and warms the version before answering
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_FAILED_START = "Application startup failed"  # BentoML would restart the worker forever


def target_help() -> str:
    from whisper_bento.build import configuration_keys

    keys = "\n".join(f"  -C {k}=...  {why}" for k, why in DEPLOYMENT_KEYS.items())
    return f"""Target bentoml: a registered faster_whisper version served by BentoML on this machine.

  mlflow deployments create -t bentoml --name NAME -m models:/MODEL@ALIAS [-C key=value ...]
      builds a self-contained bento of the version the URI names and starts `bentoml serve` on it
      in the background; returns once it answers. State and log: ${HOME_ENV}/NAME
      (default ~/.whisper-bento/deployments/NAME).
  mlflow deployments update -t bentoml --name NAME -m models:/MODEL/VERSION
      moves the running service to another version with no failed request (loaded and warmed
      beside the served one, swapped between requests); an alias URI is then followed.
  mlflow deployments predict -t bentoml --name NAME --input-path request.json
      the input of `mlflow models predict`: {{"dataframe_split": {{"columns": ["audio"],
      "data": [["<base64 audio>"]]}}, "params": {{"language": "en"}}}}, dataframe_records,
      inputs, or records [{{"audio": "<base64>"}}]; one transcription per row.
  mlflow deployments get | list | delete -t bentoml [--name NAME]
  mlflow deployments run-local -t bentoml --name NAME -m URI [-C ...]   serves in the foreground

Deployment keys:
{keys}
Every other key is service configuration, as `bentoml serve --arg` takes it, e.g. device=cpu,
compute_type=int8, decoding='{{"beam_size": 1}}', allowed_languages=en,zh (model and admin_key are
set by the deployment):
{configuration_keys()}

Needs this package's serve extra: pip install 'mlflow-faster-whisper[serve]'.
"""


def run_local(name: str, model_uri: str, flavor: Optional[str] = None, config: Optional[dict[str, Any]] = None) -> None:
    """``bentoml serve whisper_bento:Transcriber`` on ``model_uri`` in the foreground (Ctrl-C stops it).

    MLflow calls it without the target (``mlflow.deployments.interface.run_local``), whatever the
    docstring of ``mlflow.deployments.base.run_local`` says.
    """
    _check_flavor(flavor)
    _require_serve_extra()
    settings = _Settings.parse(model_uri, config)
    _check_port(settings.host, settings.port)
    _resolve(model_uri)
    args = {**settings.service_args, "model": model_uri}
    command = _serve_command("whisper_bento:Transcriber", settings) + _arg_options(args)
    print(f"Serving {model_uri} as {name} at http://{settings.host}:{settings.port} (Ctrl-C stops it)", flush=True)
    try:
        served = subprocess.run(command, env=_server_env(), check=False)
    except KeyboardInterrupt:
        return
    if served.returncode not in (0, -signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGINT):
        raise MlflowException(f"bentoml serve exited with status {served.returncode}; its output above says why.",
                              INVALID_STATE)


@dataclass
class _Settings:
    """A deployment's configuration: where it listens, and the service's own arguments."""

    port: int = 3000
    host: str = "127.0.0.1"
    startup_timeout_s: float = 600.0
    service_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, model_uri: str, config: Optional[dict[str, Any]]) -> "_Settings":
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
            raise _invalid(f"-C port and -C startup_timeout_s take numbers: {exc}") from None
        if not 0 < settings.port < 65536:
            raise _invalid(f"-C port={settings.port} is not a TCP port: pass 1-65535.")
        for reserved in ("model", "admin_key"):
            if reserved in config:
                raise _invalid(f"-C {reserved} is set by the deployment; pass the model with -m.")
        try:
            ServiceConfig.model_validate({"model": model_uri, **config})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
            raise _invalid(f"Invalid -C configuration: {problems}. `mlflow deployments help -t bentoml` "
                           "lists the keys.") from None
        settings.service_args = config
        return settings


@dataclass
class _State:
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
    def load(cls, name: str) -> "_State":
        path = _directory(name) / STATE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise MlflowException(
                f"No bentoml deployment named {name!r} (in {_home()}); `mlflow deployments list -t bentoml` "
                "lists them.", RESOURCE_DOES_NOT_EXIST) from None

    def save(self) -> None:
        path = _directory(self.name) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)


class BentoDeploymentClient(BaseDeploymentClient):
    """Deployments of faster_whisper versions as local ``bentoml serve`` processes."""

    def create_deployment(self, name, model_uri, flavor=None, config=None, endpoint=None):
        _check_flavor(flavor)
        _check_name(name)
        _require_serve_extra()
        directory = _directory(name)
        if (directory / STATE_FILE).exists():
            status = self.get_deployment(name)["status"]
            raise MlflowException(
                f"A bentoml deployment named {name!r} exists ({status}): `mlflow deployments update -t bentoml "
                f"--name {name} -m URI` moves it to another version; delete it first to create it again.",
                RESOURCE_ALREADY_EXISTS)
        settings = _Settings.parse(model_uri, config)
        _check_port(settings.host, settings.port)
        registered = _resolve(model_uri)
        directory.mkdir(parents=True, exist_ok=True)
        key_file = directory / KEY_FILE
        key_file.touch(mode=0o600)
        key_file.write_text(secrets.token_urlsafe(32))
        bento = process = None
        try:
            bento = _build(name, model_uri, settings, key_file)
            process = _start(directory, str(bento.tag), settings)
            state = _State(
                name=name, model_uri=model_uri, registered_model_name=registered.name if registered else None,
                model_version=registered.version if registered else None, bento=str(bento.tag),
                url=f"http://{_client_host(settings.host)}:{settings.port}", pid=process.pid, port=settings.port,
                host=settings.host, service_args=settings.service_args, tracking_uri=_tracking_uri(), created=time.time(),
            )
            _await_ready(state, process, settings.startup_timeout_s)
            state.save()
        except BaseException:
            if process is not None:
                _stop(process.pid)
            _remove_bento(bento)
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return {"name": name, "flavor": FLAVOR, "url": state.url, "model_version": state.model_version}

    def update_deployment(self, name, model_uri=None, flavor=None, config=None, endpoint=None):
        _check_flavor(flavor)
        state = _running_state(name)
        if config:
            raise _invalid(f"update moves a deployment to another version (-m); its configuration ({', '.join(config)}) "
                           f"is set at create: delete {name} and create it again with the new -C values.")
        if not model_uri:
            raise _invalid("Pass the version to move to: -m models:/NAME/VERSION (or models:/NAME@ALIAS).")
        import httpx

        try:
            response = httpx.put(f"{state.url}/admin/model", json={"model": model_uri}, headers=_headers(state),
                                 timeout=MOVE_TIMEOUT_S)
        except httpx.HTTPError as exc:
            raise MlflowException(f"Deployment {name} at {state.url} did not answer ({exc}); see "
                                  f"{_directory(name) / LOG_FILE}.", INVALID_STATE) from None
        if response.status_code != 200:
            raise MlflowException(f"Deployment {name} did not move to {model_uri}: {_error_message(response)}",
                                  RESOURCE_DOES_NOT_EXIST if response.status_code == 404 else INVALID_PARAMETER_VALUE)
        served = response.json()["model"]
        state.model_uri, state.registered_model_name, state.model_version = model_uri, served["name"], served["version"]
        state.save()
        return {"name": name, "flavor": FLAVOR, "model_version": state.model_version}

    def delete_deployment(self, name, config=None, endpoint=None):
        """Stops the service and removes its bento and state; a deployment that is not there is not an error."""
        directory = _directory(name)
        try:
            state = _State.load(name)
        except MlflowException:
            shutil.rmtree(directory, ignore_errors=True)  # a create that never finished
            return None
        _stop(state.pid)
        _remove_bento(state.bento)
        shutil.rmtree(directory, ignore_errors=True)
        return None

    def list_deployments(self, endpoint=None):
        home = _home()
        names = sorted(p.parent.name for p in home.glob(f"*/{STATE_FILE}")) if home.is_dir() else []
        return [self.get_deployment(n) for n in names]

    def get_deployment(self, name, endpoint=None):
        state = _State.load(name)
        description = {
            "name": name, "flavor": FLAVOR, "status": _status(state), "url": state.url, "model_uri": state.model_uri,
            "registered_model_name": state.registered_model_name, "model_version": state.model_version,
            "bento": state.bento, "pid": state.pid,
            "config": {"port": state.port, "host": state.host, **state.service_args},
            "log": str(_directory(name) / LOG_FILE),
        }
        if description["status"] == "running":
            info = _info(state)
            if info is not None:  # what the service itself says it serves
                description.update(model_version=info["model"]["version"], device=info["device"],
                                   compute_type=info["compute_type"], follow=info["follow"]["why"])
        return description

    def predict(self, deployment_name=None, inputs=None, endpoint=None):
        """The rows of ``inputs`` (as ``mlflow models predict`` takes them) transcribed by the
        deployment, concurrently so they share its forward passes; one result per row, as the
        pyfunc returns them (``error`` set on a row whose audio could not be decoded)."""
        state = _running_state(deployment_name)
        cells, params = _audio_and_params(inputs)
        fields = _form_fields(params)
        import httpx

        with httpx.Client(base_url=state.url, headers=_headers(state), timeout=None) as http:
            def one(cell):
                response = http.post("/transcribe", files={"file": ("audio", _audio_bytes(cell))}, data=fields)
                return _row(response)

            with ThreadPoolExecutor(max_workers=min(16, max(1, len(cells)))) as pool:
                rows = list(pool.map(one, cells))
        return PredictionsResponse({"predictions": rows})

    def predict_stream(self, deployment_name=None, inputs=None, endpoint=None) -> Iterator[dict[str, Any]]:
        """One recording's transcription as it is decoded: the service's server-sent events
        (``transcript.text.delta`` per segment, then ``transcript.text.done``)."""
        state = _running_state(deployment_name)
        cells, params = _audio_and_params(inputs)
        if len(cells) != 1:
            raise _invalid(f"predict_stream takes one recording; got {len(cells)}.")
        import httpx

        with httpx.Client(base_url=state.url, headers=_headers(state), timeout=None) as http:
            with http.stream("POST", "/transcribe", files={"file": ("audio", _audio_bytes(cells[0]))},
                             data={**_form_fields(params), "stream": "true"}) as response:
                if response.status_code != 200:
                    response.read()
                    raise _invalid(f"Deployment {deployment_name} refused the request: {_error_message(response)}")
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        yield json.loads(line[len("data: "):])


# -- the deployment's process ---------------------------------------------------------------


def _build(name: str, model_uri: str, settings: _Settings, key_file: Path):
    from whisper_bento.build import BuildError, build

    args = {**settings.service_args, "model": model_uri, "admin_key": f"file:{key_file}"}
    try:
        return build(args, version=f"{name}-{secrets.token_hex(4)}")
    except BuildError as exc:
        raise MlflowException(f"Building the bento of {model_uri} failed: {exc}", INVALID_STATE) from None


def _serve_command(target: str, settings: _Settings) -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", target, "--host", settings.host, "--port", str(settings.port)]


def _arg_options(args: dict[str, Any]) -> list[str]:
    options = []
    for key, value in args.items():
        options += ["--arg", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return options


def _server_env() -> dict[str, str]:
    """This environment, with this interpreter's scripts first on PATH (bentoml starts its
    workers through them) and the tracking URI the registry was read from (update imports from it)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = _tracking_uri()
    return env


def _start(directory: Path, bento_tag: str, settings: _Settings) -> subprocess.Popen:
    with open(directory / LOG_FILE, "ab") as log:
        return subprocess.Popen(_serve_command(bento_tag, settings), env=_server_env(), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _await_ready(state: _State, process: subprocess.Popen, timeout_s: float) -> None:
    import httpx

    log = _directory(state.name) / LOG_FILE
    deadline = time.monotonic() + timeout_s
    while True:
        problem = None
        if process.poll() is not None:
            problem = f"exited with status {process.returncode}"
        elif _FAILED_START in log.read_text(errors="replace"):
            problem = "its start-up failed"
        elif time.monotonic() > deadline:
            problem = f"was not ready after {timeout_s:.0f} s (-C startup_timeout_s)"
        if problem:
            tail = log.read_text(errors="replace")[-3000:]
            raise MlflowException(f"The service of deployment {state.name} {problem}; its log ends:\n{tail}",
                                  INVALID_STATE)
        try:
            if httpx.get(f"{state.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)


def _stop(pid: int) -> None:
    """SIGTERM to the service's process group (the server and its workers), SIGKILL after 30 s."""
    for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            _reap(pid)
            if not _group_alive(pid):
                return
            time.sleep(0.1)


def _reap(pid: int) -> None:
    try:  # a service this process started (create in a Python session) is its child
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies still count for killpg; a group of zombies only is gone.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _status(state: _State) -> str:
    _reap(state.pid)
    if not _group_alive(state.pid):
        return "exited"
    import httpx

    try:
        ready = httpx.get(f"{state.url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        ready = False
    return "running" if ready else "not ready"


def _info(state: _State) -> Optional[dict[str, Any]]:
    import httpx

    try:
        response = httpx.get(f"{state.url}/info", headers=_headers(state), timeout=10)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def _remove_bento(bento) -> None:
    if bento is None:
        return
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bentoml.bentos.delete(str(getattr(bento, "tag", bento)))
    except NotFound:
        pass


# -- helpers ---------------------------------------------------------------------------------


def _running_state(name: Optional[str]) -> _State:
    """The state of deployment ``name``, which must be running."""
    if not name:
        raise _invalid("Pass the deployment's --name.")
    state = _State.load(name)
    status = _status(state)
    if status != "running":
        raise MlflowException(
            f"Deployment {name} is {status}; its log is {_directory(name) / LOG_FILE}. Delete it and create it again.",
            INVALID_STATE)
    return state


def _require_serve_extra() -> None:
    """BentoML serves the deployment: without it, say which extra brings it (before anything runs)."""
    from mlflow_faster_whisper.errors import MissingExtraError, extra_imports

    try:
        with extra_imports():
            import bentoml  # noqa: F401
            import httpx  # noqa: F401
    except MissingExtraError as exc:
        raise MlflowException(exc.message, INVALID_STATE) from None


def _home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".whisper-bento" / "deployments")


def _directory(name: str) -> Path:
    return _home() / name


def _check_name(name: str) -> None:
    if not name or not _NAME.match(name):
        raise _invalid(f"Deployment name {name!r}: use lowercase letters, digits, '-' and '_' (at most 63).")


def _check_flavor(flavor: Optional[str]) -> None:
    if flavor not in (None, FLAVOR):
        raise _invalid(f"The bentoml target serves the {FLAVOR} flavor only (got --flavor {flavor}).")


def _check_port(host: str, port: int) -> None:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise _invalid(f"Port {port} on {host} is not free ({exc.strerror}): pass another with -C port=N.") from None


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _tracking_uri() -> str:
    import mlflow

    if os.environ.get("MLFLOW_TRACKING_URI") or mlflow.is_tracking_uri_set():
        return mlflow.get_tracking_uri()
    from whisper_registry.tracking import default_tracking_uri

    return default_tracking_uri()


def _resolve(model_uri: str):
    """The registry version ``model_uri`` names (None for other URIs), checked to be a faster_whisper model."""
    import mlflow

    import mlflow_faster_whisper
    from mlflow_faster_whisper.errors import FasterWhisperFlavorError
    from whisper_bento.model_ref import registry_version

    mlflow.set_tracking_uri(_tracking_uri())
    registered = registry_version(model_uri)
    pinned = f"models:/{registered.name}/{registered.version}" if registered else model_uri
    try:
        mlflow_faster_whisper.flavor_config(pinned)
    except FasterWhisperFlavorError as exc:
        raise _invalid(f"{model_uri} cannot be deployed to bentoml: {exc}") from None
    return registered


def _headers(state: _State) -> dict[str, str]:
    headers = {ADMIN_HEADER: (_directory(state.name) / KEY_FILE).read_text().strip()}
    api_key = state.service_args.get("api_key")
    if api_key:  # the service locks its routes: send the first of its keys
        from whisper_bento.auth import load_keys

        headers["authorization"] = f"Bearer {load_keys(api_key)[0].decode()}"
    return headers


def _audio_and_params(inputs: Any) -> tuple[list, dict[str, Any]]:
    """The audio cells and decoding params of ``inputs``: what ``mlflow models predict`` takes
    (a serving payload, as a dict or as ``pandas.read_json`` reads one), a DataFrame with an
    ``audio`` column, a list of cells, or one cell."""
    import pandas as pd

    if isinstance(inputs, pd.DataFrame):
        if "audio" in inputs.columns or len(inputs.columns) == 1 and inputs.columns[0] not in _PAYLOAD_KEYS:
            return list(inputs["audio" if "audio" in inputs.columns else inputs.columns[0]]), {}
        inputs = {column: inputs[column].dropna().to_dict() for column in inputs.columns}
    params: dict[str, Any] = {}
    if isinstance(inputs, dict):
        params = dict(inputs.get("params") or {})
        if "dataframe_split" in inputs:
            split = inputs["dataframe_split"]
            columns = list(split.get("columns") or ["audio"])
            index = columns.index("audio") if "audio" in columns else 0
            cells = [row[index] if isinstance(row, (list, tuple)) else row for row in _rows(split.get("data"))]
        elif "dataframe_records" in inputs:
            cells = _rows(inputs["dataframe_records"])
        elif "inputs" in inputs or "instances" in inputs or "audio" in inputs:
            value = next(inputs[k] for k in ("inputs", "instances", "audio") if k in inputs)
            if isinstance(value, dict) and "audio" in value:
                value = value["audio"]
            cells = _rows(value) if isinstance(value, (list, tuple, dict)) else [value]
        else:
            raise _invalid(f"No audio in the input (keys: {', '.join(map(str, inputs))}); send "
                           '{"dataframe_split": {"columns": ["audio"], "data": [["<base64 audio>"]]}}.')
    else:
        cells = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    cells = [cell.get("audio") if isinstance(cell, dict) else cell for cell in cells]  # records
    if not cells:
        raise _invalid("The input has no rows of audio.")
    return cells, params


_PAYLOAD_KEYS = ("dataframe_split", "dataframe_records", "inputs", "instances", "params")


def _rows(value: Any) -> list:
    """A JSON list, or the same list as ``pandas.read_json`` turned it into ({0: ..., 1: ...})."""
    if isinstance(value, dict):
        return [value[k] for k in sorted(value, key=lambda k: int(k))]
    return list(value or [])


def _audio_bytes(cell: Any) -> bytes:
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, str):
        try:
            return base64.b64decode(cell, validate=True)
        except (binascii.Error, ValueError):
            raise _invalid("An audio cell is not base64: send each recording's bytes base64-encoded.") from None
    raise _invalid(f"An audio cell is a {type(cell).__name__}: send bytes or a base64 string.")


def _form_fields(params: dict[str, Any]) -> dict[str, str]:
    fields = {}
    for key, value in params.items():
        if value is None:
            continue
        fields[key] = value if isinstance(value, str) else json.dumps(value)
    return fields


def _row(response) -> dict[str, Any]:
    """A service answer as the pyfunc's row; undecodable audio is an error row, not a failure."""
    if response.status_code == 200:
        body = response.json()
        return {k: body[k] for k in ("text", "language", "language_probability", "duration", "segments")} | {"error": ""}
    error = _error_body(response)
    if response.status_code in (400, 413) and (error.get("param") == "file" or error.get("code") == "audio_too_long"):
        from mlflow_faster_whisper.wrapper import error_row

        return error_row(_error_message(response))
    raise MlflowException(f"The deployment refused the request: {_error_message(response)}", INVALID_PARAMETER_VALUE)


def _error_body(response) -> dict[str, Any]:
    try:
        return response.json().get("error") or {}
    except ValueError:
        return {}


def _error_message(response) -> str:
    return _error_body(response).get("message") or f"HTTP {response.status_code}: {response.text[:500]}"


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, INVALID_PARAMETER_VALUE)
