"""Pack what ``bench/gpu.py`` needs on a GPU machine that reaches no package registry.

    .venv/bin/python -m bench.gpu_kit [--model tiny.en|base]

writes ``.gpu-kit/`` (git-ignored): the Python 3.12 wheels the GPU image lacks (ctranslate2,
faster-whisper, PyAV, pydantic), a faster_whisper model directory and the long English file with
its reference, as one tar split into parts under the 64 MiB a device call carries. Each device
call carries one part and runs the same command; the call that brings the last part installs the
wheels and runs the reading (``bench/gpu_run.sh``):

    run(carry=[".gpu-kit/part-01"], command="bash bench/gpu_run.sh")
    run(carry=[".gpu-kit/part-02"], command="bash bench/gpu_run.sh")      # within 30 s: warm
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / ".gpu-kit"
PART_BYTES = 56 * 2**20
# Not in the GPU image (the device tool's KINDS.md lists what is); pinned to what runs here.
WHEELS = ("ctranslate2", "faster-whisper", "av", "pydantic", "pydantic-core", "annotated-types", "typing-inspection")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny.en", "base"), default="base")
    args = parser.parse_args(argv)

    import mlflow_faster_whisper as mfw
    from tests.fixtures import real

    shutil.rmtree(KIT, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "kit"
        (root / "wheels").mkdir(parents=True)
        pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
        platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", *platform_args,
                        "-d", str(root / "wheels"), *pins], check=True)
        source = real.whisper_tiny_en_ct2() if args.model == "tiny.en" else real.whisper_base_ct2()
        mfw.save_model(str(source), root / "model")
        long_file = real.long_speech()
        for path in (long_file, long_file.with_suffix(".json")):
            shutil.copy2(path, root / path.name)
        _pack_clips(real.speech_clips(), root / "clips.npz")
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
    print(f"{KIT}: {len(data) / 2**20:.1f} MiB in {len(parts)} part(s); {', '.join(pins)}; model {args.model}")
    for index in range(1, len(parts) + 1):
        print(f'  run(carry=[".gpu-kit/part-{index:02d}"], command="bash bench/gpu_run.sh", timeout_s=540)')
    return 0


def _pack_clips(clips, target: Path) -> None:
    """The real clips as float32 arrays (the GPU image has numpy, not PyAV) and their references."""
    import json

    import numpy as np

    from tests.fixtures.audio import read_wav

    arrays, meta = {}, []
    for index, clip in enumerate(clips):
        key = f"c{index:02d}"
        arrays[key] = read_wav(clip.path)[0].astype(np.float32)
        meta.append({"key": key, "language": clip.language, "name": clip.name, "text": clip.text})
    np.savez(target, **arrays)
    target.with_suffix(".json").write_text(json.dumps(meta, ensure_ascii=False))


if __name__ == "__main__":
    sys.exit(main())
