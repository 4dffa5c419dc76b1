"""Build a self-contained bento for CPU or GPU: ``python -m whisper_bento.build``.

    python -m whisper_bento.build --arg model=models:/whisper-base@production             # CPU
    python -m whisper_bento.build --arg model=models:/whisper-base@production --arg device=cuda

It takes the same ``--arg`` / ``--arg-file`` service configuration as ``bentoml build`` and
``bentoml serve`` and builds from ``whisper_bento/bentofile.yaml`` (package data), adding what the
image needs:

- this project's own distribution as a wheel shipped inside the bento, installed with its
  ``serve`` extra: from a checkout, built now from its sources; from an installed distribution
  (``pip install 'mlflow-faster-whisper[serve]'``), repacked from the installed files its RECORD
  lists. The image needs no checkout and nothing of this project from a package index;
- for ``device=cuda``, the ``gpu`` extra (NVIDIA's cuBLAS 12 wheel, which CTranslate2 opens) and a
  CUDA 12 base image (``docker.cuda_version``), so ``bentoml containerize`` yields an image that
  runs on a GPU host. A CPU bento (``cpu`` or ``auto``) carries no CUDA wheel.

The registered version is imported into the BentoML model store and recorded in the bento, as with
``bentoml build``; serving the bento needs no registry.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import yaml

from mlflow_faster_whisper.errors import DISTRIBUTION, MissingExtraError, extra_imports

PACKAGE_DIR = Path(__file__).resolve().parent  # whisper_bento/, copied into the build context
BENTOFILE = PACKAGE_DIR / "bentofile.yaml"
CHECKOUT = PACKAGE_DIR.parents[1]  # the project root, where this package is imported from a checkout
# CTranslate2 4.x's Linux wheels are built against CUDA 12; BentoML maps "12.8" to its newest 12.8 image.
CUDA_VERSION = "12.8"
# Files of an installed distribution that the installer wrote, not the wheel.
_INSTALLER_FILES = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")


class BuildError(Exception):
    """The bento cannot be built as asked; the message names the fix."""


def build(args: dict[str, Any], *, version: Optional[str] = None):
    """Build the bento for the service configuration ``args``.

    Returns:
        The ``bentoml.Bento``.

    Raises:
        BuildError: an invalid configuration, or this project's wheel could not be made.
        MissingExtraError: BentoML is not installed (the ``serve`` extra).
    """
    with extra_imports():
        import bentoml

    from whisper_bento.config import ServiceConfig

    try:
        device = ServiceConfig.model_validate(args).load.device
    except ValueError as exc:
        raise BuildError(f"Invalid service configuration: {exc}") from None
    options = yaml.safe_load(BENTOFILE.read_text())
    with tempfile.TemporaryDirectory(prefix="whisper-bento-build-") as scratch:
        # A context of its own: the service's package and the wheel, whether this runs from a
        # checkout or from site-packages.
        context = Path(scratch) / "context"
        shutil.copytree(PACKAGE_DIR, context / PACKAGE_DIR.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        wheel = project_wheel(context / "wheels")
        requirement = f"./wheels/{wheel.name}[{'serve,gpu' if device == 'cuda' else 'serve'}]"
        python = {**options.get("python", {}), "packages": [requirement]}
        if device == "cuda":
            # docker.cuda_version makes BentoML 1.4 build a v1 bento, which ships local wheels as
            # python.wheels (env/python/wheels).
            python["wheels"] = [f"wheels/{wheel.name}"]
            options["docker"] = {**options.get("docker", {}), "cuda_version": CUDA_VERSION}
        else:
            # A v2 bento takes a local wheel as a file of the project (src/wheels), installed from src/.
            options["include"] = [*options.get("include", []), f"wheels/{wheel.name}"]
        options["python"] = python
        bentofile = Path(scratch) / "bentofile.yaml"
        bentofile.write_text(yaml.safe_dump(options, sort_keys=False))
        previous = os.getcwd()
        os.chdir(context)  # BentoML reads wheel paths relative to the working directory too
        try:
            return bentoml.bentos.build_bentofile(str(bentofile), build_ctx=str(context), version=version, args=args)
        finally:
            os.chdir(previous)


def project_wheel(dest: Path) -> Path:
    """This project's wheel in ``dest``: built from the checkout ``whisper_bento`` is imported
    from, else repacked from the installed distribution.

    Raises:
        BuildError: neither a checkout nor an installed distribution holds this package.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if _is_checkout(CHECKOUT):
        return build_wheel(dest)
    return repack_installed(dest)


def _is_checkout(root: Path) -> bool:
    pyproject = root / "pyproject.toml"
    return root / "bento" / PACKAGE_DIR.name == PACKAGE_DIR and pyproject.is_file() and f'name = "{DISTRIBUTION}"' in pyproject.read_text()


def build_wheel(dest: Path) -> Path:
    """This project's wheel, built from the checkout this package is imported from."""
    # From a clean copy of the sources: setuptools reuses its build/ folder, which would ship
    # modules deleted since the last build.
    with tempfile.TemporaryDirectory(prefix="wheel-source-") as tmp:
        source = Path(tmp)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(CHECKOUT / name, source / name)
        for package_dir in ("plugin", "registry", "bento"):
            shutil.copytree(
                CHECKOUT / package_dir, source / package_dir, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
            )
        built = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--disable-pip-version-check",
                "-q",
                "-w",
                str(dest),
                str(source),
            ],
            capture_output=True,
            text=True,
        )
    wheels = sorted(dest.glob("*.whl"))
    if built.returncode != 0 or len(wheels) != 1:
        raise BuildError(
            f"Building the {DISTRIBUTION} wheel failed (it builds with this environment's setuptools: "
            f"pip install 'setuptools>=77'):\n{built.stderr.strip()[-2000:]}"
        )
    return wheels[0]


def repack_installed(dest: Path) -> Path:
    """The installed distribution as the wheel it was installed from: the files its RECORD lists
    under site-packages (console scripts come back from entry_points.txt), with a new RECORD.

    Raises:
        BuildError: the distribution is not installed, or is not the copy imported here.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        dist = None
    files = list(dist.files or []) if dist is not None else []
    here = Path(__file__).resolve()
    if dist is None or not any(Path(str(dist.locate_file(f))).resolve() == here for f in files):
        raise BuildError(
            f"{PACKAGE_DIR} is neither a checkout of {DISTRIBUTION} nor its installed distribution: "
            f"install it (pip install '{DISTRIBUTION}[serve]'), or run from a checkout (pip install -e '.[serve]')."
        )
    info_dir = next(str(f).split("/")[0] for f in files if str(f).endswith(".dist-info/METADATA"))
    wheel_meta = Path(str(dist.locate_file(f"{info_dir}/WHEEL"))).read_text()
    tag = next(line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:"))
    name = info_dir[: -len(".dist-info")]  # "mlflow_faster_whisper-0.1.0"
    shipped = sorted(
        (
            str(f)
            for f in files
            if not str(f).startswith("..")
            and "__pycache__" not in f.parts
            and f.suffix != ".pyc"
            and not (f.parts[0] == info_dir and f.name in _INSTALLER_FILES)
        ),
        key=lambda p: (p.startswith(info_dir), p),  # .dist-info last, as wheels have it
    )
    wheel = dest / f"{name}-{tag}.whl"
    record = []
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in shipped:
            data = Path(str(dist.locate_file(path))).read_bytes()
            archive.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(data)}")
        record.append(f"{info_dir}/RECORD,,")
        archive.writestr(f"{info_dir}/RECORD", "\n".join(record) + "\n")
    return wheel


def configuration_keys() -> str:
    """The service configuration keys (``--arg KEY=VALUE``), one per line with its description."""
    from mlflow_faster_whisper.devices import LoadOptions
    from whisper_bento.config import ServiceConfig

    lines = []
    for model in (ServiceConfig, LoadOptions):
        for key, field in model.model_fields.items():
            if key == "load":  # given flat: device=..., compute_type=...
                continue
            lines += textwrap.wrap(field.description or "", width=100, initial_indent=f"  {key:<26}", subsequent_indent=" " * 28)
    return "\n".join(lines)


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m whisper_bento.build",
        description="Build a self-contained bento of a registered Whisper version, for CPU or (device=cuda) GPU. "
        "Needs the serve extra; works from a checkout or an installed wheel.",
        epilog=f"service configuration (--arg KEY=VALUE):\n{configuration_keys()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="service configuration, as for bentoml serve (model=..., device=cuda, ...)",
    )
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
    except (BuildError, MissingExtraError) as exc:
        print(f"whisper_bento.build: error: {exc}", file=sys.stderr)
        return 1
    print(f"Built {bento.tag}: bentoml serve {bento.tag}, or bentoml containerize {bento.tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
