"""A start-up error that restarting cannot fix ends ``bentoml serve``: exit code 78, one log line
that names the fix, no traceback, nothing left in the working folder. Real ``bentoml serve``
processes, each started from a fresh empty folder."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bento.conftest import MODEL_NAME, REPO, make_registry, server_env
from devkit.processes import free_port

pytestmark = [pytest.mark.server, pytest.mark.real_weights]

EXIT_CODE = 78  # whisper_bento.startup.EXIT_CODE
# Failure bounds only: an error found by the `bentoml serve` process ends it in seconds; one found
# by a worker (after it verified the model's checksums) a little later.
SERVE_PROCESS_BOUND_S = 60
WORKER_BOUND_S = 180
ERROR_LINE = re.compile(r"^\S+ \[ERROR\] \[[^\]]*\] (?P<message>.*)$", re.MULTILINE)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, whisper_tiny_en_ct2):
    return make_registry(tmp_path_factory.mktemp("startup") / "registry", whisper_tiny_en_ct2)


def _serve_until_exit(args: dict[str, str], env: dict[str, str], cwd: Path, bound_s: float,
                      target: str = "whisper_bento:Transcriber") -> tuple[int, str]:
    """``bentoml serve target --arg ...`` from ``cwd``: its exit code and log, once it has exited;
    a server still running after ``bound_s`` fails the test."""
    command = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(free_port())]
    for key, value in args.items():
        command += ["--arg", f"{key}={value}"]
    log = cwd.parent / f"{cwd.name}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        code = process.wait(timeout=bound_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        text = log.read_text(errors="replace")
        pytest.fail(f"bentoml serve still ran after {bound_s} s ({text.count('Traceback')} tracebacks):\n{text[-3000:]}")
    return code, log.read_text(errors="replace")


def _one_error_line(log: str) -> str:
    """The start-up error, which must be the log's only ERROR line of the failing process and
    come with no traceback."""
    assert "Traceback" not in log, log[-3000:]
    messages = [m["message"] for m in ERROR_LINE.finditer(log)]
    # A worker's failure is followed by the serving process's line saying it stops the server.
    messages = [m for m in messages if not m.startswith("A worker could not start")]
    assert len(messages) == 1, log[-3000:]
    return messages[0]


@pytest.fixture
def workdir(tmp_path) -> Path:
    folder = tmp_path / "cwd"
    folder.mkdir()
    return folder


def test_device_cuda_without_a_gpu_ends_the_start(registry, workdir, tmp_path):
    import ctranslate2

    if ctranslate2.get_cuda_device_count():
        pytest.skip("a CUDA GPU is visible here")
    code, log = _serve_until_exit({"model": f"models:/{MODEL_NAME}@production", "device": "cuda"},
                                  server_env(tmp_path / "bentoml", registry.uri), workdir, SERVE_PROCESS_BOUND_S)
    assert code == EXIT_CODE, log[-3000:]
    message = _one_error_line(log)
    assert "no CUDA GPU is visible" in message and "device='cpu'" in message
    assert list(workdir.iterdir()) == []


def test_built_cuda_bento_on_a_host_without_gpu_ends_the_start(registry, workdir, tmp_path):
    import ctranslate2

    if ctranslate2.get_cuda_device_count():
        pytest.skip("a CUDA GPU is visible here")
    home = tmp_path / "bentoml"
    build = subprocess.run(
        [sys.executable, "-m", "whisper_bento.build", "--arg", f"model=models:/{MODEL_NAME}@production", "--arg",
         "device=cuda", "--version", "cuda1"],
        cwd=REPO, env=server_env(home, registry.uri), capture_output=True, text=True, timeout=600, check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    # Served from the bento's own record: no registry needed, none reachable.
    code, log = _serve_until_exit({}, server_env(home, f"http://127.0.0.1:{free_port()}"), workdir,
                                  SERVE_PROCESS_BOUND_S, target="whisper:cuda1")
    assert code == EXIT_CODE, log[-3000:]
    message = _one_error_line(log)
    assert "no CUDA GPU is visible" in message and "build one with device=cpu" in message
    assert list(workdir.iterdir()) == []


def test_unknown_alias_ends_the_start_naming_the_fix(registry, workdir, tmp_path):
    code, log = _serve_until_exit({"model": f"models:/{MODEL_NAME}@nope"},
                                  server_env(tmp_path / "bentoml", registry.uri), workdir, SERVE_PROCESS_BOUND_S)
    assert code == EXIT_CODE, log[-3000:]
    message = _one_error_line(log)
    assert f"promote a version of '{MODEL_NAME}' to 'nope' first" in message
    assert list(workdir.iterdir()) == []


def test_decoding_defaults_beyond_the_bounds_end_the_start_in_one_line(registry, workdir, tmp_path):
    # The service's default beam_size above its own max_beam_size: found by the worker, once the
    # version's defaults are layered under it.
    code, log = _serve_until_exit({"model": f"models:/{MODEL_NAME}@production", "max_beam_size": "2",
                                   "decoding": '{"beam_size": 4}', "follow_interval_s": "0"},
                                  server_env(tmp_path / "bentoml", registry.uri), workdir, WORKER_BOUND_S)
    assert code == EXIT_CODE, log[-3000:]
    message = _one_error_line(log)
    assert "break the service's bounds" in message and "Lower the default or raise the bound" in message
    assert "A worker could not start" in log


def test_bad_configuration_key_ends_the_start_naming_the_key(registry, workdir, tmp_path):
    code, log = _serve_until_exit({"model": f"models:/{MODEL_NAME}@production", "devcie": "cpu"},
                                  server_env(tmp_path / "bentoml", registry.uri), workdir, SERVE_PROCESS_BOUND_S)
    assert code == EXIT_CODE, log[-3000:]
    message = _one_error_line(log)
    assert "unknown key 'devcie' (did you mean 'device'?)" in message
    assert list(workdir.iterdir()) == []


def test_default_registry_missing_here_is_named_and_not_created(registry, workdir, tmp_path):
    # No MLFLOW_TRACKING_URI: the embedded default, ./mlflow.db of a folder that has none.
    code, log = _serve_until_exit({"model": f"models:/{MODEL_NAME}@production"},
                                  server_env(tmp_path / "bentoml", None), workdir, SERVE_PROCESS_BOUND_S)
    assert code == EXIT_CODE, log[-3000:]
    message = _one_error_line(log)
    assert f"{workdir.resolve() / 'mlflow.db'} does not exist" in message and "MLFLOW_TRACKING_URI" in message
    assert list(workdir.iterdir()) == []  # no empty mlflow.db, no mlartifacts


def test_unreachable_registry_is_retried_then_ends_the_start(workdir, tmp_path):
    registry_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, log = _serve_until_exit({"model": f"models:/{MODEL_NAME}@production"},
                                  server_env(tmp_path / "bentoml", registry_url), workdir, SERVE_PROCESS_BOUND_S)
    assert code == EXIT_CODE, log[-3000:]
    assert len(re.findall(r"\[WARNING\].*did not answer.*trying again in", log)) == 4  # startup.REGISTRY_BACKOFF_S
    message = _one_error_line(log)
    assert "did not answer" in message and "5 times" in message
    assert list(workdir.iterdir()) == []


def test_tampered_artifact_ends_the_server_from_its_worker(registry, workdir, tmp_path):
    home = tmp_path / "bentoml"
    env = server_env(home, registry.uri)
    script = "import sys; from whisper_bento import model_ref; print(model_ref.import_from_registry(sys.argv[1])[0])"
    imported = subprocess.run([sys.executable, "-c", script, f"models:/{MODEL_NAME}@production"],
                              env=env, capture_output=True, text=True, timeout=300, check=False)
    assert imported.returncode == 0, imported.stderr[-3000:]
    name, version = imported.stdout.strip().splitlines()[-1].split(":")
    config = home / "models" / name / version / "mlflow_model" / "model" / "config.json"
    config.write_text(config.read_text() + " ")  # one byte more: its sha256 no longer matches
    code, log = _serve_until_exit({"model": f"models:/{MODEL_NAME}@production", "follow_interval_s": "0"}, env,
                                  workdir, WORKER_BOUND_S)
    assert code == EXIT_CODE, log[-3000:]
    message = _one_error_line(log)
    assert "config.json" in message and "does not match the sha256" in message
    assert "A worker could not start" in log  # the serving process stopped the server: BentoML did not restart it
    assert list(workdir.iterdir()) == []
