"""Every source kind and quantization on the tiny random Whisper: mechanics, not accuracy."""

import contextlib
import json
import tempfile
from pathlib import Path

import ctranslate2
import mlflow
import numpy as np
import pytest
import yaml

import mlflow_faster_whisper as mfw
from mlflow_faster_whisper import ct2
from mlflow_faster_whisper.errors import (
    ChecksumError,
    ConversionError,
    InvalidSourceError,
    UnsupportedQuantizationError,
)

GREEDY = {"beam_size": 1, "temperature": 0.0, "max_new_tokens": 8}
# CTranslate2 writes int8 and int8_float32 identically.
STORED_AS = {"int8": "int8_float32", "none": "float32"}


def _flavor(model_dir: Path) -> dict:
    return yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["faster_whisper"]


@pytest.mark.parametrize("quantization", mfw.QUANTIZATIONS)
def test_every_quantization_converts_and_records_itself(tiny_whisper_hf, tmp_path, quantization):
    target = tmp_path / "model"
    mfw.save_model(str(tiny_whisper_hf), target, quantization=quantization, decoding=GREEDY)

    flavor = _flavor(target)
    data = target / flavor["data"]
    assert flavor["quantization"] == quantization
    assert ct2.stored_quantization(data) == STORED_AS.get(quantization, quantization)
    assert {"model.bin", "config.json", "tokenizer.json", "preprocessor_config.json"} <= set(flavor["checksums"])
    assert flavor["size_bytes"] == sum(p.stat().st_size for p in data.iterdir())
    assert flavor["n_mels"] == 80 and flavor["multilingual"] is True
    assert flavor["decoding"] == {"beam_size": 1, "temperature": [0.0], "max_new_tokens": 8}
    assert flavor["source"]["kind"] == "transformers"
    assert json.loads((data / "config.json").read_text())["lang_ids"], "language ids must survive conversion"


def test_int8_is_about_a_quarter_of_float32(tiny_whisper_hf, tmp_path):
    sizes = {}
    for quantization in ("int8", "float32"):
        mfw.save_model(str(tiny_whisper_hf), tmp_path / quantization, quantization=quantization)
        sizes[quantization] = (tmp_path / quantization / "model" / "model.bin").stat().st_size
    assert sizes["int8"] < 0.4 * sizes["float32"]


def test_tokenizer_and_vocabulary_are_written_compact_with_the_same_content(tiny_whisper_hf, tmp_path):
    mfw.save_model(str(tiny_whisper_hf), tmp_path / "m", quantization="int8")
    data = tmp_path / "m" / "model"
    tokenizer = (data / "tokenizer.json").read_text(encoding="utf-8")
    assert "\n" not in tokenizer and "\n" not in (data / "vocabulary.json").read_text(encoding="utf-8")
    assert json.loads(tokenizer)["model"]["vocab"] == json.loads((tiny_whisper_hf / "tokenizer.json").read_text())["model"]["vocab"]
    by_id = [t for t, _ in sorted(json.loads(tokenizer)["model"]["vocab"].items(), key=lambda kv: kv[1])]
    assert ct2.vocabulary(data)[: len(by_id)] == by_id


def test_loaded_model_transcribes_and_pyfunc_reports_bad_rows(tiny_whisper_hf, tmp_path, wav_bytes):
    mfw.save_model(str(tiny_whisper_hf), tmp_path / "m", quantization="int8", decoding=GREEDY)
    model = mfw.load_model(str(tmp_path / "m"), device="cpu")
    segments, info = model.transcribe(np.zeros(16000, dtype=np.float32), **GREEDY)
    list(segments)
    assert info.duration == pytest.approx(1.0)

    pyfunc = mlflow.pyfunc.load_model(str(tmp_path / "m"))
    rows = pyfunc.predict({"audio": [wav_bytes, b"not audio at all", b""]}, params={"language": "en"})
    assert rows[0]["error"] == "" and rows[0]["language"] == "en" and rows[0]["duration"] == pytest.approx(1.0)
    assert "Could not decode the audio" in rows[1]["error"]
    assert "empty" in rows[2]["error"]


def test_in_memory_model_and_processor(tiny_whisper_objects, tmp_path):
    model, processor = tiny_whisper_objects
    mfw.save_model(model, tmp_path / "m", processor=processor, quantization="float16")
    flavor = _flavor(tmp_path / "m")
    assert flavor["source"]["kind"] == "in_memory"
    assert ct2.stored_quantization(tmp_path / "m" / "model") == "float16"


def test_in_memory_model_without_processor_is_refused(tiny_whisper_objects, tmp_path):
    model, _ = tiny_whisper_objects
    with pytest.raises(InvalidSourceError, match="processor=WhisperProcessor"):
        mfw.save_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_ctranslate2_dir_is_logged_as_is(tiny_whisper_hf, tmp_path):
    mfw.save_model(str(tiny_whisper_hf), tmp_path / "first", quantization="int8_float16")
    ct2_dir = tmp_path / "first" / "model"
    (ct2_dir / "preprocessor_config.json").unlink()  # common in the wild: written back as 80-mel
    mfw.save_model(str(ct2_dir), tmp_path / "again")
    flavor = _flavor(tmp_path / "again")
    assert flavor["source"]["kind"] == "ctranslate2"
    assert flavor["quantization"] == "int8_float16"
    assert flavor["n_mels"] == 80
    assert (tmp_path / "again" / "model" / "model.bin").read_bytes() == (ct2_dir / "model.bin").read_bytes()
    with pytest.raises(UnsupportedQuantizationError, match="logged as is"):
        mfw.save_model(str(ct2_dir), tmp_path / "requant", quantization="float32")


def test_ctranslate2_dir_without_tokenizer_is_refused(tiny_whisper_hf, tmp_path):
    mfw.save_model(str(tiny_whisper_hf), tmp_path / "first", quantization="int8")
    ct2_dir = tmp_path / "first" / "model"
    (ct2_dir / "tokenizer.json").unlink()
    with pytest.raises(InvalidSourceError, match="lacks tokenizer.json"):
        mfw.save_model(str(ct2_dir), tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_unknown_quantization_is_refused_before_anything_is_written(tiny_whisper_hf, tmp_path):
    with pytest.raises(UnsupportedQuantizationError, match="Use one of: int8, int8_float32"):
        mfw.save_model(str(tiny_whisper_hf), tmp_path / "m", quantization="int4")
    assert not (tmp_path / "m").exists()


def test_non_whisper_checkpoint_is_refused(non_whisper_checkpoint, tmp_path):
    with pytest.raises(InvalidSourceError, match="not Whisper"):
        mfw.save_model(str(non_whisper_checkpoint), tmp_path / "m")


def test_missing_path_and_offline_hub_id_are_clear(tmp_path):
    with pytest.raises(InvalidSourceError, match="is not a directory"):
        mfw.save_model(str(tmp_path / "nowhere" / "model"), tmp_path / "m")
    # A hub id goes through transformers' real loading code; offline, it must fail clearly.
    with pytest.raises(InvalidSourceError, match="Could not load 'openai/whisper-tiny'"):
        mfw.save_model("openai/whisper-tiny", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_128_mel_checkpoint_keeps_its_feature_extractor(tiny_variant, tmp_path):
    source = tiny_variant("mel128", num_mel_bins=128)
    mfw.save_model(str(source), tmp_path / "m", quantization="int8")
    assert _flavor(tmp_path / "m")["n_mels"] == 128
    model = mfw.load_model(str(tmp_path / "m"), device="cpu")
    assert model.feature_extractor.mel_filters.shape[0] == 128
    segments, _ = model.transcribe(np.zeros(16000, dtype=np.float32), language="en", **GREEDY)
    list(segments)  # a 128-mel model fed 80-mel features would fail here
    assert ctranslate2.models.Whisper(str(tmp_path / "m" / "model")).n_mels == 128


def test_mel_mismatch_between_model_and_feature_extractor_is_refused(tiny_variant, tmp_path):
    source = tiny_variant("mel128", num_mel_bins=128)
    # An 80-mel extractor beside a 128-mel model converts fine, then transcribes garbage.
    # transformers 5 reads the extractor from processor_config.json, older versions from
    # preprocessor_config.json: make both say 80.
    extractor = source / "preprocessor_config.json"
    extractor.write_text(json.dumps({**json.loads(extractor.read_text()), "feature_size": 80}))
    processor = source / "processor_config.json"
    config = json.loads(processor.read_text())
    config["feature_extractor"]["feature_size"] = 80
    processor.write_text(json.dumps(config))
    with pytest.raises(InvalidSourceError, match="expects 128 mel bins but its feature extractor makes 80"):
        mfw.save_model(str(source), tmp_path / "m")


def test_failed_conversion_leaves_no_version_no_temp_dirs(tiny_variant, mlflow_store, tmp_path, monkeypatch):
    # A multilingual checkpoint whose generation config lost lang_to_id converts to a model whose
    # language detection crashes: the conversion must fail after CTranslate2 ran.
    source = tiny_variant("no-lang-ids", keep_generation_config=False)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    with pytest.raises(ConversionError, match="lang_ids is empty"):
        mfw.log_model(str(source), name="model", registered_model_name="broken")

    client = mlflow.MlflowClient()
    assert client.search_model_versions("name='broken'") == []
    logged = mlflow.search_logged_models(output_format="list")
    assert [m.status.name for m in logged] == ["FAILED"]
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("quantization", ["int8", "int8_float16", "float32", "float16", "bfloat16", "int8_bfloat16"])
def test_the_low_memory_load_writes_what_ctranslate2s_own_converter_writes(tiny_whisper_hf, tmp_path, quantization):
    ours = tmp_path / "ours"
    mfw.save_model(str(tiny_whisper_hf), ours, quantization=quantization)
    theirs = tmp_path / "theirs"
    as_its_command_line = quantization in ("float16", "int8_float16")  # not the bfloat16 types
    ctranslate2.converters.TransformersConverter(str(tiny_whisper_hf), load_as_float16=as_its_command_line).convert(
        str(theirs), quantization=quantization)
    assert (ours / "model" / "model.bin").read_bytes() == (theirs / "model.bin").read_bytes()


@pytest.mark.parametrize("quantization", ["int8", "int8_float16"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_int8_in_blocks_of_rows_is_ctranslate2s_int8(monkeypatch, quantization, dtype):
    import torch
    from ctranslate2.specs.common_spec import LinearSpec

    from mlflow_faster_whisper import lowmem

    monkeypatch.setattr(lowmem, "_BLOCK_ELEMENTS", 64)  # 5 rows of 12 per block: 8 blocks, the last short
    torch.manual_seed(0)
    weights = [torch.randn(37, 12).to(getattr(torch, dtype)), torch.randn(37, 3, 4).to(getattr(torch, dtype))]
    weights[0][3] = 0  # a zero row keeps a finite scale
    weights[0][5] = 1e-30 if dtype == "float32" else 1e-7  # as does a row of tiny values
    for weight in weights:
        bias, specs = torch.randn(weight.shape[0]).to(weight.dtype), []
        for blocks in (False, True):
            spec = LinearSpec()
            spec.weight, spec.bias = weight.clone(), bias.clone()
            spec.validate()  # as CTranslate2's converter does: the tensors become its variables
            with lowmem._one_copy_at_a_time() if blocks else contextlib.nullcontext():
                spec.optimize(quantization)
            specs.append(spec)
        ct2s, ours = specs
        for name in ("weight", "weight_scale", "bias"):
            assert getattr(ours, name).dtype == getattr(ct2s, name).dtype, name
            assert getattr(ours, name).to_bytes() == getattr(ct2s, name).to_bytes(), name


def test_a_sharded_checkpoint_is_read_shard_by_shard(tiny_whisper_objects, tiny_whisper_hf, tmp_path):
    from mlflow_faster_whisper import lowmem

    model, processor = tiny_whisper_objects
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="4MB")
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        if (tiny_whisper_hf / name).is_file():
            (sharded / name).write_bytes((tiny_whisper_hf / name).read_bytes())
    assert len(lowmem.weight_files(str(sharded))) > 1
    mfw.save_model(str(sharded), tmp_path / "from-shards", quantization="int8")
    mfw.save_model(str(tiny_whisper_hf), tmp_path / "from-one-file", quantization="int8")
    assert (tmp_path / "from-shards" / "model" / "model.bin").read_bytes() == \
        (tmp_path / "from-one-file" / "model" / "model.bin").read_bytes()


def test_a_truncated_checkpoint_fails_naming_the_file(tiny_whisper_hf, tmp_path):
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in tiny_whisper_hf.iterdir():
        (cut / f.name).write_bytes(f.read_bytes()[: f.stat().st_size // 2] if f.name == "model.safetensors" else f.read_bytes())
    with pytest.raises(ConversionError, match=r"model\.safetensors ends inside"):
        mfw.save_model(str(cut), tmp_path / "m", quantization="int8")
    assert not (tmp_path / "m").exists()


def test_a_checkpoint_too_big_for_the_memory_here_is_refused_before_loading(mlflow_store, tiny_whisper_hf, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    for f in tiny_whisper_hf.iterdir():
        if f.name != "model.safetensors":
            (big / f.name).symlink_to(f)
    with open(big / "model.safetensors", "wb") as weights:
        weights.truncate(1 << 40)  # 1 TiB of weights, as a sparse file: no disk used, never read

    with pytest.raises(ConversionError, match=r"needs about 112[67]\.\d GiB of memory \(1024\.0 GiB of weights\), but "
                                              r"\d+\.\d GiB is available here\. Free memory, or convert on a machine"):
        mfw.log_model(str(big), name="model", registered_model_name="big")
    assert mlflow.MlflowClient().search_model_versions("name='big'") == []


def test_tampered_or_partial_artifact_is_refused(tiny_whisper_hf, tmp_path):
    target = tmp_path / "m"
    mfw.save_model(str(tiny_whisper_hf), target, quantization="int8")
    config = target / "model" / "config.json"
    original = config.read_bytes()
    config.write_bytes(original.replace(b"lang_ids", b"lang_idz"))
    with pytest.raises(ChecksumError, match="config.json .* does not match the sha256"):
        mfw.load_model(str(target))
    config.write_bytes(original)
    (target / "model" / "vocabulary.json").unlink()
    with pytest.raises(ChecksumError, match="vocabulary.json is missing"):
        mfw.load_model(str(target))


def test_log_model_registers_with_lineage_of_the_active_run(tiny_whisper_hf, mlflow_store):
    with mlflow.start_run() as run:
        info = mfw.log_model(str(tiny_whisper_hf), name="model", registered_model_name="tiny", quantization="int8")
    assert info.registered_model_version == 1
    flavor = mfw.flavor_config("models:/tiny/1")
    assert flavor["source"]["run_id"] == run.info.run_id
    assert flavor["quantization"] == "int8"
    requirements = Path(mlflow.pyfunc.get_model_dependencies(info.model_uri)).read_text()
    assert "ctranslate2==" in requirements and "torch" not in requirements


def test_pyfunc_model_config_sets_how_the_model_loads(tiny_whisper_hf, tmp_path):
    mfw.save_model(str(tiny_whisper_hf), tmp_path / "m", quantization="int8")
    pyfunc = mlflow.pyfunc.load_model(str(tmp_path / "m"), model_config={"compute_type": "float32", "cpu_threads": 1})
    assert pyfunc.get_raw_model().model.compute_type == "float32"
    assert mlflow.pyfunc.load_model(str(tmp_path / "m")).get_raw_model().model.compute_type == "int8_float32"
