"""The version lifecycle: load a stored version, serve it from a slot (primary or shadow), follow
its alias, move to another version beside it and retire the old one once no request holds it.

Everything here takes the service's settings (``ServiceConfig``) from its caller.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import bentoml

from whisper_bento import auth, metrics, model_ref
from whisper_bento.config import ServiceConfig, bound_violation

with bentoml.importing():
    import mlflow_faster_whisper
    from mlflow_faster_whisper import checksums, devices, uris
    from mlflow_faster_whisper import constants as c
    from mlflow_faster_whisper.decoding import DecodingOptions
    from mlflow_faster_whisper.loaded import LoadedVersion
    from mlflow_faster_whisper.malloc import release_free_memory

if TYPE_CHECKING:
    from mlflow_faster_whisper.engine import Engine
    from whisper_bento.model_ref import ModelChoice

_logger = logging.getLogger(__name__)


class BoundsError(ValueError):
    """A version's decoding defaults, with the service's, break the service's bounds."""


@dataclass(eq=False)
class Served:
    """One loaded version: its model, engine, decoding defaults and what responses report. A
    request holds it (``users``) from admission to its last byte."""

    version: LoadedVersion
    placement: devices.Placement
    model_info: dict[str, Any]
    load_seconds: float
    users: int = 0
    # This process's resident memory growth over the load: what the budget's estimate is checked
    # against by hand (/info); other threads allocate meanwhile, so it is not what is accounted.
    rss_growth_bytes: int | None = None

    @property
    def engine(self) -> Engine:
        """The running engine of a version a request holds (a held version is not retired)."""
        engine = self.version.started_engine
        assert engine is not None, "a retired version serves no request"
        return engine

    @property
    def defaults(self) -> DecodingOptions:
        return self.version.defaults

    @property
    def version_defaults(self) -> DecodingOptions:
        return self.version.version_defaults


def load(
    stored: bentoml.Model, registry: model_ref.RegistryVersion | None, uri: str, source: str, config: ServiceConfig, **engine_options: Any
) -> Served:
    """Load a stored version (checksums verified) with the service's options and start its engine;
    ``uri`` named it, resolved from ``source`` ("registry" or "bento").

    Raises:
        BoundsError: its decoding defaults, with the service's, break the service's bounds.
    """
    started = time.perf_counter()
    rss_before = resident_bytes()
    model_dir = model_ref.model_path(stored)
    conf = mlflow_faster_whisper.flavor_config(model_dir)
    whisper = mlflow_faster_whisper.load_model(model_dir, **config.load.model_dump())
    # In force, after any fallback (devices.place): what /info and every response report.
    placement = devices.Placement(whisper.model.device, whisper.model.compute_type, config.load.compute_type)
    version = LoadedVersion(
        whisper,
        conf.get(c.DECODING),
        config.decoding,
        **{
            "batch_size": config.batch_size,
            "max_requests": config.max_requests,
            "max_wait_s": config.max_latency_ms / 1000,
            "on_pass": metrics.observe_pass,
            **engine_options,
        },
    )
    defaults = version.resolve()
    problem = bound_violation(config, defaults)
    if problem is not None:
        raise BoundsError(
            f"The decoding defaults (model version + service config) break the service's bounds: "
            f"{problem.message} Lower the default or raise the bound."
        )
    version.start()  # now, not on the first request
    served = Served(
        version, placement, _model_info(stored, conf, placement, registry, uri, source), round(time.perf_counter() - started, 3)
    )
    rss_after = resident_bytes()
    served.rss_growth_bytes = rss_after - rss_before if rss_after is not None and rss_before is not None else None
    metrics.LOADED[whisper] = (str(served.model_info["name"]), str(served.model_info["version"]))
    _logger.info(
        "Serving %s (%s) on %s/%s, loaded in %.2fs",
        served.model_info["name"],
        served.model_info["version"],
        placement.device,
        placement.compute_type,
        served.load_seconds,
    )
    return served


def load_primary(
    stored: bentoml.Model, choice: ModelChoice, config: ServiceConfig, uri: str | None = None, **engine_options: Any
) -> Served:
    """The version a model ``uri`` (default: the service's first) starts on; in a worker whose alias
    had moved since the serving process resolved it and whose new version cannot be loaded, that
    process's version."""
    uri = uri or config.model
    try:
        return load(stored, choice.registry, uri, choice.source, config, **engine_options)
    except Exception as exc:
        fallback = choice.fallback
        if fallback is None:
            raise
        _logger.warning(
            "%s version %s could not be loaded (%s: %s); serving version %s, as the serving process resolved it at start-up",
            uri,
            choice.registry.version if choice.registry else "?",
            type(exc).__name__,
            exc,
            fallback.registry.version if fallback.registry else fallback.ref.tag,
        )
        return load(bentoml.models.get(fallback.ref.tag), fallback.registry, uri, fallback.source, config, **engine_options)


def resident_bytes() -> int | None:
    """This process's resident memory (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def smoke_decode(served: Served) -> None:
    """One cheap pass through a just-loaded version: 1 s of silence, greedy, at most 8 tokens, no
    temperature fallback (silence under beam search with fallback can take seconds)."""
    import numpy as np

    options = served.version.resolve(
        {"beam_size": 1, "temperature": 0.0, "max_new_tokens": 8, "vad_filter": False, "without_timestamps": True}
    )
    served.engine.transcribe(np.zeros(c.SAMPLE_RATE, dtype=np.float32), options)


def retire(served: Served, *, wait: bool = False) -> None:
    """Stop a version no request holds any more and give its memory back, off the event loop (or
    on this thread, with ``wait``: the memory is back when it returns)."""

    def unload() -> None:
        engine = served.version.unload()
        if engine is not None:
            engine.close(wait=True)  # its threads hold the model until they end
        del engine
        gc.collect()
        release_free_memory()
        _logger.info("Version %s unloaded", served.model_info["version"])

    if wait:
        unload()
    else:
        threading.Thread(target=unload, name="whisper-retire", daemon=True).start()


class Slot:
    """A served version that may move: the primary, or the shadow candidate.

    A request holds the version it started on (``acquire``) to its end, whatever moves meanwhile.
    A move (the followed alias names another version, a webhook, the control route) imports the
    new version, verifies its checksums, loads it and warms it with one smoke decode beside the
    served one, then swaps it in between two requests; the old one is unloaded once no request
    holds it. A version that fails is not served, and not retried until the alias moves again.
    """

    def __init__(
        self, role: str, served: Served, uri: str, source: str, config: ServiceConfig, engine_options: dict[str, Any] | None = None
    ):
        self.role = role
        self.served = served
        self.config = config
        self.engine_options = engine_options or {}
        self.follow = Follow(config.follow_interval_s, webhook=config.webhook_secret is not None)
        self.follow.point_at(uri, source)
        self._lock = threading.Lock()  # self.served and its users
        self._moving = threading.Lock()  # one move at a time: the follower's or the control route's
        self._follower: threading.Thread | None = None
        self._full_since: float | None = None  # when admits() first saw the engine full, since
        self._closed = False
        self._start_follower()

    def acquire(self) -> Served:
        with self._lock:
            served = self.served
            served.users += 1
            return served

    def release(self, served: Served) -> None:
        with self._lock:
            served.users -= 1
            retired = served is not self.served and served.users == 0
        if retired:
            retire(served)

    def close(self) -> None:
        """Stop following and unload the served version now (no request may hold it): a model
        unloaded to make room, or idle past its TTL. Waits for a move in progress."""
        with self._moving:
            with self._lock:
                self._closed = True
                served = self.served
                idle = served.users == 0
            self.follow.wake.set()  # the follower sees _closed and ends
        if idle:
            retire(served, wait=True)
        del served

    def held(self) -> int:
        """Requests the served version's engine holds now."""
        engine = self.served.version.started_engine
        return engine.held if engine is not None else 0

    def admits(self, full_for_s: float) -> bool:
        """False once the engine has held every request it may (``max_requests``) for ``full_for_s``,
        as the calls to this see it (the readiness probe's, each few seconds)."""
        engine = self.served.version.started_engine
        if engine is None or engine.held < engine.max_requests:
            self._full_since = None
            return True
        now = time.monotonic()
        if self._full_since is None:
            self._full_since = now
        return now - self._full_since < full_for_s

    def _start_follower(self) -> None:
        if self.follow.target is not None and self._follower is None:
            self._follower = threading.Thread(target=self._follow_alias, name=f"whisper-follow-{self.role}", daemon=True)
            self._follower.start()

    def _follow_alias(self) -> None:
        """Check the followed alias every interval (or when woken) and move to the version it names."""
        follow = self.follow
        while True:  # MLflow is imported only where the registry needs it (model_ref): not at start-up
            follow.wake.wait(follow.interval_s)
            follow.wake.clear()
            if self._closed:
                return
            target = follow.target
            if target is None:  # pinned since, through the control route
                continue
            try:
                holder = model_ref.registry_version(target)
            except Exception as exc:  # the registry is unreachable: keep serving, say so
                follow.note_error(f"checking {target}: {type(exc).__name__}: {exc}")
                continue
            follow.last_check = time.time()
            served = self.served.model_info
            if (
                holder is None
                or (holder.name, holder.version) == follow.failed
                or follow.target != target
                or (holder.name, holder.version) == (served["name"], served["version"])
            ):
                continue  # nothing to do: no lock taken, nothing recomputed, on the common poll
            try:
                self.move_to(holder, target)
            except Exception:  # noted by move_to; the served version stays
                pass

    def move_to(self, holder: model_ref.RegistryVersion, uri: str) -> Served:
        """Serve ``holder`` (named by ``uri``, followed from now on if an alias); the version served.

        Raises:
            Exception: why ``holder`` cannot be served (noted in /info and /metrics); nothing moved.
        """
        with self._moving:
            old = self.served
            if (holder.name, holder.version) != (old.model_info["name"], old.model_info["version"]):
                self._swap_in(holder, uri, old)
            self.follow.point_at(uri, "registry")
        self._start_follower()
        return self.served

    def _swap_in(self, holder: model_ref.RegistryVersion, uri: str, old: Served) -> None:
        _logger.info("Loading %s version %s beside version %s (%s)", holder.name, holder.version, old.model_info["version"], self.role)
        new = None
        try:
            # The version seen, not the URI again: one registry lookup, and no race with a later move.
            tag, registered = model_ref.import_from_registry(uris.version_uri(holder.name, holder.version))
            new = load(bentoml.models.get(tag), registered, uri, "registry", self.config, **self.engine_options)
            smoke_decode(new)
        except Exception as exc:
            if new is not None:  # loaded, but its smoke decode failed
                retire(new)
            self.follow.failed = (holder.name, holder.version)
            self.follow.note_error(f"version {holder.version} was not served: {type(exc).__name__}: {exc}")
            metrics.SWAPS.labels(role=self.role, outcome="failed").inc()
            raise
        with self._lock:
            self.served = new
            idle = old.users == 0
        self.follow.failed, self.follow.last_error = None, None
        self.follow.swaps += 1
        metrics.SWAPS.labels(role=self.role, outcome="ok").inc()
        _logger.info(
            "Now serving %s version %s as %s (was %s; loaded in %.2fs)",
            new.model_info["name"],
            new.model_info["version"],
            self.role,
            old.model_info["version"],
            new.load_seconds,
        )
        if idle:
            retire(old)
        del old, new  # this thread's last references: a retired version's memory goes back


class Follow:
    """Which alias the service follows, if any, and what happened so far (/info)."""

    def __init__(self, interval_s: float, *, webhook: bool = False):
        self.interval_s = interval_s
        self.webhook = webhook  # a webhook secret is configured: signed events wake the check
        self.wake = threading.Event()  # set: check the alias now, not at the end of the interval
        self.target: str | None = None
        self.why = ""
        self.last_check: float | None = None
        self.last_error: str | None = None
        # (name, version) that failed: not retried until the alias moves again. The name too: a control
        # call's version 1 of another model must not stop this alias's version 1.
        self.failed: tuple[str, str] | None = None
        self.swaps = 0
        self.webhook_events = 0  # signed events on the followed alias

    def point_at(self, model_uri: str, source: str) -> None:
        """Serving ``model_uri`` (resolved from ``source``) from now on: follow it if it is an alias."""
        alias = model_ref.alias_of(model_uri) if source == "registry" else None
        self.target = uris.alias_uri(*alias) if alias and self.interval_s > 0 else None
        if self.target:
            self.why = f"follows {self.target} every {self.interval_s:g} s"
        elif source == "bento":
            self.why = "pinned: a built bento serves the version recorded in it"
        elif alias:
            self.why = "pinned: follow_interval_s=0"
        else:
            self.why = f"pinned: {auth.public_uri(model_uri)} names one version"
        self.failed = None

    def note_error(self, message: str) -> None:
        self.last_error = message
        _logger.warning("Following the alias: %s", message)

    def report(self) -> dict[str, Any]:
        return {
            "following": self.target is not None,
            "alias": self.target,
            "interval_s": self.interval_s,
            "why": self.why,
            "last_check": self.last_check,
            "swaps": self.swaps,
            "failed_version": self.failed[1] if self.failed else None,
            "failed_model": self.failed[0] if self.failed else None,
            "last_error": self.last_error,
            "webhook": self.webhook,
            "webhook_events": self.webhook_events,
        }


def _model_info(
    stored: bentoml.Model,
    conf: dict[str, Any],
    placement: devices.Placement,
    registry: model_ref.RegistryVersion | None,
    uri: str,
    source: str,
) -> dict[str, Any]:
    meta = stored.info.metadata
    return {
        "name": registry.name if registry else meta.get(model_ref.META_NAME, stored.tag.name),
        "version": registry.version if registry else meta.get(model_ref.META_VERSION),
        "aliases": list(registry.aliases) if registry else meta.get(model_ref.META_ALIASES, []),
        "run_id": registry.run_id if registry else meta.get(model_ref.META_RUN_ID),
        "uri": auth.public_uri(uri),  # every response carries it: no local path
        "source": source,
        "bento_model": str(stored.tag),
        "quantization": conf.get(c.QUANTIZATION),
        "compute_type": placement.compute_type,
        "device": placement.device,
        "size_bytes": conf.get(c.SIZE_BYTES),
        "sha256": checksums.digest(conf.get(c.CHECKSUMS, {})),
        "checksums": conf.get(c.CHECKSUMS, {}),
        "lineage": auth.hide_local_paths(conf.get(c.SOURCE)),
    }
