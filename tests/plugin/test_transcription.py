"""Segments lie in the audio on every path: none starts at or after its end, none ends past it."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow_faster_whisper import transcription
from mlflow_faster_whisper.audio import decode_audio
from mlflow_faster_whisper.decoding import DecodingOptions
from mlflow_faster_whisper.engine import Engine
from mlflow_faster_whisper.transcription import Segment, Word, within_audio
from mlflow_faster_whisper.wrapper import FasterWhisperPyfunc


def _segment(i: int, start: float, end: float, words: list[tuple[float, float]] | None = None) -> Segment:
    return Segment(
        id=i, start=start, end=end, text=f" part {i}", avg_logprob=-0.2, no_speech_prob=0.01, compression_ratio=1.2,
        words=None if words is None else [Word(start=s, end=e, word=" w", probability=0.9) for s, e in words],
    )


def test_segments_past_the_end_are_dropped_and_the_last_end_is_cut_to_it():
    # Greedy decoding on some CPU kernels repeats a sentence past the end of a 122.25 s file.
    segments = [
        _segment(0, 100.0, 110.0, [(100.0, 104.0), (104.5, 110.0)]),
        _segment(1, 118.0, 124.5, [(118.0, 121.0), (121.2, 123.0), (123.1, 124.5)]),
        _segment(2, 122.25, 126.0),  # starts at the end: nothing of it was said
        _segment(3, 125.0, 134.0, [(125.0, 134.0)]),
    ]
    kept = list(within_audio(iter(segments), 122.25))
    assert [s.id for s in kept] == [0, 1]
    assert kept[0] == segments[0]  # within the audio: untouched
    assert kept[1].start == 118.0 and kept[1].end == 122.25
    assert [(w.start, w.end) for w in kept[1].words] == [(118.0, 121.0), (121.2, 122.25), (122.25, 122.25)]
    assert transcription.join_text(kept) == "part 0 part 1"


def test_a_segment_without_words_is_cut_too_and_never_past_the_exact_duration():
    [kept] = within_audio([_segment(0, 0.0, 3.5)], 3.0)
    assert (kept.start, kept.end, kept.words) == (0.0, 3.0, None)
    [kept] = within_audio([_segment(0, 1.0, 1.2346)], 1.2345678)  # times have 3 decimals: cut below it
    assert kept.end == 1.234


def _assert_within(result: transcription.Transcription, samples: int, what: str) -> None:
    assert result.duration == pytest.approx(samples / 16000), what
    assert result.segments, what
    for s in result.segments:
        assert 0.0 <= s.start < result.duration and s.start <= s.end <= result.duration, (what, s)
        for w in s.words or ():
            assert w.start <= w.end <= result.duration, (what, w)


@pytest.mark.real_weights
def test_every_path_keeps_the_long_files_segments_within_it(whisper_tiny_en_ct2, long_speech):
    """The service and evaluate (engine requests), streaming, the pyfunc and batched long-form on
    the 122 s file: an invariant of the result, whatever text this CPU's kernels decode."""
    from faster_whisper import WhisperModel

    model = WhisperModel(str(whisper_tiny_en_ct2), device="cpu", compute_type="int8", cpu_threads=2)
    data = long_speech.read_bytes()
    audio = decode_audio(data)
    greedy = DecodingOptions.parse({"beam_size": 1, "temperature": 0})
    words = DecodingOptions.layered(greedy, {"word_timestamps": True})
    batched = DecodingOptions.layered(greedy, {"long_form": "batched"})
    engine = Engine(model)
    try:
        requests = {"engine, word timestamps": engine.submit(audio, words), "engine, batched": engine.submit(audio, batched)}
        results = {what: future.result(timeout=1200) for what, future in requests.items()}
        segments, info = engine.stream(audio, greedy)
        try:
            streamed = list(segments)
        finally:
            segments.close()
        results["stream"] = transcription.Transcription(
            text=transcription.join_text(streamed), language=info.language,
            language_probability=info.language_probability, duration=info.duration, segments=streamed,
        )
    finally:
        engine.close()
    pyfunc = FasterWhisperPyfunc(model, greedy)
    try:
        [row] = pyfunc.predict(pd.DataFrame({"audio": [data]}))
    finally:
        pyfunc.engine.close()
    results["pyfunc"] = transcription.Transcription(**{k: row[k] for k in transcription.Transcription.model_fields})
    for what, result in results.items():
        _assert_within(result, len(audio), what)
