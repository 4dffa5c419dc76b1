"""``bentoml build`` makes a self-contained bento: served with no registry reachable."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.bento.conftest import MODEL_NAME, REPO, bentoml_serve, make_registry, server_env

pytestmark = [pytest.mark.server, pytest.mark.real_weights]

UNREACHABLE_REGISTRY = "http://127.0.0.1:9"  # nothing listens on the discard port


def test_built_bento_serves_the_imported_version_without_the_registry(tmp_path, whisper_base_ct2, speech_clips):
    registry = make_registry(tmp_path / "registry", whisper_base_ct2)
    home = tmp_path / "bentoml"
    arg_file = tmp_path / "service.yaml"
    arg_file.write_text(
        yaml.safe_dump(
            {"model": f"models:/{MODEL_NAME}@production", "decoding": {"beam_size": 1}, "allowed_languages": ["en", "zh"]}
        )
    )
    build = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "bento/", "--arg-file", str(arg_file), "--version", "test1"],
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
    assert not (home / "bentos" / "whisper" / "test1" / "env" / "python" / "requirements.lock.txt").exists()

    hello = next(c for c in speech_clips if c.name == "hello_world")
    env = server_env(home, UNREACHABLE_REGISTRY)
    with bentoml_serve("whisper:test1", {}, env, tmp_path / "serve.log", cwd=tmp_path) as server, server.client() as http:
        info = http.get("/info").json()
        assert info["model"]["source"] == "bento"
        assert info["model"]["version"] == registry.version and info["model"]["aliases"] == ["production"]
        assert info["config"]["allowed_languages"] == ["en", "zh"]
        assert info["imports"] == {"torch": False, "transformers": False, "mlflow": False}
        with open(hello.path, "rb") as f:
            response = http.post("/v1/audio/transcriptions", files={"file": f}, data={"response_format": "text"})
        assert response.status_code == 200 and response.text.strip() == "Hello world."
        with open(hello.path, "rb") as f:
            refused = http.post("/v1/audio/transcriptions", files={"file": f}, data={"language": "fr"})
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "language"
