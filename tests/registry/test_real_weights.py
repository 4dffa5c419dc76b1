"""The acceptance story on real Whisper base weights and real English/Chinese speech.

Registered (int8 and float32) and evaluated once per module; the tests then read the results.
"""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from tests.registry.conftest import clip_rows, write_manifest
from whisper_registry.cli import main
from whisper_registry.compare import compare
from whisper_registry.evaluate import evaluate
from whisper_registry.register import register

pytestmark = pytest.mark.real_weights

NAME = "whisper-base"
# Deterministic: beam search without temperature fallback.
DECODING = {"beam_size": 5, "temperature": 0.0}
CER_GATE = "cer<=0.15"  # base on these clips: ~0.08-0.10 (Chinese counts most); see the report


@pytest.fixture(scope="module")
def base_store(tmp_path_factory, whisper_base_hf, en_zh_clips):
    """A store with Whisper base registered as int8 (v1) and float32 (v2), both evaluated."""
    root = tmp_path_factory.mktemp("real")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    manifest = write_manifest(root / "clips.jsonl", clip_rows(en_zh_clips))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        mp.chdir(root)
        mlflow.set_tracking_uri(uri)
        try:
            registered = register(whisper_base_hf, NAME, ["int8", "float32"], decoding=DECODING)
            evaluations = {v.quantization: evaluate(v.model_uri, manifest) for v in registered.versions}
            yield registered, evaluations, root
        finally:
            mlflow.set_tracking_uri(None)


def test_registered_sizes(base_store):
    registered, _, _ = base_store
    sizes = {v.quantization: v.size_bytes for v in registered.versions}
    assert 60e6 < sizes["int8"] < 100e6 and 250e6 < sizes["float32"] < 320e6
    assert MlflowClient().get_experiment_by_name("whisper-registry").artifact_location.endswith("/mlartifacts")


def test_error_rates_on_real_speech(base_store):
    _, evaluations, _ = base_store
    for quantization, result in evaluations.items():
        m = result.metrics
        assert result.headline == "cer"
        assert m["wer_en"] <= 0.05, (quantization, result.utterances)  # counting read as digits is no error
        assert m["cer_zh"] <= 0.35, (quantization, result.utterances)
        assert m["n_utterances"] == 6 and m["rtf"] > 0 and m["latency_p95_s"] >= m["latency_p50_s"]
    assert abs(evaluations["int8"].metrics["cer"] - evaluations["float32"].metrics["cer"]) <= 0.1


def test_compare_both_versions(base_store):
    _, evaluations, root = base_store
    comparison = compare(NAME, output_dir=root)
    rows = {r["quantization"]: r for r in comparison.rows()}
    assert rows["int8"]["cer"] == f"{evaluations['int8'].metrics['cer']:.4f}"
    assert float(rows["int8"]["size_mb"]) < float(rows["float32"]["size_mb"]) / 3
    assert comparison.plot_path.is_file()


def test_promote_int8_with_a_cer_gate_refuse_an_impossible_one_and_roll_back(base_store, capsys):
    client = MlflowClient()
    aliases = lambda: {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}  # noqa: E731
    assert main(["promote", NAME, "1", "--to", "staging", "--gate", CER_GATE]) == 0
    assert main(["promote", NAME, "1", "--to", "production", "--gate", CER_GATE, "--max-regression", "0.005"]) == 0
    assert aliases() == {"staging": "1", "production": "1"}
    capsys.readouterr()
    assert main(["promote", NAME, "2", "--to", "production", "--gate", "cer<=0.0001"]) == 1
    assert "Not promoting version 2" in capsys.readouterr().err
    assert aliases() == {"staging": "1", "production": "1"}
    assert main(["promote", NAME, "2", "--to", "production", "--gate", CER_GATE, "--max-regression", "0.05"]) == 0
    assert aliases()["production"] == "2"
    assert main(["rollback", NAME, "--alias", "production"]) == 0
    assert aliases() == {"staging": "1", "production": "1"}
