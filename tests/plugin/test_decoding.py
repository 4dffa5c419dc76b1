import pytest

from mlflow_faster_whisper.decoding import DecodingOptions, coerce_text_value, param_schema, parse_cli_assignments
from mlflow_faster_whisper.errors import DecodingOptionsError


def test_unknown_option_names_the_closest_valid_one():
    with pytest.raises(DecodingOptionsError, match="'beam_sise' \\(did you mean 'beam_size'\\?\\)"):
        DecodingOptions.parse({"beam_sise": 2})


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"beam_size": 0}, "beam_size"),
        ({"language": "klingon"}, "unknown language 'klingon'"),
        ({"task": "summarize"}, "task"),
        ({"temperature": [-1.0]}, "temperature"),
        ({"vad_parameters": '{"threshold": 3}'}, "vad_parameters.threshold"),
        ({"chunk_length": 60}, "chunk_length"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(options, problem):
    with pytest.raises(DecodingOptionsError, match=problem):
        DecodingOptions.parse(options)


def test_layers_override_only_what_they_set():
    version = {"language": "zh", "beam_size": 5, "temperature": 0.0}
    service = {"beam_size": 2}
    request = {"word_timestamps": True}
    resolved = DecodingOptions.layered(version, service, request)
    assert resolved.language == "zh"
    assert resolved.beam_size == 2
    assert resolved.temperature == (0.0,)
    assert resolved.word_timestamps is True
    assert resolved.explicit() == {"language": "zh", "beam_size": 2, "temperature": [0.0], "word_timestamps": True}


def test_auto_language_clears_a_default_language():
    resolved = DecodingOptions.layered({"language": "zh"}, {"language": "auto"})
    assert resolved.language is None


def test_transcribe_kwargs_match_faster_whisper_signature():
    import inspect

    from faster_whisper import WhisperModel

    accepted = set(inspect.signature(WhisperModel.transcribe).parameters)
    kwargs = DecodingOptions.parse({"vad_filter": True, "vad_parameters": {"threshold": 0.4}}).to_transcribe_kwargs()
    assert set(kwargs) <= accepted
    assert kwargs["vad_parameters"]["threshold"] == 0.4


def test_param_schema_has_every_option_with_the_version_defaults():
    defaults = DecodingOptions.parse({"language": "zh", "beam_size": 1})
    schema = {spec.name: spec for spec in param_schema(defaults).params}
    assert set(schema) == set(DecodingOptions.model_fields)
    assert schema["language"].default == "zh"
    assert schema["beam_size"].default == 1
    assert schema["temperature"].shape == (-1,)


def test_cli_assignments_are_json_or_strings():
    parsed = parse_cli_assignments(["beam_size=1", "language=zh", "temperature=[0.0, 0.2]", "initial_prompt=Hello"])
    assert parsed == {"beam_size": 1, "language": "zh", "temperature": [0.0, 0.2], "initial_prompt": "Hello"}
    with pytest.raises(DecodingOptionsError, match="key=value"):
        parse_cli_assignments(["beam_size"])


def test_text_values_keep_strings_for_text_fields_and_read_the_rest_as_json():
    assert coerce_text_value("initial_prompt", "123") == "123"
    assert coerce_text_value("language", "en") == "en"
    assert coerce_text_value("beam_size", "2") == 2
    assert coerce_text_value("temperature", "[0.0, 0.4]") == [0.0, 0.4]
    assert coerce_text_value("word_timestamps", "true") is True
    assert coerce_text_value("vad_parameters", '{"threshold": 0.3}') == {"threshold": 0.3}
    assert coerce_text_value("temperature", "hot") == "hot"  # validation rejects it, naming the field


@pytest.mark.parametrize("value", ["hot", "true", '[0, "warm"]', '{"t": 0}'])
def test_a_temperature_that_is_no_number_is_told_what_a_temperature_is(value):
    with pytest.raises(DecodingOptionsError, match=r"temperature is the sampling temperature: a number from 0") as refused:
        DecodingOptions.parse(parse_cli_assignments([f"temperature={value}"]))
    assert "valid tuple" not in str(refused.value)
    assert DecodingOptions.parse(parse_cli_assignments(["temperature=[0, 0.2]"])).temperature == (0.0, 0.2)
