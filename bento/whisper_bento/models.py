"""The models one service serves: which one a request names, and which are in memory.

Each configured model (``models``, or ``model`` alone) has a ``Hosted`` entry, and while it is
loaded a ``slots.Slot`` (its served version, following its alias). A request names a model by
registered name or ``NAME@ALIAS`` (an alias configured here); ``whisper-1`` (what OpenAI clients
send) and no name mean the first. A model is loaded on first use, one load at a time, within the
memory budget: the least recently used models no request holds are unloaded to make room, and
idle ones after ``model_ttl_s``. A request for a model being loaded waits for it (bounded); a
model that fails to load fails its own requests with the reason, and is tried again by a later
request once ``RETRY_AFTER_S`` has passed. The engines of all loaded models take the device in
turn (``engine.Turns``).

What a model takes in memory is estimated before it is loaded from its artifact's size, scaled
from the stored quantization to the compute type it will run in; once loaded, from the compute
type in force (a fallback may differ). The process's RSS growth over each load is reported
beside it (/info), not accounted: other threads allocate meanwhile.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import bentoml

from mlflow_faster_whisper import devices
from whisper_bento import auth, metrics, model_ref
from whisper_bento.errors import ApiError
from whisper_bento.slots import Served, Slot, load_primary

with bentoml.importing():
    import mlflow_faster_whisper
    from mlflow_faster_whisper import constants as c
    from mlflow_faster_whisper import uris

if TYPE_CHECKING:
    from mlflow_faster_whisper.engine import PassStats, Turns
    from whisper_bento.config import ServiceConfig
    from whisper_bento.model_ref import ModelChoice

_logger = logging.getLogger(__name__)

DEFAULT_NAMES = ("whisper-1",)  # what OpenAI clients send by default: the first model
RETRY_AFTER_S = 30.0  # a model that failed to load is tried again by a request after this
CPU_BUDGET_SHARE = 0.5  # of the RAM, by default: decoding and uploads need the rest
GPU_BUDGET_SHARE = 0.8  # of the GPU's memory: CUDA's context and the passes' buffers need the rest
# Bytes per weight of each compute type (its weights' type): how a stored artifact's size scales.
_WEIGHT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int16": 2, "int8": 1}


def footprint_bytes(size_bytes: int | None, quantization: str | None, compute_type: str | None) -> int:
    """What an artifact of ``size_bytes`` stored in ``quantization`` takes in memory in
    ``compute_type`` (its weights' type: int8_float16 weighs as int8); the stored size when
    either type is unknown."""
    size = int(size_bytes or 0)
    stored, loaded = _weight_bytes(quantization), _weight_bytes(compute_type)
    return size if stored is None or loaded is None else size * loaded // stored


def _weight_bytes(compute_type: str | None) -> int | None:
    return _WEIGHT_BYTES.get((compute_type or "").split("_")[0])


def default_budget_bytes(device: str) -> int:
    """The memory the models may take together on ``device`` ("cpu" or "cuda") by default."""
    if device == "cuda":
        memory = devices.gpu_memory_bytes(0)
        if memory:
            return int(memory[0] * GPU_BUDGET_SHARE)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * CPU_BUDGET_SHARE)


def _public_reason(exc: BaseException) -> str:
    """Why a load failed, as a client may read it: the first line, no place on this machine."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: " + _LOCAL_PATH.sub(auth.LOCAL_PATH, text)


# An absolute or file: path, up to the space or the sentence's punctuation that ends it.
_LOCAL_PATH = re.compile(r"(?<!\S)(?:file:|/)\S*?(?=[.,;:)]?(?:\s|$))")


def model_not_found(requested: str, names: list[str]) -> ApiError:
    """The OpenAI answer to a model this service does not serve."""
    return ApiError(
        404,
        f"The model {requested!r} does not exist here: this service serves {', '.join(names)} (or whisper-1, the first).",
        param="model",
        code="model_not_found",
    )


@dataclass(eq=False)
class Hosted:
    """One configured model: what names it, what it was resolved to, and its state in memory."""

    name: str  # its registered name (what a request's `model` names)
    uri: str
    choice: ModelChoice
    alias: str | None  # the alias its URI names, if any: NAME@ALIAS selects it too
    stored: dict[str, Any]  # version, quantization, size_bytes as resolved at start-up (before any load)
    estimate_bytes: int
    models: Models = field(repr=False)
    first: bool = False
    state: str = "unloaded"  # unloaded, loading, loaded, draining (to be unloaded once idle), failed
    slot: Slot | None = None
    error: str | None = None
    failed_at: float = 0.0
    users: int = 0  # requests holding one of its versions
    last_used: float = 0.0
    loads: int = 0
    unloads: int = 0
    requests: int = 0
    passes: int = 0
    most_waited_passes: int = 0  # the most passes of other models one of its passes waited for
    last_pass: tuple[float, float] = (0.0, 0.0)  # (start, end) of its latest pass, time.monotonic()
    last_info: dict[str, Any] | None = None  # the model_info of its last served version

    def release(self, served: Served) -> None:
        """A request's hold on ``served`` (one of this model's versions) ends."""
        self.models.release(self, served)

    @property
    def loaded_bytes(self) -> int:
        """What its served version takes, as the budget counts it (0 unless loaded)."""
        if self.slot is None:
            return 0
        info = self.slot.served.model_info
        return footprint_bytes(info.get("size_bytes"), info.get("quantization"), info.get("compute_type"))

    def observe_pass(self, stats: PassStats) -> None:
        self.passes += 1
        self.most_waited_passes = max(self.most_waited_passes, stats.waited_passes)
        self.models.note_pass(self, stats.started_at, time.monotonic())
        metrics.observe_pass(stats)

    def report(self) -> dict[str, Any]:
        """What /info and /v1/models say of it."""
        info = self.slot.served.model_info if self.slot is not None else self.last_info
        served = self.slot.served if self.slot is not None else None
        return {
            "name": self.name,
            "uri": auth.public_uri(self.uri),
            "state": self.state,
            "loaded": self.slot is not None,
            "version": (info or self.stored).get("version"),
            "quantization": (info or self.stored).get("quantization"),
            "compute_type": info.get("compute_type") if info else None,
            "size_bytes": self.stored.get("size_bytes"),
            "estimate_bytes": self.estimate_bytes,
            "loaded_bytes": self.loaded_bytes,
            "rss_growth_bytes": served.rss_growth_bytes if served is not None else None,
            "load_seconds": served.load_seconds if served is not None else None,
            "loads": self.loads,
            "unloads": self.unloads,
            "requests": self.requests,
            "passes": self.passes,
            "in_flight": self.users,
            "error": self.error,
            "follow": self.slot.follow.report() if self.slot is not None else None,
        }


class Models:
    """Every configured model, loaded on demand within ``budget_bytes``."""

    def __init__(self, choices: tuple[ModelChoice, ...], config: ServiceConfig, turns: Turns, budget_bytes: int | None = None):
        self.config = config
        self.turns = turns
        self._cond = threading.Condition()  # every entry's state, users and slot
        self._loading = threading.Lock()  # one load at a time: the budget is checked against what is loaded
        self._passes = threading.Lock()
        # Passes of one model that ran while another model's pass ran: none while the turns work.
        self.overlapping_passes = 0
        self.entries = [self._entry(uri, choice, first=i == 0) for i, (uri, choice) in enumerate(zip(config.models, choices, strict=True))]
        device = config.load.place(self.entries[0].stored.get("quantization")).device
        self.budget_bytes = budget_bytes or config.memory_budget_bytes or default_budget_bytes(device)
        if config.model_ttl_s > 0:
            threading.Thread(target=self._unload_idle, name="whisper-model-ttl", daemon=True).start()

    def _entry(self, uri: str, choice: ModelChoice, *, first: bool) -> Hosted:
        stored = bentoml.models.get(choice.ref.tag)
        conf = mlflow_faster_whisper.flavor_config(model_ref.model_path(stored))
        meta = stored.info.metadata
        registered = uris.parse_registry_uri(uri)
        name = str(choice.registry.name if choice.registry else meta.get(model_ref.META_NAME) or stored.tag.name)
        quantization, size = conf.get(c.QUANTIZATION), conf.get(c.SIZE_BYTES)
        facts = {
            "version": choice.registry.version if choice.registry else meta.get(model_ref.META_VERSION),
            "quantization": quantization,
            "size_bytes": size,
        }
        placement = self.config.load.place(quantization)
        estimate = footprint_bytes(size, quantization, placement.compute_type)
        alias = registered.alias if registered is not None else None
        return Hosted(name, uri, choice, alias, facts, estimate, models=self, first=first)

    # -- selection --------------------------------------------------------------------------

    @property
    def first(self) -> Hosted:
        return self.entries[0]

    def select(self, requested: str | None) -> Hosted:
        """The model a request's ``model`` field names.

        Raises:
            ApiError: 404 ``model_not_found``, naming the models served.
        """
        wanted = (requested or "").strip()
        if not wanted or wanted in DEFAULT_NAMES:
            return self.first
        for entry in self.entries:  # NAME@ALIAS first: two aliases of one name are two models
            if entry.alias is not None and wanted == f"{entry.name}@{entry.alias}":
                return entry
        for entry in self.entries:
            if wanted == entry.name:
                return entry
        raise model_not_found(wanted, self.names())

    def names(self) -> list[str]:
        return [self.label(entry) for entry in self.entries]

    def label(self, entry: Hosted) -> str:
        """What names ``entry`` alone: its registered name, with its alias where two share the name."""
        shared = sum(e.name == entry.name for e in self.entries) > 1
        return f"{entry.name}@{entry.alias}" if entry.alias and shared else entry.name

    def note_pass(self, entry: Hosted, start: float, end: float) -> None:
        """Count a pass of ``entry`` from ``start`` to ``end`` that overlapped another model's latest."""
        with self._passes:
            if any(e is not entry and e.last_pass[0] < end and start < e.last_pass[1] for e in self.entries):
                self.overlapping_passes += 1
            entry.last_pass = (start, end)

    # -- holding ----------------------------------------------------------------------------

    def try_acquire(self, entry: Hosted) -> Served | None:
        """``acquire`` if ``entry`` is loaded, else None: the event loop's call, which must not block."""
        with self._cond:
            return self._hold(entry) if entry.state == "loaded" else None

    def _hold(self, entry: Hosted) -> Served:
        assert entry.slot is not None, "a loaded model has a slot"
        entry.users += 1
        entry.requests += 1
        entry.last_used = time.monotonic()
        return entry.slot.acquire()

    def acquire(self, entry: Hosted) -> Served:
        """The version of ``entry`` a request holds until ``release``; loads the model first if
        it is not in memory, waiting at most ``model_load_timeout_s`` (on the caller's thread).

        Raises:
            ApiError: 503 ``model_not_served`` (it failed to load: the reason), or
                ``model_loading`` (not loaded in time).
        """
        deadline = time.monotonic() + self.config.model_load_timeout_s
        with self._cond:
            while True:
                if entry.state == "loaded":
                    return self._hold(entry)
                if entry.state == "failed" and time.monotonic() - entry.failed_at < RETRY_AFTER_S:
                    raise ApiError(
                        503, f"The model {entry.name} could not be loaded: {entry.error}", param="model", code="model_not_served"
                    )
                if entry.state in ("unloaded", "failed"):  # draining: it loads again once unloaded
                    entry.state, entry.error = "loading", None
                    threading.Thread(target=self._load, args=(entry,), name=f"whisper-load-{entry.name}", daemon=True).start()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ApiError(
                        503,
                        f"The model {entry.name} was not loaded within {self.config.model_load_timeout_s:g} s "
                        "(other models' requests hold the memory it needs); retry later.",
                        param="model",
                        code="model_loading",
                    )
                self._cond.wait(remaining)

    def release(self, entry: Hosted, served: Served) -> None:
        slot = entry.slot
        assert slot is not None, "a model is never unloaded while a request holds it"
        # The version first: once the entry counts no request, it may be unloaded at once, and
        # unloading retires the served version only if no request holds it.
        slot.release(served)
        with self._cond:
            entry.users -= 1
            entry.last_used = time.monotonic()
            self._cond.notify_all()  # a load may be waiting for room this request held

    def preload(self) -> None:
        """Load the models ``preload`` names (default: the first) now, on this thread.

        Raises:
            Exception: why one cannot be loaded (the start-up ends).
        """
        wanted = self.config.preload if self.config.preload is not None else (self.first.uri,)
        for name in wanted:
            entry = next((e for e in self.entries if name in (e.uri, e.name, f"{e.name}@{e.alias}")), None)
            if entry is None:
                raise ValueError(f"preload names {name!r}, which is not a configured model: name one of {', '.join(self.names())}.")
            with self._cond:
                entry.state = "loading"
            self._load(entry, raise_errors=True)

    def loaded(self) -> list[Hosted]:
        return [entry for entry in self.entries if entry.slot is not None]

    def slots(self) -> list[Slot]:
        return [entry.slot for entry in self.entries if entry.slot is not None]

    # -- loading and unloading --------------------------------------------------------------

    def _load(self, entry: Hosted, raise_errors: bool = False) -> None:
        with self._loading:
            try:
                self._make_room(entry)
                served = self._load_version(entry)
            except Exception as exc:
                with self._cond:
                    entry.state, entry.error, entry.failed_at = "failed", _public_reason(exc), time.monotonic()
                    self._cond.notify_all()
                if raise_errors:  # the start-up's: it says why in one line
                    raise
                _logger.error("The model %s could not be loaded: %s: %s", entry.name, type(exc).__name__, exc)
                return
            role = "primary" if entry.first else entry.name
            slot = Slot(role, served, entry.uri, served.model_info["source"], self.config, self._engine_options(entry))
            with self._cond:
                entry.slot, entry.state, entry.last_info = slot, "loaded", served.model_info
                entry.loads += 1
                entry.last_used = time.monotonic()
                self._cond.notify_all()
            _logger.info("Model %s loaded (%d of %d bytes of the budget in use)", entry.name, self.used_bytes(), self.budget_bytes)

    def _engine_options(self, entry: Hosted) -> dict[str, Any]:
        return {"on_pass": entry.observe_pass, "turns": self.turns}

    def _load_version(self, entry: Hosted) -> Served:
        """Load the version ``entry`` serves now: the start-up's the first time; after an unload, the
        one its alias names then (the start-up's if the registry cannot say)."""
        choice = entry.choice
        if entry.loads and entry.alias and self.config.follow_interval_s > 0 and choice.registry is not None:
            choice = model_ref.alias_now(entry.uri, str(choice.ref.tag), choice.registry)
        served = load_primary(bentoml.models.get(choice.ref.tag), choice, self.config, entry.uri, **self._engine_options(entry))
        if choice is not entry.choice:
            entry.choice = choice
        return served

    def used_bytes(self) -> int:
        return sum(entry.loaded_bytes for entry in self.entries)

    def _make_room(self, entry: Hosted) -> None:
        """Unload the least recently used idle models until ``entry`` fits the budget; wait for
        requests to let go where every loaded model is held (bounded)."""
        deadline = time.monotonic() + self.config.model_load_timeout_s
        while True:
            with self._cond:
                loaded = [e for e in self.entries if e.slot is not None and e is not entry]
                used = sum(e.loaded_bytes for e in loaded)
                if not loaded or used + entry.estimate_bytes <= self.budget_bytes:
                    if loaded or entry.estimate_bytes <= self.budget_bytes:
                        return
                    _logger.warning(
                        "The model %s alone (%d bytes) is larger than the budget (%d bytes)",
                        entry.name,
                        entry.estimate_bytes,
                        self.budget_bytes,
                    )
                    return
                idle = sorted((e for e in loaded if e.users == 0), key=lambda e: e.last_used)
                if not idle:
                    # Every loaded model is held: the least recently used takes no new request
                    # (they wait for it to load again), so its requests in flight end and free it.
                    draining = min(loaded, key=lambda e: e.last_used)
                    draining.state = "draining"
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        draining.state = "loaded"
                        self._cond.notify_all()
                        raise TimeoutError(f"no room in the memory budget ({self.budget_bytes} bytes): every loaded model holds requests")
                    self._cond.wait(min(remaining, 1.0))
                    continue
                victim = idle[0]
                slot = self._take_out(victim)
            _logger.info("Unloading %s (least recently used) to make room for %s", victim.name, entry.name)
            if slot is not None:
                slot.close()

    def _take_out(self, entry: Hosted) -> Slot | None:
        """(Under the lock.) Mark ``entry`` unloaded; its slot, for the caller to close outside the lock."""
        slot, entry.slot = entry.slot, None
        if slot is not None:
            entry.state = "unloaded"
            entry.unloads += 1
            self._cond.notify_all()
        return slot

    def _unload_idle(self) -> None:
        ttl = self.config.model_ttl_s
        while True:
            time.sleep(max(0.2, min(ttl / 4, 10.0)))
            now = time.monotonic()
            with self._cond:
                expired = [e for e in self.entries if e.slot is not None and e.users == 0 and now - e.last_used > ttl]
                slots = [(e, self._take_out(e)) for e in expired]
            for entry, slot in slots:
                _logger.info("Unloading %s: no request for %g s (model_ttl_s)", entry.name, ttl)
                if slot is not None:
                    slot.close()
