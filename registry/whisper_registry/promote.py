"""Move the ``staging``/``production`` aliases behind gates, with an audit trail and rollback.

Gates read the candidate's own evaluation (the ``eval.*`` version tags): ``"cer<=0.08"``,
``"wer<0.1"``, ``"rtf<=0.5"``, or the figures the service's shadow wrote on it from live traffic
(the ``shadow.*`` tags): ``"shadow.agreement>=0.95"``. Those compare point figures; ``.upper`` or
``.lower`` checks an end of the figure's bootstrap interval instead (``"wer.upper<=0.08"``,
``"shadow.agreement.lower>=0.95"``), so a figure read from too few utterances to tell fails,
saying about how many more it would take. ``max_regression`` compares the candidate's headline
error rate with that of the version currently holding the alias on the same dataset (same
digest), utterance by utterance: the alias moves only when the upper bound of the paired
bootstrap interval of the regression is within the limit. A failing gate moves nothing.

Every move is an event in the registered model's tags, ``audit.<alias>.<NNNN>`` (JSON: action,
from/to version, time, user, gate results); the promoted version also gets ``promoted.<alias>.*``
tags. ``rollback`` replays the trail to find the holder before the latest promotion.

Moves of one alias are serialized across processes and machines (``alias_lock``): MLflow has no
compare-and-set for an alias, so two promotions at once could otherwise both check their gates
against the same holder, both write audit event N, and leave a trail that disagrees with the
alias. The lock is a registered model named ``<name>.<alias>.lock`` that exists while a move is
under way: creating a registered model is atomic in every MLflow registry (names are unique), so
exactly one process creates it; the others wait. Under the lock the holder is read afresh, the
gates are checked against it, the alias moves and the event is written.

A lock whose owner died (SIGKILL mid-move) is broken at once by a waiter on the owner's host,
which sees that the owner process is gone; from another host, once it is ``LOCK_STALE_S`` old.
Breaking is itself a create: the breaker of a given lock creates ``<lock>.break.<id>`` (one
waiter wins), checks the lock is still the one it judged dead, deletes it, then the marker. Two
waiters can thus never delete a fresh lock that a third took meanwhile.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import operator
import os
import random
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Optional

from whisper_registry import bootstrap, metrics, tags, tracking, versions
from whisper_registry.errors import (
    AliasBusyError,
    GateFailedError,
    GateSyntaxError,
    NotEvaluatedError,
    NothingToRollBackError,
    UnknownAliasError,
    UnknownMetricError,
)

_logger = logging.getLogger(__name__)

ALIASES = ("staging", "production")
LOCK_WAIT_S = 60.0  # how long a move waits for another move of the same alias
LOCK_STALE_S = 300.0  # a lock older than this was left by a process that died mid-move
BOUNDS = ("upper", "lower")
_OPERATORS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq}
_GATE = re.compile(
    r"^\s*(?P<metric>[A-Za-z][\w]*(\.[A-Za-z][\w]*){0,2})\s*(?P<op><=|>=|==|<|>)\s*(?P<value>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$"
)


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    threshold: float
    bound: Optional[str] = None  # "upper" or "lower": check that end of the figure's interval

    def __str__(self) -> str:
        return f"{self.metric}{'.' + self.bound if self.bound else ''}{self.op}{self.threshold:g}"

    def holds(self, value: float) -> bool:
        return _OPERATORS[self.op](value, self.threshold)


@dataclass(frozen=True)
class GateResult:
    gate: str
    value: Optional[float]
    passed: bool
    detail: str = ""
    bound: Optional[float] = None  # the interval's end the gate checked, where it checked one


@dataclass
class PromotionResult:
    name: str
    alias: str
    action: str  # promote | rollback
    from_version: Optional[str]
    to_version: str
    time: str
    user: str
    moved: bool
    gates: list[GateResult] = field(default_factory=list)


def parse_gate(text: str) -> Gate:
    """``"cer<=0.08"`` -> ``Gate("cer", "<=", 0.08)``.

    Raises:
        GateSyntaxError: not ``<metric><op><number>``.
        UnknownMetricError: the metric is not in the metrics registry (the message lists them).
    """
    m = _GATE.match(text)
    bound = m["metric"].rpartition(".")[2] if m else None
    if bound in BOUNDS:  # "wer.upper<=0.08": the upper end of wer's interval
        return replace(parse_gate(text.replace(f".{bound}", "", 1)), bound=bound)
    if not m:
        raise GateSyntaxError(
            f"Cannot read the gate {text!r}: write <metric><op><number>, e.g. cer<=0.08, wer<0.1 or rtf<=0.5 "
            f"(operators: {', '.join(_OPERATORS)})."
        )
    if m["metric"].startswith(tags.SHADOW_PREFIX):  # a figure the service's shadow wrote on the version
        figure = m["metric"][len(tags.SHADOW_PREFIX) :]
        if figure not in tags.SHADOW_FIGURES:
            raise UnknownMetricError(
                f"Unknown shadow figure {figure!r}: use one of {', '.join(tags.SHADOW_PREFIX + f for f in tags.SHADOW_FIGURES)}."
            )
        return Gate(m["metric"], m["op"], float(m["value"]))
    metric = metrics.get_metric(m["metric"]).name
    return Gate(metric, m["op"], float(m["value"]))


def check_alias(alias: str) -> str:
    """Raises UnknownAliasError unless ``alias`` is one of ``ALIASES``."""
    if alias not in ALIASES:
        raise UnknownAliasError(f"Unknown alias {alias!r}: use one of {', '.join(ALIASES)} (stages are deprecated; aliases only).")
    return alias


def promote(
    name: str,
    version: str | int,
    alias: str,
    *,
    gates: Optional[list[str | Gate]] = None,
    max_regression: Optional[float] = None,
    user: Optional[str] = None,
) -> PromotionResult:
    """Point ``alias`` at ``version`` if every gate holds, and record the move.

    Args:
        name: the registered model.
        version: a version number of ``name`` (or ``models:/<name>/<version>``).
        alias: ``staging`` or ``production``.
        gates: conditions on the version's own evaluation, e.g. ``["cer<=0.08"]``.
        max_regression: the most the headline error rate may exceed that of the current holder
            of ``alias`` on the same dataset, read as the upper bound of the paired bootstrap
            interval of the difference (ignored when no version holds it).
        user: recorded in the audit trail (default: MLFLOW_TRACKING_USERNAME or the OS user).

    Returns:
        The move (``moved`` is False when the version already held the alias) and the gate results.

    Raises:
        UnknownAliasError, GateSyntaxError, UnknownMetricError: bad arguments.
        ModelNotFoundError, WrongModelError: the version is not a version of ``name``.
        NotEvaluatedError: gates were given but the version was never evaluated.
        GateFailedError: a gate did not hold; the alias did not move.
    """
    check_alias(alias)
    parsed = [g if isinstance(g, Gate) else parse_gate(g) for g in gates or []]
    tracking.configure()
    candidate = versions.get(name, version)
    with alias_lock(name, alias):
        return _promote_locked(name, candidate, alias, parsed, max_regression, user or _user())


def _promote_locked(name, candidate, alias, parsed, max_regression, user) -> PromotionResult:
    holder = versions.holder(name, alias)
    now = _now()
    to_version = str(candidate.version)
    from_version = None if holder is None else str(holder.version)
    if from_version == to_version:
        return PromotionResult(name, alias, "promote", from_version, to_version, now, user, moved=False)
    t = candidate.tags or {}
    needs_evaluation = max_regression is not None or any(not g.metric.startswith(tags.SHADOW_PREFIX) for g in parsed)
    if needs_evaluation and tags.EVAL_RUN_ID not in t:
        raise NotEvaluatedError(
            f"Version {to_version} of {name!r} has no evaluation to check gates against: "
            f"evaluate models:/{name}/{to_version} on a dataset first."
        )
    results = [_check_gate(g, t) for g in parsed]
    if max_regression is not None:
        results.append(_check_regression(name, t, holder, alias, max_regression))
    failed = [r for r in results if not r.passed]
    if failed:
        summary = "; ".join(f"{r.gate} ({r.detail})" for r in failed)
        raise GateFailedError(
            f"Not promoting version {to_version} of {name!r} to {alias}: {summary}. The alias stays on {_version_label(holder)}.",
            results,
        )
    result = PromotionResult(name, alias, "promote", from_version, to_version, now, user, True, results)
    _move(result)
    return result


def rollback(name: str, alias: str, *, user: Optional[str] = None) -> PromotionResult:
    """Give ``alias`` back to the version that held it before the latest promotion.

    Raises:
        UnknownAliasError: not a supported alias.
        ModelNotFoundError: no such model.
        NothingToRollBackError: no promotion recorded, none before the first, or the alias was
            moved outside the registry workflows since.
    """
    check_alias(alias)
    tracking.configure()
    with alias_lock(name, alias):
        return _rollback_locked(name, alias, user)


def _rollback_locked(name: str, alias: str, user: Optional[str]) -> PromotionResult:
    holder = versions.holder(name, alias)
    stack: list[dict] = []
    for event in audit_trail(name, alias):
        if event["action"] == "promote":
            stack.append(event)
        elif stack:
            stack.pop()
    if not stack:
        raise NothingToRollBackError(f"No promotion of {name!r} to {alias} is recorded: there is nothing to roll back.")
    last = stack[-1]
    if holder is None or str(holder.version) != str(last["to_version"]):
        raise NothingToRollBackError(
            f"The {alias} alias of {name!r} is on {_version_label(holder)} but the audit trail ends with "
            f"version {last['to_version']}: it was moved outside whisper-registry. Promote the version you want explicitly."
        )
    if last["from_version"] is None:
        raise NothingToRollBackError(
            f"Version {last['to_version']} was the first holder of {alias} for {name!r}: there is no earlier "
            "version to restore. Promote another version instead."
        )
    versions.get(name, last["from_version"])  # it must still exist
    result = PromotionResult(name, alias, "rollback", str(holder.version), str(last["from_version"]), _now(), user or _user(), True)
    _move(result)
    return result


def audit_trail(name: str, alias: str) -> list[dict]:
    """The recorded events of ``alias``, oldest first."""
    model = tracking.client().get_registered_model(name)
    prefix = f"{tags.AUDIT_PREFIX}{alias}."
    keyed = sorted((int(k[len(prefix) :]), v) for k, v in (model.tags or {}).items() if k.startswith(prefix) and k[len(prefix) :].isdigit())
    return [json.loads(v) for _, v in keyed]


@contextlib.contextmanager
def alias_lock(name: str, alias: str, *, wait_s: float = LOCK_WAIT_S, stale_s: float = LOCK_STALE_S) -> Iterator[None]:
    """Hold the move lock of ``name``'s ``alias`` (see the module docstring).

    Raises:
        AliasBusyError: another move held it for longer than ``wait_s``.
    """
    client = tracking.client()
    lock = f"{name}.{alias}.lock"
    token = f"{tracking.owner()}:{uuid.uuid4().hex}"  # host:pid:start, and unique to this hold
    deadline = time.monotonic() + wait_s
    while not _create(client, lock, token, f"Held by whisper-registry while it moves {name}@{alias}; it is deleted after the move."):
        held = _lock_age_and_owner(client, lock)
        if held is not None and (tracking.owner_is_dead(held[1]) or held[0] > stale_s):
            _break(client, lock, held, stale_s)
            continue
        if time.monotonic() > deadline:
            who = f" by {held[1]}" if held else ""
            raise AliasBusyError(
                f"{name}@{alias} is being moved{who}: the registered model {lock!r} has held its lock for longer than "
                f"{wait_s:.0f} s. Retry; if no promotion is running, delete that registered model."
            )
        time.sleep(0.05 + random.random() * 0.2)
    try:
        yield
    finally:
        held = _lock_age_and_owner(client, lock)
        if held is not None and held[1] == token:  # not a lock another waiter took after breaking ours
            _delete(client, lock)


def _create(client, model_name: str, owner: str, description: str) -> bool:
    """Create the registered model ``model_name`` owned by ``owner``; False if it exists."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name, tags={tags.LOCK_OWNER: owner}, description=description)
        return True
    except MlflowException as exc:
        # A store answers a duplicate name by reading the existing model for its message: if the
        # holder deleted it in between, that read says RESOURCE_DOES_NOT_EXIST. Both mean "retry".
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
            raise
        return False


def _break(client, lock: str, held: tuple[float, str], stale_s: float) -> None:
    """Delete ``lock`` if it is still the dead or stale one ``held`` describes; one breaker at a time."""
    age, dead_owner = held
    marker = f"{lock}.break.{hashlib.sha256(dead_owner.encode()).hexdigest()[:16]}"
    if not _create(client, marker, f"{tracking.owner()}:{uuid.uuid4().hex}", f"Breaking {lock} left by {dead_owner}."):
        # Another waiter is breaking it; its marker goes too if that waiter died mid-break.
        mark = _lock_age_and_owner(client, marker)
        if mark is not None and (tracking.owner_is_dead(mark[1]) or mark[0] > stale_s):
            _delete(client, marker)
        return
    try:
        now = _lock_age_and_owner(client, lock)
        if now is not None and now[1] == dead_owner:
            why = "its process has ended" if tracking.owner_is_dead(dead_owner) else f"held for {age:.0f} s"
            _logger.warning("Breaking the lock %s of %s: %s", lock, dead_owner, why)
            _delete(client, lock)
    finally:
        _delete(client, marker)


def _delete(client, model_name: str) -> None:
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):
        client.delete_registered_model(model_name)


def _lock_age_and_owner(client, lock: str) -> Optional[tuple[float, str]]:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(lock)
    except MlflowException:
        return None  # released in the meantime
    return time.time() - model.creation_timestamp / 1000, (model.tags or {}).get(tags.LOCK_OWNER, "?")


def _move(result: PromotionResult) -> None:
    client = tracking.client()
    client.set_registered_model_alias(result.name, result.alias, result.to_version)
    sequence = len(audit_trail(result.name, result.alias)) + 1
    event = {k: v for k, v in asdict(result).items() if k not in ("name", "moved")}
    client.set_registered_model_tag(result.name, f"{tags.AUDIT_PREFIX}{result.alias}.{sequence:04d}", json.dumps(event))
    prefix = f"{tags.PROMOTED_PREFIX}{result.alias}."
    summary = {
        "time": result.time,
        "by": result.user,
        "action": result.action,
        "from_version": result.from_version or "none",
        "gates": "; ".join(f"{g.gate}: {g.detail}" for g in result.gates) or "none",
    }
    for key, value in summary.items():
        client.set_model_version_tag(result.name, result.to_version, prefix + key, value)
    _logger.info("%s: %s %s -> version %s (was %s)", result.name, result.action, result.alias, result.to_version, result.from_version)


def _check_gate(gate: Gate, version_tags: dict[str, str]) -> GateResult:
    shadow = gate.metric.startswith(tags.SHADOW_PREFIX)
    key = gate.metric if shadow else f"{tags.EVAL_PREFIX}{gate.metric}"
    raw = version_tags.get(key)
    if raw is None:
        where = "the version's shadow figures: serve it as shadow= beside production first" if shadow else "the version's evaluation"
        return GateResult(str(gate), None, False, f"no {gate.metric} in {where}")
    value = float(raw)
    if gate.bound:
        return _check_bound(gate, value, version_tags, key, shadow)
    passed = gate.holds(value)
    return GateResult(str(gate), value, passed, f"{gate.metric}={value:.4g} {'holds' if passed else 'fails'}")


def _check_bound(gate: Gate, value: float, version_tags: dict[str, str], key: str, shadow: bool) -> GateResult:
    """A gate on one end of the figure's bootstrap interval (``wer.upper<=0.08``); ``key`` is the
    figure's tag, ``shadow`` whether the service's shadow wrote it."""
    low, high = version_tags.get(key + metrics.CI_LOW), version_tags.get(key + metrics.CI_HIGH)
    n = version_tags.get(f"{tags.SHADOW_PREFIX}requests" if shadow else f"{tags.EVAL_PREFIX}n_utterances")
    if low is None or high is None or n is None:
        return GateResult(
            str(gate),
            None,
            False,
            f"no interval of {gate.metric} recorded: evaluate the version again "
            "(evaluations and shadow figures record one beside each rate)",
        )
    interval = bootstrap.Interval(value, float(low), float(high), int(float(n)))
    bound = interval.high if gate.bound == "upper" else interval.low
    if (gate.bound == "upper") == (gate.op in ("<", "<=")):  # the conservative end: noise can refuse
        passed, detail = bootstrap.bound_check(interval, gate.threshold, upper=gate.bound == "upper", what=gate.metric)
        return GateResult(str(gate), value, passed and gate.holds(bound), detail, bound)
    passed = gate.holds(bound)
    return GateResult(str(gate), value, passed, f"{gate.metric} {gate.bound} bound {bound:.4g} {'holds' if passed else 'fails'}", bound)


def _check_regression(name: str, candidate_tags: dict[str, str], holder, alias: str, limit: float) -> GateResult:
    gate = f"regression<={limit:g}"
    headline = candidate_tags.get(tags.EVAL_HEADLINE, "wer")
    mine = candidate_tags.get(f"{tags.EVAL_PREFIX}{headline}")
    if holder is None:
        return GateResult(gate, None, True, f"no version holds {alias}")
    dataset = candidate_tags.get(tags.EVAL_DATASET)
    theirs = _holder_run(name, holder, dataset)
    if mine is None or theirs is None:
        return GateResult(
            gate,
            None,
            False,
            f"version {holder.version} (holding {alias}) has no {headline} on dataset {str(dataset)[:12]}: "
            f"evaluate models:/{name}/{holder.version} on the same dataset",
        )
    # The same utterances drawn for both versions: the regression's interval, not two point figures.
    # Imported here: evaluate brings the decoding engine, which only this gate needs.
    from whisper_registry.evaluate import paired_difference

    try:
        diff = paired_difference(headline, candidate_tags[tags.EVAL_RUN_ID], theirs)
    except ValueError as exc:
        return GateResult(gate, None, False, f"{exc} Evaluate both versions on the same dataset again")
    if diff is None:
        return GateResult(
            gate,
            None,
            False,
            f"no per-utterance counts in the evaluations of this version and version "
            f"{holder.version}: evaluate both again on the same dataset to compare them utterance by utterance",
        )
    what = f"regression ({headline} of this version minus that of version {holder.version})"
    passed, detail = bootstrap.bound_check(diff, limit, upper=True, what=what)
    return GateResult(gate, diff.value, passed, detail, diff.high)


def _holder_run(name: str, holder, dataset: Optional[str]) -> Optional[str]:
    """The id of the holder's latest evaluation run on ``dataset``."""
    t = holder.tags or {}
    if dataset and t.get(tags.EVAL_DATASET) == dataset and tags.EVAL_RUN_ID in t:
        return t[tags.EVAL_RUN_ID]
    # The holder's latest evaluation is on another dataset: look for an earlier run on this one.
    client = tracking.client()
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiment_ids,
        filter_string=(
            f"tags.`{tags.RUN_MODEL_NAME}` = '{name}' and tags.`{tags.RUN_MODEL_VERSION}` = '{holder.version}' "
            f"and tags.`{tags.RUN_DATASET_DIGEST}` = '{dataset}'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _version_label(mv) -> str:
    return "no version" if mv is None else f"version {mv.version}"


def _user() -> str:
    try:
        return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
