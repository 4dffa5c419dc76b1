"""Helpers of the service tests: a registry with the real base model, a real ``bentoml serve``.

Each server test module starts ONE server (module-scoped fixture) and reuses it: a start costs
~10 s here, a transcription a few seconds on 2 cores.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlflow
import pytest
from mlflow import MlflowClient

import mlflow_faster_whisper
from devkit.offline import OFFLINE
from devkit.processes import ServerProcess, free_port, venv_path_env

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "whisper-base"
VERSION_HEADER = "x-whisper-model-version"  # every answer names the version that gave it
# Stored with the version: the bottom layer of decoding options.
VERSION_DECODING = {"beam_size": 2, "patience": 1.5, "temperature": 0.0}


@dataclass(frozen=True)
class Registry:
    uri: str
    root: Path
    version: str


def make_registry(root: Path, ct2_dir: Path, alias: str = "production", name: str = MODEL_NAME) -> Registry:
    """A sqlite registry in ``root`` holding a real model (logged as is) as ``name`` under ``alias``."""
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            experiment_id = mlflow.create_experiment("bento", artifact_location=(root / "mlartifacts").as_uri())
            with mlflow.start_run(experiment_id=experiment_id):
                info = mlflow_faster_whisper.log_model(
                    str(ct2_dir), name="model", registered_model_name=name, decoding=VERSION_DECODING
                )
            version = str(info.registered_model_version)
            MlflowClient().set_registered_model_alias(name, alias, version)
        finally:
            mlflow.set_tracking_uri(None)
    return Registry(uri=uri, root=root, version=version)


def server_env(bentoml_home: Path, tracking_uri: str | None) -> dict[str, str]:
    env = venv_path_env()
    env.update(
        BENTOML_HOME=str(bentoml_home),
        **OFFLINE,
    )
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    if tracking_uri is None:
        env.pop("MLFLOW_TRACKING_URI", None)
    else:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


@dataclass
class Server:
    url: str
    process: ServerProcess

    def log_text(self) -> str:
        return self.process.log_text()

    def client(self, timeout: float = 300, key: str | None = None) -> httpx.Client:
        """A client of the service; with ``key``, every request carries it as its bearer token."""
        headers = {"Authorization": f"Bearer {key}"} if key else None
        return httpx.Client(base_url=self.url, timeout=timeout, headers=headers)


@contextlib.contextmanager
def bentoml_serve(target: str, args: dict[str, str], env: dict[str, str], log: Path, cwd: Path = REPO) -> Iterator[Server]:
    """``bentoml serve target --arg k=v ...`` as a real process; stopped (its whole group) after."""
    port = free_port()
    command = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    for key, value in args.items():
        command += ["--arg", f"{key}={value}"]
    url = f"http://127.0.0.1:{port}"
    # "Application startup failed": BentoML would restart the worker forever.
    with ServerProcess(command, ready_url=f"{url}/readyz", log_path=log, env=env, cwd=cwd,
                       fail_marker="Application startup failed") as process:
        yield Server(url=url, process=process)


def until(condition, what: str, timeout_s: float = 120.0):
    """Poll ``condition`` until it returns something true, and return that. ``timeout_s`` is only a
    bound on a failure (a loaded host takes longer), never the property a test checks."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.2)
    return value


def passes_observed(metrics_text: str, op: str = "encode") -> tuple[float, float]:
    """(forward passes, windows in them) of one CTranslate2 call, from the service's
    whisper_pass_windows histogram."""
    count = total = 0.0
    for line in metrics_text.splitlines():
        if f'op="{op}"' not in line:
            continue
        if line.startswith("whisper_pass_windows_count"):
            count += float(line.rsplit(" ", 1)[1])
        elif line.startswith("whisper_pass_windows_sum"):
            total += float(line.rsplit(" ", 1)[1])
    return count, total


class RequestLoop:
    """Clients posting a clip to ``url``/transcribe in a loop; every answer's (time, status, the
    version that answered), in order. A dropped connection is a failed answer (status 0)."""

    def __init__(self, url: str, clip: Path, clients: int = 3):
        self.answers: list[tuple[float, int, str]] = []
        self.stop = threading.Event()
        self.go = threading.Event()  # cleared: the clients send nothing new (pause)
        self.go.set()
        self.in_flight = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(url, clip), daemon=True) for _ in range(clients)]

    def _run(self, url: str, clip: Path) -> None:
        data = clip.read_bytes()
        with httpx.Client(base_url=url, timeout=120) as http:
            while not self.stop.is_set():
                if not self.go.wait(0.1):
                    continue
                with self._lock:  # counted before go is read again: pause() cannot miss a request it let through
                    if not self.go.is_set():
                        continue
                    self.in_flight += 1
                try:
                    r = http.post("/transcribe", files={"file": ("clip.wav", data, "audio/wav")})
                    self.answers.append((time.monotonic(), r.status_code, r.headers.get(VERSION_HEADER, "")))
                except Exception as exc:  # a dropped connection is a failed request too
                    self.answers.append((time.monotonic(), 0, repr(exc)))
                finally:
                    with self._lock:
                        self.in_flight -= 1

    def pause(self, settle_s: float = 2.0) -> None:
        """Until no request is in flight (and the service has settled)."""
        with self._lock:
            self.go.clear()
        while self.in_flight:
            time.sleep(0.05)
        time.sleep(settle_s)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def first_answer_by(self, version: str, after: float, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [t for t, status, v in list(self.answers) if t > after and status == 200 and v == version]
            if hits:
                return hits[0]
            time.sleep(0.1)
        raise AssertionError(f"no answer by version {version} within {timeout} s: {self.answers[-5:]}")
