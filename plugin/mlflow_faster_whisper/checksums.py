"""sha256 of every artifact file, recorded at save time and verified before loading."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mlflow_faster_whisper.errors import ChecksumError

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def compute(model_dir: Path) -> dict[str, str]:
    """{relative posix path: sha256} of every file under ``model_dir``."""
    return {p.relative_to(model_dir).as_posix(): sha256_file(p) for p in sorted(model_dir.rglob("*")) if p.is_file()}


def total_size(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())


def digest(checksums: dict[str, str]) -> str:
    """One sha256 over the sorted per-file checksums: a version's fingerprint."""
    text = "\n".join(f"{name} {value}" for name, value in sorted(checksums.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def verify(model_dir: Path, expected: dict[str, str]) -> None:
    """Refuse a model directory that is partial, tampered with or has unexpected files.

    Raises:
        ChecksumError: naming the first file that is missing, extra or different.
    """
    for name, value in sorted(expected.items()):
        path = model_dir / name
        if not path.is_file():
            raise ChecksumError(
                f"The model artifact is incomplete: {name} is missing from {model_dir}. Download the model again (the copy is partial)."
            )
        if sha256_file(path) != value:
            raise ChecksumError(
                f"The model artifact was modified: {name} in {model_dir} does not match the sha256 "
                "recorded when it was logged. Download the model again or log a new version."
            )
    extra = sorted(
        p.relative_to(model_dir).as_posix()
        for p in model_dir.rglob("*")
        if p.is_file() and p.relative_to(model_dir).as_posix() not in expected
    )
    if extra:
        raise ChecksumError(
            f"The model artifact has files that were not logged: {', '.join(extra)} in {model_dir}. Remove them or log a new version."
        )
