"""Pack what ``bench/gpu.py`` needs on a GPU machine that reaches no package registry.

    .venv/bin/python -m bench.gpu_kit [--model tiny.en|base] [--compute-types int8_float16,float16] [--batch-size 32]

writes ``.gpu-kit/`` (git-ignored): the Python 3.12 wheels of what the service runs on (BentoML,
CTranslate2, faster-whisper, PyAV and everything they import, at the versions installed here, but
the heavy packages the GPU image already holds), a BentoML home holding one bento per compute type
built for ``device=cuda`` (``python -m whisper_bento.build``, as a user builds one; a built bento
serves with the configuration it was built with) and their one model, the long English file with
its reference and the real clips, as one tar split into parts under the 64 MiB a device call
carries. ``--device cpu`` builds the same kit for trying it on a machine without a GPU. Each device
call carries one part and runs the same command; the call that brings the last part installs the
wheels and runs the reading (``bench/gpu_run.sh``):

    run(carry=[".gpu-kit/part-01"], command="bash bench/gpu_run.sh")
    run(carry=[".gpu-kit/part-02"], command="bash bench/gpu_run.sh")      # within 30 s: warm
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / ".gpu-kit"
PART_BYTES = 56 * 2**20
# What the served bento and bench/gpu.py import, as distributions; their dependencies are walked.
ROOTS = ("bentoml", "fastapi", "python-multipart", "faster-whisper", "ctranslate2", "av", "pydantic", "pyyaml", "httpx")
# In the GPU image (the device tool's KINDS.md lists its packages) and heavy: left out, and not walked.
# Everything else is carried at the version installed here, so what runs there is what ran here.
IMAGE_HAS = ("numpy", "onnxruntime", "tokenizers", "huggingface-hub", "hf-xet")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
REGISTERED = "whisper-gpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny.en", "base"), default="base")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--compute-types", default="int8_float16", help="one bento each (the engine part's compute types)")
    parser.add_argument("--batch-size", type=int, default=32, help="the bentos' batch_size")
    args = parser.parse_args(argv)

    from devkit import real

    shutil.rmtree(KIT, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "kit"
        (root / "wheels").mkdir(parents=True)
        pins = wheel_pins()
        platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", *platform_args,
                        "-d", str(root / "wheels"), *pins], check=True)
        source = real.whisper_tiny_en_ct2() if args.model == "tiny.en" else real.whisper_base_ct2()
        config = {"device": args.device, "batch_size": args.batch_size, "max_requests": 256, "max_latency_ms": 600_000}
        bentos = build_bentos(source, root / "bentoml", Path(tmp) / "mlflow.db", args.compute_types.split(","), config)
        (root / "bentos.json").write_text(json.dumps(bentos) + "\n")
        long_file = real.long_speech()
        for path in (long_file, long_file.with_suffix(".json")):
            shutil.copy2(path, root / path.name)
        _pack_clips(real.speech_clips(), root / "clips")
        archive = Path(tmp) / "kit.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(root, arcname="kit")
        data = archive.read_bytes()
    parts = [data[i : i + PART_BYTES] for i in range(0, len(data), PART_BYTES)]
    for index, chunk in enumerate(parts, 1):
        part = KIT / f"part-{index:02d}"
        part.mkdir(parents=True)
        (part / f"kit.tar.{index:02d}").write_bytes(chunk)
        (part / "count").write_text(f"{len(parts)}\n")
    print(f"{KIT}: {len(data) / 2**20:.1f} MiB in {len(parts)} part(s), {len(pins)} wheels; bentos {bentos} (model {args.model})")
    for index in range(1, len(parts) + 1):
        print(f'  run(carry=[".gpu-kit/part-{index:02d}"], command="bash bench/gpu_run.sh", timeout_s=540)')
    return 0


def wheel_pins() -> list[str]:
    """``name==version`` for ROOTS and what they require (no extras), as installed here, less IMAGE_HAS."""
    from packaging.requirements import Requirement

    # The GPU image's interpreter (KINDS.md: Python 3.12.3 on x86-64 Linux), for the requirements' markers.
    marker_env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                  "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}

    pins: dict[str, str] = {}
    pending = list(ROOTS)
    while pending:
        name = _normal(pending.pop())
        if name in pins or name in IMAGE_HAS:
            continue
        dist = metadata.distribution(name)
        pins[name] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(marker_env):
                pending.append(requirement.name)
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def build_bentos(source: Path, home: Path, registry: Path, compute_types: list[str], config: dict) -> dict[str, str]:
    """Register ``source`` in a throwaway sqlite registry and build one bento per compute type with
    ``config`` into the BentoML home ``home``, as a user would (``python -m whisper_bento.build``);
    their tags by compute type. The bentos share the one model in ``home``."""
    env = {**os.environ, "BENTOML_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{registry}",
           "BENTOML_DO_NOT_TRACK": "True", "MLFLOW_DISABLE_TELEMETRY": "true"}
    subprocess.run([sys.executable, "-m", "whisper_registry", "register", str(source), "--name", REGISTERED, "--no-progress"],
                   env=env, check=True, cwd=registry.parent)
    tags = {}
    for compute_type in compute_types:  # version 1: the registry is this kit's own
        args = [f"model=models:/{REGISTERED}/1", f"compute_type={compute_type}", *(f"{k}={v}" for k, v in config.items())]
        built = subprocess.run([sys.executable, "-m", "whisper_bento.build", *(x for a in args for x in ("--arg", a)),
                                "--version", f"{config['device']}-{compute_type}"],
                               env=env, cwd=registry.parent, capture_output=True, text=True)
        if built.returncode != 0:
            raise SystemExit(f"bento build failed:\n{built.stdout[-2000:]}{built.stderr[-2000:]}")
        tags[compute_type] = re.search(r"Built (\S+):", built.stdout).group(1)
    return tags


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pack_clips(clips, target: Path) -> None:
    """The real clips' files, as they are sent, and a .json of their files, languages and references."""
    target.mkdir()
    meta = []
    for index, clip in enumerate(clips):
        name = f"{index:02d}-{clip.language}-{clip.name}{clip.path.suffix}"
        shutil.copy2(clip.path, target / name)
        meta.append({"file": f"{target.name}/{name}", "language": clip.language, "name": clip.name, "text": clip.text})
    target.with_suffix(".json").write_text(json.dumps(meta, ensure_ascii=False))


if __name__ == "__main__":
    sys.exit(main())
