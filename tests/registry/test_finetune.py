"""LoRA fine-tuning: Whisper preprocessing, the MLflow run, interruption and resume, bad input
(tiny random Whisper, fast), and a real fine-tune of Whisper base on real Mandarin speech."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

import mlflow_faster_whisper as mfw

from devkit import audio
from tests.registry.conftest import clip_rows, write_manifest
from whisper_registry import metrics, tags
from whisper_registry.cli import main
from whisper_registry.errors import DatasetError, FinetuneDataError, FinetuneError, LanguageError
from whisper_registry.finetune import finetune
from whisper_registry.finetune_data import (
    IGNORE_INDEX,
    WhisperCollator,
    WhisperTrainingSet,
    check_language,
    prepare,
)

REPO = Path(__file__).resolve().parents[2]
# The tiny model's transcripts are noise: keep generation short so scoring is quick.
TINY = ["--lora-r", "4", "--lora-alpha", "8", "--batch-size", "3", "--max-new-tokens", "4", "--no-progress"]


@pytest.fixture(scope="module")
def zh_clips(speech_clips):
    return [c for c in speech_clips if c.language == "zh"]


@pytest.fixture
def zh_manifest(tmp_path, zh_clips) -> Path:
    return write_manifest(tmp_path / "zh.jsonl", clip_rows(zh_clips))


def _runs() -> list:
    return MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])


# ------------------------------------------------------------------------------- preprocessing


def test_labels_carry_the_prefix_features_are_the_models_and_padding_is_masked(tiny_whisper_hf, zh_clips, zh_manifest):
    from transformers import GenerationConfig, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(tiny_whisper_hf)
    generation = GenerationConfig.from_pretrained(tiny_whisper_hf)
    data = prepare(zh_manifest, processor.tokenizer, generation, language="zh", task="transcribe", max_label_tokens=448)
    tokenizer = processor.tokenizer
    prefix = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|zh|>", "<|transcribe|>", "<|notimestamps|>"])
    for example, clip in zip(data.examples, zh_clips):
        assert example.labels[:4] == prefix and example.labels[-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
        assert tokenizer.decode(example.labels, skip_special_tokens=True) == clip.text
        # What transformers' own prefix setting gives, so training matches generate(language=, task=).
        tokenizer.set_prefix_tokens(language="zh", task="transcribe", predict_timestamps=False)
        assert example.labels == tokenizer(clip.text).input_ids

    items = WhisperTrainingSet(data.examples, processor.feature_extractor)
    # The audio is decoded as evaluate decodes it (PyAV, 16-bit), then goes through the model's extractor.
    samples = data.examples[0].row.samples()
    expected = processor.feature_extractor(samples, sampling_rate=16000, return_tensors="np").input_features[0]
    np.testing.assert_allclose(items[0]["input_features"], expected, atol=1e-6)

    batch = WhisperCollator(prefix[0])([items[i] for i in range(len(items))])
    assert tuple(batch["input_features"].shape) == (3, 80, 3000)
    lengths = [len(e.labels) - 1 for e in data.examples]  # <|startoftranscript|> is the decoder's start token
    assert batch["labels"].shape[1] == max(lengths)
    for row, example, length in zip(batch["labels"].tolist(), data.examples, lengths):
        assert row[:length] == example.labels[1:]
        assert row[length:] == [IGNORE_INDEX] * (max(lengths) - length)


def test_languages_are_checked_against_the_model():
    multilingual = SimpleNamespace(is_multilingual=True, lang_to_id={"<|zh|>": 50260, "<|en|>": 50259}, task_to_id={})
    assert check_language("ZH", multilingual) == "zh"
    with pytest.raises(LanguageError, match="Unknown language 'xx'"):
        check_language("xx", multilingual)
    with pytest.raises(LanguageError, match=r"no <\|fr\|> token"):
        check_language("fr", multilingual)
    with pytest.raises(LanguageError, match="English-only"):
        check_language("zh", SimpleNamespace(is_multilingual=False))


# ------------------------------------------------------------------------ the run, end to end


def test_finetune_logs_the_run_and_registers_from_its_id(mlflow_store, tiny_whisper_hf, zh_manifest, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["finetune", "--base", str(tiny_whisper_hf), "--dataset", str(zh_manifest), "--eval-dataset",
                 str(zh_manifest), "--language", "zh", "--max-steps", "2", "--save-steps", "2",
                 "--target-modules", "q_proj,v_proj", "--output-dir", str(out), *TINY])
    printed = capsys.readouterr().out
    assert code == 0, printed
    (run,) = _runs()
    client = MlflowClient()
    assert run.info.status == "FINISHED" and run.data.tags[tags.RUN_KIND] == "finetune"
    params = run.data.params
    assert (params["lora_r"], params["target_modules"], params["language"], params["max_steps"]) == ("4", "q_proj,v_proj", "zh", "2")
    assert params["base_model"] == str(tiny_whisper_hf) and params["n_train"] == "3" and params["device"] == "cpu"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [2]
    for key in ("eval_cer_before", "eval_cer_after"):
        assert key in run.data.metrics
    adapter = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= adapter
    assert f"runs:/{run.info.run_id}/adapter" in printed

    code = main(["register", f"runs:/{run.info.run_id}/adapter", "--base", str(tiny_whisper_hf), "--name", "tiny-ft",
                 "--quantization", "int8", "--no-progress"])
    assert code == 0
    version = client.get_model_version("tiny-ft", "1")
    assert version.tags[tags.SOURCE_RUN] == run.info.run_id  # the fine-tune run is in the lineage
    assert version.tags[tags.SOURCE_KIND] == "peft" and version.tags[tags.BASE_MODEL] == str(tiny_whisper_hf)
    lineage = mfw.flavor_config("models:/tiny-ft/1")["source"]
    assert lineage["adapter"] == lineage["path"] == f"runs:/{run.info.run_id}/adapter"  # not a temp download


def test_interrupted_run_is_killed_and_resumes_from_its_checkpoint(mlflow_store, tiny_whisper_hf, zh_manifest, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["finetune", "--base", str(tiny_whisper_hf), "--dataset", str(zh_manifest), "--language", "zh",
            "--save-steps", "1", "--target-modules", "q_proj,v_proj", "--output-dir", str(out), *TINY]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "whisper_registry", *args, "--max-steps", "500"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "interrupted by SIGTERM" in stderr and "resume" in stderr
    (killed,) = _runs()
    assert killed.info.status == "KILLED" and killed.data.tags["interrupted_by"] == "SIGTERM"

    # Starting afresh over those checkpoints is refused; resuming continues from the last complete one.
    assert main([*args, "--max-steps", "500"]) == 1
    assert "resume it" in capsys.readouterr().err
    saved = max(int(p.parent.name.split("-")[1]) for p in out.glob("checkpoint-*/trainer_state.json"))
    assert main([*args, "--max-steps", str(saved + 2), "--resume"]) == 0
    resumed = next(r for r in _runs() if r.info.run_id != killed.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["whisper_registry.resumed_from_run"] == killed.info.run_id
    assert resumed.data.params["resumed_from_checkpoint"].endswith(f"checkpoint-{saved}")
    steps = [m.step for m in MlflowClient().get_metric_history(resumed.info.run_id, "train_loss")]
    assert steps == [saved + 1, saved + 2]


# ---------------------------------------------------------------------------------- bad input


def _long_clip(tmp_path, zh_clips) -> dict:
    samples = np.concatenate([c.samples() for c in zh_clips] * 5)  # ~41 s
    audio.write_wav(tmp_path / "long.wav", samples)
    return {"audio": str(tmp_path / "long.wav"), "text": "很长", "language": "zh"}


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("empty", DatasetError, "has no rows"),
        ("no_text", FinetuneDataError, r"jishu\.wav: no reference text"),
        ("unknown_language", LanguageError, "Unknown language 'xx'"),
        ("mismatched_language", FinetuneDataError, r"nihao_shijie\.wav: language 'en' does not match .* 'zh'"),
        ("target_module", FinetuneError, r"Target module\(s\) qkv are not in the model.* q_proj"),
        ("too_long", FinetuneDataError, r"long\.wav: audio is 4\d\.\d s, longer than Whisper's 30 s"),
    ],
)
def test_bad_input_is_one_error_naming_the_fix_before_any_run(mlflow_store, tiny_whisper_hf, zh_clips, tmp_path,
                                                             capsys, case, error, message):
    rows = clip_rows(zh_clips)
    options = {"language": "zh", "max_steps": 1}
    if case == "empty":
        rows = []
    elif case == "no_text":
        rows[0]["text"] = " "
    elif case == "unknown_language":
        options["language"] = "xx"
    elif case == "mismatched_language":
        rows[1]["language"] = "en"
    elif case == "target_module":
        options["target_modules"] = "q_proj,qkv"
    elif case == "too_long":
        rows.append(_long_clip(tmp_path, zh_clips))
    manifest = write_manifest(tmp_path / "bad.jsonl", rows)
    with pytest.raises(error, match=message):
        finetune(tiny_whisper_hf, manifest, tmp_path / "out", options=options)

    argv = ["finetune", "--base", str(tiny_whisper_hf), "--dataset", str(manifest), "--output-dir", str(tmp_path / "out"),
            "--language", options["language"], "--max-steps", "1", "--target-modules", options.get("target_modules", "q_proj")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    messages = [line for line in err.splitlines() if line.startswith("whisper-registry:")]
    assert len(messages) == 1 and messages[0].startswith("whisper-registry: error:"), err
    assert re.search(message, messages[0])
    assert _runs() == []


# ------------------------------------------------------------------------ real weights and speech


@pytest.mark.real_weights
def test_lora_on_real_mandarin_lowers_cer_and_the_int8_version_transcribes_like_the_merged_model(
    mlflow_store, whisper_base_hf, zh_clips, zh_manifest, tmp_path
):
    import ctranslate2
    import mlflow_faster_whisper as mfw
    import torch
    from mlflow_faster_whisper.decoding import DecodingOptions
    from mlflow_faster_whisper.transcription import transcribe
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from whisper_registry.register import register

    # LoRA on the decoder only: the frozen encoder needs no backward pass, which keeps a step
    # affordable on two CPU cores (~5-10 s for three clips).
    decoder = [f"decoder.layers.{i}.{m}" for i in range(6)
               for m in ("self_attn.q_proj", "self_attn.v_proj", "encoder_attn.q_proj", "encoder_attn.v_proj", "fc1", "fc2")]
    result = finetune(whisper_base_hf, zh_manifest, tmp_path / "out", options={
        "language": "zh", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": decoder,
        "max_steps": 4, "learning_rate": 3e-3, "batch_size": 3, "max_new_tokens": 32,
    })
    print(f"CER on the training clips: {result.before['cer']:.4f} -> {result.after['cer']:.4f}")
    assert result.scored_on == "train" and result.before["cer"] > 0.1
    assert result.after["cer"] < result.before["cer"]
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train_cer_after"] == pytest.approx(result.after["cer"])

    registered = register(result.adapter_uri, "whisper-base-zh", ["int8"], base_model=str(whisper_base_hf))
    version_uri = registered.versions[0].model_uri
    assert MlflowClient().get_model_version("whisper-base-zh", "1").tags[tags.SOURCE_RUN] == result.run_id

    # The merged transformers model, greedy, on the model's own features.
    processor = WhisperProcessor.from_pretrained(whisper_base_hf)
    adapter_dir = mlflow.artifacts.download_artifacts(result.adapter_uri, dst_path=str(tmp_path / "adapter"))
    merged = PeftModel.from_pretrained(WhisperForConditionalGeneration.from_pretrained(whisper_base_hf), adapter_dir).merge_and_unload()
    features = processor.feature_extractor([c.samples() for c in zh_clips], sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        tokens = merged.eval().generate(features, language="zh", task="transcribe", num_beams=1, do_sample=False, max_new_tokens=64)
    hf_texts = processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)

    # The registered int8 version: CTranslate2 on identical features, and faster-whisper end to end.
    model = mfw.load_model(version_uri, device="cpu")
    prompt = processor.tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|zh|>", "<|transcribe|>", "<|notimestamps|>"])
    ct2_out = model.model.generate(ctranslate2.StorageView.from_array(features.numpy()), [prompt] * len(zh_clips),
                                   beam_size=1, max_length=len(prompt) + 64)
    ct2_texts = [processor.tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True) for r in ct2_out]
    options = DecodingOptions.parse({"language": "zh", "beam_size": 1, "temperature": 0.0, "without_timestamps": True})
    fw_texts = [transcribe(model, clip.samples(), options).text for clip in zh_clips]

    normalize = lambda texts: [metrics.score_utterance(t, t, "zh").reference for t in texts]  # noqa: E731
    assert normalize(ct2_texts) == normalize(hf_texts)  # identical features: identical greedy text
    # faster-whisper pads the log-mel with zeros where transformers pads the waveform (STACK.md), so
    # its own features differ slightly: measured, one character of 30 on the pangram ("盈盈" for "盈昃").
    references = [c.text for c in zh_clips]
    fw_cer, hf_cer = metrics.score(references, fw_texts, "zh")["cer"], metrics.score(references, hf_texts, "zh")["cer"]
    print(f"CER merged transformers {hf_cer:.4f}, registered int8 via faster-whisper {fw_cer:.4f}")
    assert fw_cer <= hf_cer + 0.05 and fw_cer < result.before["cer"]
