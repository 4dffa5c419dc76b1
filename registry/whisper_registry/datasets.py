"""Evaluation datasets -> rows of (audio, reference text, optional language).

Two forms:

- a manifest, ``.jsonl`` or ``.csv``: one row per utterance with an audio path (relative paths
  are relative to the manifest), a reference text and optionally a language;
- a Hugging Face ``datasets`` directory written by ``save_to_disk``: an ``Audio`` column (or
  paths) and a text column.

Every row's audio is read and decoded up front, so a missing or undecodable file is reported by
path before any transcription starts. The dataset digest (sha256 over the rows actually used:
audio bytes, reference, language) identifies "the same dataset" across machines and paths.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from mlflow_faster_whisper.audio import decode_audio
from mlflow_faster_whisper.decoding import whisper_languages
from mlflow_faster_whisper.errors import AudioDecodeError
from whisper_registry.errors import DatasetError

AUDIO_KEYS = ("audio", "audio_path", "audio_filepath", "path", "file")
TEXT_KEYS = ("text", "reference", "sentence", "transcription", "transcript")
LANGUAGE_KEYS = ("language", "lang", "locale")


@dataclass(frozen=True)
class Row:
    """One utterance. ``where`` names it in messages and tables (the audio path when there is one)."""

    where: str
    reference: str
    language: Optional[str] = None
    audio_path: Optional[Path] = None
    audio_bytes: Optional[bytes] = field(default=None, repr=False)

    def read_audio(self) -> bytes:
        if self.audio_bytes is not None:
            return self.audio_bytes
        if self.audio_path is None:  # every reader sets one of the two
            raise DatasetError(f"{self.where}: the row has no audio.")
        return self.audio_path.read_bytes()

    def samples(self) -> np.ndarray:
        """16 kHz mono float32 samples."""
        return decode_audio(self.read_audio())


@dataclass(frozen=True)
class BadRow:
    where: str
    reason: str


@dataclass(frozen=True)
class EvaluationDataset:
    """The usable rows, the rows that are not (with why), and the digest of the usable ones."""

    source: str
    name: str
    rows: list[Row]
    bad_rows: list[BadRow]
    digest: str

    @property
    def languages(self) -> list[Optional[str]]:
        return [row.language for row in self.rows]


def load_dataset(path: str | Path, *, split: Optional[str] = None) -> EvaluationDataset:
    """Read a manifest or a ``save_to_disk`` directory and check every row's audio.

    Args:
        path: a ``.jsonl``/``.csv`` manifest or a ``datasets`` directory.
        split: the split of a ``DatasetDict`` (default: "test", or the only split).

    Returns:
        The dataset; rows with missing or undecodable audio (or no reference) are in ``bad_rows``.

    Raises:
        DatasetError: the path does not exist, has an unknown format, lacks the needed columns,
            or holds no rows at all.
    """
    path = Path(path)
    if path.is_dir():
        candidates = list(_hf_rows(path, split))
    elif not path.is_file():
        raise DatasetError(f"The dataset {path} does not exist: pass a .jsonl/.csv manifest or a save_to_disk directory.")
    elif path.suffix.lower() in (".jsonl", ".json"):
        candidates = list(_manifest_rows(path, _jsonl_records(path)))
    elif path.suffix.lower() in (".csv", ".tsv"):
        candidates = list(_manifest_rows(path, _csv_records(path)))
    else:
        raise DatasetError(
            f"Unknown dataset format {path.suffix or path.name!r}: use a .jsonl or .csv manifest "
            "(audio, text, optional language) or a Hugging Face datasets directory saved with save_to_disk."
        )
    if not candidates:
        raise DatasetError(f"The dataset {path} has no rows: add at least one (audio, text) row.")
    rows, bad_rows, row_digests = [], [], []
    for item in candidates:
        if isinstance(item, BadRow):
            bad_rows.append(item)
            continue
        checked = _check_audio(item)
        if isinstance(checked, BadRow):
            bad_rows.append(checked)
        else:
            rows.append(item)
            row_digests.append(checked)
    digest = hashlib.sha256("\n".join(sorted(row_digests)).encode()).hexdigest()
    return EvaluationDataset(str(path.resolve()), path.stem or path.name, rows, bad_rows, digest)


def _check_audio(row: Row) -> BadRow | str:
    """The row's digest when its audio decodes; a BadRow saying why otherwise."""
    try:
        data = row.read_audio()
    except FileNotFoundError:
        return BadRow(row.where, "audio file not found")
    except OSError as exc:
        return BadRow(row.where, f"audio file not readable ({exc.strerror or exc})")
    problem = _probe_audio(data)
    if problem is not None:
        return BadRow(row.where, problem)
    audio_sha = hashlib.sha256(data).hexdigest()
    return hashlib.sha256(f"{audio_sha}\t{row.reference}\t{row.language or ''}".encode()).hexdigest()


def _probe_audio(data: bytes) -> Optional[str]:
    """Why the bytes are not usable audio, or None: the flavor's own decoder and checks, the ones
    the row meets again when it is transcribed (so a row accepted here cannot fail there)."""
    try:
        decode_audio(data)
    except AudioDecodeError as exc:
        return f"audio not decodable: {exc.message}"
    return None


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict | None]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                yield f"{path.name}:{number}", None
                continue
            yield f"{path.name}:{number}", record if isinstance(record, dict) else None


def _csv_records(path: Path) -> Iterator[tuple[str, dict | None]]:
    with open(path, encoding="utf-8", newline="") as f:
        dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
        reader = csv.DictReader(f, dialect=dialect)
        if not reader.fieldnames or not _first(reader.fieldnames, AUDIO_KEYS) or not _first(reader.fieldnames, TEXT_KEYS):
            raise DatasetError(
                f"{path} needs a header row with an audio column ({', '.join(AUDIO_KEYS)}) and a text column ({', '.join(TEXT_KEYS)})."
            )
        for number, record in enumerate(reader, start=2):
            yield f"{path.name}:{number}", record


def _manifest_rows(path: Path, records) -> Iterator[Row | BadRow]:
    base = path.resolve().parent
    for line, record in records:
        if record is None:
            yield BadRow(line, "not a JSON object with audio and text")
            continue
        audio_key, text_key = _first(record, AUDIO_KEYS), _first(record, TEXT_KEYS)
        audio = str(record.get(audio_key) or "").strip() if audio_key else ""
        text = str(record.get(text_key) or "").strip() if text_key else ""
        if not audio:
            yield BadRow(line, f"no audio path (expected one of: {', '.join(AUDIO_KEYS)})")
            continue
        if not text:
            yield BadRow(audio, f"no reference text (expected one of: {', '.join(TEXT_KEYS)})")
            continue
        if (problem := _language_problem(record)) is not None:
            yield BadRow(audio, problem)
            continue
        audio_path = Path(audio).expanduser()
        audio_path = audio_path if audio_path.is_absolute() else base / audio_path
        yield Row(audio, text, _language(record), audio_path=audio_path)


def _hf_rows(path: Path, split: Optional[str]) -> Iterator[Row | BadRow]:
    import datasets as hf

    try:
        loaded = hf.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DatasetError(
            f"{path} is not a Hugging Face dataset saved with save_to_disk ({exc}); pass such a directory or a .jsonl/.csv manifest."
        ) from None
    if isinstance(loaded, hf.DatasetDict):
        loaded = _pick_split(path, loaded, split)
    columns = loaded.column_names
    audio_col = next((c for c, f in loaded.features.items() if isinstance(f, hf.Audio)), None) or _first(columns, AUDIO_KEYS)
    text_col = _first(columns, TEXT_KEYS)
    if not audio_col or not text_col:
        raise DatasetError(
            f"The dataset {path} has columns {', '.join(columns)}; it needs an audio column "
            f"(an Audio feature or one of {', '.join(AUDIO_KEYS)}) and a text column ({', '.join(TEXT_KEYS)})."
        )
    if isinstance(loaded.features[audio_col], hf.Audio):
        # Undecoded: the flavor's decoder reads the bytes, so datasets needs no audio backend.
        loaded = loaded.cast_column(audio_col, hf.Audio(decode=False))
    for index, record in enumerate(loaded):
        yield _hf_row(path, index, record, audio_col, text_col)


def _hf_row(path: Path, index: int, record: dict[str, Any], audio_col: str, text_col: str) -> Row | BadRow:
    audio = record[audio_col]
    text = str(record.get(text_col) or "").strip()
    if isinstance(audio, dict):
        where = audio.get("path") or f"{path.name}[{index}]"
        data, audio_path = audio.get("bytes"), Path(audio["path"]) if audio.get("path") else None
    else:
        where = str(audio or f"{path.name}[{index}]")
        data, audio_path = None, Path(str(audio)) if audio else None
    if not text:
        return BadRow(where, "no reference text")
    if data is None and audio_path is None:
        return BadRow(where, "no audio")
    if (problem := _language_problem(record)) is not None:
        return BadRow(where, problem)
    if audio_path is not None and not audio_path.is_absolute():
        audio_path = path / audio_path
    return Row(str(where), text, _language(record), audio_path=audio_path, audio_bytes=data)


def _pick_split(path: Path, loaded, split: Optional[str]):
    names = list(loaded)
    if split is None:
        split = "test" if "test" in names else (names[0] if len(names) == 1 else None)
    if split not in names:
        raise DatasetError(f"The dataset {path} has splits {', '.join(names)}: name the split to evaluate.")
    return loaded[split]


def _first(keys, candidates) -> Optional[str]:
    lowered = {str(k).lower(): k for k in keys}
    return next((lowered[c] for c in candidates if c in lowered), None)


def _language(record: dict[str, Any]) -> Optional[str]:
    key = _first(record, LANGUAGE_KEYS)
    value = str(record.get(key) or "").strip().lower() if key else ""
    return None if value in ("", "auto") else value


def _language_problem(record: dict[str, Any]) -> Optional[str]:
    language = _language(record)
    if language is None or language in whisper_languages():
        return None
    return f"unknown language {language!r}: use a Whisper language code such as 'en' or 'zh'"
