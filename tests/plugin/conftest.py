"""Tiny Whisper variants built in-process for the flavor's mechanics tests."""

import shutil
from pathlib import Path

import pytest


def _save_variant(tiny_dir: Path, target: Path, *, keep_generation_config: bool = True, **config_changes) -> Path:
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

    config = WhisperConfig.from_pretrained(tiny_dir)
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(1)
    model = WhisperForConditionalGeneration(config)
    if keep_generation_config:
        model.generation_config = GenerationConfig.from_pretrained(tiny_dir)
    model.save_pretrained(target)
    processor = WhisperProcessor.from_pretrained(tiny_dir)
    if config.num_mel_bins != processor.feature_extractor.feature_size:
        from transformers import WhisperFeatureExtractor

        processor.feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    processor.save_pretrained(target)
    processor.feature_extractor.save_pretrained(target)
    shutil.copyfile(tiny_dir / "tokenizer.json", target / "tokenizer.json")
    return target


@pytest.fixture
def tiny_variant(tiny_whisper_hf, tmp_path):
    """Factory: a tiny Whisper checkpoint with config changes (e.g. num_mel_bins=128)."""

    def make(name: str, **changes) -> Path:
        return _save_variant(Path(tiny_whisper_hf), tmp_path / name, **changes)

    return make


@pytest.fixture(scope="session")
def tiny_whisper_objects(tiny_whisper_hf):
    """(WhisperForConditionalGeneration, WhisperProcessor) in memory."""
    from devkit.tiny import tiny_whisper_objects

    return tiny_whisper_objects()


@pytest.fixture(scope="session")
def non_whisper_checkpoint():
    from devkit.tiny import non_whisper_checkpoint

    return non_whisper_checkpoint()


@pytest.fixture(scope="session")
def wav_bytes() -> bytes:
    """One second of a 440 Hz tone as a 16-bit mono wav file."""
    import numpy as np

    from devkit.audio import pcm16_wav_bytes

    samples = (0.1 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000) * 32767).astype(np.int16)
    return pcm16_wav_bytes(samples)
