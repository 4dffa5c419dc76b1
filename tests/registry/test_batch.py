"""Batch transcription: mlflow.pyfunc.spark_udf on a real Spark (local mode), and the resumable
``whisper-registry transcribe`` command, on whisper-tiny.en and the real speech clips."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest

import mlflow_faster_whisper as mfw
from whisper_registry.batch import list_inputs
from whisper_registry.errors import RegistryError
from whisper_registry.normalize import normalizer_for


NAME = "tiny-en"
# Greedy, no fallback, short: the clips in nine languages decode quickly and deterministically.
DECODING = {"beam_size": 1, "temperature": 0.0, "max_new_tokens": 24}
EXE = Path(sys.executable).parent / "whisper-registry"


@pytest.fixture
def registered(mlflow_store, whisper_tiny_en_ct2):
    """whisper-tiny.en registered as version 1, alias production."""
    with mlflow.start_run():
        mfw.log_model(str(whisper_tiny_en_ct2), name="model", registered_model_name=NAME, decoding=DECODING)
    mlflow.MlflowClient().set_registered_model_alias(NAME, "production", "1")
    return f"models:/{NAME}@production"


@pytest.fixture
def audio_dir(tmp_path, speech_clips) -> Path:
    """The 27 real clips as <language>/<name>.wav, plus one corrupt file."""
    root = tmp_path / "audio"
    for clip in speech_clips:
        (root / clip.language).mkdir(parents=True, exist_ok=True)
        shutil.copy(clip.path, root / clip.language / f"{clip.name}.wav")
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    return root


@pytest.fixture(scope="module")
def java():
    """Spark needs Java 17+: `.ci/java.sh` installs it; without it these tests skip (fail in CI)."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        message = "Spark needs Java 17+: run bash .ci/java.sh (or set JAVA_HOME)"
        pytest.fail(message) if os.environ.get("CI") == "true" else pytest.skip(message)


@pytest.fixture(scope="module")
def spark(java):
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master("local[2]").appName("tests")
               .config("spark.ui.enabled", "false").getOrCreate())
    yield session
    session.stop()


def _row_by_row(model_uri: str, paths: list[str], params: dict) -> dict[str, dict]:
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    return {p: pyfunc.predict(pd.DataFrame({"audio": [Path(p).read_bytes()]}), params=params)[0] for p in paths}


@pytest.mark.real_weights
@pytest.mark.spark
def test_spark_udf_on_binary_files_matches_the_pyfunc_row_by_row(registered, audio_dir, spark):
    from pyspark.sql import functions as F

    # No result_type: spark_udf infers the struct from the version's output schema.
    udf = mlflow.pyfunc.spark_udf(spark, registered, env_manager="local", params={"language": "en"})
    files = (spark.read.format("binaryFile").option("recursiveFileLookup", "true").option("pathGlobFilter", "*.wav")
             .load(str(audio_dir)))
    got = (files.repartition(2).select(F.regexp_replace("path", "^file:", "").alias("path"), udf("content").alias("r"))
           .select("path", "r.*").toPandas())
    assert udf.metadata.get_output_schema() is not None
    assert list(got.columns) == ["path", "text", "language", "language_probability", "duration", "segments", "error"]
    assert len(got) == 28

    # Each Python worker loaded the model once, though it ran a task in each of three jobs:
    # spark_udf loads per task, the flavor keeps the worker's model. (Spark ends a worker idle
    # for a minute, so this runs before the slow row-by-row reference below.)
    for _ in range(2):
        files.limit(6).repartition(2).select(udf("content")).collect()

    @F.pandas_udf("string")
    def loads(column: pd.Series) -> pd.Series:  # runs in the same Python workers as spark_udf's
        module = sys.modules.get("mlflow_faster_whisper.loading")
        return pd.Series([f"{os.getpid()}:{getattr(module, 'pyfunc_loads', 0)}"] * len(column))

    per_worker = dict(r[0].split(":") for r in files.repartition(2).select(loads("path")).collect())
    assert set(per_worker.values()) == {"1"}, per_worker

    expected = _row_by_row(registered, list(got["path"]), {"language": "en"})
    corrupt = got[got["path"].str.endswith("corrupt.wav")].iloc[0]
    assert "Could not decode the audio" in corrupt["error"] and corrupt["text"] == ""
    good = got[~got["path"].str.endswith("corrupt.wav")]
    assert (good["error"] == "").all() and (good["language"] == "en").all()
    mismatched = [p for p, text in zip(good["path"], good["text"]) if text != expected[p]["text"]]
    assert not mismatched, mismatched
    # Segments arrive as structs with their times, the same as the pyfunc's.
    first = good.iloc[0]
    assert [s["text"] for s in first["segments"]] == [s["text"] for s in expected[first["path"]]["segments"]]
    assert [round(s["end"], 2) for s in first["segments"]] == [round(s["end"], 2) for s in expected[first["path"]]["segments"]]


def _transcribe(model_uri, source, output, *extra):
    return subprocess.Popen(
        [str(EXE), "transcribe", model_uri, str(source), "--output", str(output), "--no-progress", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _parts(output: Path) -> list[Path]:
    return [p for p in output.glob("*.parquet") if not p.name.startswith((".", "_"))]


@pytest.mark.real_weights
def test_the_command_resumes_after_being_killed_without_duplicating_or_losing_rows(registered, audio_dir, tmp_path):
    output = tmp_path / "out.parquet"
    first = _transcribe(registered, audio_dir, output, "--chunk-size", "4")
    deadline = time.monotonic() + 240
    while len(_parts(output)) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # 20 more files would have to be decoded between two looks to miss the middle
    first.send_signal(signal.SIGKILL)
    first.wait()
    written = pd.read_parquet(output)
    assert 0 < len(written) < 28, "the run should have been killed mid-way"

    second = _transcribe(registered, audio_dir, output, "--chunk-size", "4")
    log = second.communicate(timeout=600)[0]
    assert second.returncode == 0, log
    assert f"{28 - len(written)} files transcribed" in log and f"{len(written)} already in" in log

    rows = pd.read_parquet(output)
    assert sorted(rows["path"]) == list_inputs(audio_dir)  # every file exactly once
    assert (rows["model_version"] == "1").all() and (rows["error"] != "").sum() == 1
    # Its own text, compared as words: case and punctuation are up to the CPU's kernels.
    fox = rows.set_index("path").loc[str(audio_dir / "en" / "quick_brown_fox.wav"), "text"]
    assert normalizer_for("en")(fox) == normalizer_for("en")("The quick brown fox jumps over the lazy dog.")

    run = mlflow.search_runs(filter_string="tags.`whisper_registry.kind` = 'transcribe'", output_format="list")[0]
    assert run.data.params["model_uri"] == f"models:/{NAME}/1"
    assert run.data.params["files_already_done"] == str(len(written))
    assert run.data.metrics["files_done"] == 28 - len(written)
    assert run.data.metrics["files_failed"] == int((written["error"] == "").all())  # corrupt.wav: in one of the two runs
    assert run.data.metrics["files_per_s"] > 0


@pytest.mark.real_weights
@pytest.mark.spark
def test_the_command_on_spark_writes_what_it_writes_here(registered, audio_dir, tmp_path, java, whisper_tiny_en_ct2):
    manifest = tmp_path / "some.txt"
    picked = list_inputs(audio_dir)[::4]  # 7 files, the corrupt one among them
    manifest.write_text("\n".join(os.path.relpath(p, tmp_path) for p in picked) + "\n")
    here, there = tmp_path / "here.parquet", tmp_path / "spark.parquet"
    for output, extra in ((here, ()), (there, ("--spark", "local[2]"))):
        run = _transcribe(registered, manifest, output, "--decoding", "language=en", *extra)
        log = run.communicate(timeout=600)[0]
        assert run.returncode == 0, log
    a = pd.read_parquet(here).sort_values("path").reset_index(drop=True)
    b = pd.read_parquet(there).sort_values("path").reset_index(drop=True)
    assert list(a["path"]) == picked == list(b["path"])
    assert list(a["text"]) == list(b["text"]) and list(a["error"]) == list(b["error"])
    assert (a["error"] != "").sum() == 1

    # Finishing an output with another version is refused, naming the fix.
    mlflow.MlflowClient().copy_model_version(f"models:/{NAME}/1", NAME)  # version 2
    run = _transcribe(f"models:/{NAME}/2", manifest, here)
    log = run.communicate(timeout=300)[0]
    assert run.returncode == 1 and "transcribed by version 1, not 2" in log and "another output" in log

    # A version logged without an output schema (before Spark support) is refused on Spark.
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    with mlflow.start_run():
        mfw.log_model(str(whisper_tiny_en_ct2), name="old", registered_model_name=NAME,
                      signature=ModelSignature(inputs=Schema([ColSpec("binary", "audio")])))  # version 3
    run = _transcribe(f"models:/{NAME}/3", manifest, tmp_path / "old.parquet", "--spark", "local[2]")
    log = run.communicate(timeout=300)[0]
    assert run.returncode == 1 and "has no output schema): register it again, or run without Spark" in log, log


def test_inputs_are_a_folder_a_glob_or_a_manifest(tmp_path):
    for name in ("a.wav", "b.FLAC", "notes.txt", "sub/c.mp3"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    audio = [str(tmp_path / n) for n in ("a.wav", "b.FLAC", "sub/c.mp3")]
    assert list_inputs(tmp_path) == sorted(audio)
    assert list_inputs(str(tmp_path / "**" / "*.mp3")) == [audio[2]]
    (tmp_path / "list.csv").write_text("path,other\na.wav,1\nsub/c.mp3,2\n")
    assert list_inputs(tmp_path / "list.csv") == [audio[0], audio[2]]
    (tmp_path / "bad.jsonl").write_text('{"path": "missing.wav"}\n')
    with pytest.raises(RegistryError, match="do not exist, e.g. .*missing.wav"):
        list_inputs(tmp_path / "bad.jsonl")
    with pytest.raises(RegistryError, match="does not exist"):
        list_inputs(tmp_path / "nowhere")
    with pytest.raises(RegistryError, match="No audio file"):
        list_inputs(str(tmp_path / "*.ogg"))
