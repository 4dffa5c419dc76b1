import base64

import numpy as np
import pytest

from mlflow_faster_whisper.audio import audio_from_cell, decode_audio
from mlflow_faster_whisper.errors import AudioDecodeError


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


def _encode(samples: np.ndarray, container: str, codec: str, rate: int) -> bytes:
    import io

    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(
            np.stack([samples, samples]).astype(np.float32).reshape(1, -1), format="flt", layout="stereo"
        )
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


@pytest.mark.parametrize("container, codec", [("flac", "flac"), ("ogg", "libvorbis"), ("mp3", "libmp3lame"), ("ogg", "libopus")])
def test_other_containers_decode_to_16k_mono(container, codec):
    import av

    try:
        av.codec.Codec(codec, "w")
    except Exception:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    rate = 48000
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)
    samples = decode_audio(_encode(tone, container, codec, rate))
    assert abs(len(samples) - 16000) < 2000  # encoder padding/priming
    assert 0.15 < float(np.abs(samples).max()) < 0.5
