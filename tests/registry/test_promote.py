import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.registry.conftest import clip_rows, kill_when_in_store, write_manifest
from whisper_registry import tags
from whisper_registry.errors import (
    GateFailedError,
    GateSyntaxError,
    ModelNotFoundError,
    NothingToRollBackError,
    NotEvaluatedError,
    UnknownAliasError,
    UnknownMetricError,
    WrongModelError,
)
from whisper_registry.evaluate import evaluate, paired_difference
from whisper_registry.promote import LOCK_STALE_S, Gate, alias_lock, audit_trail, parse_gate, promote, rollback


def _holder(alias):
    return MlflowClient().get_registered_model("tiny").aliases.get(alias)


def test_parse_gate():
    assert parse_gate("cer<=0.08") == Gate("cer", "<=", 0.08)
    assert parse_gate(" wer < 1e-1 ") == Gate("wer", "<", 0.1)
    assert parse_gate("cer_zh<=.3").metric == "cer_zh"
    with pytest.raises(GateSyntaxError, match="cer<=0.08"):
        parse_gate("cer is small")
    with pytest.raises(UnknownMetricError, match="Valid metrics: wer, cer, rtf"):
        parse_gate("accuracy>=0.9")


def test_promote_with_gates_then_refuse_an_impossible_gate_then_roll_back(tiny_evaluated):
    _, (eval1, eval2) = tiny_evaluated
    cer1 = eval1.metrics["cer"]
    result = promote("tiny", "1", "staging", gates=[f"cer<={cer1 + 0.01}", "rtf<=10"], user="alice")
    assert result.moved and result.from_version is None and result.to_version == "1"
    assert all(g.passed for g in result.gates) and _holder("staging") in ("1", 1)

    with pytest.raises(GateFailedError) as info:
        promote("tiny", "2", "staging", gates=["cer<0", "rtf<=10"], user="bob")
    assert [g.passed for g in info.value.results] == [False, True]
    assert "cer<0" in str(info.value) and "stays on version 1" in str(info.value)
    assert str(_holder("staging")) == "1"  # nothing moved
    assert len(audit_trail("tiny", "staging")) == 1  # and nothing recorded

    promote("tiny", "2", "staging", gates=[f"cer<={eval2.metrics['cer'] + 0.01}"], user="bob")
    assert str(_holder("staging")) == "2"
    events = audit_trail("tiny", "staging")
    assert [(e["action"], e["from_version"], e["to_version"], e["user"]) for e in events] == [
        ("promote", None, "1", "alice"),
        ("promote", "1", "2", "bob"),
    ]
    assert events[1]["gates"][0]["passed"] and events[1]["time"].endswith("+00:00")
    version_tags = MlflowClient().get_model_version("tiny", "2").tags
    assert version_tags["promoted.staging.by"] == "bob" and version_tags["promoted.staging.from_version"] == "1"

    back = rollback("tiny", "staging", user="carol")
    assert (back.from_version, back.to_version) == ("2", "1") and str(_holder("staging")) == "1"
    assert audit_trail("tiny", "staging")[-1]["action"] == "rollback"
    with pytest.raises(NothingToRollBackError, match="first holder"):
        rollback("tiny", "staging")
    assert str(_holder("staging")) == "1"


def test_promoting_the_holder_again_moves_nothing(tiny_evaluated):
    promote("tiny", "1", "production")
    again = promote("tiny", "1", "production", gates=["cer<0"])
    assert not again.moved and len(audit_trail("tiny", "production")) == 1


def test_max_regression_compares_with_the_holder_on_the_same_dataset(tiny_evaluated):
    _, (eval1, eval2) = tiny_evaluated
    promote("tiny", "1", "production")
    diff = paired_difference("cer", eval2.run_id, eval1.run_id)
    # The utterances of both evaluations are compared, not the version tags (edited here by hand).
    MlflowClient().set_model_version_tag("tiny", "2", "eval.cer", "0")
    with pytest.raises(GateFailedError, match=r"regression<=.*of version 1"):
        promote("tiny", "2", "production", max_regression=diff.low - 0.01)
    assert str(_holder("production")) == "1"
    result = promote("tiny", "2", "production", max_regression=diff.high + 0.01)
    assert result.moved and result.gates[0].value == pytest.approx(diff.value)
    assert result.gates[0].bound == pytest.approx(diff.high)


def test_max_regression_finds_the_holders_run_on_the_same_dataset(tiny_evaluated, tmp_path, en_zh_clips):
    promote("tiny", "1", "production")
    # v1's latest evaluation is now on another dataset; its earlier run on v2's dataset still counts.
    english = write_manifest(tmp_path / "en.jsonl", clip_rows([c for c in en_zh_clips if c.language == "en"][:1]))
    evaluate("models:/tiny/1", english)
    result = promote("tiny", "2", "production", max_regression=10)
    assert "of version 1" in result.gates[0].detail


def test_max_regression_needs_the_holder_evaluated_on_the_same_dataset(tiny_evaluated, tmp_path, en_zh_clips):
    promote("tiny", "1", "production")
    english = write_manifest(tmp_path / "en.jsonl", clip_rows([c for c in en_zh_clips if c.language == "en"][:1]))
    evaluate("models:/tiny/2", english)  # v2 now evaluated on a dataset v1 never saw
    with pytest.raises(GateFailedError, match="evaluate models:/tiny/1 on the same dataset"):
        promote("tiny", "2", "production", max_regression=10)


def test_bad_arguments(tiny_evaluated):
    with pytest.raises(UnknownAliasError, match="use one of staging, production"):
        promote("tiny", "1", "prod")
    with pytest.raises(UnknownAliasError):
        rollback("tiny", "champion")
    with pytest.raises(WrongModelError, match="version of 'other', not 'tiny'"):
        promote("tiny", "models:/other/1", "staging")
    with pytest.raises(ModelNotFoundError, match=r"no version 7 \(versions: 1, 2\)"):
        promote("tiny", "7", "staging")
    with pytest.raises(ModelNotFoundError, match="no registered model 'nope'"):
        promote("nope", "1", "staging")
    with pytest.raises(NothingToRollBackError, match="nothing to roll back"):
        rollback("tiny", "production")


def test_gates_need_an_evaluation(tiny_registered):
    with pytest.raises(NotEvaluatedError, match="evaluate models:/tiny/1"):
        promote("tiny", "1", "staging", gates=["cer<=0.1"])
    assert promote("tiny", "1", "staging").moved  # no gates: allowed


def test_rollback_refuses_when_the_alias_was_moved_outside(tiny_evaluated):
    promote("tiny", "1", "staging")
    promote("tiny", "2", "staging")
    MlflowClient().set_registered_model_alias("tiny", "staging", "1")
    MlflowClient().set_registered_model_alias("tiny", "staging", "2")
    MlflowClient().delete_registered_model_alias("tiny", "staging")
    with pytest.raises(NothingToRollBackError, match="moved outside"):
        rollback("tiny", "staging")


def _locks() -> list[str]:
    return [m.name for m in MlflowClient().search_registered_models() if ".lock" in m.name]


def test_a_promotion_killed_holding_the_lock_does_not_hold_up_the_next_move(tiny_evaluated, tmp_path):
    """SIGKILL ``whisper-registry promote`` while its lock exists: the next move on this host sees
    the owner process is gone and takes the lock at once, long before the lock would be stale."""
    exe = Path(sys.executable).parent / "whisper-registry"
    proc = subprocess.Popen([str(exe), "promote", "tiny", "1", "--to", "staging", "--user", "killed"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    query = "SELECT count(*) FROM registered_models WHERE name = ?"
    assert kill_when_in_store(proc, tmp_path / "mlflow.db", query, ("tiny.staging.lock",)), \
        "the promotion ended before it took the lock"
    assert _locks() == ["tiny.staging.lock"]  # left by the dead process

    with alias_lock("tiny", "staging", wait_s=10):  # a tenth of LOCK_STALE_S: age cannot let it through
        pass
    result = promote("tiny", "2", "staging", user="next")
    assert result.moved and _holder("staging") in ("2", 2)
    assert _locks() == []


def test_a_stale_lock_is_broken_once_and_the_lock_stays_exclusive(tiny_registered, tmp_path):
    """Eight waiters find one stale lock at once: each judged it stale, yet only that lock is
    broken, never a fresh one another waiter took since; one holder at a time throughout."""
    lock = "tiny.staging.lock"
    MlflowClient().create_registered_model(lock, tags={tags.LOCK_OWNER: "another-host:1:"})
    with sqlite3.connect(tmp_path / "mlflow.db") as db:  # its owner's host cannot be asked: aged past stale
        db.execute("UPDATE registered_models SET creation_time = creation_time - ? WHERE name = ?",
                   (int((LOCK_STALE_S + 60) * 1000), lock))
    waiters = 8
    start = threading.Barrier(waiters)
    guard = threading.Lock()
    holders, most, entered, errors = 0, 0, 0, []

    def wait_then_hold():
        nonlocal holders, most, entered
        start.wait()
        try:
            with alias_lock("tiny", "staging", wait_s=300):
                with guard:
                    holders += 1
                    entered += 1
                    most = max(most, holders)
                time.sleep(0.2)  # long enough for a second holder to show, were there one
                with guard:
                    holders -= 1
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=wait_then_hold) for _ in range(waiters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors and entered == waiters
    assert most == 1
    assert _locks() == []  # the broken lock, every hold and every break marker are gone
