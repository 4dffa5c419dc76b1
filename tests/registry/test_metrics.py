import math

import pytest

from whisper_registry.errors import UnknownMetricError
from whisper_registry.metrics import METRICS, Measurements, compute_all, get_metric, score, score_utterance


def test_numbers_as_words_or_digits_are_not_errors():
    result = score(["One two three four five."], ["1, 2, 3, 4, 5."], "en")
    assert result["wer"] == 0.0 and result["cer"] == 0.0
    assert result["headline"] == "wer"


def test_wer_counts_word_errors_over_the_corpus():
    result = score(["the quick brown fox", "hello world"], ["the quick brown box", "hello"], "en")
    assert result["wer"] == pytest.approx(2 / 6)


def test_chinese_is_scored_by_characters_after_simplification():
    result = score(["天地玄黃。"], ["天地玄黄"], "zh")
    assert result == {"cer": 0.0, "headline": "cer", "n_utterances": 1}  # no wer for a character language
    assert score(["你好世界。"], ["你好事件"], "zh")["cer"] == pytest.approx(0.5)


def test_mixed_languages_report_per_language_and_cer_headline():
    result = score(["hello world", "你好世界"], ["hello world", "你好事件"], ["en", "zh"])
    assert result["headline"] == "cer"
    assert result["wer"] == 0.0  # wer covers the English utterance only
    assert result["cer_zh"] == pytest.approx(0.5) and result["cer_en"] == 0.0
    assert result["cer"] == pytest.approx(2 / (11 + 4))


def test_empty_hypothesis_and_empty_reference():
    assert score(["hello world"], [""], "en")["wer"] == 1.0
    assert math.isinf(score([""], ["noise"], "en")["wer"])


def test_speed_metrics():
    utterances = [
        score_utterance("a", "a", "en", duration_s=2.0, latency_s=1.0),
        score_utterance("b", "b", "en", duration_s=2.0, latency_s=0.2),
    ]
    results = compute_all(Measurements(utterances, load_time_s=0.5, n_skipped=1))
    assert results["rtf"] == pytest.approx(0.3)
    assert results["latency_p50_s"] == pytest.approx(0.6)
    assert results["load_time_s"] == 0.5 and results["n_skipped"] == 1 and results["n_utterances"] == 2


def test_unknown_metric_lists_the_valid_names():
    with pytest.raises(UnknownMetricError) as info:
        get_metric("accuracy")
    for name in METRICS:
        assert name in str(info.value)


def test_per_language_view_of_a_text_metric():
    assert get_metric("cer_zh").language == "zh"
    with pytest.raises(UnknownMetricError):
        get_metric("rtf_zh")  # speed metrics have no per-language view


def test_languages_that_do_not_pair_up_are_refused_not_truncated():
    """One language per pair, or one for all: a shorter list would score only the first pairs."""
    with pytest.raises(ValueError, match="one language, or one per pair"):
        score(["one two", "three four"], ["one two", "three five"], ["en"])
