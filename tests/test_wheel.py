"""The product as a user installs it: this project's wheel, installed (not editable) into a fresh
virtualenv, used from a folder outside the checkout with real whisper-tiny.en weights and a real
sqlite registry: log + alias + load, ``whisper-registry register`` and ``evaluate``, a bento built
and served by ``bentoml serve`` with no registry, and ``mlflow deployments create/predict/delete``.

The fresh venv takes its third-party packages from the test venv's site-packages through a
``.pth`` path line (offline and fast); that line adds the folder only, so the test venv's own
``.pth`` files, the editable install's finder among them, are not run there, and the installed
copy is the only one of this project's packages that the venv can import.
"""

from __future__ import annotations

import base64
import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from devkit.offline import OFFLINE
from devkit.processes import ServerProcess, free_port
from whisper_bento.build import build_wheel

pytestmark = [pytest.mark.server, pytest.mark.real_weights]

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mlflow_faster_whisper", "whisper_registry", "whisper_bento")
UNREACHABLE_REGISTRY = "http://127.0.0.1:9"  # nothing listens on the discard port


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the fresh venv's python, the wheel it was installed from)."""
    root = tmp_path_factory.mktemp("wheel")
    (root / "dist").mkdir()
    wheel = build_wheel(root / "dist")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "test-venv-packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    "--disable-pip-version-check", str(wheel)], check=True, capture_output=True)
    return python, wheel


def _env(python: Path, work: Path, tracking_uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "BENTOML_", "PYTHON"))}
    env.update(OFFLINE, PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}", MLFLOW_TRACKING_URI=tracking_uri,
               BENTOML_HOME=str(work / "bentoml"), WHISPER_DEPLOYMENTS_HOME=str(work / "deployments"))
    return env


def _run(python: Path, args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> str:
    done = subprocess.run([str(python), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_installed_wheel_logs_registers_evaluates_builds_serves_and_deploys(
        installed, tmp_path, whisper_tiny_en_ct2, speech_clips):
    python, wheel = installed
    work = tmp_path / "work"  # outside the checkout
    work.mkdir()
    env = _env(python, work, f"sqlite:///{work / 'mlflow.db'}")
    hello = next(c for c in speech_clips if c.name == "hello_world")

    where = json.loads(_run(python, ["-c", "import json, importlib.metadata as md, sys, " + ", ".join(PACKAGES) + "; "
                                     "print(json.dumps({'files': [m.__file__ for m in (" + ", ".join(PACKAGES) + ")], "
                                     "'dist': str(md.distribution('mlflow-faster-whisper').locate_file('')), "
                                     "'path': sys.path}))"], env, work))
    site_dir = Path(where["dist"]).resolve()
    assert all(Path(f).resolve().is_relative_to(site_dir) for f in where["files"]), where
    sources = [REPO, *(REPO / d for d in ("plugin", "registry", "bento"))]
    assert site_dir.is_relative_to(python.parent.parent)
    assert not [p for p in where["path"] if p and Path(p).resolve() in sources], where["path"]

    # The flavor: log, set the alias, load by the alias, transcribe.
    _run(python, ["-c", f"""
import mlflow, mlflow_faster_whisper as mfw
mlflow.set_experiment("wheel")
with mlflow.start_run():
    info = mfw.log_model({str(whisper_tiny_en_ct2)!r}, name="model", registered_model_name="tiny",
                         decoding={{"beam_size": 1, "temperature": 0.0}})
mlflow.MlflowClient().set_registered_model_alias("tiny", "production", info.registered_model_version)
segments, _ = mfw.load_model("models:/tiny@production").transcribe({str(hello.path)!r}, beam_size=1)
assert "".join(s.text for s in segments).strip() == "Hello world.", "transcript"
"""], env, work)

    # The registry CLI, as installed (its console script).
    registered = _run(python.parent / "whisper-registry", ["register", str(whisper_tiny_en_ct2), "--name", "tiny",
                                                          "--no-progress"], env, work)
    assert "tiny version 2" in registered
    (work / "eval.jsonl").write_text(json.dumps({"audio": str(hello.path), "text": hello.text, "language": "en"}) + "\n")
    evaluated = _run(python.parent / "whisper-registry", ["evaluate", "models:/tiny/2", "--dataset", "eval.jsonl",
                                                          "--no-progress"], env, work)
    assert "tiny version 2: wer=0 " in evaluated, evaluated

    # A bento built from the installed files alone, served with no registry.
    _run(python, ["-m", "whisper_bento.build", "--arg", "model=models:/tiny@production", "--version", "w1"], env, work)
    bento = work / "bentoml" / "bentos" / "whisper" / "w1"
    (shipped,) = (bento / "src" / "wheels").glob("*.whl")
    assert shipped.name == wheel.name and _contents(shipped) == _contents(wheel)  # repacked as it was built
    port = free_port()
    serve = [str(python), "-m", "bentoml", "serve", "whisper:w1", "--host", "127.0.0.1", "--port", str(port)]
    offline_env = {**env, "MLFLOW_TRACKING_URI": UNREACHABLE_REGISTRY}
    with ServerProcess(serve, ready_url=f"http://127.0.0.1:{port}/readyz", log_path=work / "serve.log",
                       env=offline_env, cwd=work, fail_marker="Application startup failed"):
        answer = httpx.post(f"http://127.0.0.1:{port}/transcribe", files={"file": hello.path.read_bytes()}, timeout=120)
        assert answer.status_code == 200 and answer.json()["text"].strip() == "Hello world.", answer.text
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=60)  # package data of the wheel
        assert page.status_code == 200 and "<title>Whisper speech-to-text</title>" in page.text, page.text[:300]

    # mlflow deployments: its target help, then create, predict, delete.
    assert "Needs this package's serve extra" in _run(python, ["-m", "mlflow", "deployments", "help", "-t", "bentoml"],
                                                      env, work)
    port = free_port()
    _run(python, ["-m", "mlflow", "deployments", "create", "-t", "bentoml", "--name", "asr", "-m",
                  "models:/tiny@production", "-C", f"port={port}"], env, work)
    try:
        request = work / "request.json"
        request.write_text(json.dumps({"dataframe_split": {"columns": ["audio"], "data": [
            [base64.b64encode(hello.path.read_bytes()).decode()]]}}))
        predicted = _run(python, ["-m", "mlflow", "deployments", "predict", "-t", "bentoml", "--name", "asr",
                                  "--input-path", str(request)], env, work)
        (row,) = json.loads(predicted.strip().splitlines()[-1])["predictions"]
        assert row["text"].strip() == "Hello world." and row["error"] == ""
    finally:
        _run(python, ["-m", "mlflow", "deployments", "delete", "-t", "bentoml", "--name", "asr"], env, work)
    assert not (work / "deployments" / "asr").exists()


def _contents(wheel: Path) -> dict[str, bytes]:
    """A wheel's files but its RECORD (whose lines may come in another order)."""
    with zipfile.ZipFile(wheel) as archive:
        return {n: archive.read(n) for n in archive.namelist() if not n.endswith(".dist-info/RECORD")}
