import base64

import numpy as np
import pytest

from mlflow_faster_whisper.audio import audio_from_cell, decode_audio
from mlflow_faster_whisper.errors import AudioDecodeError, AudioTooLongError
from devkit import audio as wav


def test_wav_bytes_and_base64_decode_to_16k_samples(wav_bytes):
    samples = decode_audio(wav_bytes)
    assert samples.dtype == np.float32 and len(samples) == 16000
    assert np.array_equal(audio_from_cell(base64.b64encode(wav_bytes).decode()), samples)


@pytest.mark.parametrize(
    "cut, problem",
    [
        (lambda b: b"", "empty"),
        (lambda b: b[:30], "Could not decode"),
        (lambda b: b[: len(b) // 2], "truncated: its header declares 32000 bytes"),
        (lambda b: b"not audio at all" * 10, "Could not decode"),
    ],
)
def test_bad_audio_is_refused_with_the_reason(wav_bytes, cut, problem):
    with pytest.raises(AudioDecodeError, match=problem):
        decode_audio(cut(wav_bytes))


def test_a_streamed_wav_with_unknown_length_is_accepted(wav_bytes):
    header_end = wav_bytes.index(b"data") + 8
    streamed = wav_bytes[: header_end - 4] + b"\xff\xff\xff\xff" + wav_bytes[header_end:]
    assert len(decode_audio(streamed)) == 16000


def test_strings_are_never_read_as_paths(tmp_path, wav_bytes):
    path = tmp_path / "secret.wav"
    path.write_bytes(wav_bytes)
    with pytest.raises(AudioDecodeError, match="paths and URLs are not read"):
        audio_from_cell(str(path))


@pytest.mark.parametrize("container, codec", [("flac", "flac"), ("ogg", "libvorbis"), ("mp3", "libmp3lame"), ("ogg", "libopus")])
def test_other_containers_decode_to_16k_mono(container, codec):
    import av

    try:
        av.codec.Codec(codec, "w")
    except Exception:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    rate = 48000
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)
    samples = decode_audio(wav.encode(tone, container, codec, rate))
    assert abs(len(samples) - 16000) < 2000  # encoder padding/priming
    assert 0.15 < float(np.abs(samples).max()) < 0.5


def test_a_silence_bomb_is_refused_by_its_declared_duration_before_decoding():
    bomb = wav.silence_bomb(3 * 3600)  # 3 h of FLAC in about 2 MB
    with pytest.raises(AudioTooLongError, match=r"1079\d.\d s long; the limit here is 1800 s") as caught:
        decode_audio(bomb, max_seconds=1800)
    assert caught.value.limit == 1800


def test_audio_past_the_limit_is_cut_while_decoding(wav_bytes):
    # One second declared and decoded: past a 0.5 s limit, decoding stops (the declared
    # duration is within its 1 s rounding slack, so the decoded samples decide).
    with pytest.raises(AudioTooLongError, match="limit here is 0.5 s"):
        decode_audio(wav_bytes, max_seconds=0.5)
    with pytest.raises(AudioTooLongError):
        decode_audio(np.zeros(16001, np.float32), max_seconds=1)
    assert len(decode_audio(wav_bytes, max_seconds=1)) == 16000
