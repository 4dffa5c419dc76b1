"""How the decoding engine fills its forward passes: one policy, decisions only.

Which waiting model calls share the next pass, how long a pass that is not full waits for
company, and how an encode pass is split into encoder calls. The engine (``engine.Engine``)
applies these decisions on its threads; they are kept apart so they can be read and tested
without threads or a model. The defaults here are the project's: the engine, the pyfunc, the
batched long-form pipeline and the service's configuration all take theirs from this class.

Importing it is cheap (no numpy, no decoding stack): the service's configuration reads the
default in a process that does not decode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Protocol, TypeVar


class Waiting(Protocol):
    """What the policy reads of a waiting model call."""

    key: tuple  # calls with the same key can share a pass (the same CTranslate2 call and arguments)
    windows: int  # 30 s windows it brings to the pass
    skips: int  # passes that went before it although it was older

    @property
    def long(self) -> bool:
        """Whether it belongs to a request of more than one window (a long file)."""
        ...


_Call = TypeVar("_Call", bound=Waiting)


@dataclass(frozen=True)
class BatchPolicy:
    """How the engine fills its forward passes.

    Attributes:
        batch_size: the most windows one forward pass takes (the same default on every device).
        encode_batch_size: the most windows one encoder call takes within an encode pass; None:
            the device's default (``encoder_batch_size``).
        gather_s: how long a pass that is not full waits for windows of requests whose thread
            is between two model calls. A lone request never waits.
        max_skips: how many passes may go before an older call (short requests before a long
            file's window) before it goes next.
    """

    batch_size: int = 8
    encode_batch_size: Optional[int] = None
    gather_s: float = 0.01
    max_skips: int = 2

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.encode_batch_size is not None and self.encode_batch_size < 1):
            raise ValueError("batch_size and encode_batch_size must be at least 1")

    def encoder_batch_size(self, device: str) -> int:
        """The most windows one encoder call takes on ``device``: by default one on a CPU, where a
        window costs more batched than alone (BENCHMARKS.md section 2), ``batch_size`` on a GPU."""
        if self.encode_batch_size is not None:
            return self.encode_batch_size
        return 1 if device == "cpu" else self.batch_size

    def encoder_calls(self, windows: int, device: str) -> list[range]:
        """The rows of an encode pass of ``windows`` windows on ``device``, one range per encoder call."""
        step = self.encoder_batch_size(device)
        return [range(i, min(i + step, windows)) for i in range(0, windows, step)]

    def gathers(self, waiting_windows: int, computing: int) -> bool:
        """Whether the next pass waits (up to ``gather_s``) for more windows: some request is
        between two model calls and the windows waiting do not fill a pass."""
        return computing > 0 and waiting_windows < self.batch_size

    def next_batch(self, calls: Sequence[_Call]) -> list[_Call]:
        """The calls of the next pass, out of ``calls`` in arrival order: the first in turn and
        every other that can share its pass (the same ``key``), up to ``batch_size`` windows.

        Short requests (one window) go before long ones, oldest first within each, and a pass
        takes one kind only: a short request sent while a long file decodes waits for the pass in
        flight, not behind the file's windows, and its passes are not lengthened by them. A call
        that short requests passed over ``max_skips`` times goes next (``passed_over`` says which
        were passed over), so a long file keeps going under a stream of short ones.
        """
        if not calls:
            return []
        # sorted() is stable: arrival order within the same turn
        queue = sorted(calls, key=lambda c: (c.skips < self.max_skips, c.long))
        first = queue[0]
        batch, windows = [first], first.windows
        for call in queue[1:]:
            if call.key == first.key and call.long == first.long and windows + call.windows <= self.batch_size:
                batch.append(call)
                windows += call.windows
        return batch

    @staticmethod
    def passed_over(calls: Sequence[_Call], batch: Sequence[_Call]) -> list[_Call]:
        """The calls older than the first of ``batch`` that it leaves waiting: each was skipped once more."""
        if not batch:
            return []
        taken = {id(c) for c in batch}
        first = next(i for i, c in enumerate(calls) if c is batch[0])
        return [c for c in calls[:first] if id(c) not in taken]
