"""``python -m whisper_bento.build`` makes a self-contained bento: served with no registry
reachable, shipping this project's own wheel; ``device=cuda`` adds the ``gpu`` extra and a CUDA 12
base image, a CPU bento carries no CUDA wheel."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.bento.conftest import MODEL_NAME, REPO, bentoml_serve, make_registry, server_env
from devkit.processes import ServerStartError

pytestmark = [pytest.mark.server, pytest.mark.real_weights]

UNREACHABLE_REGISTRY = "http://127.0.0.1:9"  # nothing listens on the discard port


def test_built_bento_serves_the_imported_version_without_the_registry(tmp_path, whisper_base_ct2, speech_clips):
    registry = make_registry(tmp_path / "registry", whisper_base_ct2)
    home = tmp_path / "bentoml"
    arg_file = tmp_path / "service.yaml"
    arg_file.write_text(
        yaml.safe_dump(
            {"model": f"models:/{MODEL_NAME}@production", "compute_type": "int8", "decoding": {"beam_size": 1},
             "allowed_languages": ["en", "zh"]}
        )
    )
    build = subprocess.run(
        [sys.executable, "-m", "whisper_bento.build", "--arg-file", str(arg_file), "--version", "test1"],
        cwd=REPO,
        env=server_env(home, registry.uri),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    bento_yaml = yaml.safe_load((home / "bentos" / "whisper" / "test1" / "bento.yaml").read_text())
    assert bento_yaml["args"]["model"] == f"models:/{MODEL_NAME}@production"
    assert any(m["tag"].startswith(f"{MODEL_NAME}:v{registry.version}-") for m in bento_yaml["services"][0]["models"])
    # A v2 bento: the wheel is a file of the project (src/wheels), installed from src/.
    assert "not supported by bento v2" not in build.stderr
    src = home / "bentos" / "whisper" / "test1" / "src"
    assert sorted(p.name for p in src.iterdir()) == ["bentofile.yaml", "wheels", "whisper_bento"]  # no build scratch
    python_env = home / "bentos" / "whisper" / "test1" / "env" / "python"
    assert not (python_env / "requirements.lock.txt").exists()
    _shipped_wheel(src)
    assert _pip_would_install(python_env / "requirements.txt", cwd=src) == {"mlflow-faster-whisper": ["serve"]}
    assert "nvidia" not in (python_env / "requirements.txt").read_text()
    assert "cuda_version" not in (bento_yaml.get("docker") or {}) or bento_yaml["docker"]["cuda_version"] is None

    hello = next(c for c in speech_clips if c.name == "hello_world")
    env = server_env(home, UNREACHABLE_REGISTRY)
    with bentoml_serve("whisper:test1", {}, env, tmp_path / "serve.log", cwd=tmp_path) as server, server.client() as http:
        info = http.get("/info").json()
        assert info["model"]["source"] == "bento"
        assert info["model"]["version"] == registry.version and info["model"]["aliases"] == ["production"]
        assert info["config"]["allowed_languages"] == ["en", "zh"]
        assert info["imports"] == {"torch": False, "transformers": False, "mlflow": False}
        assert "<title>Whisper speech-to-text</title>" in http.get("/").text  # the page ships in the bento
        with open(hello.path, "rb") as f:
            response = http.post("/v1/audio/transcriptions", files={"file": f}, data={"response_format": "text"})
        assert response.status_code == 200 and response.text.strip() == "Hello world."
        with open(hello.path, "rb") as f:
            refused = http.post("/v1/audio/transcriptions", files={"file": f}, data={"language": "fr"})
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "language"
    # BentoML serves a built bento with the arguments it was built with: one it would drop fails the start.
    with pytest.raises(ServerStartError, match=r"would not be applied: compute_type=float32 \(built with int8\)"):
        with bentoml_serve("whisper:test1", {"compute_type": "float32"}, env, tmp_path / "dropped.log", cwd=tmp_path):
            pass


def _shipped_wheel(folder: Path) -> Path:
    """The project's wheel in the bento (``folder``/wheels), checked to carry the flavor, the
    registry, the service and its bentofile."""
    wheels = sorted((folder / "wheels").glob("mlflow_faster_whisper-*.whl"))
    assert len(wheels) == 1, list((folder / "wheels").iterdir())
    names = zipfile.ZipFile(wheels[0]).namelist()
    for module in ("mlflow_faster_whisper/devices.py", "whisper_registry/cli.py", "whisper_bento/service.py",
                   "whisper_bento/bentofile.yaml"):
        assert module in names
    assert not any(n.startswith("tests/") or n.endswith(".pyc") for n in names)
    return wheels[0]


def _pip_would_install(requirements: Path, cwd: Path) -> dict[str, list[str]]:
    """What the image's install step (pip in ``cwd``) resolves the requirements to, offline."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps", "-q", "--report",
             str(report), "-r", str(requirements)],
            cwd=cwd, check=True, capture_output=True,
        )
        installs = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"]: sorted(i.get("requested_extras") or []) for i in installs if i["metadata"]["name"] != "bentoml"}


def test_a_cuda_bento_declares_the_gpu_extra_and_a_cuda_12_image(tmp_path, whisper_tiny_en_ct2):
    registry = make_registry(tmp_path / "registry", whisper_tiny_en_ct2, name="tiny-en")
    home = tmp_path / "bentoml"
    build = subprocess.run(
        [sys.executable, "-m", "whisper_bento.build", "--arg", "model=models:/tiny-en@production",
         "--arg", "device=cuda", "--version", "gpu1"],
        cwd=tmp_path,  # anywhere: the builder finds its checkout
        env=server_env(home, registry.uri),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "Built whisper:gpu1" in build.stdout
    bento = home / "bentos" / "whisper" / "gpu1"
    bento_yaml = yaml.safe_load((bento / "bento.yaml").read_text())
    assert bento_yaml["args"]["device"] == "cuda"
    assert bento_yaml["docker"]["cuda_version"].startswith("12.")
    # docker.cuda_version makes a v1 bento: the wheel ships in env/python/wheels, installed from there.
    wheel = _shipped_wheel(bento / "env" / "python")
    assert _pip_would_install(bento / "env" / "python" / "requirements.txt", cwd=bento / "env" / "python") == {
        "mlflow-faster-whisper": ["gpu", "serve"]}
    assert (bento / "env" / "docker" / "Dockerfile").read_text().count("FROM nvidia/cuda:12.") == 1
    metadata = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info/METADATA").decode()
    assert any(line.startswith("Requires-Dist: nvidia-cublas-cu12") and 'extra == "gpu"' in line for line in metadata.splitlines())


def test_a_bad_configuration_is_refused_before_building(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "whisper_bento.build", "--arg", "model=models:/x@production", "--arg", "device=tpu"],
        env=server_env(tmp_path / "bentoml", None),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 1 and "Invalid service configuration" in build.stderr and "device" in build.stderr
