"""What glibc's malloc keeps: free pages given back, arenas capped, big blocks mapped on their own.
Each is a no-op elsewhere than glibc."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator


def release_free_memory() -> None:
    """Give the malloc heap's free pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    A pass frees its features, encoder output and beams, but glibc keeps those pages mapped, so
    the process's RSS would read as its largest pass so far rather than what it holds.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def limit_retained_memory(arenas: int = 2) -> None:
    """Keep a long-running process that loads and retires models from holding freed memory: cap
    glibc's malloc arenas (``mallopt(M_ARENA_MAX)``) unless ``MALLOC_ARENA_MAX`` is set, and turn
    off MKL's buffer pools (``MKL_DISABLE_FAST_MM=1``) unless that variable is set.

    A process whose threads come and go (each engine has its own) otherwise spreads its
    allocations over up to 8 arenas per core, whose free pages fragment and stay mapped, so its
    RSS grows with every model swap. CTranslate2 built with MKL (its x86 wheels) allocates with
    ``mkl_malloc``, which keeps freed blocks in per-thread pools that ``malloc_trim`` cannot
    reach; they grow where it also computes on MKL (Intel CPUs, or ``CT2_USE_MKL=1``), and
    decoding is as fast without them. The service's RSS over time: BENCHMARKS.md section 5.
    Call it before the threads start and before CTranslate2's first allocation.
    """
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")
    libc = _glibc()
    if libc is not None and "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(_M_ARENA_MAX, arenas)


_M_ARENA_MAX = -8  # glibc's malloc.h


@functools.lru_cache(maxsize=1)
def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 -- both exist on glibc
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


@contextlib.contextmanager
def big_blocks_mapped(threshold: int = 1 << 20) -> Iterator[None]:
    """Within the block, serve every allocation of ``threshold`` bytes or more with its own
    mapping (``mallopt(M_MMAP_THRESHOLD)``), so freeing it gives it back to the OS at once.

    By default glibc raises that threshold to the size of each mapped block freed (up to 32 MiB),
    so a conversion, which frees tensors of a few MiB while it allocates others, puts them on the
    heap, whose free holes stay in RSS: the conversion's peak then varies from run to run, and
    with the threshold fixed it does not (the peaks: BENCHMARKS.md section 4b). On exit the
    threshold is 32 MiB, where glibc's own adjustment ends in a process that frees big blocks.
    Unchanged where ``MALLOC_MMAP_THRESHOLD_`` is set.
    """
    libc = _glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
