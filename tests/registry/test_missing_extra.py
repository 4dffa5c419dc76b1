"""A module that an extra installs, missing: each command says, in one line, which extra and the pip
command. The import is blocked in a real subprocess, as an environment without the extra has it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from devkit.processes import venv_path_env

# A finder first on sys.meta_path that reports the modules absent, exactly as a missing install does.
_BLOCK = textwrap.dedent("""
    import runpy, sys

    class _Absent:
        blocked = set(sys.argv[1].split(","))

        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] in cls.blocked:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _Absent)
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
""")


def _run_without(modules: str, module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = venv_path_env()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{cwd / 'mlflow.db'}"
    return subprocess.run([sys.executable, "-c", _BLOCK, modules, module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _error_lines(stderr: str, prog: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}: error:")]


def test_register_without_the_convert_extra_names_it(tmp_path, tiny_whisper_hf):
    done = _run_without("transformers", "whisper_registry", "register", str(tiny_whisper_hf), "--name", "tiny",
                        "--no-progress", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert _error_lines(done.stderr, "whisper-registry") == [
        "whisper-registry: error: transformers is not installed; it comes with the convert extra: "
        "pip install 'mlflow-faster-whisper[convert]'"
    ], done.stderr[-3000:]


def test_building_a_bento_without_the_serve_extra_names_it(tmp_path):
    done = _run_without("bentoml", "whisper_bento.build", "--arg", "model=models:/tiny@production", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert _error_lines(done.stderr, "whisper_bento.build") == [
        "whisper_bento.build: error: bentoml is not installed; it comes with the serve extra: "
        "pip install 'mlflow-faster-whisper[serve]'"
    ]
