"""Dataset rows -> Whisper training examples: log-mel features, prefixed labels, padded batches.

Rows come from the same reader as evaluation (``whisper_registry.datasets``: a ``.jsonl``/``.csv``
manifest or a ``save_to_disk`` directory). Preprocessing is Whisper's own:

- features: the checkpoint's ``WhisperFeatureExtractor`` (the waveform padded to 30 s, as in
  pre-training), computed lazily per example so a large dataset is never held in memory as mels;
- labels: ``<|startoftranscript|><|lang|><|task|><|notimestamps|> text <|endoftext|>``, the same
  prefix ``generate(language=..., task=...)`` forces at inference;
- batches: labels padded with -100 so padding never counts in the loss.

Every row is checked before training starts (text, language, length of audio and labels), and
problems are reported by row.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from mlflow_faster_whisper.constants import SAMPLE_RATE
from mlflow_faster_whisper.decoding import whisper_languages
from whisper_registry.datasets import EvaluationDataset, Row, load_dataset
from whisper_registry.errors import FinetuneDataError, LanguageError

# Whisper's encoder sees exactly one 30 s window; longer audio would be silently truncated.
MAX_AUDIO_SECONDS = 30.0
TASKS = ("transcribe", "translate")
IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy skips


@dataclass(frozen=True)
class Example:
    """One training utterance: where it came from, its language and its label token ids."""

    row: Row
    language: Optional[str]
    labels: list[int]

    @property
    def where(self) -> str:
        return self.row.where


@dataclass(frozen=True)
class PreparedData:
    """The checked examples of one dataset, with its identity for the run's parameters."""

    source: str
    digest: str
    examples: list[Example]

    @property
    def languages(self) -> list[Optional[str]]:
        return [e.language for e in self.examples]


class WhisperTrainingSet:
    """A map-style dataset of ``{"input_features", "labels"}`` for ``Seq2SeqTrainer``."""

    def __init__(self, examples: list[Example], feature_extractor: Any):
        self.examples = examples
        self.feature_extractor = feature_extractor

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        return {"input_features": log_mel(self.feature_extractor, example.row.samples()), "labels": example.labels}


def log_mel(feature_extractor: Any, samples: np.ndarray) -> np.ndarray:
    """The model's own log-mel features of 16 kHz samples: ``(n_mels, 3000)`` float32."""
    features = feature_extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    return features[0].astype(np.float32)


class WhisperCollator:
    """Stacks features and pads labels with -100.

    The model prepends ``decoder_start_token_id`` itself when it shifts labels right, so a
    leading ``<|startoftranscript|>`` is cut from the labels (it would otherwise appear twice).
    """

    def __init__(self, decoder_start_token_id: int):
        self.decoder_start_token_id = decoder_start_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        input_features = torch.from_numpy(np.stack([f["input_features"] for f in features]))
        labels = [list(f["labels"]) for f in features]
        if all(seq and seq[0] == self.decoder_start_token_id for seq in labels):
            labels = [seq[1:] for seq in labels]
        width = max(len(seq) for seq in labels)
        padded = torch.full((len(labels), width), IGNORE_INDEX, dtype=torch.long)
        for i, seq in enumerate(labels):
            padded[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return {"input_features": input_features, "labels": padded}


def prepare(
    path: str | Path,
    tokenizer: Any,
    generation_config: Any,
    *,
    language: Optional[str],
    task: str,
    max_label_tokens: int,
    split: Optional[str] = None,
) -> PreparedData:
    """Read a dataset and turn every row into a checked training example.

    Args:
        path: a ``.jsonl``/``.csv`` manifest or a ``save_to_disk`` directory.
        tokenizer: the checkpoint's Whisper tokenizer.
        generation_config: the checkpoint's generation config (``lang_to_id``, ``is_multilingual``).
        language: the language of rows that name none; a row naming another language is refused.
        task: "transcribe" or "translate".
        max_label_tokens: the decoder's length limit (``max_target_positions``).
        split: the split of a ``DatasetDict``.

    Raises:
        FinetuneDataError: the dataset is empty, or rows lack text, have unusable audio, audio
            over 30 s, a language other than ``language``, or labels longer than the decoder allows.
        LanguageError: a language or task the model cannot be trained for.
    """
    check_task(task)
    language = check_language(language, generation_config)
    data = _load(path, split)
    problems: list[str] = []
    examples = []
    for row in data.rows:
        row_language, problem = _row_language(row, language, generation_config)
        if problem is None:
            problem = _audio_problem(row)
        if problem is None:
            ids = label_ids(tokenizer, generation_config, row.reference, row_language, task)
            if len(ids) > max_label_tokens:
                problem = f"its text is {len(ids)} tokens, more than the decoder's {max_label_tokens}: split the utterance"
            else:
                examples.append(Example(row, row_language, ids))
        if problem is not None:
            problems.append(f"{row.where}: {problem}")
    if problems:
        raise FinetuneDataError(_listing(len(problems), problems, data.source))
    return PreparedData(data.source, data.digest, examples)


def label_ids(tokenizer: Any, generation_config: Any, text: str, language: Optional[str], task: str) -> list[int]:
    """``<|startoftranscript|>[<|lang|><|task|>]<|notimestamps|>`` + text + ``<|endoftext|>``."""
    prefix = [tokenizer.convert_tokens_to_ids("<|startoftranscript|>")]
    if getattr(generation_config, "is_multilingual", True):
        prefix += [language_token_id(generation_config, language), task_token_id(generation_config, task)]
    prefix.append(tokenizer.convert_tokens_to_ids("<|notimestamps|>"))
    text_ids = tokenizer(text, add_special_tokens=False).input_ids
    return prefix + list(text_ids) + [tokenizer.convert_tokens_to_ids("<|endoftext|>")]


def check_language(language: Optional[str], generation_config: Any) -> Optional[str]:
    """The language code, checked against Whisper's languages and this model's tokens.

    Raises:
        LanguageError: an unknown code, a code without a token in this model, or any language
            but English for an English-only model.
    """
    if language is None:
        return None
    code = str(language).strip().lower()
    if code not in whisper_languages():
        raise LanguageError(f"Unknown language {language!r}: use a Whisper language code such as 'en' or 'zh'.")
    if not getattr(generation_config, "is_multilingual", True):
        if code != "en":
            raise LanguageError(
                f"This checkpoint is English-only and has no <|{code}|> token: fine-tune a multilingual "
                "Whisper checkpoint for other languages, or use language 'en'."
            )
        return code
    language_token_id(generation_config, code)
    return code


def language_token_id(generation_config: Any, language: Optional[str]) -> int:
    lang_to_id = getattr(generation_config, "lang_to_id", None) or {}
    if language is None:
        raise LanguageError("A multilingual Whisper model needs a language for its label prefix: give one.")
    token = f"<|{language}|>"
    if token not in lang_to_id:
        known = ", ".join(sorted(t.strip("<|>") for t in lang_to_id)[:12])
        raise LanguageError(
            f"The model's tokenizer has no {token} token, so it cannot be trained for {language!r}: use one of "
            f"its languages ({known}, ...), or a checkpoint whose generation_config.json has lang_to_id."
        )
    return int(lang_to_id[token])


def task_token_id(generation_config: Any, task: str) -> int:
    task_to_id = getattr(generation_config, "task_to_id", None) or {}
    if task not in task_to_id:
        raise LanguageError(
            f"The model's generation config has no {task!r} task token: use a checkpoint whose "
            "generation_config.json has task_to_id (transcribe, translate)."
        )
    return int(task_to_id[task])


def check_task(task: str) -> None:
    if task not in TASKS:
        raise LanguageError(f"Unknown task {task!r}: use 'transcribe' or 'translate'.")


def transcribe_greedy(
    model, processor, data: PreparedData, *, task: str, batch_size: int, max_new_tokens: int, device: str = "cpu", precision: str = "fp32"
) -> list[str]:
    """Greedy transcripts of the examples' audio with their language/task prefix forced, in order.

    This is how fine-tuning scores a model before and after training (with ``metrics.score``);
    on a GPU it runs under bf16/fp16 autocast (``precision``).
    """
    import torch

    model.eval()
    model.to(device)
    multilingual = getattr(model.generation_config, "is_multilingual", True)
    texts: list[str] = [""] * len(data.examples)
    by_language: dict[Optional[str], list[int]] = {}
    for index, example in enumerate(data.examples):
        by_language.setdefault(example.language, []).append(index)
    for language, indices in by_language.items():
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            features = np.stack([log_mel(processor.feature_extractor, data.examples[i].row.samples()) for i in batch])
            prefix = {"language": language, "task": task} if multilingual else {}
            with torch.no_grad(), _autocast(device, precision):
                out = model.generate(
                    input_features=torch.from_numpy(features).to(device),
                    num_beams=1,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    use_cache=True,
                    **prefix,
                )
            for i, text in zip(batch, processor.tokenizer.batch_decode(out, skip_special_tokens=True), strict=True):
                texts[i] = text.strip()
    return texts


def _autocast(device: str, precision: str):
    import torch

    if device != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _load(path: str | Path, split: Optional[str]) -> EvaluationDataset:
    data = load_dataset(path, split=split)  # raises DatasetError for a missing/empty/unknown dataset
    if data.bad_rows:
        problems = [f"{bad.where}: {bad.reason}" for bad in data.bad_rows]
        raise FinetuneDataError(_listing(len(problems), problems, data.source))
    if not data.rows:
        raise FinetuneDataError(f"The dataset {data.source} has no rows: add at least one (audio, text) row.")
    return data


def _row_language(row: Row, language: Optional[str], generation_config: Any) -> tuple[Optional[str], Optional[str]]:
    """The row's language for its label prefix, or why it has none usable."""
    if row.language and language and row.language != language:
        return None, (
            f"language {row.language!r} does not match the fine-tune language {language!r}: correct or "
            "remove the row, or give no fine-tune language so that each row's own is used"
        )
    chosen = row.language or language
    if chosen is None:
        if getattr(generation_config, "is_multilingual", True):
            return None, "no language: give the row a language, or give a fine-tune language for all rows"
        return None, None
    try:
        return check_language(chosen, generation_config), None
    except LanguageError as exc:
        return None, str(exc).rstrip(".")


def _audio_problem(row: Row) -> Optional[str]:
    seconds = len(row.samples()) / SAMPLE_RATE
    if seconds > MAX_AUDIO_SECONDS:
        return (
            f"audio is {seconds:.1f} s, longer than Whisper's {MAX_AUDIO_SECONDS:.0f} s window: "
            "cut it into utterances of at most 30 s with their own texts"
        )
    return None


def _listing(count: int, problems: list[str], source: str) -> str:
    shown = "; ".join(problems[:10])
    more = f" (and {count - 10} more)" if count > 10 else ""
    return f"{count} row(s) of {source} cannot be used for fine-tuning: {shown}{more}. Fix or remove these rows."
