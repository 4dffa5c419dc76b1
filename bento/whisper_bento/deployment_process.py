"""The process of a ``bentoml`` deployment: its bento built, ``bentoml serve`` started in its own
process group, waited for, asked how it is, and stopped."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_STATE

from whisper_bento.deployment_state import (
    LOG_FILE,
    Settings,
    State,
    current_tracking_uri,
    deployment_dir,
    invalid,
    request_headers,
)

_FAILED_START = "Application startup failed"  # BentoML would restart the worker forever


def build_bento(name: str, model_uri: str, settings: Settings, key_file: Path):
    from whisper_bento.build import BuildError, build

    args = {**settings.service_args, "model": model_uri, "admin_key": f"file:{key_file}"}
    try:
        return build(args, version=f"{name}-{secrets.token_hex(4)}")
    except BuildError as exc:
        raise MlflowException(f"Building the bento of {model_uri} failed: {exc}", INVALID_STATE) from None


def serve_command(target: str, settings: Settings) -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", target, "--host", settings.host, "--port", str(settings.port)]


def arg_options(args: dict[str, Any]) -> list[str]:
    options = []
    for key, value in args.items():
        options += ["--arg", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return options


def server_env() -> dict[str, str]:
    """This environment, with this interpreter's scripts first on PATH (bentoml starts its
    workers through them) and the tracking URI the registry was read from (update imports from it)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = current_tracking_uri()
    return env


def start_server(directory: Path, bento_tag: str, settings: Settings) -> subprocess.Popen:
    with open(directory / LOG_FILE, "ab") as log:
        return subprocess.Popen(
            serve_command(bento_tag, settings),
            env=server_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def await_ready(state: State, process: subprocess.Popen, timeout_s: float) -> None:
    log = deployment_dir(state.name) / LOG_FILE
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
            raise MlflowException(f"The service of deployment {state.name} {problem}; its log ends:\n{tail}", INVALID_STATE)
        if is_ready(state.url, timeout_s=2):
            return
        time.sleep(0.25)


def stop_group(pid: int) -> None:
    """SIGTERM to the service's process group (the server and its workers), SIGKILL after 30 s."""
    for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            reap(pid)
            if not group_alive(pid):
                return
            time.sleep(0.1)


def reap(pid: int) -> None:
    try:  # a service this process started (create in a Python session) is its child
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def group_alive(pgid: int) -> bool:
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


def service_status(state: State) -> str:
    reap(state.pid)
    if not group_alive(state.pid):
        return "exited"
    return "running" if is_ready(state.url, timeout_s=5) else "not ready"


def is_ready(url: str, timeout_s: float) -> bool:
    """Whether the service at ``url`` answers its readiness route (``/readyz``) with 200."""
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def service_info(state: State) -> Optional[dict[str, Any]]:
    import httpx

    try:
        response = httpx.get(f"{state.url}/info", headers=request_headers(state), timeout=10)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def remove_bento(bento) -> None:
    if bento is None:
        return
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bentoml.bentos.delete(str(getattr(bento, "tag", bento)))
    except NotFound:
        pass


def running_state(name: Optional[str]) -> State:
    """The state of deployment ``name``, which must be running."""
    if not name:
        raise invalid("Pass the deployment's --name.")
    state = State.load(name)
    status = service_status(state)
    if status != "running":
        raise MlflowException(
            f"Deployment {name} is {status}; its log is {deployment_dir(name) / LOG_FILE}. Delete it and create it again.", INVALID_STATE
        )
    return state
