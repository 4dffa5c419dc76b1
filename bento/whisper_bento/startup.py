"""The service's start-up: one explicit step, and one way for it to fail.

``start()`` is called from the top of ``service.py``, the module BentoML loads in the ``bentoml
serve`` process and again in each worker. It tunes the process, reads the configuration, resolves
the model (retrying a registry that is briefly down, with a bounded, logged backoff) and checks
what can be checked before a worker starts (a CUDA GPU for ``device=cuda``).

An error that retrying cannot fix (a bad configuration key, an unknown model or alias, no GPU, a
tampered artifact) is a ``StartupError`` whose message is one line naming the fix. ``fail`` turns
it into one log line and exit code ``EXIT_CODE``, in one place. BentoML restarts a worker that
fails to start, forever; a worker that fails this way asks the ``bentoml serve`` process to stop
the whole server (SIGUSR2, which circus leaves alone), and that process then exits ``EXIT_CODE``
too. Outside a server (``bentoml build``, a test importing the service) the error is raised.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn, Optional

if TYPE_CHECKING:
    from whisper_bento.auth import Keys
    from whisper_bento.config import ServiceConfig
    from whisper_bento.model_ref import ModelChoice

_logger = logging.getLogger(__name__)

EXIT_CODE = 78  # EX_CONFIG (sysexits.h): the configuration is wrong; restarting will not help
# How a worker finds the `bentoml serve` process that can stop the server (set there, inherited).
SERVER_PID_ENV = "WHISPER_BENTO_SERVER_PID"
# Waits between tries of a registry that did not answer: about 15 s in all, then the start fails.
REGISTRY_BACKOFF_S = (1.0, 2.0, 4.0, 8.0)
# MLflow's error codes (and our HTTP_<status> ones) for a registry that may answer a moment later.
_TRANSIENT = {"TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED", "HTTP_429", "HTTP_502", "HTTP_503", "HTTP_504"}

_worker_failed = False  # in the `bentoml serve` process: a worker reported a StartupError


class StartupError(Exception):
    """The service cannot start as configured, and retrying will not change that; the message is
    one line that names the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


def start() -> tuple[ServiceConfig, tuple[ModelChoice, ...], Keys]:
    """Prepare this process to serve: the configuration and the models it serves.

    Returns:
        The service configuration, the BentoML models the service declares (one per configured
        model, the first first), and the keys its configuration names.

    Raises:
        StartupError: outside a BentoML server only; in one, the process ends (``fail``).
    """
    try:
        return _start()
    except StartupError as exc:
        if _role() is None:
            raise
        fail(exc)


def _start() -> tuple[ServiceConfig, tuple[ModelChoice, ...], Keys]:
    import bentoml
    from bentoml.exceptions import InvalidArgument

    from mlflow_faster_whisper.malloc import limit_retained_memory
    from whisper_bento import model_ref, traffic
    from whisper_bento.config import (
        DroppedArgumentsError,
        ServiceConfig,
        refuse_dropped_arguments,
    )

    if _role() == "serve":
        _listen_for_failed_workers()
    elif _role() == "worker":
        # BentoML logs the traceback of a service that could not be created; fail() says it in one line.
        logging.getLogger("bentoml.serve").addFilter(_ExplainedFailure())
    limit_retained_memory()  # a worker swaps models for as long as it runs: keep what it frees from staying mapped
    traffic.release_request_timers()  # and does not keep answered requests for request_timeout_s
    try:
        config = bentoml.use_arguments(ServiceConfig)
    except InvalidArgument as exc:  # BentoML's wrapping of pydantic's ValidationError
        raise StartupError(configuration_problem(exc.__cause__ or exc)) from None
    if model_ref.running_bento_dir() is not None:  # `bentoml serve`'s command line has its --arg values (a worker's none)
        try:
            refuse_dropped_arguments(config, sys.argv)
        except DroppedArgumentsError as exc:
            raise StartupError(str(exc)) from None
    keys = _load_keys(config)
    if _role() == "serve" and config.load.device == "cuda":
        _check_device(config)  # before any worker starts: cheap, and the commonest mistake
    return config, tuple(resolve_model(config, uri) for uri in config.models), keys


def resolve_model(config: ServiceConfig, uri: Optional[str] = None) -> ModelChoice:
    """The model the service declares for ``uri`` (default: ``config.model``); a registry that
    did not answer is asked again after each wait of ``REGISTRY_BACKOFF_S``.

    Raises:
        StartupError: the URI names no model, the model is not a faster_whisper model, or the
            registry did not answer after the last wait.
    """
    from mlflow_faster_whisper.errors import FasterWhisperFlavorError
    from whisper_bento import auth, model_ref

    uri = uri or config.model
    shown = auth.redact_uri(uri)
    for attempt, wait_s in enumerate((*REGISTRY_BACKOFF_S, None), start=1):
        try:
            return model_ref.bento_model_for(uri, follow=config.follow_interval_s > 0)
        except model_ref.RegistryError as exc:
            message = str(exc)
            if exc.error_code not in _TRANSIENT:
                raise StartupError(f"Cannot serve {shown}: {message}") from None
            if wait_s is None:
                raise StartupError(
                    f"Cannot serve {shown}: {message}, {attempt} times over {sum(REGISTRY_BACKOFF_S):g} s. Start the "
                    "registry, or point MLFLOW_TRACKING_URI at one that runs, then start the service again."
                ) from None
            _logger.warning("%s; trying again in %g s (try %d of %d)", message, wait_s, attempt, len(REGISTRY_BACKOFF_S) + 1)
            time.sleep(wait_s)
        except (FasterWhisperFlavorError, RuntimeError) as exc:  # not a faster_whisper model; a bento's record
            raise StartupError(f"Cannot serve {shown}: {exc}") from None
    raise AssertionError("unreachable")


def _load_keys(config: ServiceConfig) -> Keys:
    """The keys the key settings name, read once; a missing variable or file ends the start-up."""
    from whisper_bento.auth import Keys

    try:
        return Keys.load(config.api_key, config.admin_key, config.webhook_secret)
    except ValueError as exc:
        raise StartupError(str(exc)) from None


def _check_device(config: ServiceConfig) -> None:
    from mlflow_faster_whisper import devices
    from mlflow_faster_whisper.errors import DeviceError
    from whisper_bento import model_ref

    try:
        devices.place(config.load.device, config.load.compute_type)
    except DeviceError as exc:
        # A built bento keeps the device it was built with: the fix is another host, or another bento.
        built = (
            " This bento was built for device=cuda: serve it on a GPU host, or build one with device=cpu."
            if model_ref.running_bento_dir() is not None
            else ""
        )
        raise StartupError(f"{exc}{built}") from None


def configuration_problem(exc: BaseException) -> str:
    """One line saying what is wrong with the service configuration, and what the keys are."""
    from pydantic import ValidationError

    from whisper_bento.config import ServiceConfig

    keys = _configuration_keys()
    if not isinstance(exc, ValidationError):
        return f"Invalid service configuration: {exc}. Fix the --arg/--arg-file values."
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "configuration"
        if error["type"] == "extra_forbidden":
            close = _closest(str(error["loc"][-1]), keys)
            problems.append(f"unknown key {where!r}" + (f" (did you mean {close!r}?)" if close else ""))
        elif error["type"] == "missing":
            problems.append(
                f"{where} is required ({ServiceConfig.model_fields[where].description})"
                if where in ServiceConfig.model_fields
                else f"{where} is required"
            )
        else:
            problems.append(f"{where}: {error['msg']}")
    return f"Invalid service configuration: {'; '.join(problems)}. The keys are: {', '.join(keys)} (bentoml serve ... --arg KEY=VALUE)."


def _configuration_keys() -> list[str]:
    from mlflow_faster_whisper.devices import LoadOptions
    from whisper_bento.config import ServiceConfig

    # The load options are given flat (--arg device=cuda): list them as such.
    return [k for k in ServiceConfig.model_fields if k != "load"] + list(LoadOptions.model_fields)


def _closest(word: str, choices: list[str]) -> Optional[str]:
    import difflib

    found = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return found[0] if found else None


def cannot_heal(exc: Optional[BaseException]) -> Optional[StartupError]:
    """``exc`` as a StartupError when restarting the worker cannot fix it, else None.

    A worker's start fails this way when its model cannot be served here: the artifact was
    modified (checksums), the device cannot run it, its options are invalid, its decoding
    defaults break the service's bounds, or the registry answered that a model it names (the
    shadow candidate) does not exist.
    """
    from mlflow_faster_whisper.errors import AudioDecodeError, FasterWhisperFlavorError, first_line
    from whisper_bento.model_ref import RegistryError
    from whisper_bento.slots import BoundsError

    if isinstance(exc, StartupError):
        return exc
    if isinstance(exc, FasterWhisperFlavorError) and not isinstance(exc, AudioDecodeError):
        return StartupError(first_line(exc))
    if isinstance(exc, BoundsError):
        return StartupError(str(exc))
    if isinstance(exc, RegistryError) and exc.error_code not in _TRANSIENT:
        return StartupError(str(exc))
    return None


def fail(exc: StartupError) -> NoReturn:
    """End this server process for ``exc``: one log line, exit code ``EXIT_CODE``.

    In a worker, also ask the ``bentoml serve`` process to stop the server instead of restarting it.
    """
    role = _role()
    _logger.error("%s", exc)
    if role == "worker":
        server = int(os.environ.get(SERVER_PID_ENV) or 0)
        if server and server == os.getppid():
            os.kill(server, signal.SIGUSR2)
        _flush()
        os._exit(EXIT_CODE)  # not SystemExit: uvicorn and the event loop would log it as a failure to retry
    _flush()
    raise SystemExit(EXIT_CODE)


class EndServerOnFailedStart:
    """ASGI middleware: a worker whose service could not be created for a reason restarting cannot
    fix (``cannot_heal``) ends the server through ``fail``, instead of BentoML restarting it."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def watched(message: dict) -> None:
            if message["type"] == "lifespan.startup.failed":
                # Starlette sends this while it handles the exception that ended the start-up.
                error = cannot_heal(sys.exc_info()[1])
                if error is not None and _role() == "worker":
                    fail(error)
            await send(message)

        await self.app(scope, receive, watched)


class _ExplainedFailure(logging.Filter):
    """Drops a log record whose exception ``fail`` reports in one line (``cannot_heal``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and cannot_heal(record.exc_info[1]) is not None)


def _role() -> Optional[str]:
    """ "worker" in a BentoML worker, "serve" in the ``bentoml serve`` process, else None."""
    from bentoml._internal.context import server_context

    if server_context.worker_index is not None:
        return "worker"
    try:
        import click
    except ImportError:
        return None
    context = click.get_current_context(silent=True)
    return "serve" if context is not None and context.command.name == "serve" else None


def _listen_for_failed_workers() -> None:
    """In the ``bentoml serve`` process: a worker's SIGUSR2 stops the server, which then exits EXIT_CODE."""
    if os.environ.get(SERVER_PID_ENV) == str(os.getpid()):
        return

    def worker_failed(signum: int, frame: Any) -> None:
        global _worker_failed
        if not _worker_failed:
            _worker_failed = True
            _logger.error("A worker could not start (the reason is above); stopping the server")
            os.kill(os.getpid(), signal.SIGTERM)  # circus stops every worker, then `bentoml serve` returns

    signal.signal(signal.SIGUSR2, worker_failed)
    atexit.register(_exit_if_a_worker_failed)
    os.environ[SERVER_PID_ENV] = str(os.getpid())  # the workers inherit it


def _exit_if_a_worker_failed() -> None:
    # BentoML's CLI returns normally once circus has stopped; the status must still say the start failed.
    if _worker_failed:
        _flush()
        os._exit(EXIT_CODE)


def _flush() -> None:
    for handler in logging.getLogger().handlers + [h for name in ("bentoml", "whisper_bento") for h in logging.getLogger(name).handlers]:
        with contextlib.suppress(OSError, ValueError):  # a closed stream: nothing left to flush
            handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
