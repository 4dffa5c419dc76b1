"""One source -> one registered version per quantization, all logged in one MLflow run.

Each quantization is a separate conversion by the flavor (``mlflow_faster_whisper.log_model``);
a conversion that fails registers nothing for that quantization, and the others still go through.
A version is created only once its model is logged, with all its tags in the same call, so a
process killed at any point leaves either a complete version or none. The next registration on
the same host ends the runs of registrations whose process died (KILLED) and removes versions
that older releases left half-tagged (``versions.is_complete``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import mlflow
from tqdm.auto import tqdm

import mlflow_faster_whisper as mfw
from mlflow_faster_whisper import checksums
from mlflow_faster_whisper import constants as c
from mlflow_faster_whisper.conversion import quantization_name
from mlflow_faster_whisper.decoding import DecodingOptions
from mlflow_faster_whisper.errors import FasterWhisperFlavorError, first_line
from mlflow_faster_whisper.sources import resolve_source
from whisper_registry import tags, tracking, versions
from whisper_registry.errors import RegistrationError, RegistryError

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    quantization: str
    size_bytes: int
    checksums_digest: str
    model_id: Optional[str]

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass
class RegistrationResult:
    """The registration run, the versions that registered, and ``{quantization: reason}`` of those that did not."""

    name: str
    run_id: str
    versions: list[RegisteredVersion] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def register(
    source: Any,
    name: str,
    quantizations: Optional[list[str]] = None,
    *,
    base_model: Optional[str] = None,
    revision: Optional[str] = None,
    decoding: DecodingOptions | dict | None = None,
    progress: bool = False,
) -> RegistrationResult:
    """Convert ``source`` once per quantization and register each result as a version of ``name``.

    Args:
        source: a transformers checkpoint directory or hub id, a PEFT adapter directory (with
            ``base_model``), a ``runs:/``/``models:/`` URI of one, a CTranslate2 directory, or an
            in-memory model (see ``mlflow_faster_whisper.save_model``).
        name: the registered model name.
        quantizations: CTranslate2 quantizations, e.g. ``["int8", "float32"]``; None: the flavor's
            default (int8; a CTranslate2 directory as stored).
        base_model: the base checkpoint of an adapter.
        revision: hub revision of a hub id.
        decoding: default decoding options stored with every version.
        progress: show a progress bar per conversion on stderr.

    Returns:
        The run and the registered versions, each tagged with quantization, size, lineage and
        checksums digest.

    Raises:
        InvalidSourceError, UnsupportedQuantizationError, DecodingOptionsError: bad input,
            refused before anything is created.
        RegistrationError: one or more quantizations failed (``.result`` holds those that registered).
    """
    wanted = _check_quantizations(quantizations)
    decoding = DecodingOptions.parse(decoding)
    resolved = resolve_source(source, base_model=base_model, revision=revision)  # refuse bad input early
    setup = tracking.configure()
    clean_up(name, setup.experiment_id)
    label = _describe(source)
    # The owner is a tag of the run from its creation: a run whose process dies is recognisable.
    run = mlflow.start_run(
        experiment_id=setup.experiment_id,
        run_name=f"register {name}",
        tags={tags.RUN_KIND: "register", tags.RUN_MODEL_NAME: name, tracking.RUN_OWNER: tracking.owner()},
    )
    result = RegistrationResult(name=name, run_id=run.info.run_id)
    status = "FAILED"
    try:
        mlflow.log_params(
            {
                "source": label,
                "source_kind": resolved.kind,
                "base_model": resolved.base_model or "",
                "quantizations": ",".join(q or "as-stored" for q in wanted),
                "decoding": json.dumps(decoding.explicit(), sort_keys=True),
            }
        )
        bar = tqdm(wanted, desc=f"register {name}", unit="quantization", disable=not progress)
        for quantization in bar:
            bar.set_postfix_str(f"converting {quantization or 'as stored'}")
            _register_one(resolved, name, quantization, base_model, revision, decoding, label, result)
        bar.close()
        mlflow.set_tags(
            {
                "registered_versions": ",".join(v.version for v in result.versions),
                "failed_quantizations": ",".join(result.failed),
            }
        )
        status = "FINISHED" if not result.failed else "FAILED"
    finally:
        mlflow.end_run(status)
    if result.failed:
        raise RegistrationError(_failure_message(result), result)
    return result


def _register_one(source, name, quantization, base_model, revision, decoding, label, result) -> None:
    key = quantization or "as-stored"
    try:
        # Logged, not yet registered: the version is created below, complete, in one call.
        info = mfw.log_model(
            source,
            name=f"{name}-{key}".replace("/", "-"),
            quantization=quantization,
            base_model=base_model,
            revision=revision,
            decoding=decoding,
        )
    except (FasterWhisperFlavorError, mlflow.exceptions.MlflowException, OSError, RuntimeError, ValueError) as exc:
        # Conversion or upload failed: nothing is registered for this quantization.
        _logger.error("Registering %s as %s failed: %s", label, key, exc)
        result.failed[key] = first_line(exc)
        return
    conf = info.flavors[c.FLAVOR_NAME]
    lineage = conf.get(c.SOURCE) or {}
    size_bytes = int(conf[c.SIZE_BYTES])
    version_tags = {
        tags.QUANTIZATION: conf[c.QUANTIZATION],
        tags.SIZE_BYTES: str(size_bytes),
        tags.SIZE_MB: f"{size_bytes / 1e6:.1f}",
        tags.SOURCE: label,
        tags.SOURCE_KIND: lineage.get(c.SOURCE_KIND) or "",
        tags.BASE_MODEL: lineage.get(c.SOURCE_BASE_MODEL) or "",
        tags.ADAPTER: lineage.get(c.SOURCE_ADAPTER) or "",
        tags.CHECKSUMS_DIGEST: checksums.digest(conf[c.CHECKSUMS]),
        tags.SOURCE_RUN: lineage.get(c.SOURCE_RUN_ID) or "",
        tags.REGISTER_RUN: result.run_id,  # versions.is_complete reads it
    }
    try:
        mv = _create_version(name, info, version_tags, f"{conf[c.QUANTIZATION]} CTranslate2 conversion of {label}")
    except mlflow.exceptions.MlflowException as exc:
        _logger.error("Registering %s as %s failed: %s", label, key, exc)
        result.failed[key] = first_line(exc)
        return
    if mv.status != "READY":
        result.failed[key] = f"version {mv.version} did not become READY"
        return
    result.versions.append(
        RegisteredVersion(
            name=name,
            version=str(mv.version),
            quantization=version_tags[tags.QUANTIZATION],
            size_bytes=size_bytes,
            checksums_digest=version_tags[tags.CHECKSUMS_DIGEST],
            model_id=info.model_id,
        )
    )


def _create_version(name: str, info, version_tags: dict[str, str], description: str):
    """Register the logged model as a new version of ``name`` with its tags in the same call (the
    store writes the version row and its tags in one transaction); the description follows."""
    mv = mlflow.register_model(info.model_uri, name, tags={k: v for k, v in version_tags.items() if v})
    tracking.client().update_model_version(name, mv.version, description=description)
    return mv


def clean_up(name: str, experiment_id: str) -> list[str]:
    """End the register runs whose process died, then remove the unfinished versions of ``name``.

    A version is unfinished when a register run created it without its tags (releases that tagged
    a version after creating it, killed in between); it is removed once its run is no longer
    RUNNING (see ``tracking.end_dead_runs`` for which runs are ended).

    Returns:
        The numbers of the versions removed.
    """
    tracking.end_dead_runs(experiment_id, "register")
    try:
        found = versions.list_all(name)
    except RegistryError:
        return []  # no such model yet
    client = tracking.client()
    removed = []
    for mv in found:
        if versions.is_complete(mv) or not mv.run_id:  # an unfinished one names its run
            continue
        if client.get_run(mv.run_id).info.status == "RUNNING":
            continue  # still being tagged by a live registration
        _logger.warning("Removing version %s of %r: its registration (run %s) did not finish", mv.version, name, mv.run_id)
        client.delete_model_version(name, str(mv.version))
        removed.append(str(mv.version))
    return removed


def _check_quantizations(quantizations: Optional[list[str]]) -> list[Optional[str]]:
    if not quantizations:
        return [None]
    wanted: list[Optional[str]] = []
    for q in quantizations:
        name = quantization_name(q)
        if name not in wanted:
            wanted.append(name)
    return wanted


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        return text if "://" in text or text.startswith(("runs:/", "models:/")) or not os.path.exists(text) else os.path.abspath(text)
    return type(source).__name__


def _failure_message(result: RegistrationResult) -> str:
    done = ", ".join(f"{v.quantization} as version {v.version}" for v in result.versions) or "nothing"
    failed = "; ".join(f"{q}: {reason}" for q, reason in result.failed.items())
    return (
        f"Registered {done} of {result.name}; failed {failed}. Nothing was registered for the failed "
        "quantizations: fix the cause and register those quantizations again."
    )
