"""The audio side of live sessions, without a server: server VAD over audio arriving in pieces
(real Silero, real speech), PCM at 24 kHz, the session's buffer, and local agreement."""

from __future__ import annotations

import io

import numpy as np
import pytest

from devkit import audio as wav
from whisper_bento.realtime_turns import Agreement, AudioBuffer, Boundary, Pcm16, ServerVad, TurnDetector

pytestmark = [pytest.mark.real_weights]  # the speech clips


@pytest.fixture(scope="module")
def two_sentences(speech_clips):
    clips = {c.name: wav.read_wav(c.path)[0] for c in speech_clips if c.language == "en"}
    quiet = np.zeros(16000, dtype=np.float32)
    return np.concatenate([quiet[:8000], clips["quick_brown_fox"], quiet, clips["counting"], quiet])


def _boundaries(audio: np.ndarray, sizes, settings: ServerVad | None = None, max_turn: int = 30 * 16000) -> list[Boundary]:
    detector = TurnDetector(settings or ServerVad(), max_turn, 0)
    found, at = [], 0
    for size in sizes:
        found += detector.feed(audio[at : at + size], 0)
        at += size
    return found + detector.feed(audio[at:], 0)


def test_turns_are_the_same_whatever_the_pieces_the_audio_arrives_in(two_sentences):
    whole = _boundaries(two_sentences, [])
    pieces = _boundaries(two_sentences, np.random.default_rng(7).integers(1, 4000, 300))
    assert pieces == whole
    assert [b.kind for b in whole] == ["started", "stopped", "started", "stopped"]
    assert not any(b.forced for b in whole)


def test_turns_start_where_faster_whispers_vad_finds_speech_less_the_padding(two_sentences):
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    settings = ServerVad(prefix_padding_ms=300, silence_duration_ms=500)
    chunks = get_speech_timestamps(two_sentences, VadOptions(min_silence_duration_ms=500, speech_pad_ms=0))
    starts = [b.sample for b in _boundaries(two_sentences, [], settings) if b.kind == "started"]
    assert starts == [max(c["start"] - 4800, 0) for c in chunks]


def test_a_turn_longer_than_the_bound_is_closed(two_sentences):
    found = _boundaries(two_sentences, [], max_turn=16000)
    forced = [b for b in found if b.forced]
    assert forced and all(b.kind == "stopped" for b in forced)
    opened = [b.sample for b in found if b.kind == "started"]
    closed = [b.sample for b in found if b.kind == "stopped"]
    assert all(end - start <= 16000 + 512 for start, end in zip(opened, closed, strict=False))


def test_pcm_at_24khz_is_resampled_as_a_file_is(two_sentences):
    from faster_whisper.audio import decode_audio

    pcm16k = (two_sentences * 32767).round().astype("<i2")
    at24k = (decode_audio(io.BytesIO(wav.pcm16_wav_bytes(pcm16k)), sampling_rate=24000) * 32768).round().astype("<i2")
    with pytest.raises(ValueError, match="24000 or 16000"):
        Pcm16(44100)
    streamed = Pcm16(24000)
    pieces = [streamed(at24k[i : i + 2400].tobytes()) for i in range(0, len(at24k), 2400)]
    live = np.concatenate(pieces)
    again = Pcm16(24000)(at24k.tobytes())
    assert abs(len(live) - len(two_sentences)) <= 64  # the resampler keeps a few samples until more come
    n = min(len(live), len(again))
    assert np.array_equal(live[:n], again[:n])  # pieces or whole, the same samples
    assert np.array_equal(Pcm16(16000)(pcm16k.tobytes()), pcm16k.astype(np.float32) / 32768.0)


def test_the_buffer_keeps_what_a_turn_may_need():
    buffer = AudioBuffer()
    for i in range(5):
        buffer.append(np.full(100, i, dtype=np.float32))
    assert (buffer.start, buffer.end) == (0, 500)
    assert buffer.slice(150, 250).tolist() == [1.0] * 50 + [2.0] * 50
    buffer.trim(230)
    assert buffer.start == 230 and buffer.slice(0, 260).tolist() == [2.0] * 30
    buffer.clear()
    assert (buffer.start, buffer.end, len(buffer.slice(0, 1000))) == (500, 500, 0)


def test_local_agreement_sends_what_two_decodes_agree_on_and_never_takes_it_back():
    agreement = Agreement()
    assert agreement.update("The quick") == ""  # one decode: nothing agreed yet
    assert agreement.update("The quick brown") == "The quick"
    assert agreement.update("The quick brown fox") == " brown"
    assert agreement.update("A quick brown fox jumps") == ""  # disagrees with what was sent: nothing new
    assert agreement.update("The quick brown fox jumps over") == ""  # agrees with the decode before only at the start
    assert agreement.update("The quick brown fox jumps over the") == " fox jumps over"
    assert agreement.finish("The quick brown fox jumps over the lazy dog.") == " the lazy dog."
    assert agreement.sent == "The quick brown fox jumps over the lazy dog.".split()
    other = Agreement()
    other.update("Hello world")
    other.update("Hello world again")
    assert other.finish("Goodbye world") == ""  # the final text wins in completed; deltas are never retracted
