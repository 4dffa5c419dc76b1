"""Fast tests of the service's pieces: configuration, form coercion, formats, compute types."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mlflow_faster_whisper.decoding import DecodingOptions
from mlflow_faster_whisper.transcription import Segment, Transcription
from whisper_bento import formats
from whisper_bento.config import (
    DroppedArgumentsError,
    ServiceConfig,
    bound_violation,
    command_line_arguments,
    refuse_dropped_arguments,
)
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


def test_serve_arguments_a_built_bento_would_drop_are_refused(tmp_path):
    arg_file = tmp_path / "service.yaml"
    arg_file.write_text("batch_size: 16\ndecoding: {beam_size: 1}\n")
    argv = ["bentoml", "serve", "whisper:v1", "--port", "3000", "--arg", "device=cpu", "--arg=compute_type=int8",
            "--arg-file", str(arg_file), "--arg", "batch_size=4"]
    assert command_line_arguments(argv) == {"device": "cpu", "compute_type": "int8", "batch_size": "4",
                                            "decoding": {"beam_size": 1}}
    built = ServiceConfig.model_validate({"model": "models:/m@production", "device": "cuda", "batch_size": 32})
    refuse_dropped_arguments(built, ["bentoml", "serve", "whisper:v1", "--port", "3000"])  # nothing asked
    refuse_dropped_arguments(built, ["bentoml", "serve", "whisper:v1", "--arg", "device=cuda", "--arg", "batch_size=32",
                                     "--arg", 'decoding={}'])  # all as built
    with pytest.raises(DroppedArgumentsError) as refused:
        refuse_dropped_arguments(built, ["bentoml", "serve", "whisper:v1", "--arg", "device=cpu", "--arg", "batch_size=32",
                                         "--arg", "decoding={}"])
    message = str(refused.value)
    assert "device=cpu (built with cuda)" in message and "batch_size" not in message and "decoding" not in message
    assert "python -m whisper_bento.build" in message
    with pytest.raises(DroppedArgumentsError, match="beam_sise"):  # an invalid value is not silently dropped either
        refuse_dropped_arguments(built, ["bentoml", "serve", "whisper:v1", "--arg", 'decoding={"beam_sise": 2}'])
    with pytest.raises(DroppedArgumentsError) as unknown:  # a decoding option given as a key is no value "built with"
        refuse_dropped_arguments(built, ["bentoml", "serve", "whisper:v1", "--arg", "beam_size=1"])
    assert "Unknown service configuration key beam_size" in str(unknown.value) and "built with" not in str(unknown.value)
    assert """decoding='{"beam_size": 1}'""" in str(unknown.value)


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


def test_mlflow_webhook_signature_is_verified_as_mlflow_signs_it():
    from mlflow.webhooks.delivery import _generate_hmac_signature  # MLflow's own signer

    from whisper_bento.auth import SeenDeliveries, delivery_problem, signature_problem

    body, delivery, now = b'{"entity": "model_version_alias"}', "d-1", 1_800_000_000
    secret = "a secret, with a comma and spaces"
    headers = {"x-mlflow-signature": _generate_hmac_signature(secret, delivery, str(now), body.decode()),
               "x-mlflow-timestamp": str(now), "x-mlflow-delivery-id": delivery}
    seen = SeenDeliveries()
    assert delivery_problem(headers, seen, now=now + 10) is None
    assert signature_problem(body, headers, (b"old", secret.encode())) is None  # rotation: any secret
    assert "does not match" in signature_problem(body, headers, (b"other",))
    assert "does not match" in signature_problem(body, headers, (b"with",))  # a fragment of the secret
    assert "does not match" in signature_problem(body + b" ", headers, (secret.encode(),))  # body changed
    assert "more than 300 s" in delivery_problem(headers, seen, now=now + 301)  # stale
    assert "in the future" in delivery_problem(headers, seen, now=now - 31)  # dated ahead beyond the clock skew
    assert delivery_problem(headers, seen, now=now - 29) is None
    assert "not signed" in delivery_problem({}, seen, now=now)
    assert "not v1" in delivery_problem({**headers, "x-mlflow-signature": "v2,abc"}, seen, now=now)
    assert "not a Unix time" in delivery_problem({**headers, "x-mlflow-timestamp": "1e9"}, seen, now=now)
    assert "not an id" in delivery_problem({**headers, "x-mlflow-delivery-id": "x" * 129}, seen, now=now)
    assert seen.add(delivery, now=now) is None
    assert "received already" in delivery_problem(headers, seen, now=now + 1)  # a replay, refused before its body
    assert "received already" in seen.add(delivery, now=now + 1)  # and after it, if two raced


def test_delivery_ids_are_kept_while_they_could_be_replayed_and_no_more():
    from whisper_bento.auth import SeenDeliveries

    seen = SeenDeliveries(keep_s=10, max_ids=3)
    for index in range(3):
        assert seen.add(f"d{index}", now=100 + index) is None
    assert "more than 3 deliveries" in seen.add("d3", now=105)  # bounded: refused, none forgotten early
    assert seen.has("d0", now=109.5) and not seen.has("d0", now=110)  # expired once it could not be replayed
    assert seen.add("d3", now=110) is None and len(seen._ids) == 3


def test_a_webhook_secret_and_the_control_key_are_taken_whole(tmp_path, monkeypatch):
    from whisper_bento.auth import load_keys

    monkeypatch.setenv("SECRET", " two words,and a comma ")
    monkeypatch.setenv("KEYS", "k1, k2\nk3")
    assert load_keys("env:SECRET", "webhook_secret", whole=True) == (b" two words,and a comma ",)
    assert load_keys("env:KEYS") == (b"k1", b"k2", b"k3")  # API keys stay a list
    (tmp_path / "secret").write_text("clé secrète, entière\n")  # an editor's final newline is not part of it
    assert load_keys(f"file:{tmp_path / 'secret'}", "admin_key", whole=True) == ("clé secrète, entière".encode(),)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_keys(f"file:{tmp_path / 'empty'}", "admin_key", whole=True)


def test_keys_compare_as_the_bytes_sent():
    from whisper_bento.auth import header_bytes, matches

    sent = "clé-ü".encode()  # what a client puts on the wire for a key that is not ASCII
    scope = {"headers": [(b"x-whisper-admin-key", sent), (b"authorization", b"Bearer k")]}
    assert matches(header_bytes(scope, b"x-whisper-admin-key"), ("clé-ü".encode(),))
    assert header_bytes(scope, b"x-missing") == b""


def test_what_clients_see_of_places_on_this_machine():
    from whisper_bento.auth import LOCAL_PATH, hide_local_paths, public_uri

    assert public_uri("models:/whisper@production") == "models:/whisper@production"
    assert public_uri("https://user:pw@host/models") == "https://user:***@host/models"
    for path in ("/srv/models/ct2", "file:///srv/ct2", "./ct2", "~/ct2", "C:\\models\\ct2"):
        assert public_uri(path) == LOCAL_PATH, path
    lineage = {"kind": "transformers", "path": "/home/me/ckpt", "base_model": "openai/whisper-base", "adapter": None}
    assert hide_local_paths(lineage) == {**lineage, "path": LOCAL_PATH}  # a hub id is not a place here


@pytest.mark.parametrize(
    "payload, params",
    [
        ({"dataframe_split": {"columns": ["audio"], "data": [["QUFB"], ["QkJC"]]}, "params": {"language": "en"}}, True),
        ({"inputs": {"audio": ["QUFB", "QkJC"]}, "params": {"language": "en"}}, True),
        # pandas.read_json cannot read a list beside "params": the CLI takes these without params.
        ({"dataframe_records": [{"audio": "QUFB"}, {"audio": "QkJC"}]}, False),
        ({"instances": ["QUFB", "QkJC"]}, False),
        ([{"audio": "QUFB"}, {"audio": "QkJC"}], False),
    ],
)
def test_deployment_predict_reads_what_mlflow_models_predict_takes(payload, params):
    """As a dict, and as `mlflow deployments predict` hands it over: pandas.read_json of the file."""
    import io
    import json

    import pandas as pd

    from whisper_bento.deployment_payload import audio_and_params

    expected = (["QUFB", "QkJC"], {"language": "en"} if params else {})
    assert audio_and_params(payload) == expected
    assert audio_and_params(pd.read_json(io.StringIO(json.dumps(payload)))) == expected


def _requests_through(middleware_call, timeout: float, app_delay_s: float = 0.0, requests: int = 5):
    """Run ``requests`` requests through BentoML's TimeoutMiddleware with ``middleware_call`` as its
    ``__call__``; each request's context holds a marker, as an outer middleware's tracing span does.
    Returns weak references to the markers (after the requests end) and the statuses answered."""
    import asyncio
    import contextvars
    import gc
    import weakref

    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    request_context = contextvars.ContextVar("request_context")

    class Marker:
        pass

    async def app(scope, receive, send):
        await asyncio.sleep(app_delay_s)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = type("Timeout", (TimeoutMiddleware,), {"__call__": middleware_call})(app, timeout=timeout)
    markers, statuses = [], []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def one_request():
        marker = Marker()
        markers.append(weakref.ref(marker))
        request_context.set(marker)
        del marker
        await middleware({"type": "http"}, receive, send)

    async def main():
        for _ in range(requests):
            await asyncio.create_task(one_request())
        await asyncio.sleep(0.01)  # the loop lets go of the last task
        gc.collect()
        return [ref() is not None for ref in markers]  # while the loop (and its timers) still runs

    alive = asyncio.run(main())
    return alive, statuses


def test_bentoml_request_timers_keep_no_answered_request_alive():
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    from whisper_bento import traffic

    assert traffic.release_request_timers()
    # BentoML's own middleware keeps every answered request's context until its timer fires: if
    # this starts failing, BentoML fixed it and release_request_timers can go.
    alive, statuses = _requests_through(TimeoutMiddleware._bentoml_call, timeout=600)
    assert all(alive) and statuses == [200] * 5
    alive, statuses = _requests_through(TimeoutMiddleware.__call__, timeout=600)
    assert not any(alive) and statuses == [200] * 5
    # The timeout itself still answers 504.
    _, statuses = _requests_through(TimeoutMiddleware.__call__, timeout=0.05, app_delay_s=1.0, requests=1)
    assert statuses == [504]
