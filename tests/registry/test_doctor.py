"""``whisper-registry doctor``: the runtime facts and a real smoke transcription per device."""

from __future__ import annotations

import json

import ctranslate2
import pytest

from whisper_registry.cli import main
from whisper_registry.doctor import doctor


def test_doctor_reports_the_runtime_and_runs_the_model_on_each_device(tiny_registered, capsys):
    assert main(["doctor", "--model", "models:/tiny/1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ctranslate2"] == ctranslate2.__version__
    assert report["cuda_device_count"] == ctranslate2.get_cuda_device_count()
    assert [s["device"] for s in report["smoke"]] == ["cpu"] + (["cuda"] if report["cuda_device_count"] else [])
    cpu = report["smoke"][0]
    assert cpu["ok"] and cpu["error"] is None
    assert cpu["compute_type"] in ("int8", "int8_float32")  # version 1 is stored in int8: as serving runs it
    assert cpu["load_s"] > 0 and cpu["transcribe_s"] > 0 and isinstance(cpu["text"], str)
    assert report["ok"] is True

    assert main(["doctor", "--model", "models:/tiny/1"]) == 0
    text = capsys.readouterr().out
    assert "smoke cpu int8" in text and ": ok, load" in text and f"ctranslate2 {ctranslate2.__version__}" in text
    assert "cuBLAS 12:" in text


def test_doctor_without_a_model_reports_facts_and_says_how_to_smoke(capsys):
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "CUDA devices:" in text and "  cpu: " in text
    assert "smoke transcription: skipped (give --model MODEL_URI" in text


@pytest.mark.skipif(ctranslate2.get_cuda_device_count() > 0, reason="checks a machine without a GPU")
def test_a_device_that_cannot_run_is_reported_not_raised(tiny_registered):
    from whisper_registry import doctor as module

    local = module._local_copy("models:/tiny/1")
    smoke = module._smoke(local, "cuda")
    assert not smoke.ok and smoke.error.startswith("DeviceError: device='cuda' cannot be used: no CUDA GPU is visible")
    assert "device='cpu'" in smoke.error
    assert doctor()["smoke"] == []
