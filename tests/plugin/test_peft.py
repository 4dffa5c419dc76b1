"""A LoRA adapter trained a few steps on the tiny Whisper: merged, converted, and decoded the same
as transformers decodes the merged model (greedy, identical features)."""

import ctranslate2
import numpy as np
import pytest
import torch
import yaml

import mlflow_faster_whisper as mfw
from mlflow_faster_whisper.errors import InvalidSourceError

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def lora_adapter(tiny_whisper_hf, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperForConditionalGeneration

    torch.manual_seed(0)
    base = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_hf)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "fc1"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    features, labels = torch.randn(2, 80, 3000), torch.randint(0, 50000, (2, 6))
    for _ in range(5):
        model(input_features=features, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    target = tmp_path_factory.mktemp("lora") / "adapter"
    model.save_pretrained(target)
    return target


def _features(tiny_whisper_hf):
    from transformers import WhisperFeatureExtractor

    audio = np.random.RandomState(0).randn(16000 * 3).astype(np.float32) * 0.1
    extractor = WhisperFeatureExtractor.from_pretrained(tiny_whisper_hf)
    return extractor(audio, sampling_rate=16000, return_tensors="pt").input_features


def _hf_greedy(model, features):
    with torch.no_grad():
        out = model.eval().generate(
            features, language="en", task="transcribe", do_sample=False, num_beams=1,
            max_new_tokens=NEW_TOKENS, return_timestamps=False,
        )
    return out[0].tolist()


def test_merged_adapter_decodes_like_transformers(lora_adapter, tiny_whisper_hf, tmp_path):
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration, WhisperTokenizer

    mfw.save_model(str(lora_adapter), tmp_path / "m", base_model=str(tiny_whisper_hf), quantization="float32")
    flavor = yaml.safe_load((tmp_path / "m" / "MLmodel").read_text())["flavors"]["faster_whisper"]
    assert flavor["source"]["kind"] == "peft"
    assert flavor["source"]["adapter"] == str(lora_adapter)
    assert flavor["source"]["base_model"] == str(tiny_whisper_hf)

    features = _features(tiny_whisper_hf)
    base = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_hf)
    merged = PeftModel.from_pretrained(base, lora_adapter).merge_and_unload()
    expected = _hf_greedy(merged, features)
    unmerged = _hf_greedy(WhisperForConditionalGeneration.from_pretrained(tiny_whisper_hf), features)
    assert expected != unmerged, "the trained adapter must change the model's output"

    tokenizer = WhisperTokenizer.from_pretrained(tiny_whisper_hf)
    prompt = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"])
    whisper = ctranslate2.models.Whisper(str(tmp_path / "m" / "model"), device="cpu", compute_type="float32")
    result = whisper.generate(
        ctranslate2.StorageView.from_array(features.numpy()), [prompt], beam_size=1, max_length=len(prompt) + NEW_TOKENS
    )
    tokens = result[0].sequences_ids[0]
    assert len(tokens) >= 6
    assert tokens == expected[: len(tokens)]


def test_in_memory_peft_model_with_processor(lora_adapter, tiny_whisper_hf, tiny_whisper_objects, tmp_path):
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    peft_model = PeftModel.from_pretrained(WhisperForConditionalGeneration.from_pretrained(tiny_whisper_hf), lora_adapter)
    before = {name: p.detach().clone() for name, p in peft_model.named_parameters()}
    _, processor = tiny_whisper_objects
    mfw.save_model(peft_model, tmp_path / "m", processor=processor, quantization="int8")
    assert (tmp_path / "m" / "model" / "model.bin").is_file()
    # The caller's model is left as it was: its LoRA layers, its base weights unmerged.
    after = dict(peft_model.named_parameters())
    assert sorted(after) == sorted(before) and any("lora_A" in name for name in after)
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_adapter_on_a_base_of_other_shape_is_refused(lora_adapter, tiny_variant, tmp_path):
    other_base = tiny_variant("wider", d_model=96, encoder_ffn_dim=384, decoder_ffn_dim=384)
    with pytest.raises(InvalidSourceError, match="does not fit the base model .*wider.*Pass base_model="):
        mfw.save_model(str(lora_adapter), tmp_path / "m", base_model=str(other_base))
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("quantization", ["int8", "float16"])
def test_an_adapter_merged_in_memory_writes_what_converting_the_saved_merge_writes(
        lora_adapter, tiny_whisper_hf, tmp_path, quantization):
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    mfw.save_model(str(lora_adapter), tmp_path / "ours", base_model=str(tiny_whisper_hf), quantization=quantization)
    saved = tmp_path / "merged"
    base = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_hf)
    PeftModel.from_pretrained(base, lora_adapter).merge_and_unload().save_pretrained(saved)
    (saved / "tokenizer.json").write_bytes((tiny_whisper_hf / "tokenizer.json").read_bytes())
    ctranslate2.converters.TransformersConverter(str(saved), load_as_float16=quantization == "float16").convert(
        str(tmp_path / "theirs"), quantization=quantization)
    assert (tmp_path / "ours" / "model" / "model.bin").read_bytes() == (tmp_path / "theirs" / "model.bin").read_bytes()
