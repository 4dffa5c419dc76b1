"""The shadow: a candidate version decoding a sampled fraction of live requests too, off the
hot path, and its figures against production written to its model version in MLflow.

The service owns the candidate's slot (loaded, followed and swapped like the primary version) and
gives its engine ``defer`` on production's engine; this module decides what to shadow and keeps
the figures.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from mlflow_faster_whisper.engine import Ticket
from mlflow_faster_whisper.errors import Cancelled, Overloaded
from mlflow_faster_whisper.transcription import Transcription
from whisper_registry import tags as registry_tags
from whisper_registry.bootstrap import rate_interval
from whisper_registry.metrics import CI_HIGH, CI_LOW, score_utterance

_logger = logging.getLogger(__name__)
_COUNTS = ("agreed", "word_errors", "words", "char_errors", "chars")


class Shadow:
    """The candidate version (``shadow``) decoding a sampled fraction of live requests too.

    Off the hot path: the request is answered first, the candidate's engine runs a pass only while
    production's holds no request (so a production request waits at most for one shadow pass in
    flight), and shadow work not started within the service's ``shadow_max_wait_s`` or beyond its queue is
    dropped and counted. The figures compare the candidate with production on the same requests
    (same request options over each version's own defaults): agreement (the same normalised
    text), WER and CER of the candidate against production's text, and the ratio of their time in
    forward passes; agreement, WER and CER each with a bootstrap interval over requests
    (``shadow.agreement_ci_low``...). They are written to the candidate's model version as ``shadow.*`` tags every
    ``report_every`` requests and at shutdown; no audio or text is stored. A move of either
    version starts new figures.
    """

    def __init__(self, slot, *, fraction: float, report_every: int):
        self.slot = slot  # the service's slot of the candidate: acquire(), release(), served, follow
        self.fraction = fraction
        self.report_every = report_every
        self._lock = threading.Lock()
        self._random = random.Random()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="whisper-shadow-report")
        self._figures: Figures | None = None
        self.pending = 0  # offered to the candidate's engine, not finished

    def offer(
        self, audio: np.ndarray, overrides: dict[str, Any], primary: Transcription, ticket: Ticket, primary_info: dict[str, Any]
    ) -> None:
        """Maybe decode a just-answered request with the candidate too (never raises)."""
        if self._random.random() >= self.fraction:
            return
        served = self.slot.acquire()
        try:
            options = served.version.resolve(overrides)
            shadow_ticket = Ticket()
            future = served.engine.submit(audio, options, shadow_ticket)
        except Exception as exc:  # full (Overloaded), or options the candidate cannot take
            self.slot.release(served)
            self._record(served, primary_info, dropped=isinstance(exc, Overloaded), failed=not isinstance(exc, Overloaded))
            return
        with self._lock:
            self.pending += 1
        future.add_done_callback(lambda done: self._finished(done, served, shadow_ticket, primary, ticket.pass_s, primary_info))

    def _finished(
        self, future, served, shadow_ticket: Ticket, primary: Transcription, primary_pass_s: float, primary_info: dict[str, Any]
    ) -> None:
        self.slot.release(served)
        with self._lock:
            self.pending -= 1
        try:
            candidate = future.result()
        except (Overloaded, Cancelled):
            self._record(served, primary_info, dropped=True)
            return
        except Exception as exc:
            _logger.warning("Shadow decoding failed: %s: %s", type(exc).__name__, exc)
            self._record(served, primary_info, failed=True)
            return
        scored = score_utterance(primary.text, candidate.text, primary.language)
        self._record(served, primary_info, scored=scored, seconds=(shadow_ticket.pass_s, primary_pass_s))

    def _record(
        self, served, primary_info: dict[str, Any], *, scored=None, seconds=(0.0, 0.0), dropped: bool = False, failed: bool = False
    ) -> None:
        pair = (served.model_info["name"], served.model_info["version"], str(primary_info["version"]))
        with self._lock:
            figures = self._figures
            if figures is None or figures.pair != pair:  # a version moved: new figures
                if figures is not None and figures.unwritten:
                    self._writer.submit(figures.write)
                figures = self._figures = Figures(pair)
            figures.add(scored, seconds, dropped, failed)
            due = figures.requests and figures.unwritten >= self.report_every
            if due:
                figures.unwritten = 0
        if due:
            self._writer.submit(figures.write)

    def report(self, write: bool = False) -> dict[str, Any]:
        """What /info shows; with ``write``, written to MLflow now (shutdown)."""
        with self._lock:
            figures = self._figures
        if write and figures is not None:
            figures.write()
        served = self.slot.served
        return {
            "model": {k: served.model_info[k] for k in ("name", "version", "uri", "quantization")},
            "fraction": self.fraction,
            "pending": self.pending,
            "follow": self.slot.follow.report(),
            "figures": figures.tags() if figures else None,
        }


class Figures:
    """The shadow figures of one (candidate version, production version) pair."""

    def __init__(self, pair: tuple[str, str, str]):
        self.pair = pair
        self.requests = self.agreed = self.dropped = self.failed = self.unwritten = 0
        self.word_errors = self.words = self.char_errors = self.chars = 0
        self.candidate_s = self.production_s = 0.0
        self._write_lock = threading.Lock()
        # Per-request counts, for the intervals: compact (a few bytes per request), computed at each write.
        self._counts = {k: array("I") for k in _COUNTS}
        self.intervals: dict[str, float] = {}

    def add(self, scored, seconds: tuple[float, float], dropped: bool, failed: bool) -> None:
        self.unwritten += 1
        self.dropped += int(dropped)
        self.failed += int(failed)
        if scored is not None:
            self.requests += 1
            self.agreed += int(scored.hypothesis == scored.reference)
            self.word_errors += scored.word_errors
            self.words += scored.words
            self.char_errors += scored.char_errors
            self.chars += scored.chars
            self.candidate_s += seconds[0]
            self.production_s += seconds[1]
            for key, value in zip(
                _COUNTS,
                (scored.hypothesis == scored.reference, scored.word_errors, scored.words, scored.char_errors, scored.chars),
                strict=True,
            ):
                self._counts[key].append(int(value))

    def _intervals(self) -> dict[str, float]:
        """Bootstrap intervals of agreement, WER and CER over the requests so far (off the request path)."""
        n = min(len(c) for c in self._counts.values())  # add() may be appending meanwhile
        counts = {k: np.frombuffer(c, dtype=f"u{c.itemsize}")[:n].copy() if n else np.zeros(0) for k, c in self._counts.items()}
        out = {}
        for name, errors, lengths in (
            ("agreement", counts["agreed"], np.ones(n)),
            ("wer", counts["word_errors"], counts["words"]),
            ("cer", counts["char_errors"], counts["chars"]),
        ):
            interval = rate_interval(errors, lengths)
            if interval is not None:
                out[name + CI_LOW], out[name + CI_HIGH] = round(interval.low, 4), round(interval.high, 4)
        return out

    def tags(self) -> dict[str, Any]:
        def ratio(a: float, b: float) -> float | None:
            return round(a / b, 4) if b else None

        return {
            "requests": self.requests,
            "dropped": self.dropped,
            "failed": self.failed,
            "agreement": ratio(self.agreed, self.requests),
            "wer": ratio(self.word_errors, self.words),
            "cer": ratio(self.char_errors, self.chars),
            "latency_ratio": ratio(self.candidate_s, self.production_s),
            **self.intervals,
        }

    def write(self) -> None:
        """The figures as ``shadow.*`` tags of the candidate version (never raises: the service goes on)."""
        name, version, production = self.pair
        self.intervals = self._intervals()
        values = {f"{registry_tags.SHADOW_PREFIX}{k}": v for k, v in self.tags().items() if v is not None}
        values[registry_tags.SHADOW_PRODUCTION_VERSION] = production
        values[registry_tags.SHADOW_TIME] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            from mlflow import MlflowClient

            with self._write_lock:
                client = MlflowClient()
                for key, value in values.items():
                    client.set_model_version_tag(name, version, key, str(value))
            _logger.info("Shadow figures of %s version %s written: %s", name, version, self.tags())
        except Exception as exc:
            _logger.warning("Could not write the shadow figures of %s version %s: %s: %s", name, version, type(exc).__name__, exc)
