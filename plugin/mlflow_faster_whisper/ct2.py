"""Facts read from a CTranslate2 Whisper directory without loading the model."""

from __future__ import annotations

import json
import struct
from pathlib import Path

# Order of CTranslate2's DataType enum (include/ctranslate2/types.h, specs/model_spec.py).
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_FLOAT_DTYPES = ("float32", "float16", "bfloat16")

# Whisper's multilingual vocabularies have 51865 (v1/v2) or 51866 (v3) tokens; English-only 51864.
_MULTILINGUAL_VOCAB = 51865


def stored_quantization(model_dir: str | Path) -> str:
    """The quantization a model.bin was written with, from the dtypes of its variables.

    CTranslate2 stores "int8" and "int8_float32" identically; such files read as "int8_float32".
    """
    weight_dtypes, other_dtypes = set(), set()
    for name, rank, dtype in _variables(Path(model_dir) / "model.bin"):
        if name.endswith("weight") and rank == 2:
            weight_dtypes.add(dtype)
        elif dtype in _FLOAT_DTYPES and not name.endswith("weight_scale"):  # scales are float32
            other_dtypes.add(dtype)
    weight = _single(weight_dtypes)
    if weight in ("int8", "int16"):
        other = _single(other_dtypes)
        return "int16" if weight == "int16" else f"int8_{other}"
    return weight


def vocabulary(model_dir: str | Path) -> list[str]:
    """The model's tokens by id (vocabulary.json, or vocabulary.txt from older converters)."""
    path = Path(model_dir) / "vocabulary.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return (Path(model_dir) / "vocabulary.txt").read_text(encoding="utf-8").splitlines()


def is_multilingual(model_dir: str | Path) -> bool:
    return len(vocabulary(model_dir)) >= _MULTILINGUAL_VOCAB


def lang_ids(model_dir: str | Path) -> list:
    return json.loads((Path(model_dir) / "config.json").read_text()).get("lang_ids") or []


def _single(dtypes: set) -> str:
    # Mixed dtypes do not occur in converter output; report the widest to stay honest.
    for dtype in ("float32", "bfloat16", "float16", "int16", "int8"):
        if dtype in dtypes:
            return dtype
    return "float32"


def _variables(path: Path):
    """Yield (name, rank, dtype) of each variable, seeking over the data."""
    with open(path, "rb") as f:
        (_version,) = struct.unpack("I", f.read(4))
        _read_string(f)  # spec name
        f.read(4)  # revision
        (count,) = struct.unpack("I", f.read(4))
        for _ in range(count):
            name = _read_string(f)
            (rank,) = struct.unpack("B", f.read(1))
            f.seek(4 * rank, 1)
            (dtype_id,) = struct.unpack("B", f.read(1))
            (num_bytes,) = struct.unpack("I", f.read(4))
            f.seek(num_bytes, 1)
            yield name, rank, _DTYPES[dtype_id]


def _read_string(f) -> str:
    (length,) = struct.unpack("H", f.read(2))
    return f.read(length)[:-1].decode("utf-8")
