"""Helpers of the service tests: a registry with the real base model, a real ``bentoml serve``.

Each server test module starts ONE server (module-scoped fixture) and reuses it: a start costs
~10 s here, a transcription a few seconds on 2 cores.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlflow
import pytest
from mlflow import MlflowClient

import mlflow_faster_whisper
from tests.fixtures.offline import OFFLINE
from tests.fixtures.processes import ServerProcess, free_port, venv_path_env

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "whisper-base"
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

    def client(self, timeout: float = 300) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)


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
