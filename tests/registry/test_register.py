import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow_faster_whisper import checksums, flavor_config
from mlflow_faster_whisper.errors import InvalidSourceError, UnsupportedQuantizationError

from tests.registry.conftest import TINY_DECODING
from whisper_registry import tags
from whisper_registry.errors import RegistrationError
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
    # The converter's working directory appears when the conversion starts.
    while not list(scratch.glob("mlflow-faster-whisper-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(1.0)  # well into the conversion of 290 MB of weights
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
