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

import json
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, INVALID_STATE, RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST

from whisper_bento.deployment_payload import audio_and_params, audio_bytes, error_message, form_fields, result_row
from whisper_bento.deployment_process import (
    arg_options,
    await_ready,
    build_bento,
    remove_bento,
    running_state,
    serve_command,
    server_env,
    service_info,
    service_status,
    start_server,
    stop_group,
)
from whisper_bento.deployment_state import (
    DEPLOYMENT_KEYS,
    FLAVOR,
    HOME_ENV,
    KEY_FILE,
    LOG_FILE,
    STATE_FILE,
    Settings,
    State,
    check_flavor,
    check_name,
    check_port,
    client_host,
    current_tracking_uri,
    deployment_dir,
    deployments_home,
    invalid,
    request_headers,
    require_serve_extra,
    resolve_version,
)

MOVE_TIMEOUT_S = 600.0  # update: the service imports, loads and warms the version before answering


def target_help() -> str:
    from whisper_bento.build import configuration_keys

    keys = "\n".join(f"  -C {k}=...  {why}" for k, why in DEPLOYMENT_KEYS.items())
    return f"""Target bentoml: a registered faster_whisper version served by BentoML on this machine.

  mlflow deployments create -t bentoml --name NAME -m models:/MODEL@ALIAS [-C key=value ...]
      builds a self-contained bento of the version the URI names and starts `bentoml serve` on it
      in the background; returns once it answers. State and log: ${HOME_ENV}/NAME
      (default ~/.whisper-bento/deployments/NAME). -C models=URI,URI serves several models from
      one service (the -m model first); the bento carries each.
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
    check_flavor(flavor)
    require_serve_extra()
    settings = Settings.parse(model_uri, config)
    check_port(settings.host, settings.port)
    resolve_version(model_uri)
    args = {**settings.service_args, "model": model_uri}
    command = serve_command("whisper_bento:Transcriber", settings) + arg_options(args)
    print(f"Serving {model_uri} as {name} at http://{settings.host}:{settings.port} (Ctrl-C stops it)", flush=True)
    try:
        served = subprocess.run(command, env=server_env(), check=False)
    except KeyboardInterrupt:
        return
    if served.returncode not in (0, -signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGINT):
        raise MlflowException(f"bentoml serve exited with status {served.returncode}; its output above says why.", INVALID_STATE)


class BentoDeploymentClient(BaseDeploymentClient):
    """Deployments of faster_whisper versions as local ``bentoml serve`` processes."""

    def create_deployment(self, name, model_uri, flavor=None, config=None, endpoint=None):
        check_flavor(flavor)
        check_name(name)
        require_serve_extra()
        directory = deployment_dir(name)
        if (directory / STATE_FILE).exists():
            status = self.get_deployment(name)["status"]
            raise MlflowException(
                f"A bentoml deployment named {name!r} exists ({status}): `mlflow deployments update -t bentoml "
                f"--name {name} -m URI` moves it to another version; delete it first to create it again.",
                RESOURCE_ALREADY_EXISTS,
            )
        settings = Settings.parse(model_uri, config)
        check_port(settings.host, settings.port)
        registered = resolve_version(model_uri)
        directory.mkdir(parents=True, exist_ok=True)
        key_file = directory / KEY_FILE
        key_file.touch(mode=0o600)
        key_file.write_text(secrets.token_urlsafe(32))
        bento = process = None
        try:
            bento = build_bento(name, model_uri, settings, key_file)
            process = start_server(directory, str(bento.tag), settings)
            state = State(
                name=name,
                model_uri=model_uri,
                registered_model_name=registered.name if registered else None,
                model_version=registered.version if registered else None,
                bento=str(bento.tag),
                url=f"http://{client_host(settings.host)}:{settings.port}",
                pid=process.pid,
                port=settings.port,
                host=settings.host,
                service_args=settings.service_args,
                tracking_uri=current_tracking_uri(),
                created=time.time(),
            )
            await_ready(state, process, settings.startup_timeout_s)
            state.save()
        except BaseException:
            if process is not None:
                stop_group(process.pid)
            remove_bento(bento)
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return {"name": name, "flavor": FLAVOR, "url": state.url, "model_version": state.model_version}

    def update_deployment(self, name, model_uri=None, flavor=None, config=None, endpoint=None):
        check_flavor(flavor)
        state = running_state(name)
        if config:
            raise invalid(
                f"update moves a deployment to another version (-m); its configuration ({', '.join(config)}) "
                f"is set at create: delete {name} and create it again with the new -C values."
            )
        if not model_uri:
            raise invalid("Pass the version to move to: -m models:/NAME/VERSION (or models:/NAME@ALIAS).")
        import httpx

        try:
            response = httpx.put(
                f"{state.url}/admin/model", json={"model": model_uri}, headers=request_headers(state), timeout=MOVE_TIMEOUT_S
            )
        except httpx.HTTPError as exc:
            raise MlflowException(
                f"Deployment {name} at {state.url} did not answer ({exc}); see {deployment_dir(name) / LOG_FILE}.", INVALID_STATE
            ) from None
        if response.status_code != 200:
            raise MlflowException(
                f"Deployment {name} did not move to {model_uri}: {error_message(response)}",
                RESOURCE_DOES_NOT_EXIST if response.status_code == 404 else INVALID_PARAMETER_VALUE,
            )
        served = response.json()["model"]
        state.model_uri, state.registered_model_name, state.model_version = model_uri, served["name"], served["version"]
        state.save()
        return {"name": name, "flavor": FLAVOR, "model_version": state.model_version}

    def delete_deployment(self, name, config=None, endpoint=None):
        """Stops the service and removes its bento and state; a deployment that is not there is not an error."""
        directory = deployment_dir(name)
        try:
            state = State.load(name)
        except MlflowException:
            shutil.rmtree(directory, ignore_errors=True)  # a create that never finished
            return None
        stop_group(state.pid)
        remove_bento(state.bento)
        shutil.rmtree(directory, ignore_errors=True)
        return None

    def list_deployments(self, endpoint=None):
        home = deployments_home()
        names = sorted(p.parent.name for p in home.glob(f"*/{STATE_FILE}")) if home.is_dir() else []
        return [self.get_deployment(n) for n in names]

    def get_deployment(self, name, endpoint=None):
        state = State.load(name)
        description = {
            "name": name,
            "flavor": FLAVOR,
            "status": service_status(state),
            "url": state.url,
            "model_uri": state.model_uri,
            "registered_model_name": state.registered_model_name,
            "model_version": state.model_version,
            "bento": state.bento,
            "pid": state.pid,
            "config": {"port": state.port, "host": state.host, **state.service_args},
            "log": str(deployment_dir(name) / LOG_FILE),
        }
        if description["status"] == "running":
            info = service_info(state)
            if info is not None:  # what the service itself says it serves
                description.update(
                    model_version=info["model"]["version"],
                    device=info["device"],
                    compute_type=info["compute_type"],
                    follow=info["follow"]["why"],
                )
        return description

    def predict(self, deployment_name=None, inputs=None, endpoint=None):
        """The rows of ``inputs`` (as ``mlflow models predict`` takes them) transcribed by the
        deployment, concurrently so they share its forward passes; one result per row, as the
        pyfunc returns them (``error`` set on a row whose audio could not be decoded)."""
        state = running_state(deployment_name)
        cells, params = audio_and_params(inputs)
        fields = form_fields(params)
        import httpx

        with httpx.Client(base_url=state.url, headers=request_headers(state), timeout=None) as http:

            def one(cell):
                response = http.post("/transcribe", files={"file": ("audio", audio_bytes(cell))}, data=fields)
                return result_row(response)

            with ThreadPoolExecutor(max_workers=min(16, max(1, len(cells)))) as pool:
                rows = list(pool.map(one, cells))
        return PredictionsResponse({"predictions": rows})

    def predict_stream(self, deployment_name=None, inputs=None, endpoint=None) -> Iterator[dict[str, Any]]:
        """One recording's transcription as it is decoded: the service's server-sent events
        (``transcript.text.delta`` per segment, then ``transcript.text.done``)."""
        state = running_state(deployment_name)
        cells, params = audio_and_params(inputs)
        if len(cells) != 1:
            raise invalid(f"predict_stream takes one recording; got {len(cells)}.")
        import httpx

        with httpx.Client(base_url=state.url, headers=request_headers(state), timeout=None) as http:
            with http.stream(
                "POST", "/transcribe", files={"file": ("audio", audio_bytes(cells[0]))}, data={**form_fields(params), "stream": "true"}
            ) as response:
                if response.status_code != 200:
                    response.read()
                    raise invalid(f"Deployment {deployment_name} refused the request: {error_message(response)}")
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        yield json.loads(line[len("data: ") :])
