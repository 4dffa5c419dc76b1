"""Where a model runs, decided at load: device, compute type, and cuBLAS 12 for CTranslate2."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import ctranslate2
import pytest

import mlflow_faster_whisper as mfw
from mlflow_faster_whisper import devices
from mlflow_faster_whisper.errors import DeviceError, LoadOptionsError

NO_GPU = ctranslate2.get_cuda_device_count() == 0
needs_no_gpu = pytest.mark.skipif(not NO_GPU, reason="checks what a machine without a GPU gets")


def test_the_stored_quantization_is_the_default_and_falls_back_where_the_device_cannot_run_it(caplog):
    assert devices.place("cpu", "default", "int8").compute_type == "int8"
    assert devices.place("cpu", "default", "int8_float32").compute_type == "int8_float32"
    assert devices.place("cpu", "default", None).compute_type == "default"  # unknown: CTranslate2 decides
    with caplog.at_level(logging.INFO, logger="mlflow_faster_whisper.devices"):
        stored = devices.place("cpu", "default", "float16")
    assert stored.compute_type == "float32" and stored.requested_compute_type == "float16"
    assert "'float16' (as stored) is not supported on cpu" in caplog.text
    assert all(r.levelno == logging.INFO for r in caplog.records)  # as stored: information, not a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mlflow_faster_whisper.devices"):
        asked = devices.place("cpu", "int8_float16", "float32")
    assert asked.compute_type == "int8_float32" and asked.requested_compute_type == "int8_float16"
    assert "not supported on cpu" in caplog.text and caplog.records[0].levelno == logging.WARNING


def test_conversion_and_placement_know_the_same_compute_types_and_each_falls_back_to_float32():
    from mlflow_faster_whisper import compute_types

    assert set(mfw.QUANTIZATIONS) - {"none"} == set(devices.COMPUTE_TYPES) - {"default", "auto"}
    for row in compute_types.BY_NAME.values():
        assert set(row.fallbacks) <= set(compute_types.BY_NAME) - {row.name}, row.name
        assert (row.fallbacks or ("float32",))[-1] == "float32", row.name  # what every device runs
        placed = devices.place("cpu", row.name)
        assert placed.compute_type in ctranslate2.get_supported_compute_types("cpu"), row.name


def test_load_options_parse_like_decoding_options():
    assert mfw.LoadOptions.parse(None) == mfw.LoadOptions(device="auto", compute_type="default", cpu_threads=0, num_workers=1)
    assert mfw.LoadOptions.parse({"device": "cpu", "cpu_threads": None}).cpu_threads == 0  # None: the default
    with pytest.raises(LoadOptionsError, match="Unknown load option 'gpu'") as caught:
        mfw.LoadOptions.parse({"gpu": True})
    assert caught.value.field == "gpu"
    with pytest.raises(LoadOptionsError, match="compute_type.*unknown compute_type 'int4'") as caught:
        mfw.LoadOptions.parse({"compute_type": "int4"})
    assert caught.value.field == "compute_type"
    with pytest.raises(LoadOptionsError, match="num_workers"):
        mfw.LoadOptions.parse({"num_workers": 0})


@needs_no_gpu
def test_cuda_without_a_gpu_is_refused_at_load_and_auto_is_the_cpu(caplog, tmp_path, tiny_whisper_hf):
    with pytest.raises(DeviceError, match="no CUDA GPU is visible.*device='cpu'"):
        devices.place("cuda")
    with caplog.at_level(logging.WARNING, logger="mlflow_faster_whisper.devices"):
        assert devices.place("auto").device == "cpu"
    assert not caplog.records  # no GPU at all is not a fallback worth a warning
    with pytest.raises(DeviceError, match="use one of auto, cpu, cuda"):
        devices.place("tpu")
    mfw.save_model(str(tiny_whisper_hf), tmp_path / "m", quantization="int8")
    with pytest.raises(DeviceError, match="device='cuda' cannot be used"):
        mfw.load_model(str(tmp_path / "m"), device="cuda")  # at load, not at the first request
    assert mfw.load_model(str(tmp_path / "m"), device="auto").model.device == "cpu"


_PROBE = """
import ctypes, json
from pathlib import Path
from mlflow_faster_whisper import devices
found = devices.load_cublas()
# What CTranslate2 does: dlopen by soname. It must now succeed with no LD_LIBRARY_PATH.
ctypes.CDLL("libcublas.so.12")
maps = Path("/proc/self/maps").read_text()
print(json.dumps({"cublas": found.__dict__, "mapped": [n for n in devices.CUBLAS_LIBRARIES if n in maps],
                  "runtime": devices.runtime_facts()}))
"""


def _probe(extra_path: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "PYTHONPATH")}
    if extra_path:
        env["PYTHONPATH"] = extra_path
    return subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.cuda_libs
def test_cublas_is_preloaded_from_the_installed_wheel(cublas_site):
    probe = _probe(str(cublas_site))
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout)
    if result["cublas"]["source"] == "system":
        pytest.skip(f"this machine has its own cuBLAS 12 ({result['cublas']['path']}), which wins")
    assert result["cublas"] == {"found": True, "source": "wheel", "path": str(cublas_site / "nvidia" / "cublas" / "lib"), "detail": ""}
    assert result["mapped"] == list(devices.CUBLAS_LIBRARIES)
    assert result["runtime"]["ctranslate2"] == ctranslate2.__version__


def test_without_the_wheel_cublas_is_reported_missing_with_the_fix():
    probe = subprocess.run(
        [sys.executable, "-c", "import json; from mlflow_faster_whisper import devices; print(json.dumps(devices.load_cublas().__dict__))"],
        env={k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "PYTHONPATH")},
        capture_output=True, text=True, timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    cublas = json.loads(probe.stdout)
    if cublas["found"]:
        pytest.skip(f"this environment has cuBLAS 12 ({cublas['source']}: {cublas['path']})")
    assert "nvidia-cublas-cu12 wheel is not installed" in cublas["detail"]
    assert "[gpu]" in devices.GPU_EXTRA_HINT


def test_runtime_facts_name_the_devices_and_libraries():
    facts = devices.runtime_facts()
    assert facts["cuda_device_count"] == ctranslate2.get_cuda_device_count()
    assert facts["devices"][0] == {"device": "cpu", "compute_types": sorted(ctranslate2.get_supported_compute_types("cpu"))}
    assert len(facts["devices"]) == 1 + facts["cuda_device_count"]
    assert set(facts) >= {"ctranslate2", "faster_whisper", "driver", "cublas"}
