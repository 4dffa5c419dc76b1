"""One service, several registered models: a real ``bentoml serve`` of whisper-tiny.en and whisper
base registered under two names in a sqlite registry; a request's ``model`` field picks one.

Every check is a count or a state the service reports (/info, /v1/models, /metrics, the model
header of each answer), polled with generous failure bounds: memory is checked through the
service's own accounting of loaded bytes, never the host's RSS.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import mlflow
import pytest
from mlflow import MlflowClient

import mlflow_faster_whisper as mfw
from tests.bento.conftest import bentoml_serve, make_registry, server_env, until

pytestmark = [pytest.mark.real_weights, pytest.mark.server]

TINY, BASE, BROKEN = "mm-tiny", "mm-base", "mm-broken"
MODEL_HEADER = "x-whisper-model"
VERSION_HEADER = "x-whisper-model-version"
CJK = re.compile(r"[\u4e00-\u9fff]")


def _register(registry_uri: str, name: str, ct2_dir: Path, alias: str | None = "production") -> str:
    """Log ``ct2_dir`` as a new version of ``name`` (under ``alias``); its version."""
    mlflow.set_tracking_uri(registry_uri)
    try:
        mlflow.set_experiment("bento")
        with mlflow.start_run():
            info = mfw.log_model(str(ct2_dir), name="model", registered_model_name=name, decoding={"temperature": 0.0})
        version = str(info.registered_model_version)
        if alias:
            MlflowClient(registry_uri).set_registered_model_alias(name, alias, version)
        return version
    finally:
        mlflow.set_tracking_uri(None)


def _registry(root: Path, tiny: Path, base: Path):
    registry = make_registry(root / "registry", tiny, name=TINY)
    _register(registry.uri, BASE, base)
    return registry


def _transcribe(http: httpx.Client, clip: Path, model: str | None, **fields: str) -> httpx.Response:
    data = {**({"model": model} if model is not None else {}), **fields}
    with open(clip, "rb") as f:
        return http.post("/v1/audio/transcriptions", files={"file": (clip.name, f, "audio/wav")}, data=data)


def _models(http: httpx.Client) -> dict[str, dict]:
    return {m["name"]: m for m in http.get("/info").json()["models"]}


def _metric(text: str, name: str, model: str) -> float:
    match = re.search(rf'^{name}{{model="{re.escape(model)}"}} (\S+)$', text, re.M)
    assert match, f"{name} for {model} not in /metrics"
    return float(match[1])


def _footprint(registry_uri: str, name: str) -> int:
    """What the service will count for version 1 of ``name`` loaded in int8 (its own rule)."""
    from whisper_bento.models import footprint_bytes

    mlflow.set_tracking_uri(registry_uri)
    try:
        conf = mfw.flavor_config(f"models:/{name}/1")
    finally:
        mlflow.set_tracking_uri(None)
    return footprint_bytes(conf["size_bytes"], conf["quantization"], "int8")


# Runs first: its server is gone before the module's shared one starts.
def test_a_budget_for_one_model_swaps_them_and_the_ttl_unloads(tmp_path, whisper_tiny_en_ct2, whisper_base_ct2, speech_clips):
    registry = _registry(tmp_path, whisper_tiny_en_ct2, whisper_base_ct2)
    sizes = sorted(_footprint(registry.uri, name) for name in (TINY, BASE))
    budget = sizes[1] + sizes[0] // 2  # the larger fits, not both
    clip = next(c for c in speech_clips if c.name == "quick_brown_fox").path
    args = {
        "models": f"models:/{TINY}@production,models:/{BASE}@production",
        "compute_type": "int8",
        "memory_budget_bytes": str(budget),
        "model_ttl_s": "6",
        "follow_interval_s": "0",
    }
    env = server_env(tmp_path / "bentoml", registry.uri)
    with bentoml_serve("whisper_bento:Transcriber", args, env, tmp_path / "serve.log") as server, server.client() as http:
        assert http.get("/info").json()["memory"]["budget_bytes"] == budget
        answers = []
        for model in (TINY, BASE) * 3:
            answer = _transcribe(http, clip, model)
            answers.append((answer.status_code, answer.headers.get(MODEL_HEADER)))
            info = http.get("/info").json()
            loaded = [m["name"] for m in info["models"] if m["loaded"]]
            assert len(loaded) <= 1 and info["memory"]["loaded_bytes"] <= budget, info["models"]
        assert answers == [(200, m) for m in (TINY, BASE) * 3], answers

        # Both at once: a model is never unloaded under a request, so each waits for the other's room.
        def three(model: str) -> list[tuple[int, str | None]]:
            with server.client() as own:
                return [(r.status_code, r.headers.get(MODEL_HEADER)) for r in (_transcribe(own, clip, model) for _ in range(3))]

        with ThreadPoolExecutor(2) as pool:
            both = {model: pool.submit(three, model) for model in (TINY, BASE)}
            assert {m: f.result() for m, f in both.items()} == {m: [(200, m)] * 3 for m in (TINY, BASE)}
        models = _models(http)
        assert all(models[m]["loads"] >= 3 and models[m]["unloads"] >= 2 for m in (TINY, BASE)), models
        assert http.get("/info").json()["memory"]["loaded_bytes"] <= budget

        # Idle past the TTL: unloaded, its bytes given back to the budget.
        before = {m: models[m]["unloads"] for m in (TINY, BASE)}
        until(lambda: not any(m["loaded"] for m in _models(http).values()), "both models unloaded after the TTL", 120)
        after = _models(http)
        assert sum(after[m]["unloads"] - before[m] for m in (TINY, BASE)) == 1  # the one still loaded
        assert {m["state"] for m in after.values()} == {"unloaded"}
        assert http.get("/info").json()["memory"]["loaded_bytes"] == 0
        metrics = http.get("/metrics").text
        assert _metric(metrics, "whisper_model_loaded", TINY) == 0 and _metric(metrics, "whisper_model_loaded_bytes", BASE) == 0
        assert _transcribe(http, clip, BASE).status_code == 200  # loaded again on demand


@pytest.fixture(scope="module")
def registry(tmp_path_factory, whisper_tiny_en_ct2, whisper_base_ct2):
    root = tmp_path_factory.mktemp("models")
    registry = _registry(root, whisper_tiny_en_ct2, whisper_base_ct2)
    # A third model whose artifact is modified after registration: it cannot be loaded.
    _register(registry.uri, BROKEN, whisper_tiny_en_ct2)
    client = MlflowClient(registry.uri)
    logged = client.get_logged_model(client.get_model_version(BROKEN, "1").source.removeprefix("models:/"))
    with open(Path(logged.artifact_location.removeprefix("file://")) / "model" / "config.json", "a") as f:
        f.write(" ")
    return registry


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    root = tmp_path_factory.mktemp("models-serve")
    args = {
        "models": ",".join(f"models:/{name}@production" for name in (TINY, BASE, BROKEN)),
        "compute_type": "int8",
        "follow_interval_s": "1",
        "batch_size": "1",  # one window a pass: a long file makes many passes
        "decoding": json.dumps({"beam_size": 1}),
    }
    with bentoml_serve("whisper_bento:Transcriber", args, server_env(root / "bentoml", registry.uri), root / "serve.log") as server:
        yield server


@pytest.fixture(scope="module")
def http(server):
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def clips(speech_clips):
    return {c.name: c.path for c in speech_clips}


def test_the_model_field_picks_the_model(server, http, clips):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300)

    def create(model: str):
        with open(clips["nihao_shijie"], "rb") as f:
            return client.audio.transcriptions.with_raw_response.create(model=model, file=f)

    # Mandarin: the multilingual model writes it in Chinese characters; English-only tiny.en cannot.
    base, tiny, default = create(BASE), create(TINY), create("whisper-1")
    assert base.headers[MODEL_HEADER] == BASE and CJK.search(base.parse().text), base.parse().text
    assert tiny.headers[MODEL_HEADER] == TINY and not CJK.search(tiny.parse().text), tiny.parse().text
    assert default.headers[MODEL_HEADER] == TINY  # whisper-1 (and no model) is the first
    assert _transcribe(http, clips["quick_brown_fox"], None).headers[MODEL_HEADER] == TINY
    native = http.post("/transcribe", files={"file": clips["quick_brown_fox"].read_bytes()}, data={"model": f"{BASE}@production"})
    assert native.status_code == 200 and native.headers[MODEL_HEADER] == BASE, native.text

    listed = {m.id: m for m in client.models.list().data}
    assert list(listed) == [TINY, BASE, BROKEN]
    assert all(m.version == "1" and m.quantization == "float16" for m in listed.values()), listed
    assert listed[TINY].loaded and listed[BASE].loaded and not listed[BROKEN].loaded
    assert client.models.retrieve(BASE).id == BASE
    with pytest.raises(openai.NotFoundError) as missing:
        create("whisper-large-v9")
    assert missing.value.body["code"] == "model_not_found" and BASE in missing.value.body["message"]


def test_interleaved_requests_for_two_models_all_succeed(server, clips):
    def one(model: str) -> tuple[int, str | None]:
        with server.client() as own:
            answer = _transcribe(own, clips["quick_brown_fox"], model)
            return answer.status_code, answer.headers.get(MODEL_HEADER)

    wanted = [TINY, BASE] * 4
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, wanted))
    assert answers == [(200, m) for m in wanted], answers


def test_a_model_that_cannot_load_fails_its_own_requests(http, clips):
    refused = _transcribe(http, clips["quick_brown_fox"], BROKEN)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_not_served", refused.text
    assert "ChecksumError" in refused.json()["error"]["message"] and "/" not in refused.json()["error"]["message"].split("ChecksumError")[1]
    assert _models(http)[BROKEN]["state"] == "failed"
    # Asked again at once, it fails fast with the same reason; the others keep answering.
    assert _transcribe(http, clips["quick_brown_fox"], BROKEN).json()["error"]["code"] == "model_not_served"
    assert [(r.status_code, r.headers[MODEL_HEADER]) for r in (_transcribe(http, clips["quick_brown_fox"], m) for m in (TINY, BASE))] == [
        (200, TINY),
        (200, BASE),
    ]


def test_a_burst_on_one_model_does_not_starve_another(server, http, clips, long_speech):
    """Four long files on tiny.en (one window a pass, so many passes), then one short request on
    base: it is answered while the files still decode, and none of its passes waited for more
    than one of the other model's (the device's turns go round)."""
    burst: list[int] = []
    started = threading.Event()

    def long_file() -> None:
        with server.client() as own:
            started.set()
            burst.append(_transcribe(own, long_speech, TINY, language="en").status_code)

    before = _metric(http.get("/metrics").text, "whisper_model_passes_total", TINY)
    threads = [threading.Thread(target=long_file) for _ in range(4)]
    for t in threads:
        t.start()
    until(lambda: _metric(http.get("/metrics").text, "whisper_model_passes_total", TINY) > before + 4, "the burst is decoding")
    lone = _transcribe(http, clips["quick_brown_fox"], BASE)
    finished_before_lone = len(burst)
    for t in threads:
        t.join(timeout=600)
    assert lone.status_code == 200 and lone.headers[MODEL_HEADER] == BASE
    assert finished_before_lone < 4 and burst == [200] * 4  # answered while the burst still decoded
    metrics = http.get("/metrics").text
    overlapping = re.search(r"^whisper_overlapping_passes_total (\S+)$", metrics, re.M)
    assert overlapping and float(overlapping[1]) == 0, "two models' passes ran at once"  # one pass at a time on the device
    assert _metric(metrics, "whisper_model_turn_waited_passes_max", BASE) <= 1
    assert _metric(metrics, "whisper_model_turn_waited_passes_max", TINY) <= 1


def test_moving_one_models_alias_swaps_that_model_only(registry, http, clips, whisper_tiny_en_ct2):
    before = _models(http)
    assert before[TINY]["version"] == "1" and before[BASE]["version"] == "1"
    _register(registry.uri, TINY, whisper_tiny_en_ct2)  # version 2, now @production
    until(lambda: _models(http)[TINY]["version"] == "2", f"{TINY} moves to version 2")
    after = _models(http)
    assert after[BASE]["version"] == "1" and after[BASE]["loads"] == before[BASE]["loads"] and after[BASE]["follow"]["swaps"] == 0
    assert after[TINY]["follow"]["swaps"] == 1 and after[TINY]["loads"] == before[TINY]["loads"]  # moved, not reloaded
    answers = {m: _transcribe(http, clips["quick_brown_fox"], m) for m in (TINY, BASE)}
    assert {m: (a.status_code, a.headers[VERSION_HEADER]) for m, a in answers.items()} == {TINY: (200, "2"), BASE: (200, "1")}
