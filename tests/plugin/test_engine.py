"""The decoding engine on real weights: requests share forward passes, each gets its own answer."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
from faster_whisper import WhisperModel

from mlflow_faster_whisper import loaded, transcription
from mlflow_faster_whisper.audio import decode_audio
from mlflow_faster_whisper.decoding import DecodingOptions
from mlflow_faster_whisper.engine import Engine, Ticket
from mlflow_faster_whisper.errors import Cancelled, DecodingOptionsError, Overloaded
from mlflow_faster_whisper.loaded import LoadedVersion
from mlflow_faster_whisper.wrapper import FasterWhisperPyfunc
from whisper_registry.normalize import normalizer_for

pytestmark = pytest.mark.real_weights

GREEDY = DecodingOptions.parse({"beam_size": 1, "temperature": 0})


@pytest.fixture(scope="module")
def base(whisper_base_ct2):
    return WhisperModel(str(whisper_base_ct2), device="cpu", compute_type="int8", cpu_threads=2)


@pytest.fixture(scope="module")
def tiny_en(whisper_tiny_en_ct2):
    return WhisperModel(str(whisper_tiny_en_ct2), device="cpu", compute_type="int8", cpu_threads=2)


@pytest.fixture(scope="module")
def clips(speech_clips):
    return {f"{c.language}/{c.name}": (c, decode_audio(c.path.read_bytes())) for c in speech_clips}


def _same(language, hypothesis, reference) -> bool:
    normalize = normalizer_for(language)
    return normalize(hypothesis) == normalize(reference)


def test_a_request_alone_decodes_exactly_as_transcribe(tiny_en, clips):
    _, audio = clips["en/quick_brown_fox"]
    passes = []
    engine = Engine(tiny_en, on_pass=passes.append)
    try:
        options = DecodingOptions()  # beam 5, temperature fallback, previous-text conditioning
        assert engine.transcribe(audio, options) == transcription.transcribe(tiny_en, audio, options)
    finally:
        engine.close()
    assert passes and all(p.windows == 1 and p.requests == 1 for p in passes)
    assert [p.op for p in passes][:2] == ["encode", "generate"]


def test_a_mixed_batch_gives_every_request_its_own_text_and_times(base, clips, long_speech):
    long_audio = decode_audio(long_speech.read_bytes())
    phrases = [p["text"] for p in json.loads(long_speech.with_suffix(".json").read_text())]
    passes = []
    engine = Engine(base, batch_size=8, on_pass=passes.append)
    cases = [
        ("long", long_audio, GREEDY, "en"),
        ("en", clips["en/quick_brown_fox"][1], GREEDY.layered(GREEDY, {"language": "en"}), "en"),
        ("zh", clips["zh/nihao_shijie"][1], GREEDY.layered(GREEDY, {"language": "zh"}), "zh"),
        ("es detected", clips["es/pangrama"][1], GREEDY, "es"),
        ("fr translated", clips["fr/bonjour_monde"][1], GREEDY.layered(GREEDY, {"task": "translate", "language": "fr"}), "fr"),
    ]
    try:
        futures = [engine.submit(audio, options) for _, audio, options, _ in cases]
        results = [f.result(timeout=600) for f in futures]
    finally:
        engine.close()
    for (name, audio, options, language), result in zip(cases, results):
        assert result.language == language, name
        assert result.duration == pytest.approx(len(audio) / 16000, abs=0.01), name
        assert result.segments and result.segments[0].start < 1.0, name  # times from its own audio
        assert all(s.start < result.duration and s.end <= result.duration for s in result.segments), name
        if name != "long":  # the text and segment times it gets alone
            alone = transcription.transcribe(base, audio, options)
            assert [(s.start, s.end, s.text) for s in result.segments] == [(s.start, s.end, s.text) for s in alone.segments], name
    normalize = normalizer_for("en")
    long_text = normalize(results[0].text)
    for phrase in set(phrases):  # every sentence of the file, about as often as it was said
        assert long_text.count(normalize(phrase)) >= 0.8 * phrases.count(phrase), (phrase, results[0].text)
    assert results[0].segments[-1].end > 100  # the long file's windows went one after another to its end
    # Windows of different requests (languages, tasks, a detected language) shared forward passes.
    shared = [p for p in passes if p.requests > 1]
    assert any(p.op == "encode" for p in shared) and any(p.op == "generate" for p in shared), passes


@pytest.mark.parametrize("encode_batch_size, per_call", [(None, 1), (8, 8)], ids=["cpu-default", "gpu-batched"])
def test_an_encode_pass_gives_every_request_its_own_windows(tiny_en, clips, encode_batch_size, per_call):
    """A CPU engine runs an encode pass's windows through the encoder one at a time, a GPU engine
    as one batch: either way each request decodes what it decodes alone."""
    names = ["en/hello_world", "en/counting", "en/quick_brown_fox", "en/hello_world"]
    passes = []
    engine = Engine(tiny_en, batch_size=8, encode_batch_size=encode_batch_size, on_pass=passes.append)
    try:
        futures = [engine.submit(clips[n][1], GREEDY) for n in names]
        results = [f.result(timeout=120) for f in futures]
    finally:
        engine.close()
    assert engine.encode_batch_size == per_call  # a CPU model's default: one window per encoder call
    assert [r.segments for r in results] == [transcription.transcribe(tiny_en, clips[n][1], GREEDY).segments for n in names]
    assert max(p.windows for p in passes if p.op == "encode") > 1


def test_a_short_request_beside_a_long_file_waits_only_for_the_pass_in_flight(tiny_en, clips, long_speech):
    """Short requests go before a long file's windows, in passes of their own: after the pass in
    flight at its submission, a short request's passes follow one another, as many as alone."""
    long_audio = decode_audio(long_speech.read_bytes())
    short = clips["en/hello_world"][1]
    passes: list[tuple] = []  # the tickets of each pass, in order

    def passes_of(ticket: Ticket, expected: int) -> list[int]:
        deadline = time.monotonic() + 30  # a pass is reported just after its requests are answered
        while len([p for p in passes if ticket in p]) < expected and time.monotonic() < deadline:
            time.sleep(0.005)
        return [i for i, p in enumerate(passes) if ticket in p]

    # A pass waits for every request between two calls (gather_s is a failure bound here): on a
    # loaded host a short request's first call is never late for a pass because its features took long.
    engine = Engine(tiny_en, batch_size=8, gather_s=60.0, on_pass=lambda stats: passes.append(stats.tickets))
    try:
        first = Ticket()
        engine.submit(short, GREEDY, first).result(timeout=600)
        long_future = engine.submit(long_audio, GREEDY)
        own = None
        for _ in range(2):  # sent at two points of the file's decoding
            seen = len(passes)
            deadline = time.monotonic() + 600
            while len(passes) < seen + 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            if own is None:  # passes are reported in order: all of the first request's came before the file's
                own = len([p for p in passes if first in p])
            assert not long_future.done()
            ticket = Ticket()
            sent_at = len(passes)
            result = engine.submit(short, GREEDY, ticket).result(timeout=600)
            mine = passes_of(ticket, own)
            assert _same("en", result.text, clips["en/hello_world"][0].text)
            assert mine[0] <= sent_at + 2  # after the pass in flight (and one that ended as it was sent)
            assert passes[mine[0]:mine[-1] + 1] == [(ticket,)] * own  # alone, one after the other
        long_future.result(timeout=600)
    finally:
        engine.close()


def test_cancelling_frees_capacity_and_a_full_engine_refuses_at_once(tiny_en, clips, long_speech):
    long_audio = decode_audio(long_speech.read_bytes())
    engine = Engine(tiny_en, max_requests=1)
    try:
        ticket = Ticket()
        held = engine.submit(long_audio, GREEDY, ticket)
        with pytest.raises(Overloaded):
            engine.submit(clips["en/hello_world"][1], GREEDY)
        time.sleep(0.5)
        ticket.cancel()
        with pytest.raises(Cancelled):
            held.result(timeout=60)
        assert _same("en", engine.transcribe(clips["en/hello_world"][1], GREEDY).text, clips["en/hello_world"][0].text)
    finally:
        engine.close()


def test_a_request_that_fails_fails_alone(tiny_en, clips):
    engine = Engine(tiny_en)
    good = clips["en/quick_brown_fox"][1]
    # Options this model cannot decode with, past LoadedVersion.resolve's check: faster-whisper
    # refuses them inside the request's own decoding.
    bad = DecodingOptions.parse({"max_new_tokens": 448, "initial_prompt": "word " * 300})
    try:
        futures = [engine.submit(good, GREEDY), engine.submit(good, bad), engine.submit(good, GREEDY)]
        assert _same("en", futures[0].result(timeout=120).text, clips["en/quick_brown_fox"][0].text)
        with pytest.raises(ValueError, match="max_new_tokens"):
            futures[1].result(timeout=120)
        assert _same("en", futures[2].result(timeout=120).text, clips["en/quick_brown_fox"][0].text)
    finally:
        engine.close()


def test_a_request_checks_its_options_once(tiny_en, clips, monkeypatch):
    calls = []
    checked = transcription.check_options

    def counted(model, options):
        calls.append(options)
        checked(model, options)

    monkeypatch.setattr(transcription, "check_options", counted)
    monkeypatch.setattr(loaded, "check_options", counted)
    version = LoadedVersion(tiny_en, {"beam_size": 1}, {"temperature": 0})
    try:
        with pytest.raises(DecodingOptionsError, match="max_new_tokens"):
            version.resolve({"max_new_tokens": 448, "initial_prompt": "word " * 300})
        options = version.resolve({"language": "en"})
        version.engine.transcribe(clips["en/quick_brown_fox"][1], options)
        segments, _ = version.engine.stream(clips["en/quick_brown_fox"][1], options)
        list(segments)
    finally:
        version.engine.close()
    assert len(calls) == 2  # one per resolve: neither the engine's decode nor its stream checks again


def test_streaming_shares_passes_with_other_requests(tiny_en, clips, long_speech):
    long_audio = decode_audio(long_speech.read_bytes())
    passes = []
    engine = Engine(tiny_en, on_pass=passes.append)
    try:
        others = [engine.submit(clips[f"en/{n}"][1], GREEDY) for n in ("hello_world", "counting", "quick_brown_fox")]
        segments, info = engine.stream(long_audio, GREEDY)
        streamed = list(segments)
        for future in others:
            future.result(timeout=120)
    finally:
        engine.close()
    assert info.language == "en" and streamed[-1].end > 100
    assert streamed == transcription.transcribe(tiny_en, long_audio, GREEDY).segments
    assert any(p.requests > 1 for p in passes)


def test_pyfunc_rows_share_passes_and_equal_row_by_row(tiny_en, clips):
    names = ["en/hello_world", "en/counting", "en/quick_brown_fox", "en/hello_world"]
    rows = [clips[n][0].path.read_bytes() for n in names] + [b"not audio"]
    pyfunc = FasterWhisperPyfunc(tiny_en, GREEDY)
    passes = []
    pyfunc.engine.on_pass = passes.append
    try:
        out = pyfunc.predict(pd.DataFrame({"audio": rows}))
    finally:
        pyfunc.engine.close()
    one_by_one = [transcription.transcribe(tiny_en, clips[n][1], GREEDY) for n in names]
    assert [row["text"] for row in out[:4]] == [r.text for r in one_by_one]
    assert out[4]["error"] and out[4]["text"] == ""
    assert max(p.windows for p in passes if p.op == "encode") > 1


def test_word_timestamps_through_the_engine_equal_transcribe(tiny_en, clips):
    _, audio = clips["en/quick_brown_fox"]
    options = GREEDY.layered(GREEDY, {"word_timestamps": True})
    engine = Engine(tiny_en)
    try:
        futures = [engine.submit(audio, options) for _ in range(2)]  # two requests' alignments side by side
        results = [f.result(timeout=120) for f in futures]
    finally:
        engine.close()
    alone = transcription.transcribe(tiny_en, audio, options)
    assert alone.segments[0].words
    assert all(r.segments == alone.segments for r in results)


def test_a_window_encoded_without_its_padding(tiny_en, clips):
    import ctranslate2
    import numpy as np

    features = np.zeros((1, 80, 3000), dtype=np.float32)
    features[..., :330] = 0.5  # 3.3 s of content, then faster-whisper's zero padding
    encoded = transcription._unpadded(tiny_en).model.encode(ctranslate2.StorageView.from_array(features))
    assert encoded.shape[:2] == [1, 300]  # 600 frames: the content and at least 2 s after it, halved by the encoder
    _, audio = clips["en/quick_brown_fox"]
    options = GREEDY.layered(GREEDY, {"pad_to_30s": False})
    engine = Engine(tiny_en)
    try:
        through_engine = engine.transcribe(audio, options)
    finally:
        engine.close()
    assert through_engine == transcription.transcribe(tiny_en, audio, options)
    assert _same("en", through_engine.text, clips["en/quick_brown_fox"][0].text)


_CLOSE_THEN_EXIT = """
import sys
import numpy as np
from faster_whisper import WhisperModel
from mlflow_faster_whisper.decoding import DecodingOptions
from mlflow_faster_whisper.engine import Engine

def main():
    engine = Engine(WhisperModel(sys.argv[1], device="cpu", compute_type="int8", cpu_threads=2))
    engine.transcribe(np.zeros(16000, dtype=np.float32), DecodingOptions.parse({"beam_size": 1, "temperature": 0}))
    engine.close()  # the engine is the model's last holder, and the process exits right after

main()
"""


def test_a_process_that_closes_its_engine_and_exits_exits_cleanly(whisper_tiny_en_ct2):
    """Before close() joined the scheduler, its thread dropped the model as the interpreter
    exited and the process aborted (4 runs of 5)."""
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", _CLOSE_THEN_EXIT, str(whisper_tiny_en_ct2)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr[-2000:]


def test_a_closed_engine_fails_a_request_still_decoding(tiny_en, long_speech):
    engine = Engine(tiny_en)
    future = engine.submit(decode_audio(long_speech.read_bytes()), GREEDY)
    time.sleep(0.5)  # into its windows
    closing = threading.Thread(target=engine.close, kwargs={"wait": True})
    closing.start()
    closing.join(timeout=120)  # it ends: the request's later calls fail rather than wait for a scheduler that ended
    assert not closing.is_alive()
    with pytest.raises(Cancelled, match="closed"):
        future.result(timeout=0)
