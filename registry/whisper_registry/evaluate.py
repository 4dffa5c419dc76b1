"""Evaluate a registered version on a dataset: error rates with their intervals, speed, a
per-utterance table and a page of the worst utterances.

The evaluation is an MLflow run linked to the version: its metrics are logged against the
version's logged model (``model_id``) and the dataset, its tags name the version, and the
headline results are written back as ``eval.*`` tags on the version for the MLflow UI.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import mlflow
from tqdm.auto import tqdm

import mlflow_faster_whisper as mfw
from mlflow_faster_whisper import constants as c
from mlflow_faster_whisper.decoding import DecodingOptions
from mlflow_faster_whisper.devices import LoadOptions
from mlflow_faster_whisper.loaded import LoadedVersion
from whisper_registry import (
    bootstrap,
    metrics,
    normalize,
    report_html,
    tags,
    tracking,
    versions,
)
from whisper_registry.datasets import BadRow, EvaluationDataset, load_dataset
from whisper_registry.errors import BadRowsError, DatasetError

_logger = logging.getLogger(__name__)

UTTERANCES_TABLE = "eval/utterances.json"
REPORT_PAGE = "eval/report.html"  # the worst utterances aligned, and the figures with their intervals
# Per-utterance counts in the table, so that two versions on one dataset can be compared pairwise.
COUNT_COLUMNS = ("word_errors", "words", "char_errors", "chars")
SKIPPED_TABLE = "eval/skipped_rows.json"
# Metrics copied onto the version as eval.<name> tags (the UI's version page shows them).
VERSION_TAG_METRICS = ("cer", "wer", "rtf", "latency_p50_s", "latency_p95_s", "load_time_s", "n_utterances", "n_skipped")


@dataclass
class EvaluationResult:
    name: str
    version: str
    run_id: str
    dataset_digest: str
    headline: str
    metrics: dict[str, float]
    utterances: list[dict[str, Any]] = field(repr=False, default_factory=list)
    skipped: list[BadRow] = field(default_factory=list)

    @property
    def headline_value(self) -> Optional[float]:
        return self.metrics.get(self.headline)


def evaluate(
    model_uri: str,
    dataset: str | Path,
    *,
    decoding: DecodingOptions | dict | None = None,
    skip_bad: bool = False,
    split: Optional[str] = None,
    load: LoadOptions | Mapping[str, Any] | None = None,
    concurrency: int = 1,
    progress: bool = False,
) -> EvaluationResult:
    """Transcribe every row of ``dataset`` with a registered version and score it.

    Args:
        model_uri: ``models:/<name>/<version>`` or ``models:/<name>@<alias>``.
        dataset: a ``.jsonl``/``.csv`` manifest or a ``save_to_disk`` directory (see ``datasets``).
        decoding: overrides of the version's stored decoding defaults; a row's language applies
            unless these set one.
        skip_bad: skip rows with missing or undecodable audio (recorded in the run) instead of
            refusing the dataset.
        split: the split of a ``DatasetDict``.
        load: how to load the version (``LoadOptions``: device, compute_type, cpu_threads,
            num_workers), the same policy as serving: by default the stored quantization, on a
            GPU when there is one. The run records the device and compute type in force.
        concurrency: utterances in flight at once, decoded through the flavor's engine in shared
            forward passes (as a service under load decodes them). 1, the default, decodes each
            alone: latencies are an utterance's own. Above 1, a latency includes its wait for
            the others, and ``rtf`` is the run's wall time per audio second.
        progress: show a progress bar over utterances on stderr.

    Returns:
        The metrics (wer, cer, rtf, latency_p50_s, latency_p95_s, load_time_s, n_utterances,
        n_skipped, and per-language error rates, each error rate with its bootstrap interval as
        ``<rate>_ci_low``/``<rate>_ci_high``), the run id and the per-utterance rows (with the
        error counts a paired comparison needs). The run also logs ``REPORT_PAGE``, the worst
        utterances aligned word by word.

    Raises:
        ModelNotFoundError: the URI names no registered version.
        BadRowsError: rows with unusable audio and ``skip_bad`` is False; nothing was run.
        DatasetError: the dataset cannot be read, or no usable row is left.
        DecodingOptionsError: invalid overrides, or ones the model cannot decode with; no run is
            started.
    """
    setup = tracking.configure()
    mv = versions.from_uri(model_uri)
    name, version = mv.name, str(mv.version)
    version_uri = f"models:/{name}/{version}"
    overrides = DecodingOptions.parse(decoding).explicit()
    data = load_dataset(dataset, split=split)
    if data.bad_rows and not skip_bad:
        raise BadRowsError(data.bad_rows)
    if not data.rows:
        raise DatasetError(f"No usable rows are left in {data.source}: every row's audio is missing or undecodable.")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    stored = mfw.flavor_config(version_uri).get(c.DECODING) or {}
    headline = metrics.headline_metric(data.languages)
    started = time.perf_counter()
    load = LoadOptions.parse(load)
    model = mfw.load_model(version_uri, **load.model_dump())
    load_time = time.perf_counter() - started
    loaded = LoadedVersion(model, stored, batch_size=concurrency, max_requests=concurrency)
    loaded.resolve(overrides)  # checked before a run is started for it
    with mlflow.start_run(experiment_id=setup.experiment_id, run_name=f"evaluate {name} v{version}") as run:
        mlflow.set_tags(
            {
                tags.RUN_KIND: "evaluate",
                tags.RUN_MODEL_NAME: name,
                tags.RUN_MODEL_VERSION: version,
                tags.RUN_MODEL_URI: version_uri,
                tags.RUN_DATASET_DIGEST: data.digest,
            }
        )
        mlflow.log_params(
            {
                "model_uri": version_uri,
                "dataset": data.source,
                "dataset_digest": data.digest,
                "decoding": json.dumps({**stored, **overrides}, sort_keys=True),
                "device": model.model.device,
                "compute_type": model.model.compute_type,  # in force, after any fallback
                "cpu_threads": load.cpu_threads,
                "concurrency": concurrency,
                "headline": headline,
            }
        )
        started = time.perf_counter()
        scored, table = _transcribe_all(loaded, data, overrides, progress, concurrency)
        wall = time.perf_counter() - started if concurrency > 1 else None
        measured = metrics.Measurements(scored, load_time_s=load_time, n_skipped=len(data.bad_rows), wall_s=wall)
        results = metrics.compute_all(measured)
        intervals = metrics.compute_intervals(measured)
        results.update(metrics.interval_figures(intervals))
        mlflow.log_metrics(results, model_id=versions.logged_model_id(mv), dataset=_mlflow_dataset(data))
        mlflow.log_table(_columns(table), UTTERANCES_TABLE)
        mlflow.log_text(report_html.render(f"{name} version {version} on {data.name}", results, intervals, table), REPORT_PAGE)
        rules = _number_rules(data.languages + [row["language"] for row in table])
        mlflow.set_tag(tags.EVAL_NUMBER_RULES, rules)
        if data.bad_rows:
            mlflow.log_table({"where": [b.where for b in data.bad_rows], "reason": [b.reason for b in data.bad_rows]}, SKIPPED_TABLE)
            mlflow.set_tag(tags.RUN_SKIPPED_ROWS, "; ".join(b.where for b in data.bad_rows)[:5000])
        run_id = run.info.run_id
    report = f"{run.info.artifact_uri.rstrip('/')}/{REPORT_PAGE}"
    _tag_version(name, version, results, headline, data, run_id, {tags.EVAL_NUMBER_RULES: rules, tags.EVAL_REPORT: report})
    return EvaluationResult(name, version, run_id, data.digest, headline, results, table, list(data.bad_rows))


def _transcribe_all(loaded: LoadedVersion, data: EvaluationDataset, overrides: dict, progress: bool, concurrency: int):
    """Every row through the engine, ``concurrency`` at a time; scored rows in dataset order."""

    def requests():
        for row in data.rows:
            language_layer = {"language": row.language} if row.language and "language" not in overrides else {}
            yield row.samples(), loaded.resolve(language_layer, overrides)

    engine = loaded.engine
    scored, table = [], []
    try:
        outcomes = engine.transcribe_many(requests(), window=concurrency)
        for row, (ticket, hypothesis) in tqdm(
            zip(data.rows, outcomes, strict=False), total=len(data.rows), desc="evaluate", unit="utterance", disable=not progress
        ):
            if isinstance(hypothesis, BaseException):
                raise hypothesis
            latency, duration = ticket.decode_s, hypothesis.duration
            language = row.language or hypothesis.language
            utterance = metrics.score_utterance(row.reference, hypothesis.text, language, duration_s=duration, latency_s=latency)
            scored.append(utterance)
            table.append(
                {
                    "audio": row.where,
                    "language": language,
                    "reference": row.reference,
                    "hypothesis": hypothesis.text,
                    "reference_normalized": utterance.reference,
                    "hypothesis_normalized": utterance.hypothesis,
                    "errors": utterance.errors,
                    **{column: getattr(utterance, column) for column in COUNT_COLUMNS},
                    "unit": "char" if utterance.by_characters else "word",
                    "error_rate": utterance.error_rate,
                    "duration_s": round(duration, 3),
                    "latency_s": round(latency, 4),
                    "rtf": round(latency / duration, 4),
                }
            )
    finally:
        engine.close()
    return scored, table


def _tag_version(
    name: str, version: str, results: dict[str, float], headline: str, data: EvaluationDataset, run_id: str, extra: dict[str, str]
) -> None:
    client = tracking.client()
    values = {f"{tags.EVAL_PREFIX}{k}": _fmt(v) for k, v in results.items() if k in VERSION_TAG_METRICS or k.startswith(("cer_", "wer_"))}
    values.update(
        {
            tags.EVAL_HEADLINE: headline,
            tags.EVAL_DATASET: data.digest,
            tags.EVAL_DATASET_NAME: data.name,
            tags.EVAL_RUN_ID: run_id,
            tags.EVAL_TIME: datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **extra,
        }
    )
    # Results of an earlier evaluation on another dataset must not survive next to these.
    for stale in client.get_model_version(name, version).tags:
        if stale.startswith(tags.EVAL_PREFIX) and stale not in values:
            client.delete_model_version_tag(name, version, stale)
    for key, value in values.items():
        client.set_model_version_tag(name, version, key, value)


def utterance_counts(run_id: str) -> Optional[dict[str, list]]:
    """The per-utterance error counts an evaluation run logged (``audio`` and ``COUNT_COLUMNS``).

    None when the run logged no counts (an evaluation by an older version of this package).
    """
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="whisper-registry-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=UTTERANCES_TABLE, dst_path=tmp)
        except (MlflowException, OSError):
            return None
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    columns = table.get("columns", [])
    if not all(c in columns for c in ("audio", *COUNT_COLUMNS)):
        return None
    return {c: [row[columns.index(c)] for row in table["data"]] for c in ("audio", "language", *COUNT_COLUMNS)}


def paired_difference(metric: str, run_id: str, baseline_run_id: str) -> Optional[bootstrap.Interval]:
    """``metric`` (``wer`` or ``cer``) of one evaluation run minus that of another on the same
    utterances, with a paired bootstrap interval: the same draws of utterances for both.

    Returns:
        The interval, or None when either run logged no per-utterance counts.

    Raises:
        ValueError: the runs did not score the same utterances in the same order.
    """
    mine, theirs = utterance_counts(run_id), utterance_counts(baseline_run_id)
    if mine is None or theirs is None:
        return None
    if mine["audio"] != theirs["audio"]:
        raise ValueError(f"Runs {run_id} and {baseline_run_id} did not score the same utterances in the same order.")
    if metric == "wer":  # over the utterances of languages written with spaces, as the rate itself is
        keep = [i for i, lang in enumerate(mine["language"]) if not normalize.is_character_language(lang)]
        errors, units = "word_errors", "words"
    else:
        keep, errors, units = list(range(len(mine["audio"]))), "char_errors", "chars"
    if not keep:
        return None

    def pick(counts: dict[str, list], column: str) -> list:
        return [counts[column][i] for i in keep]

    return bootstrap.paired_difference_interval(pick(mine, errors), pick(mine, units), pick(theirs, errors), pick(theirs, units))


def _number_rules(languages) -> str:
    """``"en=whisper-english zh=cn2an ja=none"``: each language's number rule, "none" where words
    and digits stay different (a number written the other way counts as an error there)."""
    codes = sorted({lang for lang in languages if lang})
    missing = [code for code in codes if normalize.number_rule(code) is None]
    if missing:
        _logger.warning(
            "No number rule for %s: numbers written in words on one side and digits on the other count as errors there.", ", ".join(missing)
        )
    return " ".join(f"{code}={normalize.number_rule(code) or 'none'}" for code in codes) or "none"


def _mlflow_dataset(data: EvaluationDataset):
    import pandas as pd

    frame = pd.DataFrame(
        {
            "audio": [r.where for r in data.rows],
            "reference": [r.reference for r in data.rows],
            "language": [r.language or "" for r in data.rows],
        }
    )
    # MLflow stores at most 36 characters of a dataset digest.
    with warnings.catch_warnings():
        # A local path matches several of MLflow's source types; it picks the right one but warns.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return mlflow.data.from_pandas(frame, source=data.source, name=data.name, digest=data.digest[:32])  # type: ignore[attr-defined]


def _columns(table: list[dict[str, Any]]) -> dict[str, list]:
    return {key: [row[key] for row in table] for key in table[0]} if table else {}


def _fmt(value: float) -> str:
    return f"{value:.6g}"
