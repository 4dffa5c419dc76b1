"""LoRA fine-tuning of a Whisper checkpoint, tracked in one MLflow run.

``finetune`` trains a PEFT LoRA adapter with transformers' ``Seq2SeqTrainer`` and records in its
MLflow run: the parameters, training and eval loss per step, WER/CER before and after on the
evaluation set (the training set when none is given) with the registry's own metric code, and
the adapter with the processor files as the run artifact ``adapter/``. The run id is all that
registering needs::

    from whisper_registry.finetune import finetune
    from whisper_registry.register import register
    result = finetune("./whisper-base", "train.jsonl", "./ft", options={"language": "zh", "max_steps": 200})
    register(result.adapter_uri, "whisper-zh", ["int8"], base_model="./whisper-base")

The trainer checkpoints to ``output_dir`` every ``save_steps``; ``resume=True`` continues from the
last checkpoint in a new run linked to the interrupted one. SIGINT/SIGTERM end the run as KILLED
and raise ``TrainingInterrupted``. A GPU is used when present (bf16, else fp16 autocast); on CPU
training runs in float32.
"""

from __future__ import annotations

import functools
import logging
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import mlflow

from mlflow_faster_whisper import sources
from whisper_registry import metrics, tags, tracking, training
from whisper_registry.errors import FinetuneError, TrainingInterrupted
from whisper_registry.finetune_data import PreparedData, check_language, prepare, transcribe_greedy
from whisper_registry.training import DEVICES as DEVICES  # re-exported: the CLI's --device choices
from whisper_registry.training import FinetuneOptions

_logger = logging.getLogger(__name__)

ADAPTER_ARTIFACT = "adapter"
PREDICTIONS_TABLE = "finetune/predictions.json"


@dataclass
class FinetuneResult:
    """The run, the adapter's URI and the error rates before and after training."""

    run_id: str
    output_dir: Path
    global_step: int
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    scored_on: str = "eval"  # "eval", or "train" when no evaluation set was given
    headline: str = "cer"

    @property
    def adapter_uri(self) -> str:
        return f"runs:/{self.run_id}/{ADAPTER_ARTIFACT}"


def finetune(
    base: str | Path,
    dataset: str | Path,
    output_dir: str | Path,
    *,
    eval_dataset: str | Path | None = None,
    options: FinetuneOptions | dict[str, Any] | None = None,
    split: Optional[str] = None,
    eval_split: Optional[str] = None,
    resume: bool = False,
    progress: bool = False,
) -> FinetuneResult:
    """Train a LoRA adapter on ``dataset`` and log everything to a new MLflow run.

    Args:
        base: a transformers Whisper checkpoint directory or hub id.
        dataset: the training set, a manifest or ``save_to_disk`` directory (as for ``evaluate``).
        output_dir: where checkpoints and the final ``adapter/`` are written.
        eval_dataset: scored before and after training and used for the eval loss; default: the
            error rates are measured on the training set and there is no eval loss.
        options: ``FinetuneOptions`` or a dict of its fields.
        split, eval_split: splits of ``DatasetDict`` directories.
        resume: continue from the last checkpoint in ``output_dir``.
        progress: show the trainer's progress bar.

    Returns:
        The run id (``adapter_uri`` is ``runs:/<run_id>/adapter``), the step reached, and the
        metrics before and after.

    Raises:
        FinetuneError: bad options, target modules the model lacks, no checkpoint to resume from,
            or checkpoints of another fine-tune in ``output_dir``.
        FinetuneDataError, LanguageError, DatasetError: unusable data; nothing was logged.
        InvalidSourceError: ``base`` is not a transformers Whisper checkpoint.
        TrainingInterrupted: SIGINT/SIGTERM; the run is KILLED and the checkpoints stay.
    """
    options = FinetuneOptions.parse(options)
    return _finetune(base, dataset, output_dir, eval_dataset, options, split, eval_split, resume, progress)


def _finetune(base, dataset, output_dir, eval_dataset, options: FinetuneOptions, split, eval_split, resume, progress):
    from transformers import GenerationConfig, WhisperProcessor

    output_dir = Path(output_dir).resolve()
    checkpoint = training.checkpoint_to_resume(output_dir, resume)
    base_ref = _base_reference(base)
    processor = _load(WhisperProcessor.from_pretrained, base_ref)
    generation_config = _load(GenerationConfig.from_pretrained, base_ref)
    check_language(options.language, generation_config)
    model = _load_model(base_ref)
    peft_model = _with_lora(model, options)
    max_labels = model.config.max_target_positions
    prepared = functools.partial(
        prepare,
        tokenizer=processor.tokenizer,
        generation_config=generation_config,
        language=options.language,
        task=options.task,
        max_label_tokens=max_labels,
    )
    train = prepared(dataset, split=split)
    held_out = None if eval_dataset is None else prepared(eval_dataset, split=eval_split)
    device, precision = _device(options.device)
    setup = tracking.configure()
    previous_run = training.read_run_record(output_dir) if checkpoint else None
    with training.signals_raise_interrupted():
        run = mlflow.start_run(experiment_id=setup.experiment_id, run_name=f"finetune {Path(base_ref).name}")
        try:
            training.write_run_record(output_dir, run.info.run_id)
            mlflow.set_tags({tags.RUN_KIND: "finetune", **({tags.RUN_RESUMED_FROM: previous_run} if previous_run else {})})
            mlflow.log_params(_params(base_ref, train, held_out, options, device, precision, peft_model, checkpoint))
            scored = held_out or train
            result = FinetuneResult(
                run.info.run_id,
                output_dir,
                0,
                scored_on="eval" if held_out else "train",
                headline=metrics.headline_metric(scored.languages),
            )
            _logger.info("Scoring the base model on %d %s utterances", len(scored.examples), result.scored_on)

            def transcribe() -> list[str]:
                return transcribe_greedy(
                    peft_model,
                    processor,
                    scored,
                    task=options.task,
                    batch_size=options.batch_size,
                    max_new_tokens=options.max_new_tokens,
                    device=device,
                    precision=precision,
                )

            with peft_model.disable_adapter():
                before_texts = transcribe()
            result.before = _log_scores(scored, before_texts, result.scored_on, "before")
            trainer = training.trainer(
                peft_model, processor, train, held_out, output_dir, options, device, precision, run.info.run_id, progress
            )
            _logger.info("Training (%s, %s)%s", device, precision, f", resuming from {checkpoint}" if checkpoint else "")
            trainer.train(resume_from_checkpoint=checkpoint)
            _logger.info("Scoring the fine-tuned model")
            result.global_step = trainer.state.global_step
            after_texts = transcribe()
            result.after = _log_scores(scored, after_texts, result.scored_on, "after")
            mlflow.log_table(_predictions(scored, before_texts, after_texts), PREDICTIONS_TABLE)
            _log_adapter(peft_model, processor, output_dir / ADAPTER_ARTIFACT)
        except training.Interrupt as exc:
            mlflow.set_tag(tags.RUN_INTERRUPTED_BY, signal.Signals(exc.signum).name)
            mlflow.end_run("KILLED")
            raise TrainingInterrupted(exc.signum, training.last_checkpoint(output_dir)) from None
        except BaseException:
            mlflow.end_run("FAILED")
            raise
        mlflow.end_run("FINISHED")
    return result


# ------------------------------------------------------------------------------- model and data


def _base_reference(base: str | Path) -> str:
    source = sources.resolve_source(base)  # refuses a non-Whisper directory with a clear message
    if source.kind not in (sources.TRANSFORMERS, sources.HUB):
        raise FinetuneError(
            f"{base} is a {source.kind} model: fine-tune a transformers Whisper checkpoint "
            "(directory with config.json and weights, or a hub id)."
        )
    # An absolute path, so the adapter's base_model_name_or_path works from any directory.
    return str(Path(source.model).resolve()) if source.kind == sources.TRANSFORMERS else source.model


def _load(loader, name_or_path: str):
    try:
        return loader(name_or_path)
    except OSError as exc:
        raise FinetuneError(f"Could not load {name_or_path!r}: {str(exc).splitlines()[0]}. Pass a local checkpoint directory.") from None


def _load_model(base_ref: str):
    from transformers import WhisperForConditionalGeneration

    return _load(WhisperForConditionalGeneration.from_pretrained, base_ref)


def _with_lora(model, options: FinetuneOptions):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    missing = [t for t in options.target_modules if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        valid = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise FinetuneError(
            f"Target module(s) {', '.join(missing)} are not in the model: use names of its linear layers, "
            f"e.g. {', '.join(valid)} (or a dotted suffix such as decoder.layers.0.fc1)."
        )
    set_seed(options.seed)  # the adapter's initial A matrices
    config = LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=list(options.target_modules),
        bias="none",
    )
    return get_peft_model(model, config)


def _device(requested: str) -> tuple[str, str]:
    """(device, precision): bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU."""
    import torch

    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise FinetuneError("No CUDA device is visible to torch: use device 'auto' or 'cpu', or install a CUDA build of torch.")
    if requested == "cpu" or not cuda:
        return "cpu", "fp32"
    return "cuda", "bf16" if torch.cuda.is_bf16_supported() else "fp16"


# ------------------------------------------------------------------------------------- scoring


def _log_scores(data: PreparedData, texts: list[str], scored_on: str, when: str) -> dict[str, float]:
    references = [e.row.reference for e in data.examples]
    scores = metrics.score(references, texts, data.languages)
    values = {k: float(v) for k, v in scores.items() if isinstance(v, (int, float)) and k != "n_utterances"}
    mlflow.log_metrics({f"{scored_on}_{k}_{when}": v for k, v in values.items()})
    _logger.info("%s %s: %s", scored_on, when, values)
    return values


def _predictions(data: PreparedData, before: list[str], after: list[str]) -> dict[str, list]:
    return {
        "audio": [e.where for e in data.examples],
        "language": [e.language or "" for e in data.examples],
        "reference": [e.row.reference for e in data.examples],
        "before": before,
        "after": after,
    }


def _log_adapter(model, processor, target: Path) -> None:
    """The adapter with the processor files, so ``runs:/<run_id>/adapter`` is a complete source."""
    model.save_pretrained(target)
    processor.save_pretrained(target)
    processor.feature_extractor.save_pretrained(target)  # processor.save_pretrained no longer writes it
    mlflow.log_artifacts(str(target), ADAPTER_ARTIFACT)


def _params(
    base_ref: str,
    train: PreparedData,
    held_out: Optional[PreparedData],
    options: FinetuneOptions,
    device: str,
    precision: str,
    model,
    checkpoint: Optional[str],
) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    values = {k: (",".join(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()}
    return {
        **values,
        "base_model": base_ref,
        "dataset": train.source,
        "dataset_digest": train.digest,
        "n_train": len(train.examples),
        "eval_dataset": held_out.source if held_out else "",
        "eval_dataset_digest": held_out.digest if held_out else "",
        "n_eval": len(held_out.examples) if held_out else 0,
        "device": device,
        "precision": precision,
        "trainable_parameters": trainable,
        "resumed_from_checkpoint": checkpoint or "",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
    }


# ------------------------------------------------------------------------------------------ CLI
