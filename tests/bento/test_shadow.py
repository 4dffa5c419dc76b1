"""The service shadows a candidate on live traffic: a real `bentoml serve` with production and
staging versions of whisper-tiny.en from a real sqlite registry. The figures written on the
candidate's version match what the two versions return for the same clips, and gate a promotion."""

from __future__ import annotations

import time

import mlflow
import pytest
from mlflow import MlflowClient

import mlflow_faster_whisper as mfw
from tests.bento.conftest import bentoml_serve, make_registry, server_env
from whisper_registry.cli import main
from whisper_registry.metrics import score_utterance

pytestmark = [pytest.mark.real_weights, pytest.mark.server]

NAME = "tiny-shadow"


def test_shadow_figures_on_the_candidate_match_both_versions_answers(tmp_path, whisper_tiny_en_ct2, speech_clips,
                                                                      monkeypatch):
    registry = make_registry(tmp_path / "registry", whisper_tiny_en_ct2, name=NAME)  # v1 @production: beam 2
    client = MlflowClient(registry.uri)
    mlflow.set_tracking_uri(registry.uri)
    try:
        mlflow.set_experiment("bento")
        with mlflow.start_run():  # v2 @staging: the same weights, greedy by default
            mfw.log_model(str(whisper_tiny_en_ct2), name="model", registered_model_name=NAME, decoding={"beam_size": 1})
        client.set_registered_model_alias(NAME, "staging", "2")
        clips = [c for c in speech_clips if c.language == "en"] * 2  # the 3 English clips, twice: 6 requests
        candidate = mlflow.pyfunc.load_model(f"models:/{NAME}/2", model_config={"compute_type": "int8"})
        expected = [candidate.predict({"audio": [c.path.read_bytes()]})[0]["text"] for c in clips]
    finally:
        mlflow.set_tracking_uri(None)

    args = {"model": f"models:/{NAME}@production", "shadow": f"models:/{NAME}@staging", "shadow_fraction": "1",
            "shadow_report_every": "4", "follow_interval_s": "0", "compute_type": "int8"}
    with bentoml_serve("whisper_bento:Transcriber", args, server_env(tmp_path / "bentoml", registry.uri),
                       tmp_path / "serve.log") as server, server.client() as http:
        shadow = http.get("/info").json()["shadow"]
        assert shadow["model"]["version"] == "2" and shadow["fraction"] == 1.0 and shadow["figures"] is None
        production = []
        for clip in clips:
            with open(clip.path, "rb") as f:
                answer = http.post("/transcribe", files={"file": f})
            assert answer.status_code == 200 and answer.headers["x-whisper-model-version"] == "1"
            production.append(answer.json()["text"])
        deadline = time.monotonic() + 300
        while (http.get("/info").json()["shadow"]["figures"] or {}).get("requests", 0) < len(clips):
            assert time.monotonic() < deadline, http.get("/info").json()["shadow"]
            time.sleep(0.5)
        figures = http.get("/info").json()["shadow"]["figures"]
        written_at_4 = {k: v for k, v in client.get_model_version(NAME, "2").tags.items() if k.startswith("shadow.")}
    # Stopped: the shutdown writes the last figures.
    tags = {k: v for k, v in client.get_model_version(NAME, "2").tags.items() if k.startswith("shadow.")}

    scored = [score_utterance(p, c, "en") for p, c in zip(production, expected)]
    agreement = sum(s.hypothesis == s.reference for s in scored) / len(scored)
    wer = sum(s.word_errors for s in scored) / sum(s.words for s in scored)
    cer = sum(s.char_errors for s in scored) / sum(s.chars for s in scored)
    assert figures["requests"] == len(clips) and figures["dropped"] == 0 and figures["failed"] == 0
    assert figures["agreement"] == pytest.approx(agreement, abs=1e-4) and figures["wer"] == pytest.approx(wer, abs=1e-4)
    assert written_at_4["shadow.requests"] in ("4", "5", "6")  # written every 4 requests, off the request path
    assert len(clips) == 6
    assert tags["shadow.requests"] == str(len(clips)) and tags["shadow.production_version"] == "1"
    assert float(tags["shadow.agreement"]) == pytest.approx(agreement, abs=1e-4)
    assert float(tags["shadow.wer"]) == pytest.approx(wer, abs=1e-4) and float(tags["shadow.cer"]) == pytest.approx(cer, abs=1e-4)
    assert float(tags["shadow.latency_ratio"]) > 0
    # Each rate with its bootstrap interval over the requests.
    for rate in ("agreement", "wer", "cer"):
        assert float(tags[f"shadow.{rate}_ci_low"]) <= float(tags[f"shadow.{rate}"]) <= float(tags[f"shadow.{rate}_ci_high"])
    # Figures only: no audio, no transcript.
    intervals = [f"{rate}_ci_{end}" for rate in ("agreement", "wer", "cer") for end in ("low", "high")]
    assert set(tags) == {f"shadow.{k}" for k in ("requests", "dropped", "failed", "agreement", "wer", "cer",
                                                 "latency_ratio", "production_version", "time", *intervals)}

    # The figures gate a promotion.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)
    assert main(["promote", NAME, "2", "--to", "production", "--gate", f"shadow.agreement>={agreement + 0.01}"]) == 1
    assert str(client.get_registered_model(NAME).aliases["production"]) == "1"
    low = float(tags["shadow.agreement_ci_low"])  # six requests: the lower bound is read, not the point
    assert main(["promote", NAME, "2", "--to", "production", "--gate", f"shadow.agreement.lower>={low + 0.001}"]) == 1
    assert main(["promote", NAME, "2", "--to", "production", "--gate", f"shadow.agreement.lower>={low - 0.001}"]) == 0
    assert str(client.get_registered_model(NAME).aliases["production"]) == "2"
    print(f"shadow figures: {figures}; production {production}; candidate {expected}")
