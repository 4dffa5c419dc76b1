"""Live transcription over WebSocket: the real ``openai`` SDK's realtime client against one real
``bentoml serve`` (whisper tiny.en), streaming real speech clips.

Live text is compared with the file transcription of the same samples (the turn's audio, cut at
the ``audio_start_ms``/``audio_end_ms`` the server reports) with the same options: the normalized
word error between them is at most ``WER_BOUND`` (same samples, same options, one engine: they are
expected equal; the bound allows a pass shared with other windows to round differently).
"""

from __future__ import annotations

import base64
import json
import queue
import re
import threading
import time

import jiwer
import numpy as np
import pytest

from devkit import audio as wav
from tests.bento.conftest import MODEL_NAME, bentoml_serve, make_registry, server_env, until
from whisper_registry.normalize import normalizer_for

pytestmark = [pytest.mark.server, pytest.mark.real_weights]

KEY = "live-test-key"
MAX_SESSIONS = 5
MAX_EVENT_BYTES = 1_000_000
WER_BOUND = 0.1  # live vs file text of the same samples and options
DELTA_WER_BOUND = 0.25  # the deltas (sent before the final decode) vs the completed text
FIRST_SENTENCE_WORDS = 9  # "the quick brown fox jumps over the lazy dog", the turn's first clip
TIMEOUT_S = 300  # a failure bound only: a loaded 2-core host decodes slowly
normalize = normalizer_for("en")


@pytest.fixture(scope="module")
def server(tmp_path_factory, whisper_tiny_en_ct2):
    root = tmp_path_factory.mktemp("realtime")
    registry = make_registry(root / "registry", whisper_tiny_en_ct2)
    env = server_env(root / "bentoml", registry.uri)
    env["WHISPER_TEST_KEYS"] = KEY
    realtime = {"max_sessions": MAX_SESSIONS, "max_event_bytes": MAX_EVENT_BYTES, "partial_interval_s": 0.5}
    args = {
        "model": f"models:/{MODEL_NAME}@production",
        "compute_type": "int8",
        "api_key": "env:WHISPER_TEST_KEYS",
        "realtime": json.dumps(realtime),
    }
    with bentoml_serve("whisper_bento:Transcriber", args, env, root / "serve.log") as server:
        yield server


@pytest.fixture(scope="module")
def http(server):
    with server.client(key=KEY) as client:
        yield client


@pytest.fixture(scope="module")
def clips(speech_clips):
    return {c.name: wav.read_wav(c.path)[0] for c in speech_clips if c.language == "en"}


def pcm16(samples: np.ndarray) -> np.ndarray:
    """The int16 samples a client sends (what ``write_wav`` stores too)."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")


def silence(seconds: float, rate: int = 16000) -> np.ndarray:
    return np.zeros(int(seconds * rate), dtype="<i2")


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """16 kHz float samples at ``rate`` (what a 24 kHz client would have recorded)."""
    import av

    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    frame = av.AudioFrame.from_ndarray(pcm16(samples).reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = 16000
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame) + resampler.resample(None)]
    return np.concatenate(out).astype("<i2")


def file_text(http, pcm: np.ndarray, rate: int, start_ms: int, end_ms: int) -> str:
    """The file transcription of the samples a turn holds, with the session's options."""
    piece = pcm[start_ms * rate // 1000 : end_ms * rate // 1000]
    upload = {"file": ("turn.wav", wav.pcm16_wav_bytes(piece, rate), "audio/wav")}
    response = http.post("/transcribe", files=upload, data={"language": "en"})
    assert response.status_code == 200, response.text
    return response.json()["text"]


def wer(reference: str, hypothesis: str) -> float:
    return jiwer.wer(normalize(reference), normalize(hypothesis))


class Live:
    """A realtime transcription session of the openai SDK; every server event lands in ``events``."""

    def __init__(self, server, key: str = KEY) -> None:
        import openai

        ws_url = re.sub(r"^http", "ws", server.url) + "/v1"
        self.client = openai.OpenAI(api_key=key, base_url=f"{server.url}/v1", websocket_base_url=ws_url)
        self.manager = self.client.realtime.connect(extra_query={"intent": "transcription"})
        self.connection = self.manager.enter()
        self.events: list = []
        self._new = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            for event in self.connection:
                self.events.append(event)
                self._new.put(event)
        except Exception as exc:  # closed under it: the test reads what came
            self._new.put(exc)

    def configure(self, rate: int = 16000, vad: bool = True, silence_ms: int = 500) -> None:
        turn_detection = {"type": "server_vad", "silence_duration_ms": silence_ms} if vad else None
        self.connection.session.update(
            session={
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": rate},
                        "transcription": {"model": "whisper-1", "language": "en"},
                        "turn_detection": turn_detection,
                    }
                },
            }
        )
        self.wait_for("session.updated")

    def append(self, pcm: np.ndarray) -> None:
        self.connection.input_audio_buffer.append(audio=base64.b64encode(pcm.tobytes()).decode())

    def stream(self, pcm: np.ndarray, rate: int, paced: bool, chunk_s: float = 0.1) -> None:
        step = int(rate * chunk_s)
        started = time.monotonic()
        for i in range(0, len(pcm), step):
            self.append(pcm[i : i + step])
            if paced:  # real-time pace: chunk i is sent when its audio would have been recorded
                time.sleep(max(started + (i + step) / rate - time.monotonic(), 0))

    def of(self, kind: str) -> list:
        return [e for e in list(self.events) if e.type == kind]

    def wait_for(self, kind: str, count: int = 1, timeout_s: float = TIMEOUT_S) -> list:
        return until(lambda: len(self.of(kind)) >= count and self.of(kind), f"{count} {kind} event(s): {self.kinds()}", timeout_s)

    def kinds(self) -> list[str]:
        return [e.type for e in list(self.events)]

    def close(self) -> None:
        self.connection.close()
        self.reader.join(timeout=30)


def one_long_turn(clips) -> np.ndarray:
    """Three sentences with short pauses: one turn of about 7 s (for a silence_duration_ms of 1 s)."""
    gap = np.zeros(3200, dtype=np.float32)
    return np.concatenate([clips["quick_brown_fox"], gap, clips["counting"], gap, clips["hello_world"]])


def test_live_text_firms_up_during_the_turn_and_ends_as_the_file_text(server, http, clips):
    speech = pcm16(one_long_turn(clips))
    pcm = np.concatenate([silence(0.5), speech, silence(2.0)])
    live = Live(server)
    try:
        live.wait_for("session.created")
        live.configure(rate=16000, silence_ms=1000)
        live.stream(pcm[: 8000 + len(speech)], 16000, paced=True)
        # The turn stays open while no audio comes: it must yield deltas before it ends.
        live.wait_for("conversation.item.input_audio_transcription.delta")
        live.stream(pcm[8000 + len(speech) :], 16000, paced=True)
        (completed,) = live.wait_for("conversation.item.input_audio_transcription.completed")
    finally:
        live.close()
    kinds = live.kinds()
    assert kinds[0] == "session.created"
    assert kinds.count("input_audio_buffer.speech_started") == 1 and kinds.count("input_audio_buffer.committed") == 1
    assert "error" not in kinds, live.of("error")
    deltas = live.of("conversation.item.input_audio_transcription.delta")
    assert kinds.index("conversation.item.input_audio_transcription.delta") < kinds.index("input_audio_buffer.speech_stopped")
    assert {d.item_id for d in deltas} == {completed.item_id}
    assert all(d.delta.strip() and (i == 0) != d.delta.startswith(" ") for i, d in enumerate(deltas))  # each adds words
    # The deltas are what interim decodes agreed on; the final decode may spell the rest of the
    # turn otherwise (numerals for words), so they are held to the first sentence's words.
    said, final = normalize("".join(d.delta for d in deltas)).split(), normalize(completed.transcript).split()
    n = min(len(said), FIRST_SENTENCE_WORDS)
    assert jiwer.wer(" ".join(final[:n]), " ".join(said[:n])) <= DELTA_WER_BOUND, (said, final)
    (started,) = live.of("input_audio_buffer.speech_started")
    (stopped,) = live.of("input_audio_buffer.speech_stopped")
    assert started.audio_start_ms <= 500 < stopped.audio_end_ms and stopped.audio_end_ms > 500 + len(speech) / 16
    reference = file_text(http, pcm, 16000, started.audio_start_ms, stopped.audio_end_ms)
    print(f"deltas {[d.delta for d in deltas]}; completed {completed.transcript!r}; file {reference!r}")
    assert wer(reference, completed.transcript) <= WER_BOUND, (reference, completed.transcript)
    assert "fox" in completed.transcript.lower() and completed.usage.type == "duration"


def test_two_turns_at_24khz_sent_as_fast_as_possible(server, http, clips):
    first, second = (resample(clips[n], 24000) for n in ("quick_brown_fox", "counting"))
    pcm = np.concatenate([silence(0.3, 24000), first, silence(1.5, 24000), second, silence(1.5, 24000)])
    live = Live(server)
    try:
        live.configure(rate=24000)
        live.stream(pcm, 24000, paced=False, chunk_s=0.5)
        completed = live.wait_for("conversation.item.input_audio_transcription.completed", 2)
    finally:
        live.close()
    assert "error" not in live.kinds(), live.of("error")
    started, stopped = live.of("input_audio_buffer.speech_started"), live.of("input_audio_buffer.speech_stopped")
    committed = live.of("input_audio_buffer.committed")
    assert len(started) == len(stopped) == len(committed) == 2
    assert [c.item_id for c in committed] == [c.item_id for c in completed] == [s.item_id for s in started]
    assert committed[1].previous_item_id == committed[0].item_id
    assert stopped[0].audio_end_ms <= started[1].audio_start_ms
    for begin, end, done, word in zip(started, stopped, completed, ("fox", "three"), strict=True):
        reference = file_text(http, pcm, 24000, begin.audio_start_ms, end.audio_end_ms)
        print(f"24 kHz turn: completed {done.transcript!r}; file {reference!r}")
        assert wer(reference, done.transcript) <= WER_BOUND, (reference, done.transcript)
        assert word in normalize(done.transcript) or word == "three" and "3" in normalize(done.transcript)


def _passes_shared(metrics_text: str) -> float:
    """Forward passes that held more than one request (whisper_batch_size)."""
    total = single = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("whisper_batch_size_count"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("whisper_batch_size_bucket") and 'le="1.0"' in line:
            single += float(line.rsplit(" ", 1)[1])
    return total - single


def test_four_sessions_at_once_share_forward_passes(server, http, clips):
    before = _passes_shared(http.get("/metrics").text)
    names = ["quick_brown_fox", "counting", "hello_world", "quick_brown_fox"]
    lives = [Live(server) for _ in names]
    barrier = threading.Barrier(len(lives))

    def run(live: Live, name: str) -> None:
        live.configure(rate=16000, vad=False)
        live.stream(pcm16(clips[name]), 16000, paced=False)
        barrier.wait(timeout=TIMEOUT_S)  # the four commits together: their final decodes meet in the engine
        live.connection.input_audio_buffer.commit()
        live.wait_for("conversation.item.input_audio_transcription.completed")

    threads = [threading.Thread(target=run, args=(live, name)) for live, name in zip(lives, names, strict=True)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=TIMEOUT_S)
    finally:
        for live in lives:
            live.close()
    texts = [live.of("conversation.item.input_audio_transcription.completed") for live in lives]
    assert all(len(t) == 1 for t in texts), [live.kinds() for live in lives]
    assert "fox" in texts[0][0].transcript.lower() and "fox" in texts[3][0].transcript.lower()
    assert _passes_shared(http.get("/metrics").text) > before


def test_bad_events_each_get_an_error_and_the_session_goes_on(server, clips):
    live = Live(server)
    try:
        live.configure(rate=16000, vad=False)
        bad = [
            ({"type": "input_audio_buffer.append", "audio": "not base64!", "event_id": "e1"}, "invalid_audio"),
            ({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01\x02\x03").decode(), "event_id": "e2"}, "invalid_audio"),
            (
                {
                    "type": "session.update",
                    "session": {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcmu"}}}},
                    "event_id": "e3",
                },
                "unsupported_format",
            ),
            (
                {
                    "type": "session.update",
                    "event_id": "e4",
                    "session": {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 44100}}}},
                },
                "unsupported_format",
            ),
            ({"type": "response.create", "event_id": "e5"}, "unknown_event"),
            ({"type": "input_audio_buffer.append", "audio": "A" * MAX_EVENT_BYTES, "event_id": "e6"}, "event_too_large"),
            ({"type": "input_audio_buffer.commit", "event_id": "e7"}, "input_audio_buffer_commit_empty"),
        ]
        for n, (event, code) in enumerate(bad, start=1):
            live.connection.send_raw(json.dumps(event))
            error = live.wait_for("error", n)[-1].error
            unread = code == "event_too_large"  # refused before it is parsed: its event_id is not read
            assert (error.code, error.event_id) == (code, None if unread else event["event_id"]), error
            assert error.type == "invalid_request_error" and error.message
        live.connection.send_raw("[not, json")  # no event at all: an error too
        live.wait_for("error", len(bad) + 1)
        live.stream(pcm16(clips["quick_brown_fox"]), 16000, paced=False)
        live.connection.input_audio_buffer.commit()
        (completed,) = live.wait_for("conversation.item.input_audio_transcription.completed")
    finally:
        live.close()
    assert "fox" in completed.transcript.lower()  # the session went on, at 16 kHz as configured before the errors


def _raw(server, query: str = "?intent=transcription", **options):
    from websockets.sync.client import connect

    return connect(re.sub(r"^http", "ws", server.url) + "/v1/realtime" + query, open_timeout=60, **options)


def test_a_session_needs_the_key(server):
    from websockets.exceptions import InvalidStatus

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        with pytest.raises(InvalidStatus) as refused:
            _raw(server, additional_headers=headers)
        assert refused.value.response.status_code == 401
        assert json.loads(refused.value.response.body)["error"]["code"] == "invalid_api_key"
    with pytest.raises(InvalidStatus):
        _raw(server, subprotocols=["realtime", "openai-insecure-api-key.wrong"])
    with pytest.raises(InvalidStatus):
        Live(server, key="wrong")
    # What a browser can send: the key as a subprotocol beside "realtime", or in the query.
    for options, query in (
        ({"subprotocols": ["realtime", f"openai-insecure-api-key.{KEY}"]}, "?intent=transcription"),
        ({}, f"?intent=transcription&api_key={KEY}"),
    ):
        with _raw(server, query, **options) as ws:
            assert json.loads(ws.recv(timeout=60))["type"] == "session.created"
            assert ws.subprotocol == options.get("subprotocols", [None])[0]


def _held(http) -> float:
    lines = [line for line in http.get("/metrics").text.splitlines() if line.startswith("whisper_requests_held")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_sessions_over_capacity_are_told_to_retry_and_a_gone_client_frees_its_place(server, http, long_speech):
    from websockets.exceptions import ConnectionClosed

    auth = {"additional_headers": {"Authorization": f"Bearer {KEY}"}}
    speech = pcm16(wav.read_wav(long_speech)[0][: 25 * 16000])
    held = [_raw(server, **auth) for _ in range(MAX_SESSIONS)]
    try:
        created = [json.loads(ws.recv(timeout=60)) for ws in held]
        assert all(event["type"] == "session.created" for event in created)
        with _raw(server, **auth) as refused:
            event = json.loads(refused.recv(timeout=60))
            assert event["type"] == "error" and event["error"]["code"] == "sessions_full"
            with pytest.raises(ConnectionClosed):
                refused.recv(timeout=60)
            assert refused.close_code == 1013
        # One client commits a long turn and leaves while it is being decoded.
        leaving = held.pop()
        update = {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}}}
        leaving.send(json.dumps({"type": "session.update", "session": update}))
        for i in range(0, len(speech), 16000):
            leaving.send(
                json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(speech[i : i + 16000].tobytes()).decode()})
            )
        leaving.send(json.dumps({"type": "input_audio_buffer.commit"}))
        until(lambda: json.loads(leaving.recv(timeout=60))["type"] == "input_audio_buffer.committed", "the turn committed")
        leaving.close()  # while its turn is decoded (seconds of work): the decode is cancelled, not finished
        until(lambda: _held(http) == 0, "the engine lets go of the gone client's decodes")
        leaving_id = created[-1]["session"]["id"]
        ended = rf"Realtime session {leaving_id} ended; [1-9]\d* decode\(s\) in flight cancelled"
        until(lambda: re.search(ended, server.log_text()), "the gone client's session ended with its decode cancelled")
        with _raw(server, **auth) as again:  # and its session's place is free
            assert json.loads(again.recv(timeout=60))["type"] == "session.created"
    finally:
        for ws in held:
            ws.close()
    assert "Task exception was never retrieved" not in server.log_text()
