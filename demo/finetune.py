"""``make demo-finetune``: LoRA fine-tuning to a registered, evaluated int8 version, offline.

Builds the real Whisper base checkpoint and the real Mandarin clips from the test fixtures,
fine-tunes a LoRA adapter on the clips (a tiny "domain" Whisper base gets partly wrong), registers
the fine-tune run's adapter by its run id as an int8 version (merged and converted by the flavor)
and evaluates that version with faster-whisper. Everything is written under
``.demo/finetune/`` (ignored by git, removed by ``make clean``); browse it with
``mlflow ui --backend-store-uri sqlite:///.demo/finetune/mlflow.db``.
A few minutes on two CPU cores; a GPU is used when present.

    python -m demo.finetune [--workdir .demo/finetune] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from whisper_registry.tracking import fresh_embedded_workdir

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "whisper-base-zh-lora"
# LoRA on the decoder only: the frozen encoder needs no backward pass, which makes a CPU step
# about three times cheaper than adapting every layer (the default target modules).
DECODER_MODULES = tuple(
    f"decoder.layers.{layer}.{module}"
    for layer in range(6)
    for module in ("self_attn.q_proj", "self_attn.v_proj", "encoder_attn.q_proj", "encoder_attn.v_proj", "fc1", "fc2")
)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".demo" / "finetune", help="where everything is written (wiped first)")
    parser.add_argument("--steps", type=int, default=6, help="LoRA optimizer steps (default 6)")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    fresh_embedded_workdir(workdir)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    from devkit import real
    from whisper_registry.cli import main as cli
    from whisper_registry.evaluate import evaluate
    from whisper_registry.finetune import finetune

    _step("1/4 Building the real Whisper base checkpoint and the Mandarin clips from the PyPI fixtures")
    checkpoint = real.whisper_base_hf()
    clips = real.speech_clips(["zh"])
    manifest = workdir / "zh.jsonl"
    manifest.write_text("".join(json.dumps({"audio": str(c.path), "text": c.text, "language": "zh"}, ensure_ascii=False) + "\n"
                                for c in clips), encoding="utf-8")
    print(f"    checkpoint: {checkpoint}\n    training set: {manifest} ({len(clips)} clips)")

    _step(f"2/4 Fine-tuning a LoRA adapter (r=8, decoder, {args.steps} steps) and scoring before/after")
    started = time.perf_counter()
    result = finetune(checkpoint, manifest, workdir / "finetune", options={
        "language": "zh", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": DECODER_MODULES,
        "max_steps": args.steps, "learning_rate": 3e-3, "batch_size": 3, "max_new_tokens": 48,
    }, progress=True)
    print(f"    {time.perf_counter() - started:.0f} s; CER on the training clips {result.before['cer']:.3f} -> "
          f"{result.after['cer']:.3f}\n    fine-tune run: {result.run_id}")

    _step("3/4 Registering the run's adapter as int8 (merge + CTranslate2 conversion)")
    command = ["register", result.adapter_uri, "--base", str(checkpoint), "--name", MODEL_NAME, "--quantization", "int8"]
    print(f"    whisper-registry {' '.join(command)}")
    if cli(command) != 0:
        return 1

    _step("4/4 Evaluating the registered version with faster-whisper (greedy)")
    evaluation = evaluate(f"models:/{MODEL_NAME}/1", manifest, decoding={"beam_size": 1, "temperature": 0.0})
    for row in evaluation.utterances:
        print(f"    {Path(row['audio']).name:18s} {row['hypothesis']}  (reference {row['reference']})")
    print(f"    CER {evaluation.metrics['cer']:.3f} (base model before fine-tuning: {result.before['cer']:.3f})")
    print(f"\nBrowse it: mlflow ui --backend-store-uri sqlite:///{workdir / 'mlflow.db'}")
    return 0


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
