"""Run faster-whisper and shape its output: the one place both the pyfunc and the service use."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Optional

from pydantic import BaseModel

from mlflow_faster_whisper.batching import BatchPolicy
from mlflow_faster_whisper.decoding import DecodingOptions
from mlflow_faster_whisper.errors import DecodingOptionsError

if TYPE_CHECKING:  # the result types are read where numpy is not imported (the serve process)
    import numpy as np

# Whisper's vocabulary ends with the timestamp tokens <|0.00|> .. <|30.00|> (0.02 s apart) right
# after <|notimestamps|>: every model's vocabulary size follows from its tokenizer.
_TIMESTAMP_TOKENS = 1501


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


def check_options(model, options: DecodingOptions) -> None:
    """Refuse options that fit the option bounds but not this model, before they reach CTranslate2.

    A token id past the vocabulary is read out of bounds by CTranslate2 (it corrupts the output
    or kills the process), and a ``max_new_tokens`` that does not fit beside the longest prompt
    these options can build fails faster-whisper mid-transcription, windows into a long file.

    Raises:
        DecodingOptionsError: naming the field and the range this model accepts.
    """
    tokenizer = model.hf_tokenizer
    vocabulary = tokenizer.token_to_id("<|notimestamps|>") + 1 + _TIMESTAMP_TOKENS
    outside = [t for t in options.suppress_tokens if t >= vocabulary]
    if outside:
        raise DecodingOptionsError(
            f"suppress_tokens: token id {outside[0]} is outside this model's vocabulary; "
            f"use ids from 0 to {vocabulary - 1}, or -1 for the model's default set.",
            field="suppress_tokens",
        )
    if options.max_new_tokens is None:
        return
    longest = _longest_prompt(model, options)
    if longest + options.max_new_tokens > model.max_length:
        raise DecodingOptionsError(
            f"max_new_tokens: {options.max_new_tokens} does not fit; with these options the prompt can "
            f"take {longest} of the model's {model.max_length} tokens per window, so use at most "
            f"{model.max_length - longest} (or a shorter initial_prompt, hotwords or prefix, or "
            "condition_on_previous_text=false).",
            field="max_new_tokens",
        )


def _longest_prompt(model, options: DecodingOptions) -> int:
    """The most tokens faster-whisper's ``get_prompt`` can build for one window with these options."""
    kept = model.max_length // 2 - 1  # previous text, hotwords and prefix are each cut to this

    def tokens(text: Optional[str]) -> int:
        if not text:
            return 0
        return min(len(model.hf_tokenizer.encode(" " + text.strip(), add_special_tokens=False).ids), kept)

    previous = kept if options.condition_on_previous_text else tokens(options.initial_prompt)
    hotwords = 0 if options.prefix else tokens(options.hotwords)
    prefix = tokens(options.prefix) + (0 if options.without_timestamps or not options.prefix else 1)
    start = 3 if model.model.is_multilingual else 1  # <|startoftranscript|> [language, task]
    return (1 if previous or hotwords else 0) + previous + hotwords + start + int(options.without_timestamps) + prefix


def stream_segments(model, audio: np.ndarray, options: DecodingOptions, *, batch_size: int = BatchPolicy.batch_size, checked: bool = False):
    """Start decoding; returns (segments iterator, faster-whisper TranscriptionInfo).

    Segments are decoded lazily as the iterator is consumed, which is what lets the service stream.
    Audio longer than one window with ``long_form="batched"`` is cut at pauses (Silero VAD) and its
    chunks decoded side by side by faster-whisper's batched pipeline, ``batch_size`` per pass.
    ``checked``: the caller has run ``check_options`` on these options for this model already.

    Raises:
        DecodingOptionsError: options this model cannot decode with (``check_options``).
    """
    if not checked:
        check_options(model, options)
    kwargs = options.to_transcribe_kwargs()
    if not options.pad_to_30s:
        model = _unpadded(model)
    window = options.chunk_length or model.feature_extractor.chunk_length
    if options.long_form == "batched" and len(audio) > window * model.feature_extractor.sampling_rate:
        from faster_whisper import BatchedInferencePipeline

        kwargs["vad_filter"] = True  # its chunks end at pauses
        segments, info = BatchedInferencePipeline(model).transcribe(audio, batch_size=batch_size, **kwargs)
    else:
        segments, info = model.transcribe(audio, **kwargs)
    return within_audio((to_segment(s) for s in segments), info.duration), info


def transcribe(
    model, audio: np.ndarray, options: DecodingOptions, *, batch_size: int = BatchPolicy.batch_size, checked: bool = False
) -> Transcription:
    """Transcribe decoded 16 kHz samples with the given options (``checked`` as for ``stream_segments``)."""
    segments, info = stream_segments(model, audio, options, batch_size=batch_size, checked=checked)
    segments = list(segments)
    return Transcription(
        text=join_text(segments),
        language=info.language,
        language_probability=float(info.language_probability),
        duration=float(info.duration),
        segments=segments,
    )


# A window encoded at its own length keeps this many frames (2 s) after its content, and is cut at
# a multiple of it, so that windows of similar length can share an encoder pass.
_UNPADDED_STEP = 200


def _unpadded(model):
    """The model as faster-whisper sees it, but encoding each window without its padding to 30 s.

    faster-whisper pads a window's log-mel features with zeros up to 3000 frames; the encoder
    (CTranslate2 accepts any even length up to 3000) then spends most of a short clip's time on
    the padding. Here the zero frames after the content are cut, to the next multiple of 2 s past
    it. The output is no longer Whisper's trained input: measured, not assumed (BENCHMARKS.md).
    """
    return with_ct2(model, _UnpaddedEncoder(model.model))


def with_ct2(model, ct2):
    """A shallow copy of a ``WhisperModel`` whose CTranslate2 model is ``ct2`` (a wrapper of it):
    faster-whisper's own decoding, with its forward passes going where the wrapper sends them."""
    import copy

    view = copy.copy(model)
    view.model = ct2
    return view


class _UnpaddedEncoder:
    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def encode(self, features, to_cpu: bool = False):
        import ctranslate2
        import numpy as np

        array = np.asarray(features)
        voiced = np.flatnonzero(np.any(array != 0.0, axis=(0, 1)))
        content = int(voiced[-1]) + 1 if voiced.size else 0
        frames = min(array.shape[-1], (content // _UNPADDED_STEP + 2) * _UNPADDED_STEP)
        if frames >= array.shape[-1]:
            return self._inner.encode(features, to_cpu=to_cpu)
        cut = np.ascontiguousarray(array[..., :frames])
        return self._inner.encode(ctranslate2.StorageView.from_array(cut), to_cpu=to_cpu)


def join_text(segments: list[Segment]) -> str:
    """Whisper segment texts carry their own leading space (none for CJK): join, then strip."""
    return "".join(s.text for s in segments).strip()


def within_audio(segments: Iterable[Segment], duration: float) -> Iterator[Segment]:
    """The segments that lie in the audio: one starting at or after ``duration`` is dropped, and the
    ends of the others (their words' too) are cut to it.

    Whisper's timestamps are predicted tokens: where the last window holds little audio, greedy
    decoding can go on repeating earlier text past the end of the file (seen on MKL builds of
    CTranslate2). Every front-end reads segments from here, so none returns such a segment.
    """
    end = math.floor(duration * 1000) / 1000  # segment times have 3 decimals; never past the audio
    for segment in segments:
        if segment.start >= end:
            continue
        if segment.end > end or any(w.end > end or w.start > end for w in segment.words or ()):
            words = (
                None
                if segment.words is None
                else [w.model_copy(update={"start": min(w.start, end), "end": min(w.end, end)}) for w in segment.words]
            )
            segment = segment.model_copy(update={"end": min(segment.end, end), "words": words})
        yield segment


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
        words=None
        if s.words is None
        else [
            Word(start=round(float(w.start), 3), end=round(float(w.end), 3), word=w.word, probability=float(w.probability)) for w in s.words
        ],
    )
