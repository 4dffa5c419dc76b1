"""``make demo``: the main job end to end, offline, on the embedded defaults.

Builds the real Whisper base checkpoint from the test fixtures, registers it as int8 and float32,
evaluates both on real English and Mandarin clips, promotes int8 to ``production``, serves
``models:/whisper-base@production`` with ``bentoml serve``, transcribes a real clip over HTTP and
prints the transcript and the comparison table. Everything is written under ``.demo/`` (the
registry's embedded ``mlflow.db`` + ``mlartifacts``, the BentoML home, the plot); run
``mlflow ui --backend-store-uri sqlite:///.demo/mlflow.db`` afterwards to browse it.

    python -m demo.serve [--workdir .demo] [--port 3000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

from devkit.offline import go_offline
from devkit.processes import ServerProcess, ServerStartError, free_port, venv_path_env

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "whisper-base"
LANGUAGES = ("en", "zh")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".demo", help="where everything is written (wiped first)")
    parser.add_argument("--port", type=int, default=0, help="port of bentoml serve (default: a free one)")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    _prepare(workdir)

    from devkit import real
    from whisper_registry.compare import compare
    from whisper_registry.evaluate import evaluate
    from whisper_registry.promote import promote
    from whisper_registry.register import register

    _step("1/6 Building the real Whisper base checkpoint (transformers) from the PyPI fixtures")
    checkpoint = real.whisper_base_hf()
    clips = real.speech_clips(list(LANGUAGES))
    print(f"    checkpoint: {checkpoint}\n    clips: {', '.join(f'{c.language}/{c.name}' for c in clips)}")

    _step("2/6 Registering int8 and float32 versions (CTranslate2 conversion)")
    registration = register(str(checkpoint), MODEL_NAME, ["int8", "float32"], decoding={"beam_size": 5})
    for v in registration.versions:
        print(f"    {v.model_uri}  {v.quantization:8s} {v.size_bytes / 1e6:7.1f} MB  sha256 {v.checksums_digest[:12]}")
    by_quantization = {v.quantization: v for v in registration.versions}

    _step("3/6 Evaluating both versions on the real clips")
    manifest = _manifest(workdir / "eval.jsonl", clips)
    results = {}
    for quantization, version in by_quantization.items():
        result = evaluate(version.model_uri, manifest)
        results[quantization] = result
        shown = {k: round(v, 4) for k, v in result.metrics.items() if k in ("wer", "cer", "rtf", "latency_p95_s")}
        print(f"    {version.model_uri} ({quantization}): {shown}")

    _step("4/6 Promoting int8 to production")
    int8 = by_quantization["int8"]
    gate = f"{results['int8'].headline}<=0.5"
    promotion = promote(MODEL_NAME, int8.version, "production", gates=[gate])
    print(f"    {MODEL_NAME}@production -> version {promotion.to_version} (gate {gate}: passed)")
    comparison = compare(MODEL_NAME, output_dir=workdir)

    _step("5/6 Serving models:/whisper-base@production with bentoml serve")
    clip = next(c for c in clips if c.name == "quick_brown_fox")
    with _serve(workdir, args.port or free_port()) as url:
        import httpx

        with open(clip.path, "rb") as f:
            response = httpx.post(f"{url}/transcribe", files={"file": (clip.path.name, f, "audio/wav")}, timeout=600)
        response.raise_for_status()
        body = response.json()
        info = httpx.get(f"{url}/info", timeout=30).json()

    _step("6/6 Result")
    print(f"    served: {info['model']['name']} v{info['model']['version']} ({info['model']['quantization']}, "
          f"compute_type {info['compute_type']}, aliases {info['model']['aliases']})")
    print(f"    clip:       {clip.language}/{clip.name}.wav ({body['duration']:.2f} s)")
    print(f"    reference:  {clip.text}")
    print(f"    transcript: {body['text']}")
    print()
    _print_table(comparison.rows())
    if comparison.plot_path:
        print(f"\n    plot: {comparison.plot_path}")
    print(f"    browse: mlflow ui --backend-store-uri sqlite:///{workdir / 'mlflow.db'}")
    return 0


def _prepare(workdir: Path) -> None:
    """A fresh working dir on the registry's embedded defaults, with its own BentoML home."""
    from whisper_registry.tracking import fresh_embedded_workdir

    fresh_embedded_workdir(workdir)
    go_offline()
    os.environ.update(BENTOML_HOME=str(workdir / "bentoml"))


def _manifest(path: Path, clips) -> Path:
    rows = [{"audio": str(c.path), "text": c.text, "language": c.language} for c in clips]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@contextlib.contextmanager
def _serve(workdir: Path, port: int) -> Iterator[str]:
    command = [
        sys.executable, "-m", "bentoml", "serve", "whisper_bento:Transcriber",
        "--host", "127.0.0.1", "--port", str(port),
        "--arg", f"model=models:/{MODEL_NAME}@production",
    ]
    log_path = workdir / "bentoml-serve.log"
    print(f"    $ {' '.join(command[2:])}\n    (log: {log_path})")
    url = f"http://127.0.0.1:{port}"
    server = ServerProcess(command, ready_url=f"{url}/readyz", log_path=log_path, env=venv_path_env(), cwd=workdir,
                           timeout_s=300, fail_marker="Application startup failed")
    try:
        seconds = server.start()
    except ServerStartError as exc:
        raise SystemExit(f"bentoml serve failed to start: {str(exc).splitlines()[0]}") from None
    try:
        print(f"    ready at {url} after {seconds:.1f} s")
        yield url
    finally:
        server.stop()
        print("    server stopped")


def _print_table(rows: list[dict[str, str]]) -> None:
    if not rows:
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    print("    " + "  ".join(c.ljust(widths[c]) for c in columns))
    print("    " + "  ".join("-" * widths[c] for c in columns))
    for row in rows:
        print("    " + "  ".join(row[c].ljust(widths[c]) for c in columns))


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
