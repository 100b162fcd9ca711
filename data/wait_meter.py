"""How long a training loop waits for its data: the data-wait fraction of a step.

Wrap the step iterable the trainer consumes::

    meter = WaitMeter(stream)
    trainer.train(meter)
    print(meter.stats())   # e.g. "data wait 0.4% of 812 ms per step over 199 steps ..."

The wait of a step is the time spent inside ``next()`` for it; the step time is the time from
one step's arrival to the next one's (compute plus wait). The first step's wait includes starting
the stream, so it is reported apart (``first_wait_s``) and left out of the fraction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class WaitStats:
    """Totals of a :class:`WaitMeter` (seconds)."""

    steps: int  # steps whose wait and step time are counted (all but the first)
    wait_s: float  # summed wait of those steps
    elapsed_s: float  # summed step time of those steps
    max_wait_s: float
    first_wait_s: float

    @property
    def wait_fraction(self) -> float:
        """Share of step time spent waiting for data (0 when no step was timed)."""
        return self.wait_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def __str__(self) -> str:
        per_step = 1000 * self.elapsed_s / self.steps if self.steps else 0.0
        return (f"data wait {100 * self.wait_fraction:.1f}% of {per_step:.0f} ms per step over "
                f"{self.steps} steps (max wait {1000 * self.max_wait_s:.0f} ms; first step "
                f"{1000 * self.first_wait_s:.0f} ms)")


class WaitMeter(Generic[T]):
    """An iterable that passes ``source``'s items through and times the waits for them."""

    def __init__(self, source: Iterable[T], clock: Callable[[], float] = time.perf_counter):
        self._source = source
        self._clock = clock
        self._waits: list[float] = []
        self._arrivals: list[float] = []

    def __iter__(self) -> Iterator[T]:
        it = iter(self._source)
        while True:
            t0 = self._clock()
            try:
                item = next(it)
            except StopIteration:
                return
            t1 = self._clock()
            self._waits.append(t1 - t0)
            self._arrivals.append(t1)
            yield item

    def stats(self) -> WaitStats:
        """Totals so far; step ``k >= 1`` counts its wait and the time since step ``k - 1``."""
        waits = self._waits[1:]
        elapsed = sum(b - a for a, b in zip(self._arrivals, self._arrivals[1:]))
        return WaitStats(steps=len(waits), wait_s=sum(waits), elapsed_s=elapsed,
                         max_wait_s=max(waits, default=0.0),
                         first_wait_s=self._waits[0] if self._waits else 0.0)
