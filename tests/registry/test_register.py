import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow_faster_whisper import checksums, flavor_config
from mlflow_faster_whisper.errors import InvalidSourceError, UnsupportedQuantizationError

from tests.registry.conftest import TINY_DECODING, dead_process_owner, kill_when_in_store
from whisper_registry import tags, tracking, versions
from whisper_registry.compare import summarize
from whisper_registry.errors import ModelNotFoundError, RegistrationError
from whisper_registry.promote import promote
from whisper_registry.register import register


def test_one_run_one_version_per_quantization_with_tags(tiny_registered, tiny_whisper_hf):
    client = MlflowClient()
    assert [v.quantization for v in tiny_registered.versions] == ["int8", "float32"]
    assert [v.version for v in tiny_registered.versions] == ["1", "2"]
    run = client.get_run(tiny_registered.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["quantizations"] == "int8,float32"
    sizes = {}
    for v in tiny_registered.versions:
        mv = client.get_model_version("tiny", v.version)
        assert mv.run_id == tiny_registered.run_id  # all versions link to the one registration run
        t = mv.tags
        assert t[tags.QUANTIZATION] == v.quantization
        assert t[tags.BASE_MODEL] == str(tiny_whisper_hf)
        assert t[tags.SOURCE_KIND] == "transformers"
        assert t[tags.REGISTER_RUN] == tiny_registered.run_id
        conf = flavor_config(v.model_uri)
        assert t[tags.CHECKSUMS_DIGEST] == checksums.digest(conf["checksums"])
        assert int(t[tags.SIZE_BYTES]) == conf["size_bytes"]
        assert conf["decoding"] == {**TINY_DECODING, "temperature": [0.0]}
        sizes[v.quantization] = int(t[tags.SIZE_BYTES])
    assert sizes["int8"] < sizes["float32"]


def test_bad_input_is_refused_before_anything_is_created(mlflow_store, tiny_whisper_hf, tmp_path):
    with pytest.raises(UnsupportedQuantizationError, match="Use one of"):
        register(tiny_whisper_hf, "tiny", ["int4"])
    with pytest.raises(InvalidSourceError):
        register(tmp_path, "tiny", ["int8"])
    assert mlflow.search_runs(search_all_experiments=True).empty
    assert MlflowClient().search_registered_models() == []


@pytest.fixture
def tiny_ct2_float16(tiny_whisper_hf, tmp_path):
    import ctranslate2

    out = tmp_path / "tiny-ct2"
    converter = ctranslate2.converters.TransformersConverter(
        str(tiny_whisper_hf), copy_files=["tokenizer.json", "preprocessor_config.json"]
    )
    converter.convert(str(out), quantization="float16")
    return out


def test_a_failed_quantization_registers_nothing_and_is_reported(mlflow_store, tiny_ct2_float16):
    # A CTranslate2 directory is logged as stored (float16): int8 is refused by the flavor.
    with pytest.raises(RegistrationError) as info:
        register(tiny_ct2_float16, "ct2", ["float16", "int8"])
    result = info.value.result
    assert [v.quantization for v in result.versions] == ["float16"]
    assert list(result.failed) == ["int8"] and "stored as float16" in result.failed["int8"]
    assert "float16 as version 1" in str(info.value) and "failed int8" in str(info.value)
    client = MlflowClient()
    assert [mv.version for mv in client.search_model_versions("name='ct2'")] in (["1"], [1])
    run = client.get_run(result.run_id)
    assert run.info.status == "FAILED" and run.data.tags["failed_quantizations"] == "int8"


@pytest.mark.real_weights
def test_a_registration_killed_mid_conversion_leaves_no_version_and_reruns(mlflow_store, whisper_base_hf, tmp_path):
    """SIGKILL while CTranslate2 converts whisper-base: no version, no alias; the same command then succeeds."""
    exe = Path(sys.executable).parent / "whisper-registry"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    command = [str(exe), "register", str(whisper_base_hf), "--name", "killed", "--quantization", "int8", "--no-progress"]
    proc = subprocess.Popen(command, env={**os.environ, "TMPDIR": str(scratch)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    # The converter's working directory appears when the conversion starts: killed then, the
    # process is inside the conversion whatever the host's speed (no sleep to guess how far in).
    while not list(scratch.glob("mlflow-faster-whisper-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the registration finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    client = mlflow.MlflowClient()
    assert client.search_model_versions("name='killed'") == []
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    versions = client.search_model_versions("name='killed'")
    assert [str(v.version) for v in versions] == ["1"]
    assert client.get_registered_model("killed").aliases == {}


def _register_command(source, name: str) -> list[str]:
    exe = Path(sys.executable).parent / "whisper-registry"
    return [str(exe), "register", str(source), "--name", name, "--quantization", "int8", "--no-progress"]


def _register_runs(client) -> dict[str, str]:
    runs = client.search_runs([os.environ["MLFLOW_EXPERIMENT_ID"]], filter_string=f"tags.`{tags.RUN_KIND}` = 'register'")
    return {r.info.run_id: r.info.status for r in runs}


def _assert_complete(mv) -> None:
    for key in (tags.QUANTIZATION, tags.SIZE_BYTES, tags.CHECKSUMS_DIGEST, tags.REGISTER_RUN):
        assert mv.tags.get(key), (mv.version, key, mv.tags)


def test_a_registration_killed_as_its_version_appears_leaves_it_complete_and_the_next_ends_its_run(
    mlflow_store, tiny_whisper_hf, tmp_path
):
    """SIGKILL the moment the version row exists: the version already has every tag, and the next
    registration on this host ends the dead one's RUNNING run as KILLED.

    The kill lands at the first look that finds the row; the few writes that follow it (the
    description, the run's tags and end) take milliseconds, so a process descheduled watcher may
    look only once the run has ended: then the version must be complete all the same, and there
    is no dead run to end (the logging test below kills deterministically mid-run)."""
    command = _register_command(tiny_whisper_hf, "killed")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    database = tmp_path / "mlflow.db"
    assert kill_when_in_store(proc, database, "SELECT count(*) FROM model_versions WHERE name = ?", ("killed",)), \
        "the registration ended before its version appeared"
    client = MlflowClient()
    [mv] = client.search_model_versions("name='killed'")
    _assert_complete(mv)
    killed = list(_register_runs(client).values())
    assert killed in (["RUNNING"], ["FINISHED"]), killed  # killed mid-run, or just after it ended

    register(tiny_whisper_hf, "killed", ["int8"])
    assert sorted(_register_runs(client).values()) == (["FINISHED", "KILLED"] if killed == ["RUNNING"] else ["FINISHED", "FINISHED"])
    found = client.search_model_versions("name='killed'")
    assert sorted(str(v.version) for v in found) == ["1", "2"]
    for mv in found:
        _assert_complete(mv)


def test_a_registration_killed_while_it_logs_registers_nothing_and_the_next_ends_its_run(
    mlflow_store, tiny_whisper_hf, tmp_path
):
    """SIGKILL once the logged model exists (converting, uploading): no version; the next
    registration ends the dead run as KILLED and its half-logged model as FAILED."""
    command = _register_command(tiny_whisper_hf, "killed")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_when_in_store(proc, tmp_path / "mlflow.db", "SELECT count(*) FROM logged_models"), \
        "the registration ended before it logged a model"
    client = MlflowClient()
    assert client.search_model_versions("name='killed'") == []
    [killed_run] = _register_runs(client)

    register(tiny_whisper_hf, "killed", ["int8"])
    assert _register_runs(client)[killed_run] == "KILLED"
    assert "RUNNING" not in _register_runs(client).values()
    half_logged = client.search_logged_models([os.environ["MLFLOW_EXPERIMENT_ID"]], filter_string=f"source_run_id = '{killed_run}'")
    assert [m.status for m in half_logged] == [LoggedModelStatus.FAILED]
    [mv] = client.search_model_versions("name='killed'")
    _assert_complete(mv)


def test_a_version_whose_registration_never_finished_is_refused_left_out_then_removed(
    tiny_registered, tiny_whisper_hf
):
    """What a registration killed between creating a version and tagging it left (releases that
    tagged afterwards): a bare version of a RUNNING register run whose process is gone."""
    client = MlflowClient()
    run = client.create_run(os.environ["MLFLOW_EXPERIMENT_ID"], tags={
        tags.RUN_KIND: "register", tags.RUN_MODEL_NAME: "tiny", tracking.RUN_OWNER: dead_process_owner(),
    })
    bare = client.create_model_version("tiny", client.get_model_version("tiny", "1").source, run_id=run.info.run_id)

    with pytest.raises(ModelNotFoundError, match="unfinished registration"):
        versions.get("tiny", bare.version)
    with pytest.raises(ModelNotFoundError, match="unfinished registration"):
        promote("tiny", bare.version, "staging")
    assert [s.version for s in summarize("tiny")] == ["1", "2"]

    result = register(tiny_whisper_hf, "tiny", ["int8"], decoding=TINY_DECODING)
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    left = client.search_model_versions("name='tiny'")
    assert str(bare.version) not in {str(v.version) for v in left}
    assert sorted(str(v.version) for v in left) == sorted(["1", "2", result.versions[0].version])
    for mv in left:
        _assert_complete(mv)
