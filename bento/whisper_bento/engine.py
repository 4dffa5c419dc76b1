"""Decode a batch of requests.

A batch of one is decoded exactly as ``mlflow_faster_whisper.transcription.transcribe`` does
(sequential long-form decoding, temperature fallback): a request alone is never slowed down or
changed by batching. Several short requests with the same options are decoded together: their
audio is laid end to end and each request becomes one window (``clip_timestamps``) of one call
to faster-whisper's ``BatchedInferencePipeline``, so their encoder and decoder passes share
batches. Requests the batched pipeline would decode differently (long audio, VAD, a prefix) are
decoded on their own in the same batch.
"""

from __future__ import annotations

import ctypes
import functools
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import numpy as np

from mlflow_faster_whisper import transcription
from mlflow_faster_whisper.constants import SAMPLE_RATE
from mlflow_faster_whisper.decoding import DecodingOptions
from mlflow_faster_whisper.transcription import Segment, Transcription

@dataclass(frozen=True)
class Job:
    """One request in a batch: 16 kHz samples and its fully resolved options."""

    audio: np.ndarray
    options: DecodingOptions


def decode_batch(model, jobs: list[Job], *, batch_size: int) -> list[Transcription]:
    """Transcribe every job; results in job order."""
    if len(jobs) == 1:
        return [transcription.transcribe(model, jobs[0].audio, jobs[0].options)]
    results: list[Optional[Transcription]] = [None] * len(jobs)
    groups: dict[str, list[tuple[int, Job, float]]] = defaultdict(list)
    for index, job in enumerate(jobs):
        if not _fits_one_window(job):
            results[index] = transcription.transcribe(model, job.audio, job.options)
            continue
        options, probability = job.options, 1.0
        if not model.model.is_multilingual:  # English-only: faster-whisper's transcribe forces "en"
            options = DecodingOptions.layered(options, {"language": "en", "task": "transcribe"})
        elif options.language is None:  # one pipeline call has one language: detect per request
            language, probability, _ = model.detect_language(job.audio)
            options = DecodingOptions.layered(options, {"language": language})
        groups[options.model_dump_json()].append((index, Job(job.audio, options), probability))
    for members in groups.values():
        if len(members) == 1:
            index, job, _ = members[0]
            results[index] = transcription.transcribe(model, job.audio, job.options)
            continue
        for (index, _, probability), result in zip(members, _decode_together(model, members, batch_size)):
            results[index] = result.model_copy(update={"language_probability": float(probability)})
    return results  # type: ignore[return-value]


def _fits_one_window(job: Job) -> bool:
    window = job.options.chunk_length or 30
    return (
        len(job.audio) <= window * SAMPLE_RATE
        and not job.options.vad_filter
        and job.options.prefix is None
    )


def _decode_together(model, members: list[tuple[int, Job, float]], batch_size: int) -> list[Transcription]:
    from faster_whisper import BatchedInferencePipeline

    options = members[0][1].options
    offsets, position = [], 0
    for _, job, _ in members:
        offsets.append(position)
        position += len(job.audio)
    audio = np.concatenate([job.audio for _, job, _ in members])
    clips = [
        {"start": start / SAMPLE_RATE, "end": (start + len(job.audio)) / SAMPLE_RATE}
        for start, (_, job, _) in zip(offsets, members)
    ]
    segments, info = BatchedInferencePipeline(model).transcribe(
        audio, clip_timestamps=clips, batch_size=batch_size, **options.to_transcribe_kwargs()
    )
    seeks = [int(start / SAMPLE_RATE * model.frames_per_second) for start in offsets]
    per_job: list[list[Segment]] = [[] for _ in members]
    for raw in segments:
        # Each clip is one window; faster-whisper tags a window's segments with its start frame.
        owner = min(range(len(seeks)), key=lambda i: abs(seeks[i] - raw.seek))
        shift = offsets[owner] / SAMPLE_RATE
        per_job[owner].append(_shifted(transcription.to_segment(raw), shift, len(per_job[owner])))
    return [
        Transcription(
            text=transcription.join_text(segs),
            language=info.language,
            language_probability=1.0,
            duration=round(len(job.audio) / SAMPLE_RATE, 3),
            segments=segs,
        )
        for (_, job, _), segs in zip(members, per_job)
    ]


def _shifted(segment: Segment, shift: float, index: int) -> Segment:
    """A segment with times relative to its own request's audio."""
    words = None
    if segment.words is not None:
        words = [w.model_copy(update={"start": round(w.start - shift, 3), "end": round(w.end - shift, 3)}) for w in segment.words]
    return segment.model_copy(
        update={
            "id": index + 1,
            "start": round(max(0.0, segment.start - shift), 3),
            "end": round(max(0.0, segment.end - shift), 3),
            "words": words,
        }
    )


def release_free_memory() -> None:
    """Give the malloc heap's free pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    A batch frees its features, encoder output and beams, but glibc keeps those pages mapped, so
    the worker's RSS would read as its largest batch so far rather than what it holds.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
