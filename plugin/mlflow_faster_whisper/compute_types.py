"""CTranslate2's compute types, one row each: what conversion writes and what a device runs instead.

Conversion (``conversion``, ``lowmem``) and placement (``devices``) both read this table, so a new
quantization is one row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ComputeType:
    """One CTranslate2 compute type (also a quantization a model is converted to).

    Attributes:
        name: CTranslate2's name for it.
        weights: the dtype of its weight matrices in model.bin.
        stored_as: what ``ct2.stored_quantization`` reads back from a model.bin written in it
            (CTranslate2 writes "int8" and "int8_float32" identically).
        load_as_float16: whether a checkpoint is loaded in float16 to be converted to it, as
            CTranslate2's own command line does (half the float copy in memory); else in its own dtype.
        fallbacks: what a device that cannot run it runs instead, the first it supports.
    """

    name: str
    weights: str
    stored_as: str
    load_as_float16: bool
    fallbacks: tuple[str, ...]

    @property
    def int8_weights(self) -> bool:
        """Whether its weight matrices are quantized to int8 (a float32 scale per row)."""
        return self.weights == "int8"


# The float16 types load as float16, the bfloat16 ones do not: a float16 copy on the way would clip
# weights beyond float16's range and round the rest twice (a model.bin unlike CTranslate2's own).
_TABLE = (
    #           name             weights     stored_as        load_as_float16  fallbacks
    ComputeType("int8", "int8", "int8_float32", False, ("int8_float32", "float32")),
    ComputeType("int8_float32", "int8", "int8_float32", False, ("int8", "float32")),
    ComputeType("int8_float16", "int8", "int8_float16", True, ("int8_float32", "int8", "float32")),
    ComputeType("int8_bfloat16", "int8", "int8_bfloat16", False, ("int8_float32", "int8", "float32")),
    ComputeType("int16", "int16", "int16", False, ("int8", "float32")),
    ComputeType("float16", "float16", "float16", True, ("float32",)),
    ComputeType("bfloat16", "bfloat16", "bfloat16", False, ("float32",)),
    ComputeType("float32", "float32", "float32", False, ()),
)

BY_NAME: dict[str, ComputeType] = {row.name: row for row in _TABLE}
NAMES = tuple(BY_NAME)


def get(name: Optional[str]) -> Optional[ComputeType]:
    """The row of ``name``; None for anything else ("default", "auto", "none", None)."""
    return BY_NAME.get(name) if name is not None else None
