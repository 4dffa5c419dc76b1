"""Start ``bentoml serve whisper_bento:Transcriber`` as the user would, and watch its processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from bench.common import REPO, WORK, process_tree_rss
from devkit.processes import ServerProcess, ServerStartError, free_port, venv_path_env

READY_TIMEOUT_S = 180.0


class ServiceUnavailable(RuntimeError):
    """The bento service could not be started: the section that needs it is skipped."""


SERVICE = "whisper_bento:Transcriber"


class BentoServer:
    """One ``bentoml serve`` process group; ``start()`` returns the seconds until /readyz said 200.

    Serves ``model_uri`` through the service in this checkout, or, with ``bento``, a built bento
    (which carries its model; ``env`` may then point the tracking URI nowhere). A built bento
    serves with the configuration it was built with, so it is started with no ``--arg``: build it
    with ``service_args(...)`` for the same configuration.
    """

    def __init__(self, model_uri: Optional[str], *, cpu_threads: int, compute_type: str = "int8", log_name: str = "bento",
                 extra_args: Optional[dict[str, str]] = None, bento: Optional[str] = None,
                 env: Optional[dict[str, str]] = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.target = bento or SERVICE
        self.args = {} if bento else service_args(cpu_threads, compute_type, extra_args)
        if model_uri is not None:
            self.args["model"] = model_uri
        self.env = env
        self.log_path = WORK / "logs" / f"{log_name}.log"
        self.server: Optional[ServerProcess] = None

    def command(self) -> list[str]:
        cmd = ["bentoml", "serve", self.target, "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in self.args.items():
            cmd += ["--arg", f"{key}={value}"]
        return cmd

    def start(self) -> float:
        env = venv_path_env({**os.environ, **self.env} if self.env else None)
        self.server = ServerProcess(self.command(), ready_url=self.url + "/readyz", log_path=self.log_path, env=env, cwd=REPO,
                                    timeout_s=READY_TIMEOUT_S, fail_marker="Application startup failed")
        try:
            return self.server.start()
        except (ServerStartError, FileNotFoundError) as exc:
            raise ServiceUnavailable(str(exc)) from None

    @property
    def proc(self):
        return self.server.process if self.server else None

    def info(self) -> dict[str, Any]:
        import httpx

        response = httpx.get(self.url + "/info", timeout=10)
        return response.json() if response.status_code == 200 else {}

    def rss(self) -> dict[str, Any]:
        """RSS of every process of the server (``bentoml serve`` spawns its workers as children)."""
        rows = process_tree_rss(self.proc.pid) if self.proc else []
        # The worker by its command line: the serve process can be the larger of the two.
        worker = next((r for r in rows if "_bentoml_impl.worker" in r["cmd"]), None)
        return {
            "total_bytes": sum(r["rss_bytes"] for r in rows),
            "worker_bytes": worker["rss_bytes"] if worker else None,
            "worker_cmd": worker["cmd"] if worker else None,
            "processes": rows,
        }

    def log_tail(self, chars: int = 3000) -> str:
        return self.server.log_tail(chars) if self.server else ""

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def __enter__(self) -> "BentoServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def service_args(cpu_threads: int, compute_type: str = "int8", extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The service configuration the bench serves with (``--arg`` values): CPU, pinned threads."""
    return {"cpu_threads": str(cpu_threads), "compute_type": compute_type, "device": "cpu", **(extra or {})}


def transcribe_http(client, url: str, data: bytes, options: dict[str, Any], filename: str = "audio.wav") -> dict:
    """POST /transcribe (multipart ``file`` + decoding fields) -> the native JSON body."""
    fields = {k: str(v) for k, v in options.items()}
    response = client.post(url + "/transcribe", files={"file": (filename, data, "audio/wav")}, data=fields)
    if response.status_code != 200:
        raise RuntimeError(f"/transcribe -> {response.status_code}: {response.text[:500]}")
    return response.json()


def service_code_present() -> Optional[str]:
    """None when the service module exists; else why the service sections are skipped."""
    if not (Path(REPO) / "bento" / "whisper_bento" / "service.py").is_file():
        return "bento/whisper_bento/service.py does not exist yet"
    return None
