"""The service's page in headless Chromium, used as a person uses it: with an API key configured,
no key shows the service's 401 message and the key typed into the page opens it; the served
version and its decoding defaults are shown; a file picked in the page is transcribed in every
response format, with timestamps, as the service itself answers it; and the microphone
(Chromium's fake one, fed a real clip) is transcribed live over the realtime socket.

One real ``bentoml serve`` (whisper tiny.en). Screenshots are kept in the folder
``WHISPER_TEST_ARTIFACTS`` names, else in the test's tmp dir; each path is printed.
"""

from __future__ import annotations

import json
import os
import re
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from devkit.audio import SAMPLE_RATE, write_wav
from tests.bento.chromium import Browser, require_chromium
from tests.bento.conftest import VERSION_DECODING, bentoml_serve, make_registry, server_env

pytestmark = [pytest.mark.server, pytest.mark.real_weights]

NAME = "whisper-tiny-en"
KEY = "page-test-key"
FORMATS = ("native", "verbose_json", "json", "text", "srt", "vtt")
TIMESTAMPED = ("native", "verbose_json")  # the formats whose segments the page tabulates
FILE_STATE = "document.getElementById('file-section').dataset.state"


@pytest.fixture(scope="module")
def server(tmp_path_factory, whisper_tiny_en_ct2):
    require_chromium()  # before a server is started for nothing
    root = tmp_path_factory.mktemp("try-page")
    registry = make_registry(root / "registry", whisper_tiny_en_ct2, name=NAME)
    env = server_env(root / "bentoml", registry.uri)
    env["WHISPER_TEST_PAGE_KEY"] = KEY
    args = {"model": f"models:/{NAME}@production", "compute_type": "int8", "api_key": "env:WHISPER_TEST_PAGE_KEY"}
    with bentoml_serve("whisper_bento:Transcriber", args, env, root / "serve.log") as server:
        server.registered_version = registry.version
        yield server


@pytest.fixture(scope="module")
def fox(speech_clips):
    return next(c for c in speech_clips if c.name == "quick_brown_fox")


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("WHISPER_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _keep(browser: Browser, artifacts: Path, name: str) -> None:
    print(f"screenshot: {browser.screenshot(artifacts / f'page-{name}.png')}")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _service_answer(server, clip, response_format: str) -> tuple[str, list[dict]]:
    """The words and segments the service itself gives for ``clip`` in ``response_format``."""
    route, data = ("/transcribe", {}) if response_format == "native" else ("/v1/audio/transcriptions", {"response_format": response_format})
    with server.client(key=KEY) as http:
        answer = http.post(route, files={"file": ("clip.wav", clip.path.read_bytes())}, data=data)
    assert answer.status_code == 200, answer.text
    if response_format in ("text", "srt", "vtt"):
        lines = [line for line in answer.text.splitlines() if line.strip() and "-->" not in line and line not in ("WEBVTT",)]
        return " ".join(line for line in lines if not line.strip().isdigit()), []
    body = answer.json()
    return body["text"], body.get("segments", [])


def _open_with_key(browser: Browser, server) -> None:
    browser.open(f"{server.url}/")
    browser.evaluate(f"document.getElementById('api-key').value = {json.dumps(KEY)}; document.getElementById('key-use').click()")
    browser.wait_for("document.getElementById('served').dataset.state === 'ready'", "the page read /info with the key")


def _upload(browser: Browser, path: Path, response_format: str) -> tuple[str, str]:
    """Pick ``path`` in the page with ``response_format`` chosen: (the section's end state, its status line)."""
    browser.evaluate(f"document.getElementById('format').value = {json.dumps(response_format)}; "
                     f"document.getElementById('file').value = ''; {FILE_STATE} = 'idle'")
    browser.set_files("#file", path)
    state = browser.wait_for(f"['done', 'error'].includes({FILE_STATE}) && {FILE_STATE}", f"{response_format}: an answer shown")
    return state, browser.evaluate("document.getElementById('file-status').textContent")


@pytest.fixture
def browser(tmp_path):
    with Browser(tmp_path / "profile", tmp_path / "chromium.log") as browser:
        yield browser


def test_the_page_alone_is_open_without_a_key(server):
    with server.client() as http:
        page = http.get("/")
        assert page.status_code == 200 and "<title>Whisper speech-to-text</title>" in page.text
        for path in ("/info", "/v1/models", "/docs.json", "/docs"):
            assert http.get(path).status_code == 401, path


def test_without_the_key_the_page_shows_the_services_401_message(server, browser, fox, artifacts):
    browser.open(f"{server.url}/")
    assert browser.evaluate("document.title") == "Whisper speech-to-text"
    browser.wait_for("document.getElementById('served').dataset.state === 'error'", "the page was refused /info")
    assert "needs an API key" in browser.evaluate("document.getElementById('key-status').textContent")
    state, message = _upload(browser, fox.path, "verbose_json")
    assert state == "error"
    assert "Missing or wrong API key" in message and "Enter the service's API key above." in message, message
    assert browser.evaluate("document.getElementById('transcript').textContent") == ""
    _keep(browser, artifacts, "no-key")


def test_with_the_key_it_shows_the_served_version_and_its_defaults(server, browser, artifacts):
    _open_with_key(browser, server)
    served = browser.evaluate("document.getElementById('served-model').textContent")
    assert f"{NAME} version {server.registered_version} @production" in served, served
    assert browser.evaluate("document.getElementById('package-version').textContent") == metadata.version("mlflow-faster-whisper")
    rows = browser.evaluate("[...document.querySelectorAll('#defaults tr')].map(r => [...r.cells].map(c => c.textContent))")
    shown = {name: (json.loads(value), source) for name, value, source in rows}
    with server.client(key=KEY) as http:
        decoding = http.get("/info").json()["decoding"]
    assert set(VERSION_DECODING) <= set(decoding["version_defaults"]) and not decoding["service_defaults"]
    assert shown == {name: (value, "model version" if name in decoding["version_defaults"] else "")
                     for name, value in decoding["effective"].items()}
    assert shown["beam_size"] == (VERSION_DECODING["beam_size"], "model version")
    _keep(browser, artifacts, "served")


def test_a_picked_file_is_transcribed_in_every_format_as_the_service_answers(server, browser, fox, artifacts):
    _open_with_key(browser, server)
    for response_format in FORMATS:
        state, message = _upload(browser, fox.path, response_format)
        assert state == "done", (response_format, message)
        expected, segments = _service_answer(server, fox, response_format)
        shown = browser.evaluate("document.getElementById('transcript').textContent")
        assert _words(shown) == _words(expected) and _words(shown), (response_format, shown, expected)
        times = browser.evaluate("[...document.querySelectorAll('#segments td.time')].map(c => c.textContent)")
        if response_format in TIMESTAMPED:  # one row per segment, each with its start and end
            assert len(times) == len(segments) > 0, (response_format, times)
            assert all(re.fullmatch(r"\d+:\d\d\.\d\d – \d+:\d\d\.\d\d", t) for t in times), times
        elif response_format in ("srt", "vtt"):  # the captions as sent, timings included
            assert "-->" in browser.evaluate("document.getElementById('raw').textContent")
        if response_format == "verbose_json":
            _keep(browser, artifacts, "file")


def test_the_fake_microphone_is_transcribed_live(server, tmp_path, fox, artifacts):
    # The clip between silences: the server's VAD hears a turn start and end. Played once.
    silence = np.zeros(SAMPLE_RATE, dtype=np.float32)
    wav = tmp_path / "microphone.wav"
    write_wav(wav, np.concatenate([silence, fox.samples(), silence, silence, silence]))
    microphone = ("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                  f"--use-file-for-fake-audio-capture={wav}%noloop", "--autoplay-policy=no-user-gesture-required")
    expected, _ = _service_answer(server, fox, "json")
    with Browser(tmp_path / "profile", tmp_path / "chromium.log", microphone) as browser:
        _open_with_key(browser, server)
        browser.evaluate("document.getElementById('record').click()", gesture=True)
        final = "[...document.querySelectorAll('#live p.final')].map(p => p.textContent).join(' ').trim()"
        status = "document.getElementById('live-status').textContent"
        live = browser.wait_for(f"{final} || (document.getElementById('record-section').dataset.state === 'error' && 'error: ' + {status})",
                                "a turn's final text shown", timeout_s=300)
        assert not live.startswith("error: "), live
        _keep(browser, artifacts, "live")
        heard, said = set(_words(live)), set(_words(expected))
        assert len(heard & said) * 2 >= len(said), (live, expected)  # the live text is the clip's words, mostly
        browser.evaluate("document.getElementById('record').click()", gesture=True)
        browser.wait_for("document.getElementById('record-section').dataset.state === 'stopped'", "recording stopped")
