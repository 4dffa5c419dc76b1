"""What the service says about itself: ``GET /`` is its own page, which links BentoML's page of
the API; its OpenAPI document (``/docs.json``) names the project, its version and the served
model's, groups the routes by tag, types the decoding fields as ``DecodingOptions`` declares them,
and its examples work; a path or method the service does not have is answered in the JSON error
shape. One real ``bentoml serve`` (whisper-tiny.en). The page in a browser: test_try_page."""

from __future__ import annotations

import re
import shlex
from importlib import metadata

import pytest

from mlflow_faster_whisper.decoding import DecodingOptions
from tests.bento.conftest import MODEL_NAME, bentoml_serve, make_registry, server_env

pytestmark = [pytest.mark.server, pytest.mark.real_weights]

TAGS = {"transcription", "OpenAI-compatible", "registry control", "operations"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, whisper_tiny_en_ct2):
    root = tmp_path_factory.mktemp("page")
    registry = make_registry(root / "registry", whisper_tiny_en_ct2)
    env = server_env(root / "bentoml", registry.uri)
    args = {"model": f"models:/{MODEL_NAME}@production", "compute_type": "int8"}
    with bentoml_serve("whisper_bento:Transcriber", args, env, root / "serve.log") as server:
        server.registered_version = registry.version
        yield server


@pytest.fixture(scope="module")
def spec(server) -> dict:
    with server.client() as http:
        response = http.get("/docs.json")
    assert response.status_code == 200, response.text
    return response.json()


def test_document_names_the_project_and_both_versions(spec):
    info = spec["info"]
    assert "Whisper" in info["title"] and "BentoML" not in info["title"]
    assert metadata.version("mlflow-faster-whisper") in info["version"]
    assert info["x-model"]["name"] == MODEL_NAME
    assert f"{MODEL_NAME} version {info['x-model']['version']}" in info["version"]
    assert "created with BentoML" not in info["description"] and "/v1" in info["description"]


def test_routes_are_grouped_by_tag(spec):
    assert {tag["name"] for tag in spec["tags"]} == TAGS
    tagged = {(method, path): op["tags"] for path, item in spec["paths"].items() for method, op in item.items()}
    assert all(len(tags) == 1 and tags[0] in TAGS for tags in tagged.values()), tagged
    assert tagged[("post", "/transcribe")] == ["transcription"]
    assert tagged[("post", "/v1/audio/transcriptions")] == ["OpenAI-compatible"]
    assert tagged[("get", "/readyz")] == ["operations"]
    assert "Openai" not in spec["paths"]["/v1/audio/transcriptions"]["post"]["summary"]


def test_decoding_fields_have_their_types_and_bounds(spec):
    form = spec["paths"]["/transcribe"]["post"]["requestBody"]["content"]["multipart/form-data"]
    fields = form["schema"]["properties"]
    declared = DecodingOptions.model_json_schema()["properties"]
    assert set(declared) <= set(fields)
    beam = declared["beam_size"]
    assert fields["beam_size"]["type"] == "integer"
    assert (fields["beam_size"]["minimum"], fields["beam_size"]["maximum"]) == (beam["minimum"], beam["maximum"])
    assert fields["patience"]["type"] == "number" and fields["patience"]["exclusiveMinimum"] is True
    assert fields["condition_on_previous_text"]["type"] == "boolean"
    assert fields["task"]["enum"] == ["transcribe", "translate"]
    assert fields["language"] == {**fields["language"], "type": "string", "nullable": True}
    assert fields["temperature"]["type"] == "array" and form["encoding"]["temperature"]["contentType"] == "application/json"
    assert not any("$ref" in str(field) or "default" in field for field in fields.values())


def test_examples_in_the_description_work(server, spec, speech_clips):
    clip = next(c for c in speech_clips if c.name == "hello_world")
    examples = [shlex.split(line) for line in spec["info"]["description"].splitlines() if line.startswith("curl ")]
    assert examples
    with server.client() as http:
        for example in examples:
            fields = dict(arg.split("=", 1) for arg in example[2:-1:2])
            assert example[-1].startswith(server.url), example
            fields.pop("file")
            response = http.post(example[-1][len(server.url):], files={"file": ("speech.wav", clip.path.read_bytes())},
                                 data=fields)
            assert response.status_code == 200, (example, response.text)


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/no/such/path", 404), ("POST", "/livez", 405),
                                                         ("DELETE", "/transcribe", 405)])
def test_routing_errors_are_json(server, method, path, status):
    with server.client() as http:
        response = http.request(method, path)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json"), response.text
    error = response.json()["error"]
    assert re.search(rf"{method} {re.escape(path)}$", error["message"]) and error["type"] == "invalid_request_error"
    if status == 405:  # BentoML's answer and the app's alike keep their Allow header
        assert response.headers["allow"]


def test_root_is_the_services_page_and_links_bentomls_api_docs(server):
    with server.client() as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<title>Whisper speech-to-text</title>" in page.text and "swagger" not in page.text.lower()
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        (docs_link,) = re.findall(r'<a id="docs-link" href="([^"]+)"', page.text)
        docs = http.get(f"/{docs_link}")  # relative to the page at /
        assert docs.status_code == 200 and 'id="swagger-ui"' in docs.text
        # BentoML's page renders ./docs.json with its ./static_content, relative to where it is served.
        assets = re.findall(r'(?:src|href)="\./([^"]+)"', docs.text)
        assert any(a.endswith("swagger-ui-bundle.js") for a in assets)
        for asset in assets:
            assert http.get(f"/{asset}").status_code == 200, asset
        assert http.get("/docs.json").json()["info"]["title"] == "Whisper speech-to-text"
