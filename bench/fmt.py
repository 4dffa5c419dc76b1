"""Number formatting for BENCHMARKS.md."""

from __future__ import annotations

from typing import Any, Optional


def mib(n: Optional[float]) -> str:
    return "—" if n is None else f"{n / 2**20:,.1f} MiB"


def sec(x: Optional[float], digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f} s"


def num(x: Optional[float], digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def pct(x: Optional[float], digits: int = 2) -> str:
    return "—" if x is None else f"{x * 100:.{digits}f} %"


def status(ok: Optional[bool]) -> str:
    return "—" if ok is None else ("met" if ok else "**missed**")


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
