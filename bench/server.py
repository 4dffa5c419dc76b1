"""Start ``bentoml serve whisper_bento:Transcriber`` as the user would, and watch its processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from bench.common import REPO, WORK, process_tree_rss

READY_TIMEOUT_S = 180.0


class ServiceUnavailable(RuntimeError):
    """The bento service could not be started: the section that needs it is skipped."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SERVICE = "whisper_bento:Transcriber"


class BentoServer:
    """One ``bentoml serve`` process group; ``start()`` returns the seconds until /readyz said 200.

    Serves ``model_uri`` through the service in this checkout, or, with ``bento``, a built bento
    (which carries its model; ``env`` may then point the tracking URI nowhere).
    """

    def __init__(self, model_uri: Optional[str], *, cpu_threads: int, compute_type: str = "int8", log_name: str = "bento",
                 extra_args: Optional[dict[str, str]] = None, bento: Optional[str] = None,
                 env: Optional[dict[str, str]] = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.target = bento or SERVICE
        self.args = {"cpu_threads": str(cpu_threads), "compute_type": compute_type, "device": "cpu", **(extra_args or {})}
        if model_uri is not None:
            self.args["model"] = model_uri
        self.env = env
        self.log_path = WORK / "logs" / f"{log_name}.log"
        self.proc: Optional[subprocess.Popen] = None

    def command(self) -> list[str]:
        cmd = ["bentoml", "serve", self.target, "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in self.args.items():
            cmd += ["--arg", f"{key}={value}"]
        return cmd

    def start(self) -> float:
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "w")
        started = time.perf_counter()
        try:
            self.proc = subprocess.Popen(
                self.command(), cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **self.env} if self.env else None,
            )
        except FileNotFoundError as exc:
            raise ServiceUnavailable(f"bentoml is not on PATH ({exc}); install the serve extra.") from None
        finally:
            log_file.close()
        with httpx.Client(timeout=2.0) as client:
            while time.perf_counter() - started < READY_TIMEOUT_S:
                if self.proc.poll() is not None:
                    raise ServiceUnavailable(
                        f"bentoml serve exited with {self.proc.returncode} before /readyz:\n{self.log_tail()}"
                    )
                try:
                    if client.get(self.url + "/readyz").status_code == 200:
                        return time.perf_counter() - started
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        self.stop()
        raise ServiceUnavailable(f"/readyz not 200 within {READY_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

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
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group this server's own Popen created
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "BentoServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


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
