"""Options that cannot crash the decoder: every value inside the bounds decodes on a real model,
every value outside them is refused with the field named, before the model sees it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlflow_faster_whisper.audio import decode_audio
from mlflow_faster_whisper.decoding import DecodingOptions
from mlflow_faster_whisper.errors import AudioDecodeError, DecodingOptionsError
from mlflow_faster_whisper.transcription import check_options, transcribe
from devkit import audio as wav

# Values that passed the old validation and then crashed faster-whisper or CTranslate2 (a 500 in
# the service, or a dead worker for the token id).
OUTSIDE = [
    ("temperature", math.nan),
    ("temperature", [0.0, math.inf]),
    ("temperature", [0.0] * 17),
    ("length_penalty", math.nan),
    ("length_penalty", math.inf),
    ("length_penalty", 5e16),
    ("no_speech_threshold", math.nan),
    ("compression_ratio_threshold", -math.inf),
    ("log_prob_threshold", math.nan),
    ("patience", 1e308),
    ("max_initial_timestamp", 1e308),
    ("repetition_penalty", 1e-300),
    ("max_new_tokens", 100_000),
    ("best_of", 1000),
    ("beam_size", 10**30),
    ("no_repeat_ngram_size", 10**20),
    ("language_detection_segments", 10**9),
    ("suppress_tokens", [-5]),
    ("initial_prompt", "x" * 10_001),
    ("hallucination_silence_threshold", math.inf),
    ("vad_parameters", {"speech_pad_ms": 10**30}),
    ("vad_parameters", {"max_speech_duration_s": math.nan}),
]


@pytest.mark.parametrize("field, value", OUTSIDE, ids=[f"{f}={str(v)[:12]}" for f, v in OUTSIDE])
def test_values_outside_the_bounds_are_refused_with_the_field(field, value):
    with pytest.raises(DecodingOptionsError) as caught:
        DecodingOptions.parse({field: value})
    assert caught.value.field == field
    assert field in caught.value.message


@pytest.mark.real_weights
def test_patience_must_leave_beam_search_one_hypothesis(tiny_en, fox):
    # CTranslate2 keeps round(beam_size * patience) hypotheses; fewer than one was a 500 in the
    # service (hypothesis found patience=0.1 with a version's beam_size=2).
    for beam_size, patience in ((1, 0.49), (2, 0.24), (5, 0.09)):
        with pytest.raises(DecodingOptionsError, match="beam_size \\* patience") as caught:
            DecodingOptions.parse({"beam_size": beam_size, "patience": patience})
        assert caught.value.field == "patience"
    for beam_size, patience in ((1, 0.5), (2, 0.25), (5, 0.1)):  # the smallest that decode
        options = DecodingOptions.parse({"beam_size": beam_size, "patience": patience, "temperature": 0})
        assert "fox" in transcribe(tiny_en, fox, options).text.lower()


def test_repeated_token_ids_are_kept_once():
    assert DecodingOptions.parse({"suppress_tokens": [-1, 5, 5, 7]}).suppress_tokens == (-1, 5, 7)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(DecodingOptions.model_fields)), _JSON, max_size=4))
def test_any_value_parses_or_is_a_decoding_options_error(options):
    """What a form field, a param or a CLI value can carry never escapes as another exception."""
    try:
        parsed = DecodingOptions.parse(options)
    except DecodingOptionsError as exc:
        assert exc.field in DecodingOptions.model_fields
        return
    kwargs = parsed.to_transcribe_kwargs()
    assert all(math.isfinite(t) for t in kwargs["temperature"])


@pytest.fixture(scope="module")
def tiny_en(whisper_tiny_en_ct2):
    from faster_whisper import WhisperModel

    return WhisperModel(str(whisper_tiny_en_ct2), device="cpu", compute_type="int8", local_files_only=True)


@pytest.fixture(scope="module")
def fox(speech_clips):
    return next(c for c in speech_clips if c.name == "quick_brown_fox").samples()


@pytest.mark.real_weights
def test_token_ids_outside_the_vocabulary_are_refused_before_ctranslate2(tiny_en, fox):
    # tiny.en's vocabulary: 50363 text and special tokens, then 1501 timestamps -> ids 0..51863.
    last = DecodingOptions.parse({"suppress_tokens": [51863], "temperature": 0})
    assert "fox" in transcribe(tiny_en, fox, last).text.lower()
    for bad in (51864, 99999999):
        options = DecodingOptions.parse({"suppress_tokens": [bad], "temperature": 0})
        with pytest.raises(DecodingOptionsError, match="from 0 to 51863") as caught:
            transcribe(tiny_en, fox, options)
        assert caught.value.field == "suppress_tokens"


@pytest.mark.real_weights
def test_max_new_tokens_must_fit_beside_the_longest_prompt(tiny_en, fox):
    # English-only: <|startoftranscript|> alone starts the prompt; previous text takes <= 223.
    fits = DecodingOptions.parse({"max_new_tokens": 448 - 225, "temperature": 0})
    assert "fox" in transcribe(tiny_en, fox, fits).text.lower()
    too_many = DecodingOptions.parse({"max_new_tokens": 448 - 224, "temperature": 0})
    with pytest.raises(DecodingOptionsError, match="at most 223") as caught:
        check_options(tiny_en, too_many)
    assert caught.value.field == "max_new_tokens"
    alone = DecodingOptions.parse({"max_new_tokens": 440, "condition_on_previous_text": False, "temperature": 0})
    check_options(tiny_en, alone)  # no previous text: 1 token of prompt


# The corners of the bounds, each decoded for real: nothing inside them may crash or hang.
CORNERS = [
    {"beam_size": 32, "patience": 10, "length_penalty": 10, "repetition_penalty": 100},
    {"beam_size": 1, "length_penalty": 0, "repetition_penalty": 0.01, "no_repeat_ngram_size": 448},
    {"temperature": [5.0], "best_of": 32, "max_new_tokens": 20},
    {"temperature": [0.0] * 16, "compression_ratio_threshold": -1e300, "log_prob_threshold": 1e300},
    {"max_initial_timestamp": 30, "no_speech_threshold": -1e300, "hallucination_silence_threshold": 1e300,
     "word_timestamps": True},
    {"initial_prompt": "fox " * 2500, "hotwords": "dog " * 2500,  # a 448-token prompt
     "condition_on_previous_text": False},
    {"prefix": "The " * 2500, "without_timestamps": True, "language_detection_segments": 30},
    {"vad_filter": True, "vad_parameters": {"speech_pad_ms": 3_600_000, "min_silence_duration_ms": 3_600_000}},
]


@pytest.mark.real_weights
@pytest.mark.parametrize("corner", CORNERS, ids=range(len(CORNERS)))
def test_the_corners_of_the_bounds_decode(tiny_en, fox, corner):
    options = DecodingOptions.parse({"temperature": 0.0, **corner})
    check_options(tiny_en, options)
    result = transcribe(tiny_en, fox, options)
    assert result.duration == pytest.approx(len(fox) / 16000, abs=0.01)
    assert all(math.isfinite(s.avg_logprob) for s in result.segments)


@pytest.mark.parametrize(
    "samples, words",
    [
        (np.full(16000, np.nan, np.float32), "NaN or infinite"),
        (np.concatenate([np.zeros(16000, np.float32), [np.inf]]), "NaN or infinite"),
        (np.full(16000, 1e30, np.float32), "far outside"),
    ],
    ids=["all-nan", "one-inf", "1e30"],
)
def test_samples_that_are_not_sound_are_refused_before_the_model(samples, words):
    with pytest.raises(AudioDecodeError, match=words):
        decode_audio(samples)
    with pytest.raises(AudioDecodeError, match=words):  # PyAV passes a float WAV's values through
        decode_audio(wav.float_wav_bytes(samples))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.floats(min_value=-1, max_value=1, width=32))
def test_sound_in_range_is_kept(level):
    samples = np.full(1600, level, np.float32)
    assert np.array_equal(decode_audio(samples), samples)


def test_vad_defaults_are_json_and_mean_never_split():
    """``vad_parameters={}`` used to carry max_speech_duration_s=inf, which no JSON answer can hold."""
    import json

    options = DecodingOptions.parse({"vad_filter": True, "vad_parameters": "{}"})
    json.dumps(options.model_dump(mode="json"), allow_nan=False)  # what the service renders
    assert "max_speech_duration_s" not in options.to_transcribe_kwargs()["vad_parameters"]  # faster-whisper's inf
    assert options.to_transcribe_kwargs()["vad_parameters"]["min_silence_duration_ms"] == 2000
    split = DecodingOptions.parse({"vad_parameters": {"max_speech_duration_s": 20}})
    assert split.to_transcribe_kwargs()["vad_parameters"]["max_speech_duration_s"] == 20
    with pytest.raises(DecodingOptionsError, match="max_speech_duration_s"):
        DecodingOptions.parse({"vad_parameters": '{"max_speech_duration_s": Infinity}'})
