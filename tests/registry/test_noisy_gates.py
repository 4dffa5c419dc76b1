"""Promotion gates that know the noise, end to end: real evaluations (whisper-tiny.en on real speech)
in a real sqlite registry, and the real ``whisper-registry`` command."""

import json
import re
import subprocess
import sys

import mlflow
import mlflow_faster_whisper as mfw
import pytest
from mlflow import MlflowClient

from tests.registry.conftest import clip_rows, write_manifest
from whisper_registry import tags
from whisper_registry.errors import GateFailedError
from whisper_registry.evaluate import evaluate, paired_difference
from whisper_registry.promote import Gate, audit_trail, parse_gate, promote


DECODING = {"beam_size": 1, "temperature": 0.0, "condition_on_previous_text": False}  # greedy: deterministic


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "whisper_registry", *args], capture_output=True, text=True, timeout=600)


def test_parse_a_gate_on_an_end_of_the_interval():
    assert parse_gate("wer.upper<=0.08") == Gate("wer", "<=", 0.08, "upper")
    assert str(parse_gate("cer_zh.upper<0.3")) == "cer_zh.upper<0.3"
    assert parse_gate("shadow.agreement.lower>=0.95") == Gate("shadow.agreement", ">=", 0.95, "lower")


@pytest.fixture
def two_versions_on_one_dataset(mlflow_store, whisper_tiny_en_ct2, tmp_path, en_zh_clips):
    """Real whisper-tiny.en as versions 1 and 2 of "tiny", both evaluated on the English clips; v2 may
    write 4 tokens only, so it loses the words of the long clips and not of the short one: their
    errors differ by utterance, by construction."""
    with mlflow.start_run():
        for _ in range(2):
            mfw.log_model(str(whisper_tiny_en_ct2), name="model", registered_model_name="tiny", decoding=DECODING)
    manifest = write_manifest(tmp_path / "clips.jsonl", clip_rows([c for c in en_zh_clips if c.language == "en"]))
    first = evaluate("models:/tiny/1", manifest)
    second = evaluate("models:/tiny/2", manifest, decoding={"max_new_tokens": 4})
    return first, second


@pytest.mark.real_weights
def test_max_regression_moves_the_alias_only_when_the_paired_upper_bound_is_within_it(two_versions_on_one_dataset):
    first, second = two_versions_on_one_dataset
    promote("tiny", "1", "production")
    diff = paired_difference(first.headline, second.run_id, first.run_id)
    assert diff.value == pytest.approx(second.headline_value - first.headline_value)
    assert diff.low <= diff.value < diff.high  # clips differ, so the interval has width

    # The point regression is within the limit but the interval is not: too few utterances to tell.
    limit = diff.value + (diff.high - diff.value) / 2
    code = _cli("promote", "tiny", "2", "--to", "production", "--max-regression", f"{limit:.6f}")
    assert code.returncode == 1, code.stderr
    assert re.search(r"too few utterances to tell.*about \d+ more utterances", code.stdout + code.stderr)
    assert str(MlflowClient().get_registered_model("tiny").aliases["production"]) == "1"

    # Clearly worse than the limit: refused, and not for want of utterances.
    with pytest.raises(GateFailedError, match="regression") as info:
        promote("tiny", "2", "production", max_regression=diff.low - 0.01)
    assert "more utterances" not in str(info.value)

    # Within the limit, bound included: it moves, and the trail keeps the result and the bound.
    code = _cli("promote", "tiny", "2", "--to", "production", "--max-regression", f"{diff.high + 0.001:.6f}")
    assert code.returncode == 0, code.stdout + code.stderr
    event = audit_trail("tiny", "production")[-1]
    gate = event["gates"][0]
    assert event["to_version"] == "2" and gate["passed"]
    assert gate["value"] == pytest.approx(diff.value) and gate["bound"] == pytest.approx(diff.high)
    assert "interval" in gate["detail"]


@pytest.mark.real_weights
def test_a_gate_on_the_upper_bound_reads_the_interval(two_versions_on_one_dataset):
    _, second = two_versions_on_one_dataset
    low, value, high = (second.metrics[k] for k in ("cer_ci_low", "cer", "cer_ci_high"))
    assert low <= value < high
    between = value + (high - value) / 2
    assert promote("tiny", "2", "staging", gates=[f"cer<={between}"]).moved  # the point figure holds
    promote("tiny", "1", "staging")
    with pytest.raises(GateFailedError, match=r"cer.upper<=.*too few utterances to tell.*about \d+ more utterances"):
        promote("tiny", "2", "staging", gates=[f"cer.upper<={between}"])
    result = promote("tiny", "2", "staging", gates=[f"cer.upper<={high + 1e-4}"])  # tags keep 6 digits
    assert result.moved and result.gates[0].bound == pytest.approx(high, rel=1e-5)
    assert json.loads(MlflowClient().get_registered_model("tiny").tags[f"{tags.AUDIT_PREFIX}staging.0003"])["gates"][0]["bound"]
