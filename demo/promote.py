"""``make demo-promote``: live promotion end to end, offline, on the embedded defaults.

Registers the real Whisper base checkpoint as int8 (``production``) and float32 (``staging``),
serves production with ``bentoml serve`` while staging shadows a share of the live requests,
reads the shadow figures the service wrote on the staging version, promotes it behind a gate on
them, watches the running service move to it with no restart, rolls back and watches it move
back. Everything is written under ``.demo-promote/``.

    python -m demo.promote [--workdir .demo-promote]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from demo.serve import REPO, _prepare, _step
from devkit.processes import ServerProcess, ServerStartError, free_port, venv_path_env

MODEL_NAME = "whisper-base"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.promote", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".demo-promote", help="where everything is written (wiped first)")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    _prepare(workdir)

    import httpx
    from mlflow import MlflowClient

    from devkit import real
    from whisper_registry.promote import promote, rollback
    from whisper_registry.register import register

    _step("1/6 Registering whisper-base as int8 (production) and float32 (staging)")
    registration = register(str(real.whisper_base_hf()), MODEL_NAME, ["int8", "float32"], decoding={"beam_size": 5})
    by_quantization = {v.quantization: v.version for v in registration.versions}
    client = MlflowClient()
    client.set_registered_model_alias(MODEL_NAME, "production", by_quantization["int8"])
    client.set_registered_model_alias(MODEL_NAME, "staging", by_quantization["float32"])
    print(f"    production -> version {by_quantization['int8']} (int8), staging -> version {by_quantization['float32']} (float32)")

    _step("2/6 Serving production, staging shadowing every request")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "bentoml", "serve", "whisper_bento:Transcriber", "--host", "127.0.0.1",
               "--port", str(port), "--arg", f"model=models:/{MODEL_NAME}@production",
               "--arg", f"shadow=models:/{MODEL_NAME}@staging", "--arg", "shadow_fraction=1.0",
               "--arg", "shadow_report_every=3", "--arg", "follow_interval_s=1"]
    print(f"    $ {' '.join(command[2:])}")
    server = ServerProcess(command, ready_url=f"{url}/readyz", log_path=workdir / "bentoml-serve.log", env=venv_path_env(),
                           cwd=workdir, timeout_s=300, fail_marker="Application startup failed")
    try:
        print(f"    ready after {server.start():.1f} s")
    except ServerStartError as exc:
        raise SystemExit(f"bentoml serve failed to start: {str(exc).splitlines()[0]}") from None
    try:
        with httpx.Client(base_url=url, timeout=600) as http:
            clips = real.speech_clips(["en", "zh"])
            _step(f"3/6 Live traffic: {len(clips)} real clips, each answered by production and decoded by staging too")
            for clip in clips:
                with open(clip.path, "rb") as f:
                    answer = http.post("/transcribe", files={"file": (clip.path.name, f, "audio/wav")})
                answer.raise_for_status()
                print(f"    v{answer.headers['x-whisper-model-version']}  {clip.language}/{clip.name}: {answer.json()['text']}")
            deadline = time.monotonic() + 300
            while (http.get("/info").json()["shadow"]["figures"] or {}).get("requests", 0) < len(clips):
                if time.monotonic() > deadline:
                    raise SystemExit("the shadow did not decode every request within 300 s")
                time.sleep(0.5)
            # Every 3 requests (and at shutdown) the shadow writes its figures on the staging version.
            time.sleep(2)
            staging = by_quantization["float32"]
            tags = {k: v for k, v in client.get_model_version(MODEL_NAME, staging).tags.items() if k.startswith("shadow.")}
            print(f"    shadow figures on version {staging} in MLflow: " +
                  ", ".join(f"{k}={tags[k]}" for k in sorted(tags) if k != "shadow.time"))

            _step(f"4/6 Promoting version {staging} to production, gated on its shadow agreement")
            gate = "shadow.agreement>=0.5"
            promote(MODEL_NAME, staging, "production", gates=[gate])
            print(f"    {MODEL_NAME}@production -> version {staging} (gate {gate}: passed)")
            hello = next(c for c in clips if c.name == "hello_world").path
            print(f"    the running service moved in {_watch(http, staging, hello):.1f} s, no restart")

            _step("5/6 Rolling back")
            back = rollback(MODEL_NAME, "production")
            print(f"    {MODEL_NAME}@production -> version {back.to_version}")
            print(f"    the running service moved back in {_watch(http, back.to_version, hello):.1f} s")

            _step("6/6 Result")
            info = http.get("/info").json()
            print(f"    serving version {info['model']['version']} ({info['model']['quantization']}); "
                  f"moves {info['follow']['swaps']}; shadow: {info['shadow']['model']['name']} "
                  f"v{info['shadow']['model']['version']}")
    finally:
        server.stop()
    print(f"    browse: mlflow ui --backend-store-uri sqlite:///{workdir / 'mlflow.db'} (version tags shadow.*, audit.*)")
    return 0


def _watch(http, version: str, clip: Path, timeout: float = 300) -> float:
    """Seconds until the service answers with ``version`` (a real clip every 0.5 s, as traffic would)."""
    data = clip.read_bytes()
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        answer = http.post("/transcribe", files={"file": (clip.name, data, "audio/wav")})
        if answer.status_code == 200 and answer.headers["x-whisper-model-version"] == str(version):
            return time.monotonic() - started
        time.sleep(0.5)
    raise SystemExit(f"the service did not move to version {version} within {timeout:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
