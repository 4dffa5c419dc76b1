import json

import mlflow
import pytest
from mlflow import MlflowClient
from whisper_registry import tags, versions
from whisper_registry.errors import BadRowsError, ModelNotFoundError
from whisper_registry.evaluate import (
    REPORT_PAGE,
    UTTERANCES_TABLE,
    evaluate,
    utterance_counts,
)

from tests.registry.conftest import clip_rows, write_manifest


def test_evaluation_run_is_linked_to_the_version_and_tags_it(tiny_registered, two_clips_manifest):
    result = evaluate("models:/tiny/1", two_clips_manifest)
    client = MlflowClient()
    run = client.get_run(result.run_id)
    expected = {"wer", "cer", "rtf", "latency_p50_s", "latency_p95_s", "load_time_s", "n_utterances", "n_skipped"}
    assert expected <= set(run.data.metrics)
    assert run.data.metrics["n_utterances"] == 2 and run.data.metrics["n_skipped"] == 0
    assert run.data.metrics["rtf"] > 0 and run.data.metrics["load_time_s"] > 0
    assert run.data.tags[tags.RUN_MODEL_URI] == "models:/tiny/1"
    # MLflow 3 links: the version's logged model is an input of the run and owns the metrics.
    mv = client.get_model_version("tiny", "1")
    model_id = versions.logged_model_id(mv)
    assert model_id and [m.model_id for m in run.inputs.model_inputs] == [model_id]
    logged = client.get_logged_model(model_id)
    assert {m.key for m in logged.metrics} >= {"cer", "wer"}
    assert {m.dataset_digest for m in logged.metrics} == {result.dataset_digest[:32]}
    assert run.inputs.dataset_inputs[0].dataset.digest == result.dataset_digest[:32]
    # The per-utterance table.
    table = json.loads(open(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path=UTTERANCES_TABLE)).read())
    assert set(table["columns"]) >= {"audio", "reference", "hypothesis", "errors", "latency_s", "rtf"}
    assert len(table["data"]) == 2
    # Headline results on the version, for the MLflow UI.
    t = mv.tags
    assert float(t["eval.cer"]) == pytest.approx(result.metrics["cer"], rel=1e-5)
    assert t[tags.EVAL_RUN_ID] == result.run_id and t[tags.EVAL_DATASET] == result.dataset_digest
    assert t[tags.EVAL_HEADLINE] == "cer"  # a dataset with Chinese is headlined by CER


def test_every_error_rate_has_its_interval_and_the_counts_to_pair_it(tiny_registered, two_clips_manifest, tmp_path, en_zh_clips):
    rows = clip_rows(en_zh_clips) + [{"audio": str(en_zh_clips[0].path), "text": "uno dos tres", "language": "ja"}]
    result = evaluate("models:/tiny/1", write_manifest(tmp_path / "mixed.jsonl", rows))
    run = MlflowClient().get_run(result.run_id)
    t = MlflowClient().get_model_version("tiny", "1").tags
    rates = [k for k in result.metrics if k.split("_")[0] in ("wer", "cer") and "_ci_" not in k]
    assert {"wer", "cer", "cer_zh", "cer_en", "wer_en", "cer_ja"} <= set(rates)
    for rate in rates:
        low, high = result.metrics[f"{rate}_ci_low"], result.metrics[f"{rate}_ci_high"]
        assert low <= result.metrics[rate] <= high
        assert run.data.metrics[f"{rate}_ci_high"] == pytest.approx(high)
        assert float(t[f"eval.{rate}_ci_low"]) == pytest.approx(low, rel=1e-5, abs=1e-9)
    # The counts behind each rate are in the table, so a later promotion can pair two versions.
    counts = utterance_counts(result.run_id)
    assert len(counts["audio"]) == len(rows)
    spaced = [i for i, lang in enumerate(counts["language"]) if lang == "en"]
    assert sum(counts["word_errors"][i] for i in spaced) / sum(counts["words"][i] for i in spaced) == pytest.approx(result.metrics["wer_en"])
    # Japanese has no number rule, and the evaluation says so; the page of the worst utterances is linked.
    assert t[tags.EVAL_NUMBER_RULES] == "en=whisper-english ja=none zh=cn2an"
    assert t[tags.EVAL_REPORT].endswith(REPORT_PAGE)
    page = mlflow.artifacts.load_text(t[tags.EVAL_REPORT])
    assert 'data-metric="cer_zh"' in page and page.count('class="utterance"') == sum(1 for u in result.utterances if u["errors"])
    # Reproducible: the same utterances give the same intervals.
    again = evaluate("models:/tiny/1", write_manifest(tmp_path / "mixed.jsonl", rows))
    assert {k: v for k, v in again.metrics.items() if "_ci_" in k} == {k: v for k, v in result.metrics.items() if "_ci_" in k}


def test_concurrent_utterances_share_passes_and_score_as_one_at_a_time(tiny_registered, two_clips_manifest):
    alone = evaluate("models:/tiny/1", two_clips_manifest)
    together = evaluate("models:/tiny/1", two_clips_manifest, concurrency=2)
    assert [r["hypothesis"] for r in together.utterances] == [r["hypothesis"] for r in alone.utterances]
    assert together.metrics["cer"] == alone.metrics["cer"]
    params = MlflowClient().get_run(together.run_id).data.params
    assert params["concurrency"] == "2" and together.metrics["rtf"] > 0


def test_stored_decoding_and_overrides_are_used(tiny_registered, two_clips_manifest):
    result = evaluate("models:/tiny/2", two_clips_manifest, decoding={"max_new_tokens": 3})
    params = MlflowClient().get_run(result.run_id).data.params
    decoding = json.loads(params["decoding"])
    assert decoding["beam_size"] == 1 and decoding["max_new_tokens"] == 3


def test_bad_rows_stop_the_evaluation_listing_every_path(tiny_registered, tmp_path, en_zh_clips):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio" * 50)
    rows = clip_rows(en_zh_clips[:1]) + [{"audio": str(tmp_path / "gone.wav"), "text": "x"}, {"audio": str(broken), "text": "y"}]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    with pytest.raises(BadRowsError) as info:
        evaluate("models:/tiny/1", manifest)
    assert str(tmp_path / "gone.wav") in str(info.value) and str(broken) in str(info.value)
    assert "eval.run_id" not in MlflowClient().get_model_version("tiny", "1").tags  # nothing ran

    result = evaluate("models:/tiny/1", manifest, skip_bad=True)
    assert result.metrics["n_utterances"] == 1 and result.metrics["n_skipped"] == 2
    assert {b.where for b in result.skipped} == {str(tmp_path / "gone.wav"), str(broken)}
    run = MlflowClient().get_run(result.run_id)
    assert str(broken) in run.data.tags["skipped_rows"]
    assert "eval/skipped_rows.json" in [a.path for a in MlflowClient().list_artifacts(result.run_id, "eval")]


def test_a_new_evaluation_replaces_the_version_tags(tiny_registered, two_clips_manifest, tmp_path, en_zh_clips):
    evaluate("models:/tiny/1", two_clips_manifest)
    en_only = write_manifest(tmp_path / "en.jsonl", clip_rows([c for c in en_zh_clips if c.language == "en"][:1]))
    result = evaluate("models:/tiny/1", en_only)
    t = MlflowClient().get_model_version("tiny", "1").tags
    assert t[tags.EVAL_HEADLINE] == "wer" and t[tags.EVAL_DATASET] == result.dataset_digest
    assert "eval.cer_zh" not in t  # from the earlier, mixed-language evaluation


def test_unknown_version_or_uri(tiny_registered, two_clips_manifest):
    with pytest.raises(ModelNotFoundError, match=r"no version 9 \(versions: 1, 2\)"):
        evaluate("models:/tiny/9", two_clips_manifest)
    with pytest.raises(ModelNotFoundError, match="promote a version to production first"):
        evaluate("models:/tiny@production", two_clips_manifest)
    with pytest.raises(ModelNotFoundError, match="models:/<name>/<version>"):
        evaluate("runs:/abc/model", two_clips_manifest)


def test_the_run_records_how_the_version_ran_as_serving_would(tiny_registered, two_clips_manifest):
    stored = evaluate("models:/tiny/2", two_clips_manifest)  # version 2 is float32: run as stored
    params = MlflowClient().get_run(stored.run_id).data.params
    assert (params["device"], params["compute_type"]) == ("cpu", "float32")
    asked = evaluate("models:/tiny/2", two_clips_manifest, load={"compute_type": "int8", "cpu_threads": 1})
    params = MlflowClient().get_run(asked.run_id).data.params
    assert params["compute_type"] in ("int8", "int8_float32") and params["cpu_threads"] == "1"
