import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.registry.conftest import clip_rows, write_manifest
from whisper_registry.cli import main


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error message"
    return err[-1]


def test_register_with_adapter_needs_a_base(capsys, tmp_path):
    assert main(["register", "--name", "x", "--adapter", str(tmp_path)]) == 1
    assert _error_line(capsys) == (
        "whisper-registry: error: An adapter needs its base model: add --base BASE (a checkpoint directory or hub id)."
    )


def test_usage_errors_exit_2(capsys):
    assert main(["promote", "tiny", "1"]) == 2  # --to is required
    assert "--to" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_register_prints_versions(mlflow_store, tiny_whisper_hf, capsys):
    code = main(["register", str(tiny_whisper_hf), "--name", "cli", "--quantization", "int8,float32",
                 "--decoding", "beam_size=1", "temperature=0", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "cli version 1: int8" in out and "cli version 2: float32" in out
    assert main(["register", str(tiny_whisper_hf), "--name", "cli", "--decoding", "beam_sise=1"]) == 1
    assert "did you mean 'beam_size'" in _error_line(capsys)


def test_evaluate_bad_rows_then_skip_them(tiny_registered, tmp_path, en_zh_clips, capsys):
    missing = tmp_path / "missing.wav"
    manifest = write_manifest(tmp_path / "m.jsonl", clip_rows(en_zh_clips[:1]) + [{"audio": str(missing), "text": "x"}])
    assert main(["evaluate", "models:/tiny/1", "--dataset", str(manifest), "--no-progress"]) == 1
    line = _error_line(capsys)
    assert f"{missing}: audio file not found" in line and "--skip-bad" in line
    assert main(["evaluate", "models:/tiny/1", "--dataset", str(manifest), "--skip-bad", "--no-progress",
                 "--decoding", "max_new_tokens=4"]) == 0
    out = capsys.readouterr().out
    assert f"skipped {missing}: audio file not found" in out and "n_skipped        1" in out


def test_evaluate_refuses_a_token_id_past_the_vocabulary_before_running(tiny_registered, two_clips_manifest, capsys):
    runs_before = len(MlflowClient().search_runs([r.experiment_id for r in MlflowClient().search_experiments()]))
    assert main(["evaluate", "models:/tiny/1", "--dataset", str(two_clips_manifest), "--no-progress",
                 "--decoding", "suppress_tokens=[99999999]"]) == 1
    line = _error_line(capsys)
    assert "suppress_tokens" in line and "from 0 to" in line
    assert len(MlflowClient().search_runs([r.experiment_id for r in MlflowClient().search_experiments()])) == runs_before


def test_promote_gates_rollback_and_errors(tiny_evaluated, capsys):
    assert main(["promote", "tiny", "1", "--to", "staging", "--gate", "cer<=100"]) == 0
    assert "tiny@staging: none -> 1" in capsys.readouterr().out
    assert main(["promote", "tiny", "2", "--to", "staging", "--gate", "cer<0"]) == 1
    captured = capsys.readouterr()
    assert "gate cer<0" in captured.out and "FAIL" in captured.out
    assert "Not promoting version 2" in captured.err and "stays on version 1" in captured.err
    assert str(MlflowClient().get_registered_model("tiny").aliases["staging"]) == "1"

    assert main(["promote", "tiny", "2", "--to", "staging", "--gate", "bleu>1"]) == 1
    assert "Unknown metric 'bleu'. Valid metrics: wer, cer" in _error_line(capsys)
    assert main(["promote", "tiny", "2", "--to", "prod"]) == 1
    assert "Unknown alias 'prod': use one of staging, production" in _error_line(capsys)
    assert main(["promote", "tiny", "models:/whisper-other/2", "--to", "staging"]) == 1
    assert "is a version of 'whisper-other', not 'tiny'" in _error_line(capsys)
    assert main(["rollback", "tiny", "--alias", "production"]) == 1
    assert "nothing to roll back" in _error_line(capsys)

    assert main(["promote", "tiny", "2", "--to", "staging"]) == 0
    assert main(["rollback", "tiny", "--alias", "staging"]) == 0
    assert "rolled back 2 -> 1" in capsys.readouterr().out


def test_console_script_uses_the_embedded_default(tmp_path, tiny_whisper_hf, two_clips_manifest):
    """`whisper-registry` with MLFLOW_TRACKING_URI unset: ./mlflow.db and ./mlartifacts, no ./mlruns."""
    exe = shutil.which("whisper-registry", path=str(Path(sys.executable).parent)) or shutil.which("whisper-registry")
    if exe is None:
        pytest.skip("the whisper-registry console script is not installed: pip install -e .")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_URI") and k != "MLFLOW_EXPERIMENT_ID"}

    def run(*args):
        return subprocess.run([exe, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    done = run("register", str(tiny_whisper_hf), "--name", "t", "--quantization", "int8",
               "--decoding", "beam_size=1", "temperature=0", "max_new_tokens=8", "--no-progress")
    assert done.returncode == 0, done.stderr
    done = run("evaluate", "models:/t/1", "--dataset", str(two_clips_manifest), "--no-progress")
    assert done.returncode == 0, done.stderr
    done = run("compare", "t")
    assert done.returncode == 0, done.stderr
    assert "int8" in done.stdout and (tmp_path / "t-compare.png").is_file()
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "mlartifacts").is_dir()
    assert not (tmp_path / "mlruns").exists()
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        locations = dict(db.execute("select name, artifact_location from experiments"))
    assert locations["whisper-registry"] == (tmp_path / "mlartifacts").as_uri()
    done = run("promote", "t", "1", "--to", "production", "--gate", "rtf<=-1")
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0, done.stderr
