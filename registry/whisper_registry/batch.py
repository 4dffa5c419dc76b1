"""Transcribe a folder, glob or manifest of audio files with a registered version, into Parquet.

``whisper-registry transcribe`` runs it. The work goes in chunks of files; each chunk's results
land in the output directory as one Parquet file, written whole or not at all, so a run killed at
any point keeps every finished chunk and a rerun skips the files already in the output. A file
that cannot be read or decoded gets a row with its ``error``; it never stops the job.

Two runners do the chunks, with the same model code (the version's pyfunc, whose ``predict``
decodes the rows of a call through the flavor's engine in shared forward passes):

- local (the default): this process loads the version once and calls ``predict`` per chunk;
- Spark (``spark="local[4]"``, ``"spark://host:7077"``, ...): each chunk is read with Spark's
  ``binaryFile`` source and transcribed by ``mlflow.pyfunc.spark_udf`` on the executors, which
  append the results to the output themselves. The driver holds file paths and counts only.

Each run is an MLflow run with the version, the options, the counts and the throughput. The output
records the version that wrote each row; finishing an output with another version is refused.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlflow
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.models import Model
from mlflow.types.schema import Array, DataType, Object
from tqdm.auto import tqdm

from mlflow_faster_whisper.decoding import DecodingOptions
from mlflow_faster_whisper.devices import LoadOptions
from mlflow_faster_whisper.saving import output_schema
from mlflow_faster_whisper.wrapper import error_row
from whisper_registry import tags, tracking, versions
from whisper_registry.errors import RegistryError

_logger = logging.getLogger(__name__)

PATH_COLUMN = "path"
VERSION_COLUMN = "model_version"
# What a folder is searched for (lower-case suffixes); a glob or a manifest may name any file.
AUDIO_SUFFIXES = frozenset(".wav .flac .mp3 .m4a .aac .ogg .oga .opus .webm .mp4 .mkv .wma .aif .aiff .amr .3gp".split())
MANIFEST_SUFFIXES = (".txt", ".csv", ".jsonl")
DEFAULT_CHUNK = 64


@dataclass
class BatchResult:
    """What a ``transcribe_files`` run did. ``skipped`` files were already in the output."""

    name: str
    version: str
    run_id: str
    output: Path
    total: int
    skipped: int
    done: int
    failed: int
    audio_seconds: float
    wall_s: float

    @property
    def files_per_s(self) -> float:
        return self.done / self.wall_s if self.wall_s > 0 else 0.0


def transcribe_files(
    model_uri: str,
    source: str | Path,
    output: str | Path,
    *,
    decoding: DecodingOptions | dict | None = None,
    spark: Optional[str] = None,
    chunk_size: int = DEFAULT_CHUNK,
    load: LoadOptions | dict | None = None,
    progress: bool = False,
) -> BatchResult:
    """Transcribe every audio file of ``source`` not yet in ``output`` with a registered version.

    Args:
        model_uri: ``models:/<name>/<version>`` or ``models:/<name>@<alias>``; an alias is resolved
            once, at the start: the whole run uses that version.
        source: a folder (searched recursively for audio files), a glob (``"/data/**/*.flac"``),
            or a manifest: ``.txt`` (one path per line) or ``.csv``/``.jsonl`` with a ``path``
            (or ``audio``) column; relative paths are read from the manifest's folder.
        output: a directory of Parquet files (created): one row per file with ``path``,
            ``model_version``, text, language, language_probability, duration, segments, error.
        decoding: overrides of the version's stored decoding options.
        spark: a Spark master URL to run on Spark (needs pyspark and Java 17+); None runs here.
        chunk_size: files per chunk: per ``predict`` call locally, per Spark job on Spark.
        load: how each worker loads the version (``LoadOptions``).
        progress: a progress bar over files on stderr.

    Raises:
        ModelNotFoundError: the URI names no registered version.
        RegistryError: no input files, an output written by another version, or Spark missing.
        DecodingOptionsError: invalid decoding options (nothing is run).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, not {chunk_size}")
    setup = tracking.configure()
    mv = versions.from_uri(model_uri)
    name, version = mv.name, str(mv.version)
    version_uri = f"models:/{name}/{version}"
    options = DecodingOptions.parse(decoding)
    load_config = LoadOptions.parse(load).model_dump(exclude_unset=True)  # what was asked, validated
    paths = list_inputs(source)
    output = Path(output).resolve()
    finished = finished_paths(output, version)
    todo = [p for p in paths if p not in finished]
    runner = (
        _SparkRunner(spark, version_uri, options.as_params(), load_config)
        if spark
        else _LocalRunner(version_uri, options.as_params(), load_config)
    )
    counts = {"done": 0, "failed": 0}
    audio_seconds = 0.0
    started = time.perf_counter()
    try:
        with mlflow.start_run(experiment_id=setup.experiment_id, run_name=f"transcribe {name} v{version}") as run:
            mlflow.set_tags(
                {
                    tags.RUN_KIND: "transcribe",
                    tags.RUN_MODEL_NAME: name,
                    tags.RUN_MODEL_VERSION: version,
                    tags.RUN_MODEL_URI: version_uri,
                }
            )
            mlflow.log_params(
                {
                    "model_uri": version_uri,
                    "requested_uri": model_uri,
                    "input": str(source),
                    "output": str(output),
                    "runner": f"spark {spark}" if spark else "local",
                    "decoding": json.dumps(options.explicit(), sort_keys=True),
                    "load": json.dumps(load_config, sort_keys=True),
                    "chunk_size": chunk_size,
                    "files_total": len(paths),
                    "files_already_done": len(finished),
                }
            )
            output.mkdir(parents=True, exist_ok=True)
            bar = tqdm(total=len(todo), desc="transcribe", unit="file", disable=not progress)
            known = _parts(output)
            for step, start in enumerate(range(0, len(todo), chunk_size)):
                chunk = todo[start : start + chunk_size]
                runner.write(chunk, output, version)
                now = _parts(output)  # one listing a chunk: what it wrote is what is new
                summary = _read_parts(now - known, ["error", "duration"])
                known = now
                failed = int((summary["error"].fillna("") != "").sum())
                counts["done"] += len(summary)
                counts["failed"] += failed
                audio_seconds += float(summary["duration"].fillna(0).sum())
                mlflow.log_metrics({"files_done": counts["done"], "files_failed": counts["failed"]}, step=step)
                bar.update(len(chunk))
                bar.set_postfix(failed=counts["failed"])
            bar.close()
            wall = time.perf_counter() - started
            mlflow.log_metrics(
                {
                    "wall_s": wall,
                    "audio_seconds": audio_seconds,
                    "files_per_s": counts["done"] / wall if wall > 0 else 0.0,
                    "audio_s_per_s": audio_seconds / wall if wall > 0 else 0.0,
                }
            )
            run_id = run.info.run_id
    finally:
        runner.close()
    return BatchResult(
        name,
        version,
        run_id,
        output,
        len(paths),
        len(finished),
        counts["done"],
        counts["failed"],
        audio_seconds,
        time.perf_counter() - started,
    )


# ------------------------------------------------------------------------------------------ input


def list_inputs(source: str | Path) -> list[str]:
    """The absolute paths ``source`` names, sorted and without duplicates (see ``transcribe_files``).

    Raises:
        RegistryError: the source does not exist, names no file, or a manifest names missing files.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES]
        what = f"folder {path} (searched for {', '.join(sorted(AUDIO_SUFFIXES))})"
    elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        found = _manifest_paths(path)
        missing = [p for p in found if not p.is_file()]
        if missing:
            raise RegistryError(
                f"{len(missing)} file(s) of manifest {path} do not exist, e.g. {missing[0]}; "
                "fix or remove those lines (relative paths are read from the manifest's folder)."
            )
        what = f"manifest {path}"
    elif glob.has_magic(text):
        found = [Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True) if os.path.isfile(p)]
        what = f"glob {text!r}"
    elif path.is_file():
        raise RegistryError(
            f"{path} is neither a folder nor a manifest ({', '.join(MANIFEST_SUFFIXES)}); "
            "to transcribe one file, give a glob or a manifest naming it."
        )
    else:
        raise RegistryError(f"{text} does not exist: give a folder, a glob or a manifest of audio files.")
    if not found:
        raise RegistryError(f"No audio file in {what}.")
    return sorted({str(p.resolve()) for p in found})


def _manifest_paths(manifest: Path) -> list[Path]:
    if manifest.suffix.lower() == ".txt":
        names = [line.strip() for line in manifest.read_text(encoding="utf-8").splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
    else:
        frame = pd.read_csv(manifest, dtype=str) if manifest.suffix.lower() == ".csv" else pd.read_json(manifest, lines=True, dtype=False)
        column = next((c for c in (PATH_COLUMN, "audio") if c in frame.columns), None)
        if column is None:
            raise RegistryError(f"Manifest {manifest} needs a 'path' (or 'audio') column; it has {list(frame.columns)}.")
        names = [str(n) for n in frame[column].dropna()]
    return [p if p.is_absolute() else manifest.parent / p for p in map(Path, names)]


# ----------------------------------------------------------------------------------------- output


def finished_paths(output: Path, version: str) -> set[str]:
    """The files ``output`` already holds a row for.

    Raises:
        RegistryError: the output holds rows of another version.
    """
    if not output.is_dir():
        return set()
    table = _read_parts(_parts(output), [PATH_COLUMN, VERSION_COLUMN])
    others = sorted(set(table[VERSION_COLUMN]) - {version})
    if others:
        raise RegistryError(
            f"{output} holds rows transcribed by version {', '.join(others)}, not {version}: finish it with "
            f"that version (models:/<name>/{others[0]}) or write to another output."
        )
    return set(table[PATH_COLUMN])


def _parts(output: Path) -> set[Path]:
    """The finished Parquet files of the output. Files being written start with '.' or '_', as
    Spark's do (its ``_temporary``), and readers skip them."""
    return {p for p in output.rglob("*.parquet") if not any(part.startswith((".", "_")) for part in p.relative_to(output).parts)}


def _read_parts(parts: set[Path], columns: list[str]) -> pd.DataFrame:
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    return pd.concat([pq.read_table(p, columns=columns).to_pandas() for p in sorted(parts)], ignore_index=True)


def arrow_schema() -> pa.Schema:
    """The output's columns as Arrow types: the same as Spark writes from the pyfunc's output schema."""

    def arrow(spec_type):
        if isinstance(spec_type, Array):
            return pa.list_(arrow(spec_type.dtype))
        if isinstance(spec_type, Object):
            return pa.struct([(p.name, arrow(p.dtype)) for p in spec_type.properties])
        return {DataType.string: pa.string(), DataType.double: pa.float64(), DataType.long: pa.int64(), DataType.boolean: pa.bool_()}[
            spec_type
        ]

    columns = [(PATH_COLUMN, pa.string()), (VERSION_COLUMN, pa.string())]
    return pa.schema(columns + [(spec.name, arrow(spec.type)) for spec in output_schema().inputs])


def _write_part(rows: list[dict[str, Any]], output: Path) -> None:
    """Write one chunk's rows as a new Parquet file, atomically (a hidden file, then a rename)."""
    name = f"part-{uuid.uuid4().hex}.parquet"
    hidden = output / f".{name}"
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema()), hidden)
    os.replace(hidden, output / name)


# ---------------------------------------------------------------------------------------- runners


class _LocalRunner:
    """This process: the version's pyfunc, one ``predict`` per chunk."""

    def __init__(self, version_uri: str, params: dict[str, Any], load: dict[str, Any]):
        self.model = mlflow.pyfunc.load_model(version_uri, model_config=load or None)
        self.params = params

    def write(self, paths: list[str], output: Path, version: str) -> None:
        contents, unreadable = [], {}
        for path in paths:
            try:
                contents.append(Path(path).read_bytes())
            except OSError as exc:
                unreadable[path] = f"cannot read {path}: {exc.strerror or exc}"
        results = iter(self.model.predict(pd.DataFrame({"audio": contents}), params=self.params) if contents else [])
        rows = [
            {PATH_COLUMN: path, VERSION_COLUMN: version, **(error_row(unreadable[path]) if path in unreadable else next(results))}
            for path in paths
        ]
        _write_part(rows, output)

    def close(self) -> None:
        pass


class _SparkRunner:
    """Spark: each chunk is a job that reads the files with ``binaryFile`` and transcribes them
    with ``mlflow.pyfunc.spark_udf``; the executors append their rows to the output."""

    def __init__(self, master: str, version_uri: str, params: dict[str, Any], load: dict[str, Any]):
        if Model.load(version_uri).get_output_schema() is None:
            # Its workers would run the flavor code stored with it, which predates Spark support.
            raise RegistryError(
                f"{version_uri} was logged before batch transcription on Spark (it has no output "
                "schema): register it again, or run without Spark."
            )
        if not shutil.which("java") and not os.environ.get("JAVA_HOME"):
            raise RegistryError(
                "Spark needs Java 17 or newer: install it (Debian: apt-get install openjdk-17-jre-headless) or set JAVA_HOME."
            )
        try:
            from pyspark.sql import SparkSession
        except ImportError as exc:
            raise RegistryError("Running on Spark needs pyspark: pip install 'mlflow-faster-whisper[spark]'.") from exc
        if master.startswith("local"):
            # Workers on this machine run this interpreter (this virtualenv); a cluster's come from
            # PYSPARK_PYTHON, as Spark documents.
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        self.spark = (
            SparkSession.builder.master(master)
            .appName("whisper-registry transcribe")
            .config("spark.ui.showConsoleProgress", "false")
            .getOrCreate()
        )
        slots = self.spark.sparkContext.defaultParallelism
        if master.startswith("local") and "cpu_threads" not in load:
            # One model per Python worker: share this machine's cores between them.
            load = {**load, "cpu_threads": max(1, (os.cpu_count() or 1) // slots)}
        self.slots = slots
        self.udf = mlflow.pyfunc.spark_udf(self.spark, version_uri, env_manager="local", params=params or None, model_config=load or None)

    def write(self, paths: list[str], output: Path, version: str) -> None:
        from pyspark.sql import functions as F

        files = self.spark.read.format("binaryFile").load(paths)
        result = (
            files.repartition(min(self.slots, len(paths)))
            .select(
                F.regexp_replace(PATH_COLUMN, "^file:", "").alias(PATH_COLUMN),
                F.lit(version).alias(VERSION_COLUMN),
                self.udf("content").alias("result"),
            )
            .select(PATH_COLUMN, VERSION_COLUMN, "result.*")
        )
        result.write.mode("append").parquet(str(output))

    def close(self) -> None:
        self.spark.stop()
