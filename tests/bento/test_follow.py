"""A service started on models:/NAME@ALIAS follows the alias: a real `bentoml serve`, a real
sqlite registry, whisper-tiny.en, a request loop from several clients while the alias moves."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

import mlflow_faster_whisper as mfw

from tests.bento.conftest import bentoml_serve, make_registry, server_env

pytestmark = [pytest.mark.real_weights, pytest.mark.server]

NAME = "tiny-follow"
HEADER = "x-whisper-model-version"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class _Loop:
    """Clients posting a clip in a loop; every answer's status and version, in order."""

    def __init__(self, server, clip: Path, clients: int = 3):
        self.answers: list[tuple[float, int, str]] = []
        self.stop = threading.Event()
        self.go = threading.Event()  # cleared: the clients send nothing new (pause)
        self.go.set()
        self.in_flight = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(server, clip), daemon=True) for _ in range(clients)]

    def _run(self, server, clip: Path) -> None:
        data = clip.read_bytes()
        with server.client(timeout=120) as http:
            while not self.stop.is_set():
                if not self.go.wait(0.1):
                    continue
                with self._lock:
                    self.in_flight += 1
                try:
                    r = http.post("/transcribe", files={"file": ("clip.wav", data, "audio/wav")})
                    self.answers.append((time.monotonic(), r.status_code, r.headers.get(HEADER, "")))
                except Exception as exc:  # a dropped connection is a failed request too
                    self.answers.append((time.monotonic(), 0, repr(exc)))
                finally:
                    with self._lock:
                        self.in_flight -= 1

    def pause(self, settle_s: float = 2.0) -> None:
        """Until no request is in flight (and the service has settled)."""
        self.go.clear()
        while self.in_flight:
            time.sleep(0.05)
        time.sleep(settle_s)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def first_answer_by(self, version: str, after: float, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [t for t, status, v in list(self.answers) if t > after and status == 200 and v == version]
            if hits:
                return hits[0]
            time.sleep(0.1)
        raise AssertionError(f"no answer by version {version} within {timeout} s: {self.answers[-5:]}")


def test_the_service_follows_its_alias_without_a_failed_request(tmp_path, whisper_tiny_en_ct2, speech_clips):
    registry = make_registry(tmp_path / "registry", whisper_tiny_en_ct2, name=NAME)  # version 1 @production
    client = MlflowClient(registry.uri)
    mlflow.set_tracking_uri(registry.uri)
    try:
        mlflow.set_experiment("bento")
        for _ in range(2):  # versions 2 and 3: the same weights, each logged on its own
            with mlflow.start_run():
                mfw.log_model(str(whisper_tiny_en_ct2), name="model", registered_model_name=NAME)
        # Version 3 is tampered with after registration: its checksums no longer hold.
        logged = client.get_logged_model(client.get_model_version(NAME, "3").source.removeprefix("models:/"))
    finally:
        mlflow.set_tracking_uri(None)
    config = Path(logged.artifact_location.removeprefix("file://")) / "model" / "config.json"
    with open(config, "a") as f:
        f.write(" ")

    clip = next(c for c in speech_clips if c.name == "quick_brown_fox").path
    args = {"model": f"models:/{NAME}@production", "follow_interval_s": "1", "compute_type": "int8"}
    with bentoml_serve("whisper_bento:Transcriber", args, server_env(tmp_path / "bentoml", registry.uri),
                       tmp_path / "serve.log") as server, server.client() as http:
        info = http.get("/info").json()
        assert info["follow"]["following"] and info["follow"]["alias"] == f"models:/{NAME}@production"
        pid = info["worker_pid"]
        with _Loop(server, clip) as loop:
            loop.first_answer_by("1", after=0)
            # Memory is compared with no request in flight: before the moves, and after them.
            loop.pause()
            rss_before = _rss_kb(pid)
            loop.go.set()
            moves = {}
            rss = []
            for done, version in enumerate(("2", "1", "2", "1"), start=1):
                moved = time.monotonic()
                client.set_registered_model_alias(NAME, "production", version)
                moves.setdefault(version, []).append(round(loop.first_answer_by(version, after=moved) - moved, 2))
                # The old version is unloaded once its last request is answered.
                deadline = time.monotonic() + 60
                while server.log_text().count(" unloaded") < done and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert server.log_text().count(" unloaded") == done
                loop.pause()
                rss.append(_rss_kb(pid))
                loop.go.set()
            print("RSS", rss_before, rss)

            moved = time.monotonic()
            client.set_registered_model_alias(NAME, "production", "3")
            deadline = time.monotonic() + 60
            while http.get("/info").json()["follow"]["failed_version"] != "3" and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2)
        answers = loop.answers
        info = http.get("/info").json()
        metrics = http.get("/metrics").text

    failed = [a for a in answers if a[1] != 200]
    assert not failed, failed[:5]
    assert info["model"]["version"] == "1" and info["follow"]["swaps"] == 4
    assert info["follow"]["failed_version"] == "3" and "ChecksumError" in info["follow"]["last_error"]
    assert all(v != "3" for t, _, v in answers if t > moved) and answers[-1][2] == "1"  # the tampered one never answered
    assert any(line.startswith("whisper_model_swaps_total{") and 'role="primary"' in line and 'outcome="failed"' in line
               and line.endswith(" 1.0") for line in metrics.splitlines()), metrics
    # Each retired version's memory goes back: after four moves the worker's RSS (the median of the
    # four readings, one after each move: a single reading of a 400 MB heap varies by some 5 %) is
    # within 10 % of before, and it does not climb move after move.
    assert abs(statistics.median(rss) - rss_before) / rss_before < 0.10, (rss_before, rss)
    assert rss[-1] < rss_before * 1.2, (rss_before, rss)
    print(f"alias move -> first answer by the new version: {moves}; worker RSS {rss_before} -> {rss} kB; "
          f"{len(answers)} answers")
