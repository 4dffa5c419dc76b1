"""The training of a fine-tune: its options (``FinetuneOptions``), transformers' trainer with the
run's loss logger, checkpoints in the output directory (which one to resume, which run wrote them),
and SIGINT/SIGTERM turned into ``Interrupt`` so the run can be closed as KILLED."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import mlflow

from whisper_registry.errors import FinetuneError
from whisper_registry.finetune_data import PreparedData, WhisperCollator, WhisperTrainingSet, check_task

RUN_RECORD = "finetune_run.json"  # in output_dir: which run wrote its checkpoints
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class FinetuneOptions:
    """What to train and how. Accepted as this object or a dict of its fields."""

    language: Optional[str] = None
    """Language of the label prefix for rows that name none (rows naming another are refused)."""
    task: str = "transcribe"
    """Task token of the label prefix: transcribe or translate."""
    lora_r: int = 32
    """LoRA rank."""
    lora_alpha: int = 64
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input during training."""
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    """Linear layers that get adapters, by name (as PEFT matches them: a name or a dotted suffix)."""
    max_steps: Optional[int] = None
    """Optimizer steps to train; when set it overrides ``epochs``."""
    epochs: float = 3.0
    """Passes over the training set (when ``max_steps`` is not set)."""
    learning_rate: float = 1e-3
    """Peak learning rate (linear decay, after ``warmup_steps``)."""
    batch_size: int = 8
    """Utterances per device batch (also for evaluation)."""
    gradient_accumulation: int = 1
    """Batches accumulated into one optimizer step."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    save_steps: int = 100
    """Checkpoint every this many steps (and at the end)."""
    eval_steps: Optional[int] = None
    """Eval loss every this many steps when there is an evaluation set (default: ``save_steps``)."""
    save_total_limit: int = 2
    """Checkpoints kept in the output directory."""
    max_new_tokens: int = 225
    """Longest transcript generated when scoring before and after."""
    seed: int = 0
    """Seed of the adapter initialisation, data order and dropout."""
    device: str = "auto"
    """auto (a GPU when present), cpu or cuda."""

    @classmethod
    def parse(cls, value: FinetuneOptions | dict[str, Any] | None) -> FinetuneOptions:
        """Options from an object, a dict or None (defaults), validated once.

        Raises:
            FinetuneError: an unknown field or an out-of-range value.
        """
        if isinstance(value, FinetuneOptions):
            options = value
        else:
            given = dict(value or {})
            unknown = sorted(set(given) - {f.name for f in fields(cls)})
            if unknown:
                raise FinetuneError(
                    f"Unknown fine-tune option(s) {', '.join(unknown)}: valid ones are {', '.join(f.name for f in fields(cls))}."
                )
            if isinstance(given.get("target_modules"), str):
                given["target_modules"] = given["target_modules"].split(",")
            if given.get("target_modules") is not None:
                given["target_modules"] = tuple(m.strip() for m in given["target_modules"] if m.strip())
            options = cls(**given)
        options._validate()
        return options

    def _validate(self) -> None:
        positive = {
            "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha,
            "batch_size": self.batch_size,
            "gradient_accumulation": self.gradient_accumulation,
            "save_steps": self.save_steps,
            "save_total_limit": self.save_total_limit,
            "max_new_tokens": self.max_new_tokens,
            "learning_rate": self.learning_rate,
            "epochs": self.epochs,
        }
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        if self.eval_steps is not None:
            positive["eval_steps"] = self.eval_steps
        bad = [f"{k}={v}" for k, v in positive.items() if not v > 0]
        if bad:
            raise FinetuneError(f"Fine-tune options must be positive: {', '.join(bad)}.")
        if not 0 <= self.lora_dropout < 1 or self.warmup_steps < 0:
            raise FinetuneError("lora_dropout must be in [0, 1) and warmup_steps >= 0.")
        if not self.target_modules:
            raise FinetuneError("No target modules: name the linear layers to adapt, e.g. q_proj,v_proj.")
        if self.device not in DEVICES:
            raise FinetuneError(f"Unknown device {self.device!r}: use one of {', '.join(DEVICES)}.")
        check_task(self.task)


class Interrupt(BaseException):
    """Raised by the signal handler. A BaseException, like KeyboardInterrupt, so that the broad
    ``except Exception`` of libraries on the way (audio decoding, the trainer) cannot swallow it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def trainer(
    model,
    processor,
    train: PreparedData,
    held_out: Optional[PreparedData],
    output_dir: Path,
    options: FinetuneOptions,
    device: str,
    precision: str,
    run_id: str,
    progress: bool,
):
    from transformers import PrinterCallback, Seq2SeqTrainer, Seq2SeqTrainingArguments

    args = Seq2SeqTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation,
        learning_rate=options.learning_rate,
        warmup_steps=options.warmup_steps,
        max_steps=options.max_steps or -1,
        num_train_epochs=options.epochs,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        eval_strategy="steps" if held_out else "no",
        eval_steps=(options.eval_steps or options.save_steps) if held_out else None,
        seed=options.seed,
        use_cpu=device == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # We own the MLflow run: transformers' integration must not start one of its own.
        report_to="none",
        disable_tqdm=not progress,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
    )
    extractor = processor.feature_extractor
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        data_collator=WhisperCollator(model.config.decoder_start_token_id),
        train_dataset=WhisperTrainingSet(train.examples, extractor),
        # A map-style set (len, getitem), what Trainer reads; not a torch Dataset subclass, so torch stays lazy.
        eval_dataset=WhisperTrainingSet(held_out.examples, extractor) if held_out else None,  # type: ignore[arg-type]
        callbacks=[_loss_logger(run_id)],
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; the run has them
    return trainer


def _loss_logger(run_id: str):
    """A trainer callback logging every log line (train loss, eval loss, learning rate, ...) to our run by step."""
    from transformers import TrainerCallback

    # The trainer's end-of-training summary calls the mean loss "train_loss": keep that name for the steps.
    renames = {"loss": "train_loss", "train_loss": "train_loss_mean"}

    class MlflowLossLogger(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            values = {renames.get(k, k): float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            if values:
                mlflow.log_metrics(values, step=state.global_step, run_id=run_id)

    return MlflowLossLogger()


def checkpoint_to_resume(output_dir: Path, resume: bool) -> Optional[str]:
    last = last_checkpoint(output_dir)
    if resume and last is None:
        raise FinetuneError(f"There is no complete checkpoint in {output_dir} to resume from: start a new fine-tune (resume=False).")
    earlier = sorted(p.name for p in output_dir.glob("checkpoint-*")) if output_dir.is_dir() else []
    if not resume and earlier:
        raise FinetuneError(
            f"{output_dir} holds checkpoints of an earlier fine-tune ({', '.join(earlier)}): resume it "
            "(resume=True), or give an output directory of its own to the new fine-tune."
        )
    return last


def last_checkpoint(output_dir: Path) -> Optional[str]:
    """The newest complete checkpoint: the trainer writes trainer_state.json last, so a checkpoint
    cut short by a signal has none and is skipped."""
    complete = [
        (int(match.group(1)), path)
        for path in (output_dir.glob("checkpoint-*") if output_dir.is_dir() else ())
        if (match := _CHECKPOINT.fullmatch(path.name)) and (path / "trainer_state.json").is_file()
    ]
    return str(max(complete)[1]) if complete else None


def write_run_record(output_dir: Path, run_id: str) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RUN_RECORD).write_text(json.dumps({"run_id": run_id}))


def read_run_record(output_dir: Path) -> Optional[str]:
    try:
        return json.loads((output_dir / RUN_RECORD).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def signals_raise_interrupted():
    """SIGINT/SIGTERM raise ``Interrupt`` once (later ones are ignored while the run is closed)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    received: list[int] = []

    def handler(signum, frame):
        if not received:
            received.append(signum)
            raise Interrupt(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
