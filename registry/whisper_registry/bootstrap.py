"""How far an error rate read from a few utterances can be trusted: bootstrap intervals.

An error rate is a corpus-level ratio (errors over reference words or characters of all
utterances), so the unit to resample is the utterance, not the word: words of one utterance err
together. ``rate_interval`` draws the utterances with replacement ``n_resamples`` times,
recomputes the ratio from each draw, and reads the interval from the percentiles of those
ratios. ``paired_difference_interval`` draws the same utterances for two versions scored on the
same dataset, so their shared difficulty cancels and only the difference between them varies.

Everything is seeded: the same counts and seed give the same interval, run after run.
An interval's half-width shrinks as 1/sqrt(n), which ``utterances_needed`` uses to say how many
utterances a question would take.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
N_RESAMPLES = 1000
SEED = 0
_CELLS_PER_CHUNK = 2_000_000  # resamples x utterances drawn at once: bounded memory for large sets


@dataclass(frozen=True)
class Interval:
    """A bootstrap interval around ``value`` over ``n`` utterances."""

    value: float
    low: float
    high: float
    n: int
    confidence: float = CONFIDENCE

    @property
    def width(self) -> float:
        return self.high - self.low


def rate_interval(
    errors: Sequence[float] | np.ndarray,
    lengths: Sequence[float] | np.ndarray,
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> Interval | None:
    """The interval of ``sum(errors) / sum(lengths)`` when the utterances are drawn again.

    Args:
        errors, lengths: per utterance, its errors and its reference length (words or characters).
        confidence: the two-sided coverage, e.g. 0.95.
        n_resamples: bootstrap draws.
        seed: of the random draws; the same inputs and seed give the same interval.

    Returns:
        The interval, or None when there is no reference to divide by.
    """
    e, n_ = _arrays(errors, lengths)
    if len(e) == 0 or n_.sum() == 0:
        return None
    value = float(e.sum() / n_.sum())
    rates = _resampled(np.random.default_rng(seed), len(e), n_resamples, lambda idx: _ratio(e[idx], n_[idx]))
    low, high = _percentiles(rates, confidence)
    return Interval(value, low, high, len(e), confidence)


def paired_difference_interval(
    errors_a: Sequence[float],
    lengths_a: Sequence[float],
    errors_b: Sequence[float],
    lengths_b: Sequence[float],
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> Interval:
    """The interval of ``rate(a) - rate(b)`` over the same utterances, drawn together.

    Raises:
        ValueError: the two sides have different numbers of utterances (not the same dataset).
    """
    ea, la = _arrays(errors_a, lengths_a)
    eb, lb = _arrays(errors_b, lengths_b)
    if len(ea) != len(eb) or len(ea) == 0:
        raise ValueError(f"A paired interval needs the same utterances on both sides, not {len(ea)} and {len(eb)}.")
    value = float(_ratio(ea, la) - _ratio(eb, lb))
    diffs = _resampled(np.random.default_rng(seed), len(ea), n_resamples, lambda idx: _ratio(ea[idx], la[idx]) - _ratio(eb[idx], lb[idx]))
    low, high = _percentiles(diffs, confidence)
    return Interval(value, low, high, len(ea), confidence)


def utterances_needed(n: int, half_width: float, margin: float) -> int | None:
    """How many utterances would shrink a ``half_width`` read from ``n`` to within ``margin``.

    Half-widths shrink as 1/sqrt(n): ``n * (half_width / margin) ** 2``. None when no number of
    utterances can do it (the point itself is on the wrong side of the limit, ``margin <= 0``).
    """
    if margin <= 0:
        return None
    if half_width <= margin:
        return n
    return math.ceil(n * (half_width / margin) ** 2)


def _arrays(errors, lengths) -> tuple[np.ndarray, np.ndarray]:
    e, n = np.asarray(errors, dtype=float), np.asarray(lengths, dtype=float)
    if e.shape != n.shape or e.ndim != 1:
        raise ValueError(f"errors and lengths must be two lists of the same length, not {e.shape} and {n.shape}")
    return e, n


def _ratio(errors: np.ndarray, lengths: np.ndarray):
    """Row-wise sum(errors) / sum(lengths); NaN where a draw has no reference at all."""
    total = lengths.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, errors.sum(axis=-1) / np.where(total > 0, total, 1), np.nan)


def _resampled(rng: np.random.Generator, n: int, n_resamples: int, statistic) -> np.ndarray:
    chunk = max(1, _CELLS_PER_CHUNK // n)
    out = []
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
        out.append(statistic(idx))
    values = np.concatenate(out)
    return values[~np.isnan(values)]


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, e.g. 0.95, not {confidence}")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bound_check(interval: Interval, limit: float, *, upper: bool, what: str) -> tuple[bool, str]:
    """Whether the interval's upper (or lower) bound is within ``limit``, and why in words.

    With ``upper``, the figure must be at most ``limit`` with the bound included (an error rate,
    a regression); otherwise at least ``limit`` (an agreement). When the point is within the
    limit but the bound is not, the data are too few to say: the message estimates how many
    more utterances would settle it.
    """
    bound = interval.high if upper else interval.low
    figure = (
        f"{what} {interval.value:.4g} ({interval.confidence:.0%} interval {interval.low:.4g} to "
        f"{interval.high:.4g}, {interval.n} utterances)"
    )
    if (bound <= limit) if upper else (bound >= limit):
        return True, f"{figure}: its {'upper' if upper else 'lower'} bound holds against {limit:g}"
    margin = (limit - interval.value) if upper else (interval.value - limit)
    needed = utterances_needed(interval.n, abs(bound - interval.value), margin)
    if needed is None:
        return False, f"{figure}: {'above' if upper else 'below'} {limit:g}"
    return False, (
        f"{figure}: too few utterances to tell, the interval is wider than the margin to {limit:g}; "
        f"about {needed - interval.n} more utterances in the same mix ({needed} in all) would tell"
    )
