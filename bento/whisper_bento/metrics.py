"""What the service adds to BentoML's /metrics: engine passes, queue waits, version moves, and
gauges read as /metrics is scraped."""

from __future__ import annotations

import collections
import logging
import weakref
from typing import TYPE_CHECKING, Any

import bentoml

if TYPE_CHECKING:
    from mlflow_faster_whisper.engine import PassStats

_logger = logging.getLogger(__name__)

_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
BATCH_SIZE = bentoml.metrics.Histogram(
    name="whisper_batch_size",
    documentation="Requests sharing one forward pass of the decoding engine.",
    buckets=_BUCKETS,
)
PASS_WINDOWS = bentoml.metrics.Histogram(
    name="whisper_pass_windows",
    documentation="30 s windows per forward pass, by CTranslate2 call (encode, generate, ...).",
    labelnames=["op"],
    buckets=_BUCKETS,
)
SWAPS = bentoml.metrics.Counter(
    name="whisper_model_swaps",
    documentation="Moves of the primary or shadow version to another: ok, or failed (the served version stays).",
    labelnames=["role", "outcome"],
)
QUEUE_WAIT = bentoml.metrics.Histogram(
    name="whisper_queue_wait_seconds",
    documentation="From a request's admission to its first forward pass.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)

# Every model this worker holds in memory -> (name, version): a retired version leaves it once its
# memory can go back (/metrics' whisper_version_loaded).
LOADED: weakref.WeakKeyDictionary[Any, tuple[str, str]] = weakref.WeakKeyDictionary()


def observe_pass(stats: PassStats) -> None:
    BATCH_SIZE.observe(stats.requests)
    PASS_WINDOWS.labels(op=stats.op).observe(stats.windows)
    _logger.debug("Forward pass: %s of %d window(s) from %d request(s) in %.3fs", stats.op, stats.windows, stats.requests, stats.seconds)


def gauges(content: str, slots: list[Any], upload_bytes: int, models: Any = None) -> str:
    """BentoML's /metrics ``content`` with the gauges: requests each slot's engine holds, the
    versions in this worker's memory, and the upload bytes in flight."""
    lines = [
        "# HELP whisper_requests_held Requests an engine holds now (decoding, or waiting for the model).",
        "# TYPE whisper_requests_held gauge",
    ]
    lines += [f'whisper_requests_held{{role="{slot.role}"}} {slot.held()}' for slot in slots]
    lines += ["# HELP whisper_version_loaded Copies of a model version in this worker's memory.", "# TYPE whisper_version_loaded gauge"]
    loaded = collections.Counter(LOADED.values())
    lines += [f'whisper_version_loaded{{name="{name}",version="{version}"}} {n}' for (name, version), n in sorted(loaded.items())]
    lines += model_lines(models) if models is not None else []
    lines += [
        "# HELP whisper_upload_bytes_in_flight Bytes held by uploads being read, or read and not yet decoded.",
        "# TYPE whisper_upload_bytes_in_flight gauge",
        f"whisper_upload_bytes_in_flight {upload_bytes}",
    ]
    return content.rstrip("\n") + "\n" + "\n".join(lines) + "\n"


# Per model (models.Hosted): read from its counters as /metrics is scraped.
_MODEL_SERIES = (
    ("whisper_model_loaded", "gauge", "1 while the model is in memory.", lambda e: int(e.slot is not None)),
    ("whisper_model_loaded_bytes", "gauge", "Memory the model takes as the budget counts it (0 unloaded).", lambda e: e.loaded_bytes),
    ("whisper_model_loads_total", "counter", "Loads of the model (on first use, or again after an unload).", lambda e: e.loads),
    ("whisper_model_unloads_total", "counter", "Unloads of the model: for room in the budget, or idle past its TTL.", lambda e: e.unloads),
    ("whisper_model_requests_total", "counter", "Requests that held the model.", lambda e: e.requests),
    ("whisper_model_passes_total", "counter", "Forward passes of the model's engines.", lambda e: e.passes),
    (
        "whisper_model_turn_waited_passes_max",
        "gauge",
        "The most forward passes of other models one of this model's passes waited for.",
        lambda e: e.most_waited_passes,
    ),
)


def model_lines(models: Any) -> list[str]:
    """The per-model series of a ``models.Models``, and its memory budget."""
    lines = [
        "# HELP whisper_memory_budget_bytes Memory the loaded models may take together.",
        "# TYPE whisper_memory_budget_bytes gauge",
        f"whisper_memory_budget_bytes {models.budget_bytes}",
        "# HELP whisper_overlapping_passes_total Forward passes that ran while another model's ran (the models take turns).",
        "# TYPE whisper_overlapping_passes_total counter",
        f"whisper_overlapping_passes_total {models.overlapping_passes}",
    ]
    for name, kind, text, read in _MODEL_SERIES:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{model="{entry.name}"}} {read(entry)}' for entry in models.entries]
    return lines
