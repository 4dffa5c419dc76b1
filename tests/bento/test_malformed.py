"""What an attacker or a careless client sends, against a real ``bentoml serve`` (whisper-tiny.en,
locked with API keys): every malformed request gets a 4xx JSON error that names the problem (or
a correct 200 where it is valid audio in disguise), requests in flight on the same worker still
succeed, and the worker is never replaced.

The corpus is generated here at test time; nothing binary is in git.
"""

from __future__ import annotations

import json
import struct
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from mlflow_faster_whisper.decoding import DecodingOptions

from tests.bento.conftest import bentoml_serve, make_registry, server_env
from devkit import audio as wav
from devkit.processes import bentoml_worker_pid

pytestmark = [pytest.mark.server, pytest.mark.real_weights]

NAME = "whisper-tiny-en"
KEYS = ("key-one-0123456789", "key-two-abcdefghij")
MAX_AUDIO_SECONDS = 20
MAX_UPLOAD_BYTES = 3_000_000
NATIVE, OPENAI = "/transcribe", "/v1/audio/transcriptions"


@pytest.fixture(scope="module")
def server(tmp_path_factory, whisper_tiny_en_ct2):
    root = tmp_path_factory.mktemp("malformed")
    registry = make_registry(root / "registry", whisper_tiny_en_ct2, name=NAME)
    env = server_env(root / "bentoml", registry.uri)
    env["WHISPER_TEST_KEYS"] = ",".join(KEYS)
    args = {
        "model": f"models:/{NAME}@production",
        "compute_type": "int8",
        "max_audio_seconds": str(MAX_AUDIO_SECONDS),
        "max_upload_bytes": str(MAX_UPLOAD_BYTES),
        "api_key": "env:WHISPER_TEST_KEYS",
    }
    with bentoml_serve("whisper_bento:Transcriber", args, env, root / "serve.log") as server:
        yield server


@pytest.fixture(scope="module")
def http(server):
    with server.client(key=KEYS[1]) as client:
        yield client


@pytest.fixture(scope="module")
def fox(speech_clips):
    return next(c for c in speech_clips if c.name == "quick_brown_fox")


@pytest.fixture(scope="module")
def hello(speech_clips):
    return next(c for c in speech_clips if c.name == "hello_world")


@dataclass
class Case:
    name: str
    path: str
    status: int
    words: str = ""  # the error message must contain them (for a 200: the transcript must)
    file: Optional[bytes] = None
    filename: str = "clip.wav"
    data: dict[str, Any] = field(default_factory=dict)
    content: Optional[bytes] = None  # a raw body instead of multipart
    headers: dict[str, str] = field(default_factory=dict)


def _riff(fmt: bytes, payload: bytes, *, declared: Optional[int] = None) -> bytes:
    data_size = len(payload) if declared is None else declared
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", data_size) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _pcm_fmt(channels: int, rate: int) -> bytes:
    return struct.pack("<HHIIHH", 1, channels, rate, rate * 2 * channels, 2 * channels, 16)


def _png() -> bytes:
    header = struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 52)) + chunk(b"IEND", b"")


def _zip() -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("clip.wav", b"RIFF" + b"\0" * 100)
    return buffer.getvalue()


def _audio_cases(fox) -> list[Case]:
    """Bodies sent as the ``file`` of both endpoints."""
    speech = fox.samples()
    pcm = (np.clip(speech, -1, 1) * 32767).astype("<i2").tobytes()
    good = _riff(_pcm_fmt(1, 16000), pcm)
    upsampled = np.interp(np.arange(len(speech) * 24) / 24, np.arange(len(speech)), speech)  # 384 kHz
    pcm_384k = (np.clip(upsampled, -1, 1) * 32767).astype("<i2").tobytes()
    flac = wav.encode(speech, "flac", "flac", 16000, channels=1)
    mp3 = wav.encode(speech, "mp3", "libmp3lame", 16000, channels=1)
    opus = wav.encode(np.interp(np.arange(len(speech) * 3) / 3, np.arange(len(speech)), speech), "ogg", "libopus", 48000, channels=1)
    long_speech = np.tile(speech, 1 + int(MAX_AUDIO_SECONDS * 16000 / len(speech)))
    return [
        Case("empty file", "", 400, "empty", file=b""),
        Case("text bytes", "", 400, "audio", file=b"this is not audio, just words " * 40),
        Case("png image", "", 400, "audio", file=_png(), filename="clip.png"),
        Case("pdf document", "", 400, "audio", file=b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n" * 20),
        Case("zip archive", "", 400, "audio", file=_zip(), filename="clip.zip"),
        Case("html page", "", 400, "audio", file=b"<!doctype html><html><body>" + b"<p>hi</p>" * 200 + b"</body></html>"),
        Case("riff header only", "", 400, "audio", file=good[:12]),
        Case("truncated wav header", "", 400, "audio", file=good[:30]),
        Case("wav cut mid-data", "", 400, "truncated", file=good[: len(good) // 2]),
        Case("wav declaring 4x its data", "", 400, "truncated", file=_riff(_pcm_fmt(1, 16000), pcm, declared=4 * len(pcm))),
        Case("wav at 0 Hz", "", 400, "audio", file=_riff(_pcm_fmt(1, 0), pcm)),
        Case("wav with 0 channels", "", 400, "audio", file=_riff(_pcm_fmt(0, 16000), pcm)),
        Case("wav with 255 channels", "", 400, "audio", file=_riff(_pcm_fmt(255, 16000), pcm[: len(pcm) // 510 * 510])),
        Case("wav with no samples", "", 400, "0 seconds", file=_riff(_pcm_fmt(1, 16000), b"")),
        Case("float wav of NaN", "", 400, "NaN or infinite", file=wav.float_wav_bytes(np.full(16000, np.nan))),
        Case("float wav with one inf", "", 400, "NaN or infinite", file=wav.float_wav_bytes(np.r_[speech, np.inf])),
        Case("float wav at 1e30", "", 400, "far outside", file=wav.float_wav_bytes(speech * 1e30)),
        Case("speech at 384 kHz", "", 200, "fox", file=_riff(_pcm_fmt(1, 384000), pcm_384k)),
        Case("speech as flac", "", 200, "fox", file=flac, filename="clip.flac"),
        Case("speech as mp3", "", 200, "fox", file=mp3, filename="clip.mp3"),
        Case("speech as ogg opus", "", 200, "fox", file=opus, filename="clip.ogg"),
        Case("flac cut to a third", "", 200, "quick", file=flac[: len(flac) // 3 * 2]),
        Case("mp3 cut to a header", "", 400, "audio", file=mp3[:64]),
        Case("ogg cut to a header", "", 400, "", file=opus[:80]),
        Case("path-like file name", "", 200, "fox", file=good, filename="../../../../etc/passwd"),
        Case("3 h flac bomb", "", 413, "10799", file=wav.silence_bomb(3 * 3600)),
        Case("too long for the service", "", 413, "limit here is 20 s", file=wav.float_wav_bytes(long_speech)),
        Case("upload over the limit", "", 413, "bytes", file=b"\0" * (MAX_UPLOAD_BYTES + 1)),
    ]


def _request_cases(fox) -> list[Case]:
    good = fox.path.read_bytes()
    two_thousand = {f"field{i}": "1" for i in range(2000)}
    return [
        # Options that passed validation and then crashed faster-whisper or CTranslate2.
        *[
            Case(f"{name}={value}", NATIVE, 422, name, file=good, data={name: value})
            for name, value in [
                ("temperature", "NaN"), ("temperature", "Infinity"), ("temperature", "[0, 99]"),
                ("length_penalty", "NaN"), ("length_penalty", "Infinity"), ("length_penalty", "5e16"),
                ("no_speech_threshold", "NaN"), ("compression_ratio_threshold", "-Infinity"),
                ("log_prob_threshold", "NaN"), ("patience", "1e308"), ("max_initial_timestamp", "1e308"),
                ("repetition_penalty", "1e-300"), ("max_new_tokens", "100000"), ("max_new_tokens", "300"),
                ("suppress_tokens", "[99999999]"), ("suppress_tokens", "[51864]"), ("suppress_tokens", "[-7]"),
                ("beam_size", "1000000000000000000000000000000"), ("best_of", "1000"),
                ("no_repeat_ngram_size", "100000000000000000000"), ("language_detection_segments", "1e9"),
                ("vad_parameters", '{"speech_pad_ms": 1e30}'), ("vad_parameters", "{not json"),
                ("initial_prompt", "x" * 10_001), ("chunk_length", "0"), ("beam_size", "6"),  # above max_beam_size
            ]
        ],
        Case("vad defaults as {}", NATIVE, 200, "fox", file=good, data={"vad_filter": "true", "vad_parameters": "{}"}),
        Case("unknown option", NATIVE, 422, "beam_size", file=good, data={"beem_size": "1"}),
        Case("word option value", NATIVE, 422, "temperature", file=good, data={"temperature": "hot"}),
        Case("unknown model on /transcribe", NATIVE, 404, "does not exist", file=good, data={"model": "/etc/passwd"}),
        Case("2000 form fields", NATIVE, 400, "", file=good, data=two_thousand),
        Case("file as a text field", NATIVE, 400, "file upload", data={"file": "clip.wav"}),
        Case("no file", NATIVE, 400, "file", data={"language": "en"}),
        Case("json body", NATIVE, 400, "multipart", content=b'{"file": "x"}', headers={"content-type": "application/json"}),
        Case("no content type", NATIVE, 400, "multipart", content=good),
        Case("broken multipart", NATIVE, 400, "", content=b"--xyz\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
             headers={"content-type": "multipart/form-data; boundary=abc"}),
        Case("multipart without boundary", NATIVE, 400, "", content=b"abc", headers={"content-type": "multipart/form-data"}),
        # The OpenAI endpoint's own fields.
        Case("openai unknown model", OPENAI, 404, "does not exist", file=good, data={"model": "../../etc/passwd"}),
        Case("openai whisper-1 is the first model", OPENAI, 200, "fox", file=good, data={"model": "whisper-1"}),
        Case("openai temperature NaN", OPENAI, 422, "temperature", file=good, data={"temperature": "NaN"}),
        Case("openai language xx", OPENAI, 422, "language", file=good, data={"language": "xx"}),
        Case("openai response_format xml", OPENAI, 422, "response_format", file=good, data={"response_format": "xml"}),
        Case("openai granularity char", OPENAI, 422, "timestamp_granularities", file=good, data={"timestamp_granularities[]": "char"}),
        Case("openai prompt too long", OPENAI, 422, "initial_prompt", file=good, data={"prompt": "y" * 10_001}),
        Case("openai unknown field", OPENAI, 422, "Unknown field", file=good, data={"beam_size": "2"}),
    ]


def _corpus(fox) -> list[Case]:
    cases = []
    for case in _audio_cases(fox):
        for path in (NATIVE, OPENAI):
            cases.append(Case(**{**case.__dict__, "name": f"{case.name} {path}", "path": path}))
    return cases + _request_cases(fox)


def _send(http: httpx.Client, case: Case) -> httpx.Response:
    if case.content is not None:
        return http.post(case.path, content=case.content, headers=case.headers)
    files = None if case.file is None else {"file": (case.filename, case.file, "application/octet-stream")}
    return http.post(case.path, files=files, data=case.data or None)


def test_malformed_corpus_gets_4xx_json_while_requests_in_flight_succeed(server, http, fox):
    corpus = _corpus(fox)
    assert len(corpus) >= 60
    pid = bentoml_worker_pid(server.url)
    in_flight: list[httpx.Response] = []
    stop = threading.Event()

    def good_requests():  # on the same worker, all through the corpus
        with server.client(key=KEYS[0]) as client:
            while not stop.is_set():
                with open(fox.path, "rb") as f:
                    in_flight.append(client.post(NATIVE, files={"file": f}, data={"temperature": "0"}))

    threads = [threading.Thread(target=good_requests) for _ in range(2)]
    for thread in threads:
        thread.start()
    failures = []
    try:
        for case in corpus:
            response = _send(http, case)
            try:
                body = response.json()
            except json.JSONDecodeError:
                failures.append((case.name, response.status_code, response.text[:200]))
                continue
            if response.status_code != case.status:
                failures.append((case.name, response.status_code, body))
            elif case.status == 200 and case.words not in body["text"].lower():
                failures.append((case.name, 200, body["text"]))
            elif case.status != 200 and (case.words not in body["error"]["message"] or body["error"]["type"] != "invalid_request_error"):
                failures.append((case.name, response.status_code, body))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, "\n".join(map(str, failures))
    assert len(in_flight) >= 2
    assert all(r.status_code == 200 and "fox" in r.json()["text"].lower() for r in in_flight), [r.text for r in in_flight if r.status_code != 200]
    assert bentoml_worker_pid(server.url) == pid  # the worker was never replaced
    assert "Traceback" not in server.log_text()


def test_every_route_but_the_probes_needs_a_key(server, fox):
    with server.client() as anonymous:
        assert anonymous.get("/livez").status_code == 200
        assert anonymous.get("/readyz").status_code == 200
        for method, path in [("GET", "/info"), ("GET", "/metrics"), ("GET", "/v1/models"), ("POST", NATIVE), ("POST", OPENAI)]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": KEYS[0]}):
                response = anonymous.request(method, path, headers=headers)
                assert response.status_code == 401, (path, headers, response.text)
                assert response.json()["error"]["code"] == "invalid_api_key"
                assert response.headers["www-authenticate"] == "Bearer"


def test_the_openai_client_sends_its_api_key(server, fox):
    openai = pytest.importorskip("openai")
    for key in KEYS:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, timeout=300)
        with open(fox.path, "rb") as f:
            assert "fox" in client.audio.transcriptions.create(model="whisper-1", file=f).text.lower()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", timeout=300).models.list()


def test_info_never_shows_the_keys(http, server):
    text = http.get("/info").text
    assert all(key not in text for key in KEYS)
    assert json.loads(text)["config"]["api_key"] is True  # configured; where the keys are is not shown
    assert "WHISPER_TEST_KEYS" not in text
    assert all(key not in server.log_text() for key in KEYS)


# ------------------------------------------------------------------ generated inputs, bounded

def test_schemathesis_finds_no_server_error_and_no_undocumented_status(server, http):
    """Every operation of the service's own OpenAPI (``/docs.json``), bounded: never a 5xx, and
    every status it answers is documented there."""
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import status_code_conformance

    schema = schemathesis.openapi.from_url(f"{server.url}/docs.json", headers=dict(http.headers))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {NATIVE, OPENAI, "/v1/audio/translations", "/v1/models", "/info"}
    calls = []
    for operation in operations:

        @hypothesis_settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), phases=[Phase.generate])
        @given(case=operation.as_strategy())
        def call(case):
            response = case.call_and_validate(
                headers=dict(http.headers), checks=[not_a_server_error, status_code_conformance], timeout=300
            )
            calls.append((operation.path, response.status_code))

        call()
    assert len(calls) >= 5 * len(operations)
    assert {status for path, status in calls if path == NATIVE} >= {400}  # the bodies reached the routes


_OPTION_NAMES = sorted(DecodingOptions.model_fields) + ["stream", "response_format", "beem_size"]
_TEXT_VALUES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["NaN", "nan", "Infinity", "-inf", "1e308", "-1e308", "5e-324", "0", "-1", "[]", "[-1]", "{}", "null",
                     "true", "[0, 1e400]", '{"threshold": NaN}', "9" * 40, "1_000", "0x10", "\x00", "ｅｎ"]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.lists(st.integers(min_value=-(2**40), max_value=2**40), max_size=4).map(json.dumps),
)


@hypothesis_settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(fields=st.dictionaries(st.sampled_from(_OPTION_NAMES), _TEXT_VALUES, min_size=1, max_size=4))
def test_any_form_fields_get_an_answer_never_a_server_error(http, hello, fields):
    with open(hello.path, "rb") as f:
        response = http.post(NATIVE, files={"file": f}, data=fields)
    assert response.status_code < 500, (fields, response.text[:500])
    if response.status_code != 200:
        body = response.json()
        assert body["error"]["message"] and body["error"]["type"] == "invalid_request_error", (fields, body)
