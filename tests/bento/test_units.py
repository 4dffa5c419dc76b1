"""Fast tests of the service's pieces: configuration, form coercion, formats, compute types."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mlflow_faster_whisper.decoding import DecodingOptions
from mlflow_faster_whisper.transcription import Segment, Transcription
from whisper_bento import formats
from whisper_bento.config import ServiceConfig, bound_violation
from whisper_bento.errors import ApiError


def test_config_from_cli_strings():
    config = ServiceConfig(
        model="models:/whisper@production",
        decoding='{"beam_size": 1, "language": "zh"}',
        allowed_languages="en, zh",
        allowed_tasks="transcribe",
        max_beam_size="4",
        cpu_threads="2",
    )
    assert config.decoding.beam_size == 1 and config.decoding.explicit() == {"beam_size": 1, "language": "zh"}
    assert config.allowed_languages == ("en", "zh") and config.allowed_tasks == ("transcribe",)
    assert config.max_beam_size == 4 and config.load.cpu_threads == 2


def test_config_from_yaml_types_and_errors():
    config = ServiceConfig.model_validate(
        {"model": "models:/w/3", "decoding": {"temperature": 0.0}, "allowed_languages": ["EN"], "device": "cpu"}
    )
    assert config.decoding.temperature == (0.0,) and config.allowed_languages == ("en",)
    assert config.load.device == "cpu" and config.load.compute_type == "default"  # flat keys land in `load`
    with pytest.raises(ValidationError, match="beem_size"):
        ServiceConfig(model="m", decoding={"beem_size": 1})
    with pytest.raises(ValidationError, match="unknown language"):
        ServiceConfig(model="m", allowed_languages="en,xx")
    with pytest.raises(ValidationError):
        ServiceConfig(model="m", device="tpu")
    with pytest.raises(ValidationError, match="unknown compute_type 'int4'"):
        ServiceConfig(model="m", compute_type="int4")
    with pytest.raises(ValidationError):
        ServiceConfig(model="m", surprise="1")


def test_bounds():
    config = ServiceConfig(model="m", max_beam_size=2, allowed_languages="en", allowed_tasks="transcribe")
    assert bound_violation(config, DecodingOptions.parse({"beam_size": 2})) is None
    assert bound_violation(config, DecodingOptions.parse({"beam_size": 3})).field == "beam_size"
    assert bound_violation(config, DecodingOptions.parse({"beam_size": 1, "language": "zh"})).field == "language"
    assert bound_violation(config, DecodingOptions.parse({"beam_size": 1, "task": "translate"})).field == "task"


def _result(**options):
    segments = [
        Segment(id=1, start=0.0, end=1.5, text=" Hello", avg_logprob=-0.1, no_speech_prob=0.0, compression_ratio=1.0),
        Segment(id=2, start=61.25, end=3725.5, text=" world.", avg_logprob=-0.1, no_speech_prob=0.0, compression_ratio=1.0),
    ]
    t = Transcription(text="Hello world.", language="en", language_probability=1.0, duration=3726.0, segments=segments)
    return formats.Result(t, DecodingOptions.parse(options), {"name": "m"}, 1)


def test_subtitles_and_json_formats():
    srt = formats.render("srt", _result()).body.decode()
    assert srt == "1\n00:00:00,000 --> 00:00:01,500\nHello\n\n2\n00:01:01,250 --> 01:02:05,500\nworld.\n"
    vtt = formats.render("vtt", _result()).body.decode()
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello\n")
    assert formats.render("text", _result()).body.decode() == "Hello world.\n"
    assert b'"task":"translate"' in formats.render("verbose_json", _result(task="translate")).body


def test_unknown_format_is_422_listing_the_formats():
    with pytest.raises(ApiError) as caught:
        formats.check_format("xml")
    assert caught.value.status == 422 and "srt" in caught.value.message and "native" not in caught.value.message
    formats.check_format("native", native=True)
