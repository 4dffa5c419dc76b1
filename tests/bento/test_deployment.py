"""``mlflow deployments -t bentoml``: the real ``mlflow deployments`` CLI against a sqlite registry
with real whisper-tiny.en versions; the deployment is a real bento served by a real ``bentoml
serve`` process in the background."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from whisper_registry.normalize import normalizer_for

import mlflow_faster_whisper as mfw
from tests.bento.conftest import RequestLoop, make_registry, server_env
from devkit.processes import ServerProcess, free_port

pytestmark = [pytest.mark.real_weights, pytest.mark.server]

NAME = "tiny-deploy"
OTHER = "tiny-other"


class _NotWhisper(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (a zombie left for init to reap does not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False


def test_deployments_cli_create_predict_update_delete(tmp_path, whisper_tiny_en_ct2, speech_clips):
    registry = make_registry(tmp_path / "registry", whisper_tiny_en_ct2, name=NAME)  # version 1 @production
    mlflow.set_tracking_uri(registry.uri)
    try:
        mlflow.set_experiment("bento")
        with mlflow.start_run():  # version 2: the same weights, greedy by default
            mfw.log_model(str(whisper_tiny_en_ct2), name="model", registered_model_name=NAME, decoding={"beam_size": 1})
        with mlflow.start_run():
            mlflow.pyfunc.log_model(name="model", python_model=_NotWhisper(), registered_model_name="not-whisper")
        with mlflow.start_run():  # a second registered model, for a deployment serving several
            mfw.log_model(str(whisper_tiny_en_ct2), name="model", registered_model_name=OTHER, decoding={"beam_size": 1})
        hello = next(c for c in speech_clips if c.name == "hello_world").path
        expected = mlflow.pyfunc.load_model(f"models:/{NAME}/1").predict({"audio": [hello.read_bytes()]})[0]
    finally:
        mlflow.set_tracking_uri(None)

    home = tmp_path / "deployments"
    env = {**server_env(tmp_path / "bentoml", registry.uri), "WHISPER_DEPLOYMENTS_HOME": str(home)}

    def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mlflow", "deployments", *args, "-t", "bentoml"], env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=tmp_path)

    target_help = cli("help").stdout
    assert "mlflow deployments create -t bentoml" in target_help
    # Every configuration key is in the help itself: an installed wheel has no bento/README.md.
    assert all(f"  {key} " in target_help for key in ("compute_type", "max_beam_size", "api_key"))
    assert "README" not in target_help
    port = free_port()
    created = cli("create", "--name", "asr", "-m", f"models:/{NAME}@production", "-C", f"port={port}",
                  "-C", "device=cpu", "-C", "compute_type=int8", "-C", 'decoding={"beam_size": 2}')
    assert created.returncode == 0, created.stdout[-3000:] + created.stderr[-3000:]
    state = json.loads((home / "asr" / "deployment.json").read_text())
    try:
        listed = cli("list")
        assert listed.returncode == 0 and "'name': 'asr'" in listed.stdout
        got = cli("get", "--name", "asr")
        assert "status: running" in got.stdout and "model_version: 1" in got.stdout, got.stdout + got.stderr
        assert f"url: http://127.0.0.1:{port}" in got.stdout

        # The input of `mlflow models predict`: base64 audio, one row per recording.
        request = tmp_path / "request.json"
        request.write_text(json.dumps({
            "dataframe_split": {"columns": ["audio"], "data": [[base64.b64encode(hello.read_bytes()).decode()],
                                                               [base64.b64encode(b"not audio at all").decode()]]},
            "params": {"beam_size": 5},
        }))
        predicted = cli("predict", "--name", "asr", "--input-path", str(request))
        assert predicted.returncode == 0, predicted.stderr[-3000:]
        rows = json.loads(predicted.stdout.strip().splitlines()[-1])["predictions"]
        # The served process and this one decode with their own thread counts, so their kernels may
        # round differently: the same words, and segment starts within a few timestamp tokens.
        normalize = normalizer_for("en")
        assert normalize(rows[0]["text"]) == normalize(expected["text"]), (rows[0]["text"], expected["text"])
        assert rows[0]["error"] == "" and rows[0]["language"] == "en"
        starts = [s["start"] for s in rows[0]["segments"]]
        assert len(starts) == len(expected["segments"]), (rows[0]["segments"], expected["segments"])
        assert all(abs(a - s["start"]) <= 0.2 for a, s in zip(starts, expected["segments"], strict=True)), (starts, expected["segments"])
        assert rows[1]["text"] == "" and "decode" in rows[1]["error"]

        # Errors name the fix and leave nothing behind.
        again = cli("create", "--name", "asr", "-m", f"models:/{NAME}/2", "-C", f"port={free_port()}")
        assert again.returncode != 0 and "exists (running)" in again.stderr and "update" in again.stderr
        busy = cli("create", "--name", "other", "-m", f"models:/{NAME}/2", "-C", f"port={port}")
        assert busy.returncode != 0 and f"Port {port}" in busy.stderr and "-C port=N" in busy.stderr
        foreign = cli("create", "--name", "other", "-m", "models:/not-whisper/1", "-C", f"port={free_port()}")
        assert foreign.returncode != 0 and "no faster_whisper flavor" in foreign.stderr
        unknown = cli("get", "--name", "nope")
        assert unknown.returncode != 0 and "No bentoml deployment named 'nope'" in unknown.stderr
        # A service that fails to start (its API key variable is not set): the error carries its log.
        broken = cli("create", "--name", "broken", "-m", f"models:/{NAME}/2", "-C", f"port={free_port()}",
                     "-C", "api_key=env:WHISPER_TEST_UNSET_KEY")
        assert broken.returncode != 0 and "WHISPER_TEST_UNSET_KEY" in broken.stderr, broken.stderr[-2000:]
        assert not _processes_running("whisper:broken-")
        assert not list((tmp_path / "bentoml" / "bentos").glob("whisper/broken-*"))
        assert sorted(p.name for p in home.iterdir()) == ["asr"]
        # The control route answers only with the deployment's key.
        import httpx

        keyless = httpx.put(f"{state['url']}/admin/model", json={"model": f"models:/{NAME}/2"}, timeout=30)
        assert keyless.status_code == 401 and keyless.json()["error"]["code"] == "invalid_admin_key"
        key = {"x-whisper-admin-key": (home / "asr" / "admin.key").read_text().strip()}
        for unknown in (f"models:/{NAME}@nowhere", f"models:/{NAME}/99"):
            missing = httpx.put(f"{state['url']}/admin/model", json={"model": unknown}, headers=key, timeout=30)
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found", missing.text

        # Move to version 2 while clients loop: no request fails, answers switch version.
        clip = next(c for c in speech_clips if c.name == "quick_brown_fox").path
        with RequestLoop(state["url"], clip, clients=2) as loop:
            loop.first_answer_by("1", after=0)
            moved = cli("update", "--name", "asr", "-m", f"models:/{NAME}/2")
            assert moved.returncode == 0, moved.stderr[-3000:]
            loop.first_answer_by("2", after=time.monotonic())
            refused = cli("update", "--name", "asr", "-m", "models:/not-whisper/1")
            assert refused.returncode != 0 and "no faster_whisper flavor" in refused.stderr and "version 2 still is" in refused.stderr
            loop.first_answer_by("2", after=time.monotonic())
        assert loop.answers and not [a for a in loop.answers if a[1] != 200], loop.answers[:5]
        versions = [v for _, _, v in loop.answers]
        assert versions[0] == "1" and versions[-1] == "2" and set(versions) == {"1", "2"}
        got = cli("get", "--name", "asr")
        assert "model_version: 2" in got.stdout and f"model_uri: models:/{NAME}/2" in got.stdout

        # The Python client streams one recording's segments as the service decodes them.
        from mlflow.deployments import get_deploy_client

        os.environ["WHISPER_DEPLOYMENTS_HOME"] = str(home)
        try:
            events = list(get_deploy_client("bentoml").predict_stream("asr", {"audio": base64.b64encode(hello.read_bytes()).decode()}))
        finally:
            del os.environ["WHISPER_DEPLOYMENTS_HOME"]
        assert events[-1]["type"] == "transcript.text.done" and events[-1]["model"]["version"] == "2"
        assert events[-1]["text"] == "".join(e["delta"] for e in events[:-1]).strip()
    finally:
        deleted = cli("delete", "--name", "asr")
    assert deleted.returncode == 0, deleted.stderr[-2000:]
    assert not _group_alive(state["pid"]) and not (home / "asr").exists()
    assert cli("delete", "--name", "asr").returncode == 0  # idempotent
    assert not list((tmp_path / "bentoml" / "bentos").glob("whisper/asr-*"))

    # run-local serves in the foreground until stopped; -C models=... serves several models.
    port = free_port()
    local = ServerProcess([sys.executable, "-m", "mlflow", "deployments", "run-local", "-t", "bentoml", "--name", "dev",
                           "-m", f"models:/{NAME}/1", "-C", f"port={port}", "-C", "compute_type=int8",
                           "-C", f"models=models:/{NAME}/1,models:/{OTHER}/1"],
                          ready_url=f"http://127.0.0.1:{port}/readyz", log_path=tmp_path / "run-local.log",
                          env=env, cwd=tmp_path, timeout_s=180)
    with local:
        import httpx

        url = f"http://127.0.0.1:{port}"
        info = httpx.get(f"{url}/info", timeout=30).json()
        assert info["model"]["version"] == "1" and info["follow"]["why"] == f"pinned: models:/{NAME}/1 names one version"
        assert [m["name"] for m in info["models"]] == [NAME, OTHER], info["models"]
        other = httpx.post(f"{url}/v1/audio/transcriptions", data={"model": OTHER},
                           files={"file": ("hello.wav", hello.read_bytes(), "audio/wav")}, timeout=300)
        assert other.status_code == 200 and other.headers["x-whisper-model"] == OTHER, other.text
    assert not (home / "dev").exists()  # nothing managed: run-local keeps no state


def _processes_running(needle: str) -> list[str]:
    """Command lines (not of zombies) containing ``needle``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if needle in cmdline and state != "Z":
            found.append(cmdline)
    return found
