"""One variant's measured result, and how steady-state throughput is read off step end times.

Every variant records, on its first stage (the one that finishes a step last in every schedule),
the wall-clock time at which each timed step ended. The steady-state period is the mean time
between step ends with the first and the last timed step left out: that removes the pipeline
fill (and the driver's first submission) and the end-of-call drain, and keeps whatever the
schedule itself costs per step (a flushing schedule's bubble is in every step).
"""

from __future__ import annotations

import resource
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports kibibytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def steady_period(step_ends: Sequence[float]) -> float:
    """Mean seconds per step between the end of the first and of the next-to-last timed step."""
    if len(step_ends) < 4:
        raise ValueError(f"need at least 4 timed steps to leave out the first and the last, got "
                         f"{len(step_ends)}")
    return (step_ends[-2] - step_ends[0]) / (len(step_ends) - 2)


def compute_medians(records: Iterable[tuple[int, str, float]]) -> dict[str, dict[str, Any]]:
    """``(stage, kind, seconds)`` of every computation of the timed steps -> per (virtual) stage
    and kind (``F`` forward, ``B`` whole backward, ``I`` / ``W`` a split backward's input and
    weight passes): the count and the median milliseconds. Both runtimes report this, so their
    computations can be compared one by one in the same run."""
    got: dict[str, dict[str, list[float]]] = {}
    for stage, kind, seconds in records:
        got.setdefault(str(stage), {}).setdefault(kind, []).append(seconds)
    return {s: {k: {"count": len(v), "median_ms": 1e3 * statistics.median(v)}
                for k, v in sorted(kinds.items())}
            for s, kinds in sorted(got.items(), key=lambda kv: int(kv[0]))}


@dataclass(frozen=True)
class StageMemory:
    """Per stage (process): bytes of weights (every version held) and optimizer state, the peak
    of activations held for backward and of microbatches in flight, and how much the process's
    peak RSS grew while training (from before the first step to after the last)."""

    stage: int
    weights: int
    optimizer: int
    peak_activations: int
    peak_in_flight: int
    rss_growth: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.peak_activations


@dataclass(frozen=True)
class Measurement:
    """What one variant did on one workload."""

    workload: str
    variant: str                 # e.g. "single-1t", "pd2bw-2bw", "torch-1F1B"
    framework: str               # "single process", "pd2bw-ray", "torch.distributed.pipelining"
    schedule: str
    depth: int
    threads_total: int           # torch intra-op threads summed over processes
    num_microbatches: int
    microbatch_size: int
    step_ends: tuple[float, ...]  # seconds from the start of the timed call
    call_seconds: float          # the whole timed call, fill and drain included
    losses: tuple[float, ...]
    stages: tuple[StageMemory, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def period(self) -> float:
        return steady_period(self.step_ends)

    @property
    def microbatches_per_s(self) -> float:
        return self.num_microbatches / self.period

    @property
    def samples_per_s(self) -> float:
        return self.microbatches_per_s * self.microbatch_size

    @property
    def call_samples_per_s(self) -> float:
        n = len(self.step_ends) * self.num_microbatches * self.microbatch_size
        return n / self.call_seconds

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(period_s=self.period, microbatches_per_s=self.microbatches_per_s,
                 samples_per_s=self.samples_per_s, call_samples_per_s=self.call_samples_per_s)
        return d
