"""``whisper-registry``: register, evaluate, compare, promote and roll back Whisper versions.

The CLI parses arguments, calls the library and prints; library errors become one-line messages
and exit code 1 here, in one place (usage errors exit 2), a missing extra included: the message
names the pip command that installs it (``mlflow_faster_whisper.errors.EXTRA_OF_MODULE``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Optional

import mlflow
from mlflow.exceptions import MlflowException

from mlflow_faster_whisper.decoding import DecodingOptions, parse_cli_assignments
from mlflow_faster_whisper.errors import FasterWhisperFlavorError, missing_extra
from whisper_registry import __version__

# Each workflow function from its own module: the package re-exports nothing (whisper_registry/__init__.py).
from whisper_registry.batch import DEFAULT_CHUNK, transcribe_files
from whisper_registry.compare import COLUMNS, compare
from whisper_registry.doctor import doctor, format_report
from whisper_registry.errors import GateFailedError, RegistrationError, RegistryError, TrainingInterrupted
from whisper_registry.evaluate import evaluate
from whisper_registry.finetune import ADAPTER_ARTIFACT, DEVICES, FinetuneOptions, finetune
from whisper_registry.promote import ALIASES, promote, rollback
from whisper_registry.register import register

PROG = "whisper-registry"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns the exit code (0 ok, 1 error, 2 usage)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on usage errors and --help
        return int(exc.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.tracking_uri:
            mlflow.set_tracking_uri(args.tracking_uri)  # the library resolves the rest (tracking.configure)
        return args.handler(args) or 0
    except GateFailedError as exc:
        _print_gates(exc.results)
        return _fail(exc)
    except RegistrationError as exc:
        if exc.result is not None:
            _print_versions(exc.result)
        return _fail(exc)
    except (RegistryError, FasterWhisperFlavorError, MlflowException) as exc:
        return _fail(exc)
    except ImportError as exc:  # a module of an extra that is not installed: name the extra
        found = missing_extra(exc)
        if found is None:
            raise
        return _fail(found)


# Library messages name library arguments; on the command line the flag is the fix.
_CLI_WORDING = {"skip_bad=True": "--skip-bad"}


def _fail(exc: Exception) -> int:
    message = exc.message if isinstance(exc, MlflowException) else str(exc)
    for library, flag in _CLI_WORDING.items():
        message = message.replace(library, flag)
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------------- commands


def _register(args: argparse.Namespace) -> int:
    source, base = _register_source(args)
    result = register(
        source,
        args.name,
        _split_commas(args.quantization),
        base_model=base,
        revision=args.revision,
        decoding=parse_cli_assignments(args.decoding),
        progress=not args.no_progress,
    )
    _print_versions(result)
    return 0


def _register_source(args: argparse.Namespace) -> tuple[str, Optional[str]]:
    if args.adapter:
        base = args.base or args.checkpoint
        if args.base and args.checkpoint and args.base != args.checkpoint:
            raise RegistryError("Give the base model once: either as CHECKPOINT or with --base, not both.")
        if not base:
            raise RegistryError("An adapter needs its base model: add --base BASE (a checkpoint directory or hub id).")
        return args.adapter, base
    if not args.checkpoint:
        raise RegistryError("Nothing to register: give a CHECKPOINT, or --adapter ADAPTER --base BASE.")
    return args.checkpoint, args.base


def _evaluate(args: argparse.Namespace) -> int:
    result = evaluate(
        args.model_uri,
        args.dataset,
        decoding=parse_cli_assignments(args.decoding),
        skip_bad=args.skip_bad,
        split=args.split,
        load=_load(args),
        concurrency=args.concurrency,
        progress=not args.no_progress,
    )
    print(
        f"{result.name} version {result.version}: {result.headline}={_num(result.headline_value)} "
        f"on {result.metrics.get('n_utterances', 0):.0f} utterances (dataset {result.dataset_digest[:12]})"
    )
    for key in sorted(result.metrics):
        print(f"  {key:<16} {_num(result.metrics[key])}")
    for bad in result.skipped:
        print(f"  skipped {bad.where}: {bad.reason}")
    print(f"evaluation run: {result.run_id}")
    return 0


def _transcribe(args: argparse.Namespace) -> int:
    result = transcribe_files(
        args.model_uri,
        args.input,
        args.output,
        decoding=parse_cli_assignments(args.decoding),
        spark=args.spark,
        chunk_size=args.chunk_size,
        load=_load(args),
        progress=not args.no_progress,
    )
    print(
        f"{result.name} version {result.version}: {result.done} files transcribed ({result.failed} failed), "
        f"{result.skipped} already in {result.output}; {result.files_per_s:.3g} files/s, "
        f"{result.audio_seconds / result.wall_s if result.wall_s else 0:.3g} audio s/s"
    )
    print(f"transcribe run: {result.run_id}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    comparison = compare(args.name, output_dir=args.output_dir, log_artifact=not args.no_log)
    _print_table(comparison.rows(), COLUMNS)
    if comparison.plot_path is not None:
        print(f"plot: {comparison.plot_path}")
    if comparison.run_id:
        print(f"compare run: {comparison.run_id}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    result = promote(args.name, args.version, args.to, gates=args.gate, max_regression=args.max_regression, user=args.user)
    _print_gates(result.gates)
    if not result.moved:
        print(f"{result.name}@{result.alias} is already version {result.to_version}: nothing moved")
    else:
        print(f"{result.name}@{result.alias}: {result.from_version or 'none'} -> {result.to_version}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    result = rollback(args.name, args.alias, user=args.user)
    print(f"{result.name}@{result.alias}: rolled back {result.from_version} -> {result.to_version}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    report = doctor(args.model)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(format_report(report)))
    return 0 if report["ok"] else 1


# -------------------------------------------------------------------------------------- parsing


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Registry workflows for faster-whisper models in MLflow.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help=f"one of these ({PROG} COMMAND --help for its options):"
    )
    add_finetune_parser(commands)

    p = commands.add_parser("register", help="convert a checkpoint once per quantization and register each version")
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT", help="transformers/CTranslate2 directory, hub id, or runs:/ URI")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument(
        "--quantization",
        action="append",
        metavar="Q[,Q...]",
        help="CTranslate2 quantizations, comma-separated (default int8; a CTranslate2 directory as stored)",
    )
    p.add_argument("--adapter", help="a PEFT/LoRA adapter directory or runs:/ URI to merge into --base")
    p.add_argument("--base", help="the base checkpoint of the adapter")
    p.add_argument("--revision", help="hub revision of a hub id")
    _decoding_option(p, "default decoding options stored with every version")
    _progress_option(p)
    p.set_defaults(handler=_register)

    p = commands.add_parser("evaluate", help="WER/CER and speed of a version on a dataset")
    p.add_argument("model_uri", metavar="MODEL_URI", help="models:/<name>/<version> or models:/<name>@<alias>")
    p.add_argument("--dataset", required=True, help=".jsonl/.csv manifest (audio, text, language) or a save_to_disk directory")
    p.add_argument("--split", help="split of a DatasetDict (default: test, or the only one)")
    p.add_argument("--skip-bad", action="store_true", help="skip rows with missing/undecodable audio and record them")
    _load_options(p, "CTranslate2 threads (default: its own)")
    p.add_argument(
        "--concurrency",
        type=_positive_int,
        default=1,
        help="utterances in flight, sharing forward passes (default 1: each alone, its own latency)",
    )
    _decoding_option(p, "overrides of the version's stored decoding options")
    _progress_option(p)
    p.set_defaults(handler=_evaluate)

    p = commands.add_parser("transcribe", help="transcribe a folder, glob or manifest of audio files into Parquet, resumably")
    p.add_argument("model_uri", metavar="MODEL_URI", help="models:/<name>/<version> or models:/<name>@<alias>")
    p.add_argument("input", metavar="INPUT", help="a folder, a quoted glob, or a .txt/.csv/.jsonl manifest of files")
    p.add_argument(
        "--output", required=True, metavar="OUT.parquet", help="a directory of Parquet files; files already in it are skipped (resume)"
    )
    p.add_argument("--spark", metavar="MASTER", help="run on Spark, e.g. local[4] or spark://host:7077 (default: here)")
    p.add_argument(
        "--chunk-size",
        type=_positive_int,
        default=DEFAULT_CHUNK,
        help=f"files per written part (and per Spark job) (default {DEFAULT_CHUNK})",
    )
    _load_options(p, "CTranslate2 threads per worker (default: here, its own; Spark local[N]: the cores divided by N)")
    _decoding_option(p, "overrides of the version's stored decoding options")
    _progress_option(p)
    p.set_defaults(handler=_transcribe)

    p = commands.add_parser("compare", help="table and plot of every version: size, error, speed, aliases")
    p.add_argument("name", metavar="NAME", help="registered model name")
    p.add_argument("--output-dir", default=".", help="where to write <NAME>-compare.png (default: here)")
    p.add_argument("--no-log", action="store_true", help="do not log the table and plot to an MLflow run")
    p.set_defaults(handler=_compare)

    p = commands.add_parser("promote", help="move an alias to a version if the gates hold")
    p.add_argument("name", metavar="NAME", help="registered model name")
    p.add_argument("version", metavar="VERSION", help="the version number to move the alias to")
    p.add_argument("--to", required=True, metavar="ALIAS", help=f"one of {', '.join(ALIASES)}")
    p.add_argument(
        "--gate",
        action="append",
        metavar="GATE",
        help='e.g. "cer<=0.08", or "wer.upper<=0.08" to check the upper end of the bootstrap interval instead of the '
        'point figure (".lower" for the lower end: "shadow.agreement.lower>=0.95"); repeatable, all must hold',
    )
    p.add_argument(
        "--max-regression",
        type=float,
        metavar="DELTA",
        help="largest allowed increase of the headline error rate over the alias's current holder",
    )
    p.add_argument("--user", help="who to record in the audit trail (default: the OS user)")
    p.set_defaults(handler=_promote)

    p = commands.add_parser("rollback", help="give an alias back to its previous holder")
    p.add_argument("name", metavar="NAME", help="registered model name")
    p.add_argument("--alias", required=True, help=f"one of {', '.join(ALIASES)}")
    p.add_argument("--user", help="who to record in the audit trail (default: the OS user)")
    p.set_defaults(handler=_rollback)

    p = commands.add_parser("doctor", help="what this machine can run models on: GPUs, driver, cuBLAS 12, a smoke test")
    p.add_argument(
        "--model", metavar="MODEL_URI", help="load this model on every device and transcribe 1 s of audio on each (exit 1 if one fails)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_doctor)
    return parser


def _decoding_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--decoding",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help=f"{what}, e.g. beam_size=1 temperature=0 language=zh; keys: {', '.join(DecodingOptions.model_fields)}",
    )


def _load_options(p: argparse.ArgumentParser, threads_help: str) -> None:
    """How the version is loaded: the flavor's LoadOptions, with serving's defaults."""
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto: the GPU when there is one, as serving")
    p.add_argument("--compute-type", help="CTranslate2 compute type (default: the stored quantization, as serving)")
    p.add_argument("--cpu-threads", type=int, help=threads_help)


def _load(args: argparse.Namespace) -> dict:
    return {"device": args.device, "compute_type": args.compute_type, "cpu_threads": args.cpu_threads}


def _progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ------------------------------------------------------------------------------------- printing


def _split_commas(values: Optional[list[str]]) -> Optional[list[str]]:
    if not values:
        return None
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _print_versions(result) -> None:
    for v in result.versions:
        print(f"{v.name} version {v.version}: {v.quantization}, {v.size_bytes / 1e6:.1f} MB, {v.model_uri}")
    for quantization, reason in result.failed.items():
        print(f"{result.name} {quantization}: FAILED ({reason})")
    print(f"registration run: {result.run_id}")


def _print_gates(results) -> None:
    for r in results:
        print(f"  gate {r.gate:<20} {'PASS' if r.passed else 'FAIL'}  {r.detail}")


def _print_table(rows: list[dict[str, str]], columns: Sequence[str]) -> None:
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(row[c].ljust(widths[c]) for c in columns))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


def add_finetune_parser(commands) -> None:
    """Add ``finetune`` to the CLI's subparsers (``commands`` from ``add_subparsers``)."""
    d = FinetuneOptions()
    p = commands.add_parser("finetune", help="train a LoRA adapter on a dataset, tracked in an MLflow run")
    p.add_argument("--base", required=True, metavar="CHECKPOINT", help="transformers Whisper checkpoint directory or hub id")
    p.add_argument("--dataset", required=True, help="training set: .jsonl/.csv manifest (audio, text, language) or save_to_disk directory")
    p.add_argument("--eval-dataset", help="scored before/after and used for the eval loss (default: scores on the training set)")
    p.add_argument("--split", help="split of a DatasetDict training set")
    p.add_argument("--eval-split", help="split of a DatasetDict evaluation set")
    p.add_argument("--output-dir", default="whisper-finetune", help="checkpoints and the final adapter (default: ./whisper-finetune)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    p.add_argument("--language", help="language of the label prefix for rows without one, e.g. zh")
    p.add_argument("--task", default=d.task, choices=("transcribe", "translate"))
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--target-modules", default=",".join(d.target_modules), metavar="M[,M...]", help="linear layers to adapt")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=int, help="optimizer steps to train")
    steps.add_argument("--epochs", type=float, default=d.epochs, help=f"passes over the training set (default {d.epochs:g})")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--gradient-accumulation", type=int, default=d.gradient_accumulation)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--save-steps", type=int, default=d.save_steps, help="checkpoint every N steps")
    p.add_argument("--eval-steps", type=int, help="eval loss every N steps (default: --save-steps)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="longest transcript when scoring")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, choices=DEVICES)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_finetune)


def run_finetune(args) -> int:
    """The ``finetune`` command: 0 done, 128+signal when interrupted (library errors go to cli.main)."""
    option_names = {f.name for f in fields(FinetuneOptions)}
    options = {k: v for k, v in vars(args).items() if k in option_names}
    try:
        result = finetune(
            args.base,
            args.dataset,
            args.output_dir,
            eval_dataset=args.eval_dataset,
            options=options,
            split=args.split,
            eval_split=args.eval_split,
            resume=args.resume,
            progress=not args.no_progress,
        )
    except TrainingInterrupted as exc:
        print(f"whisper-registry: interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum
    h = result.headline
    before, after = result.before.get(h), result.after.get(h)
    change = f"; {h} on the {result.scored_on} set: {before:.4f} -> {after:.4f}" if before is not None and after is not None else ""
    print(f"fine-tuned {result.global_step} steps{change}")
    print(f"adapter: {result.adapter_uri} (also in {result.output_dir / ADAPTER_ARTIFACT})")
    print(f"register: whisper-registry register {result.adapter_uri} --base {_base_for_print(args.base)} --name NAME --quantization int8")
    print(f"fine-tune run: {result.run_id}")
    return 0


def _base_for_print(base: str) -> str:
    path = Path(base)
    return str(path.resolve()) if path.exists() else base
