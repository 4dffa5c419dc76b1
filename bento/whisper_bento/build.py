"""Build a self-contained bento for CPU or GPU: ``python -m whisper_bento.build``.

    python -m whisper_bento.build --arg model=models:/whisper-base@production             # CPU
    python -m whisper_bento.build --arg model=models:/whisper-base@production --arg device=cuda

It takes the same ``--arg`` / ``--arg-file`` service configuration as ``bentoml build`` and
``bentoml serve`` and builds from ``bento/bentofile.yaml``, adding what the image needs:

- this project's own distribution, as a wheel built now from this checkout and shipped inside the
  bento (``env/python/wheels``), installed with its ``serve`` extra: the image needs nothing from
  the checkout and nothing of this project from a package index;
- for ``device=cuda``, the ``gpu`` extra (NVIDIA's cuBLAS 12 wheel, which CTranslate2 opens) and a
  CUDA 12 base image (``docker.cuda_version``), so ``bentoml containerize`` yields an image that
  runs on a GPU host. A CPU bento (``cpu`` or ``auto``) carries no CUDA wheel.

The registered version is imported into the BentoML model store and recorded in the bento, as with
``bentoml build``; serving the bento needs no registry.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import yaml

BENTO_DIR = Path(__file__).resolve().parents[1]  # bento/: the build context
PROJECT_ROOT = BENTO_DIR.parent
DISTRIBUTION = "mlflow-faster-whisper"
# CTranslate2 4.x's Linux wheels are built against CUDA 12; BentoML maps "12.8" to its newest 12.8 image.
CUDA_VERSION = "12.8"


class BuildError(Exception):
    """The bento cannot be built as asked; the message names the fix."""


def build(args: dict[str, Any], *, version: Optional[str] = None):
    """Build the bento for the service configuration ``args``; returns the ``bentoml.Bento``."""
    import bentoml

    from whisper_bento.config import ServiceConfig

    try:
        device = ServiceConfig.model_validate(args).load.device
    except ValueError as exc:
        raise BuildError(f"Invalid service configuration: {exc}") from None
    options = yaml.safe_load((BENTO_DIR / "bentofile.yaml").read_text())
    # Inside the build context: BentoML takes wheels by a path relative to it.
    with tempfile.TemporaryDirectory(prefix="wheel-build-", dir=BENTO_DIR) as wheel_dir:
        wheel = build_wheel(Path(wheel_dir))
        extras = "serve,gpu" if device == "cuda" else "serve"
        options["python"] = {
            **options.get("python", {}),
            # Installed by the image's install.sh from env/python, where the wheel is copied to.
            "packages": [f"./wheels/{wheel.name}[{extras}]"],
            "wheels": [str(wheel.relative_to(BENTO_DIR))],
        }
        if device == "cuda":
            options["docker"] = {**options.get("docker", {}), "cuda_version": CUDA_VERSION}
        bentofile = Path(wheel_dir) / "bentofile.yaml"
        bentofile.write_text(yaml.safe_dump(options, sort_keys=False))
        previous = os.getcwd()
        os.chdir(BENTO_DIR)  # BentoML reads wheel paths relative to the working directory too
        try:
            return bentoml.bentos.build_bentofile(str(bentofile), build_ctx=str(BENTO_DIR), version=version, args=args)
        finally:
            os.chdir(previous)


def build_wheel(dest: Path) -> Path:
    """This project's wheel, built from the checkout this package is imported from."""
    pyproject = PROJECT_ROOT / "pyproject.toml"
    if not pyproject.is_file() or f'name = "{DISTRIBUTION}"' not in pyproject.read_text():
        raise BuildError(
            f"{PROJECT_ROOT} is not a checkout of {DISTRIBUTION}; build the bento from a checkout "
            "(pip install -e '.[serve]' there), so its wheel can be built and shipped in the bento."
        )
    # From a clean copy of the sources: setuptools reuses its build/ folder, which would ship
    # modules deleted since the last build.
    source = dest / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(PROJECT_ROOT / name, source / name)
    for package_dir in ("plugin", "registry", "bento"):
        shutil.copytree(PROJECT_ROOT / package_dir, source / package_dir,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "wheel-build-*", "*.pyc"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-q", "-w", str(dest), str(source)],
        capture_output=True,
        text=True,
    )
    wheels = sorted(dest.glob("*.whl"))
    if built.returncode != 0 or len(wheels) != 1:
        raise BuildError(
            f"Building the {DISTRIBUTION} wheel failed (it builds with this environment's setuptools: "
            f"pip install 'setuptools>=68'):\n{built.stderr.strip()[-2000:]}"
        )
    return wheels[0]


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m whisper_bento.build",
        description="Build a self-contained bento of a registered Whisper version, for CPU or (device=cuda) GPU.",
    )
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                        help="service configuration, as for bentoml serve (model=..., device=cuda, ...)")
    parser.add_argument("--arg-file", help="a YAML file of service configuration (--arg values win)")
    parser.add_argument("--version", help="the bento's version (default: generated)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    options = _parse(argv)
    args: dict[str, Any] = {}
    if options.arg_file:
        args.update(yaml.safe_load(Path(options.arg_file).read_text()) or {})
    for item in options.arg:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"whisper_bento.build: error: --arg {item!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        args[key] = value
    try:
        bento = build(args, version=options.version)
    except BuildError as exc:
        print(f"whisper_bento.build: error: {exc}", file=sys.stderr)
        return 1
    print(f"Built {bento.tag}: bentoml serve {bento.tag}, or bentoml containerize {bento.tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
