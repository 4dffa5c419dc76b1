"""The service follows its alias on MLflow's signed webhook, before its poll interval would: a real
`mlflow server` (sqlite backend, webhooks delivered by the server), a real `bentoml serve`,
whisper-tiny.en. An unsigned, forged or replayed call gets 401 and changes nothing."""

from __future__ import annotations

import json
import time

import mlflow
import pytest
from mlflow import MlflowClient


from whisper_bento import model_ref

from tests.bento.conftest import RequestLoop, bentoml_serve, server_env
from devkit.processes import mlflow_server
from devkit.registry import log_versions
from devkit.webhooks import signed_headers

pytestmark = [pytest.mark.real_weights, pytest.mark.server]

NAME = "tiny-webhook"
SECRET = "s3cret-webhook-key"
POLL_S = 600  # the poll alone would take this long: a move sooner is the webhook's


def test_a_signed_alias_event_moves_the_service_and_a_forged_one_is_refused(tmp_path, whisper_tiny_en_ct2, speech_clips):
    with mlflow_server(tmp_path / "mlflow", webhooks=True) as tracking:
        client = log_versions(tracking, whisper_tiny_en_ct2, NAME, 2)  # versions 1 and 2: the same weights
        client.set_registered_model_alias(NAME, "production", "1")
        _the_service_asks_an_mlflow_server_over_rest(tracking)

        serve_env = {**server_env(tmp_path / "bentoml", tracking), "WHISPER_WEBHOOK_SECRET": SECRET}
        args = {"model": f"models:/{NAME}@production", "follow_interval_s": str(POLL_S), "compute_type": "int8",
                "webhook_secret": "env:WHISPER_WEBHOOK_SECRET"}
        with bentoml_serve("whisper_bento:Transcriber", args, serve_env, tmp_path / "serve.log") as server, \
                server.client() as http:
            info = http.get("/info").json()
            assert info["follow"]["webhook"] is True
            # Started on an alias in an MLflow server: resolved over REST, no MLflow in the worker.
            assert info["imports"]["mlflow"] is False, info["imports"]
            event = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "",
                                "data": {"name": NAME, "alias": "production", "version": "2"}}).encode()
            now = int(time.time())
            for headers in ({"content-type": "application/json"},  # unsigned
                            signed_headers("not-the-secret", event, timestamp=now),  # forged
                            signed_headers(SECRET, event, timestamp=now - 3600)):  # replayed an hour later
                refused = http.post("/webhooks/mlflow", content=event, headers=headers)
                assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_signature", refused.text
            too_big = http.post("/webhooks/mlflow", content=b"{" * (65 * 1024), headers=signed_headers(SECRET, b"", timestamp=now))
            assert too_big.status_code == 413, too_big.text
            time.sleep(2)
            follow = http.get("/info").json()["follow"]
            assert follow["webhook_events"] == 0 and follow["swaps"] == 0

            client.create_webhook(name="bento", url=f"{server.url}/webhooks/mlflow",
                                  events=["model_version_alias.created"], secret=SECRET)
            clip = next(c for c in speech_clips if c.name == "quick_brown_fox").path
            with RequestLoop(server.url, clip, clients=2) as loop:
                loop.first_answer_by("1", after=0)
                moved = time.monotonic()
                client.set_registered_model_alias(NAME, "production", "2")
                first = loop.first_answer_by("2", after=moved, timeout=POLL_S / 2)
            info = http.get("/info").json()
    failed = [a for a in loop.answers if a[1] != 200]
    assert not failed, failed[:5]
    assert info["model"]["version"] == "2" and info["follow"]["swaps"] == 1 and info["follow"]["webhook_events"] >= 1
    print(f"alias move -> first answer by version 2 through the webhook: {first - moved:.2f} s (poll interval {POLL_S} s)")


def _the_service_asks_an_mlflow_server_over_rest(tracking: str) -> None:
    """model_ref's REST lookups give what MLflow's client gives, with its error codes."""
    mlflow.set_tracking_uri(tracking)
    try:
        found = model_ref.registry_version(f"models:/{NAME}@production")
        pinned = model_ref.registry_version(f"models:/{NAME}/2")
        with pytest.raises(model_ref.RegistryError) as missing:
            model_ref.registry_version(f"models:/{NAME}@nowhere")
    finally:
        mlflow.set_tracking_uri(None)
    with pytest.raises(mlflow.exceptions.MlflowException) as by_mlflow:
        MlflowClient(tracking).get_model_version_by_alias(NAME, "nowhere")
    expected = MlflowClient(tracking).get_model_version(NAME, "1")
    assert (found.name, found.version, found.aliases, found.run_id, found.source) == \
        (NAME, "1", ("production",), expected.run_id, expected.source)
    assert pinned.version == "2" and pinned.aliases == ()
    assert missing.value.error_code == by_mlflow.value.error_code and "nowhere" in str(missing.value)
    with pytest.raises(model_ref.RegistryError) as dead:
        model_ref._rest_get("http://127.0.0.1:9", "registered-models/alias", name=NAME, alias="production")
    assert dead.value.error_code == "TEMPORARILY_UNAVAILABLE"
