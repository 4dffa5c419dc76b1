"""Bootstrap intervals: reproducible, covering the true rate at about their nominal rate, and gates
that refuse what too few utterances cannot tell."""

import re

import numpy as np
import pytest

from whisper_registry.bootstrap import bound_check, paired_difference_interval, rate_interval, utterances_needed


def _population(rng, size, error_rate, spread=20.0):
    """Utterances with varied lengths and per-utterance difficulty (errors cluster by utterance)."""
    lengths = rng.integers(3, 30, size)
    difficulty = rng.beta(error_rate * spread, (1 - error_rate) * spread, size)
    return rng.binomial(lengths, difficulty), lengths


def test_an_interval_is_reproducible_for_a_seed_and_brackets_the_rate():
    errors, lengths = _population(np.random.default_rng(1), 50, 0.1)
    a, b = rate_interval(errors, lengths, seed=7), rate_interval(errors, lengths, seed=7)
    assert a == b
    assert a.low < a.value < a.high and a.n == 50
    assert a.value == pytest.approx(errors.sum() / lengths.sum())
    assert rate_interval(errors, lengths, seed=8) != a  # the seed is what fixes it
    assert rate_interval([], []) is None and rate_interval([0, 0], [0, 0]) is None


def test_intervals_cover_the_true_rate_at_about_the_nominal_rate():
    rng = np.random.default_rng(2026)
    errors, lengths = _population(rng, 100_000, 0.08)
    true_rate = errors.sum() / lengths.sum()
    draws, covered = 200, 0
    for i in range(draws):
        pick = rng.integers(0, len(errors), 100)
        interval = rate_interval(errors[pick], lengths[pick], seed=i)
        covered += interval.low <= true_rate <= interval.high
    assert 0.90 * draws <= covered <= 0.99 * draws


def test_intervals_shrink_as_one_over_the_square_root_of_the_utterances():
    errors, lengths = _population(np.random.default_rng(3), 4000, 0.1)
    small, large = rate_interval(errors[:250], lengths[:250]), rate_interval(errors, lengths)
    assert small.width / large.width == pytest.approx(4.0, rel=0.25)  # 16x the utterances, 1/4 the width


def _versions(rng, n, holder_rate, candidate_rate):
    """Two versions scored on the same n utterances: the candidate errs on its own, shared difficulty."""
    lengths = rng.integers(3, 30, n)
    difficulty = rng.beta(2, 18, n)
    holder = rng.binomial(lengths, np.clip(difficulty * holder_rate / 0.1, 0, 1))
    candidate = rng.binomial(lengths, np.clip(difficulty * candidate_rate / 0.1, 0, 1))
    return candidate, holder, lengths


def test_a_paired_gate_passes_a_better_candidate_and_refuses_a_worse_one():
    rng = np.random.default_rng(4)
    better = paired_difference_interval(*_pair(_versions(rng, 2000, 0.10, 0.08)))
    passed, detail = bound_check(better, 0.005, upper=True, what="wer regression")
    assert passed and better.high < 0 and "upper bound holds" in detail
    worse = paired_difference_interval(*_pair(_versions(rng, 2000, 0.10, 0.13)))
    passed, detail = bound_check(worse, 0.005, upper=True, what="wer regression")
    assert not passed and worse.low > 0.005 and "above 0.005" in detail and "more utterances" not in detail


def test_a_gate_on_too_few_utterances_says_how_many_more_it_needs():
    rng = np.random.default_rng(5)
    small = paired_difference_interval(*_pair(_versions(rng, 27, 0.10, 0.10)))
    limit = small.value + (small.high - small.value) / 2  # the point passes, the bound does not
    passed, detail = bound_check(small, limit, upper=True, what="wer regression")
    assert not passed
    more = int(re.search(r"about (\d+) more utterances", detail)[1])
    assert more + 27 == utterances_needed(27, small.high - small.value, limit - small.value)
    assert 27 * 3 <= more + 27 <= 27 * 5  # twice the margin needed: about four times the utterances
    # The same question on that many utterances of the same kind is answered.
    enough = paired_difference_interval(*_pair(_versions(rng, (more + 27) * 4, 0.10, 0.10)))
    assert bound_check(enough, limit, upper=True, what="wer regression")[0]


def test_utterances_needed():
    assert utterances_needed(100, 0.02, 0.01) == 400
    assert utterances_needed(100, 0.01, 0.02) == 100
    assert utterances_needed(100, 0.01, 0.0) is None


def test_a_paired_interval_needs_the_same_utterances():
    with pytest.raises(ValueError, match="same utterances"):
        paired_difference_interval([1, 2], [5, 5], [1], [5])


def _pair(versions):
    candidate, holder, lengths = versions
    return candidate, lengths, holder, lengths
