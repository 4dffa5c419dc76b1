"""Error rates and speed metrics, in one registry that evaluation, gates and fine-tuning share.

Metrics are registered by name with ``@register_metric``; ``get_metric`` refuses an unknown name
with the list of valid ones. Text metrics also exist per language (``cer_zh``, ``wer_en``).

Fine-tuning code scores its own predictions with the same normalisation::

    from whisper_registry.metrics import score
    score(["One two three."], ["1, 2, 3"], "en")   # {'wer': 0.0, 'cer': 0.0, 'headline': 'wer', ...}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import jiwer
import numpy as np

from whisper_registry import bootstrap
from whisper_registry.errors import UnknownMetricError
from whisper_registry.normalize import is_character_language, normalizer_for


@dataclass(frozen=True)
class ScoredUtterance:
    """One normalised reference/hypothesis pair with its error counts and timings."""

    language: Optional[str]
    reference: str
    hypothesis: str
    word_errors: int
    words: int
    char_errors: int
    chars: int
    duration_s: Optional[float] = None
    latency_s: Optional[float] = None

    @property
    def by_characters(self) -> bool:
        return is_character_language(self.language)

    @property
    def errors(self) -> int:
        """Errors in the unit the language is scored in (characters for zh/ja/..., words otherwise)."""
        return self.char_errors if self.by_characters else self.word_errors

    @property
    def error_rate(self) -> Optional[float]:
        length = self.chars if self.by_characters else self.words
        return _rate(self.errors, length)


@dataclass(frozen=True)
class Measurements:
    """What metrics are computed from: the scored utterances and run-level timings."""

    utterances: Sequence[ScoredUtterance]
    load_time_s: Optional[float] = None
    n_skipped: int = 0
    wall_s: Optional[float] = None  # all utterances, when they were decoded concurrently


@dataclass(frozen=True)
class Metric:
    name: str
    compute: Callable[[Measurements], Optional[float]]
    description: str
    kind: str  # "text" (from transcripts) or "speed"
    language: Optional[str] = None  # a per-language view of a text metric


METRICS: dict[str, Metric] = {}
# Suffixes of an error rate's bootstrap interval bounds: "wer_ci_low", "cer_zh_ci_high".
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"


def register_metric(name: str, *, description: str, kind: str):
    """Decorator: add ``fn(Measurements) -> float | None`` to the registry under ``name``."""

    def decorate(fn: Callable[[Measurements], Optional[float]]):
        METRICS[name] = Metric(name, fn, description, kind)
        return fn

    return decorate


def get_metric(name: str) -> Metric:
    """The metric called ``name``; ``<text metric>_<language>`` (e.g. ``cer_zh``) is its per-language view.

    Raises:
        UnknownMetricError: listing the valid names.
    """
    key = name.strip().lower()
    if key in METRICS:
        return METRICS[key]
    base, _, language = key.rpartition("_")
    if base in METRICS and METRICS[base].kind == "text" and language.isalpha():
        metric = METRICS[base]
        return Metric(key, lambda m: metric.compute(_only(m, language)), metric.description, "text", language)
    raise UnknownMetricError(
        f"Unknown metric {name!r}. Valid metrics: {', '.join(METRICS)} (text metrics also per language, e.g. cer_zh, wer_en)."
    )


def compute_all(measurements: Measurements) -> dict[str, float]:
    """Every registered metric that applies (None results are left out), plus per-language text metrics."""
    results = {name: metric.compute(measurements) for name, metric in METRICS.items()}
    languages = sorted({u.language for u in measurements.utterances if u.language})
    if len(languages) > 1:
        for language in languages:
            for name in ("wer", "cer"):
                results[f"{name}_{language}"] = get_metric(f"{name}_{language}").compute(measurements)
    return {k: float(v) for k, v in results.items() if v is not None}


def compute_intervals(measurements: Measurements, *, seed: int = bootstrap.SEED) -> dict[str, bootstrap.Interval]:
    """A bootstrap interval over utterances for each error rate ``compute_all`` reports.

    Keyed like ``compute_all`` (``wer``, ``cer``, ``wer_<lang>``, ``cer_<lang>``); an interval
    resamples the same utterances its rate is computed from.
    """
    groups: dict[str, list[ScoredUtterance]] = {"": list(measurements.utterances)}
    languages = sorted({u.language for u in measurements.utterances if u.language})
    if len(languages) > 1:
        groups.update({f"_{lang}": [u for u in measurements.utterances if u.language == lang] for lang in languages})
    out = {}
    for suffix, group in groups.items():
        spaced = [u for u in group if not u.by_characters]
        for name, errors, lengths in (
            ("wer", [u.word_errors for u in spaced], [u.words for u in spaced]),
            ("cer", [u.char_errors for u in group], [u.chars for u in group]),
        ):
            interval = bootstrap.rate_interval(errors, lengths, seed=seed)  # None for no utterances
            if interval is not None:
                out[f"{name}{suffix}"] = interval
    return out


def interval_figures(intervals: dict[str, bootstrap.Interval]) -> dict[str, float]:
    """``{"wer_ci_low": ..., "wer_ci_high": ...}``: intervals as the flat figures MLflow logs."""
    figures = {}
    for name, interval in intervals.items():
        figures[f"{name}{CI_LOW}"] = interval.low
        figures[f"{name}{CI_HIGH}"] = interval.high
    return figures


def headline_metric(languages: Sequence[Optional[str]]) -> str:
    """WER when every utterance is in a language written with spaces; CER otherwise (it covers all)."""
    return "cer" if any(is_character_language(lang) for lang in languages) else "wer"


def score_utterance(
    reference: str,
    hypothesis: str,
    language: Optional[str],
    *,
    duration_s: Optional[float] = None,
    latency_s: Optional[float] = None,
) -> ScoredUtterance:
    """Normalise one pair for its language and count word and character errors."""
    normalize = normalizer_for(language)
    ref, hyp = normalize(reference), normalize(hypothesis)
    word_errors, words = _edits(ref.split(), hyp.split(), jiwer.process_words)
    ref_chars, hyp_chars = (ref.replace(" ", ""), hyp.replace(" ", "")) if is_character_language(language) else (ref, hyp)
    char_errors, chars = _edits(ref_chars, hyp_chars, jiwer.process_characters)
    return ScoredUtterance(language, ref, hyp, word_errors, words, char_errors, chars, duration_s, latency_s)


def score(
    references: Sequence[str],
    hypotheses: Sequence[str],
    language: Optional[str] | Sequence[Optional[str]],
) -> dict[str, float | str | int]:
    """WER and CER of hypotheses against references after normalisation.

    Args:
        references, hypotheses: texts, paired by position.
        language: one Whisper language code for all pairs, or one per pair (None: basic normaliser).

    Returns:
        ``{"wer": ..., "cer": ..., "headline": "wer"|"cer", "n_utterances": n}`` plus
        ``wer_<lang>``/``cer_<lang>`` when several languages are present. ``wer`` is absent
        when every pair is in a language scored by characters.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses: pass them in pairs.")
    languages = [language] * len(references) if language is None or isinstance(language, str) else list(language)
    if len(languages) != len(references):  # zip would score the shorter run only
        raise ValueError(f"{len(references)} pairs but {len(languages)} languages: pass one language, or one per pair.")
    utterances = [score_utterance(r, h, lang) for r, h, lang in zip(references, hypotheses, languages, strict=True)]
    text = {k: v for k, v in compute_all(Measurements(utterances)).items() if _is_text(k)}
    return {**text, "headline": headline_metric(languages), "n_utterances": len(utterances)}


def _is_text(name: str) -> bool:
    base = name.rpartition("_")[0] if name not in METRICS else name
    return base in METRICS and METRICS[base].kind == "text"


def _edits(ref, hyp, process) -> tuple[int, int]:
    if not ref:  # jiwer cannot align against nothing: every hypothesis unit is an insertion
        return len(hyp), 0
    if not hyp:
        return len(ref), len(ref)
    joined = (" ".join(ref), " ".join(hyp)) if isinstance(ref, list) else (ref, hyp)
    out = process(*joined)
    return out.substitutions + out.deletions + out.insertions, out.substitutions + out.deletions + out.hits


def _rate(errors: int, length: int) -> Optional[float]:
    if length == 0:
        return None if errors == 0 else float("inf")
    return errors / length


def _only(m: Measurements, language: str) -> Measurements:
    return Measurements([u for u in m.utterances if u.language == language], m.load_time_s, m.n_skipped)


def _timed(m: Measurements) -> list[tuple[float, float]]:
    """(latency, duration) of each utterance that has both."""
    return [(u.latency_s, u.duration_s) for u in m.utterances if u.latency_s is not None and u.duration_s]


# ------------------------------------------------------------------------------------ the metrics


@register_metric("wer", description="word error rate over utterances in languages written with spaces", kind="text")
def _wer(m: Measurements) -> Optional[float]:
    spaced = [u for u in m.utterances if not u.by_characters]
    if not spaced:
        return None
    return _rate(sum(u.word_errors for u in spaced), sum(u.words for u in spaced))


@register_metric("cer", description="character error rate over all utterances", kind="text")
def _cer(m: Measurements) -> Optional[float]:
    if not m.utterances:
        return None
    return _rate(sum(u.char_errors for u in m.utterances), sum(u.chars for u in m.utterances))


@register_metric("rtf", description="real-time factor: transcription seconds per audio second", kind="speed")
def _rtf(m: Measurements) -> Optional[float]:
    timed = _timed(m)
    if not timed:
        return None
    # Concurrent utterances overlap: then the run's wall time, not the sum of latencies, is spent.
    seconds = m.wall_s if m.wall_s is not None else sum(latency for latency, _ in timed)
    return seconds / sum(duration for _, duration in timed)


@register_metric("latency_p50_s", description="median seconds to transcribe one utterance", kind="speed")
def _latency_p50(m: Measurements) -> Optional[float]:
    timed = _timed(m)
    return float(np.percentile([latency for latency, _ in timed], 50)) if timed else None


@register_metric("latency_p95_s", description="95th percentile seconds to transcribe one utterance", kind="speed")
def _latency_p95(m: Measurements) -> Optional[float]:
    timed = _timed(m)
    return float(np.percentile([latency for latency, _ in timed], 95)) if timed else None


@register_metric("load_time_s", description="seconds to download, verify and load the model", kind="speed")
def _load_time(m: Measurements) -> Optional[float]:
    return m.load_time_s


@register_metric("n_utterances", description="utterances evaluated", kind="count")
def _n_utterances(m: Measurements) -> float:
    return float(len(m.utterances))


@register_metric("n_skipped", description="dataset rows skipped for unusable audio", kind="count")
def _n_skipped(m: Measurements) -> float:
    return float(m.n_skipped)
