"""Run faster-whisper and shape its output: the one place both the pyfunc and the service use."""

from __future__ import annotations

from typing import Optional

import numpy as np
from pydantic import BaseModel

from mlflow_faster_whisper.decoding import DecodingOptions


class Word(BaseModel):
    start: float
    end: float
    word: str
    probability: float


class Segment(BaseModel):
    id: int
    start: float
    end: float
    text: str
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    temperature: Optional[float] = None
    words: Optional[list[Word]] = None


class Transcription(BaseModel):
    text: str
    language: str
    language_probability: float
    duration: float
    segments: list[Segment]


def stream_segments(model, audio: np.ndarray, options: DecodingOptions, *, batch_size: int = 0):
    """Start decoding; returns (segments iterator, faster-whisper TranscriptionInfo).

    Segments are decoded lazily as the iterator is consumed, which is what lets the service stream.
    With ``batch_size`` > 0 the audio's 30 s windows go through faster-whisper's batched pipeline.
    """
    kwargs = options.to_transcribe_kwargs()
    if batch_size > 0:
        from faster_whisper import BatchedInferencePipeline

        kwargs["batch_size"] = batch_size
        segments, info = BatchedInferencePipeline(model).transcribe(audio, **kwargs)
    else:
        segments, info = model.transcribe(audio, **kwargs)
    return (to_segment(s) for s in segments), info


def transcribe(model, audio: np.ndarray, options: DecodingOptions, *, batch_size: int = 0) -> Transcription:
    """Transcribe decoded 16 kHz samples with the given options."""
    segments, info = stream_segments(model, audio, options, batch_size=batch_size)
    segments = list(segments)
    return Transcription(
        text=join_text(segments),
        language=info.language,
        language_probability=float(info.language_probability),
        duration=float(info.duration),
        segments=segments,
    )


def join_text(segments: list[Segment]) -> str:
    """Whisper segment texts carry their own leading space (none for CJK): join, then strip."""
    return "".join(s.text for s in segments).strip()


def to_segment(s) -> Segment:
    """A faster-whisper segment as our typed, JSON-ready Segment."""
    return Segment(
        id=s.id,
        start=round(float(s.start), 3),
        end=round(float(s.end), 3),
        text=s.text,
        avg_logprob=float(s.avg_logprob),
        no_speech_prob=float(s.no_speech_prob),
        compression_ratio=float(s.compression_ratio),
        temperature=None if s.temperature is None else float(s.temperature),
        words=None if s.words is None else [
            Word(start=round(float(w.start), 3), end=round(float(w.end), 3), word=w.word, probability=float(w.probability))
            for w in s.words
        ],
    )

